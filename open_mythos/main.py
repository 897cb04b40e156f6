"""Compatibility module for code written against upstream ``open_mythos.main``.

Everything lives in the package's own modules; this file only re-exports the names.
"""

from .config import MythosConfig
from .layers.attention import GQAttention, MLAttention
from .layers.block import TransformerBlock
from .layers.moe import Expert, MoEFFN
from .layers.norm import RMSNorm
from .layers.recurrence import (
    ACTHalting,
    LoRAAdapter,
    LTIInjection,
    RecurrentBlock,
    loop_index_embedding,
)
from .layers.rope import apply_rope, rope_cos_sin
from .model import OpenMythos

__all__ = [
    "ACTHalting", "Expert", "GQAttention", "LTIInjection", "LoRAAdapter", "MLAttention",
    "MoEFFN", "MythosConfig", "OpenMythos", "RMSNorm", "RecurrentBlock", "TransformerBlock",
    "apply_rope", "loop_index_embedding", "rope_cos_sin",
]
