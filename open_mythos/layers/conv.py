"""Causal depthwise convolution over the token embeddings (``MythosConfig.token_conv``).

An in-context lookup ("``c=7;a=c?a``": find where ``a`` is assigned, read what follows)
needs each token to know its predecessors before attention can match on them. A transformer
learns that from scratch as a previous-token head, and the plateau before it does is most of
the time it takes to learn such a task (``docs/depth_extrapolation.md``). A short causal
convolution gives every position a learned mix of the few tokens before it from the first
step, as the token shift of RWKV, the short convolutions of Mamba/H3 and the "Canon" layers
of Allen-Zhu (2025) do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttnContext


class TokenConv(nn.Module):
    """``x + conv(x)``, per channel, over positions ``t - width + 1 .. t``.

    ``weight`` is (dim, width): column ``width - 1`` multiplies position ``t`` itself, column
    ``width - 1 - j`` the position ``j`` before it. Positions before the first token and left
    padding (``ctx.token_mask`` False) contribute zero, so a padded row gets the output of
    the same row alone. With a cache, the convolution's input at every position is written
    under :attr:`cache_key` and the ``width - 1`` positions before a chunk are read back from
    it, so cached decoding equals the full forward.

    Initialised U(-1/sqrt(width), 1/sqrt(width)) (``nn.Conv1d``'s default for this fan-in):
    the mix starts at about a third of the embedding's variance, at any ``dim``.
    """

    cache_key = "token_conv"

    def __init__(self, dim: int, width: int):
        super().__init__()
        if width < 1:
            raise ValueError(f"TokenConv width must be >= 1, got {width}")
        self.width = width
        self.weight = nn.Parameter(torch.empty(dim, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.width ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim)."""
        src = x
        if ctx.token_mask is not None:
            src = x * ctx.token_mask.unsqueeze(-1).to(x.dtype)
        past = self.width - 1
        if ctx.cache is None:
            window = F.pad(src, (0, 0, past, 0))  # (B, past + T, dim)
        else:
            window = ctx.cache.window(self.cache_key, ctx.start_pos, {"x": src}, past)["x"]
            window = window.to(x.dtype)
        mixed = F.conv1d(window.transpose(1, 2), self.weight.unsqueeze(1).to(x.dtype),
                         groups=x.shape[-1])  # (B, dim, T)
        return x + mixed.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, width={self.width}"
