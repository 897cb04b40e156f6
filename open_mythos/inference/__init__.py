"""Inference: key/value caches, sampling and the generation loop."""

from .cache import CacheStore, DictCache, KVCache
from .generation import generate, stream
from .sampling import SamplingParams, select_next

__all__ = ["CacheStore", "DictCache", "KVCache", "SamplingParams", "generate", "select_next", "stream"]
