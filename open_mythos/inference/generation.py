"""Batched autoregressive generation over a preallocated :class:`KVCache`.

:func:`stream` yields one token per sequence per step; :func:`generate` collects them.
Prompts of different lengths are left-padded and described by ``attention_mask``. A
sequence that emits a stop token is finished: it receives ``pad_token_id`` afterwards, and
generation ends when every sequence is finished.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import operator
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..config import check_flag, check_loops, whole_number
from ..layers.recurrence import ExitRule, as_exit_rule
from ..modes import evaluating
from .autocompile import (
    ShapeKey,
    auto_compile,
    built_from_scratch,
    compile_counts,
    refused_recompile,
)
from .cache import KVCache, check_cache_dtype, check_depth_sharing
from .sampling import SamplingParams, select_next
from .static import CompiledDecoder, cache_length, eager_modules, may_set_stance, stance

if TYPE_CHECKING:
    from ..model import OpenMythos


def _stop_ids(eos_token_id: int | Iterable[int] | None, device: torch.device,
              vocab_size: int | None = None) -> torch.Tensor | None:
    """The stop tokens as a tensor: one id or several (Python, NumPy or 0-d tensor integers),
    each checked to be in ``[0, vocab_size)`` when that is given (an id outside could never
    be generated, so the stop would never fire)."""
    if eos_token_id is None:
        return None
    try:
        try:
            ids = [operator.index(eos_token_id)]
        except TypeError:
            ids = [operator.index(i) for i in eos_token_id]
    except TypeError:
        raise ValueError(f"eos_token_id must be a token id or a list of them, got "
                         f"{eos_token_id!r}") from None
    if vocab_size is not None:
        for i in ids:
            _check_token_id(i, "eos_token_id", vocab_size)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _check_decode_args(model: OpenMythos, input_ids: torch.Tensor,
                       eos_token_id: int | Iterable[int] | None, pad_token_id: int | None,
                       generator: torch.Generator | None, cache_dtype: torch.dtype | None,
                       ) -> tuple[torch.Tensor | None, int]:
    """Check the decoding arguments shared by :func:`stream` and self-speculative decoding;
    returns ``(stop ids or None, pad id)`` (the pad defaults to the first stop id, else 0)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
    check_cache_dtype(cache_dtype)
    stop = _stop_ids(eos_token_id, input_ids.device, model.cfg.vocab_size)
    if pad_token_id is None:
        pad_token_id = int(stop[0]) if stop is not None else 0
    _check_token_id(pad_token_id, "pad_token_id", model.cfg.vocab_size)
    return stop, int(pad_token_id)


def _check_token_id(token_id: Any, name: str, vocab_size: int) -> None:
    """ValueError unless ``token_id`` is an integer id in ``[0, vocab_size)``."""
    try:
        value = operator.index(token_id)
    except TypeError:
        raise ValueError(f"{name} must be a token id, got {token_id!r}") from None
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")


