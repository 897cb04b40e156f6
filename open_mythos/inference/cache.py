"""Key/value caches, one entry per layer-and-depth key.

Two stores with one interface (:class:`CacheStore`):

* :class:`KVCache` preallocates each entry for ``max_len`` positions on first use and writes
  new positions in place. ``generate`` uses it. Its storage dtype may differ from the
  weights' (for example a bf16 cache beside fp32 weights).
* :class:`DictCache` adapts the plain ``dict`` of the upstream API (``kv_cache={}``): each key
  maps to a dict of tensors holding exactly the cached positions, so summing
  ``numel() * element_size()`` over it gives the real cache size.

The layers see every cached tensor with the sequence on dimension -2: GQA's ``k`` and ``v``
as (B, n_kv_heads, S, head_dim), the layout attention reads; MLA's one ``kv_latent`` as
(B, S, kv_lora_rank + qk_rope_head_dim), holding the normalised latent and the single
rotated RoPE key per token. :class:`KVCache` stores them so. A user's plain dict holds
upstream's layout and names, the sequence on dimension 1: GQA's ``k`` and ``v`` as (B, S,
n_kv_heads, head_dim); MLA's ``c_kv`` (B, S, kv_lora_rank), the latent before ``kv_norm``,
and ``k_rope`` (B, S, qk_rope_head_dim), the one rotated RoPE key of each position (upstream
kept a copy per head). Code written for upstream reads ``entry["k"].shape[1]`` or
``entry["c_kv"].shape[1]`` as the cached length.

Keys are ``prelude_{i}``, ``recurrent_loop_{t}`` and ``coda_{i}``. A recurrent depth that a
position never reached (it halted, or an earlier call ran fewer loops) is filled from the
deepest depth it did compute: see :meth:`CacheStore.fill_missing`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from ..config import whole_number
from ..layers.kv import CacheStore, Entries, spliced, window_of, with_live

__all__ = ["CacheStore", "DictCache", "Entries", "KVCache", "as_cache_store",
           "check_depth_sharing"]

#: The cache keys of the recurrent block's loop depths: ``recurrent_loop_{t}``.
RECURRENT_PREFIX = "recurrent_loop_"


def _parse_sharing(mode: str) -> int:
    """``depth_sharing`` as the stride of kept depths: 1 per depth, 0 last, M every:M; first
    is every depth past the first reading depth 0 (a stride no loop count reaches)."""
    if mode == "per_depth":
        return 1
    if mode == "last":
        return 0
    if mode == "first":
        return 1 << 62
    if isinstance(mode, str) and mode.startswith("every:"):
        try:
            every = int(mode[len("every:"):])
        except ValueError:
            every = 0
        if every >= 1:
            return every
    raise ValueError(f"depth_sharing={mode!r} is invalid: use 'per_depth', 'last', 'first' "
                     "or 'every:M' with M >= 1")


def check_depth_sharing(mode: str) -> str:
    """``mode`` if it is a valid ``depth_sharing`` (see :class:`KVCache`), else
    ``ValueError`` naming it."""
    _parse_sharing(mode)
    return mode


def _check_start(key: str, start: int, cached: int) -> None:
    if start > cached:
        raise ValueError(
            f"cache entry {key!r} holds {cached} positions; cannot write at start_pos={start} "
            "(positions must be contiguous)"
        )


def _check_entries(key: str, stored: Entries, new: Entries) -> None:
    """``new`` must continue ``stored``: the same tensors with the same batch and widths."""
    def layout(entries: Entries) -> dict[str, tuple[int, ...]]:
        return {n: (*t.shape[:-2], t.shape[-1]) for n, t in entries.items()}

    if layout(stored) != layout(new):
        raise ValueError(
            f"kv_cache entry {key!r} holds {layout(stored)} (batch, heads..., width per "
            f"position) but this call writes {layout(new)}: a cache serves one batch of one "
            "model; pass a new cache for another batch size or model")


class _FillMissing(ABC):
    """:meth:`CacheStore.fill_missing` for a store that can read an entry's tensors."""

    upstream_entries = False

    @abstractmethod
    def length(self, key: str) -> int: ...

    @abstractmethod
    def write(self, key: str, start: int, new: Entries) -> Entries: ...

    @abstractmethod
    def _stored(self, key: str) -> Entries:
        """The tensors of ``key``, holding at least its cached positions."""

    def window(self, key: str, start: int, new: Entries, before: int) -> Entries:
        written = self.write(key, start, new)  # positions [0, start + T)
        return window_of(written, start, before, next(iter(new.values())).shape[-2])

    def replay(self, key: str, start: int, new: Entries) -> Entries:
        return spliced(self._stored(key), new, start)

    def fill_missing(self, key: str, src_key: str, upto: int) -> None:
        have = self.length(key)
        if have < upto:
            src = self._stored(src_key)
            self.write(key, have, {n: t[..., have:upto, :] for n, t in src.items()})


