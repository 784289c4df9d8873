"""Max pooling on CUDA in hand-written Triton kernels that remember each maximum in one byte.

PyTorch's max pooling writes, beside each output, the input's position as an 8-byte index, and its
gradient reads those back: for AlexNet's first pool in bf16 the indices are four times the output. The
paper step's three pools and their gradients took 3.1 ms per step on an H200 at batch 512, at a
fifth of its bandwidth or less (benchmarks/RESULTS.md). Here the forward writes the maximum
and where in its window it was (0 .. size*size - 1, an int8), and the backward gives each input the
sum of the gradients of the windows whose maximum it was: it reads the output's gradient and the
bytes and writes the input's gradient, once each, with no atomics.

The rules are PyTorch's: the first maximum in row-major window order wins a tie, a NaN wins over
numbers (the last NaN, as PyTorch's `val > max || isnan(val)`), and a gradient adds its windows in
increasing order, in float32. No padding, dilation or ceil mode: nn.MaxPool2d does those (pool.py).

Imported only on CUDA. Tested on the CPU in Triton's interpreter (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles of pixels x channels, timed at the first call for each shape and layout (7, so that the first
# step does not wait long). A thread with 16 elements of a tile needs 255 registers for the backward
# on an H100 and spills; with 4 to 8, none spills (tests/test_triton_kernels.py).
_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
    for p, c in ((16, 32), (32, 32), (16, 64), (32, 64), (64, 32))
    for w in (4, 8)
    if 4 <= p * c // (32 * w) <= 8
]
_KEY = ["channels", "out_w", "x_stride_c"]  # a layer and layout


@triton.jit
def _coordinates(pixels, height, width, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's pixels (image, row, column) and channels, and which of them exist."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = p // (height * width)
    row = (p // width) % height
    col = p % width
    return n.to(tl.int64), row, col, c, p < pixels


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, where_ptr, pixels, channels, out_h, out_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w, y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    SIZE: tl.constexpr, STRIDE: tl.constexpr, SAVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, oh, ow, c, pixel_ok = _coordinates(pixels, out_h, out_w, BLOCK_P, BLOCK_C)
    ok = pixel_ok[:, None] & (c < channels)[None, :]
    corner = n * x_stride_n + (oh * STRIDE).to(tl.int64) * x_stride_h + (ow * STRIDE).to(tl.int64) * x_stride_w
    at = corner[:, None] + c[None, :].to(tl.int64) * x_stride_c
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    where = tl.full((BLOCK_P, BLOCK_C), 0, tl.int32)
    for kh in tl.static_range(SIZE):
        for kw in tl.static_range(SIZE):
            v = tl.load(x_ptr + at + (kh * x_stride_h + kw * x_stride_w), mask=ok, other=float("-inf"))
            v = v.to(tl.float32)
            take = (v > best) | (v != v)  # the first maximum; a NaN wins
            best = tl.where(take, v, best)
            where = tl.where(take, kh * SIZE + kw, where)
    out = (n * y_stride_n + oh.to(tl.int64) * y_stride_h + ow.to(tl.int64) * y_stride_w)[:, None]
    out += c[None, :].to(tl.int64) * y_stride_c
    tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=ok)
    if SAVE:
        tl.store(where_ptr + out, where.to(tl.int8), mask=ok)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _backward_kernel(
    g_ptr, where_ptr, dx_ptr, pixels, channels, in_h, in_w, out_h, out_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w, y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    SIZE: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, ih, iw, c, pixel_ok = _coordinates(pixels, in_h, in_w, BLOCK_P, BLOCK_C)
    ok = pixel_ok[:, None] & (c < channels)[None, :]
    channel = c[None, :].to(tl.int64) * y_stride_c
    total = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    # the windows holding (ih, iw) start at rows ih // STRIDE - WINDOWS + 1 .. ih // STRIDE (and columns
    # alike); in increasing order, as PyTorch adds them
    WINDOWS: tl.constexpr = (SIZE + STRIDE - 1) // STRIDE
    for dh in tl.static_range(WINDOWS):
        oh = ih // STRIDE - (WINDOWS - 1 - dh)
        kh = ih - oh * STRIDE  # the row of (ih, iw) inside that window
        row_ok = (oh >= 0) & (oh < out_h) & (kh < SIZE)
        for dw in tl.static_range(WINDOWS):
            ow = iw // STRIDE - (WINDOWS - 1 - dw)
            kw = iw - ow * STRIDE
            inside = pixel_ok & row_ok & (ow >= 0) & (ow < out_w) & (kw < SIZE)
            m = inside[:, None] & ok
            at = (n * y_stride_n + oh.to(tl.int64) * y_stride_h + ow.to(tl.int64) * y_stride_w)[:, None] + channel
            where = tl.load(where_ptr + at, mask=m, other=-1).to(tl.int32)
            g = tl.load(g_ptr + at, mask=m, other=0.0).to(tl.float32)
            total += tl.where(where == (kh * SIZE + kw)[:, None], g, 0.0)
    out = (n * x_stride_n + ih.to(tl.int64) * x_stride_h + iw.to(tl.int64) * x_stride_w)[:, None]
    out += c[None, :].to(tl.int64) * x_stride_c
    tl.store(dx_ptr + out, total.to(dx_ptr.dtype.element_ty), mask=ok)


def _grid(pixels: int, channels: int):
    return lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(channels, meta["BLOCK_C"]))


def _nchw_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def output_size(side: int, size: int, stride: int) -> int:
    return (side - size) // stride + 1


def forward(x: torch.Tensor, size: int, stride: int, save: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, H, W) -> the maxima (N, C, OH, OW) in x's dtype and memory layout, and, if `save`, where
    in its window each one was (int8, the same layout)."""
    if x.dim() != 4:
        raise ValueError(f"max-pool kernels take (N, C, H, W) tensors, not shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"a {h}x{w} input is smaller than the {size}x{size} window")
    out_h, out_w = output_size(h, size, stride), output_size(w, size, stride)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    y = torch.empty(n, c, out_h, out_w, dtype=x.dtype, device=x.device, memory_format=layout)
    where = torch.empty_like(y, dtype=torch.int8) if save else y  # unused without SAVE
    pixels = n * out_h * out_w
    _forward_kernel[_grid(pixels, c)](
        x, y, where, pixels, c, out_h, out_w, *_nchw_strides(x), *_nchw_strides(y),
        SIZE=size, STRIDE=stride, SAVE=save,
    )  # fmt: skip
    return y, where if save else None


def backward(
    grad: torch.Tensor, where: torch.Tensor, input_shape: torch.Size, input_stride: tuple, size: int, stride: int
) -> torch.Tensor:
    """The gradient with respect to the input (its shape and strides given) of forward's maxima."""
    if grad.stride() != where.stride():  # the kernel indexes both with the same strides
        grad = torch.empty_like(where, dtype=grad.dtype).copy_(grad)
    dx = torch.empty_strided(input_shape, input_stride, dtype=grad.dtype, device=grad.device)
    n, c, h, w = input_shape
    out_h, out_w = where.shape[2:]
    pixels = n * h * w
    _backward_kernel[_grid(pixels, c)](
        grad, where, dx, pixels, c, h, w, out_h, out_w, *_nchw_strides(dx), *_nchw_strides(where),
        SIZE=size, STRIDE=stride,
    )  # fmt: skip
    return dx
