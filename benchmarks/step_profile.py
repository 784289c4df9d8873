"""Where a training step's time goes: what each of the paper network's departures from torchvision's costs.

    python benchmarks/step_profile.py [--batch-size 512] [--precision auto] [--steps 10] [--rounds 3]

In one process, in rounds that alternate between them (the median round kept), the training images/s
of alexnet.step.TrainStep (augmentation, forward, backward, SGD) on images already on the device for:
  paper              the paper preset as `alexnet train` runs it (LRN fused by torch.compile on CUDA)
  paper, eager LRN   the same with LRN's eager formulas (the CPU's path)
  paper, no LRN      LRN layers removed
  paper, groups=1    one tower: conv2, conv4 and conv5 see all their input channels
  torchvision        the torchvision preset
  augmentation only  alexnet.augment.train_batch alone
then the kernels of the paper step that take the most device time (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from alexnet.augment import make_pixel_stats, train_batch
from alexnet.lrn import LocalResponseNorm
from alexnet.model import build_model
from alexnet.step import TrainStep, resolve_precision, tune_for
from alexnet.train import pick_device


def make_step(model: nn.Module, device: torch.device, precision: str, batch: int):
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    stats = make_pixel_stats(torch.full((3, 256, 256), 0.45), torch.eye(3) * 0.05, scale="imagenet").to(device)
    step = TrainStep(model, optimizer, stats, 224, 0.1, precision, True)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    gen = torch.Generator().manual_seed(0)
    return lambda: step(images, labels, gen), lambda: train_batch(images, stats, gen)


def without_lrn(model: nn.Module) -> nn.Module:
    for i, m in enumerate(model.features):
        if isinstance(m, LocalResponseNorm):
            model.features[i] = nn.Identity()
    return model


def eager_lrn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, LocalResponseNorm):
            m.fused = False
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kernels", type=int, default=15, help="how many of the costliest kernels to list")
    args = p.parse_args()
    device = pick_device(args.device)
    tune_for(device)
    precision = resolve_precision(args.precision, device)
    batch = args.batch_size
    torch.manual_seed(0)
    paper, augment = make_step(build_model("paper", init="caffe"), device, precision, batch)
    candidates = {
        "paper": paper,
        "paper, eager LRN": make_step(eager_lrn(build_model("paper", init="caffe")), device, precision, batch)[0],
        "paper, no LRN": make_step(without_lrn(build_model("paper", init="caffe")), device, precision, batch)[0],
        "paper, groups=1": make_step(build_model("paper", groups=1, init="caffe"), device, precision, batch)[0],
        "torchvision": make_step(build_model("torchvision"), device, precision, batch)[0],
        "augmentation only": augment,
    }
    for step in candidates.values():  # warm up: compilation, cuDNN autotuning
        for _ in range(3):
            step()
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, step in candidates.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            rates[name].append(args.steps * batch / (time.perf_counter() - start))
    print(f"device {device}, batch {batch}, precision {precision}, torch {torch.__version__}")
    base = statistics.median(rates["paper"])
    for name, r in rates.items():
        print(f"{name:<20} {statistics.median(r):>10.0f} images/s  {statistics.median(r) / base:5.2f}x paper")

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(3):
            paper()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nthe paper step's costliest operations over 3 steps ({sort}):")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.kernels, max_name_column_width=60))


if __name__ == "__main__":
    main()
