"""Pre-norm transformer block shared by the Prelude, the recurrent block and the Coda."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from ..config import AttnType, MythosConfig
from .attention import ATTENTION, AttnContext, DepthCarry, build_attention
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
    ) -> torch.Tensor:
        """``x``: (B, T, dim) -> (B, T, dim); writes this layer's keys under ``cache_key``."""
        x = x + self.resid_drop(self.attn(self.attn_norm(x), ctx, cache_key, carry))
        if isinstance(self.ffn, MoEFFN):
            return x + self.resid_drop(self.ffn(self.ffn_norm(x), ctx.token_mask))
        return x + self.resid_drop(self.ffn(self.ffn_norm(x)))
