"""Data-path benchmark: prepared raw and prepared JPEG datasets against the image-folder pipeline.

    .venv/bin/python benchmarks/loader.py --quick     # smoke test: 256 images a dataset, a few batches
    .venv/bin/python benchmarks/loader.py             # the full run; see benchmarks/README.md

For each dataset it measures, and prints as one markdown table:
  prepare   images/s of alexnet.data.prepare.prepare_dataset (raw, jpeg) and the size on disk
  read      images/s of the loader alone (prepared raw, prepared jpeg, folder, imagefolder)
  load      images/s of the loader followed by augment.train_batch (prepared raw, prepared jpeg, folder),
            or, for imagefolder, of its per-image transforms with the same augmentation
  train     images/s of whole SGD steps of the paper network (the same four, and "model only":
            augmented tensors already on the device, the ceiling no data path can beat)
Paths: "folder" is this project's ImageDataset + DataLoader; "imagefolder" the usual torchvision
pipeline, ImageFolder + PIL transforms in DataLoader workers (Resize 256, CenterCrop 256, RandomCrop
224, RandomHorizontalFlip, ToTensor, PCA lighting, Normalize: the paper's augmentation, with the mean
colour for the mean image, which per-image transforms cannot crop along with the photo).
and the peak memory of each (see MemoryPeak). Every measurement runs in a fresh process, so its peak
memory is its own; the first batch or step (start-up, worker launch) is not timed. read and load report
the median of --passes passes, and read a prepared dataset's files through twice first (warm_page_cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet.data.augment import make_pixel_stats, train_batch
from alexnet.data.folders import EpochSampler, ImageDataset, make_loader, open_split
from alexnet.data.prepare import prepare_dataset
from alexnet.data.prepared import PreparedLoader, open_prepared, read_manifest
from alexnet.model.net import build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"imagenet-sample-1000": "val", "imagenette-dev": "train"}  # the split each one is measured on
PATHS = ("raw", "jpeg", "folder", "imagefolder")
WORK = Path(tempfile.gettempdir()) / "alexnet-benchmark"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: few images, batches and steps")
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="folder holding the datasets")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--work", type=Path, default=WORK, help=f"where prepared datasets go (default {WORK})")
    p.add_argument("--limit", type=int, help="use only this many images of each dataset (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=50, help="loader batches timed (at most one epoch)")
    p.add_argument("--steps", type=int, default=20, help="training steps timed")
    p.add_argument("--passes", type=int, default=5, help="read and load: passes timed, the median reported")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare processes, folder loader workers")
    p.add_argument("--threads", type=int, help="prepared loader threads (default: PreparedLoader's own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one measurement, print its JSON
    args = p.parse_args()
    if args.case:
        memory = MemoryPeak()
        memory.start()
        print(json.dumps({**run_case(json.loads(args.case)), **memory.result()}))
        return
    if args.quick:
        args.limit, args.batches, args.steps = args.limit or 256, min(args.batches, 3), min(args.steps, 2)
        args.batch_size = min(args.batch_size, 32)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    rows = []
    for name in args.datasets:
        split = DATASETS[name]
        src = args.data / name
        if args.limit:
            src = make_subset(src, split, args.limit, args.work / f"{name}-subset-{args.limit}")
        base = {"src": str(src), "split": split, "workers": args.workers, "device": device}
        prepared = {fmt: str(args.work / f"{name}-{args.limit or 'all'}-{fmt}") for fmt in ("raw", "jpeg")}
        common = {**base, "prepared": prepared, "batch_size": args.batch_size, "threads": args.threads}
        cases = [{"kind": "prepare", "path": fmt, "out": prepared[fmt], **base} for fmt in ("raw", "jpeg")]
        timed = {"batches": args.batches, "passes": args.passes}
        cases += [{"kind": kind, "path": path, **timed, **common} for kind in ("read", "load") for path in PATHS]
        cases += [{"kind": "train", "path": path, "batches": args.steps, **common} for path in (*PATHS, "model only")]
        for case in cases:
            print(f"{name}: {case['kind']} {case['path']} ...", file=sys.stderr, flush=True)
            rows.append({"dataset": name, **case, **measure(case)})
    print(table(rows, device, args))


def make_subset(src: Path, split: str, limit: int, dst: Path) -> Path:
    """A folder of links to `limit` images of src/split, spread evenly over its (sorted) listing."""
    if not dst.is_dir():
        samples = open_split(src, split).samples
        for path, _ in samples[:: max(1, len(samples) // limit)][:limit]:
            link = dst / split / Path(path).parent.name / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).absolute())
    return dst


def measure(case: dict) -> dict:
    """Run one case in a fresh process; its JSON result."""
    result = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"{case['kind']} {case['path']} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_case(case: dict) -> dict:
    device = torch.device(case["device"])
    if case["kind"] == "prepare":
        shutil.rmtree(case["out"], ignore_errors=True)  # time a whole prepare, not a no-op on a finished one
        start = time.perf_counter()
        manifest = prepare_dataset(
            case["src"], case["out"], case["path"], case["workers"], splits=[case["split"]], progress=False
        )
        seconds = time.perf_counter() - start
        counts = manifest["splits"][case["split"]]
        disk = sum(f.stat().st_size for f in Path(case["out"]).iterdir() if f.is_file())
        return {"images_per_s": counts["sources"] / seconds, "disk_mib": disk / 2**20}

    if case["path"] in ("raw", "jpeg"):
        warm_page_cache(Path(case["prepared"][case["path"]]))
    moments = torch.load(Path(case["prepared"]["raw"]) / "stats.pt", weights_only=True)
    stats = make_pixel_stats(moments["mean_image"], moments["covariance"]).to(device)
    num_classes = len(read_manifest(case["prepared"]["raw"])["classes"])
    if case["kind"] == "train":
        model = build_model("paper", num_classes).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    buffer = None  # the augmented batch's memory, reused as TrainStep does

    def step(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> None:
        nonlocal buffer
        if case["kind"] == "read":
            return
        x = images if images.is_floating_point() else train_batch(images, stats, gen, out=buffer)
        if not images.is_floating_point() and (buffer is None or len(x) >= len(buffer)):
            buffer = x
        if case["kind"] == "train":
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def one_pass() -> float:
        timed, start = 0, None
        for i, (images, labels) in enumerate(batches(case, num_classes)):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            step(images, labels, torch.Generator().manual_seed(i))
            if i == 0:  # start-up (workers, first reads, kernels) is not timed
                sync(device)
                start = time.perf_counter()
            else:
                timed += len(labels)
            if i == case["batches"]:
                break
        sync(device)
        return timed / (time.perf_counter() - start) if timed else float("nan")

    # a pass over few batches takes well under a second: the median of several is steadier
    passes = [one_pass() for _ in range(1 if case["kind"] == "train" else case.get("passes", 1))]
    return {"images_per_s": statistics.median(passes)}


def warm_page_cache(folder: Path) -> None:
    """Read a prepared dataset's files through twice, as the epochs before this one would have. The
    first reads of freshly written pages cost the kernel extra work (imagenette-dev's first pass after
    prepare read 17-32k images/s, later passes 56-61k): a training run pays that once, not per epoch."""
    chunk = bytearray(2**24)
    for _ in range(2):
        for path in folder.iterdir():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(chunk):
                    pass


def batches(case: dict, num_classes: int):
    """(images, labels) for one epoch of the case's data path; 'model only' repeats one batch in memory."""
    device, size = torch.device(case["device"]), case["batch_size"]
    pin = device.type == "cuda"
    if case["path"] == "model only":
        x = torch.randn(size, 3, 224, 224, device=device)
        y = torch.randint(0, num_classes, (size,), device=device)
        for _ in range(case["batches"] + 1):
            yield x, y
    elif case["path"] == "imagefolder":
        loader = torchvision_loader(case, size, augment=case["kind"] != "read", pin=pin)
        yield from loader
    elif case["path"] == "folder":
        samples = open_split(case["src"], case["split"]).samples
        sampler = EpochSampler(len(samples), seed=0, epoch=0)
        for b in make_loader(ImageDataset(samples), size, case["workers"], sampler, pin_memory=pin):
            yield b.images, b.labels
    else:
        split = open_prepared(case["prepared"][case["path"]], case["split"])
        for b in PreparedLoader(split, size, device=device, pin_memory=pin, threads=case["threads"]):
            yield b.images, b.labels


