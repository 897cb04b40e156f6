"""What a scheduler is given and what it answers: the server's limits, a :class:`Job`
(one request's prompts and options) and the events its ``emit`` callback receives."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..integrations.textgen import GenerationOptions


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts; requests beyond a limit are refused (HTTP 400/429).

    Attributes:
        max_n_loops: most recurrent loops a request may ask for (None: twice the model's
            ``max_loop_iters``, room for depth extrapolation; see :meth:`n_loops_cap`).
        max_tokens: most tokens one sequence may generate (the context bounds it too).
        max_choices: most choices (``n``) per request.
        max_batch: most sequences decoding at once; also the most one request may start
            (prompts times ``n``).
        max_queue: most requests waiting to start; one more is answered 429.
        prefill_chunk: most prompt tokens prefilled between two decode steps.
        request_timeout: seconds from arrival after which a request is ended (504).
        max_logprobs: most ``logprobs`` / ``top_logprobs`` alternatives per token.
        max_request_bytes: largest request body; a larger one is answered 413, by its
            ``Content-Length`` before anything is read, or once that many bytes arrived.
        read_timeout: seconds a client may take to send a whole request (headers and body)
            once it connects or starts the next one on a kept-alive connection; a slower
            one is disconnected (a client trickling bytes would otherwise hold its
            connection, and file descriptor, for ever). Also the longest the server's
            writes wait for a client that reads nothing of its response (its buffers
            full): the connection is then reset and the request cancelled.
    """

    max_n_loops: int | None = None
    max_tokens: int = 1024
    max_choices: int = 16
    max_batch: int = 32
    max_queue: int = 64
    prefill_chunk: int = 128
    request_timeout: float = 300.0
    max_logprobs: int = 20
    max_request_bytes: int = 8 * 2**20
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_n_loops", "max_tokens", "max_choices", "max_batch", "max_queue",
                     "prefill_chunk", "max_logprobs", "max_request_bytes"):
            value = getattr(self, name)
            if value is None and name == "max_n_loops":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("request_timeout", "read_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and value > 0):
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")

    def n_loops_cap(self, max_loop_iters: int) -> int:
        """The most loops a request may ask of a model trained with ``max_loop_iters``."""
        return self.max_n_loops if self.max_n_loops is not None else 2 * max_loop_iters


class QueueFull(Exception):
    """The scheduler's queue is full; try again later."""


class SchedulerStopped(Exception):
    """The scheduler is shutting down and takes no more requests."""


_BYTES_TOKEN = re.compile(r"bytes:((?:\\x[0-9a-f]{2})+)")


def shown_token(raw: bytes) -> str:
    """How logprobs show a token of bytes ``raw``: its text, or, when they are not whole
    UTF-8 characters (part of a multi-byte one), OpenAI's ``bytes:\\xNN\\xNN...``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_bytes(token: str) -> list[int]:
    """The bytes of a token as logprobs show it: the raw bytes of a ``bytes:\\xNN`` token,
    the UTF-8 encoding of any other."""
    match = _BYTES_TOKEN.fullmatch(token)
    if match is None:
        return list(token.encode())
    return list(bytes.fromhex(match.group(1).replace("\\x", "")))


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability (None for a prompt's first token) and the
    ``top`` most likely alternatives.

    ``offset`` counts the characters of text before the token: in the prompt's text for a
    prompt token, in the completion's for a generated one. A token that ends inside a
    multi-byte character (a byte of the byte tokenizer) adds no character; the next one
    starts where that character does.
    """

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[int, str, float], ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class SeqDelta:
    """New text of sequence ``index`` (prompt-major: prompt ``index // n``, choice
    ``index % n``); ``logprobs`` covers the tokens generated since the previous delta.
    The last delta of a sequence has ``finish_reason`` and ``n_tokens`` set."""

    index: int
    text: str
    finish_reason: str | None = None
    n_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens of sequence ``index`` with their logprobs (the first has none)."""

    index: int
    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class JobFailed:
    status: int
    message: str
    type: str = "server_error"


@dataclass(frozen=True)
class JobDone:
    pass


Event = SeqDelta | PromptLogprobs | JobFailed | JobDone


@dataclass(eq=False)
class Job:
    """One request: its prompts (token ids), ``n`` choices each, and options.

    Attributes:
        logprobs: alternatives per generated token to report (None: no logprobs; 0: the
            chosen token's only).
        echo_logprobs: also report the prompt's logprobs (:class:`PromptLogprobs`).
        emit: called on the scheduler thread with each event; must not block.
    """

    prompts: list[list[int]]
    options: GenerationOptions
    emit: Callable[[Event], None]
    n: int = 1
    logprobs: int | None = None
    echo_logprobs: bool = False
    timeout: float = 300.0
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished_rows: int = 0

    @property
    def n_rows(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """Stop this job at the scheduler's next turn (safe from any thread)."""
        self.cancelled = True
