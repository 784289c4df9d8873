"""One training step as fast as the hardware allows: the same arithmetic in every precision and layout.

precision   fp32, or autocast to bf16 (the default on CUDA) or fp16 (with loss scaling); LRN always
            computes in float32 (lrn.py), and the loss in float32.
layout      channels_last (NHWC), faster for cuDNN's and oneDNN's convolutions.
compile     optional torch.compile of the model.
No host synchronisation: the step returns its loss sum and correct count as device tensors; the
training loop reads them once per logging interval.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .augment import PixelStats, train_batch
from .errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA and fp32 on the CPU (the paper's arithmetic; bf16 pays only on CPUs with bf16 units)."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("fp16 training needs CUDA; use --precision bf16 or fp32 on the CPU")
    return name


def resolve_channels_last(name: str) -> bool:
    """NHWC: faster on CUDA (cuDNN) and on the CPU too (oneDNN; 1.15x on 2 cores, benchmarks/README.md)."""
    if name not in ("on", "off"):
        raise UserError(f"channels_last must be on or off, not {name!r}")
    return name == "on"


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with momentum and weight decay, fused: one pass over each parameter per step instead of a
    chain of operations with temporaries. The same weights, bit for bit (tests/test_step.py); faster on
    a CPU (benchmarks/README.md)."""
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)


def tune_for(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: AlexNet's shapes are fixed, so each convolution's fastest algorithm is
    measured once, on its first call, and used from then on (torchvision's reference script does the same)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class TrainStep:
    """Augment a batch of uint8 images, forward, backward and update: `step(images, labels, gen)`.

    `model` may be wrapped in DistributedDataParallel. Under DDP each rank passes its share of the
    global batch, `first` being the share's position in it and `total` the global batch's size: the
    augmentation draws the random numbers of the whole global batch and uses this share's, and the loss
    is scaled so that DDP's gradient average equals the one-process gradient of the global batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        stats: PixelStats,
        crop: int,
        lighting: float,
        precision: str,
        channels_last: bool,
        world_size: int = 1,
    ) -> None:
        self.model, self.optimizer, self.stats = model, optimizer, stats
        self.crop, self.lighting, self.world_size = crop, lighting, world_size
        self.dtype = DTYPES[precision]
        self.autocast = precision != "fp32"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device_type = stats.mean.device.type
        # fp16 needs loss scaling (its range is narrow); bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        self.buffer: torch.Tensor | None = None  # the augmented batch's memory, reused on the CPU

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        first: int = 0,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = len(labels) if total is None else total
        x = train_batch(images, self.stats, generator, self.crop, self.lighting, first, total, self.buffer)
        # reused next step (x is done with once this step's backward is); an epoch's last batch may be
        # smaller. On CUDA train_batch makes its own, and holding it would only keep it allocated.
        if self.device_type == "cpu" and (self.buffer is None or len(x) >= len(self.buffer)):
            self.buffer = x
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            logits = self.model(x)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; scaled so that the average is d(loss_sum / total)
        self.scaler.scale(loss_sum * (self.world_size / max(total, 1))).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_sum.detach(), (logits.argmax(1) == labels).sum()
