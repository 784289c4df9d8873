"""A convolution's bias and the ReLU after it on CUDA, one Triton kernel each way.

PyTorch adds a cuDNN convolution's bias in a kernel of its own (a read and a write of the whole
output), applies ReLU in a second, and in the backward sums the output's gradient over pixels for the
bias in a third. The bias adds alone took 0.9 ms of the paper step's 35 on an H200 at batch 512
(benchmarks/RESULTS.md, `elementwise_kernel<128, 4>`, five calls a step). Here:

    forward   y = max(x + b, 0)                         reads x, writes y
    backward  dx = g where y > 0 (or y is NaN), else 0  reads g and y, writes dx
              db = sum of dx over the pixels            from the same tiles: a float32 sum per channel
                                                        for each ROWS pixels, which torch adds up

The values are PyTorch's: the sum in float32 rounded once to x's type (as its bias add), ReLU keeping
NaN, its gradient passing where y is not <= 0. db adds the same numbers in another order.

Imported only on CUDA. Tested on the CPU in Triton's interpreter (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import with_strides_of
from .lrn import flat_layout

ROWS = 512  # pixels per program: a fixed number, so that the partial sums of db have a known shape

# Tiles of pixels x channels within a program's ROWS pixels, timed at the first call for each layer and
# layout: channels_last wants wide channel tiles, NCHW long pixel ones. 4 to 8 elements per thread.
_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
    for p, c in ((8, 128), (16, 64), (32, 32), (64, 16), (128, 8))
    for w in (2, 4)
    if 4 <= p * c // (32 * w) <= 8
]
_KEY = ["channels", "stride_c"]


@triton.jit
def _tile(start, pixels, per_image, stride_n, stride_p, stride_c, c, c_ok, BLOCK_P: tl.constexpr):
    """Offsets (int64: large batches pass 2^31 elements) and mask of pixels start.. by channels c."""
    p = start + tl.arange(0, BLOCK_P)
    offset = (p // per_image).to(tl.int64) * stride_n + (p % per_image).to(tl.int64) * stride_p
    at = offset[:, None] + c[None, :].to(tl.int64) * stride_c
    return at, (p < pixels)[:, None] & c_ok[None, :]


@triton.jit
def _add(a, b):  # tl.sum's combining function; tl.sum itself is not interpreted where the tests load this
    return a + b


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _forward_kernel(
    x_ptr, b_ptr, y_ptr, pixels, per_image, stride_n, stride_p, stride_c, channels,
    ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0) * ROWS
    for start in tl.range(first, first + ROWS, BLOCK_P):
        at, ok = _tile(start, pixels, per_image, stride_n, stride_p, stride_c, c, c_ok, BLOCK_P)
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32) + b[None, :]
        v = tl.where(v < 0.0, 0.0, v)  # not maximum(): a NaN stays NaN
        tl.store(y_ptr + at, v.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _backward_kernel(
    g_ptr, y_ptr, dx_ptr, db_ptr, pixels, per_image, stride_n, stride_p, stride_c, channels,
    ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    total = tl.full((BLOCK_C,), 0.0, tl.float32)
    first = tl.program_id(0) * ROWS
    for start in tl.range(first, first + ROWS, BLOCK_P):
        at, ok = _tile(start, pixels, per_image, stride_n, stride_p, stride_c, c, c_ok, BLOCK_P)
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dx = tl.where(y <= 0.0, 0.0, g)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        total += tl.reduce(dx, 0, _add)
    tl.store(db_ptr + tl.program_id(0).to(tl.int64) * channels + c, total, mask=c_ok)


def _grid(pixels: int, channels: int):
    return lambda meta: (triton.cdiv(pixels, ROWS), triton.cdiv(channels, meta["BLOCK_C"]))


def forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """max(x + bias[c], 0) for (N, C, H, W) x, in x's dtype and layout; `bias` in x's dtype."""
    x, (pixels, per_image, *strides) = flat_layout(x)
    y = torch.empty_like(x)
    channels = x.shape[1]
    _forward_kernel[_grid(pixels, channels)](x, bias, y, pixels, per_image, *strides, channels, ROWS=ROWS)
    return y


def backward(grad: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of forward's x and bias (float32) from its output `y` and that output's gradient."""
    y, (pixels, per_image, *strides) = flat_layout(y)
    grad = with_strides_of(y, grad)
    dx = torch.empty_like(y)
    channels = y.shape[1]
    partial = torch.empty(triton.cdiv(pixels, ROWS), channels, dtype=torch.float32, device=y.device)
    _backward_kernel[_grid(pixels, channels)](
        grad, y, dx, partial, pixels, per_image, *strides, channels, ROWS=ROWS
    )  # fmt: skip
    return dx, partial.sum(0)
