"""`alexnet prepare`: decode an ImageNet-layout folder once, so that training reads ready pixels.

Every image is scaled and centre-cropped to 256x256 by data.load_image, exactly as the folder pipeline
does, and stored in one file per split: raw uint8 arrays (fastest to read, 196 KB an image) or JPEG
re-encoded at that size (about 10x smaller, decoded again per batch). prepared.py describes the
files and reads them.

One pass does everything. Worker processes decode chunks of images and, for the training split, sum
the pixel moments of the mean image and colour covariance; this process appends their results to
the split's files in source order. Bad files (unreadable, truncated, not an image) are listed in
bad.txt and left out, and so are files whose names hold a line break, which the line-per-file lists
(<split>_files.txt, bad.txt) cannot hold. Neither the number of workers nor the chunk size changes a
byte of the output.

Interruption: once a second (after a whole chunk) the files are fsynced and the progress (images
consumed and written, bad files, moment sums) is saved atomically in OUT/.progress/. Running prepare
again cuts the files back to the recorded length and carries on, so a killed run, resumed, writes
exactly the bytes of an uninterrupted one. manifest.json is written last: a dataset is complete iff
it exists. Ctrl-C or SIGTERM, to this process or its whole group, stops in order: the chunks decoded
are written and recorded, and Interrupted says how far it got; so does a worker's death, in a UserError.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..checkpoint import write_atomic, write_text_atomic
from ..errors import UserError, one_line
from ..stopping import StopSignals
from .folders import Split, _one_line, listing, load_image, open_split
from .prepared import FORMAT, MANIFEST, PreparedSplit, decode_jpegs, open_prepared, read_manifest, split_files

SPLITS = ("train", "val")
PROGRESS = ".progress"  # prepared.is_prepared knows this name too
RECORD_EVERY_S = 1.0  # fsync and record progress at most this often: a kill loses at most this much work
CHECK_CHUNK = 64  # images decoded at a time by each thread of prepare --check (12 MB of 256x256 pixels)
# what str.splitlines ends a line at: a file name holding one would break the line-per-file lists
LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent dies


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    fmt: str = "raw",
    workers: int | None = None,
    size: int = 256,
    progress: bool = True,
    quality: int = 90,
    *,
    splits: Sequence[str] | None = None,
    chunk_size: int = 64,
) -> dict:
    """Prepare the splits of `src` (default: those of train/ and val/ it has) in `out`; return the manifest.

    fmt: "raw" (uint8 arrays) or "jpeg" (re-encoded at `quality`). workers: decoding processes (default:
    all cores; 0 decodes in this process). Val is labelled with train's classes when src has a train/.
    The mean image and colour covariance (stats.pt) are those of train, or of the only split prepared.
    Running it again on an unfinished `out` resumes; on a finished one with the same settings and
    source files it returns at once. Raises UserError for bad settings, a foreign `out`, or a split
    that is mostly unreadable (over half its files). Ctrl-C or SIGTERM raises stopping.Interrupted once
    the work in hand is recorded; running it again resumes.
    """
    with StopSignals(Path(out), then="run the same prepare again to resume") as stop:
        stop.where = "before any image was prepared"
        return _prepare(src, out, fmt, workers, size, progress, quality, splits, chunk_size, stop)


def _prepare(
    src: str | Path,
    out: str | Path,
    fmt: str,
    workers: int | None,
    size: int,
    progress: bool,
    quality: int,
    splits: Sequence[str] | None,
    chunk_size: int,
    stop: StopSignals,
) -> dict:
    src, out = Path(src).absolute(), Path(out)
    if fmt not in ("raw", "jpeg"):
        raise UserError(f"format must be 'raw' or 'jpeg', not {fmt!r}")
    if size < 1 or chunk_size < 1 or (workers is not None and workers < 0):
        raise UserError(f"size ({size}) and chunk size ({chunk_size}) must be positive, workers ({workers}) >= 0")
    if fmt == "jpeg" and not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be in 1..100, not {quality}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    found = _open_splits(src, splits)
    stats_split = "train" if "train" in found else next(iter(found))
    settings = {
        "format": FORMAT,
        "fmt": fmt,
        "size": size,
        "quality": quality if fmt == "jpeg" else None,
        "source": str(src),
        "splits": {name: listing(split, src) for name, split in found.items()},
    }

    # --- a finished dataset, an unfinished one to resume, or a new folder -----------------------------
    progress_dir = out / PROGRESS
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if _settings_of(manifest) != settings:
            raise UserError(f"{out} already holds a prepared dataset made from other files or settings; pick another")
        shutil.rmtree(progress_dir, ignore_errors=True)  # left behind if a run stopped right after its manifest
        return manifest
    if (progress_dir / "settings.json").is_file():
        if json.loads((progress_dir / "settings.json").read_text()) != settings:
            raise UserError(
                f"{out} holds an unfinished prepare of other files or settings; delete it or pick another folder"
            )
    elif out.exists() and any(p.name != PROGRESS for p in out.iterdir()):
        raise UserError(f"{out} exists and is not a prepared dataset; pick a new or empty folder")
    else:
        progress_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(progress_dir / "settings.json", json.dumps(settings, indent=2) + "\n")

    # --- one pass per split, then the files that describe the whole dataset, the manifest last ---------
    for name, split in found.items():
        for c in split.empty_classes:
            tqdm.write(f"warning: class folder {c} in {src / name} has no images")
    states = {
        name: _prepare_split(
            out, name, split, fmt, size, quality, workers, chunk_size, name == stats_split, progress, stop
        )
        for name, split in found.items()
    }
    stop.where = "with every image prepared, before the dataset's last files were written"
    moments = _moments(states[stats_split]["sums"], states[stats_split]["written"], size)
    write_atomic(out / "stats.pt", lambda f: torch.save(moments, f))
    split = next(iter(found.values()))
    rows = [f"{i}\t{c}\t{n}\n" for i, (c, n) in enumerate(zip(split.classes, split.names, strict=True))]
    write_text_atomic(out / "classes.tsv", "index\twnid\tname\n" + "".join(rows))
    write_text_atomic(out / "bad.txt", "".join(f"{b}\n" for s in states.values() for b in s["bad"]))
    manifest = {
        **settings,
        "splits": {
            name: {**settings["splits"][name], "images": s["written"], "excluded": len(s["bad"])}
            for name, s in states.items()
        },
        "stats_split": stats_split,
        "classes": split.classes,
        "names": split.names,
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(progress_dir)
    return manifest


def _open_splits(src: Path, splits: Sequence[str] | None) -> dict[str, Split]:
    """The splits to prepare, all labelled with train's classes when src has a train/."""
    names = list(splits) if splits is not None else [s for s in SPLITS if (src / s).is_dir()]
    if not names:
        raise UserError(f"{src} has neither a train/ nor a val/ folder to prepare")
    for name in names:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
    classes = open_split(src, "train").classes if (src / "train").is_dir() else None
    return {name: open_split(src, name, classes) for name in names}


