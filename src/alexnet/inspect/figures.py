"""`alexnet figures RUN_DIR`: what the network learned, as the paper showed it, in PNG files.

conv1_filters.png  the first layer's kernels (Figure 3; two blocks for the two towers)
predictions.png    eight validation images with their top-5 classes (Figure 4, left)
neighbours.png     five validation images and the six training images nearest in fc7 (Figure 4, right)
curves.png         loss, top-1 / top-5 error and learning rate per epoch, from metrics.jsonl
confusion.png      the confusion matrix of the final evaluation, from confusion.csv

matplotlib draws with its Agg backend on a bare Figure (no pyplot, no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import read_jsonl, write_atomic
from ..data.augment import PixelStats, crop_offsets
from ..data.folders import load_image, open_split
from ..errors import UserError
from .evaluate import class_probabilities
from .features import extract, extract_samples, filter_mosaic

DPI = 100
SIZES = {  # inches at DPI: each PNG is exactly this many pixels / 100
    "conv1_filters": (12.0, 7.0),
    "predictions": (16.0, 9.0),
    "neighbours": (14.0, 10.5),
    "curves": (15.0, 4.5),
    "confusion": (9.0, 8.0),
}
FIGURES = tuple(SIZES)


def _figure(name: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZES[name], dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """The PNG replaced whole or not at all (a full disk, a kill), as checkpoints are."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI, facecolor="white"))
    return path


def _short(text: str, n: int = 22) -> str:
    text = text.split(",")[0]
    return text if len(text) <= n else text[: n - 1] + "…"


def _shown(image: torch.Tensor, crop: int) -> np.ndarray:
    """The centre crop the network sees, (crop, crop, 3) uint8, for imshow."""
    top, left = crop_offsets(image.shape[-1], crop)[4]
    return image[:, top : top + crop, left : left + crop].permute(1, 2, 0).numpy()


def spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n), first and last included: deterministic picks
    that cover every class of a split sorted by class."""
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def subset(n: int, cap: int, seed: int = 0) -> list[int]:
    """At most `cap` of range(n) (all when cap <= 0), drawn by a fixed seed, in order."""
    if cap <= 0 or cap >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].tolist())


def nearest_neighbours(
    queries: torch.Tensor, database: torch.Tensor, k: int, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k nearest rows of `database` (N, D) for each row of `queries` (Q, D), by brute
    force in float64, `chunk` database rows at a time: (distances (Q, k), indices (Q, k)), nearest first."""
    k = min(k, database.shape[0])
    q = queries.double().flatten(1)
    best_d = torch.empty(q.shape[0], 0, dtype=torch.float64)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long)
    for start in range(0, database.shape[0], chunk):
        block = database[start : start + chunk].double().flatten(1)
        d = torch.cdist(q, block, compute_mode="donot_use_mm_for_euclid_dist")  # exact, no |a|^2+|b|^2-2ab
        idx = torch.arange(start, start + block.shape[0]).expand(q.shape[0], -1)
        all_d, all_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        best_d, pos = all_d.topk(k, dim=1, largest=False, sorted=True)
        best_i = all_i.gather(1, pos)
    return best_d, best_i


def towers(model: torch.nn.Module) -> int:
    """2 for the paper's two-GPU network (grouped conv2/4/5): conv1's first and last halves fed one GPU each."""
    return 2 if any(c.groups > 1 for c in model.preset.convs) else 1


def conv1_figure(model: torch.nn.Module, path: Path) -> Path:
    weight = model.named_layers()["conv1"].weight
    blocks = towers(model) if weight.shape[0] % 2 == 0 else 1
    fig = _figure("conv1_filters")
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.9))
    ax.imshow(filter_mosaic(weight, blocks), interpolation="nearest")
    ax.set_axis_off()
    k, _, kh, kw = weight.shape
    title = f"conv1: {k} kernels of {kh}x{kw}x3, each scaled to [0, 1]"
    if blocks == 2:
        title += f" (top: kernels 1-{k // 2}, tower 1; bottom: {k // 2 + 1}-{k}, tower 2)"
    fig.suptitle(title)
    return _save(fig, path)


