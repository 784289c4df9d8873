"""AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012) in PyTorch."""

from .errors import UserError
from .lrn import LocalResponseNorm, LRNSpec
from .model import PRESETS, AlexNet, build_model

__all__ = ["AlexNet", "LRNSpec", "LocalResponseNorm", "PRESETS", "UserError", "build_model"]