def _swap_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) <-> (B, S, H, D) for a per-head tensor; a (B, S, C) one as it is."""
    return t.transpose(1, 2) if t.dim() == 4 else t


class DictCache(_FillMissing):
    """:class:`CacheStore` over a plain ``dict`` (grows by concatenation).

    With ``upstream_layout`` (default: a user's dict, the upstream API) the dict holds
    upstream's layout, the sequence on dimension 1 (GQA ``k``/``v`` as (B, S, n_kv_heads,
    head_dim)), and upstream's names (MLA ``c_kv`` and ``k_rope``: :attr:`upstream_entries`).
    Without it (a cache nobody reads but the model, as the Hugging Face wrapper's) it holds
    what the layers attend over, as :class:`KVCache` does: no transposes, and MLA's latent
    stored normalised rather than normalised again at every step.
    """

    def __init__(self, store: dict, upstream_layout: bool = True):
        self.store = store
        self.upstream_entries = upstream_layout
        # The sequence's dimension in the stored tensors (the layers see it on -2).
        self._seq = 1 if upstream_layout else -2

    def _in(self, t: torch.Tensor) -> torch.Tensor:
        """A layer's tensor as stored."""
        return _swap_heads(t) if self.upstream_entries else t

    _out = _in  # the swap is its own inverse

    def length(self, key: str) -> int:
        entry = self.store.get(key)
        return 0 if not entry else next(iter(entry.values())).shape[self._seq]

    def write(self, key: str, start: int, new: Entries) -> Entries:
        _check_start(key, start, self.length(key))
        old = self.store.get(key)
        if old and start > 0:
            _check_entries(key, self._stored(key), new)
            stored = {n: torch.cat((old[n].narrow(self._seq, 0, start),
                                    self._in(t.detach())), dim=self._seq)
                      for n, t in new.items()}
        else:
            # Contiguous: a slice of a wider projection (MLA's c_kv) would keep all of it
            # alive, and nbytes() would not count what the dict holds.
            stored = {n: self._in(t.detach()).contiguous() for n, t in new.items()}
        self.store[key] = stored
        return with_live({n: self._out(t) for n, t in stored.items()}, new, start)

    def _stored(self, key: str) -> Entries:
        return {n: self._out(t) for n, t in self.store[key].items()}

    def truncate(self, length: int) -> None:
        for key, entry in self.store.items():
            self.store[key] = {n: t.narrow(self._seq, 0, min(length, t.shape[self._seq]))
                               for n, t in entry.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.store.values() for t in e.values())


def check_cache_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` when it is a floating ``torch.dtype`` or None (keys and values rounded to
    an integer dtype would be silently wrong).

    Raises:
        TypeError: not a ``torch.dtype``.
        ValueError: not a floating one.
    """
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"cache dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"cache dtype must be a floating dtype (keys and values are not "
                         f"integers), got {dtype}")
    return dtype


class KVCache(_FillMissing):
    """Preallocated cache: each entry is allocated once for ``max_len`` positions.

    Args:
        max_len: positions each entry can hold (prompt plus generated tokens).
        dtype: storage dtype; ``None`` keeps the dtype of the first tensors written.
        depth_sharing: which loop depths of the recurrent block keep cache entries of
            their own (see :func:`depth_slot`): ``"per_depth"`` (default: every depth; a
            cached forward equals a full one), ``"last"`` (one entry for all depths, holding
            each position's deepest loop), ``"first"`` (one entry, holding each position's
            first loop) or ``"every:M"`` (depths 0, M, 2M... keep entries; a depth between
            reads the kept depth below it). The shared modes trade exactness for memory:
            a later token attends to an earlier one's keys of another depth.
    """

    def __init__(self, max_len: int, dtype: torch.dtype | None = None,
                 depth_sharing: str = "per_depth"):
        self.max_len = whole_number(max_len, "KVCache max_len", 1)  # a float broke a forward
        self.dtype = check_cache_dtype(dtype)
        self.depth_sharing = depth_sharing
        self._every = _parse_sharing(depth_sharing)
        self._buffers: dict[str, Entries] = {}
        self._lengths: dict[str, int] = {}

    def _slot(self, key: str) -> tuple[str, bool]:
        """The stored entry behind ``key`` and whether ``key``'s writes are kept."""
        if self._every == 1 or not key.startswith(RECURRENT_PREFIX):
            return key, True
        t = int(key[len(RECURRENT_PREFIX):])
        if self._every == 0:  # last: every depth writes the one entry
            return RECURRENT_PREFIX + "0", True
        return RECURRENT_PREFIX + str(t - t % self._every), t % self._every == 0

    def length(self, key: str) -> int:
        return self._lengths.get(self._slot(key)[0], 0)

    def keys(self) -> Iterator[str]:
        return iter(self._buffers)

    def __contains__(self, key: str) -> bool:
        return self._slot(key)[0] in self._buffers

    def __getitem__(self, key: str) -> Entries:
        """Views of the cached positions of ``key`` (of the entry it shares, if any)."""
        key = self._slot(key)[0]
        n = self._lengths[key]
        return {name: buf[..., :n, :] for name, buf in self._buffers[key].items()}

    def write(self, key: str, start: int, new: Entries) -> Entries:
        _check_start(key, start, self.length(key))
        end = start + next(iter(new.values())).shape[-2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache holds at most max_len={self.max_len} positions; writing up to {end}"
            )
        key, kept = self._slot(key)
        if key in self._buffers:  # copy_ would broadcast a batch of 1 over the stored rows
            _check_entries(key, self._buffers[key], new)
        if not kept:  # a depth that reads a kept depth's entry: attend, store nothing
            return spliced(self._buffers[key], new, start)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = {
                n: t.new_zeros(*t.shape[:-2], self.max_len, t.shape[-1], dtype=self.dtype or t.dtype)
                for n, t in new.items()
            }
            self._buffers[key] = bufs
        for n, t in new.items():
            bufs[n][..., start:end, :].copy_(t.detach())
        self._lengths[key] = end
        return with_live({n: b[..., :end, :] for n, b in bufs.items()}, new, start,
                         in_place=True)

    def stopped_entries(self, key: str, start: int, new: Entries,
                        fresh: torch.Tensor) -> Entries:
        """``new``, the entries a depth is about to write at ``start``, with the positions
        that no longer compute (``fresh`` False: a halted step, an exit rule) holding at a
        kept depth of an ``every:M`` cache what the kept depth below stores for them: their
        deepest loop in between was never stored, and a depth past it reads the kept one
        below. A position that stopped in a forward where no other kept going never reaches
        this depth and gets the same from :meth:`fill_missing`; this is the same when other
        rows or positions of the batch kept going."""
        if self._every < 2 or not key.startswith(RECURRENT_PREFIX):
            return new
        t = int(key[len(RECURRENT_PREFIX):])
        below = self._buffers.get(RECURRENT_PREFIX + str(t - self._every))
        if t % self._every or below is None:
            return new
        stopped = ~fresh
        b, length = stopped.shape
        out = {}
        for n, v in new.items():
            mask = stopped.view(b, *([1] * (v.dim() - 3)), length, 1)
            out[n] = torch.where(mask, below[n][..., start:start + length, :].to(v.dtype), v)
        return out

    def buffers(self) -> dict[str, Entries]:
        """The full preallocated buffers, ``max_len`` positions each (for compiled steps)."""
        return self._buffers

    def mark_filled(self, keys: list[str], length: int) -> None:
        """Record that ``keys`` now hold ``length`` positions (written in place elsewhere)."""
        if length > self.max_len:
            raise ValueError(f"KVCache holds at most max_len={self.max_len} positions")
        for key in keys:
            self._lengths[key] = length

    def _stored(self, key: str) -> Entries:
        return self._buffers[self._slot(key)[0]]

    def truncate(self, length: int) -> None:
        for key in self._lengths:
            self._lengths[key] = min(self._lengths[key], length)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (for example unfinished sequences)."""
        for key, bufs in self._buffers.items():
            self._buffers[key] = {n: b.index_select(0, index) for n, b in bufs.items()}

    def nbytes(self) -> int:
        total = 0
        for key, bufs in self._buffers.items():
            n = self._lengths[key]
            total += sum(b[..., :n, :].numel() * b.element_size() for b in bufs.values())
        return total


def as_cache_store(kv_cache: dict | CacheStore | None) -> CacheStore | None:
    """Accept the upstream plain ``dict`` or any :class:`CacheStore`."""
    if kv_cache is None or isinstance(kv_cache, (KVCache, DictCache)):
        return kv_cache
    if isinstance(kv_cache, dict):
        return DictCache(kv_cache)
    raise TypeError(f"kv_cache must be a dict or a KVCache, got {type(kv_cache).__name__}")