def predictions_figure(
    model: torch.nn.Module,
    stats: PixelStats,
    samples: list[tuple[str, int]],
    names: list[str],
    image_size: int,
    crop: int,
    path: Path,
    count: int = 8,
) -> Path:
    """`count` validation images (spread over the split), each with its top-5 classes as bars; the
    true class's bar is red and its name is written under the image (the paper's Figure 4, left)."""
    device = next(model.parameters()).device
    picked = []
    for i in spread(len(samples), 4 * count):  # candidates, in case some cannot be read
        try:
            picked.append((load_image(samples[i][0], image_size), samples[i][1]))
        except Exception:  # noqa: BLE001 - an unreadable image is simply not shown
            continue
    picked = [picked[i] for i in spread(len(picked), count)]
    if not picked:
        raise UserError("no readable validation images for predictions.png")
    images = torch.stack([im for im, _ in picked])
    with torch.no_grad():
        model.eval()
        probs = class_probabilities(model, images.to(device), stats.to(device), crop, ten_crop=False).cpu()
    k = min(5, len(names))
    top = probs.topk(k, dim=1)
    fig = _figure("predictions")
    cols = 4
    rows = math.ceil(len(picked) / cols)
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 2] * rows, hspace=0.45, wspace=0.9)
    for j, (image, label) in enumerate(picked):
        r, c = divmod(j, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(_shown(image, crop))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(_short(names[label], 30), fontsize=9, fontweight="bold")
        bars = fig.add_subplot(grid[2 * r + 1, c])
        idx, p = top.indices[j].tolist(), top.values[j].tolist()
        colours = ["tab:red" if i == label else "tab:blue" for i in idx]
        bars.barh(range(k), p, color=colours)
        bars.set_yticks(range(k), [_short(names[i]) for i in idx], fontsize=8)
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=7)
    fig.suptitle("top-5 predictions (centre crop); red bar: the true class", fontsize=12)
    return _save(fig, path)


def neighbours_figure(
    model: torch.nn.Module,
    stats: PixelStats,
    val: list[tuple[str, int]],
    train: list[tuple[str, int]],
    names: list[str],
    image_size: int,
    crop: int,
    path: Path,
    train_cap: int = 2000,
    queries: int = 5,
    k: int = 6,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """`queries` validation images, each followed by the `k` training images whose fc7 activations are
    nearest in Euclidean distance (the paper's Figure 4, right), over `train_cap` training images."""
    pool = [train[i] for i in subset(len(train), train_cap)]
    db, kept, _ = extract_samples(model, stats, pool, ["fc7"], image_size, crop, batch_size, workers, progress)
    if not kept:
        raise UserError("no readable training images for neighbours.png")
    pool = [pool[i] for i in kept]
    query_samples, query_images = [], []
    for i in spread(len(val), 4 * queries):
        try:
            query_images.append(load_image(val[i][0], image_size))
            query_samples.append(val[i])
        except Exception:  # noqa: BLE001 - an unreadable image is simply not shown
            continue
    keep = spread(len(query_samples), queries)
    query_samples = [query_samples[i] for i in keep]
    q = extract(model, torch.stack([query_images[i] for i in keep]), stats, ["fc7"], crop)["fc7"].cpu()
    dist, idx = nearest_neighbours(q, db["fc7"], k)
    fig = _figure("neighbours")
    cols = 1 + idx.shape[1]
    for r, (image, label) in enumerate(zip((query_images[i] for i in keep), query_samples, strict=True)):
        ax = fig.add_subplot(len(query_samples), cols, r * cols + 1)
        ax.imshow(_shown(image, crop))
        ax.set_title(f"query: {_short(names[label[1]], 18)}", fontsize=8, fontweight="bold")
        ax.set_axis_off()
        for j, (d, i) in enumerate(zip(dist[r].tolist(), idx[r].tolist(), strict=True)):
            file, lab = pool[i]
            ax = fig.add_subplot(len(query_samples), cols, r * cols + j + 2)
            ax.imshow(_shown(load_image(file, image_size), crop))
            colour = "tab:green" if lab == label[1] else "tab:red"
            ax.set_title(f"{_short(names[lab], 18)}\nd = {d:.3g}", fontsize=7, color=colour)
            ax.set_axis_off()
    fig.suptitle(
        f"nearest training images in fc7 (Euclidean, {len(pool)} training images searched); green: same class",
        fontsize=11,
    )
    return _save(fig, path)


def curves_figure(metrics: list[dict], path: Path) -> Path:
    epochs = [m["epoch"] for m in metrics]
    fig = _figure("curves")
    ax_loss, ax_err, ax_lr = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax_loss.plot(epochs, [m["val_loss"] for m in metrics], "o-", label="val")
    ax_loss.set_title("cross-entropy loss")
    ax_err.plot(epochs, [m["train_top1_err"] for m in metrics], "o--", label="train top-1")
    ax_err.plot(epochs, [m["val_top1_err"] for m in metrics], "o-", label="val top-1")
    ax_err.plot(epochs, [m["val_top5_err"] for m in metrics], "o-", label="val top-5")
    ax_err.set_ylim(0, 1)
    ax_err.set_title("error rate")
    ax_lr.plot(epochs, [m["lr"] for m in metrics], "o-", color="tab:purple")
    ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate (at the end of each epoch)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_err, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_err.legend()
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.12, top=0.9, wspace=0.25)
    return _save(fig, path)


