"""Self-speculative decoding: a looped model drafts with few loops and verifies at full depth.

Each cycle drafts ``draft_tokens`` tokens one at a time with ``draft_loops`` loops (or with
a training-free :class:`~open_mythos.layers.recurrence.ExitRule`), read out through the Coda
or, cheaper, through the head lens (``draft_lens="head"``), then runs the pending
token and the drafts through all ``n_loops`` loops in one cached forward. The longest prefix
of drafts the full-depth model agrees with is kept, plus one token of its own; the cache is
rolled back past the rest. The draft and the verifier are the same weights, so no second
model is needed, and the cache entries the drafts wrote at shallow depths are simply
overwritten by the verification.

Greedy decoding gives exactly the tokens of plain greedy decoding (up to floating-point ties
between a chunked and a one-token forward). Sampling uses the standard speculative rule
(accept draft ``d`` with probability ``min(1, p(d) / q(d))``, else sample from the
normalised ``max(0, p - q)``), so the tokens follow the full-depth model's distribution
after temperature, top-k and top-p.

In a batch every sequence keeps the same number of tokens per cycle (the smallest accepted
prefix among the sequences still generating), so the cache stays rectangular.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import check_loops, whole_number
from ..layers.recurrence import ExitRule, as_exit_rule
from .cache import KVCache
from .generation import _check_decode_args, _check_stream_args, _inference, last_positions
from .sampling import SamplingParams, filter_logits, greedy
from .static import eager_modules

if TYPE_CHECKING:
    from ..model import OpenMythos


#: How a draft reads its state out (``draft_lens``).
DRAFT_LENSES = ("coda", "head")


#: Options of :func:`~.generation.stream` that speculative decoding does not take, and why.
STREAM_ONLY: dict[str, str] = {
    "exit_rule": "the verification runs all n_loops loops, so its tokens are plain "
                 "decoding's; an exit rule for the drafts is draft_exit_rule= (for "
                 "adaptive depth in every token use generate(exit_rule=...))",
    "act_early_exit": "the verification runs all n_loops loops (use generate for ACT "
                      "early exit)",
    "compile": "drafting and verifying are eager (a compiled decode is "
               "generate(compile=True))",
    "depth_sharing": "drafts and verification keep cache entries per depth (a "
                     "shared-depth cache is generate(depth_sharing=...))",
}


def refuse_stream_only(options: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming why, for options of :func:`~.generation.stream` that
    speculative decoding does not take (and the plain error for any other unknown name)."""
    for name in options:
        if name in STREAM_ONLY:
            raise TypeError(f"speculative decoding does not take {name}=: {STREAM_ONLY[name]}")
    if options:
        raise TypeError("speculative decoding got unexpected keyword argument(s) "
                        + ", ".join(map(repr, options)))


def check_draft_lens(draft_lens: str) -> None:
    """Raise ``ValueError`` unless ``draft_lens`` is one of :data:`DRAFT_LENSES`."""
    if draft_lens not in DRAFT_LENSES:
        raise ValueError(f"draft_lens must be one of {', '.join(map(repr, DRAFT_LENSES))}, "
                         f"got {draft_lens!r}")


@dataclass
class SpeculativeStats:
    """Counters of speculative generations: one, or several passed the same object (each
    counter sums over them).

    Attributes:
        cycles: draft-and-verify cycles.
        drafted: draft tokens proposed, summed over the sequences still generating.
        accepted: of those, the ones the full-depth model accepted.
        kept: draft tokens kept per sequence (the batch keeps the smallest accepted prefix).
        tokens: tokens emitted per sequence.
        generations: the generations counted (calls that emitted a token).
    """

    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    kept: int = 0
    tokens: int = 0
    generations: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_cycle(self) -> float:
        """Tokens emitted per draft-and-verify cycle (per full-depth verification); a
        generation's first token, which the prompt's forward emits, is not a cycle's and
        not counted."""
        return (self.tokens - self.generations) / self.cycles if self.cycles else 0.0


