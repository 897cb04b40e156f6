"""Building blocks of the model: one concern per module."""

from .attention import AttnContext, DepthCarry, GQAttention, MLAttention, build_attention
from .block import TransformerBlock
from .conv import TokenConv
from .moe import Expert, MoEFFN
from .norm import RMSNorm
from .recurrence import ACTHalting, LoRAAdapter, LTIInjection, RecurrentBlock, loop_index_embedding
from .rope import apply_rope, rope_cos_sin

__all__ = [
    "ACTHalting", "AttnContext", "DepthCarry", "Expert", "GQAttention", "LTIInjection",
    "LoRAAdapter", "MLAttention", "MoEFFN", "RMSNorm", "RecurrentBlock", "TokenConv",
    "TransformerBlock",
    "apply_rope", "build_attention", "loop_index_embedding", "rope_cos_sin",
]
