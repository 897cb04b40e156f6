"""Sequences that decode together: one KV cache and one ``n_loops``, rows joining and
leaving between steps (the storage side of continuous batching).

Layout of the shared cache (every entry (B, ..., width, d), sequence on dim -2)::

    row 0   . . . . p p p p g g      lengths[0] = 6
    row 1   p p p p p p p p g g      lengths[1] = 10 = width
    row 2   . . . . . . . p g g      lengths[2] = 3

Each row's positions are contiguous and right-aligned; the columns before them are padding
(``.``), masked out of attention. The model numbers positions by counting a row's real
tokens (``attention_mask`` cumsum), and the cache holds keys already rotated by RoPE, so a
row can be moved to other columns, or into another batch, without recomputing anything.

A row joins with its prompt prefilled in a cache of its own (:class:`Prefill`): it is
placed in the last ``length`` columns, the batch first widening on the left if the row is
longer than ``width``. A row that leaves is dropped; leading columns that became padding
for every remaining row are cut, so ``width`` is always the longest row and never exceeds
``max_seq_len``.

The cache holds ``capacity`` columns, a power of two (at least :data:`MIN_CAPACITY`, at
most ``max_seq_len``) that doubles when the batch widens past it and is set afresh when the
batch empties, so memory follows the rows decoding now rather than the longest context.

ACT early exit leaves the deeper recurrent entries of halted positions unwritten (the next
forward fills them from the depth above, :meth:`CacheStore.fill_missing`); before moving
rows the batch does that filling itself, so every entry holds all ``width`` columns.
"""

from __future__ import annotations

import torch

from ..inference.cache import KVCache
from ..inference.generation import last_positions
from ..layers.recurrence import ExitRule
from ..model import CausalLM

#: The fewest columns a batch's cache is allocated with.
MIN_CAPACITY = 64


def fill_depths(cache: KVCache, keys: list[str], upto: int) -> None:
    """Give every entry of ``keys`` (layer order) ``upto`` positions: a short entry (a
    recurrent depth that halted positions never reached) is filled from the entry before
    it, as the model's next forward would do."""
    for prev, key in zip(keys, keys[1:]):
        if cache.length(key) < upto:
            cache.fill_missing(key, prev, upto)


class Prefill:
    """One prompt run into a cache of its own, ``chunk`` tokens per call of :meth:`run`.

    Args:
        model: the model (eval mode, no gradients: the caller's job).
        ids: the prompt's token ids.
        n_loops: loops per forward.
        keep_logits: also keep every position's logits (for prompt logprobs).
        exit_rule: a training-free exit rule of every forward, or None.
    """

    def __init__(self, model: CausalLM, ids: list[int], n_loops: int, keep_logits: bool = False,
                 exit_rule: ExitRule | None = None):
        self.model, self.n_loops, self.exit_rule = model, n_loops, exit_rule
        self.ids = torch.tensor([ids], dtype=torch.long, device=_device(model))  # (1, L)
        self.cache = KVCache(len(ids))
        self.done = 0
        self.keep_logits = keep_logits
        self.logits: list[torch.Tensor] = []  # (c, V) per chunk when keep_logits
        self.last: torch.Tensor | None = None  # (V,) logits of the last prompt position

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def finished(self) -> bool:
        return self.done == self.length

    def run(self, chunk: int) -> int:
        """Prefill up to ``chunk`` more prompt tokens; returns how many."""
        end = min(self.length, self.done + chunk)
        ids = self.ids[:, self.done:end]
        # Without prompt logprobs only the last position's logits are read: the head and
        # the last Coda block then run there alone.
        at = None if self.keep_logits else last_positions(ids)
        logits = self.model(ids, self.n_loops, self.cache, self.done, act_early_exit=True,
                            exit_rule=self.exit_rule, logits_at=at)  # (1, c, V) or (1, V)
        if self.keep_logits:
            self.logits.append(logits[0].float())
        self.last = logits[0, -1] if self.keep_logits else logits[0]
        ran, self.done = end - self.done, end
        return ran

    def all_logits(self) -> torch.Tensor:
        """(L, V) float32 logits of every prompt position (``keep_logits`` only)."""
        return torch.cat(self.logits)


def prefill_together(model: CausalLM, prefills: list[Prefill]) -> None:
    """Run several prefills that have not started (one ``n_loops`` and exit rule) as one
    left-padded forward; each ends finished, with its own cache and logits, as if it had
    run alone (positions count each row's real tokens; padding is masked out)."""
    first = prefills[0]
    width = max(p.length for p in prefills)
    device = first.ids.device
    ids = torch.zeros(len(prefills), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prefills):
        if p.done or (p.n_loops, p.exit_rule) != (first.n_loops, first.exit_rule):
            raise ValueError("prefill_together takes unstarted prefills of one depth and rule")
        ids[r, width - p.length:] = p.ids[0]
        mask[r, width - p.length:] = 1
    cache = KVCache(width)
    keep = any(p.keep_logits for p in prefills)
    logits = model(ids, first.n_loops, cache, 0, attention_mask=mask, act_early_exit=True,
                   exit_rule=first.exit_rule,
                   logits_at=None if keep else last_positions(ids))  # (B, width, V) or (B, V)
    keys = model.cache_keys(first.n_loops)
    fill_depths(cache, keys, width)
    for r, p in enumerate(prefills):
        start = width - p.length
        for key in keys:
            p.cache.buffers()[key] = {n: b[r:r + 1][..., start:, :].clone()
                                      for n, b in cache.buffers()[key].items()}
        p.cache.mark_filled(keys, p.length)
        if keep:
            row = logits[r, start:]  # (length, V)
            if p.keep_logits:
                p.logits = [row.float()]
            p.last = row[-1]
        else:
            p.last = logits[r]
        p.done = p.length


