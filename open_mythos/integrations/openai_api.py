"""The OpenAI wire format: request bodies (validated strictly), the chat template, and the
response bodies and stream chunks built from the scheduler's events.

Numbers are strict: ``"max_tokens": "5"`` and ``true`` are rejected (400), not coerced.
Caps that depend on the server (``n_loops``, ``max_tokens``, ``n``, ``logprobs``) are
checked by :mod:`open_mythos.integrations.server` against its :class:`ServeLimits`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from ..layers.recurrence import ExitRule
from ..serving.jobs import TokenLogprob, token_bytes
from ..tokenizers import Tokenizer
from .textgen import chat_prompt

MAX_STOP_STRINGS = 4

#: More unknown fields than this in one object are refused as one error, not one each.
MAX_UNKNOWN_FIELDS = 10

# Lists and maps stop validating at their first bad item (``fail_fast``): a million nulls in
# ``prompt`` made pydantic build three million errors, a minute of work that blocked every
# client, before the server could answer 400.
TokenIds = Annotated[list[int], Field(fail_fast=True)]
Texts = Annotated[list[str], Field(fail_fast=True)]
TokenIdLists = Annotated[list[TokenIds], Field(fail_fast=True)]


class StrictBody(BaseModel):
    """A request object: unknown fields are rejected, numbers are strict; a flood of
    unknown fields is one error."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + MAX_UNKNOWN_FIELDS:
            unknown = [k for k in data if k not in cls.model_fields]
            raise ValueError(f"{len(unknown)} unrecognized fields, e.g. "
                             + ", ".join(repr(k)[:40] for k in unknown[:3]))
        return data


class ExitRuleBody(StrictBody):
    """The ``exit_rule`` extension: a training-free per-position exit test
    (:class:`~open_mythos.layers.recurrence.ExitRule`; at least one criterion)."""

    kl: float | None = None
    entropy: float | None = None
    rel_change: float | None = None
    argmax_streak: int | None = None
    min_loops: int = 1

    def rule(self) -> ExitRule:
        """The rule; raises ``ValueError`` naming the bad field."""
        return ExitRule(**self.model_dump())


class StreamOptions(StrictBody):
    """``stream_options``: strict like every other field (``"include_usage": "false"`` was
    read as true)."""

    include_usage: bool | None = None


