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
    """What attention layers need from a cache.

    ``upstream_entries`` (a class attribute, False unless a store sets it): MLA caches
    upstream's two entries, ``c_kv`` (the latent before ``kv_norm``) and ``k_rope``, rather
    than one ``kv_latent`` (the normalised latent and the RoPE key side by side, which
    attention reads as it is).
    """

    upstream_entries: bool

    def length(self, key: str) -> int:
        """Number of positions cached under ``key`` (0 if absent)."""
        ...

    def write(self, key: str, start: int, new: Entries) -> Entries:
        """Store ``new`` (sequence on dim -2) at positions ``start...``; return all positions.

        ``start`` may be below the cached length (the tail is overwritten) but not above it.
        The store holds constants, as upstream's dict held ``k.detach()``: a cached position
        carries no gradient into a later call, and no autograd graph stays alive through
        the cache. The returned positions ``start...`` are ``new`` itself where autograd
        records it (:func:`with_live`), so a chunk's own keys and values keep their gradient.
        """
        ...

    def replay(self, key: str, start: int, new: Entries) -> Entries:
        """What :meth:`write` returned when it wrote ``new`` at ``start``, without writing:
        the stored positions before ``start``, then ``new`` (a gradient-checkpointing
        recomputation of a forward that wrote the cache)."""
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

    def window(self, key: str, start: int, new: Entries, before: int) -> Entries:
        """:meth:`write` ``new``, then return positions ``start - before ... start + T - 1``
        (``before + T`` of them; zeros stand in for positions before the first).

        For layers that mix a few neighbouring positions (``TokenConv``) rather than attend.
        """
        ...


def with_live(written: Entries, new: Entries, start: int, in_place: bool = False) -> Entries:
    """``written`` (every position up to the new ones, as a store holds them) with the new
    positions ``start...`` taken from ``new`` itself where autograd records ``new``.

    A store writes constants (``new`` detached); attending over them alone would drop the
    gradient of the chunk's own keys and values, which a cache-free forward has.
    ``in_place``: ``written`` views storage that later writes overwrite in place, so under
    autograd (which may save it for the backward) it is copied whatever ``new`` is.
    """
    recorded = any(t.requires_grad for t in new.values())
    if not torch.is_grad_enabled() or not (recorded or in_place):
        return written
    return spliced(written, new, start)


def spliced(stored: Entries, new: Entries, start: int) -> Entries:
    """New tensors: ``stored``'s positions before ``start``, then ``new`` (in the stored
    dtype); ``stored`` may hold more positions, which are left out."""
    return {n: torch.cat((s[..., :start, :], new[n].to(s.dtype)), dim=-2)
            for n, s in stored.items()}


def window_of(written: Entries, start: int, before: int, length: int) -> Entries:
    """The ``window`` of a store whose :meth:`CacheStore.write` returned ``written``, every
    position up to the new ones (``length`` of them, written at ``start``)."""
    lo = start - before
    out = {}
    for name, t in written.items():
        part = t[..., max(lo, 0):start + length, :]
        out[name] = torch.nn.functional.pad(part, (0, 0, -lo, 0)) if lo < 0 else part
    return out
