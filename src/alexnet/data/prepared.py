"""Reading a prepared dataset (made by prepare.py): batches of 256x256 uint8 images, fast.

A prepared dataset is a folder holding every image already decoded, scaled and centre-cropped, so an
epoch is a pass over one file per split instead of a million JPEG decodes:

  manifest.json         written last: a dataset is complete iff it exists (format, fmt, size, counts, classes)
  classes.tsv           index, wnid, name
  stats.pt              {"mean_image", "covariance", "images"} of the training split, as train/loop.py stores it
  bad.txt               source files that could not be decoded and were left out (path<TAB>reason)
  <split>_labels.npy    (N,) int64
  <split>_files.txt     the source file of each image, in order
  fmt "raw":  <split>_images.u8    (N, 3, S, S) uint8, no header: np.memmap(path, np.uint8, "r", shape=...)
  fmt "jpeg": <split>_jpegs.bin    the images re-encoded as JPEG, back to back
              <split>_offsets.npy  (N + 1,) int64: image i is bytes offsets[i]:offsets[i + 1]

PreparedLoader turns a split into the same Batch objects the folder pipeline (data/folders.py) yields, in the
same order (EpochSampler), so train/loop.py and augment.train_batch cannot tell the two paths apart: a
stored JPEG that no longer decodes is left out of its batch and named in the batch's `bad`, as the
folder pipeline does with an unreadable file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .folders import Batch, EpochSampler, _one_line, rank_share

FORMAT = "alexnet-prepared-1"
MANIFEST = "manifest.json"
# torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec); they still work and are
# the only batched GPU JPEG decoder in the dependencies. Say so once here instead of on every batch.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def split_files(split: str, fmt: str) -> dict[str, str]:
    """File names of one split's arrays, by role."""
    files = {"labels": f"{split}_labels.npy", "files": f"{split}_files.txt"}
    if fmt == "raw":
        return {**files, "images": f"{split}_images.u8"}
    return {**files, "images": f"{split}_jpegs.bin", "offsets": f"{split}_offsets.npy"}


def is_prepared(root: str | Path) -> bool:
    """A folder made by `alexnet prepare`, finished (its manifest) or not (its .progress folder)."""
    return (Path(root) / MANIFEST).is_file() or (Path(root) / ".progress").is_dir()