class DecodeBatch:
    """Rows decoding together with one ``n_loops`` and exit rule (see the module docstring).

    Args:
        model: the model (eval mode, no gradients: the caller's job).
        n_loops: loops per decode step of every row.
        exit_rule: a training-free exit rule of every step (each row exits on its own), or
            None.
    """

    def __init__(self, model: CausalLM, n_loops: int, exit_rule: ExitRule | None = None):
        self.model, self.n_loops, self.exit_rule = model, n_loops, exit_rule
        self.max_len = model.cfg.max_seq_len
        self.capacity = 0  # columns allocated (0: no cache)
        self.keys = model.cache_keys(n_loops)
        self.cache: KVCache | None = None
        self.width = 0
        self.lengths: list[int] = []  # cached positions of each row

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, prefill: Prefill) -> int:
        """Append the prefilled prompt as a new last row; returns its row index. The
        prefill's cache is copied, so one prefill can seed several rows (``n`` choices)."""
        row, length = prefill.cache, prefill.length
        fill_depths(row, self.keys, length)
        if self.cache is None:
            self.capacity = self._bucket(length + 1)
            self.cache, self.width = KVCache(self.capacity), length
        else:
            fill_depths(self.cache, self.keys, self.width)
            if length > self.width:
                self._widen(length - self.width)
        start = self.width - length
        bufs = self.cache.buffers()
        for key in self.keys:
            new = {}
            for name, src in row.buffers()[key].items():
                placed = src.new_zeros(*src.shape[:-2], self.capacity, src.shape[-1])
                placed[..., start:self.width, :] = src[..., :length, :]
                old = bufs.get(key)
                new[name] = placed if old is None else torch.cat((old[name], placed), dim=0)
            bufs[key] = new
        self.cache.mark_filled(self.keys, self.width)
        self.lengths.append(length)
        return len(self.lengths) - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); the others leave the batch."""
        if len(rows) == len(self.lengths) and rows == sorted(rows):
            return
        self.lengths = [self.lengths[r] for r in rows]
        if not rows:
            self.cache, self.width, self.capacity = None, 0, 0
            return
        assert self.cache is not None
        fill_depths(self.cache, self.keys, self.width)
        self.cache.select_batch(torch.tensor(rows, dtype=torch.long, device=_device(self.model)))
        cut = self.width - max(self.lengths)
        if cut:  # leading columns that are padding in every remaining row
            for entry in self.cache.buffers().values():
                for buf in entry.values():
                    buf[..., : self.width - cut, :] = buf[..., cut:self.width, :].clone()
            self.width -= cut
            self.cache.mark_filled(self.keys, self.width)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,) long; returns the next logits, (B, V)."""
        assert self.cache is not None and tokens.shape == (len(self.lengths),)
        if self.width + 1 > self.capacity:
            self._grow(self.width + 1)
        lengths = torch.tensor(self.lengths, device=tokens.device)
        cols = torch.arange(self.width + 1, device=tokens.device)
        mask = (cols.view(1, -1) >= (self.width - lengths).view(-1, 1)).long()  # (B, width + 1)
        logits = self.model(tokens.view(-1, 1), self.n_loops, self.cache, self.width,
                            attention_mask=mask, act_early_exit=True,
                            exit_rule=self.exit_rule)[:, -1]
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _bucket(self, columns: int) -> int:
        """The capacity for ``columns`` columns: a power of two within the limits."""
        return min(self.max_len, max(MIN_CAPACITY, 1 << (columns - 1).bit_length()))

    def _grow(self, columns: int) -> None:
        """Reallocate the cache with room for ``columns`` columns (the cached ones kept)."""
        assert self.cache is not None
        fill_depths(self.cache, self.keys, self.width)
        self.capacity = self._bucket(columns)
        grown = KVCache(self.capacity)
        for key, entry in self.cache.buffers().items():
            new = {}
            for name, buf in entry.items():
                new[name] = buf.new_zeros(*buf.shape[:-2], self.capacity, buf.shape[-1])
                new[name][..., : self.width, :] = buf[..., : self.width, :]
            grown.buffers()[key] = new
        grown.mark_filled(self.keys, self.width)
        self.cache = grown

    def _widen(self, extra: int) -> None:
        """Add ``extra`` padding columns on the left of every row."""
        assert self.cache is not None
        if self.width + extra + 1 > self.capacity:
            self._grow(self.width + extra + 1)
        for entry in self.cache.buffers().values():
            for buf in entry.values():
                buf[..., extra:self.width + extra, :] = buf[..., : self.width, :].clone()
                buf[..., :extra, :] = 0
        self.width += extra
        self.cache.mark_filled(self.keys, self.width)

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()


def _device(model: CausalLM) -> torch.device:
    return next(model.parameters()).device