def _settings_of(manifest: dict) -> dict:
    keys = ("format", "fmt", "size", "quality", "source")
    splits = {n: {k: s[k] for k in ("sources", "listing_sha256")} for n, s in manifest["splits"].items()}
    return {**{k: manifest[k] for k in keys}, "splits": splits}


def _prepare_split(
    out: Path,
    name: str,
    split: Split,
    fmt: str,
    size: int,
    quality: int,
    workers: int,
    chunk_size: int,
    with_stats: bool,
    progress: bool,
    stop: StopSignals,
) -> dict:
    """Decode one split into its files, resuming from .progress/<name>.pt; return the final progress state."""
    files, n = split_files(name, fmt), len(split.samples)
    state_path, sizes_path = out / PROGRESS / f"{name}.pt", out / PROGRESS / f"{name}_sizes.i64"
    state = _progress_state(state_path, size, with_stats)
    paths = [p for p, _ in split.samples]
    tasks = ((paths[i : i + chunk_size], size, fmt, quality, with_stats) for i in range(state["done"], n, chunk_size))
    bar = tqdm(total=n, initial=state["done"], desc=f"prepare {name}", unit="img", disable=not progress)
    # jpeg: the byte size of each image, in order (offsets are their running sum); raw leaves it empty
    with bar, open(out / files["images"], "ab") as data, open(sizes_path, "ab") as sizes:  # bar: closed on a stop too
        if os.fstat(data.fileno()).st_size < state["bytes"]:
            raise UserError(f"{out / files['images']} is shorter than its recorded progress; delete {out}, start again")
        data.truncate(state["bytes"])  # drop whatever a killed run wrote after its last recorded chunk
        sizes.truncate(8 * state["written"] if fmt == "jpeg" else 0)
        recorded = -float("inf")
        stopped_at = f"with {{}} of {n} {name} images done"  # a signal: written and recorded, or none in hand
        stop.where = stopped_at.format(state["done"])
        try:
            with stop.deferred(stopped_at.format(n)), closing(_in_order(_decode_chunk, tasks, workers)) as results:
                for images, failed, sums in results:
                    _append_chunk(state, fmt, data, sizes, images, failed, sums)
                    if time.monotonic() - recorded >= RECORD_EVERY_S or stop.signum:
                        _record(state, state_path, data, sizes)
                        recorded = time.monotonic()
                    bar.update(len(images) + len(failed))
                    if stop.signum:
                        raise stop.interrupted(stopped_at.format(state["done"]))
                    if len(state["bad"]) > n / 2:
                        raise UserError(
                            f"{len(state['bad'])} of {n} files in {name}/ cannot be read as images "
                            f"(first: {state['bad'][0].replace(chr(9), ': ')})"
                        )
        except OSError as e:  # a full disk: what was recorded stays, and the next run carries on from it
            raise UserError(f"{one_line(e)}, writing {out}; make room and run the same prepare again to resume") from e
        except BrokenProcessPool:  # a worker died: of this stop's SIGTERM to the group, or of something else
            _record(state, state_path, data, sizes)
            if stop.signum:
                raise stop.interrupted(stopped_at.format(state["done"])) from None
            raise UserError(
                f"a worker process of prepare died (killed, or out of memory?) with {state['done']} of {n} {name} "
                "images done; run the same prepare again to resume"
            ) from None
        _record(state, state_path, data, sizes)
        stop.where = f"with every {name} image prepared, before its lists of files were written"
    _write_lists(out, files, split, state, sizes_path if fmt == "jpeg" else None)
    return state


