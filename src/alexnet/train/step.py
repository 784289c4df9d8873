"""One training step as fast as the hardware allows: the same arithmetic in every precision and layout.

precision   fp32, or autocast to bf16 (the default on CUDA) or fp16 (with loss scaling); LRN always
            computes in float32 (lrn.py), and the loss in float32.
layout      channels_last (NHWC), faster for cuDNN's and oneDNN's convolutions.
compile     optional torch.compile of the model.
cuda_graph  forward, backward and SGD captured once in a CUDA graph and replayed, so the host hands
            the GPU one launch per step instead of some hundred (train's default where they apply).
No host synchronisation: the step returns its loss sum and correct count as device tensors; the
training loop reads them once per logging interval.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.augment import PixelStats, train_batch
from ..errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: the project's steps are written for these two
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


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


def decay_groups(model: torch.nn.Module, bias_decay: bool) -> list[dict]:
    """The model's parameters as SGD's groups: the biases in a group without weight decay, unless
    `bias_decay`. cuda-convnet (the paper's code) and Caffe decayed the weights only."""
    named = list(model.named_parameters())
    if bias_decay:
        return [{"params": [p for _, p in named]}]
    biases = [p for name, p in named if name.endswith(".bias")]
    weights = [p for name, p in named if not name.endswith(".bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter] | list[dict], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with momentum and weight decay (where a group does not set its own), fused: one pass over each
    parameter per step instead of a chain of operations with temporaries. The same weights, bit for bit
    (tests/test_step.py); faster on a CPU (benchmarks/README.md)."""
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)


def tune_for(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: AlexNet's shapes are fixed, so each convolution's fastest algorithm is
    measured once, on its first call, and used from then on (torchvision's reference script does the same)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def why_no_cuda_graphs(device: torch.device, precision: str, compile: bool, distributed: bool) -> str | None:
    """What keeps CUDA graphs from this step, in one line; None where they apply."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if precision == "fp16":  # the loss scaler changes its scale on the host
        return "CUDA graphs work with bf16 and fp32, not fp16"
    if compile:
        return "CUDA graphs and --compile cannot be combined (try torch.compile's mode='reduce-overhead')"
    if distributed:
        return "CUDA graphs are for one process, not for DDP under torchrun"
    return None


def resolve_cuda_graphs(
    wanted: bool | None, device: torch.device, precision: str, compile: bool, distributed: bool
) -> bool:
    """None (the default): CUDA graphs wherever they apply. On an H100 they took end-to-end training
    from prepared data from 76% to 96% of model-only speed, the host then free to feed the loader
    (benchmarks/RESULTS.md). True: they must apply, else a one-line UserError; False: never."""
    why = why_no_cuda_graphs(device, precision, compile, distributed)
    if wanted and why:
        raise UserError(why)
    return why is None if wanted is None else wanted


@dataclass
class _Graph:
    """A captured step: replaying `graph` reads `x`, `labels` and `lrs` and writes `loss` and `correct`."""

    graph: torch.cuda.CUDAGraph
    key: tuple
    x: torch.Tensor
    labels: torch.Tensor
    lrs: list[torch.Tensor]  # each param group's learning rate, on the device: schedules change it
    loss: torch.Tensor
    correct: torch.Tensor


class TrainStep:
    """Augment a batch of uint8 images, forward, backward and update: `step(images, labels, gen)`.

    `model` may be wrapped in DistributedDataParallel. Under DDP each rank passes its share of the
    global batch, `first` being the share's position in it and `total` the global batch's size: the
    augmentation draws the random numbers of the whole global batch and uses this share's, and the loss
    is scaled so that DDP's gradient average equals the one-process gradient of the global batch.

    `cuda_graph`: the first 3 steps run eagerly on a side stream (cuDNN's and Triton's autotuning, SGD's
    momentum buffers), the 4th is captured and from then on every step of that shape is a replay. A
    batch of another shape (an epoch's last) runs eagerly. Call `forget_graph()` after loading an
    optimizer state: that replaces the momentum buffers the graph reads.
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
        cuda_graph: bool = False,
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
        self.cuda_graph = cuda_graph
        if cuda_graph:
            ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel) or world_size > 1
            resolve_cuda_graphs(True, stats.mean.device, precision, hasattr(model, "_orig_mod"), ddp)
        self.graph: _Graph | None = None
        self.warm: tuple[tuple, int] = ((), 0)  # the shape being warmed up for capture, and its eager steps

    def forget_graph(self) -> None:
        self.graph, self.warm = None, ((), 0)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        first: int = 0,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = len(labels) if total is None else total
        dtype = self.dtype if self.autocast else torch.float32  # the type conv1 casts the batch to
        x = train_batch(images, self.stats, generator, self.crop, self.lighting, first, total, self.buffer, dtype)
        # reused next step (x is done with once this step's backward is); an epoch's last batch may be
        # smaller. On CUDA train_batch makes its own, and holding it would only keep it allocated.
        if self.device_type == "cpu" and (self.buffer is None or len(x) >= len(self.buffer)):
            self.buffer = x
        x = x.contiguous(memory_format=self.memory_format)
        if self.cuda_graph:
            return self._graphed(x, labels, total)
        return self._model_step(x, labels, total)

    def _model_step(self, x: torch.Tensor, labels: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        # no autocast cache under CUDA graphs: the weights' bf16 copies must be made inside the graph
        autocast = torch.autocast(self.device_type, self.dtype, self.autocast, cache_enabled=not self.cuda_graph)
        with autocast:
            logits = self.model(x)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; scaled so that the average is d(loss_sum / total)
        self.scaler.scale(loss_sum * (self.world_size / max(total, 1))).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_sum.detach(), (logits.argmax(1) == labels).sum()

    def _graphed(self, x: torch.Tensor, labels: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.shape, x.dtype, labels.shape, total)
        if self.graph is None:
            shape, steps = self.warm
            steps = steps + 1 if shape == key else 1
            self.warm = (key, steps)
            if steps <= 3:
                return self._on_side_stream(x, labels, total)
            self.graph = self._capture(x, labels, total, key)
        g = self.graph
        if g.key != key:
            return self._model_step(x, labels, total)
        g.x.copy_(x)
        g.labels.copy_(labels)
        for group, lr in zip(self.optimizer.param_groups, g.lrs, strict=True):
            lr.fill_(group["lr"])
        g.graph.replay()
        return g.loss.clone(), g.correct.clone()  # the next replay overwrites g's

    def _on_side_stream(self, x: torch.Tensor, labels: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An eager step on a side stream, as PyTorch asks of the steps before a capture."""
        side, main = torch.cuda.Stream(x.device), torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self._model_step(x, labels, total)
        main.wait_stream(side)
        return out

    def _capture(self, x: torch.Tensor, labels: torch.Tensor, total: int, key: tuple) -> _Graph:
        groups = self.optimizer.param_groups
        lrs = [torch.tensor(float(group["lr"]), device=x.device) for group in groups]
        given = [group["lr"] for group in groups]
        static_x, static_labels = x.clone(), labels.clone()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # gradients allocated inside the graph's memory
        try:
            for group, lr in zip(groups, lrs, strict=True):  # fused SGD reads a tensor learning rate from the device
                group["lr"] = lr
            # thread_local: the data loader's threads may pin memory and copy meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss, correct = self._model_step(static_x, static_labels, total)
        finally:
            for group, lr in zip(groups, given, strict=True):
                group["lr"] = lr
        return _Graph(graph, key, static_x, static_labels, lrs, loss, correct)
