"""Text in, text out: batched streaming generation with stop strings.

Shared by ``openmythos generate`` and the completions server. Tokens come from
:func:`open_mythos.inference.stream`; this module turns them into text deltas that are
safe to show as they arrive:

* an incomplete UTF-8 sequence (a byte-level tokenizer emits characters byte by byte) is
  held back until its character is complete;
* text that could be the start of a stop string is held back until it is known not to be
  one; a completed stop string ends that sequence and is not emitted.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..config import check_loops, whole_number
from ..inference.cache import check_depth_sharing
from ..inference.generation import stream
from ..inference.sampling import SamplingParams
from ..inference.speculative import check_draft_lens, speculative_stream
from ..layers.recurrence import ExitRule
from ..model import CausalLM, OpenMythos
from ..registry import is_looped
from ..tokenizers import Tokenizer, pad_rows

#: The chat template of a tokenizer without one: one ``Role: content`` line per message,
#: then ``Assistant:`` for the reply; generation also stops at :data:`PLAIN_CHAT_STOP`.
PLAIN_CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant",
                    "developer": "System", "tool": "Tool"}
PLAIN_CHAT_STOP = "\nUser:"
#: The plain template as a Jinja chat template (what ``/tokenizer_info`` gives a client that
#: renders conversations itself, lm-eval's remote tokenizer): the text :func:`chat_prompt`
#: writes, without its stop string.
PLAIN_CHAT_TEMPLATE = (
    "{%- set roles = " + repr(PLAIN_CHAT_ROLES) + " -%}"
    "{%- for m in messages -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ roles[m['role']] }}: {{ m['content'] }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages -%}{{ '\\n' }}{%- endif -%}"
    "Assistant:{%- endif -%}")

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character has at most 4 bytes, so at most 3 trailing tokens can be incomplete.
MAX_PENDING_TOKENS = 3
#: Prompt tokens decoded in front of the first generated token (see TextSequence).
CONTEXT_TOKENS = 4


class FinishReason:
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached


def chat_template_of(tokenizer: Tokenizer) -> str | None:
    """The chat template of a Hugging Face tokenizer that has one, else None (the plain
    template of :func:`chat_prompt` applies)."""
    template = getattr(getattr(tokenizer, "tokenizer", None), "chat_template", None)
    return template or None


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool = True) -> tuple[str, tuple[str, ...]]:
    """The prompt text of a conversation (``[{"role": ..., "content": ...}, ...]``) and the
    stop strings its template implies: the tokenizer's own chat template (Hugging Face
    tokenizers that have one), else one ``Role: content`` line per message
    (:data:`PLAIN_CHAT_ROLES`), then ``Assistant:`` when ``add_generation_prompt``.

    Raises:
        ValueError: a role the plain template does not know.
    """
    if chat_template_of(tokenizer) is not None:
        text = tokenizer.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        return text, ()
    unknown = sorted({m["role"] for m in messages} - set(PLAIN_CHAT_ROLES))
    if unknown:
        raise ValueError(f"chat role(s) {unknown} are not among {sorted(PLAIN_CHAT_ROLES)}")
    lines = [f"{PLAIN_CHAT_ROLES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines), (PLAIN_CHAT_STOP,)


@dataclass(frozen=True)
class TextDelta:
    """New text of sequence ``index``.

    On its last delta, ``finish_reason`` is set and ``n_tokens`` counts the tokens it
    generated (an end-of-sequence token included).
    """

    index: int
    text: str
    finish_reason: str | None = None
    n_tokens: int = 0


class TextSequence:
    """Decoding state of one generated sequence: its tokens, its text so far, how much of
    that text was shown, and why it ended (``finish_reason``, None while it runs).

    The text is that of the generated tokens (special tokens spell none), as
    :meth:`~open_mythos.tokenizers.Tokenizer.decode_piece` decodes them after the prompt
    (no clean-up of spaces around punctuation, which would rewrite text already shown); what
    is shown never changes afterwards: the pieces add up to the final text.

    Under a decoder of bytes (:attr:`~open_mythos.tokenizers.Tokenizer.decodes_bytes`: the
    byte tokenizer, GPT-2's byte level) the tokens' bytes are decoded as they come, and an
    unfinished character is held back until its bytes are complete or shown invalid: the text
    is that of the generated ids decoded alone. Other decoders decode a short window of
    tokens that starts a token or more before the first token whose text is not yet
    complete, with up to :data:`CONTEXT_TOKENS` tokens of the prompt (``context``) in front
    of the first generated one; a window's text is what its decode adds to the decode of its
    first tokens. So a decoder that rewrites the start of a text (SentencePiece's dropped
    leading space) sees the generated text as the continuation it is, and a long generation
    costs a constant amount of decoding per token. A byte-fallback decoder's run of byte
    tokens is held back until a token of another kind ends it (one invalid byte turns the
    whole run into U+FFFDs); generated byte tokens that would join an invalid run the
    prompt ends with start a run of their own.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of ``text`` already returned
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.decoded = ""  # the decode of ``ids``, an incomplete trailing character included
        #: Characters of text before the last token added: where its text starts (a token
        #: ending inside a multi-byte character starts where that character does).
        self.last_offset = 0
        # The window ``_tokens``: the text of the generated tokens before it and of those
        # in it before ``_read`` is ``_head`` (whole characters); ``_prefix``, the decode of
        # ``_tokens[:_read]``, is what the decode of the whole window starts with.
        self._bytes = tokenizer.decodes_bytes
        self._fallback = tokenizer.replaces_each_byte
        # A decoder of bytes has no rule for a text's start: the generated ids alone.
        context = [] if self._bytes else [int(t) for t in context]
        n = min(CONTEXT_TOKENS, len(context))
        if self._fallback:  # back to a token before the run of byte tokens it ends with
            run = len(context)
            while run and self._in_run(context[run - 1]):
                run -= 1
            n = max(n, min(len(context), len(context) - run + 1))
        # Start at a token that starts a character (a byte-fallback decoder shows a run of
        # byte tokens that starts inside one as U+FFFDs), and further back where the tokens
        # spell no text (see _stable_text).
        while n < len(context) and _continues_a_character(tokenizer.token_bytes(context[-n])):
            n += 1
        while not (prefix := tokenizer.decode_piece(context[-n:])) and n < len(context):
            n = min(2 * n, len(context))
        self._tokens = context[len(context) - n:]
        if prefix.endswith(REPLACEMENT_CHAR) and not self._fallback:
            # A prompt ending inside a character (a byte-fallback decoder's runs are told
            # apart in push and _window_text).
            self._tokens, prefix = [], ""
        self._read, self._prefix = len(self._tokens), prefix
        # Whether the first generated token that is not a special one is still to come.
        self._first = True
        # Whether ``decoded`` read a run of byte tokens not yet ended as Python's UTF-8
        # decoding does (one U+FFFD per unfinished character), not as its decoder will.
        self._provisional = False
        self._head = ""
        # The generated tokens' bytes, decoded as they come: which character each is in.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int, eos_token_id: int | None) -> str:
        """Add one generated token (the end-of-sequence token finishes the sequence);
        return the text that may be shown now."""
        if eos_token_id is not None and token == eos_token_id:
            self.n_tokens += 1
            delta = self.finish(FinishReason.STOP)
            self.last_offset = len(self.decoded)  # after all the text, as finally decoded
            return delta
        return self.push(token)

    def push(self, token: int) -> str:
        """Add one generated token; return the text that may be shown now."""
        token = int(token)
        self.ids.append(token)
        self.n_tokens += 1
        unfinished = bool(self._utf8.getstate()[0])
        new = self._utf8.decode(self.tokenizer.piece_bytes(token))
        if self._bytes:
            self._head += new
            full = self._head + (REPLACEMENT_CHAR if self._utf8.getstate()[0] else "")
        else:
            if self._fallback and self._first and not self._in_run(token):
                self._first = False
            elif self._fallback and self._first and self.tokenizer.is_fallback_byte(token):
                # Byte tokens after a prompt ending in a run of byte tokens that is not
                # valid text would join it and be all U+FFFDs too: they start their own.
                self._first = False
                if self._prefix.endswith(REPLACEMENT_CHAR):
                    self._detach_run()
            self._tokens.append(token)
            full = self._head + self._window_text(len(self._tokens))
        before = self.decoded
        run = self._open_run()
        if run is None and self._provisional:
            # This token ended a run read provisionally: the text before it as decoded.
            before = self._head + self._window_text(len(self._tokens) - 1)
        self._provisional = run is not None
        settled = None  # the text before a run still open: final
        if run is not None:
            # A byte-fallback decoder shows a run not yet ended as a U+FFFD per byte until
            # it is valid: offsets in it are read from its bytes, as a run that ends valid.
            settled = self._head + self._window_text(run)
            tail = b"".join(self.tokenizer.piece_bytes(t) for t in self._tokens[run:])
            full = settled + tail.decode("utf-8", errors="replace")
        # Where this token's text starts. One whose bytes all continue a character still
        # unfinished (read from the tokens' bytes) is inside it, at that character's U+FFFD
        # at the end. Otherwise it is what the decodes with and without the token share: a
        # trailing U+FFFD that the token completes is not counted, one it leaves (an
        # invalid byte) is.
        if not new and unfinished:
            shared = len(full) - self._unfinished_chars(full)
        else:
            shared = _common_prefix_len(before, full)
            if shared == len(full) and full.endswith(REPLACEMENT_CHAR):
                shared -= 1
        self.last_offset = shared
        self.decoded = full
        if self._set_text(settled if settled is not None else self._stable_text(full)):
            return self._take(len(self.text))
        return self._take(len(self.text) - _stop_prefix_len(self.text, self.stops))

    def _window_text(self, end: int) -> str:
        """The text of the window's tokens from ``_read`` to ``end``."""
        text = self.tokenizer.decode_piece(self._tokens[:end])
        if not text.startswith(self._prefix) and self._fallback:
            # Generated byte tokens joined a run of byte tokens that the prompt's context
            # ends with, and made it invalid (all U+FFFDs): they start a run of their own.
            end -= self._detach_run()
            text = self.tokenizer.decode_piece(self._tokens[:end])
        return text[len(self._prefix):]

    def _detach_run(self) -> int:
        """Take the run of byte tokens that the window's read tokens end with out of the
        window (a byte-fallback decoder would decode later byte tokens with it); return how
        many tokens went."""
        cut = self._read
        while cut and self._in_run(self._tokens[cut - 1]):
            cut -= 1
        del self._tokens[cut:self._read]
        gone, self._read = self._read - cut, cut
        self._prefix = self.tokenizer.decode_piece(self._tokens[:cut])
        return gone

    def _open_run(self) -> int | None:
        """Under a byte-fallback decoder, where in the window a run of byte tokens that no
        token of another kind has ended yet starts; else None."""
        if not self._fallback:
            return None
        run = len(self._tokens)
        while run > self._read and self._in_run(self._tokens[run - 1]):
            run -= 1
        if any(self.tokenizer.is_fallback_byte(t) for t in self._tokens[run:]):
            return run
        return None

    def _in_run(self, token: int) -> bool:
        """Whether a byte-fallback decoder's run of byte tokens goes on through ``token``: a
        byte token, or a special one (dropped before decoding)."""
        return self.tokenizer.is_fallback_byte(token) or not self.tokenizer.piece_bytes(token)

    def _stable_text(self, full: str) -> str:
        """The part of ``full`` (the text of ``ids``) that no later token can change.

        A text ending in U+FFFD may end with a character whose remaining bytes are still to
        come: the text without the last 1, 2 or 3 tokens (a character has at most 4 bytes)
        is tried until one does not end so. If each does, either the tokens' bytes leave a
        character unfinished (tokens that each carry the next character's first bytes),
        whose U+FFFD alone is held back, or the shortest text's U+FFFD is an invalid byte,
        final. A window whose whole text is final moves on past it. Under a decoder of bytes
        the text without its unfinished character; under a byte-fallback decoder with no run
        of byte tokens still open (:meth:`push` holds such a run back), all of it.
        """
        if self._bytes:
            return self._head
        if self._fallback or not full.endswith(REPLACEMENT_CHAR):
            self._head = full
            # The window starts at the new tokens if they spell some text alone, else where
            # it was, without them (special tokens, a lone SentencePiece "▁": what they add
            # is in the text already): a decoder that treats a text's start apart (drops its
            # leading space) must meet that start inside the window's first tokens, and a
            # run of such tokens must not grow the window.
            prefix = self.tokenizer.decode_piece(self._tokens[self._read:])
            if prefix:
                del self._tokens[:self._read]
                self._prefix = prefix
            elif self._fallback and any(map(self.tokenizer.piece_bytes,
                                            self._tokens[self._read:])):
                # A token of another kind (a lone "▁") ends a run of byte tokens before
                # it: it stays, so that byte tokens after it start a run of their own.
                self._prefix = self.tokenizer.decode_piece(self._tokens)
            else:
                del self._tokens[self._read:]
            self._read = len(self._tokens)
            return full
        end, text = len(self._tokens), full
        for _ in range(MAX_PENDING_TOKENS):
            if end <= self._read:
                return self._head
            end -= 1
            text = self._head + self._window_text(end)
            if not text.endswith(REPLACEMENT_CHAR):
                return text
        # Each shorter text ends inside a character too (byte-level tokens that each carry
        # the first bytes of the next character): hold back only the unfinished one, from
        # the tokens' bytes; with no bytes pending the shortest text's U+FFFD is final.
        held = self._unfinished_chars(full)
        return full[:len(full) - held] if held else text

    def _unfinished_chars(self, full: str) -> int:
        """1 when ``full`` ends in the U+FFFD of a character whose bytes the generated
        tokens' bytes leave pending, else 0."""
        return int(bool(self._utf8.getstate()[0]) and full.endswith(REPLACEMENT_CHAR))

    def finish(self, reason: str) -> str:
        """End the sequence (EOS or length); return everything not yet shown."""
        if self.finish_reason is None:
            if self._bytes:
                self._head += self._utf8.decode(b"", final=True)
            self.decoded = self._head + self._window_text(len(self._tokens))
            self._set_text(self.decoded)
            self.finish_reason = self.finish_reason or reason
        return self._take(len(self.text))

    def _set_text(self, decoded: str) -> bool:
        """Update the text; True (and finished) if it now contains a stop string."""
        # Text that could start a stop string is never emitted, so a match starts at or
        # after ``emitted``.
        hits = [p for p in (decoded.find(s, self.emitted) for s in self.stops) if p >= 0]
        self.text = decoded[: min(hits)] if hits else decoded
        if hits:
            self.finish_reason = FinishReason.STOP
        return bool(hits)

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


def _continues_a_character(piece: bytes) -> bool:
    """Whether a token's bytes start inside a UTF-8 character (a continuation byte)."""
    return bool(piece) and piece[0] & 0xC0 == 0x80


def _common_prefix_len(a: str, b: str) -> int:
    # ``startswith`` answers the usual case (b extends a) at C speed.
    return len(a) if b.startswith(a) else len(os.path.commonprefix([a, b]))


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling and stopping options of one request.

    ``do_sample``, ``temperature``, ``top_k`` and ``top_p`` are those of
    :class:`~open_mythos.inference.sampling.SamplingParams`; ``n_loops`` None means
    ``cfg.max_loop_iters``; ``stop`` strings end a sequence and are not part of its text;
    ``seed`` makes sampling reproducible; ``compile`` is :func:`~open_mythos.inference.stream`'s
    (None: compiled once this process has decoded long enough at the shape to repay it);
    ``act_early_exit`` None means on unless the steps are compiled (a compiled decode step
    runs every loop, see :mod:`open_mythos.inference.static`); ``exit_rule`` stops each position's loops once
    it fires (:class:`~open_mythos.layers.recurrence.ExitRule`); ``depth_sharing`` is the
    KV cache's (:class:`~open_mythos.inference.cache.KVCache`); ``draft_tokens`` > 0
    decodes self-speculatively, drafting that many tokens per cycle with ``draft_loops``
    loops read out through ``draft_lens`` (:mod:`open_mythos.inference.speculative`).
    """

    max_new_tokens: int = 64
    n_loops: int | None = None
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    act_early_exit: bool | None = None
    compile: bool | None = None
    exit_rule: ExitRule | None = None
    depth_sharing: str = "per_depth"
    draft_tokens: int = 0
    draft_loops: int = 1
    draft_lens: str = "coda"


def vocab_bound(model: CausalLM, tokenizer: Tokenizer) -> int:
    """The ids text generation may use, ``[0, bound)``: those both the model's embedding
    and the tokenizer have, so that a model whose embedding has more rows (a vocabulary
    padded for speed) never samples, lists or accepts an id the tokenizer cannot decode."""
    return min(model.cfg.vocab_size, tokenizer.vocab_size)


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt (strings are encoded; id lists pass through). An empty
    prompt becomes the token a training text starts after (``Tokenizer.start_token_id``:
    EOS for a text run, BOS for a task run), since the model needs at least one token.

    Raises:
        ValueError: a prompt with text other than whitespace that encodes to no tokens (a
            tokenizer without an unknown token drops characters it has no token for: the
            model would see an empty prompt).
    """
    out = []
    for p in prompts:
        ids = tokenizer.encode(p) if isinstance(p, str) else [int(i) for i in p]
        if isinstance(p, str):
            check_encoded(p, ids, f"the prompt {p[:40]!r}")
        if not ids:
            start = tokenizer.start_token_id
            if start is None:
                raise ValueError("empty prompt and the tokenizer has no BOS/EOS token to start from")
            ids = [start]
        out.append(ids)
    return out


def check_encoded(text: str, ids: Sequence[int], name: str) -> None:
    """ValueError when ``text``, not blank, encoded to no ``ids`` (a tokenizer without an
    unknown token drops characters it has no token for); ``name`` names it."""
    if not ids and text.strip():
        raise ValueError(f"{name} encodes to no tokens: the tokenizer has no token for its "
                         "characters")


def lossy_readback(tokenizer: Tokenizer, prompt: str, ids: Sequence[int]) -> str | None:
    """What the model reads of ``prompt`` (its ``ids`` decoded) when characters of the
    prompt other than whitespace and letter case are not in it, else None: a tokenizer
    without an unknown token drops characters it has no token for (whitespace and case,
    which many tokenizers normalise or decode otherwise, are not compared; nor is what a
    Hugging Face tokenizer's own normaliser changes by design, such as BERT's accents)."""
    def visible(text: str) -> str:
        return "".join(text.split()).casefold()

    if not prompt.strip():
        return None
    back = tokenizer.decode(ids, skip_special_tokens=True)
    if visible(back) == visible(prompt):
        return None
    backend = getattr(getattr(tokenizer, "tokenizer", None), "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is not None and visible(back) == visible(normalizer.normalize_str(prompt)):
        return None
    return back


def validate(model: OpenMythos, prompts: Sequence[Sequence[int]], options: GenerationOptions) -> None:
    """Raise ``ValueError`` now for a request that :func:`stream_text` would reject later
    (so a server can answer 400 before it starts streaming)."""
    SamplingParams(options.do_sample, options.temperature, options.top_k, options.top_p)
    if not prompts:
        raise ValueError("no prompt given")
    if isinstance(prompts, str) or any(
            isinstance(p, str) or not all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in p) for p in prompts):
        raise ValueError("prompts must be lists of token ids (encode text with the "
                         "tokenizer first: [tokenizer.encode(text)])")
    whole_number(options.max_new_tokens, "max_new_tokens")
    check_loops(options.n_loops, allow_none=True)
    check_depth_sharing(options.depth_sharing)
    if not is_looped(model):  # these were errors only once the prompt was echoed
        extras = [name for name, on in (("an exit rule", options.exit_rule is not None),
                                        ("draft tokens", bool(options.draft_tokens)),
                                        ("depth sharing", options.depth_sharing != "per_depth"))
                  if on]
        if extras:
            raise ValueError(f"only a looped model takes {' or '.join(extras)}: this one is "
                             "a fixed-depth baseline")
    vocab, limit = model.cfg.vocab_size, model.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    if options.draft_tokens:
        whole_number(options.draft_tokens, "draft_tokens")
        check_loops(options.draft_loops, name="draft_loops")
        check_draft_lens(options.draft_lens)
        extras = [name for name, on in (("compile", options.compile),
                                        ("exit_rule", options.exit_rule is not None),
                                        ("depth_sharing", options.depth_sharing != "per_depth"),
                                        ("act_early_exit", options.act_early_exit))
                  if on]
        if extras:
            raise ValueError(f"self-speculative decoding does not take {', '.join(extras)} "
                             "(the verification runs all n_loops loops)")
    if options.compile and options.exit_rule is not None:  # stream's own check, up front
        raise ValueError("compile=True runs every loop in one fixed graph; exit rules need "
                         "compile=False")
    if options.compile and options.depth_sharing != "per_depth":  # likewise
        raise ValueError("the compiled decode step needs a per-depth cache "
                         f"(depth_sharing={options.depth_sharing!r}): use compile=False")
    n_loops = options.n_loops if options.n_loops is not None else model.default_n_loops
    if options.draft_tokens and options.draft_loops > n_loops:  # speculative_stream's check
        raise ValueError(f"draft_loops={options.draft_loops} is above n_loops={n_loops}: a "
                         "draft runs at most the loops of the verification that checks it")
    longest = max(len(p) for p in prompts)
    if longest + options.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the "
            f"model's context of {limit} tokens")


