"""The paper's test protocol: top-1 and top-5 error, from the centre crop or from 10 crops
(four corners and centre, each mirrored) with their softmax outputs averaged."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import write_text_atomic
from ..data.augment import PixelStats, center_batch, ten_crop_batch
from ..errors import UserError
from ..train.distributed import Ranks, sum_over_ranks


@dataclass
class EvalResult:
    loss: float
    top1_err: float
    top5_err: float
    count: int
    confusion: torch.Tensor  # (N, N): row = true class, column = predicted
    bad: list[str] = field(default_factory=list)

    def per_class_accuracy(self) -> torch.Tensor:
        return self.confusion.diag().double() / self.confusion.sum(1).clamp(min=1).double()

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss, "top1_err": self.top1_err, "top5_err": self.top5_err, "images": self.count}


def class_probabilities(
    model: torch.nn.Module, images: torch.Tensor, stats: PixelStats, crop: int, ten_crop: bool
) -> torch.Tensor:
    """Softmax over classes for (B, 3, S, S) uint8 images, averaged over the 10 views if ten_crop."""
    if not ten_crop:
        return F.softmax(model(center_batch(images, stats, crop)).float(), dim=1)
    views = ten_crop_batch(images, stats, crop)  # (B, 10, 3, crop, crop)
    probs = F.softmax(model(views.flatten(0, 1)).float(), dim=1)
    return probs.view(images.shape[0], 10, -1).mean(1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    stats: PixelStats,
    num_classes: int,
    device: torch.device,
    crop: int = 224,
    ten_crop: bool = False,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> EvalResult:
    """Errors over `loader`'s images; under DDP each rank passes a loader of its share of them. Where
    none could be read, count is 0 and the errors NaN: the caller stops (`none_readable`)."""
    model.eval()
    stats = stats.to(device)
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    bad: list[str] = []
    desc = "eval 10-crop" if ten_crop else "eval"
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        bad += batch.bad
        if not len(batch.labels):
            continue
        images, labels = (
            batch.images.to(device, non_blocking=True),
            batch.labels.to(device, non_blocking=True),
        )
        probs = class_probabilities(model, images, stats, crop, ten_crop)
        nll += -probs.gather(1, labels[:, None]).clamp(min=1e-12).log().sum().double()
        top = probs.topk(k, dim=1).indices
        top5_hits += (top == labels[:, None]).any(1).sum()
        confusion += torch.bincount((labels * num_classes + top[:, 0]).cpu(), minlength=num_classes * num_classes).view(
            num_classes, num_classes
        )
    if ranks is not None and ranks.distributed:  # one all-reduce of everything counted
        sums = sum_over_ranks(
            torch.cat([nll[None], top5_hits[None].double(), confusion.flatten().double().to(device)]), ranks
        )
        nll, top5_hits = sums[0], sums[1]
        confusion = sums[2:].round().long().view(num_classes, num_classes).cpu()
    count = int(confusion.sum())
    if count == 0:
        return EvalResult(float("nan"), float("nan"), float("nan"), 0, confusion, bad)
    return EvalResult(
        loss=float(nll) / count,
        top1_err=1.0 - float(confusion.diag().sum()) / count,
        top5_err=1.0 - float(top5_hits) / count,
        count=count,
        confusion=confusion,
        bad=bad,
    )


def none_readable(images: int, bad: list[str]) -> UserError:
    """The error for an evaluation of `images` images none of which could be read, naming the first."""
    first = f"; e.g. {bad[0].replace(chr(9), ': ')}" if bad else ""
    return UserError(f"none of the {images} validation images could be read{first}")


def check_finite(results: dict[str, EvalResult], consequence: str) -> None:
    """Refuse results whose loss or errors are not finite: the model's outputs were NaN or infinite
    (finite weights can still overflow), its errors mean nothing, and JSON cannot hold NaN."""
    for name, r in results.items():
        for key, value in r.summary().items():
            if not math.isfinite(value):
                raise UserError(
                    f"the {name} evaluation's {key} is {value} (the model's outputs are NaN or infinite): {consequence}"
                )


def write_report(out_dir: Path, results: dict[str, EvalResult], classes: list[str], names: list[str]) -> None:
    """eval.json (each protocol's errors), per_class.csv and confusion.csv (of the last protocol given);
    each replaced whole or not at all (a full disk, a kill), as checkpoints are. A result of no images
    (its errors NaN, which JSON cannot hold) is refused, and so is a loss or error that is not finite
    (finite weights can still overflow)."""
    if any(r.count == 0 for r in results.values()):
        raise UserError(f"none of the validation images could be read: no report written to {out_dir}")
    check_finite(results, f"no report written to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "eval.json", json.dumps({k: r.summary() for k, r in results.items()}, indent=2) + "\n")
    last = list(results.values())[-1]
    acc = last.per_class_accuracy()
    per_class = [
        [i, c, n, int(last.confusion[i].sum()), f"{float(acc[i]):.4f}"]
        for i, (c, n) in enumerate(zip(classes, names, strict=True))
    ]
    write_text_atomic(out_dir / "per_class.csv", _csv([["index", "wnid", "name", "images", "accuracy"], *per_class]))
    confusion = [[c, *row] for c, row in zip(classes, last.confusion.tolist(), strict=True)]
    write_text_atomic(out_dir / "confusion.csv", _csv([["true\\predicted", *classes], *confusion]))


def _csv(rows: list[list]) -> str:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    return text.getvalue()
