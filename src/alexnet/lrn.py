"""Local response normalization, with its convention spelled out.

    b_i = a_i / (k + s * sum_{j in window(i)} a_j^2) ** beta

Libraries disagree on the window and on s (REFERENCE.md section 3): the paper prints s = alpha,
cuda-convnet and Caffe use s = alpha / size, TensorFlow names the half-window `depth_radius`.
Here each convention is a set of explicit arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


class LocalResponseNorm(nn.Module):
    """LRN across channels, always computed in float32 (squares overflow or lose bits in fp16/bf16)."""

    def __init__(self, spec: LRNSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            squares = x32.square().unsqueeze(1)  # (N, 1, C, H, W): pool over C as a depth axis
            squares = F.pad(squares, (0, 0, 0, 0, s.size // 2, (s.size - 1) // 2))
            window_sum = F.avg_pool3d(squares, (s.size, 1, 1), stride=1).squeeze(1) * s.size
            out = x32 / (s.k + s.scale * window_sum).pow(s.beta)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"size={s.size}, alpha={s.alpha}, beta={s.beta}, k={s.k}, alpha_over_size={s.alpha_over_size}"