def stream(
    model: OpenMythos,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    n_loops: int | None = 8,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
    act_early_exit: bool | None = None,
    compile: bool | None = None,
    exit_rule: ExitRule | None = None,
    depth_sharing: str = "per_depth",
    vocab_limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,) long, as soon as it is chosen.

    Args:
        model: the model; each forward runs in eval mode without gradients, and between
            tokens the model's mode and the caller's grad mode are as the caller left them.
        input_ids: (B, T) prompts, left-padded when their lengths differ.
        max_new_tokens: most tokens to generate (>= 0).
        n_loops: recurrent loops per forward (>= 1); None: the model's default
            (``cfg.max_loop_iters``), as ``forward`` and upstream's ``generate`` take it.
        do_sample, temperature, top_k, top_p: see :class:`SamplingParams`.
        eos_token_id: stop token id(s); each sequence stops on its own.
        pad_token_id: emitted for finished sequences (default: the first stop id, else 0).
        attention_mask: (B, T) 1 for prompt tokens, 0 for padding.
        generator: a ``torch.Generator`` for reproducible sampling (one stream for the
            batch: a sampled row's tokens depend on the other rows).
        cache_dtype: storage dtype of the KV cache (for example ``torch.bfloat16``).
        act_early_exit: skip loops once every position has halted (default: on when the
            steps are eager, off when they are compiled).
        compile: ``True`` decodes through one ``torch.compile``d fixed-shape graph per step
            (:mod:`open_mythos.inference.static`): several times faster once compiled, at
            a one-off compilation cost per model, batch size, cache bucket and ``n_loops``.
            Every loop runs (ACT still weights them), so it cannot be combined with
            ``act_early_exit=True``. The prompt is prefilled eagerly. Do not change the
            model (dtype, device, weights' storage, train mode) while a compiled stream is
            being consumed: after its first step, the graph's guards are not checked again.
            ``False`` decodes eagerly. ``None`` (the default) decodes eagerly until this
            process has spent about as long in eager steps of this model at this shape as
            compiling costs, then compiled (:mod:`open_mythos.inference.autocompile`; not
            with an exit rule, ``act_early_exit=True`` or a shared-depth cache). The tokens
            are the same either way in float32; in a bfloat16 model the compiled step rounds
            differently, and near-ties can go the other way.
        exit_rule: a training-free :class:`~open_mythos.layers.recurrence.ExitRule`: each
            position (each sequence, in decoding) stops looping once it fires; a sequence
            that has exited skips the remaining loops of its step (not with ``compile``).
        depth_sharing: which loop depths keep KV cache entries of their own (see
            :class:`~open_mythos.inference.cache.KVCache`); the shared modes save memory
            at some cost in quality (not with ``compile``).
        vocab_limit: only ids below it are generated (see :class:`SamplingParams`).
    """
    params = SamplingParams(do_sample, temperature, top_k, top_p, vocab_limit)
    max_new_tokens = whole_number(max_new_tokens, "max_new_tokens")
    n_loops = model.default_n_loops if n_loops is None else check_loops(n_loops)
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None (automatic), got {compile!r}")
    exit_rule = as_exit_rule(exit_rule)
    check_depth_sharing(depth_sharing)  # before any work (with max_new_tokens=0 too)
    asked_exit = act_early_exit = check_flag(act_early_exit, "act_early_exit")
    act_early_exit = _check_stream_args(model, input_ids, max_new_tokens, attention_mask,
                                        act_early_exit, compile, exit_rule)
    stop, pad_token_id = _check_decode_args(model, input_ids, eos_token_id, pad_token_id,
                                            generator, cache_dtype)
    if max_new_tokens == 0:
        return
    # The shape key of the automatic policy; None when the steps are not its to count.
    key: ShapeKey | None = None
    auto = compile is None
    if auto:
        if exit_rule is None and asked_exit is not True and depth_sharing == "per_depth":
            key = shape_key(model, input_ids, max_new_tokens, n_loops, cache_dtype)
        compile = key is not None and auto_compile.should_compile(model, key)
        if compile:
            act_early_exit = False
    elif compile:
        key = shape_key(model, input_ids, max_new_tokens, n_loops, cache_dtype)
    with _inference(model):
        cache = KVCache(_cache_len(model, input_ids, max_new_tokens, compile), dtype=cache_dtype,
                        depth_sharing=depth_sharing)
        logits, decoder = _prefill(model, input_ids, cache, n_loops, attention_mask, compile,
                                   act_early_exit=act_early_exit, exit_rule=exit_rule)
    if key is not None:
        decoder = _Tracked(decoder, model, key, auto=auto)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        tok = select_next(logits, params, generator)
        if stop is not None:
            tok = tok.masked_fill(finished, pad_token_id)
            finished = finished | torch.isin(tok, stop)
        yield tok
        if step == max_new_tokens - 1 or (stop is not None and bool(finished.all())):
            return
        with _inference(model):
            logits = decoder.step(tok)


def check_no_padding_rows(attention_mask: torch.Tensor) -> None:
    """Refuse prompt rows that are padding alone (``attention_mask`` (B, T), 0 = padding):
    nothing to condition their tokens on.

    Raises:
        ValueError: naming the rows.
    """
    empty = (attention_mask == 0).all(-1)
    if bool(empty.any()):
        raise ValueError(f"prompt(s) {empty.nonzero().flatten().tolist()} are all padding: "
                         "every prompt needs at least one token (encode with add_bos=True, "
                         "or start from BOS)")


def _check_stream_args(model: OpenMythos, input_ids: torch.Tensor, max_new_tokens: int,
                       attention_mask: torch.Tensor | None, act_early_exit: bool | None,
                       compile: bool, exit_rule: ExitRule | None = None) -> bool:
    """Validate :func:`stream`'s arguments (``max_new_tokens`` already checked by
    :func:`~open_mythos.config.whole_number`); returns the effective ``act_early_exit``."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a (batch, seq) tensor of token ids, got "
                        f"{type(input_ids).__name__} (torch.tensor([ids]) makes one)")
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, seq) tensor")
    T0 = input_ids.shape[1]
    total = T0 + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={model.cfg.max_seq_len}"
        )
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        from ..model import check_mask_values  # (the model module imports this package)

        check_mask_values(attention_mask)  # before it is cast: 0.5 became padding silently
    if attention_mask is not None and T0:
        check_no_padding_rows(attention_mask)
    if attention_mask is not None and T0 and not bool((attention_mask[:, -1] == 1).all()):
        raise ValueError(
            "attention_mask must be 1 at the last prompt position of every row: pad prompts "
            "on the left (with right padding the first new token would follow a pad)"
        )
    if exit_rule is not None and compile:
        raise ValueError("compile=True runs every loop in one fixed graph; exit rules need "
                         "compile=False")
    if act_early_exit is None:
        return not compile
    if act_early_exit and compile:
        raise ValueError(
            "compile=True runs every loop in one fixed graph; it cannot skip loops, so pass "
            "act_early_exit=False (or compile=False to keep ACT early exit)"
        )
    return act_early_exit


