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

def __getattr__(name: str):
    """The names of ``open_mythos.main``, as upstream's package re-exported them."""
    import importlib

    main = importlib.import_module(f"{__name__}.main")  # not "from . import": it asks us
    if name in main.__all__:
        return getattr(main, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install_hf_registration()  # AutoModelForCausalLM knows "openmythos" once transformers loads
