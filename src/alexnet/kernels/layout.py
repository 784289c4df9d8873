"""Layout helpers the operators and their kernels share; no Triton here, so that the operators' CPU
paths import it."""

import torch


def with_strides_of(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t` in empty_like(like)'s strides (`like`'s own for a dense tensor), copied only where they differ.
    The Triton kernels index x and grad with one set of strides; LRN's operator (model/lrn.py) returns what
    its fake kernels promise, which torch.compile plans its graph by (the Triton kernels give NCHW for a permuted
    x, the formulas' backward the layout of grad)."""
    return t if t.stride() == like.stride() else torch.empty_like(like, dtype=t.dtype).copy_(t)
