"""Why a recipe's loss stays flat: per-layer activations and gradients over a recipe's first steps.

Each variant changes one thing of a base recipe (the initialisation, the input scale, the learning
rate, the batch size, the fully connected biases) and trains the same network from the same images for
the same steps. Every `--every` steps it records, per layer: the activation's RMS, the fraction of its
units that no image of the batch turns on (dead ReLUs), and the size of the step SGD takes relative to
the weights (|lr * grad| / |w|). The table goes to stdout (and OUT/collapse.md), the curves to
OUT/collapse.png. docs/learning.md reads the results.

    .venv/bin/python benchmarks/collapse.py --data ../shared/data/imagenette-dev --steps 60 --out benchmarks/collapse
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from alexnet.data.augment import make_pixel_stats
from alexnet.data.folders import Batch, ImageDataset, image_moments, make_loader, open_split
from alexnet.train.config import TrainConfig
from alexnet.train.step import TrainStep, decay_groups, make_optimizer

# name -> changes to the base config (the paper preset's recipe as the paper gives it)
VARIANTS = {
    "paper": {},
    "paper + fc biases 0": {"fc_bias": 0.0},
    "paper + conv biases 0": {"conv_bias": 0.0},
    "paper + lr 0.001": {"lr": 0.001},
    "paper + inputs / std": {"scale": "imagenet"},
    "caffe init": {"init": "caffe"},
    "kaiming init": {"init": "kaiming"},
    "kaiming + inputs / std": {"init": "kaiming", "scale": "imagenet"},
    "default init + inputs / std": {"init": "default", "scale": "imagenet"},
    "paper + batch 512": {"batch_size": 512, "steps": 8},  # the GPU runs' batch; 4x a step's time here
}


def load_pool(data: str, count: int, size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`count` training images (a fixed shuffle of the split) decoded once, their labels, and the class count."""
    split = open_split(data, "train")
    order = torch.randperm(len(split.samples), generator=torch.Generator().manual_seed(0))[:count]
    loader = make_loader(ImageDataset([split.samples[i] for i in order], size), 64, workers)
    images, labels = [], []
    for batch in loader:
        images.append(batch.images)
        labels.append(batch.labels)
    return torch.cat(images), torch.cat(labels), len(split.classes)


def set_biases(model: nn.Module, conv: float | None, fc: float | None) -> None:
    for name, layer in model.named_layers().items():
        value = conv if name.startswith("conv") else fc if name in ("fc6", "fc7") else None
        if value is not None and name in model.preset.bias_one:
            nn.init.constant_(layer.bias, value)


def run_variant(name: str, change: dict, base: TrainConfig, pool, stats_moments, steps: int, every: int) -> list[dict]:
    images, labels, num_classes = pool
    conv_bias, fc_bias = change.pop("conv_bias", None), change.pop("fc_bias", None)
    steps = change.pop("steps", steps)
    cfg = dataclasses.replace(base, **change).resolved()
    torch.manual_seed(cfg.seed)
    model = cfg.build_model(num_classes)
    set_biases(model, conv_bias, fc_bias)
    model = model.to(memory_format=torch.channels_last)
    stats = make_pixel_stats(*stats_moments, cfg.mean, cfg.scale, cfg.pca)
    optimizer = make_optimizer(decay_groups(model, cfg.bias_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    step = TrainStep(model, optimizer, stats, cfg.crop, cfg.lighting, "fp32", True)
    acts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for layer, path in model.taps.items():
        if layer.startswith(("conv", "fc")) and layer != "fc8":
            modules[path].register_forward_hook(lambda m, i, o, layer=layer: acts.__setitem__(layer, o.detach()))
    logits_rms: list[float] = []
    modules[model.taps["fc8"]].register_forward_hook(
        lambda m, i, o: logits_rms.append(float(o.detach().float().pow(2).mean().sqrt()))
    )
    layers = model.named_layers()
    rows, gen = [], torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for s in range(steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        before = {n: layer.weight.detach().clone() for n, layer in layers.items()} if s % every == 0 else None
        loss_sum, correct = step(images[idx], labels[idx], torch.Generator().manual_seed(s))
        row = {"variant": name, "step": s + 1, "loss": float(loss_sum) / cfg.batch_size, "logits_rms": logits_rms[-1]}
        for layer, a in acts.items():
            units = a.transpose(0, 1).reshape(a.shape[1], -1) if a.dim() == 4 else a.T  # (channels, values)
            row[f"{layer} rms"] = float(a.pow(2).mean().sqrt())
            row[f"{layer} dead"] = float((units.amax(1) <= 0).float().mean())
        if before is not None:
            for n, layer in layers.items():
                row[f"{n} step/w"] = float((layer.weight.detach() - before[n]).norm() / before[n].norm())
        rows.append(row)
        if s % every and s != steps - 1:
            continue
        print(
            f"{name:24s} step {s + 1:4d} loss {row['loss']:.4f} logits rms {row['logits_rms']:8.3f}"
            f" dead fc6 {row.get('fc6 dead', 0):.2f} fc7 {row.get('fc7 dead', 0):.2f}"
            f" ({(time.perf_counter() - t0) / (s + 1):.1f} s/step)",
            flush=True,
        )
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table: per variant, the loss and the state of the network at the first and last step."""
    head = "| variant | steps | loss, step 1 | max loss | loss, last 10 | logits RMS | dead fc6 / fc7 | dead conv1..5 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        last = rs[-1]
        tail = [r["loss"] for r in rs if r["step"] > last["step"] - 10]
        convs = " ".join(f"{last.get(f'conv{i} dead', 0):.2f}" for i in range(1, 6))
        lines.append(
            f"| {variant} | {last['step']} | {rs[0]['loss']:.3f} | {max(r['loss'] for r in rs):.3f}"
            f" | {sum(tail) / len(tail):.3f} | {last['logits_rms']:.2f}"
            f" | {last.get('fc6 dead', 0):.2f} / {last.get('fc7 dead', 0):.2f} | {convs} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, num_classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        a.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=variant)
        b.plot([r["step"] for r in rs], [r["fc7 dead"] for r in rs], label=variant)
    a.axhline(math.log(num_classes), color="grey", ls="--", lw=1, label=f"ln {num_classes} (chance)")
    a.set(xlabel="step", ylabel="training loss (batch)", title="loss over the first steps")
    a.set_ylim(0, max(6.0, 2 * math.log(num_classes)))
    b.set(xlabel="step", ylabel="fraction of fc7 units dead on the batch", title="dead fc7 ReLUs")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/imagenette-dev")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5, help="record the layers every this many steps")
    ap.add_argument("--pool", type=int, default=2048, help="training images decoded once and sampled from")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--out", default="benchmarks/collapse")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(data=args.data, preset=args.preset, init="paper")
    pool = load_pool(args.data, args.pool, base.image_size, 2)
    # the pool's mean image and colour covariance, as a run computes its training set's
    batches = [Batch(x, y, []) for x, y in zip(pool[0].split(64), pool[1].split(64), strict=True)]
    mean_image, cov, _, _ = image_moments(batches)
    # variants already measured (a previous run into the same --out) are kept, not measured again
    done = out / "collapse.jsonl"
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    for name in args.variants.split(","):
        if any(r["variant"] == name for r in rows):
            continue
        rows += run_variant(name, dict(VARIANTS[name]), base, pool, (mean_image, cov), args.steps, args.every)
        done.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "collapse.md").write_text(summary(rows) + "\n")
        plot(rows, out / "collapse.png", pool[2])
    print(summary(rows))


if __name__ == "__main__":
    main()
