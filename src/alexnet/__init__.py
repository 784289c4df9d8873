"""AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012) in PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import UserError
    from .model.lrn import LocalResponseNorm, LRNSpec
    from .model.net import PRESETS, AlexNet, build_model

__all__ = ["AlexNet", "LRNSpec", "LocalResponseNorm", "PRESETS", "UserError", "build_model"]

# Imported on first use, not with the package: the command line (__main__.py) sets its Ctrl-C and
# SIGTERM handlers first, then spends ~2 s importing PyTorch.
_MODULE_OF = {"AlexNet": "model.net", "PRESETS": "model.net", "build_model": "model.net", "LRNSpec": "model.lrn"}
_MODULE_OF |= {"LocalResponseNorm": "model.lrn", "UserError": "errors"}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