def torchvision_loader(case: dict, size: int, augment: bool, pin: bool) -> torch.utils.data.DataLoader:
    """torchvision's ImageFolder + PIL transforms, per image in DataLoader workers: the common baseline."""
    from torchvision import datasets, transforms

    moments = torch.load(Path(case["prepared"]["raw"]) / "stats.pt", weights_only=True)
    stats = make_pixel_stats(moments["mean_image"], moments["covariance"], mean="channel", scale="imagenet")
    shape = [transforms.Resize(256), transforms.CenterCrop(256)]
    if augment:

        def lighting(x: torch.Tensor) -> torch.Tensor:  # the paper's PCA lighting, per image
            return x + ((torch.randn(3) * 0.1 * stats.eigval) @ stats.eigvec.T)[:, None, None]

        steps = [transforms.RandomCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        steps += [transforms.Lambda(lighting), transforms.Normalize(stats.mean.flatten(), stats.std.flatten())]
    else:
        steps = [transforms.PILToTensor()]
    dataset = datasets.ImageFolder(Path(case["src"]) / case["split"], transforms.Compose(shape + steps))
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset, size, shuffle=True, generator=generator, num_workers=case["workers"], pin_memory=pin
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryPeak(threading.Thread):
    """Samples, every 0.2 s, the memory of this process and all its descendants (pool and loader workers):
    PSS (shared pages split between their sharers, so a sum over processes counts each page once) and its
    anonymous part (memory nobody else can reclaim; PSS adds the page cache of mapped files, which the
    kernel drops under pressure). Linux only: /proc. ru_maxrss would not do: it counts a forked worker's
    pages shared with its parent, and a process started from a large one inherits the parent's peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pss = self.anon = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.sample()

    def sample(self) -> None:
        pss = anon = 0
        for pid in descendants(os.getpid()):
            try:
                fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:])
            except OSError:  # the process ended
                continue
            pss += int(fields["Pss"].split()[0])
            anon += int(fields.get("Pss_Anon", fields["Anonymous"]).split()[0])
        self.pss, self.anon = max(self.pss, pss / 1024), max(self.anon, anon / 1024)

    def result(self) -> dict:
        self.sample()
        self.stopped.set()
        return {"pss_mib": self.pss, "anon_mib": self.anon}


def descendants(root: int) -> list[int]:
    """root and every process below it, from the parent pid in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def table(rows: list[dict], device: str, args: argparse.Namespace) -> str:
    cpu = f"{os.cpu_count()} CPUs"
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    threads = args.threads if args.threads is not None else "default (raw on the CPU: 0; else 2)"
    lines = [
        f"device {device} ({cpu}{gpu}), batch {args.batch_size}, {args.workers} workers, "
        f"{threads} prepared-loader threads, {'all' if not args.limit else args.limit} images a dataset"
        f"{' (--quick)' if args.quick else ''}",
        "",
        "| dataset | measure | path | images/s | peak memory MiB: PSS / anonymous | disk MiB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        disk = f"{r['disk_mib']:.0f}" if "disk_mib" in r else ""
        lines.append(
            f"| {r['dataset']} | {r['kind']} | {r['path']} | {r['images_per_s']:.0f} "
            f"| {r['pss_mib']:.0f} / {r['anon_mib']:.0f} | {disk} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