def _progress_state(state_path: Path, size: int, with_stats: bool) -> dict:
    """A split's progress so far (.progress/<name>.pt), or that of one not started."""
    if state_path.is_file():
        return torch.load(state_path, weights_only=True)
    shapes = {"image": (3, size, size), "rgb": (3,), "outer": (3, 3)}
    sums = {k: torch.zeros(shape, dtype=torch.long) for k, shape in shapes.items()} if with_stats else None
    return {"done": 0, "written": 0, "bytes": 0, "bad_index": [], "bad": [], "sums": sums}


def _append_chunk(
    state: dict, fmt: str, data: BinaryIO, sizes: BinaryIO, images: np.ndarray | list[bytes], failed: list, sums
) -> None:
    """A decoded chunk's images written (raw: one uint8 array; jpeg: bytes, and their sizes), and counted."""
    if fmt == "raw":
        data.write(memoryview(images))
        nbytes = images.nbytes
    else:
        data.write(b"".join(images))
        nbytes = sum(map(len, images))
        sizes.write(np.array([len(b) for b in images], np.int64).tobytes())
    state["bad_index"] += [state["done"] + i for i, _ in failed]
    state["bad"] += [reason for _, reason in failed]
    state["done"] += len(images) + len(failed)
    state["written"] += len(images)
    state["bytes"] += nbytes
    if sums is not None:
        state["sums"] = {k: state["sums"][k] + sums[k] for k in sums}


def _record(state: dict, state_path: Path, data: BinaryIO, sizes: BinaryIO) -> None:
    """Make the data durable, then say how far it goes."""
    for f in (data, sizes):
        f.flush()
        os.fsync(f.fileno())
    write_atomic(state_path, lambda f: torch.save(state, f))


