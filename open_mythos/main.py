"""Compatibility module for code written against upstream ``open_mythos.main``.

Everything lives in the package's own modules; this file only re-exports the names. The
attention, block and recurrent-block classes and the RoPE helpers come from
:mod:`open_mythos.upstream`: our layers with upstream's ``forward`` arguments and complex
RoPE table as well (``docs/api.md``, "Drop-in for upstream code").
"""

from .config import MythosConfig
from .layers.moe import Expert, MoEFFN
from .layers.norm import RMSNorm
from .layers.recurrence import ACTHalting, LoRAAdapter, LTIInjection, loop_index_embedding
from .layers.rope import rope_cos_sin
from .model import OpenMythos
from .upstream import (
    GQAttention,
    MLAttention,
    RecurrentBlock,
    TransformerBlock,
    apply_rope,
    precompute_rope_freqs,
)

__all__ = [
    "ACTHalting", "Expert", "GQAttention", "LTIInjection", "LoRAAdapter", "MLAttention",
    "MoEFFN", "MythosConfig", "OpenMythos", "RMSNorm", "RecurrentBlock", "TransformerBlock",
    "apply_rope", "loop_index_embedding", "precompute_rope_freqs", "rope_cos_sin",
]
