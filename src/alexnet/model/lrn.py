"""Local response normalization, with its convention spelled out.

    b_i = a_i / (k + s * sum_{j in window(i)} a_j^2) ** beta

Libraries disagree on the window and on s (docs/reference.md §3): the paper prints s = alpha,
cuda-convnet and Caffe use s = alpha / size, TensorFlow names the half-window `depth_radius`.
Here each convention is a set of explicit arguments.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import warn_slower
from ..kernels.layout import with_strides_of


@dataclass(frozen=True)
class LRNSpec:
    size: int  # channels in the window, centred on i (even sizes reach one further back than forward)
    alpha: float
    beta: float
    k: float
    alpha_over_size: bool  # True: s = alpha / size (cuda-convnet, Caffe, PyTorch); False: s = alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.size if self.alpha_over_size else self.alpha


# The conventions of docs/reference.md §3, by name.
PAPER_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_size=False)
CUDA_CONVNET_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_size=True)
CAFFE_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True)


def tensorflow_lrn(depth_radius: int, bias: float, alpha: float, beta: float) -> LRNSpec:
    """`tf.nn.local_response_normalization` arguments as an LRNSpec: window 2r+1, alpha not divided."""
    return LRNSpec(size=2 * depth_radius + 1, alpha=alpha, beta=beta, k=bias, alpha_over_size=False)


LRN_CONVENTIONS = {"paper": PAPER_LRN, "cuda-convnet": CUDA_CONVNET_LRN, "caffe": CAFFE_LRN}


def _window_sum(t: torch.Tensor, size: int, transposed: bool = False) -> torch.Tensor:
    """sum_{j in window(i)} t_j over channels (dim -3, of (N, C, H, W) or per tower (N, towers, C, H, W)):
    window(i) = [i - size//2, i + (size-1)//2], clipped.

    Shifted adds: exact sums, no padded copy, cheap in either memory layout. `transposed`: the sum
    over {j : i in window(j)}, the window mirrored (the same for odd sizes).
    """
    back, ahead = size // 2, (size - 1) // 2
    if transposed:
        back, ahead = ahead, back
    total = t.clone(memory_format=torch.preserve_format)
    for shift in range(1, ahead + 1):  # t_{i+shift}
        total[..., :-shift, :, :] += t[..., shift:, :, :]
    for shift in range(1, back + 1):  # t_{i-shift}
        total[..., shift:, :, :] += t[..., :-shift, :, :]
    return total


def _per_tower(fn: Callable[..., torch.Tensor], towers: int, *args) -> torch.Tensor:
    """fn over each tower's channels alone: its tensor arguments (N, C, H, W) seen as (N, towers,
    C / towers, H, W), a view in either memory layout, the window running along dim -3 within a tower."""
    if towers == 1:
        return fn(*args)
    split = [a.unflatten(-3, (towers, -1)) if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*split).flatten(-4, -3)


def _lrn_terms(x: torch.Tensor, spec: LRNSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x in float32, d^-beta and d = k + s * window_sum(x^2)."""
    x32 = x.float()
    d = _window_sum(x32 * x32, spec.size).mul_(spec.scale).add_(spec.k)
    return x32, d.pow(-spec.beta), d


