"""What attention layers need from a key/value cache: the :class:`CacheStore` interface.

The stores themselves (:class:`~open_mythos.inference.cache.KVCache`,
:class:`~open_mythos.inference.cache.DictCache`) live in :mod:`open_mythos.inference`; the
layers depend only on this interface, so ``layers/`` imports nothing above it.
"""

from __future__ import annotations

from typing import Protocol

import torch

Entries = dict[str, torch.Tensor]


class CacheStore(Protocol):
    """What attention layers need from a cache."""

    def length(self, key: str) -> int:
        """Number of positions cached under ``key`` (0 if absent)."""
        ...

    def write(self, key: str, start: int, new: Entries) -> Entries:
        """Store ``new`` (sequence on dim -2) at positions ``start...``; return all positions.

        ``start`` may be below the cached length (the tail is overwritten) but not above it.
        """
        ...

    def fill_missing(self, key: str, src_key: str, upto: int) -> None:
        """Copy positions ``[length(key), upto)`` from ``src_key`` into ``key``."""
        ...

    def truncate(self, length: int) -> None:
        """Forget every position at or beyond ``length`` in every entry."""
        ...

    def nbytes(self) -> int:
        """Bytes held by the cached positions."""
        ...