def _write_lists(out: Path, files: dict[str, str], split: Split, state: dict, sizes_path: Path | None) -> None:
    """A finished split's labels and file list, without the unreadable files; jpeg: its offsets."""
    bad = set(state["bad_index"])
    kept = [sample for i, sample in enumerate(split.samples) if i not in bad]
    labels = np.array([label for _, label in kept], dtype=np.int64)
    write_atomic(out / files["labels"], lambda f: np.save(f, labels))
    write_text_atomic(out / files["files"], "".join(f"{path}\n" for path, _ in kept))
    if sizes_path is not None:
        offsets = np.concatenate([[0], np.cumsum(np.fromfile(sizes_path, np.int64))]).astype(np.int64)
        write_atomic(out / files["offsets"], lambda f: np.save(f, offsets))


def _in_order(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """fn over tasks in worker processes, results in task order, at most 2 * workers tasks in flight
    (so memory stays bounded however fast the workers are). workers 0: in this process.

    A worker that dies (SIGTERM to the process group, the kernel's OOM killer) raises BrokenProcessPool:
    concurrent.futures notices the death, where multiprocessing.Pool would wait for the lost task forever.
    However it ends, the tasks not started are dropped and those in flight finish."""
    if workers == 0:
        yield from map(fn, tasks)
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(parent: int) -> None:
    torch.set_num_threads(1)  # one process per core already
    # Ctrl-C reaches the whole process group: the main process acts on it, then shuts the pool down. SIGTERM
    # there ends the workers at once (not a handler inherited from the main process), which it notices.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":  # if a second signal ends the main process at once, its workers end with it
        with contextlib.suppress(OSError, AttributeError):  # a C library without prctl: they end on its EOF
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before prctl
        os._exit(1)


def _decode_chunk(task: tuple) -> tuple:
    """Worker: decode a chunk of files. -> (raw (k, 3, S, S) uint8 array or list of k JPEG bytes,
    [(position in chunk, "path<TAB>reason")] of the files that failed, moment sums or None)."""
    paths, size, fmt, quality, with_stats = task
    images, failed = [], []
    for i, path in enumerate(paths):
        if LINE_BREAKS.search(path):  # named escaped in bad.txt, so that it stays one line
            escaped = LINE_BREAKS.sub(lambda m: repr(m[0])[1:-1], path)
            failed.append((i, f"{escaped}\tfile name holds a line break, which the lists of files cannot hold"))
            continue
        try:
            images.append(load_image(path, size))
        except Exception as e:  # noqa: BLE001 - any decoder failure: leave the file out and say why
            failed.append((i, f"{path}\t{type(e).__name__}: {_one_line(str(e))}"))
    x = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    sums = _moment_sums(x) if with_stats else None
    if fmt == "raw":
        return x.numpy(), failed, sums
    return [_encode_jpeg(im, quality) for im in x], failed, sums


def _encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _moment_sums(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer sums over uint8 images (k, 3, S, S): per pixel, per colour, and of colour outer products.

    Integers add up exactly in any order, so the statistics do not depend on chunks, workers or resumes.
    """
    outer = torch.zeros(3, 3, dtype=torch.long)
    for image in x:
        p = image.reshape(3, -1).double()
        outer += (p @ p.T).round().long()  # exact: every partial sum is an integer below 2**53
    return {"image": x.sum(0, dtype=torch.long), "rgb": x.sum((0, 2, 3), dtype=torch.long), "outer": outer}


def _moments(sums: dict[str, torch.Tensor], count: int, size: int) -> dict:
    """stats.pt as train/loop.py stores it: data.image_moments' mean image and covariance, in [0, 1] units."""
    n_pixels = count * size * size
    mean_rgb = sums["rgb"].double() / 255 / n_pixels
    covariance = sums["outer"].double() / 255**2 / n_pixels - torch.outer(mean_rgb, mean_rgb)
    mean_image = sums["image"].double() / 255 / count
    return {"mean_image": mean_image.float(), "covariance": covariance.float(), "images": count}


def check_dataset(out: str | Path, progress: bool = True, workers: int | None = None) -> str:
    """Verify a finished prepared dataset, JPEGs decoded every one (in `workers` threads, default: one
    per core); return a one-line summary or raise UserError with one line."""
    out = Path(out)
    manifest = read_manifest(out)
    fmt, size, num_classes = manifest["fmt"], manifest["size"], len(manifest["classes"])
    for fname in ("classes.tsv", "stats.pt"):
        if not (out / fname).is_file():
            raise UserError(f"{out / fname} is missing")
    rows = (out / "classes.tsv").read_text().count("\n") - 1
    if rows != num_classes:
        raise UserError(f"{out / 'classes.tsv'} lists {rows} classes, the manifest {num_classes}")
    for name, info in manifest["splits"].items():
        n, files = info["images"], split_files(name, fmt)
        for fname in files.values():
            if not (out / fname).is_file():
                raise UserError(f"{out / fname} is missing")
        if fmt == "raw":
            expected, actual = n * 3 * size * size, (out / files["images"]).stat().st_size
            if actual != expected:
                raise UserError(
                    f"{out / files['images']} holds {actual} bytes, not {expected} ({n} images of 3x{size}x{size})"
                )
        try:
            split = open_prepared(out, name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot open split {name} of {out}: {type(e).__name__}: {_one_line(str(e))}") from e
        if split.labels.shape != (n,) or split.labels.dtype != np.int64:
            raise UserError(f"{out / files['labels']} is {split.labels.shape} {split.labels.dtype}, not ({n},) int64")
        if n and not (0 <= split.labels.min() and split.labels.max() < num_classes):
            raise UserError(f"{out / files['labels']} has labels outside 0..{num_classes - 1}")
        lines = len(split.sources)  # as the loader reads them: what str.splitlines counts as lines
        if lines != n:
            raise UserError(f"{out / files['files']} lists {lines} files, not {n}")
        if fmt == "jpeg":
            _check_jpegs(out, files, split, n, size, progress, workers or os.cpu_count() or 1)
    _check_stats(out, size)
    counts = ", ".join(f"{name} {info['images']}" for name, info in manifest["splits"].items())
    excluded = sum(info["excluded"] for info in manifest["splits"].values())
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return (
        f"{out}: ok, {fmt} {size}x{size}, {counts} images, {num_classes} classes, "
        f"{excluded} excluded, {disk / 2**20:.1f} MiB"
    )


def _check_jpegs(
    out: Path, files: dict[str, str], split: PreparedSplit, n: int, size: int, progress: bool, threads: int
) -> None:
    """Every image decodes to 3 x size x size: a damaged one would otherwise be found by a training
    epoch. Decoding releases the GIL, so threads use the cores."""
    offsets = split.offsets
    if offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        raise UserError(f"{out / files['offsets']} is not {n + 1} increasing byte offsets from 0")
    if offsets[-1] != len(split.images):
        raise UserError(f"{out / files['images']} holds {len(split.images)} bytes, its offsets say {offsets[-1]}")

    def check(start: int) -> list[tuple[int, str]]:
        stop = min(start + CHECK_CHUNK, n)
        _, failed = decode_jpegs([split.encoded(i) for i in range(start, stop)], size)
        return [(start + pos, reason) for pos, reason in failed]

    bad = []
    bar = tqdm(total=n, desc=f"check {split.name}", unit="img", disable=not progress)
    starts = range(0, n, CHECK_CHUNK)
    with bar, ThreadPoolExecutor(threads) as pool:
        for start, failed in zip(starts, pool.map(check, starts), strict=True):
            bad += failed
            bar.update(min(CHECK_CHUNK, n - start))
    if bad:
        named = "; ".join(f"image {i} ({split.sources[i]}): {reason}" for i, reason in bad[:5])
        more = "; ..." if len(bad) > 5 else ""
        raise UserError(f"{len(bad)} of {n} images in {out / files['images']} do not decode: {named}{more}")


def _check_stats(out: Path, size: int) -> None:
    try:
        stats = torch.load(out / "stats.pt", weights_only=True)
        ok = (
            stats["mean_image"].shape == (3, size, size)
            and stats["covariance"].shape == (3, 3)
            and bool(torch.isfinite(stats["mean_image"]).all() and torch.isfinite(stats["covariance"]).all())
        )
    except Exception as e:  # noqa: BLE001 - missing, truncated or foreign: one line says which file
        raise UserError(f"cannot read {out / 'stats.pt'}: {type(e).__name__}") from e
    if not ok:
        raise UserError(f"{out / 'stats.pt'} does not hold a mean image (3, {size}, {size}) and a 3x3 covariance")
