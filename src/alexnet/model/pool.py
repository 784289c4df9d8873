"""Max pooling: nn.MaxPool2d, whose gradient on CUDA keeps one byte per output instead of eight.

The paper's pools (3x3 windows, stride 2, so that windows overlap) are PyTorch's, and this class is
nn.MaxPool2d with the same arguments, printout and (empty) state. What changes is how the training
step computes them on CUDA: in kernels/pool.py's kernels, which store where each window's maximum was
as an int8 beside the output rather than PyTorch's int64 index, so the forward and the backward each
move a fraction of the bytes. The values and gradients are PyTorch's, ties and NaNs included. The
step also keeps less memory: PyTorch's pool holds on to its input and the int64 indices until the
backward, this one only the bytes (at batch 512 in bf16, 36 MB instead of 584 MB for the first pool).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import warn_slower

KERNELS = ("triton", "eager")
_UNUSABLE: list[str] = []  # why the Triton kernels cannot run here, once they have failed


class _MaxPoolFunction(torch.autograd.Function):
    """The forward saves only the int8 positions; the backward needs nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
        from ..kernels import pool as pool_triton  # Triton ships with PyTorch's CUDA wheels on Linux, not everywhere

        y, where = pool_triton.forward(x, size, stride, save=True)
        ctx.save_for_backward(where)
        ctx.input_shape, ctx.input_stride, ctx.size, ctx.stride = x.shape, x.stride(), size, stride
        return y

    @staticmethod
    @once_differentiable  # a second derivative would need a kernel of its own: say so rather than be wrong
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        from ..kernels import pool as pool_triton

        (where,) = ctx.saved_tensors
        return pool_triton.backward(grad, where, ctx.input_shape, ctx.input_stride, ctx.size, ctx.stride), None, None


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d(kernel_size, stride) with a choice of `kernels`, one of KERNELS:
      "triton"  kernels/pool.py's kernels: CUDA, 4-D input, square windows, no padding, dilation or
                ceil mode;
      "eager"   PyTorch's own.
    None (the default): "triton" where it applies, else "eager"; where the Triton kernels cannot be
    built here (a GPU older than Triton supports, such as a P100), PyTorch's, with one warning. Kernels
    named explicitly run or fail. Under torch.compile, export and tracing: PyTorch's operation, which
    the compiler fuses itself and an exported graph can hold.
    """

    def __init__(self, kernel_size: int, stride: int, kernels: str | None = None) -> None:
        super().__init__(kernel_size, stride)
        if kernels not in (None, *KERNELS):
            raise ValueError(f"unknown max-pool kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
        self.kernels = kernels
        if kernels == "triton" and not self._plain():
            raise ValueError("max-pool Triton kernels take square windows without padding, dilation or ceil mode")

    def _plain(self) -> bool:
        square = all(isinstance(v, int) for v in (self.kernel_size, self.stride))
        return square and self.padding == 0 and self.dilation == 1 and not self.ceil_mode and not self.return_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fits = x.is_cuda and x.dim() == 4 and self._plain() and min(x.shape[2:]) >= self.kernel_size
        kernels = self.kernels or ("triton" if fits and not _UNUSABLE else "eager")
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            kernels = "eager"
        if kernels == "eager":
            return super().forward(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        try:
            if torch.is_grad_enabled() and x.requires_grad:
                return _MaxPoolFunction.apply(x, self.kernel_size, self.stride)
            from ..kernels import pool as pool_triton

            return pool_triton.forward(x, self.kernel_size, self.stride, save=False)[0]
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if self.kernels is not None:
                raise
            _UNUSABLE.append(warn_slower("max pooling's Triton kernels", e))
            return super().forward(x)
