"""Learning-rate schedules. All but 'plateau' are a factor of the step number, applied every step.

plateau       the paper: divide by 10 when the validation error stops improving (at most N times)
inverse-time  the seed: lr / (1 + 0.95 * floor(step / 100000))
step          divide by 10 every `step_epochs` epochs
cosine        half a cosine from lr to 0 over the whole run
"""

from __future__ import annotations

import math
from functools import partial

import torch

from .config import TrainConfig


def lr_factor(cfg: TrainConfig, steps_per_epoch: int, step: int) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if cfg.schedule == "inverse-time":
        return 1.0 / (1.0 + cfg.inverse_time_rate * (step // cfg.inverse_time_steps))
    if cfg.schedule == "step":
        return 0.1 ** (step // (cfg.step_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"{cfg.schedule} is not a per-step schedule")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """A torch scheduler: call .step() after each optimizer step, or .step(val_error) each epoch for plateau."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=0.1,
            patience=cfg.plateau_patience,
            threshold=0.0,  # any improvement of the validation error counts
            eps=0.0,  # torch skips cuts below eps (1e-8): tiny learning rates must be cut too
            min_lr=cfg.lr * 0.1**cfg.max_lr_drops,  # so it divides at most max_lr_drops times
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg, steps_per_epoch))


def steps_each_iteration(scheduler: object) -> bool:
    return not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: object, factor: float) -> None:
    """Multiply the learning rate, now and for the rest of the schedule, by `factor`."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.min_lrs = [lr * factor for lr in scheduler.min_lrs]
    else:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