def read_confusion(path: Path) -> tuple[list[str], np.ndarray]:
    """confusion.csv (written by evaluate.write_report): classes, counts (row: true, column: predicted)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    classes = rows[0][1:]
    return classes, np.array([[int(v) for v in row[1:]] for row in rows[1:]], dtype=np.int64)


def confusion_figure(counts: np.ndarray, names: list[str], path: Path) -> Path:
    """Rows normalised to fractions of each true class (colour), counts written in when few classes."""
    n = counts.shape[0]
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = _figure("confusion")
    ax = fig.add_axes((0.25, 0.25, 0.62, 0.68))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, cax=fig.add_axes((0.89, 0.25, 0.025, 0.68)), label="fraction of the true class")
    if n <= 50:
        labels = [_short(s, 20) for s in names]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8 if n <= 20 else 5)
        ax.set_yticks(range(n), labels, fontsize=8 if n <= 20 else 5)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if frac[i, j] > 0.5 else "black"
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"confusion matrix: {counts.sum()} images, top-1 accuracy {accuracy:.1%}")
    return _save(fig, path)


def _image_folder(folder: str | None, given: bool, log) -> tuple[str | None, str | None]:
    """(the image folder to draw from, None) or (None, why there is none). A prepared dataset holds
    pixels only; the folder it was made from has the images, if it is still there."""
    from ..data.prepared import is_prepared, made_from

    if folder is None or (not given and not Path(folder).is_dir()):
        return None, f"no data folder ({folder or 'none in config.json'}; give --data)"
    if not is_prepared(folder):
        return folder, None
    source = made_from(folder)
    if source is None or not Path(source).is_dir():
        where = f"the image folder it was made from, {source}, is gone" if source else "it is unfinished"
        return None, f"{folder} is a prepared dataset and {where} (give the image folder with --data)"
    log(f"{folder} is a prepared dataset: images from {source}, the folder it was made from")
    return source, None


def make_figures(
    run_dir: str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    neighbour_images: int = 2000,
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
    progress: bool = True,
    log=print,
) -> list[Path]:
    """Write the figures of a run into `out` (default RUN_DIR/figures); returns the files written.
    A figure whose input is missing (no metrics yet, no final evaluation yet, no data, a prepared
    dataset whose image folder is gone) is skipped with a message through `log`."""
    from ..interop.export import load_for_inference
    from ..train.step import pick_device

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    out = Path(out) if out else run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    model, stats, ckpt = load_for_inference(run_dir, pick_device(device))
    names, size, crop = ckpt["names"], ckpt["config"]["image_size"], ckpt["config"]["crop"]
    written = [conv1_figure(model, out / "conv1_filters.png")]

    folder, missing = _image_folder(data or config.get("data"), given=data is not None, log=log)
    if missing:
        log(f"{missing}: predictions and neighbours skipped")
    elif not (Path(folder) / "val").is_dir():
        log(f"{folder} has no 'val' folder: predictions and neighbours skipped")
    else:
        val = open_split(folder, "val", classes=ckpt["classes"]).samples
        written.append(predictions_figure(model, stats, val, names, size, crop, out / "predictions.png"))
        if (Path(folder) / "train").is_dir():  # a folder of validation images alone is enough for predictions
            train = open_split(folder, "train", classes=ckpt["classes"]).samples
            options = dict(train_cap=neighbour_images, batch_size=batch_size, workers=workers, progress=progress)
            path = out / "neighbours.png"
            written.append(neighbours_figure(model, stats, val, train, names, size, crop, path, **options))
        else:
            log(f"{folder} has no 'train' folder: neighbours skipped")

    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    if metrics:
        written.append(curves_figure(metrics, out / "curves.png"))
    else:
        log(f"no epochs in {run_dir / 'metrics.jsonl'} yet: curves skipped")
    if (run_dir / "confusion.csv").is_file():
        classes, counts = read_confusion(run_dir / "confusion.csv")
        name_of = dict(zip(ckpt["classes"], names, strict=True))
        written.append(confusion_figure(counts, [name_of.get(c, c) for c in classes], out / "confusion.png"))
    else:
        log(f"no {run_dir / 'confusion.csv'} (the run's final evaluation has not run yet): confusion skipped")
    return written