def stream_text(
    model: OpenMythos,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
) -> Iterator[TextDelta]:
    """Generate for a batch of tokenized prompts, yielding text as it becomes final.

    Every sequence ends with exactly one delta whose ``finish_reason`` is set (its text may
    be empty). Sequences stop on the tokenizer's EOS, on a stop string, or after
    ``options.max_new_tokens`` tokens. Prompts of different lengths are left-padded.

    Raises:
        ValueError: see :func:`validate`.
    """
    validate(model, prompts, options)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask = pad_rows(prompts, pad, side="left")
    padded = bool((mask == 0).any())
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    seqs = [TextSequence(tokenizer, options.stop, context=p) for p in prompts]
    eos = tokenizer.eos_token_id
    n_loops = options.n_loops if options.n_loops is not None else model.default_n_loops

    common = dict(do_sample=options.do_sample, temperature=options.temperature,
                  top_k=options.top_k, top_p=options.top_p, eos_token_id=eos, pad_token_id=pad,
                  attention_mask=mask.to(device) if padded else None, generator=generator,
                  vocab_limit=vocab_bound(model, tokenizer))
    if options.draft_tokens:
        tokens = speculative_stream(model, input_ids.to(device), options.max_new_tokens,
                                    n_loops, draft_loops=options.draft_loops,
                                    draft_tokens=options.draft_tokens,
                                    draft_lens=options.draft_lens, **common)
    else:
        tokens = stream(model, input_ids.to(device), options.max_new_tokens, n_loops,
                        act_early_exit=options.act_early_exit, compile=options.compile,
                        exit_rule=options.exit_rule, depth_sharing=options.depth_sharing,
                        **common)
    try:
        for step in tokens:
            for i, tok in enumerate(step.tolist()):
                seq = seqs[i]
                if seq.finish_reason is not None:
                    continue
                delta = seq.add(tok, eos)
                if seq.finish_reason is not None:
                    yield TextDelta(i, delta, seq.finish_reason, seq.n_tokens)
                elif delta:
                    yield TextDelta(i, delta)
            if all(s.finish_reason is not None for s in seqs):
                break
    finally:
        tokens.close()  # restores the model's train/eval mode even if the caller stops early
    for i, seq in enumerate(seqs):
        if seq.finish_reason is None:
            delta = seq.finish(FinishReason.LENGTH)
            yield TextDelta(i, delta, seq.finish_reason, seq.n_tokens)


@dataclass
class TextCompletion:
    """Result of :func:`complete` for one prompt."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def complete(model: OpenMythos, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
             options: GenerationOptions) -> list[TextCompletion]:
    """Non-streaming :func:`stream_text`: the whole completion of each prompt."""
    texts = [""] * len(prompts)
    done: dict[int, TextDelta] = {}
    for delta in stream_text(model, tokenizer, prompts, options):
        texts[delta.index] += delta.text
        if delta.finish_reason is not None:
            done[delta.index] = delta
    return [TextCompletion(texts[i], done[i].finish_reason, len(p), done[i].n_tokens)
            for i, p in enumerate(prompts)]
