"""`alexnet benchmark`: training images/s of this project's step against plain torchvision, in one run.

Measured, each in rounds that alternate between the candidates (so that a noisy machine slows all of
them alike), the median round reported:
  torchvision fp32 eager  torchvision.models.alexnet, fp32, NCHW, SGD, on ready float tensors: the baseline
  plain eager twin        the preset's own network written in plain eager PyTorch (nn.Conv2d(groups=2),
                          nn.LocalResponseNorm, nn.MaxPool2d; `plain_twin`), the same way: the fair
                          baseline for the paper and seed presets, whose network is not torchvision's
  model-only              this project's TrainStep (augmentation from uint8 256x256, forward, backward,
                          SGD) in the chosen precision and layout, on images already in memory; on one
                          GPU replayed from a CUDA graph, as `alexnet train` does (--no-cuda-graphs: not)
  end-to-end              the same step fed by PreparedLoader from a prepared dataset (--data)
--lrn-kernels and --fuse-lrn measure the step with other LRN kernels than the defaults (lrn.py's KERNELS,
model/net.py's fuse_lrn): a candidate against the same baseline, before it may become a default.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import make_pixel_stats
from ..data.prepared import PreparedLoader, is_prepared, open_prepared
from ..errors import UserError
from ..model.lrn import KERNELS, LocalResponseNorm
from ..model.net import PRESETS, build_model, feature_side
from ..train.step import (
    TrainStep,
    make_optimizer,
    resolve_channels_last,
    resolve_cuda_graphs,
    resolve_precision,
    tune_for,
)

BASELINE = "torchvision fp32 eager"  # the row the others are measured against
TWIN = "plain eager twin"  # the preset's network in plain PyTorch: the second baseline


@dataclass
class Measure:
    name: str
    images_per_s: float
    rounds: list[float]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object], steps: int, batch: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


class TowerLRN(nn.Module):
    """nn.LocalResponseNorm on each tower's channels alone, as the paper's two GPUs normalised theirs."""

    def __init__(self, towers: int, *args: float) -> None:
        super().__init__()
        self.towers, self.lrn = towers, nn.LocalResponseNorm(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lrn(t) for t in x.chunk(self.towers, dim=1)], dim=1)


def plain_twin(preset: str, num_classes: int = 1000) -> nn.Sequential:
    """`build_model(preset)`'s network at 224x224 in plain PyTorch modules: the same function, with the same
    parameters in the same order (tests/test_step.py loads one's into the other and compares outputs)."""
    p = PRESETS[preset]  # as build_model builds it by default: the paper's LRN within each tower
    layers: list[nn.Module] = []
    side, in_ch = p.input_size, 3
    for i, c in enumerate(p.convs):
        if i == 0 and p.ceil_conv1:  # cuda-convnet's output size: zero rows and columns past the far edges
            extra = (math.ceil((side - c.kernel) / c.stride)) * c.stride + c.kernel - side
            layers.append(nn.ZeroPad2d((0, extra, 0, extra)))
        layers += [nn.Conv2d(in_ch, c.out, c.kernel, c.stride, c.pad, groups=c.groups), nn.ReLU(inplace=True)]
        if c.lrn:  # PyTorch's alpha is divided by the window's size
            args = (p.lrn.size, p.lrn.scale * p.lrn.size, p.lrn.beta, p.lrn.k)
            layers.append(TowerLRN(p.lrn_towers, *args) if p.lrn_towers > 1 else nn.LocalResponseNorm(*args))
        if c.pool:
            layers.append(nn.MaxPool2d(3, 2))
        in_ch = c.out
    layers += [nn.AdaptiveAvgPool2d(6) if p.adaptive_pool else nn.Identity(), nn.Flatten()]
    widths = [in_ch * feature_side(p, p.input_size) ** 2, p.hidden, p.hidden]
    for j in range(2):
        hidden = [nn.Linear(widths[j], widths[j + 1]), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(0.5), *hidden] if p.dropout_first else [*hidden, nn.Dropout(0.5)]
    return nn.Sequential(*layers, nn.Linear(p.hidden, num_classes))


def eager_step(model: nn.Module, batch: int, device: torch.device, num_classes: int = 1000) -> Callable[[], object]:
    """The plain loop of torchvision's reference script: fp32, NCHW, eager, SGD, on ready float tensors."""
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def torchvision_step(batch: int, device: torch.device, num_classes: int = 1000) -> Callable[[], object]:
    """The baseline: torchvision's AlexNet in fp32 eager mode."""
    from torchvision.models import alexnet

    return eager_step(alexnet(num_classes=num_classes), batch, device, num_classes)


def project_step(
    preset: str,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compile: bool,
    cuda_graphs: bool = False,
    lrn_kernels: str | None = None,
    fuse_lrn: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """This project's TrainStep for `preset`, as step(images, labels). `lrn_kernels`, `fuse_lrn`: other
    kernels than the defaults for LRN (LocalResponseNorm.kernels, AlexNet.fuse_lrn), to measure them."""
    model = build_model(preset, 1000).to(device)
    model.fuse_lrn = fuse_lrn
    for lrn in (m for m in model.modules() if isinstance(m, LocalResponseNorm)):
        lrn.kernels = lrn_kernels or lrn.kernels
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    stats = make_pixel_stats(torch.full((3, 256, 256), 0.45), torch.eye(3) * 0.05, scale="imagenet").to(device)
    trained = torch.compile(model) if compile else model
    step = TrainStep(trained, optimizer, stats, 224, 0.1, precision, channels_last, cuda_graph=cuda_graphs)
    gen = torch.Generator().manual_seed(0)
    return lambda images, labels: step(images, labels, gen)


def _check_lrn_request(preset: str, device: torch.device, lrn_kernels: str | None, fuse_lrn: bool) -> None:
    if preset in PRESETS and PRESETS[preset].lrn is None:  # an unknown preset: build_model says so
        raise UserError(f"the {preset} preset has no LRN")
    if lrn_kernels not in (None, *KERNELS):
        raise UserError(f"unknown LRN kernels {lrn_kernels!r}: choose one of {', '.join(KERNELS)}")
    if device.type != "cuda" and (fuse_lrn or (lrn_kernels or "").startswith("triton")):
        raise UserError("LRN's Triton kernels (--lrn-kernels triton..., --fuse-lrn) need CUDA")


def _open_training_split(data: str, batch: int):
    """The prepared dataset's training split, checked before anything is built."""
    if not is_prepared(data):
        raise UserError(f"{data} is not a prepared dataset (make one with alexnet prepare)")
    split = open_prepared(data, "train")
    if len(split) < batch:  # an epoch would hold no full batch, and batches() would never yield
        raise UserError(f"{data} has {len(split)} training images, fewer than one batch of {batch}")
    if split.size < 224:  # the benchmark trains on 224x224 crops, the paper's
        raise UserError(f"{data} holds {split.size}px images; the benchmark's 224x224 crops need 224 or more")
    return split


def _end_to_end(ours: Callable, split, batch: int, device: torch.device) -> Callable[[], object]:
    """The step fed by PreparedLoader, epoch after epoch of the prepared split."""

    def batches() -> Iterator:
        epoch = 0
        while True:
            yield from PreparedLoader(
                split, batch, epoch=epoch, device=device, pin_memory=device.type == "cuda", drop_last=True
            )
            epoch += 1

    feed = batches()

    def step() -> None:
        b = next(feed)
        ours(b.images, b.labels.remainder(1000))

    return step


def _measure(
    candidates: dict[str, Callable[[], object]], steps: int, warmup: int, rounds: int, batch: int, device
) -> list[Measure]:
    for step in candidates.values():  # warm up: cuDNN autotuning, compilation, the loader's threads
        for _ in range(warmup):
            step()
    measured: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):  # alternating, so that a noisy machine slows every candidate alike
        for name, step in candidates.items():
            measured[name].append(_timed(step, steps, batch, device))
    return [Measure(name, statistics.median(r), r) for name, r in measured.items()]


def run_benchmark(
    preset: str = "paper",
    batch: int = 128,
    device_name: str = "auto",
    precision: str = "auto",
    channels_last: str = "on",
    compile: bool = False,
    cuda_graphs: bool | None = None,
    data: str | None = None,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    baseline: bool = True,
    lrn_kernels: str | None = None,
    fuse_lrn: bool = False,
) -> tuple[list[Measure], dict[str, str]]:
    """Measure the candidates; returns them (baseline first) and the settings used."""
    from ..train.step import pick_device

    device = pick_device(device_name)
    if lrn_kernels or fuse_lrn:
        _check_lrn_request(preset, device, lrn_kernels, fuse_lrn)
    tune_for(device)  # for every candidate, the baseline too
    precision = resolve_precision(precision, device)
    layout = resolve_channels_last(channels_last)
    cuda_graphs = resolve_cuda_graphs(cuda_graphs, device, precision, compile, distributed=False)  # as train's
    split = _open_training_split(data, batch) if data is not None else None
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    ours = project_step(preset, device, precision, layout, compile, cuda_graphs, lrn_kernels, fuse_lrn)
    candidates: dict[str, Callable[[], object]] = {}
    if baseline:
        candidates[BASELINE] = torchvision_step(batch, device)
        if PRESETS[preset].lrn is not None:  # torchvision's own preset: its twin is the baseline
            candidates[TWIN] = eager_step(plain_twin(preset), batch, device)
    candidates[f"{preset} model-only"] = lambda: ours(images, labels)
    if split is not None:
        candidates[f"{preset} end-to-end"] = _end_to_end(ours, split, batch, device)
    # with CUDA graphs: 3 eager steps, then the capture, none of them timed
    results = _measure(candidates, steps, max(warmup, 4) if cuda_graphs else warmup, rounds, batch, device)
    device_text = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    settings = {
        "device": device_text,
        "batch": str(batch),
        "precision": precision,
        "channels_last": str(layout),
        "compile": str(compile),
        "cuda_graphs": str(cuda_graphs),
        **({"lrn_kernels": lrn_kernels} if lrn_kernels else {}),
        **({"fuse_lrn": "True"} if fuse_lrn else {}),
        "torch": torch.__version__,
    }
    return results, settings


def format_table(results: list[Measure], settings: dict[str, str]) -> str:
    """One row a candidate: images/s, and its ratio to the baseline and to the preset's plain twin."""
    base = results[0].images_per_s if results[0].name == BASELINE else None
    twin = next((m.images_per_s for m in results if m.name == TWIN), None)
    lines = [", ".join(f"{k} {v}" for k, v in settings.items())]
    lines.append(f"{'candidate':<28} {'images/s':>10} {'vs baseline':>12} {'vs twin':>8}  rounds")
    for m in results:
        ratio = f"{m.images_per_s / base:.2f}x" if base else "-"
        to_twin = f"{m.images_per_s / twin:.2f}x" if twin and m.name not in (BASELINE, TWIN) else "-"
        rounds = " ".join(f"{r:.0f}" for r in m.rounds)
        lines.append(f"{m.name:<28} {m.images_per_s:>10.1f} {ratio:>12} {to_twin:>8}  {rounds}")
    return "\n".join(lines)
