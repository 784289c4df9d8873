"""Image datasets in ImageNet layout, decoded one image at a time (the simple, always-correct path).

Layouts:
  root/train/<class>/<image>, root/val/<class>/<image>    (ImageNet / Imagenette folders)
  root/val/<image> + a label file                          (ILSVRC-2012 validation as distributed:
      LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt with meta.mat)

Each image is prepared as the paper did once ahead of training: shorter side scaled to 256, central
256x256 kept. The dataset returns that as a uint8 tensor; augmentation happens per batch (augment.py).
A file that cannot be decoded is returned as None and skipped by `collate`, never crashing an epoch.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import multiprocessing.context
import multiprocessing.popen_fork
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import stopping
from ..errors import UserError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ILSVRC_VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt")
# Refuse decompression bombs outright instead of warning: a 20,000 x 20,000 photo is not ImageNet.
Image.MAX_IMAGE_PIXELS = 200_000_000
warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Split:
    """The images of one split: (path, label) pairs and the class list they index into."""

    samples: list[tuple[str, int]]
    classes: list[str]  # folder names (wnids), in sorted order: label = position here
    names: list[str]  # human-readable names, from classes.tsv when the dataset has one
    empty_classes: list[str]


def is_hidden(name: str) -> bool:
    """A dot-file or dot-folder (.ipynb_checkpoints, macOS's ._photo.jpg): never an image or a class."""
    return name.startswith(".")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(name)


def read_class_names(root: Path, classes: list[str]) -> list[str]:
    """Names from `root/classes.tsv` (index, wnid, name) when present, else the folder names."""
    names = dict.fromkeys(classes, "")
    tsv = root / "classes.tsv"
    if tsv.is_file():
        with open(tsv, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row.get("wnid") in names:
                    names[row["wnid"]] = row.get("name") or ""
    return [names[c] or c for c in classes]


@functools.cache
def imagenet_class_names() -> dict[str, str]:
    """wnid -> name of the 1000 ILSVRC-2012 classes, from the copy shipped with the package."""
    text = resources.files(__package__).joinpath("imagenet_classes.tsv").read_text()
    return {row["wnid"]: row["name"] for row in csv.DictReader(text.splitlines(), delimiter="\t")}


def display_names(classes: list[str], names: list[str] | None) -> list[str]:
    """`names`, or the ILSVRC-2012 names when a model has none (its names are its wnids) and its
    classes are ImageNet wnids, as in a checkpoint converted without a class list of names."""
    names = list(names or classes)
    if names == list(classes):
        known = imagenet_class_names()
        if all(c in known for c in classes):
            return [known[c] for c in classes]
    return names


def list_images(folder: str | Path) -> list[str]:
    """The image files under `folder`, recursively, sorted; hidden files and folders left out."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]  # not descended into
        files += [os.path.join(dirpath, f) for f in filenames if is_image(f)]
    return sorted(files)


def open_split(root: str | Path, split: str, classes: list[str] | None = None, *, subset: bool = False) -> Split:
    """Find `split` under `root` in either layout. `classes` (from the training split) fixes the labels:
    the class folders must be exactly those, or with `subset` (a model's classes, in the model's order)
    any of them, each labelled by its place in `classes`."""
    root = Path(root)
    folder = root / split
    if not root.is_dir():
        raise UserError(f"data folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}")
    if not folder.is_dir():
        raise UserError(f"{root} has no '{split}' folder (expected {folder}/<class>/<image>)")
    subdirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name))
    if subdirs:
        if subset and classes is not None:
            if extra := sorted(set(subdirs) - set(classes)):
                raise UserError(
                    f"{len(extra)} class folders of {folder} are not among the model's {len(classes)} classes: "
                    f"{', '.join(extra[:5])}{'...' if len(extra) > 5 else ''}"
                )
        elif classes is not None and subdirs != classes:
            missing, extra = sorted(set(classes) - set(subdirs)), sorted(set(subdirs) - set(classes))
            raise UserError(
                f"classes of {folder} differ from the training classes: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        classes = subdirs if classes is None else classes
        index = {c: i for i, c in enumerate(classes)}
        samples, empty = [], []
        for c in subdirs:
            files = list_images(folder / c)
            empty += [] if files else [c]
            samples += [(f, index[c]) for f in files]
    else:
        samples, classes = _flat_samples(root, folder, classes), classes
        empty = []
    if not samples:
        raise UserError(f"no images found in {folder}")
    return Split(samples, classes, read_class_names(root, classes), empty)


def listing(split: Split, root: str | Path) -> dict:
    """What identifies a split's sources: how many, and a digest of (path under `root`, label) in order."""
    # surrogateescape: a file name that is not UTF-8 counts as the bytes it is on disk
    text = "".join(f"{os.path.relpath(p, root)}\t{y}\n" for p, y in split.samples)
    digest = hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()
    return {"sources": len(split.samples), "listing_sha256": digest}


def _flat_samples(root: Path, folder: Path, classes: list[str] | None) -> list[tuple[str, int]]:
    """The ILSVRC-2012 validation layout: one flat folder of images and a label file."""
    label_file = next((d / n for n in ILSVRC_VAL_LABEL_FILES for d in (folder, root) if (d / n).is_file()), None)
    if label_file is None:
        raise UserError(f"{folder} holds no class folders and no label file ({' or '.join(ILSVRC_VAL_LABEL_FILES)})")
    if classes is None:
        raise UserError(f"{folder} is a flat validation folder: its classes come from a training split")
    wnid_of = read_ilsvrc_val_labels(label_file)
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for f in list_images(folder):
        stem = Path(f).stem
        if stem not in wnid_of:
            raise UserError(f"{label_file.name} has no label for {Path(f).name}")
        if wnid_of[stem] not in index:
            raise UserError(f"{Path(f).name} is labelled {wnid_of[stem]}, which is not a training class")
        samples.append((f, index[wnid_of[stem]]))
    return samples


def read_ilsvrc_val_labels(label_file: Path) -> dict[str, str]:
    """Image stem -> wnid, from LOC_val_solution.csv or the devkit's ground truth (+ meta.mat beside it)."""
    if label_file.suffix == ".csv":
        return _read_loc_solution(label_file)
    meta = label_file.parent / "meta.mat"
    if not meta.is_file():
        raise UserError(f"{label_file.name} needs the devkit's meta.mat beside it to map class ids to wnids")
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise UserError("reading the devkit's meta.mat needs scipy: pip install scipy") from e
    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not the devkit's: say so in one line
        raise UserError(f"cannot read {meta}: {type(e).__name__}: {_one_line(str(e))}") from e
    # The devkit lists labels in file order, one a line: ILSVRC2012_val_00000001 first.
    wnids = []
    for n, line in enumerate(label_file.read_text(errors="replace").splitlines(), start=1):
        if not (word := line.strip()):
            continue
        if not word.isdecimal() or int(word) not in wnid_of_id:
            raise UserError(
                f"{label_file.name} line {n}: {word[:40]!r} is not one of the {len(wnid_of_id)} class ids in meta.mat"
            )
        wnids.append(wnid_of_id[int(word)])
    return {f"ILSVRC2012_val_{i:08d}": wnid for i, wnid in enumerate(wnids, start=1)}


def _read_loc_solution(label_file: Path) -> dict[str, str]:
    """Image stem -> wnid: the first word of each row's PredictionString (wnid and box, repeated)."""
    wnid_of = {}
    with open(label_file, newline="", errors="replace") as f:
        rows = csv.DictReader(f)
        if missing := [c for c in ("ImageId", "PredictionString") if c not in (rows.fieldnames or [])]:
            header = ",".join(rows.fieldnames or [])[:80]
            expected = "ImageId,PredictionString"
            raise UserError(f"{label_file.name} has no {missing[0]} column: its header is {header!r}, not {expected!r}")
        for row in rows:
            if not (words := (row["PredictionString"] or "").split()):
                where = f"{label_file.name} line {rows.line_num}"
                raise UserError(f"{where}: {row['ImageId']} has an empty PredictionString")
            wnid_of[row["ImageId"]] = words[0]
    return wnid_of


def load_image(path: str, size: int = 256) -> torch.Tensor:
    """Decode, scale the shorter side to `size`, keep the central size x size: (3, size, size) uint8."""
    with Image.open(path) as im:
        # A JPEG of 4x the size or more: decode at a reduced scale (libjpeg's DCT scaling) still at least
        # twice `size`, then resize. A draft of `size` itself would skip the resize's smoothing: textures
        # came out up to 10 grey levels off on average (imagenet-sample-1000's howler monkey).
        im.draft("RGB", (2 * size, 2 * size))
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the top 8 bits
            im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 image or None, label, path) per sample. None marks a file that could not be decoded."""

    def __init__(self, samples: list[tuple[str, int]], size: int = 256) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        path, label = self.samples[i]
        try:
            return load_image(path, self.size), label, path
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this file
            return None, label, f"{path}\t{type(e).__name__}: {_one_line(str(e))}"


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:200]


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: torch.Tensor  # (B,) int64
    bad: list[str]  # "path<TAB>reason" for files skipped in this batch

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.bad)


def collate(items: list[tuple[torch.Tensor | None, int, str]]) -> Batch:
    good = [(x, y) for x, y, _ in items if x is not None]
    bad = [p for x, _, p in items if x is None]
    if not good:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad)
    return Batch(torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad)


class EpochSampler(torch.utils.data.Sampler[int]):
    """One shuffled pass, a function of (seed, epoch) alone, optionally starting part-way through."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.n - self.start


def rank_share(batch: list[int] | np.ndarray, rank: int, world_size: int) -> list[int] | np.ndarray:
    """Rank `rank`'s contiguous, near-equal share of a global batch; the shares partition the batch."""
    return batch[(len(batch) * rank) // world_size : (len(batch) * (rank + 1)) // world_size]


class EpochBatches(torch.utils.data.Sampler[list[int]]):
    """The sample indices of the epoch's batches (in EpochSampler's order) from `start_step` on, each
    cut to this rank's share: PreparedLoader's batches, for the image-folder path."""

    def __init__(
        self, n: int, batch_size: int, seed: int, epoch: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.order = EpochSampler(n, seed, epoch).order()
        self.batch_size, self.start_step, self.rank, self.world_size = batch_size, start_step, rank, world_size

    def __iter__(self):
        for start in range(self.start_step * self.batch_size, len(self.order), self.batch_size):
            yield rank_share(self.order[start : start + self.batch_size], self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, -(-len(self.order) // self.batch_size) - self.start_step)


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach the whole process group; only the main process acts on them (it
    finishes the step, checkpoints and shuts the workers down), so a worker must not die of them.
    Until here they were held (blocked, see _Loader): one that came meanwhile is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping.STOP_SIGNALS)


def loader_worker_death(error: BaseException) -> str | None:
    """The one line to say of `error` if it is PyTorch's word that a data-loader worker died (the OOM
    killer, a crash in a decoder; raised in the main process by its SIGCHLD handler, wherever it is),
    else None."""
    said = first_line(error)
    if not isinstance(error, RuntimeError) or not said.startswith("DataLoader worker (pid"):
        return None
    return f"{said.rstrip('.')} (out of memory?)"


class _WorkerPopen(multiprocessing.popen_fork.Popen):
    """Data-loader workers ignore SIGTERM (_ignore_stop_signals), so terminate() sends them SIGKILL: a
    worker still there after the loader's shutdown (a signal stopped it halfway) is ended by Python's
    exit, which terminates its daemon processes and then waits for them."""

    def terminate(self) -> None:
        self.kill()


class _WorkerProcess(multiprocessing.context.ForkProcess):
    @staticmethod
    def _Popen(process_obj: multiprocessing.process.BaseProcess) -> _WorkerPopen:
        return _WorkerPopen(process_obj)


class _WorkerContext(multiprocessing.context.ForkContext):
    Process = _WorkerProcess


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers start with Ctrl-C and SIGTERM held (stopping.held): one that comes
    meanwhile acts once they all have started. Acting halfway, it would leave workers that no iterator
    shuts down and that ignore SIGTERM, on which Python's exit then waits forever; and a worker that
    had not yet set its handlers would act on the main process's (raise in it, or die of it)."""

    def __iter__(self) -> Iterator:
        with stopping.held():
            return super().__iter__()


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int,
    sampler: torch.utils.data.Sampler | None = None,
    pin_memory: bool = False,
    batch_sampler: torch.utils.data.Sampler | None = None,
    collate_fn: Callable = collate,
) -> torch.utils.data.DataLoader:
    """Batches of `dataset`: of `batch_size` in `sampler`'s order, or the index lists of `batch_sampler`;
    each a Batch, or what `collate_fn` makes of the list of items."""
    return _Loader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        sampler=sampler,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        multiprocessing_context=_WorkerContext() if workers > 0 and sys.platform == "linux" else None,
        prefetch_factor=4 if workers > 0 else None,
    )


def image_moments(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    """One pass over a split: mean image (3, S, S), RGB covariance (3, 3) in [0, 1] units, count, bad files."""
    total = pixel_sum = outer = None
    count, bad = 0, []
    for batch in loader:
        bad += batch.bad
        if not len(batch.labels):
            continue
        x = batch.images.double() / 255.0
        total = x.sum(0) if total is None else total + x.sum(0)
        pixels = x.permute(1, 0, 2, 3).reshape(3, -1)
        pixel_sum = pixels.sum(1) if pixel_sum is None else pixel_sum + pixels.sum(1)
        outer = pixels @ pixels.T if outer is None else outer + pixels @ pixels.T
        count += len(batch.labels)
    if count == 0:
        raise UserError("no readable images in the training split")
    n_pixels = count * total[0].numel()
    mean_rgb = pixel_sum / n_pixels
    cov = outer / n_pixels - torch.outer(mean_rgb, mean_rgb)
    return (total / count).float(), cov.float(), count, bad
