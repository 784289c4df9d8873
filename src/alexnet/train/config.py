"""One config object for a training run: the paper's recipe is the default."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..model.lrn import LRN_CONVENTIONS
from ..model.net import INITS, PRESETS, AlexNet, build_model, input_size_error
from .step import PRECISIONS

SCHEDULES = ("plateau", "inverse-time", "step", "cosine")
# Settings a resumed run may change: they do not alter what is computed, or only extend it.
# `data` says where the run's data is now (moved): training checks it holds the same classes and images.
# `on_nan` only decides what a run does once it has diverged (the NaN stop says to resume with rollback);
# the rollbacks used are kept in the checkpoint (RunState.rollbacks), so a resume cannot reset the 3.
RESUMABLE_OVERRIDES = (
    "data",
    "epochs",
    "workers",
    "device",
    "log_every",
    "checkpoint_every",
    "tensorboard",
    "channels_last",
    "compile",
    "cuda_graphs",
    "ddp_bucket_mb",
    "on_nan",
)
NAN_POLICIES = ("stop", "rollback")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")  # the layers with weights


@dataclass
class TrainConfig:
    # data and run
    data: str | None = None  # ImageNet-layout folder; None trains on the synthetic demo dataset
    run_dir: str | None = None  # default: runs/<preset>-<time>
    # model
    preset: str = "paper"
    groups: int | None = None  # paper preset: 2 towers (default) or 1
    dropout: float = 0.5
    init: str | None = None  # paper | kaiming | default; None = the preset's own
    lrn: str | None = None  # LRN convention (paper | cuda-convnet | caffe); None = the preset's own
    # LRN's window within each tower's maps, as the paper's two GPUs normalised theirs; None = yes for the
    # paper preset with its two towers; False: across both, as Caffe's bvlc_alexnet
    lrn_per_tower: bool | None = None
    # fine-tuning: start from these weights (a torchvision state_dict, an alexnet checkpoint or run
    # directory); fc8 is replaced when the classes differ. `freeze`: layers kept fixed, e.g. 'features'
    # or 'conv1..conv3' or 'conv1,conv2'
    init_from: str | None = None
    freeze: str | None = None
    # optimisation (the paper: SGD, momentum 0.9, weight decay 5e-4, batch 128, lr 0.01, 90 epochs)
    epochs: int = 90
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # weight decay on the biases too; None = the preset's own: not for paper and seed (cuda-convnet, the
    # paper's code, and Caffe decayed weights only), yes for torchvision (as its reference recipe)
    bias_decay: bool | None = None
    schedule: str = "plateau"
    plateau_patience: int = 2  # epochs without a better validation error before dividing by 10
    max_lr_drops: int = 3  # the paper divided the learning rate 3 times
    step_epochs: int = 30  # 'step': divide by 10 every this many epochs
    inverse_time_rate: float = 0.95  # the seed: lr / (1 + rate * floor(step / inverse_time_steps))
    inverse_time_steps: int = 100_000
    # data processing
    image_size: int = 256  # images are scaled and centre-cropped to this once
    crop: int = 224
    mean: str = "pixel"  # subtract the mean 'pixel' image (the paper) or the mean 'channel' colour
    scale: str | None = None  # 'raw' 0-255 pixels (paper) or 'imagenet' std; None = the preset's
    pca: str = "dataset"  # lighting axes from the training set ('dataset') or 'imagenet' constants
    lighting: float = 0.1  # std of the paper's alpha; 0 turns lighting off
    # running
    seed: int = 0
    workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # steps between progress updates (and NaN checks)
    checkpoint_every: int = 0  # also write last.pt every this many steps within an epoch (0: at epoch ends)
    tensorboard: bool = False  # also log metrics and conv1's filters to RUN_DIR/tensorboard (tblog.py)
    on_nan: str = "stop"  # a NaN/inf loss: 'stop', or 'rollback' to the last checkpoint with lr / 10 (3 times at most)
    # speed (step.py): none of these changes the arithmetic beyond rounding
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: str = "on"  # on | off: NHWC layout
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool | None = None  # replay each step from a CUDA graph; None: where they apply (step.py)
    ddp_bucket_mb: int = 25  # DDP's gradient bucket size (PyTorch's default; benchmarks/ddp.py compares others)

    def resolved(self) -> TrainConfig:
        """Fill preset-dependent defaults and check every value; raises UserError with one line."""
        c = dataclasses.replace(self)
        if c.preset not in PRESETS:
            raise UserError(f"unknown preset {c.preset!r}; choose one of {', '.join(PRESETS)}")
        c.init = c.init or PRESETS[c.preset].default_init
        c.scale = c.scale or ("imagenet" if c.preset == "torchvision" else "raw")
        c.bias_decay = c.preset == "torchvision" if c.bias_decay is None else c.bias_decay
        towers = c.preset == "paper" and c.groups != 1
        if c.lrn_per_tower and not towers:
            raise UserError("lrn_per_tower applies to the paper preset with its two towers (groups 2) only")
        c.lrn_per_tower = towers if c.lrn_per_tower is None else c.lrn_per_tower
        _choice("init", c.init, INITS)
        _choice("schedule", c.schedule, SCHEDULES)
        _choice("mean", c.mean, ("pixel", "channel"))
        _choice("scale", c.scale, ("raw", "imagenet"))
        _choice("pca", c.pca, ("dataset", "imagenet"))
        _choice("on_nan", c.on_nan, NAN_POLICIES)
        _choice("precision", c.precision, PRECISIONS)
        _choice("channels_last", c.channels_last, ("on", "off"))
        for name in ("epochs", "batch_size", "step_epochs", "inverse_time_steps", "log_every", "ddp_bucket_mb"):
            if getattr(c, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(c, name)}")
        for name in ("lr", "momentum", "weight_decay", "lighting", "inverse_time_rate"):
            v = getattr(c, name)
            if not (v == v and 0 <= v < float("inf")) or (name == "lr" and v == 0):
                raise UserError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, not {v}")
        if c.momentum >= 1:
            raise UserError(f"momentum must be below 1, not {c.momentum}")
        if not 0 <= c.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), not {c.dropout}")
        if c.groups is not None and (c.preset != "paper" or c.groups not in (1, 2)):
            raise UserError("groups must be 1 or 2 and applies to the paper preset only")
        if c.lrn is not None:
            _choice("lrn", c.lrn, tuple(LRN_CONVENTIONS))
            if PRESETS[c.preset].lrn is None:
                raise UserError(f"the {c.preset} preset has no LRN layers; lrn does not apply to it")
        if c.freeze:
            parse_freeze(c.freeze)
        if not 0 < c.crop <= c.image_size:
            raise UserError(f"crop ({c.crop}) must be positive and at most image_size ({c.image_size})")
        if why := input_size_error(PRESETS[c.preset], c.crop):
            raise UserError(f"crop {c.crop}: {why}")
        if not 0 <= c.seed < 2**32:  # each epoch's and step's seeds are made from it (data/folders.py, train/loop.py)
            raise UserError(f"seed must be in [0, 2**32), not {c.seed}")
        # paths from where the run was started, so that it resumes from any folder
        c.data = c.data and os.path.abspath(c.data)
        c.init_from = c.init_from and os.path.abspath(c.init_from)
        if min(c.workers, c.plateau_patience, c.max_lr_drops, c.checkpoint_every) < 0:
            raise UserError("workers, plateau_patience, max_lr_drops and checkpoint_every cannot be negative")
        return c

    def build_model(self, num_classes: int) -> AlexNet:
        """The network this config trains, freshly initialised."""
        return build_model(
            self.preset, num_classes, self.groups, self.dropout, self.init, self.lrn, lrn_per_tower=self.lrn_per_tower
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        # runs made before bias_decay and lrn_per_tower existed decayed their biases and normalised across
        # the towers: they resume doing so
        return TrainConfig(**{"bias_decay": True, "lrn_per_tower": False, **d})

    @staticmethod
    def load(path: Path) -> TrainConfig:
        try:
            return TrainConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read run config {path}: {e}") from e


def parse_freeze(spec: str) -> list[str]:
    """'features' (conv1..conv5), a range 'conv1..conv3', names 'conv1,fc6', or a comma-separated mix."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        first, dots, last = part.partition("..")
        if part == "features":
            names += LAYERS[:5]
        elif dots and first in LAYERS and last in LAYERS and LAYERS.index(first) <= LAYERS.index(last):
            names += LAYERS[LAYERS.index(first) : LAYERS.index(last) + 1]
        elif part in LAYERS:
            names.append(part)
        else:
            raise UserError(
                f"freeze: {part!r} is not a layer; use conv1..fc8, a range like conv1..conv3, or 'features'"
            )
    if len(set(names)) == len(LAYERS):
        raise UserError(f"freeze: {spec!r} freezes every layer; nothing would be trained")
    return sorted(set(names), key=LAYERS.index)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
