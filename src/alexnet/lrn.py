"""Local response normalization, with its convention spelled out.

    b_i = a_i / (k + s * sum_{j in window(i)} a_j^2) ** beta

Libraries disagree on the window and on s (REFERENCE.md section 3): the paper prints s = alpha,
cuda-convnet and Caffe use s = alpha / size, TensorFlow names the half-window `depth_radius`.
Here each convention is a set of explicit arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


# The conventions of REFERENCE.md section 3, by name.
PAPER_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_size=False)
CUDA_CONVNET_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_size=True)
CAFFE_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True)


def tensorflow_lrn(depth_radius: int, bias: float, alpha: float, beta: float) -> LRNSpec:
    """`tf.nn.local_response_normalization` arguments as an LRNSpec: window 2r+1, alpha not divided."""
    return LRNSpec(size=2 * depth_radius + 1, alpha=alpha, beta=beta, k=bias, alpha_over_size=False)


LRN_CONVENTIONS = {"paper": PAPER_LRN, "cuda-convnet": CUDA_CONVNET_LRN, "caffe": CAFFE_LRN}


def _window_sum(t: torch.Tensor, size: int, transposed: bool = False) -> torch.Tensor:
    """sum_{j in window(i)} t_j over channels (dim 1): window(i) = [i - size//2, i + (size-1)//2], clipped.

    Shifted adds: exact sums, no padded copy, cheap in either memory layout. `transposed`: the sum
    over {j : i in window(j)}, the window mirrored (the same for odd sizes).
    """
    back, ahead = size // 2, (size - 1) // 2
    if transposed:
        back, ahead = ahead, back
    total = t.clone(memory_format=torch.preserve_format)
    for shift in range(1, ahead + 1):  # t_{i+shift}
        total[:, :-shift] += t[:, shift:]
    for shift in range(1, back + 1):  # t_{i-shift}
        total[:, shift:] += t[:, :-shift]
    return total


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


class LocalResponseNorm(nn.Module):
    """LRN across channels, always computed in float32 (squares overflow or lose bits in fp16/bf16)."""

    def __init__(self, spec: LRNSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
                return _LRNFunction.apply(x, self.spec)
            # inference, and TorchScript tracing (which cannot record a Python autograd function)
            x32, scale, _ = _lrn_terms(x, self.spec)
            return (x32 * scale).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"size={s.size}, alpha={s.alpha}, beta={s.beta}, k={s.k}, alpha_over_size={s.alpha_over_size}"