class SamplingFields(StrictBody):
    """Fields shared by both endpoints (unknown fields are rejected, numbers are strict)."""

    #: Fields OpenAI documents as nullable whose null means "the default" (clients and
    #: proxies send ``"temperature": null``).
    NULL_MEANS_DEFAULT: ClassVar[frozenset[str]] = frozenset({
        "temperature", "top_p", "n", "stream", "echo", "logprobs", "presence_penalty",
        "frequency_penalty"})

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Texts | None = None
    seed: int | None = None
    user: str | None = None
    # OpenMythos extensions.
    n_loops: int | None = Field(default=None, ge=1)
    top_k: int | None = Field(default=None, ge=0)
    exit_rule: ExitRuleBody | None = None
    # Accepted only at their neutral values.
    logit_bias: dict[str, float] | None = Field(default=None, fail_fast=True)
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (v is None and k in cls.NULL_MEANS_DEFAULT)}
        return data

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        return stop

    def unsupported(self) -> list[str]:
        """The fields set to a value this server does not implement (only their neutral
        values are accepted)."""
        return [k for k, bad in {"logit_bias": bool(self.logit_bias),
                                 "presence_penalty": self.presence_penalty != 0.0,
                                 "frequency_penalty": self.frequency_penalty != 0.0}.items() if bad]

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: str | Texts | TokenIds | TokenIdLists
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    # Accepted only at their neutral values.
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, prompt: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            prompt = handler(prompt)
        except ValidationError:  # one problem, not one per member of the union
            raise ValueError(_prompt_problem(prompt)) from None
        if isinstance(prompt, list) and (
                not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("must not be an empty list")
        return prompt

    def unsupported(self) -> list[str]:
        return super().unsupported() + [k for k, b in {
            "best_of": self.best_of not in (None, 1), "suffix": bool(self.suffix)}.items() if b]

    def prompt_list(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return list(p)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    for kind, name in ((bool, "a boolean"), (str, "a string"), (list, "an array"),
                       (dict, "an object"), (int, "an integer"),
                       (float, "a number with a decimal point")):
        if isinstance(value, kind):
            return name
    return "null"


def _prompt_problem(prompt: Any) -> str:
    """What is wrong with a ``prompt`` that is none of its four forms."""
    forms = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if not isinstance(prompt, list):
        return f"must be {forms}, not {json_type(prompt)}"
    token = lambda t: type(t) is int  # noqa: E731  (strict: not a bool, not 1.0)
    first = prompt[0]
    if isinstance(first, list):  # a list of token-id lists: name the first bad id
        for i, p in enumerate(prompt):
            if not isinstance(p, list):
                return f"item {i} is {json_type(p)}, where every item must be a list of " \
                       "token ids (as item 0)"
            j = next((j for j, t in enumerate(p) if not token(t)), None)
            if j is not None:
                return f"item {i}[{j}] is {json_type(p[j])}, not a token id (an integer)"
    want, ok = ("a string", lambda p: isinstance(p, str)) if isinstance(first, str) \
        else ("a token id (an integer)", token)
    i = next(i for i, p in enumerate(prompt) if not ok(p))
    return f"item {i} is {json_type(prompt[i])}, where every item must be {want}, as item 0 is" \
        if i else f"must be {forms}; item 0 is {json_type(first)}"


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(fail_fast=True)]
    name: str | None = None
    #: The call a tool message answers (OpenAI's conversations carry it on every tool
    #: message); a chat template may show it, the plain template does not.
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check_tool_call_id(self) -> ChatMessage:
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id belongs to a tool message, not a {self.role} one")
        return self

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        """The message as a chat template takes it (``name`` and ``tool_call_id`` when set)."""
        out = {"role": self.role, "content": self.text()}
        out.update({k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id))
                    if v is not None})
        return out


class ChatCompletionRequest(SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_limit(self) -> tuple[int | None, str]:
        """The reply's token limit and the field that set it (``max_completion_tokens``
        over the older ``max_tokens``)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: str
    # None: as the model's tokenizer does by default (BOS first for a task run's).
    add_special_tokens: bool | None = None
    model: str | None = None


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    tokens: TokenIds
    model: str | None = None


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage]) -> tuple[str, tuple[str, ...]]:
    """The prompt text of a conversation and the stop strings its template implies: the
    tokenizer's own chat template (Hugging Face tokenizers that have one), else the plain
    template (:data:`~open_mythos.integrations.textgen.PLAIN_CHAT_ROLES`)."""
    return chat_prompt(tokenizer, [m.as_dict() for m in messages])


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionLogprobs:
    """The ``logprobs`` object of one completions choice, built token by token.

    ``text_offset`` is each token's :attr:`TokenLogprob.offset` plus ``offset``: the
    characters of the choice's text before the text the tokens come from (the echoed
    prompt's length, for generated tokens after an echo).
    """

    def __init__(self, offset: int = 0):
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = offset

    def add(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> CompletionLogprobs:
        for e in entries:
            self.tokens.append(e.token)
            self.token_logprobs.append(e.logprob)
            # As OpenAI's: the top alternatives and always the chosen token (so up to
            # logprobs + 1 entries; logprobs=0 gives the chosen token alone).
            self.top_logprobs.append(None if e.logprob is None else
                                     _by_text([*((t, lp) for _, t, lp in e.top),
                                               (e.token, e.logprob)]))
            self.text_offset.append(self.offset + e.offset)
        return self

    def body(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def _by_text(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
    """``{token text: logprob}``, the larger logprob where two tokens show the same text
    (so a client's "is the chosen token the most likely" cannot be fooled by a collision)."""
    out: dict[str, float] = {}
    for text, lp in pairs:
        out[text] = max(lp, out.get(text, -math.inf))
    return out


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[dict[str, Any]]:
    """The ``logprobs.content`` entries of a chat choice."""

    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": token_bytes(token)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]}
            for e in entries]
