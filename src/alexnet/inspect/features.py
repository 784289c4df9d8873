"""What a layer of the network computes for an image: activations read with forward hooks.

`extract` hooks the modules named by `model.taps` (conv1..conv5 after their ReLU, pool5, fc6 and fc7
after their ReLU, fc8), runs the centre crop of a batch through the model and removes the hooks
again: the model is left exactly as it was. `extract_samples` does the same over a list of files in
batches, skipping files that cannot be decoded; `alexnet features` writes the result to .npz / .npy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import write_atomic
from ..data.augment import PixelStats, center_batch
from ..data.folders import ImageDataset, list_images, make_loader
from ..errors import UserError


def check_layers(model: torch.nn.Module, layers: list[str]) -> None:
    unknown = [name for name in layers if name not in model.taps]
    if unknown or not layers:
        what = f"unknown layer {unknown[0]!r}" if unknown else "no layer given"
        raise UserError(f"{what}; choose from {', '.join(model.taps)}")


@torch.no_grad()
def extract(
    model: torch.nn.Module,
    images: torch.Tensor,
    stats: PixelStats,
    layers: list[str],
    crop: int = 224,
) -> dict[str, torch.Tensor]:
    """Activations of `layers` (names of `model.taps`) for (B, 3, S, S) uint8 images, centre crop
    normalised as in evaluation, in eval mode: {layer: (B, ...) float tensor on the model's device}."""
    check_layers(model, layers)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(layers):

        def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor, name: str = name) -> None:
            out[name] = output.detach().clone()  # clone: a later in-place op must not change it

        handles.append(modules[model.taps[name]].register_forward_hook(keep))
    was_training = model.training
    try:
        model.eval()
        model(center_batch(images.to(device), stats.to(device), crop))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: out[name] for name in layers}


def _keep_items(items: list) -> list:
    return items


def extract_samples(
    model: torch.nn.Module,
    stats: PixelStats,
    samples: list[tuple[str, int]],
    layers: list[str],
    image_size: int = 256,
    crop: int = 224,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[int], list[str]]:
    """Activations of `layers` for the (path, label) `samples`, in batches, on the CPU.
    Returns ({layer: (N, ...)}, indices of the N samples read, "path<TAB>reason" of those skipped)."""
    check_layers(model, layers)
    loader = make_loader(ImageDataset(samples, image_size), batch_size, workers, collate_fn=_keep_items)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    kept: list[int] = []
    bad: list[str] = []
    index = 0
    bar = tqdm(loader, desc="features", unit="batch", disable=not progress, total=math.ceil(len(samples) / batch_size))
    for items in bar:
        good = []
        for image, _, path in items:
            if image is None:
                bad.append(path)
            else:
                good.append(image)
                kept.append(index)
            index += 1
        if good:
            for name, a in extract(model, torch.stack(good), stats, layers, crop).items():
                parts[name].append(a.cpu())
    return {name: torch.cat(p) if p else torch.empty(0) for name, p in parts.items()}, kept, bad


def list_image_files(paths: list[str]) -> list[Path]:
    """Image files given directly or found (recursively, hidden files and folders left out) in the
    folders given, in order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += map(Path, list_images(p))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist")
    if not files:
        raise UserError("no image files given")
    return files


def label_of(path: Path, classes: list[str]) -> int:
    """The class index when the file sits in an ImageNet-layout class folder of the model's classes, else -1."""
    index = {c: i for i, c in enumerate(classes)}
    return index.get(path.parent.name, -1)


def write_features(out: Path, feats: dict[str, torch.Tensor], files: list[str], labels: list[int], classes: list[str]):
    """`.npz`: one array per layer, `files`, `labels` (-1: unknown) and `classes`; `.npy`: the one layer."""
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: a.numpy().astype(np.float32) for name, a in feats.items()}
    if out.suffix == ".npy":
        if len(arrays) != 1:
            raise UserError(f"{out}: a .npy file holds one layer; use .npz for {len(arrays)}")
        (array,) = arrays.values()
        write_atomic(out, lambda f: np.save(f, array))  # replaced whole or not at all, as checkpoints are
    elif out.suffix == ".npz":
        listing = {
            "files": np.array(files, dtype=str),
            "labels": np.array(labels, dtype=np.int64),
            "classes": np.array(classes, dtype=str),
        }
        write_atomic(out, lambda f: np.savez(f, **arrays, **listing))
    else:
        raise UserError(f"--out must end in .npz or .npy, not {out.name!r}")


def filter_mosaic(weight: torch.Tensor, blocks: int = 1, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """First-layer kernels (K, 3, k, k) as one RGB image (H, W, 3) in [0, 1]: each kernel min-max
    scaled on its own, in a grid, `blocks` groups of K / blocks kernels stacked with a wider gap
    (the paper's Figure 3: the 48 kernels of each GPU)."""
    w = weight.detach().float().cpu()
    k_count, _, kh, kw = w.shape
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = ((w - lo) / (hi - lo).clamp(min=1e-12)).permute(0, 2, 3, 1).numpy()  # (K, k, k, 3)
    per_block = k_count // blocks
    cols = columns or (16 if per_block % 16 == 0 else math.ceil(math.sqrt(per_block)))
    rows = math.ceil(per_block / cols)
    gap = 3 * pad + 2
    height = blocks * (rows * (kh + pad) + pad) + (blocks - 1) * gap
    canvas = np.ones((height, cols * (kw + pad) + pad, 3), dtype=np.float32)
    for i in range(k_count):
        b, j = divmod(i, per_block)
        r, c = divmod(j, cols)
        top = b * (rows * (kh + pad) + pad + gap) + pad + r * (kh + pad)
        left = pad + c * (kw + pad)
        canvas[top : top + kh, left : left + kw] = w[i]
    return canvas
