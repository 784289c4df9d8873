"""A small synthetic image-classification dataset, so `alexnet train` works with no download.

`make_demo_dataset(root)` writes six classes of shapes and textures (circle, square, triangle,
horizontal stripes, vertical stripes, checkerboard) in the ImageNet folder layout the data loader
reads: root/train/<wnid>/<name>.JPEG, root/val/<wnid>/<name>.JPEG and root/classes.tsv. Position,
scale, rotation, colours and noise vary per image, so the task is not trivial but a small CNN
learns it in a few epochs. Everything derives from `seed`: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from alexnet.errors import UserError

CLASSES: list[tuple[str, str]] = [
    ("s00_circle", "circle"),
    ("s01_square", "square"),
    ("s02_triangle", "triangle"),
    ("s03_hstripes", "horizontal stripes"),
    ("s04_vstripes", "vertical stripes"),
    ("s05_checkerboard", "checkerboard"),
]
MARKER = ".complete"
_FORMAT_VERSION = 1  # bump when the drawing changes, so stale directories are not reused
_SPLITS = ("train", "val")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour whose luma differs by at least 80 of 255."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if abs(float(luma @ (fg - bg))) >= 80:
            return bg.astype(np.float32), fg.astype(np.float32)


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A filled circle, square or triangle at a random position, scale and rotation, as 0/1 floats."""
    radius = rng.uniform(0.18, 0.4) * size  # circumradius
    cx, cy = rng.uniform(radius, size - radius, size=2)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        r = 0.8 * radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        n = 4 if kind == "square" else 3
        theta = rng.uniform(0, 2 * math.pi)
        angles = [theta + 2 * math.pi * k / n for k in range(n)]
        draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=255)
    return np.asarray(mask, dtype=np.float32) / 255


def _texture_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes or a checkerboard with a random period and slight tilt, filling a random rectangle."""
    period = rng.uniform(size / 20, size / 7)
    tilt = math.radians(rng.uniform(-15, 15) if kind != "checkerboard" else rng.uniform(0, 90))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (x * math.cos(tilt) + y * math.sin(tilt)) / period + rng.uniform(0, 2)
    v = (-x * math.sin(tilt) + y * math.cos(tilt)) / period + rng.uniform(0, 2)
    if kind == "horizontal stripes":
        pattern = np.floor(v) % 2
    elif kind == "vertical stripes":
        pattern = np.floor(u) % 2
    else:
        pattern = (np.floor(u) + np.floor(v)) % 2
    w, h = (rng.uniform(0.45, 0.95, size=2) * size).astype(int)
    x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    region = np.zeros((size, size), dtype=np.float32)
    region[y0 : y0 + h, x0 : x0 + w] = 1
    return pattern * region


def _image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    draw_mask = _shape_mask if kind in ("circle", "square", "triangle") else _texture_mask
    mask = draw_mask(kind, size, rng)[..., None]
    bg, fg = _colours(rng)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(4, 12)
    pixels = bg + (fg - bg) * mask + noise + 0.5  # +0.5 so the uint8 cast rounds
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_demo_dataset(
    root: str | Path, train_per_class: int = 100, val_per_class: int = 25, size: int = 256, seed: int = 0
) -> Path:
    """Write the demo dataset under `root` (or reuse it if an identical one is complete there); return root.

    Generation goes into a temporary sibling directory that is renamed to `root` only when complete,
    with a `.complete` marker recording the arguments. An existing `root` without a matching marker
    (or a non-empty one that is not a demo dataset) raises UserError rather than being overwritten.
    """
    root = Path(root)
    args = {"train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed}
    if min(train_per_class, val_per_class) < 1 or size < 16 or seed < 0:
        raise UserError(f"demo dataset needs counts >= 1, size >= 16 and seed >= 0, not {args}")
    marker = json.dumps({"version": _FORMAT_VERSION, **args}, sort_keys=True) + "\n"
    if _check_existing(root, marker):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        _write(tmp, (train_per_class, val_per_class), size, seed)
        (tmp / MARKER).write_text(
            marker, encoding="utf-8", newline="\n"
        )  # last, so only a finished directory carries it
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            tmp.rename(root)
        except OSError:
            if not _check_existing(root, marker):  # True: another process finished the same dataset first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename
    return root


def _write(out: Path, counts: tuple[int, int], size: int, seed: int) -> None:
    lines = ["index\twnid\tname"] + [f"{i}\t{wnid}\t{name}" for i, (wnid, name) in enumerate(CLASSES)]
    (out / "classes.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    for split_id, (split, count) in enumerate(zip(_SPLITS, counts, strict=True)):
        for class_id, (wnid, name) in enumerate(CLASSES):
            folder = out / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                # One generator per image: an image does not depend on how many others are made.
                rng = np.random.default_rng([seed, split_id, class_id, i])
                _image(name, size, rng).save(folder / f"{wnid}_{i:05d}.JPEG", quality=90)


def _check_existing(root: Path, marker: str) -> bool:
    """True if `root` holds a complete dataset made with the same arguments; False if absent or empty."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    try:
        found = (root / MARKER).read_text(encoding="utf-8")
    except OSError:
        message = f"{root} exists and is not a complete demo dataset; remove it or choose another path"
        raise UserError(message) from None
    if found != marker:
        raise UserError(
            f"{root} holds a demo dataset made with other arguments ({found.strip()}); remove it or choose another path"
        )
    return True
