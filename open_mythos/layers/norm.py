"""RMSNorm computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch
from torch import nn


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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)
