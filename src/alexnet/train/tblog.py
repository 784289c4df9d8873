"""`alexnet train --tensorboard`: the run's metrics as TensorBoard event files in RUN_DIR/tensorboard.

Per logging interval (x: training step): train/loss, train/images_per_s. Per epoch (x: epoch):
epoch/train_loss, epoch/val_loss, epoch/val_top1_err, epoch/val_top5_err, epoch/train_top1_err,
epoch/lr, epoch/images_per_s, and conv1's kernels as an image (conv1/filters).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..inspect.features import filter_mosaic

EPOCH_SCALARS = ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "val_top5_err", "lr", "images_per_s")


class TensorBoardLog:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        self.writer = SummaryWriter(str(log_dir))

    def interval(self, step: int, loss: float, images_per_s: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)

    def epoch(self, record: dict, model: torch.nn.Module) -> None:
        for name in EPOCH_SCALARS:
            self.writer.add_scalar(f"epoch/{name}", record[name], record["epoch"])
        blocks = 2 if any(c.groups > 1 for c in model.preset.convs) else 1
        mosaic = filter_mosaic(model.named_layers()["conv1"].weight, blocks)
        self.writer.add_image("conv1/filters", mosaic, record["epoch"], dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
