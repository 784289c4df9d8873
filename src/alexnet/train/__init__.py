"""Training: the run's settings (config.py), the learning-rate schedule (schedule.py), one SGD step
(step.py), the run itself (loop.py), several processes under torchrun (distributed.py) and
TensorBoard event files (tblog.py). `from alexnet.train import train` gives the run's entry point."""

from typing import Any


def __getattr__(name: str) -> Any:  # imported on first use: config.py alone needs none of the rest
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