class _LRNFunction(torch.autograd.Function):
    """b = a * d^-beta with d = k + s * window_sum(a^2), in float32, and its gradient in closed form:

        da_i = g_i d_i^-beta - 2 s beta a_i * window_sum^T(g_j b_j / d_j)

    Autograd through the formula would store and recompute far more (pow's backward alone is a third
    of the paper network's CPU step); this takes a few passes over the activations each way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: LRNSpec) -> torch.Tensor:
        x32, scale, d = _lrn_terms(x, spec)
        ctx.spec = spec
        ctx.save_for_backward(x32, scale, d)
        return (x32 * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x32, scale, d = ctx.saved_tensors
        s = ctx.spec
        g_scale = grad.float() * scale
        t = _window_sum(g_scale * x32 / d, s.size, transposed=True)
        return g_scale.sub_(x32 * t, alpha=2 * s.scale * s.beta).to(grad.dtype), None


# --- Fused: the same formulas, each direction in one or two kernels ---------------------------------
# In eager mode LRN takes some 60 passes over its activations in float32 per step, the paper network's
# largest cost on a GPU (benchmarks/RESULTS.md) and a quarter of its step on a CPU. Fused, the forward
# reads x once and writes b, and the backward recomputes d from x instead of storing three float32
# copies of the activations.


def _padded_window_sum(t: torch.Tensor, size: int, transposed: bool = False) -> torch.Tensor:
    """_window_sum as a pure function (zero padding, then `size` shifted slices): what a compiler fuses."""
    back, ahead = size // 2, (size - 1) // 2
    if transposed:
        back, ahead = ahead, back
    padded = F.pad(t, (0, 0, 0, 0, back, ahead))  # channels (dim -3): back zeros before, ahead after
    channels = t.shape[-3]
    return sum(padded[..., j : j + channels, :, :] for j in range(size))


# Powers as exp(e * log d): a GPU computes exp and log in its special-function units, while a general
# pow is a long library routine, and the backward needs one for each of a window's d_j.


def _fused_forward(x: torch.Tensor, size: int, scale: float, k: float, beta: float) -> torch.Tensor:
    x32 = x.float()
    log_d = torch.log(_padded_window_sum(x32 * x32, size) * scale + k)
    return (x32 * torch.exp(-beta * log_d)).to(x.dtype)


def _fused_backward(
    x: torch.Tensor, grad: torch.Tensor, size: int, scale: float, k: float, beta: float
) -> torch.Tensor:
    x32, g = x.float(), grad.float()
    log_d = torch.log(_padded_window_sum(x32 * x32, size) * scale + k)
    u = g * x32 * torch.exp(-(beta + 1) * log_d)  # g_j b_j / d_j
    t = _padded_window_sum(u, size, transposed=True)
    return (g * torch.exp(-beta * log_d) - (2 * scale * beta) * x32 * t).to(grad.dtype)


@functools.cache
def _compiled(fn):  # compiled on first use only: importing the package stays fast
    if not torch.cuda.is_available():  # inductor's C++ build looks for CUDA even for CPU kernels, and says so
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # dynamic: one kernel for every shape. Specialised, each new one (lrn1's and lrn2's, an epoch's smaller
    # last batch) is compiled again, 12-33 s each on 2 CPU cores. No "duck" shapes: by default, sizes equal
    # at the first call (a batch of 128 and conv2's 128 maps a tower) are assumed equal ever after.
    from torch.fx.experimental import _config as shapes_config

    compiled = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def run(*args):
        with shapes_config.patch(use_duck_shape=False):
            return compiled(*args)

    return run


# Where one cannot run, the next is used. "triton-band" is a candidate, measured against "triton" by
# benchmarks/step_profile.py before it may become CUDA's default.
KERNELS = ("triton-band", "triton", "compiled", "eager")
_UNUSABLE: dict[str, str] = {}  # kernels that failed here -> why, said once


def _kernel(kernels: str, backward: bool, towers: int) -> Callable[..., torch.Tensor]:
    if kernels.startswith("triton"):
        from ..kernels import lrn as lrn_triton  # Triton ships with PyTorch's CUDA wheels on Linux, not everywhere

        fn = lrn_triton.backward if backward else lrn_triton.forward
        return functools.partial(fn, band=kernels == "triton-band", towers=towers)
    formula = _fused_backward if backward else _fused_forward
    return functools.partial(_per_tower, _compiled(formula) if kernels == "compiled" else formula, towers)


def _run(kernels: str, backward: bool, args: tuple, towers: int, fall_back: bool) -> torch.Tensor:
    """LRN's forward (args x, size, scale, k, beta) or backward (x, grad, ...) in `kernels`, over each of
    `towers` equal groups of channels alone. Where those cannot be built here and `fall_back`: the next
    in KERNELS, with one warning (a GPU older than Triton supports, such as a P100, or no C compiler for
    the CPU's compiled kernels). The values stay the same, only slower."""
    if not fall_back:
        return _kernel(kernels, backward, towers)(*args)
    for kind in KERNELS[KERNELS.index(kernels) :]:
        if kind in _UNUSABLE:
            continue
        try:
            return _kernel(kind, backward, towers)(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if kind == "eager":
                raise
            _UNUSABLE[kind] = warn_slower(f"LRN's {kind} kernels", e, stacklevel=4)
    raise AssertionError("unreachable: the eager formulas run or raise")


# One operator for both directions, whichever kernels run them: autograd sees one node that saves only
# x, and torch.compile keeps it whole, so a compiled model still runs LRN in the Triton kernels.


@torch.library.custom_op("alexnet::local_response_norm", mutates_args=())
def _lrn_op(
    x: torch.Tensor, size: int, scale: float, k: float, beta: float, towers: int, kernels: str, fall_back: bool
) -> torch.Tensor:
    return with_strides_of(x, _run(kernels, False, (x, size, scale, k, beta), towers, fall_back))


@torch.library.custom_op("alexnet::local_response_norm_backward", mutates_args=())
def _lrn_backward_op(
    x: torch.Tensor,
    grad: torch.Tensor,
    size: int,
    scale: float,
    k: float,
    beta: float,
    towers: int,
    kernels: str,
    fall_back: bool,
) -> torch.Tensor:
    return with_strides_of(x, _run(kernels, True, (x, grad, size, scale, k, beta), towers, fall_back))


@_lrn_op.register_fake
def _(x: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(x)


@_lrn_backward_op.register_fake
def _(x: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(x)


def _save_input(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, *ctx.arguments = inputs
    ctx.save_for_backward(x)


def _lrn_gradient(ctx, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    return _lrn_backward_op(x, grad, *ctx.arguments), *[None] * len(ctx.arguments)


_lrn_op.register_autograd(_lrn_gradient, setup_context=_save_input)


class LocalResponseNorm(nn.Module):
    """LRN across channels, always computed in float32 (squares overflow or lose bits in fp16/bf16).

    `towers`: the channels split into that many equal groups, each normalised on its own (the paper's
    two GPUs each normalised the 48 or 128 maps it held: cuda-convnet's rnorm1a on conv1a); 1, the
    default, lets the window run across all of them, as Caffe's bvlc_alexnet and PyTorch's LRN do.

    `kernels`: what computes it, one of KERNELS:
      "triton"    hand-written Triton kernels, one pass over memory each way (CUDA only: kernels/lrn.py);
      "triton-band"  the same, the window's sums as products with a band matrix on tensor cores, each
                  pixel's channels loaded once (a candidate: 16-byte loads, 3 exps and logs where the
                  tile kernels take 10; not yet measured on a GPU; a NaN in x spreads to the 16-32
                  channels of its rows, not only its window's);
      "compiled"  kernels fused by torch.compile from the formulas, on any device. Compiling takes some
                  20 s on 2 CPU cores, once per process, and pays off over many steps: the paper step
                  ran 1.35x faster on those cores (benchmarks/step_profile.py), 1.23x on an H200;
      "eager"     PyTorch's operations one by one, with the closed-form gradient.
    None (the default): "triton" on CUDA (batches of images), "compiled" when training on the CPU,
    "eager" for inference on the CPU (a single prediction does not repay compiling); where the choice
    cannot be built here, the next one down, with a warning. Kernels named explicitly run or fail.
    Inside a model compiled whole, "triton" stays (one operator to the compiler); the others become
    the formulas, which the compiler fuses with the layers around them.
    """

    def __init__(self, spec: LRNSpec, kernels: str | None = None, towers: int = 1) -> None:
        super().__init__()
        if kernels not in (None, *KERNELS):
            raise ValueError(f"unknown LRN kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
        if towers < 1:
            raise ValueError(f"towers must be at least 1, not {towers}")
        self.spec, self.kernels, self.towers = spec, kernels, towers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, towers = self.spec, self.towers
        if x.shape[-3] % towers:  # channels: dim 1 of a batch, 0 of one (C, H, W) image
            raise ValueError(f"{x.shape[-3]} channels do not split into {towers} towers")
        tracing = torch.jit.is_tracing()  # export: tracing records neither autograd functions nor compiled ones
        learning = torch.is_grad_enabled() and x.requires_grad and not tracing
        kernels = self.kernels or ("triton" if x.is_cuda and x.dim() == 4 else "compiled" if learning else "eager")
        if tracing or torch.compiler.is_exporting():  # an exported graph holds PyTorch's own operations
            kernels = "eager"
        compiling = torch.compiler.is_compiling()
        with torch.autocast(device_type=x.device.type, enabled=False):
            if kernels.startswith("triton") or (kernels == "compiled" and not compiling):
                return _lrn_op(x, s.size, s.scale, s.k, s.beta, towers, kernels, self.kernels is None)
            if compiling:  # inside a compiled model, which fuses the formula and its gradient itself
                return _per_tower(_fused_forward, towers, x, s.size, s.scale, s.k, s.beta)
            if learning:
                return _per_tower(_LRNFunction.apply, towers, x, s)
            return _per_tower(_lrn_eval, towers, x, s)

    def extra_repr(self) -> str:
        s = self.spec
        towers = f", towers={self.towers}" if self.towers > 1 else ""
        return f"size={s.size}, alpha={s.alpha}, beta={s.beta}, k={s.k}, alpha_over_size={s.alpha_over_size}{towers}"


def _lrn_eval(x: torch.Tensor, spec: LRNSpec) -> torch.Tensor:
    x32, scale, _ = _lrn_terms(x, spec)
    return (x32 * scale).to(x.dtype)
