"""Does each preset's default recipe learn? Side by side with a reference recipe people trust.

On the same data, for the same epochs (so the same image budget), it trains

- each preset's default recipe: `alexnet train --data DATA --preset P --epochs E`, nothing else set,
  through the library function that command calls (alexnet.train.train);
- the reference: torchvision's own `alexnet()` trained with the recipe of pytorch/examples' ImageNet
  script, written out below (ImageFolder + PIL, RandomResizedCrop 224 + flip + per-channel
  normalisation, SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr / 10 every 30 epochs, batch 128).

and writes OUT/converge.csv and OUT/converge.md (recipe, epoch, train loss, val top-1 / top-5 error with
the centre crop each epoch, and with 10 crops for the final weights, images/s, wall time) and
OUT/converge.png (training loss and val error against the epoch, a line per recipe). The final row of
each recipe evaluates its best epoch's weights (by centre top-1), as `alexnet train`'s report does.

Every recipe's run is resumable: run the same command again and finished recipes are read back, an
interrupted one goes on from its last epoch. docs/learning.md reads the results.

    .venv/bin/python benchmarks/converge.py --epochs 5 --out benchmarks/converge-cpu     # imagenette-dev, CPU
    .venv/bin/python benchmarks/converge.py --epochs 30 --out benchmarks/converge-gpu    # on a GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet.train.config import TrainConfig
from alexnet.train.loop import train

PRESETS = ("paper", "torchvision", "seed")
FIELDS = (
    "recipe",
    "epoch",
    "train_loss",
    "center_top1_err",
    "center_top5_err",
    "ten_crop_top1_err",
    "ten_crop_top5_err",
    "images_per_s",
    "wall_s",
)


# --- the project's presets, each with its default recipe --------------------------------------------


def run_preset(preset: str, data: str, epochs: int, run_dir: Path, workers: int, device: str) -> list[dict]:
    """`alexnet train --data DATA --preset P --epochs E` (resumed where a run directory holds a part of it)."""
    cfg = TrainConfig(data=data, preset=preset, epochs=epochs, run_dir=str(run_dir), workers=workers, device=device)
    if not (run_dir / "eval.json").is_file():
        t0 = time.perf_counter()
        train(cfg, resume=(run_dir / "config.json").is_file(), progress=True)
        (run_dir / "wall_s").write_text(f"{time.perf_counter() - t0:.0f}\n")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "eval.json").read_text())
    wall = 0.0
    rows = []
    for m in metrics:
        wall += m["epoch_seconds"]
        row = {"recipe": preset, "epoch": m["epoch"], "train_loss": m["train_loss"]}
        row |= {"center_top1_err": m["val_top1_err"], "center_top5_err": m["val_top5_err"]}
        rows.append(row | {"images_per_s": m["images_per_s"], "wall_s": wall})
    best = min(rows, key=lambda r: r["center_top1_err"])  # best.pt: the first epoch of the lowest error
    rows.append(final_row(preset, best, final["center"], final["ten_crop"], rows[-1]))
    return rows


def final_row(recipe: str, best: dict, center: dict, ten: dict, last: dict) -> dict:
    row = {"recipe": recipe, "epoch": f"best ({best['epoch']})", "train_loss": best["train_loss"]}
    row |= {"center_top1_err": center["top1_err"], "center_top5_err": center["top5_err"]}
    row |= {"ten_crop_top1_err": ten["top1_err"], "ten_crop_top5_err": ten["top5_err"]}
    return row | {"images_per_s": last["images_per_s"], "wall_s": last["wall_s"]}


# --- the reference: torchvision's alexnet() with pytorch/examples' ImageNet recipe ------------------


def reference_loaders(data: str, batch_size: int, workers: int):
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_set = datasets.ImageFolder(
        os.path.join(data, "train"),
        transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        ),
    )
    val = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    ten = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.TenCrop(224),
            transforms.Lambda(
                lambda crops: torch.stack([normalize(transforms.functional.to_tensor(c)) for c in crops])
            ),
        ]
    )
    val_set = datasets.ImageFolder(os.path.join(data, "val"), val)
    ten_set = datasets.ImageFolder(os.path.join(data, "val"), ten)
    loader = lambda ds, shuffle, b=batch_size: torch.utils.data.DataLoader(  # noqa: E731
        ds, batch_size=b, shuffle=shuffle, num_workers=workers, pin_memory=torch.cuda.is_available()
    )
    return loader(train_set, True), loader(val_set, False), loader(ten_set, False, max(1, batch_size // 10))


@torch.no_grad()
def reference_eval(model: torch.nn.Module, loader, device: torch.device) -> dict:
    """Top-1 / top-5 error; a (B, 10, 3, H, W) batch averages the softmax of its 10 views."""
    model.eval()
    wrong1 = wrong5 = count = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.dim() == 5:
            probs = F.softmax(model(x.flatten(0, 1)), dim=1).view(x.shape[0], 10, -1).mean(1)
        else:
            probs = F.softmax(model(x), dim=1)
        top5 = probs.topk(5, dim=1).indices
        wrong1 += int((top5[:, 0] != y).sum())
        wrong5 += int((top5 != y[:, None]).all(1).sum())
        count += len(y)
    return {"top1_err": wrong1 / count, "top5_err": wrong5 / count}


def run_reference(data: str, epochs: int, run_dir: Path, workers: int, device: torch.device) -> list[dict]:
    """pytorch/examples' imagenet/main.py for `--arch alexnet --lr 0.01 --wd 5e-4 -b 128`, without its
    distributed and logging parts; resumable from run_dir/last.pt after every epoch."""
    import torchvision

    if (run_dir / "rows.json").is_file():  # finished: its rows, final evaluation included
        return json.loads((run_dir / "rows.json").read_text())
    torch.manual_seed(0)
    num_classes = len(next(os.walk(os.path.join(data, "train")))[1])
    model = torchvision.models.alexnet(num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    train_loader, val_loader, ten_loader = reference_loaders(data, 128, workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "rows": [], "best": None}
    if (run_dir / "last.pt").is_file():
        state = torch.load(run_dir / "last.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    rows = state["rows"]
    while state["epoch"] < epochs:
        model.train()
        loss_sum = seen = 0
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss) * len(y)
            seen += len(y)
            if i % 10 == 0:
                print(f"reference epoch {state['epoch'] + 1}/{epochs} step {i}: loss {loss_sum / seen:.4f}", flush=True)
        seconds = time.perf_counter() - t0
        scheduler.step()
        val = reference_eval(model, val_loader, device)
        wall = (rows[-1]["wall_s"] if rows else 0.0) + time.perf_counter() - t0
        state["epoch"] += 1
        row = {"recipe": "reference", "epoch": state["epoch"], "train_loss": loss_sum / seen}
        row |= {"center_top1_err": val["top1_err"], "center_top5_err": val["top5_err"]}
        rows.append(row | {"images_per_s": seen / seconds, "wall_s": wall})
        print(f"reference epoch {state['epoch']}: {row}", flush=True)
        if state["best"] is None or val["top1_err"] < state["best"][0]:
            state["best"] = (val["top1_err"], state["epoch"], {k: v.clone() for k, v in model.state_dict().items()})
        state |= {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rows": rows}
        state |= {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
        torch.save(state, run_dir / "last.pt.tmp")
        os.replace(run_dir / "last.pt.tmp", run_dir / "last.pt")
    model.load_state_dict(state["best"][2])
    center, ten = reference_eval(model, val_loader, device), reference_eval(model, ten_loader, device)
    best = next(r for r in rows if r["epoch"] == state["best"][1])
    rows = rows + [final_row("reference", best, center, ten, rows[-1])]
    (run_dir / "rows.json").write_text(json.dumps(rows))
    return rows


# --- the table and the curves ------------------------------------------------------------------------


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_table(rows: list[dict], out: Path, header: str) -> str:
    with (out / "converge.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [header, "", "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in FIELDS) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "converge.md").write_text(text)
    return text


def plot(rows: list[dict], out: Path, num_classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == recipe and isinstance(r["epoch"], int)]
        epochs = [r["epoch"] for r in rs]
        a.plot(epochs, [r["train_loss"] for r in rs], marker="o", label=recipe)
        b.plot(epochs, [r["center_top1_err"] for r in rs], marker="o", label=f"{recipe} top-1")
    a.axhline(math.log(num_classes), color="grey", ls="--", lw=1, label=f"chance, ln {num_classes}")
    b.axhline(1 - 1 / num_classes, color="grey", ls="--", lw=1, label="chance")
    a.set(xlabel="epoch", ylabel="training loss", title="training loss")
    b.set(xlabel="epoch", ylabel="val top-1 error (centre crop)", title="validation error", ylim=(0, 1))
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "converge.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/imagenette-dev")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--recipes", default="reference," + ",".join(PRESETS), help="comma-separated: reference, presets")
    ap.add_argument("--epochs-of", default="", help="fewer epochs for some recipes, e.g. seed=2 (a slow preset)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/converge-cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = os.path.abspath(args.data)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    epochs_of = {k: int(v) for k, v in (kv.split("=") for kv in args.epochs_of.split(",") if kv)}
    rows: list[dict] = []
    for recipe in args.recipes.split(","):
        epochs = epochs_of.get(recipe, args.epochs)
        run_dir = out / "runs" / recipe
        if recipe == "reference":
            rows += run_reference(data, epochs, run_dir, args.workers, device)
        else:
            rows += run_preset(recipe, data, epochs, run_dir, args.workers, str(device))
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        )
        budget = f"{args.epochs} epochs" + (f" ({args.epochs_of})" if args.epochs_of else "")
        header = f"{Path(args.data).name}, {budget}, {name}, torch {torch.__version__}"
        print(write_table(rows, out, header))
        plot(rows, out, len(next(os.walk(os.path.join(data, "train")))[1]))


if __name__ == "__main__":
    main()
