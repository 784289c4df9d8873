"""The network: its presets and layers (net.py), and the reference operators its layers run: local
response normalisation (lrn.py), max pooling (pool.py), bias + ReLU (bias_relu.py). On CUDA each
operator may run a hand-written Triton kernel from alexnet/kernels/ instead."""

from .lrn import LocalResponseNorm, LRNSpec
from .net import PRESETS, AlexNet, build_model

__all__ = ["AlexNet", "LRNSpec", "LocalResponseNorm", "PRESETS", "build_model"]
