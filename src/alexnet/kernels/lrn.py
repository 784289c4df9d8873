"""LRN's forward and backward on CUDA, each one hand-written Triton kernel that reads its inputs once.

The formulas are lrn.py's (float32 arithmetic whatever the storage type):

    d_i  = k + s * sum_{j in window(i)} x_j^2,        window(i) = [i - size//2, i + (size-1)//2]
    y_i  = x_i d_i^-beta
    dx_i = g_i d_i^-beta - 2 s beta x_i sum_{j : i in window(j)} g_j x_j d_j^(-beta-1)

With a bias b (bias_relu.bias_relu_lrn), x is a convolution's output before its bias, and the kernels
compute LRN of relu(x + b) (rounded to x's type, as PyTorch's bias add) and the gradients of x and b:

    dx_i = dLRN_i where relu(x_i + b_i) > 0 (or NaN), else 0      db = dx summed over pixels

so the convolution's bias, its ReLU and LRN take one kernel each way instead of two, and half the
memory traffic: x in and y out; x and g in and dx out.

A program takes a tile of pixels by all channels. The window's neighbours are the same tile loaded
again shifted by a few channels, so they come from the cache, not from memory: the forward moves x in
and y out, the backward x and g in and dx out, nothing else. The backward recomputes each neighbour's
d_j from x rather than storing d. torch.compile's kernels for the same formulas (with pow) took 4.0 ms
per backward call on an H200 at batch 512, some 4% of its memory bandwidth (benchmarks/RESULTS.md).

Per tower (the paper preset's LRN, each GPU's maps alone), each kernel is launched on each tower's
slice of the tensors: the same strides, the pointers moved on, and the window stops at the tower's edge
as at the tensor's.

Imported only on CUDA (Triton comes with PyTorch's Linux CUDA wheels). Tested on the CPU in Triton's
interpreter (TRITON_INTERPRET=1) and compiled ahead of time for an H100 (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .layout import with_strides_of

# Tiles of pixels x channels; which is fastest depends on the GPU and the layer, so Triton times them
# at the first call for each number of channels and memory layout, and keeps the best. Tiles that give
# a thread more elements than `most` spill registers on an H100 (cuobjdump --dump-resource-usage).
_CONFIGS = [triton.Config({"BLOCK_P": p}, num_warps=w) for p in (1, 2, 4, 8, 16, 32) for w in (2, 4, 8)]


def _tiles(most: int) -> dict:
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        def per_thread(config: triton.Config) -> int:
            return config.kwargs["BLOCK_P"] * kwargs["BLOCK_C"] // (32 * config.num_warps)

        kept = [config for config in configs if 2 <= per_thread(config) <= most]
        return kept or [min(configs, key=per_thread)]

    return {"early_config_prune": prune}


@triton.jit
def _load(ptr, pixel_offset, channel, stride_c, channels, pixel_ok, b_ptr, BIAS: tl.constexpr):
    """Tile [pixels, channels] of a tensor, as float32, with zeros outside the tensor's channels.
    BIAS: of relu(x + b), the sum rounded to x's type first."""
    channel_ok = (channel >= 0) & (channel < channels)
    ok = pixel_ok[:, None] & channel_ok[None, :]
    v = tl.load(ptr + pixel_offset[:, None] + channel[None, :] * stride_c, mask=ok, other=0.0).to(tl.float32)
    if BIAS:
        v += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
        v = v.to(ptr.dtype.element_ty).to(tl.float32)
        v = tl.where((v < 0.0) | ~ok, 0.0, v)  # a NaN stays NaN; outside the tensor 0, not relu(b)
    return v


