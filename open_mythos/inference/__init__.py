"""Inference: key/value caches, sampling and the generation loop."""

from .cache import CacheStore, DictCache, KVCache
from .generation import generate, stream
from .sampling import SamplingParams, select_next
from .speculative import SpeculativeStats, speculative_generate, speculative_stream

__all__ = ["CacheStore", "DictCache", "KVCache", "SamplingParams", "SpeculativeStats", "generate",
           "select_next", "speculative_generate", "speculative_stream", "stream"]
