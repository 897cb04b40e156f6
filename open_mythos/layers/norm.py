"""RMSNorm computed in float32 (float64 for float64 activations) whatever the activation
dtype, and :func:`at_least_fp32`, the precision rule of every such computation."""

from __future__ import annotations

import torch
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64): the precision of
    the statistics, halting sums and rotations, so that bf16/fp16 activations compute as
    accurately as fp32 ones and float64 ones (gradient checks) lose nothing."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich, 2019) with a learned gain.

    The statistics are computed in float32 and the result is cast back to the input dtype, so
    bf16/fp16 activations normalise as accurately as fp32 ones.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (..., dim) of any float dtype -> same shape and dtype."""
        xf = at_least_fp32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)