@triton.jit
def _pixel_offsets(start, pixels, per_image, stride_n, stride_p, BLOCK_P: tl.constexpr):
    """Pixels start.. (image n, position p flattened) and their offsets, in int64: large batches pass
    2^31 elements."""
    pixel = start + tl.arange(0, BLOCK_P)
    offset = (pixel // per_image).to(tl.int64) * stride_n + (pixel % per_image).to(tl.int64) * stride_p
    return offset, pixel < pixels


@triton.jit
def _add(a, b):  # tl.sum's combining function; tl.sum itself is not interpreted where the tests load this
    return a + b


# Powers as exp(e log d), both in the special-function units: tl.exp is ex2.approx (MUFU.EX2), and the log
# is lg2.approx (MUFU.LG2, some 2^-22 relative error) times ln 2, where tl.log is a polynomial of some 20
# instructions on sm_90 and the tile kernels' backward takes 5 logs per element. Triton's interpreter has no
# fast_log2f: tl.log there. benchmarks/step_profile.py turns FAST_LOG off to measure what it gains. The
# tile kernels with a bias keep tl.log: with lg2 some of their tiles spill registers on sm_90 (the tests).
FAST_LOG = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _log(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_log2f(x) * 0.6931471805599453
    return tl.log(x)


_KEY = ["channels", "stride_c", "BIAS", "FAST_LOG"]


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_tiles(most=8))
@triton.jit
def _forward_kernel(
    x_ptr, b_ptr, y_ptr, pixels, per_image, stride_n, stride_p, stride_c, channels, scale, k, beta,
    SIZE: tl.constexpr, BIAS: tl.constexpr, FAST_LOG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offset, pixel_ok = _pixel_offsets(tl.program_id(0) * BLOCK_P, pixels, per_image, stride_n, stride_p, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    squares = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    for m in tl.static_range(SIZE):
        v = _load(x_ptr, offset, c + (m - SIZE // 2), stride_c, channels, pixel_ok, b_ptr, BIAS)
        squares += v * v
    x = _load(x_ptr, offset, c, stride_c, channels, pixel_ok, b_ptr, BIAS)
    y = x * tl.exp(-beta * _log(squares * scale + k, FAST_LOG and not BIAS))
    ok = pixel_ok[:, None] & (c < channels)[None, :]
    tl.store(y_ptr + offset[:, None] + c[None, :] * stride_c, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_tiles(most=4))
@triton.jit
def _backward_kernel(
    x_ptr, b_ptr, g_ptr, dx_ptr, db_ptr, pixels, per_image, stride_n, stride_p, stride_c, channels, scale, k, beta,
    SIZE: tl.constexpr, BIAS: tl.constexpr, FAST_LOG: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    # A program takes ROWS pixels, a tile at a time, and with BIAS writes db's float32 sum over them
    # (ROWS = 0: one tile, no sums).
    c = tl.arange(0, BLOCK_C)
    span: tl.constexpr = BLOCK_P if ROWS == 0 else ROWS
    first = tl.program_id(0) * span
    bias_total = tl.full((BLOCK_C,), 0.0, tl.float32)
    for start in tl.range(first, first + span, BLOCK_P):
        offset, pixel_ok = _pixel_offsets(start, pixels, per_image, stride_n, stride_p, BLOCK_P)
        total = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)  # sum over j with i in window(j) of g_j x_j d_j^(-beta-1)
        own = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)  # d_i^-beta
        # j = i - ahead ... i + back (the window mirrored); d_j's window slides one channel at a time
        squares = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
        for m in tl.static_range(SIZE):
            v = _load(x_ptr, offset, c + (m - SIZE // 2 - (SIZE - 1) // 2), stride_c, channels, pixel_ok, b_ptr, BIAS)
            squares += v * v
        for o in tl.static_range(SIZE):
            j = c + (o - (SIZE - 1) // 2)
            if o > 0:
                enters = _load(x_ptr, offset, j + (SIZE - 1) // 2, stride_c, channels, pixel_ok, b_ptr, BIAS)
                leaves = _load(x_ptr, offset, j - SIZE // 2 - 1, stride_c, channels, pixel_ok, b_ptr, BIAS)
                squares += enters * enters - leaves * leaves
            log_d = _log(squares * scale + k, FAST_LOG and not BIAS)
            x_j = _load(x_ptr, offset, j, stride_c, channels, pixel_ok, b_ptr, BIAS)
            g_j = _load(g_ptr, offset, j, stride_c, channels, pixel_ok, b_ptr, False)
            inside = ((j >= 0) & (j < channels))[None, :]  # beyond the channels there is no j (nor a d_j to divide by)
            total += tl.where(inside, g_j * x_j * tl.exp(-(beta + 1.0) * log_d), 0.0)
            if o == (SIZE - 1) // 2:  # j = i
                own = tl.exp(-beta * log_d)
        x = _load(x_ptr, offset, c, stride_c, channels, pixel_ok, b_ptr, BIAS)
        g = _load(g_ptr, offset, c, stride_c, channels, pixel_ok, b_ptr, False)
        dx = g * own - (2.0 * scale * beta) * x * total
        if BIAS:  # through the ReLU: its gradient passes where the output is not <= 0, as PyTorch's
            dx = tl.where(x <= 0.0, 0.0, dx).to(dx_ptr.dtype.element_ty).to(tl.float32)
            bias_total += tl.reduce(dx, 0, _add)  # the sum of what is stored (masked: 0)
        ok = pixel_ok[:, None] & (c < channels)[None, :]
        tl.store(dx_ptr + offset[:, None] + c[None, :] * stride_c, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if BIAS:
        tl.store(db_ptr + tl.program_id(0).to(tl.int64) * channels + c, bias_total, mask=c < channels)


# --- Band kernels: the window's sums as matrix products on tensor cores (a candidate) ----------------
# The tile kernels above load the tile again for each shift of the window: a shift by one channel is
# not 16-byte aligned in channels_last, so their sm_90 code loads 2 or 4 bytes at a time (24 of the
# forward's 25 load instructions), and the backward takes 10 exps and logs per element. Here a row is
# one pixel's W channels with HALO more on either side, loaded once (16-byte loads), and the sums over
# the window are products with a 0/1 band matrix: sum_{j in window(i)} v_j = (v @ B)_i, on tensor cores,
# which are otherwise idle here. Their operands are bf16, so v (float32) goes in as 2 or 3 bf16 pieces
# (v = hi + lo (+ rest), accumulated in float32): exact for the squares of bf16 values (16 bits), within
# float32's rounding otherwise. The backward computes d, and g x d^(-beta-1), across the whole row (3 exps
# and logs per element, for twice the elements) and stores the middle W channels. With a bias, as the
# tile kernels: relu(x + b) as x is read, the ReLU's mask and db's partial sums in the backward, which
# here costs next to nothing, x being read once. One difference: a NaN or infinity in x spreads to every
# channel of its rows (0 x NaN in the product is NaN), where the formula spreads it to its window.
# Not CUDA's default until benchmarks/step_profile.py measures it ("paper, band LRN", "... with bias").

_BAND_CONFIGS = [triton.Config({"BLOCK_R": r}, num_warps=w) for r in (32, 64, 128) for w in (4, 8)]


def _band_tiles(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Those that give a thread at most 16 elements of a [BLOCK_R, W + 2 HALO] row tile (with 32 the
    backward takes 234 registers on an H100, a quarter of the threads an SM could run) and at least 4
    outputs (with 2 its loads and stores are 4 bytes wide, tests/test_triton_kernels.py)."""
    w, tile, most = kwargs["W"], kwargs["W"] + 2 * kwargs["HALO"], kwargs.get("ROWS") or 128

    def fits(config: triton.Config) -> bool:  # and no more rows than the backward's ROWS pixels a program
        rows, threads = config.kwargs["BLOCK_R"], 32 * config.num_warps
        return rows * tile <= 16 * threads and rows * w >= 4 * threads and rows <= most

    return [config for config in configs if fits(config)]


def band_widths(size: int) -> tuple[int, int]:
    """(W, HALO) for a window of `size` channels: W channels per row and HALO either side, a power of two
    in all, with HALO >= size - 1 (the backward's reach: d_j's window around each j of i's)."""
    for w, halo in ((16, 8), (32, 16)):
        if size - 1 <= halo:
            return w, halo
    raise ValueError(f"the band kernels take windows of up to 17 channels, not {size}")


@triton.jit
def _band(INS: tl.constexpr, OUTS: tl.constexpr, SHIFT: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr):
    """[INS, OUTS] bf16: at (j, i) 1 where LOW <= (j - SHIFT) - i <= HIGH, else 0."""
    gap = (tl.arange(0, INS)[:, None] - SHIFT) - tl.arange(0, OUTS)[None, :]
    return tl.where((gap >= LOW) & (gap <= HIGH), 1.0, 0.0).to(tl.bfloat16)


@triton.jit
def _band_sum(v, band, PIECES: tl.constexpr):
    """v @ band in float32 arithmetic, v split into PIECES bf16 pieces for the tensor cores."""
    piece = v.to(tl.bfloat16)
    total = tl.dot(piece, band, out_dtype=tl.float32)
    rest = v - piece.to(tl.float32)
    for _ in tl.static_range(PIECES - 1):
        piece = rest.to(tl.bfloat16)
        total = tl.dot(piece, band, total)
        rest = rest - piece.to(tl.float32)
    return total


@triton.autotune(
    configs=_BAND_CONFIGS,
    key=["channels", "stride_c", "SIZE", "BIAS", "FAST_LOG"],
    prune_configs_by={"early_config_prune": _band_tiles},
)
@triton.jit
def _band_forward_kernel(
    x_ptr, b_ptr, y_ptr, pixels, per_image, stride_n, stride_p, stride_c, channels, scale, k, beta,
    SIZE: tl.constexpr, BIAS: tl.constexpr, FAST_LOG: tl.constexpr, PIECES: tl.constexpr, W: tl.constexpr,
    HALO: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # a program: BLOCK_R pixels' rows of channels first .. first + W - 1, with HALO more either side
    offset, pixel_ok = _pixel_offsets(tl.program_id(0) * BLOCK_R, pixels, per_image, stride_n, stride_p, BLOCK_R)
    first = tl.program_id(1) * W
    TILE: tl.constexpr = W + 2 * HALO
    around = _load(x_ptr, offset, first - HALO + tl.arange(0, TILE), stride_c, channels, pixel_ok, b_ptr, BIAS)
    # output i (channel first + i) sums row column j (channel first + j - HALO) where j - HALO - i is in
    # the window: -(SIZE // 2) .. (SIZE - 1) // 2
    squares = _band_sum(around * around, _band(TILE, W, HALO, -(SIZE // 2), (SIZE - 1) // 2), PIECES)
    c = first + tl.arange(0, W)
    x = _load(x_ptr, offset, c, stride_c, channels, pixel_ok, b_ptr, BIAS)  # again, from the cache
    y = x * tl.exp(-beta * _log(squares * scale + k, FAST_LOG))
    ok = pixel_ok[:, None] & (c < channels)[None, :]
    tl.store(y_ptr + offset[:, None] + c[None, :] * stride_c, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(
    configs=_BAND_CONFIGS,
    key=["channels", "stride_c", "SIZE", "BIAS", "FAST_LOG", "ROWS"],  # ROWS: no tile of more pixels than it
    prune_configs_by={"early_config_prune": _band_tiles},
)
@triton.jit
def _band_backward_kernel(
    x_ptr, b_ptr, g_ptr, dx_ptr, db_ptr, pixels, per_image, stride_n, stride_p, stride_c, channels, scale, k, beta,
    SIZE: tl.constexpr, BIAS: tl.constexpr, FAST_LOG: tl.constexpr, ROWS: tl.constexpr, PIECES: tl.constexpr,
    W: tl.constexpr, HALO: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # As the tile kernels' backward: a program takes ROWS pixels, BLOCK_R at a time, and with BIAS writes
    # db's float32 sums over them for its W channels (ROWS = 0: BLOCK_R pixels, no sums).
    first = tl.program_id(1) * W
    TILE: tl.constexpr = W + 2 * HALO
    column = tl.arange(0, TILE)
    c = first - HALO + column
    inside = (c >= 0) & (c < channels)
    middle = (column >= HALO) & (column < HALO + W)
    BACK: tl.constexpr = SIZE // 2
    AHEAD: tl.constexpr = (SIZE - 1) // 2
    span: tl.constexpr = BLOCK_R if ROWS == 0 else ROWS
    bias_total = tl.full((TILE,), 0.0, tl.float32)
    for start in tl.range(tl.program_id(0) * span, (tl.program_id(0) + 1) * span, BLOCK_R):
        offset, pixel_ok = _pixel_offsets(start, pixels, per_image, stride_n, stride_p, BLOCK_R)
        x = _load(x_ptr, offset, c, stride_c, channels, pixel_ok, b_ptr, BIAS)
        g = _load(g_ptr, offset, c, stride_c, channels, pixel_ok, b_ptr, False)
        log_d = _log(_band_sum(x * x, _band(TILE, TILE, 0, -BACK, AHEAD), PIECES) * scale + k, FAST_LOG)
        own = tl.exp(-beta * log_d)  # d^-beta
        # g_j x_j d_j^(-beta-1). Near the row's ends d_j misses part of its window, but the middle's sums
        # do not reach those columns (HALO >= SIZE - 1). Beyond the channels it is 0: there d_j may be 0
        # (k = 0), and one NaN would spoil the row's every sum (0 x NaN in the product).
        t = tl.where(inside[None, :], g * x * own * tl.exp(-log_d), 0.0)
        total = _band_sum(t, _band(TILE, TILE, 0, -AHEAD, BACK), PIECES)  # sum over j with i in window(j)
        dx = g * own - (2.0 * scale * beta) * x * total
        if BIAS:  # through the ReLU: its gradient passes where the output is not <= 0, as PyTorch's
            dx = tl.where(x <= 0.0, 0.0, dx).to(dx_ptr.dtype.element_ty).to(tl.float32)
        ok = pixel_ok[:, None] & (middle & inside)[None, :]
        tl.store(dx_ptr + offset[:, None] + c[None, :] * stride_c, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if BIAS:
            bias_total += tl.reduce(tl.where(ok, dx, 0.0), 0, _add)  # the sum of what is stored
    if BIAS:
        tl.store(db_ptr + tl.program_id(0).to(tl.int64) * channels + c, bias_total, mask=middle & inside)


# --- Calling the kernels -------------------------------------------------------------------------


def flat_layout(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x in a layout the kernels index (NCHW or channels_last, H and W flattenable) and its
    (pixels, pixels per image, stride of n, of a pixel, of a channel)."""
    if x.dim() != 4:
        raise ValueError(f"these kernels take (N, C, H, W) tensors, not shape {tuple(x.shape)}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    n, _, h, w = x.shape
    # pixel p = h * W + w sits at p * stride(3), which holds for dense layouts unless W is 1: PyTorch
    # then calls x contiguous whatever stride(3) is, and a pixel's step is stride(2)
    pixel_stride = x.stride(3) if w > 1 else x.stride(2)
    return x, (n * h * w, h * w, x.stride(0), pixel_stride, x.stride(1))


def rows_per_program(pixels: int) -> int:
    """Pixels per program of the backward with a bias: enough programs to fill a large GPU (over 700),
    few enough partial sums of db (at most 1/32 of the pixels)."""
    return min(1024, max(32, triton.next_power_of_2(pixels // 2048)))


def _kernel_and_grid(band: bool, forward: bool, x: torch.Tensor, channels: int, size: int) -> tuple:
    """The kernel, its shape constants, the name of its block of pixels, and the grid's further axes:
    the tile kernels take all `channels` (of a tower) in a program, the band kernels a row of W of them."""
    if band:
        w, halo = band_widths(size)
        kernel = _band_forward_kernel if forward else _band_backward_kernel
        pieces = 2 if x.dtype == torch.bfloat16 else 3  # bf16 squares are 16 bits: two bf16 pieces hold them
        return kernel, {"PIECES": pieces, "W": w, "HALO": halo}, "BLOCK_R", (triton.cdiv(channels, w),)
    kernel = _forward_kernel if forward else _backward_kernel
    return kernel, {"BLOCK_C": triton.next_power_of_2(channels)}, "BLOCK_P", ()


def tower_slices(channels: int, towers: int) -> list[slice]:
    """Each tower's channels. A kernel is launched on each tower's slice of x, y and the bias: the
    same strides, the pointers moved on, its channels counted from 0, so its window stops at the
    tower's edges as at the tensor's."""
    if channels % towers:
        raise ValueError(f"{channels} channels do not split into {towers} towers")
    width = channels // towers
    return [slice(t * width, (t + 1) * width) for t in range(towers)]


def forward(
    x: torch.Tensor,
    size: int,
    scale: float,
    k: float,
    beta: float,
    bias: torch.Tensor | None = None,
    band: bool = False,
    towers: int = 1,
) -> torch.Tensor:
    """y = x * d^-beta, in x's dtype and memory layout; with `bias` (in x's dtype), of relu(x + bias).
    `band`: in the band kernels (a candidate), else the tile kernels. `towers`: each of that many equal
    groups of channels normalised alone."""
    x, (pixels, per_image, *strides) = flat_layout(x)
    y = torch.empty_like(x)
    slices = tower_slices(x.shape[1], towers)
    channels = x.shape[1] // towers
    kernel, shape, block, rows_of_channels = _kernel_and_grid(band, True, x, channels, size)
    for c in slices:
        kernel[lambda meta: (triton.cdiv(pixels, meta[block]), *rows_of_channels)](
            x[:, c], x[:, c] if bias is None else bias[c], y[:, c], pixels, per_image, *strides, channels,
            scale, k, beta, SIZE=size, BIAS=bias is not None, FAST_LOG=FAST_LOG, **shape,
        )  # fmt: skip
    return y


def _backward(
    x: torch.Tensor,
    grad: torch.Tensor,
    size: int,
    scale: float,
    k: float,
    beta: float,
    bias: torch.Tensor | None,
    band: bool,
    towers: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, (pixels, per_image, *strides) = flat_layout(x)
    grad = with_strides_of(x, grad)
    dx = torch.empty_like(x)
    slices = tower_slices(x.shape[1], towers)
    channels = x.shape[1] // towers
    rows = 0 if bias is None else rows_per_program(pixels)
    kernel, shape, block, rows_of_channels = _kernel_and_grid(band, False, x, channels, size)

    def grid(meta: dict) -> tuple[int, ...]:  # with a bias, ROWS pixels a program whatever the tile
        return (triton.cdiv(pixels, meta[block]) if bias is None else triton.cdiv(pixels, rows), *rows_of_channels)

    bias_sums = []
    for c in slices:
        partial = None if bias is None else x.new_empty(triton.cdiv(pixels, rows), channels, dtype=torch.float32)
        kernel[grid](
            x[:, c], x[:, c] if bias is None else bias[c], grad[:, c], dx[:, c], dx if partial is None else partial,
            pixels, per_image, *strides, channels, scale, k, beta,
            SIZE=size, BIAS=bias is not None, FAST_LOG=FAST_LOG, ROWS=rows, **shape,
        )  # fmt: skip
        if partial is not None:
            bias_sums.append(partial.sum(0))
    return dx, torch.cat(bias_sums) if bias_sums else None


def backward(
    x: torch.Tensor,
    grad: torch.Tensor,
    size: int,
    scale: float,
    k: float,
    beta: float,
    band: bool = False,
    towers: int = 1,
) -> torch.Tensor:
    """The gradient with respect to x of forward(x) given the gradient `grad` of its output."""
    return _backward(x, grad, size, scale, k, beta, None, band, towers)[0]


def backward_with_bias(
    x: torch.Tensor,
    bias: torch.Tensor,
    grad: torch.Tensor,
    size: int,
    scale: float,
    k: float,
    beta: float,
    band: bool = False,
    towers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of forward(x, ..., bias=bias)'s x and bias (float32, summed over pixels)."""
    return _backward(x, grad, size, scale, k, beta, bias, band, towers)