def shape_key(model: OpenMythos, input_ids: torch.Tensor, max_new_tokens: int, n_loops: int,
               cache_dtype: torch.dtype | None) -> ShapeKey:
    """What a compiled decode graph of ``model`` is specialised on for this call."""
    param = next(model.parameters())
    bucket = cache_length(input_ids.shape[1] + max_new_tokens, model.cfg.max_seq_len)
    threshold = getattr(model.cfg, "act_threshold", None)
    return (param.device.type, input_ids.shape[0], bucket, n_loops,
            cache_dtype or param.dtype, param.dtype,
            None if threshold is None else float(threshold))


class _Tracked:
    """A decoder whose steps feed the automatic compile policy: an eager decoder's steps
    count towards compiling; a compiled decoder's first step reports its compilation time,
    and, when compiling was the policy's choice (``auto``), is announced in the log, and
    if it fails, warns and continues eagerly on the same cache."""

    def __init__(self, decoder: Decoder, model: OpenMythos, key: ShapeKey, auto: bool):
        self.decoder, self.model, self.key, self.auto = decoder, model, key, auto
        self.compiled = isinstance(decoder, CompiledDecoder)
        self.first = True

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            start = time.perf_counter()
            logits = self.decoder.step(tok)
            auto_compile.add_eager(self.model, self.key, time.perf_counter() - start)
            return logits
        if not self.first:
            return self.decoder.step(tok)
        self.first = False
        new = not auto_compile.has_compiled(self.model, self.key)
        if new and self.auto:
            auto_compile.compiling(self.model, self.key)
        counts = compile_counts()
        start = time.perf_counter()
        # A shape the policy believes compiled runs its graph or nothing: a model changed
        # in a way the key does not hold would otherwise recompile unannounced. (Not from
        # a worker thread: the stance is process-wide, see static.may_set_stance.)
        reuse_only = self.auto and not new and may_set_stance()
        try:
            with stance("fail_on_recompile") if reuse_only else contextlib.nullcontext():
                logits = self.decoder.step(tok)
        except Exception as err:
            if not self.auto:
                raise
            if reuse_only and refused_recompile(err):
                auto_compile.changed(self.model, self.key, err)
            else:
                auto_compile.failed(self.model, self.key, err)
            self.decoder, self.compiled = _eager_continuation(self.decoder), False
            return self.step(tok)
        auto_compile.compiled(self.model, self.key, time.perf_counter() - start if new else None,
                              from_scratch=built_from_scratch(counts, compile_counts()))
        return logits


def _eager_continuation(decoder: CompiledDecoder) -> EagerDecoder:
    """Eager steps that continue ``decoder``'s generation on its cache."""
    pos, cache = decoder.pos, decoder.cache
    mask = decoder.key_mask[:, :pos].long() if decoder.padded else None
    return EagerDecoder(decoder.model, cache, decoder.n_loops, pos, cache.max_len, mask,
                        act_early_exit=False)


def _cache_len(model: OpenMythos, input_ids: torch.Tensor, max_new_tokens: int,
               compile: bool) -> int:
    """Positions the generation's cache holds (a compiled step wants a fixed bucket)."""
    total = input_ids.shape[1] + max_new_tokens
    return cache_length(total, model.cfg.max_seq_len) if compile else total


