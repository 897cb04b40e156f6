"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..config import whole_number


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token from logits.

    Attributes:
        do_sample: False picks the argmax (greedy); True samples.
        temperature: divides the logits before sampling; must be > 0 when sampling.
        top_k: keep the ``top_k`` most likely tokens (``None`` or 0: no limit; values above
            the vocabulary size keep everything).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``, in (0, 1].
        vocab_limit: only ids below it can be chosen (``None``: every id): a model whose
            embedding has more rows than its tokenizer has ids (a vocabulary padded for
            speed) must not emit an id the tokenizer cannot decode.
    """

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not (value is None and name == "top_p") and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature}; "
                "use do_sample=False for greedy decoding"
            )
        if self.do_sample and not math.isfinite(self.temperature):  # inf: NaN probabilities
            raise ValueError(f"temperature must be a finite number, got {self.temperature}")
        # A NumPy integer is stored as a Python int (frozen: through object.__setattr__).
        object.__setattr__(self, "top_k", whole_number(self.top_k, "top_k", allow_none=True))
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "vocab_limit",
                           whole_number(self.vocab_limit, "vocab_limit", 1, allow_none=True))


def within_vocab(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits with the ids at or past ``params.vocab_limit`` set to -inf."""
    limit = params.vocab_limit
    if limit is None or limit >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(limit, logits.shape[-1], device=logits.device),
                             float("-inf"))


def greedy(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The most likely id of each row of (..., V) logits below ``params.vocab_limit``."""
    if params.vocab_limit is not None and params.vocab_limit < logits.shape[-1]:
        logits = logits[..., :params.vocab_limit]
    return logits.argmax(dim=-1)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to (B, V) logits; filtered entries become -inf.

    Every row keeps at least its most likely token, and any temperature > 0 is safe: the
    logits are shifted by their row maximum before the division (the same softmax), so a
    tiny temperature sends the others to -inf instead of overflowing float32 to inf and
    NaN probabilities (1e-37 did); one below float32's range counts as its smallest.
    """
    logits = within_vocab(logits.float(), params)
    # A temperature below float32's smallest normal number would round to 0 (0/0 = NaN);
    # one past its largest, to inf (-inf/inf = NaN at the ids filtered out).
    finfo = torch.finfo(logits.dtype)
    temperature = min(max(params.temperature, finfo.tiny), finfo.max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        # Exactly k: of tokens tied at the k-th value (frequent in bfloat16), the lowest
        # ids, as argmax takes (a threshold at the k-th value kept every tie, more than k
        # tokens; topk's order among ties is unspecified, so top_k=1 was not greedy).
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        above, tied = logits > kth, logits == kth
        room = params.top_k - above.sum(-1, keepdim=True)  # the ties that still fit
        keep = above | (tied & (tied.cumsum(-1) <= room))
        logits = logits.masked_fill(~keep, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass strictly before it already reaches top_p; never the
        # first (a top_p that float32 rounds to 0, such as 1e-46, would drop every token).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row of (B, V) logits -> (B,) long."""
    if not params.do_sample:
        return greedy(logits, params)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