def speculative_stream(
    model: OpenMythos,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    n_loops: int | None = 8,
    *,
    draft_loops: int | None = 1,
    draft_exit_rule: ExitRule | None = None,
    draft_tokens: int = 4,
    draft_lens: str = "coda",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
    stats: SpeculativeStats | None = None,
    vocab_limit: int | None = None,
    **stream_only: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,) long, as :func:`~.generation.stream`.

    Args:
        model: a looped model.
        input_ids, max_new_tokens, n_loops, eos_token_id, pad_token_id, attention_mask,
            generator, cache_dtype: as for :func:`~.generation.stream`.
        draft_loops: loops of a draft forward (``None``: ``n_loops``, with
            ``draft_exit_rule`` deciding where each draft stops).
        draft_exit_rule: a training-free exit rule for the draft forwards.
        draft_tokens: drafts per cycle (>= 1).
        draft_lens: how a draft reads its state: ``"coda"`` (the rest of the network, as
            a forward with ``draft_loops`` loops) or ``"head"`` (final norm and head only,
            skipping the Coda: cheaper, and as good where training supervised every loop
            through the head, ``optim.loop_readout = "head"``). The output is the same
            either way; only the acceptance rate and the cost of a draft change.
        do_sample, temperature, top_k, top_p: see :class:`SamplingParams` (greedy by
            default, the setting in which the output equals plain decoding token for token;
            ``top_k`` 50 when sampling, as for :func:`~.generation.stream`).
        stats: filled with the cycle, draft and acceptance counts.
        stream_only: refused with the reason: ``exit_rule``, ``act_early_exit``,
            ``compile`` and ``depth_sharing`` are :func:`~.generation.stream`'s only.

    Raises:
        ValueError: invalid arguments, or a model without loops.
        TypeError: an option this decoder does not take.
    """
    refuse_stream_only(stream_only)
    params = SamplingParams(do_sample, temperature, top_k, top_p, vocab_limit)
    max_new_tokens = whole_number(max_new_tokens, "max_new_tokens")
    n_loops = model.default_n_loops if n_loops is None else check_loops(n_loops)
    _check_stream_args(model, input_ids, max_new_tokens, attention_mask, None, False)
    if not hasattr(model, "recurrent"):
        raise ValueError("self-speculative decoding drafts with fewer loops: it needs a "
                         "looped model")
    draft_tokens = whole_number(draft_tokens, "draft_tokens", minimum=1)
    check_draft_lens(draft_lens)
    if draft_loops is None and draft_exit_rule is None:
        raise ValueError("give draft_loops, draft_exit_rule or both")
    draft_loops = check_loops(draft_loops, "draft_loops", allow_none=True)
    if draft_loops is not None and draft_loops > n_loops:
        raise ValueError(f"draft_loops={draft_loops} is above n_loops={n_loops}: a draft "
                         "runs at most the loops of the verification that checks it")
    draft_exit_rule = as_exit_rule(draft_exit_rule, "draft_exit_rule")
    stop, pad_token_id = _check_decode_args(model, input_ids, eos_token_id, pad_token_id,
                                            generator, cache_dtype)
    stats = SpeculativeStats() if stats is None else stats
    if max_new_tokens == 0:
        return
    decoder = _Speculator(model, input_ids, max_new_tokens, n_loops, params, attention_mask,
                          generator, cache_dtype, draft_loops or n_loops, draft_exit_rule,
                          draft_lens)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    emitted = 0
    with _inference(model):
        pending = decoder.prefill()
    while True:
        # ``pending`` holds one or more tokens per row, in order; emit them one by one.
        for tok in pending:
            if stop is not None:
                tok = tok.masked_fill(finished, pad_token_id)
                finished = finished | torch.isin(tok, stop)
            yield tok
            emitted += 1
            stats.tokens += 1
            stats.generations += emitted == 1
            if emitted == max_new_tokens or (stop is not None and bool(finished.all())):
                return
        with _inference(model):
            pending = decoder.cycle(min(draft_tokens, max_new_tokens - emitted), finished,
                                    stats)


class _Speculator:
    """The cache and the position of one speculative generation."""

    def __init__(self, model: OpenMythos, input_ids: torch.Tensor, max_new_tokens: int,
                 n_loops: int, params: SamplingParams, attention_mask: torch.Tensor | None,
                 generator: torch.Generator | None, cache_dtype: torch.dtype | None,
                 draft_loops: int, draft_exit_rule: ExitRule | None, draft_lens: str):
        self.model, self.input_ids, self.n_loops = model, input_ids, n_loops
        self.params, self.generator = params, generator
        self.draft_loops, self.draft_exit_rule = draft_loops, draft_exit_rule
        self.draft_lens = draft_lens
        B, T0 = input_ids.shape
        self.total = T0 + max_new_tokens
        # Room for one cycle's drafts beyond the last token kept.
        self.cache = KVCache(self.total, dtype=cache_dtype)
        self.mask = None
        if attention_mask is not None:
            self.mask = torch.ones(B, self.total, dtype=torch.long, device=input_ids.device)
            self.mask[:, :T0] = attention_mask
        self.pos = T0  # positions cached at full depth

    def _forward(self, ids: torch.Tensor, start: int, n_loops: int,
                 exit_rule: ExitRule | None = None, lens: str = "coda",
                 last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, V) at the last position with ``last_only``."""
        mask = None if self.mask is None else self.mask[:, : start + ids.shape[1]]
        options: dict[str, Any] = {} if exit_rule is None else {"exit_rule": exit_rule}
        if last_only:
            options["logits_at"] = last_positions(ids)
        if lens != "coda":
            # The Coda's cache entries of the drafts stay unwritten; the verification
            # (at ``start`` = the first draft's position - 1) writes them.
            options["readout_lens"] = lens
        with eager_modules():
            return self.model(ids, n_loops, self.cache, start, attention_mask=mask, **options)

    def _dist(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) probabilities after temperature, top-k and top-p."""
        shape = logits.shape
        return filter_logits(logits.reshape(-1, shape[-1]), self.params).softmax(-1).view(shape)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.params.do_sample:
            return greedy(logits, self.params)
        probs = self._dist(logits)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def prefill(self) -> list[torch.Tensor]:
        logits = self._forward(self.input_ids, 0, self.n_loops, last_only=True)
        self.next = self._pick(logits)  # the token at position self.pos, not yet cached
        return [self.next]

    def cycle(self, n_draft: int, finished: torch.Tensor,
              stats: SpeculativeStats) -> list[torch.Tensor]:
        """Draft ``n_draft`` tokens after ``self.next``, verify them at full depth; returns
        the tokens to emit (each (B,)); afterwards the next pending token is their last."""
        p = self.pos
        # The drafts may not run past the generation's length (the cache's size).
        n_draft = max(0, min(n_draft, self.total - p - 1))
        drafts, draft_logits, tok = [], [], self.next
        for i in range(n_draft):
            logits = self._forward(tok.unsqueeze(1), p + i, self.draft_loops,
                                   self.draft_exit_rule, self.draft_lens)[:, -1]
            tok = self._pick(logits)
            drafts.append(tok)
            draft_logits.append(logits)
        block = torch.stack([self.next, *drafts], dim=1)  # (B, 1 + n_draft)
        target = self._forward(block, p, self.n_loops)  # (B, 1 + n_draft, V)
        if n_draft:
            d = torch.stack(drafts, dim=1)  # (B, n)
            ok = self._accept(target[:, :-1], torch.stack(draft_logits, dim=1), d)  # (B, n)
        else:
            d = ok = torch.zeros(block.shape[0], 0, dtype=torch.long, device=block.device)
        live = ~finished
        run = ok.long().cumprod(dim=1).sum(dim=1)  # accepted prefix per row
        kept = int(run[live].min()) if bool(live.any()) else n_draft
        stats.cycles += 1
        stats.drafted += n_draft * int(live.sum())
        stats.accepted += int(run[live].sum())
        stats.kept += kept
        # The token after the kept drafts: a row that accepted one more keeps that draft
        # (already a sample of the full-depth model); the others take the verifier's.
        if kept < n_draft:
            own = self._correct(target[:, kept], draft_logits[kept], d[:, kept])
            last = torch.where(ok[:, kept] & (run > kept), d[:, kept], own)
        else:
            last = self._pick(target[:, n_draft])
        self.cache.truncate(p + 1 + kept)
        self.pos = p + 1 + kept
        self.next = last
        return [d[:, i] for i in range(kept)] + [last]

    def _accept(self, target: torch.Tensor, draft: torch.Tensor,
                d: torch.Tensor) -> torch.Tensor:
        """(B, n) bool: is draft ``d[:, i]`` accepted, given the full-depth logits before
        it (``target[:, i]``) and the draft's (``draft[:, i]``)?"""
        if not self.params.do_sample:
            return greedy(target, self.params) == d
        p = self._dist(target).gather(-1, d.unsqueeze(-1)).squeeze(-1)
        q = self._dist(draft).gather(-1, d.unsqueeze(-1)).squeeze(-1)
        u = torch.rand(d.shape, generator=self.generator, device=d.device)
        return u * q < p  # u < p / q without dividing by zero

    def _correct(self, target: torch.Tensor, draft: torch.Tensor,
                 d: torch.Tensor) -> torch.Tensor:
        """The token that replaces a rejected draft: the verifier's argmax, or a sample
        of ``max(0, p - q)`` renormalised."""
        if not self.params.do_sample:
            return greedy(target, self.params)
        residual = (self._dist(target) - self._dist(draft)).clamp(min=0)
        empty = residual.sum(-1, keepdim=True) <= 0  # p == q: nothing to correct
        residual = torch.where(empty, self._dist(target), residual)
        return torch.multinomial(residual / residual.sum(-1, keepdim=True), 1,
                                 generator=self.generator).squeeze(-1)


def speculative_generate(model: OpenMythos, input_ids: torch.Tensor, max_new_tokens: int = 64,
                         n_loops: int | None = 8, **kwargs: Any) -> torch.Tensor:
    """Prompts followed by their generated tokens, (B, T + new) long; keyword arguments are
    those of :func:`speculative_stream`."""
    new = list(speculative_stream(model, input_ids, max_new_tokens, n_loops, **kwargs))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
