"""Pre-norm transformer block shared by the Prelude, the recurrent block and the Coda."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from ..config import AttnType, MythosConfig
from .attention import ATTENTION, AttnContext, DepthCarry, at_positions, build_attention
from .moe import Expert, MoEFFN
from .norm import RMSNorm


class TransformerBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))``.

    The FFN is a dense SwiGLU (``cfg.ffn_dim`` wide) in Prelude and Coda, and the
    mixture of experts (:class:`MoEFFN`) in the recurrent block (``use_moe=True``).
    The attention class comes from :attr:`attention_classes` (by ``cfg.attn_type``).
    """

    attention_classes: ClassVar[Mapping[AttnType, type[nn.Module]]] = ATTENTION

    def __init__(self, cfg: MythosConfig, use_moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, self.attention_classes)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoEFFN(cfg) if use_moe else Expert(cfg.dim, cfg.ffn_dim)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        cache_key: str = "default",
        carry: DepthCarry | None = None,
        query_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: (B, T, dim) -> (B, T, dim); writes this layer's keys under ``cache_key``.

        ``query_at`` (N,) flat indices into the ``B * T`` positions: the output at those
        positions only, (N, 1, dim), for a last layer whose other outputs nobody reads. Keys
        and values (and the cache) still cover every position; attention queries and the FFN
        run at the N positions only.
        """
        h = self.attn(self.attn_norm(x), ctx, cache_key, carry, query_at)
        token_mask = ctx.token_mask
        if query_at is not None:
            x = at_positions(x, query_at)
            token_mask = None if token_mask is None else at_positions(token_mask, query_at)
        x = x + self.resid_drop(h)
        if isinstance(self.ffn, MoEFFN):
            return x + self.resid_drop(self.ffn(self.ffn_norm(x), token_mask))
        return x + self.resid_drop(self.ffn(self.ffn_norm(x)))