def read_manifest(root: str | Path) -> dict:
    """The manifest of a finished prepared dataset; UserError if there is none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{root} is not a finished prepared dataset (no {MANIFEST}); "
            "run `alexnet prepare` on it (again: an interrupted prepare resumes)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an alexnet prepared-dataset manifest ({FORMAT})")
    return manifest


def made_from(root: str | Path) -> str | None:
    """The image folder a prepared dataset was made from, as its manifest records it (None: unfinished)."""
    try:
        return read_manifest(root).get("source")
    except UserError:
        return None


@dataclass
class PreparedSplit:
    """One split of a prepared dataset, memory-mapped: nothing is read until a batch asks for it."""

    name: str
    fmt: str  # "raw" or "jpeg"
    size: int  # images are (3, size, size)
    labels: np.ndarray  # (N,) int64
    images: np.ndarray  # raw: (N, 3, S, S) uint8; jpeg: all the JPEG bytes, (total,) uint8
    offsets: np.ndarray | None  # jpeg: (N + 1,) int64 byte offsets; raw: None
    classes: list[str]  # wnids; a label indexes this list
    names: list[str]  # human-readable class names
    path: Path  # the images file

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> torch.Tensor:
        """jpeg: the bytes of image i, as the 1-D uint8 tensor decode_jpeg takes (a copy: memmaps are read-only)."""
        return torch.from_numpy(np.array(self.images[self.offsets[i] : self.offsets[i + 1]]))

    @functools.cached_property
    def sources(self) -> list[str]:
        """The source file of each image (<split>_files.txt), read when first asked: to name a bad image."""
        text = (self.path.parent / split_files(self.name, self.fmt)["files"]).read_bytes()
        return text.decode(errors="surrogateescape").splitlines()  # names as they are on disk, UTF-8 or not


def decode_jpegs(
    encoded: list[torch.Tensor], size: int, device: str | torch.device = "cpu"
) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
    """Decode JPEG bytes in one batched call: (the images that decode to 3 x size x size, in order,
    [(position, reason)] of those that do not). A damaged one costs a second pass, one image at a time,
    because the batched call fails as a whole without saying which."""
    from torchvision.io import ImageReadMode, decode_jpeg  # here: importing torchvision costs every command ~2 s

    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []
        if all(im.shape == (3, size, size) for im in images):
            return images, []
    except (RuntimeError, ValueError):
        pass
    images, failed = [], []
    for pos, data in enumerate(encoded):
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError) as e:
            why = re.sub(r"^\w+, \S+:\d+, ", "", str(e))  # torchvision's "decode_jpeg, FILE.cpp:171, " prefix
            failed.append((pos, f"{type(e).__name__}: {_one_line(why)}"))
            continue
        if image.shape != (3, size, size):
            failed.append((pos, f"ValueError: decodes to {'x'.join(map(str, image.shape))}, not 3x{size}x{size}"))
            continue
        images.append(image)
    return images, failed


def open_prepared(root: str | Path, split: str) -> PreparedSplit:
    """Open `split` ("train" or "val") of the prepared dataset in `root`."""
    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise UserError(f"prepared dataset {root} has no '{split}' split (it has {', '.join(manifest['splits'])})")
    fmt, size, n = manifest["fmt"], manifest["size"], manifest["splits"][split]["images"]
    files = split_files(split, fmt)
    labels = np.load(root / files["labels"], mmap_mode="r")
    if fmt == "raw":
        images = np.memmap(root / files["images"], np.uint8, "r", shape=(n, 3, size, size))  # checks the size
        offsets = None
    else:
        images = np.memmap(root / files["images"], np.uint8, "r")
        offsets = np.load(root / files["offsets"])
    path = root / files["images"]
    return PreparedSplit(split, fmt, size, labels, images, offsets, manifest["classes"], manifest["names"], path)


class PreparedLoader:
    """One epoch of Batch(images (B, 3, S, S) uint8, labels (B,) int64, bad) from a prepared split; `bad`
    names the JPEGs that no longer decode ("source<TAB>reason"), left out of the batch as the folder
    pipeline leaves out an unreadable file, and is empty otherwise.

    Order: batch b holds order[b * batch_size:(b + 1) * batch_size] with order = EpochSampler(n, seed,
    epoch).order(), exactly the batches the folder pipeline gives for the same seed and epoch. Iteration
    starts at batch `start_step` (a mid-epoch resume).

    Ranks (DDP): each global batch of `batch_size` images is cut into `world_size` contiguous, near-equal
    shares and rank r gets share r. The shares are disjoint and together are exactly the one-process
    batch, so steps per epoch, the schedule and resuming by step do not depend on the number of ranks.
    With drop_last, the epoch's last, incomplete global batch is skipped (a rank never gets an empty share).

    Batches are read in `threads` background threads, `prefetch` batches ahead (reads and JPEG decoding
    release the GIL); threads 0 reads in the caller's thread. The default, None, is 0 for raw data on the
    CPU: a raw batch reads at some 60,000 images/s on one core, far faster than a CPU consumes it, and
    background threads would only compete with its OpenMP threads for the cores (benchmarks/README.md).
    For raw data on CUDA it is 4 (into pinned memory: 51,000 images/s on an H200's machine, against
    33,000 with 2), and 2 for JPEG, whose rate the GPU's decoder sets. Batches come on
    `device`. With cuda, JPEGs are decoded on the GPU (nvjpeg, one batched call) and raw images are
    copied asynchronously from pinned memory (pin_memory=True, which needs CUDA), on a stream of the
    loader's (`copy_stream`) that the consumer's current stream then waits for.
    """

    def __init__(
        self,
        split: PreparedSplit,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        threads: int | None = None,
        prefetch: int = 4,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world size {world_size})")
        n = len(split)
        self.steps = n // batch_size if drop_last else math.ceil(n / batch_size)
        if not 0 <= start_step <= self.steps:
            raise UserError(f"start step {start_step} is outside the epoch's {self.steps} steps")
        self.split, self.batch_size, self.start_step = split, batch_size, start_step
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if threads is None:  # measured: benchmarks/README.md (CPU), benchmarks/RESULTS.md (CUDA)
            threads = {("raw", "cpu"): 0, ("raw", "cuda"): 4}.get((split.fmt, self.device.type), 2)
        self.pin_memory, self.threads, self.prefetch = pin_memory, threads, max(1, prefetch)
        # Pinned batches go to the GPU on a stream of their own, so that a batch's copy (100 MB at batch
        # 512, some 2 ms) runs while the kernels queued before it do, not after them on their stream.
        cuda_copies = self.device.type == "cuda" and pin_memory
        self.copy_stream = torch.cuda.Stream(self.device) if cuda_copies else None
        # Batch memory, reused: a new 25 MB batch faults in 6,000 pages, which took longer than reading
        # the images into it (benchmarks/README.md). Each buffer is lent as a numpy view that the batch
        # tensor keeps alive; the buffer is free again once the view is gone, i.e. no tensor uses it.
        self._buffers: list[tuple[np.ndarray, weakref.ref]] = []
        self._buffers_lock = threading.Lock()
        self.order = np.asarray(EpochSampler(n, seed, epoch, shuffle=shuffle).order(), dtype=np.int64)

    def __len__(self) -> int:
        """Batches left in this epoch, from start_step."""
        return self.steps - self.start_step

    def batch_indices(self, step: int) -> np.ndarray:
        """This rank's sample indices of batch `step`, in the permutation's order."""
        return rank_share(self.order[step * self.batch_size : (step + 1) * self.batch_size], self.rank, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        steps = range(self.start_step, self.steps)
        if self.threads == 0:  # everything in this thread: simplest to debug
            yield from (self._finish(self._read(step)) for step in steps)
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="prepared-loader") as pool:
            pending: deque = deque()
            for step in steps:
                pending.append(pool.submit(self._read, step))
                if len(pending) > self.prefetch:
                    yield self._finish(pending.popleft().result())
            while pending:
                yield self._finish(pending.popleft().result())

    def _read(self, step: int) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, np.ndarray, list[str]]:
        """Batch `step` from disk (background thread). Reads in file order for locality, returns in batch order:
        (images, or JPEG bytes for the GPU to decode, labels, sample indices, bad files)."""
        idx = self.batch_indices(step)
        split = self.split
        labels, bad = torch.from_numpy(np.array(split.labels[idx])), []
        if split.fmt == "jpeg":
            encoded = [split.encoded(i) for i in idx]  # small reads: their order matters little
            if self.device.type == "cuda":
                return encoded, labels, idx, bad  # decoded on the GPU by _finish, in the consumer's thread and stream
            decoded, failed = decode_jpegs(encoded, split.size)
            labels, bad = self._drop(labels, idx, failed)
            images = self._new_batch(len(decoded))
            if decoded:
                torch.stack(decoded, out=images)
        else:
            images = self._new_batch(len(idx))
            read_raw(split.path, idx, images.numpy())
        return images, labels.pin_memory() if self.pin_memory else labels, idx, bad

    def _drop(
        self, labels: torch.Tensor, idx: np.ndarray, failed: list[tuple[int, str]]
    ) -> tuple[torch.Tensor, list[str]]:
        """The labels of the images that decoded, and "source<TAB>reason" of those that did not."""
        if not failed:
            return labels, []
        gone = {pos for pos, _ in failed}
        kept = labels[[pos for pos in range(len(labels)) if pos not in gone]]
        name, sources = self.split.path.name, self.split.sources
        return kept, [f"{sources[idx[pos]]}\t{why} (image {idx[pos]} of {name})" for pos, why in failed]

    def _new_batch(self, n: int) -> torch.Tensor:
        """An empty (n, 3, S, S) uint8 batch, in a buffer that no tensor uses any more if there is one.
        Pinned batches for CUDA come from PyTorch's pinned-memory cache, which reuses them itself."""
        s = self.split.size
        if self.pin_memory:
            return torch.empty((n, 3, s, s), dtype=torch.uint8, pin_memory=True)
        with self._buffers_lock:
            free = [buffer for buffer, lent in self._buffers if lent() is None]
            largest_share = -(-self.batch_size // self.world_size)
            buffer = free[0] if free else np.empty((largest_share, 3, s, s), np.uint8)
            view = buffer[:n]
            self._buffers = [(b, lent) for b, lent in self._buffers if b is not buffer]
            if len(self._buffers) < self.prefetch + self.threads + 2:  # what one loop holds at once
                self._buffers.append((buffer, weakref.ref(view)))
        return torch.from_numpy(view)

    def _finish(self, item: tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, np.ndarray, list[str]]) -> Batch:
        """Move (or, for JPEG on cuda, decode) the batch onto the device: in the consumer's thread."""
        images, labels, idx, bad = item
        if isinstance(images, list):  # JPEG bytes for nvjpeg
            s = self.split.size
            decoded, failed = decode_jpegs(images, s, self.device)
            labels, bad = self._drop(labels, idx, failed)
            images = torch.stack(decoded) if decoded else torch.empty(0, 3, s, s, dtype=torch.uint8)
        if self.device.type == "cpu":
            return Batch(images, labels, bad)
        if self.copy_stream is None or images.is_cuda:
            return Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), bad)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        consumer.wait_stream(self.copy_stream)  # what the consumer queues next waits for this copy only
        for t in (images, labels):  # their memory, the copy stream's, is not reused before the consumer is done
            t.record_stream(consumer)
        return Batch(images, labels, bad)


def read_raw(path: Path, idx: np.ndarray, out: np.ndarray) -> None:
    """Raw images idx of the file `path` into out (len(idx), 3, S, S), one pread each, in file order.

    About 1.4x faster than copying them out of the memmap into the same buffer (the memmap faults its
    pages in as it goes); the reads release the GIL, so loader threads overlap."""
    size = out[0].nbytes if len(out) else 0
    with open(path, "rb", buffering=0) as f:
        for pos in np.argsort(idx, kind="stable"):
            view, done = memoryview(out[pos]).cast("B"), 0
            while done < size:  # a pread may return less than asked
                n = os.preadv(f.fileno(), [view[done:]], int(idx[pos]) * size + done)
                if n == 0:
                    raise UserError(f"{path} ends before image {idx[pos]}; check it with alexnet prepare --check")
                done += n