def last_positions(input_ids: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The flat indices of each row's last ``k`` positions in a (B, T) batch, (B * k,) long
    in row-major order: the ``logits_at`` of a prefill, which needs the next token's logits
    only (left-padded batches end every row at ``T - 1``)."""
    B, T = input_ids.shape
    cols = torch.arange(T - k, T, device=input_ids.device)
    return (torch.arange(B, device=input_ids.device).view(B, 1) * T + cols).flatten()


def _prefill(model: OpenMythos, input_ids: torch.Tensor, cache: KVCache, n_loops: int,
             attention_mask: torch.Tensor | None, compile: bool,
             **options: Any) -> tuple[torch.Tensor, Decoder]:
    """Run the prompt into ``cache`` (sized for the whole generation); returns the last
    position's logits and the decoder of the following steps. ``options``: the model's
    keyword options (``act_early_exit``, ``exit_rule``)."""
    T0 = input_ids.shape[1]
    mask = None if attention_mask is None else attention_mask.long()
    # The last position's logits only: the head and the last Coda block skip the rest.
    with eager_modules():
        logits = model(input_ids, n_loops, cache, 0, attention_mask=mask,
                       logits_at=last_positions(input_ids), **options)
    decoder: Decoder = (
        CompiledDecoder(model, cache, n_loops, T0, attention_mask) if compile
        else EagerDecoder(model, cache, n_loops, T0, cache.max_len, mask, **options))
    return logits, decoder


class Decoder(Protocol):
    """One decode step over a prefilled cache: the last tokens (B,) -> next logits (B, V)."""

    def step(self, tok: torch.Tensor) -> torch.Tensor: ...


class EagerDecoder:
    """Decode steps through the model's ordinary forward, one position at a time.

    Args:
        model: the model (eval mode, no gradients: the caller's job).
        cache: the cache the prompt was prefilled into.
        n_loops: loops per step.
        prompt_len: positions already cached (the prompt, padding included).
        total: the most positions the cache will hold.
        attention_mask: optional (B, prompt_len) 1/0 mask of real prompt tokens.
        options: the model's keyword options for every step (``act_early_exit``,
            ``exit_rule``).
    """

    def __init__(self, model: OpenMythos, cache: KVCache, n_loops: int, prompt_len: int,
                 total: int, attention_mask: torch.Tensor | None, **options: Any):
        self.model, self.cache, self.n_loops = model, cache, n_loops
        self.pos, self.options = prompt_len, options
        self.mask = None
        if attention_mask is not None:
            B = attention_mask.shape[0]
            # Generated tokens are always attended to.
            self.mask = torch.ones(B, total, dtype=torch.long, device=attention_mask.device)
            self.mask[:, :prompt_len] = attention_mask

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        pos = self.pos
        mask = None if self.mask is None else self.mask[:, : pos + 1]
        with eager_modules():
            logits = self.model(tok.unsqueeze(1), self.n_loops, self.cache, pos,
                                attention_mask=mask, **self.options)[:, -1]
        self.pos += 1
        return logits


@contextlib.contextmanager
def _inference(model: OpenMythos) -> Iterator[None]:
    """Eval mode and no autograd for one forward, both restored afterwards.

    Scoped to each forward rather than held across ``yield``: a suspended generator must
    not leave the caller's code (or another stream consumed in turn) without gradients or
    with the model in the wrong mode.
    """
    with evaluating(model), torch.no_grad():
        yield


#: The keyword options of :func:`stream` (and so of :func:`generate`).
_STREAM_KEYWORDS = frozenset(name for name, p in inspect.signature(stream).parameters.items()
                             if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_keywords(function: str, given: dict, known: Iterable[str]) -> None:
    """``TypeError`` naming ``function`` (not the one it passes its keywords on to) for a
    keyword it does not take, with the nearest known name."""
    known = sorted(known)
    for name in given:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; it takes {', '.join(known)}"
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")


def generate(model: OpenMythos, input_ids: torch.Tensor, max_new_tokens: int = 64,
             n_loops: int | None = 8, **kwargs) -> torch.Tensor:
    """Prompts followed by their generated tokens, (B, T + new) long.

    Stops early once every sequence has produced a stop token. Keyword arguments are those
    of :func:`stream`.
    """
    check_keywords("generate", kwargs, _STREAM_KEYWORDS)
    new = list(stream(model, input_ids, max_new_tokens, n_loops, **kwargs))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
