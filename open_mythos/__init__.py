"""OpenMythos: a Recurrent-Depth Transformer (looped language model) in PyTorch."""

from .config import AttnType, MythosConfig
from .integrations.autoregister import install as _install_hf_registration
from .layers.recurrence import ExitRule
from .model import OpenMythos
from .tokenizers import ByteTokenizer, MythosTokenizer, load_tokenizer
from .variants import (
    VARIANTS,
    ParamCount,
    count_parameters,
    mythos_1b,
    mythos_1t,
    mythos_3b,
    mythos_10b,
    mythos_50b,
    mythos_100b,
    mythos_500b,
)

__all__ = [
    "VARIANTS", "AttnType", "ByteTokenizer", "ExitRule", "MythosConfig", "MythosTokenizer", "OpenMythos",
    "ParamCount", "count_parameters", "load_tokenizer", "mythos_1b", "mythos_1t", "mythos_3b",
    "mythos_10b", "mythos_50b", "mythos_100b", "mythos_500b",
]

#: Upstream's package re-exported every name of ``open_mythos.main``; they load on first use.
_UPSTREAM_NAMES = frozenset({
    "ACTHalting", "Expert", "GQAttention", "LTIInjection", "LoRAAdapter", "MLAttention", "MoEFFN",
    "RMSNorm", "RecurrentBlock", "TransformerBlock", "apply_rope", "loop_index_embedding",
    "precompute_rope_freqs",
})


def __getattr__(name: str):
    if name in _UPSTREAM_NAMES:
        from . import main

        return getattr(main, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install_hf_registration()  # AutoModelForCausalLM knows "openmythos" once transformers loads
