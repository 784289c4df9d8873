"""relu(x + bias): a convolution's bias and the ReLU after it as one operation, in one pass each way on CUDA;
and lrn(relu(x + bias)), the same with the LRN after them (conv1 and conv2 of the paper).

The model (model.AlexNet) computes each convolution without its bias and hands the bias here, where
the layers are not being watched by hooks (feature taps) and not compiled or exported; the modules,
parameters and checkpoints stay those of nn.Conv2d and nn.ReLU. On CUDA: kernels/bias_relu.py's
kernels, where the forward writes the ReLU's output once and the backward writes the input's gradient
and sums the bias's from the same tiles. Elsewhere, or where Triton cannot run (one warning):
PyTorch's two operations. With LRN, kernels/lrn.py's kernels take the bias: the forward reads x and
writes LRN's output, the backward reads x and the gradient and writes x's, half the traffic of the
bias+ReLU kernels followed by LRN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import warn_slower
from .lrn import LocalResponseNorm

_UNUSABLE: list[str] = []  # why the Triton kernels cannot run here, once they have failed
_UNUSABLE_WITH_LRN: list[str] = []


class _BiasReLUFunction(torch.autograd.Function):
    """Saves only the output, as an in-place nn.ReLU does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # Triton ships with PyTorch's CUDA wheels on Linux, not everywhere
        from ..kernels import bias_relu as bias_relu_triton

        y = bias_relu_triton.forward(x, bias)
        ctx.save_for_backward(y)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    @once_differentiable  # a second derivative would need a kernel of its own: say so rather than be wrong
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ..kernels import bias_relu as bias_relu_triton

        (y,) = ctx.saved_tensors
        dx, db = bias_relu_triton.backward(grad, y)
        return dx, db.to(ctx.bias_dtype)


def bias_relu(x: torch.Tensor, bias: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    """relu(x + bias[None, :, None, None]) for (N, C, H, W) x, the bias cast to x's type first (as
    autocast casts a convolution's). `kernels`: "triton" or "eager" runs those or fails; None is Triton
    on CUDA, falling back to PyTorch's operations with one warning where the kernels cannot run."""
    bias = bias.to(x.dtype)
    chosen = kernels or ("triton" if x.is_cuda and x.dim() == 4 and not _UNUSABLE else "eager")
    if chosen == "triton":
        y = _in_triton(_BiasReLUFunction, (x, bias), kernels, _UNUSABLE, "bias and ReLU's Triton kernels")
        if y is not None:
            return y
    return F.relu(x + bias.view(1, -1, 1, 1))


def _in_triton(function, args: tuple, kernels: str | None, unusable: list[str], what: str) -> torch.Tensor | None:
    """function.apply(*args); where its Triton kernels cannot run: with `kernels` None (defaulted), None,
    the reason kept in `unusable` and said once as a warning; with kernels named, the error."""
    try:
        return function.apply(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if kernels is not None:
            raise
        unusable.append(warn_slower(what, e, stacklevel=4))
        return None


class _BiasReLULRNFunction(torch.autograd.Function):
    """Saves x (the convolution's output before its bias) and the bias: the backward recomputes
    relu(x + bias), as LRN's recomputes its window sums."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, lrn: LocalResponseNorm) -> torch.Tensor:
        from ..kernels import lrn as lrn_triton

        s = lrn.spec
        ctx.save_for_backward(x, bias)
        ctx.spec, ctx.band = s, lrn.kernels == "triton-band"  # the band kernels, a candidate (kernels/lrn.py)
        ctx.towers = lrn.towers
        return lrn_triton.forward(x, s.size, s.scale, s.k, s.beta, bias=bias, band=ctx.band, towers=lrn.towers)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        from ..kernels import lrn as lrn_triton

        x, bias = ctx.saved_tensors
        s = ctx.spec
        dx, db = lrn_triton.backward_with_bias(
            x, bias, grad, s.size, s.scale, s.k, s.beta, band=ctx.band, towers=ctx.towers
        )
        return dx, db.to(bias.dtype), None


def bias_relu_lrn(
    x: torch.Tensor, bias: torch.Tensor, lrn: LocalResponseNorm, kernels: str | None = None
) -> torch.Tensor:
    """lrn(relu(x + bias)), as bias_relu then the module `lrn` compute it, in one Triton kernel each way.
    `kernels`: "triton" runs those or fails; None falls back to bias_relu and `lrn` with one warning
    where they cannot run."""
    bias = bias.to(x.dtype)
    if kernels is not None or not _UNUSABLE_WITH_LRN:
        what = "the Triton kernels of bias, ReLU and LRN together"
        y = _in_triton(_BiasReLULRNFunction, (x, bias, lrn), kernels, _UNUSABLE_WITH_LRN, what)
        if y is not None:
            return y
    return lrn(bias_relu(x, bias))
