"""An OpenAI-compatible server for one OpenMythos model (FastAPI + uvicorn), continuously
batched.

Endpoints:
    ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
    ``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids
        or a list of such lists; ``max_tokens`` (default 16), ``temperature`` (0 means
        greedy), ``top_p``, ``n``, ``stop`` (up to 4 strings), ``seed`` (any integer),
        ``echo``, ``logprobs`` (alternatives per token; with ``echo`` the prompt's tokens
        too), ``stream`` (server-sent events ``data: {...}`` ending with ``data: [DONE]``;
        ``stream_options.include_usage`` adds a usage chunk).
    ``POST /v1/chat/completions``: ``messages`` rendered by the tokenizer's chat template,
        or the plain one of :mod:`.openai_api`; ``max_tokens`` / ``max_completion_tokens``
        (default: the rest of the context, up to the cap), ``logprobs`` and
        ``top_logprobs``, and the sampling fields above.
    Both take the extensions ``n_loops`` (recurrent depth of this request), ``top_k`` and
    ``exit_rule`` (``{"kl", "entropy", "rel_change", "argmax_streak", "min_loops"}``: each
    position stops looping once the rule fires, see
    :class:`~open_mythos.layers.recurrence.ExitRule`; a request without the field gets the
    server's default rule, one with ``"exit_rule": null`` none);
    ``best_of``, ``suffix``, ``logit_bias`` and the penalties only at their neutral values.
    Every non-streaming response has ``usage``.
    ``GET /health``: ``{"status": "ok"}`` and the scheduler's counts.
    ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``: vLLM's tokenizer
        endpoints, so lm-eval's ``local-completions`` model can count tokens remotely.

All requests run on one :class:`~open_mythos.serving.Scheduler` thread, which batches the
sequences of concurrent requests step by step. Limits (:class:`ServeLimits`, the
``openmythos serve`` flags) bound ``n_loops``, ``max_tokens``, ``n``, the batch, the queue
and each request's time.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for an
invalid request or one beyond a cap, 404 for an unknown model or route, 413 for a body over
the size limit, 415 for a body not sent as JSON (``Content-Type: application/json``; none
is read as JSON), 429 (with
``Retry-After``) when the queue is full, 503 while shutting down, 504 past the time limit,
500 otherwise. Once a stream has started, an error arrives as an ``error`` event before
``[DONE]``. A client that disconnects, or closes a stream early, ends its sequences at the
scheduler's next step.

Usage::

    openmythos serve --checkpoint runs/my_run --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 32, "n_loops": 8}'
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..layers.recurrence import ExitRule, as_exit_rule
from ..model import CausalLM
from ..registry import is_looped
from ..serving.jobs import (
    Event,
    Job,
    JobDone,
    JobFailed,
    PromptLogprobs,
    QueueFull,
    SchedulerStopped,
    SeqDelta,
    ServeLimits,
    TokenLogprob,
)
from ..serving.scheduler import Scheduler
from ..tokenizers import ByteTokenizer, Tokenizer
from .openai_api import (
    ChatCompletionRequest,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    chat_logprobs,
    json_type,
    render_chat,
    usage,
)
from .textgen import (
    PLAIN_CHAT_TEMPLATE,
    GenerationOptions,
    chat_template_of,
    check_encoded,
    encode_prompts,
    validate,
    vocab_bound,
)

#: How often a waiting non-streaming request checks that its client is still there (s).
DISCONNECT_POLL = 0.25
#: Seconds a client told 429 should wait.
RETRY_AFTER = 1


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content=error_body(
            self.message, self.type, self.param, self.code))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class _Call:
    """A validated request, ready for the scheduler."""

    chat: bool
    prompts: list[list[int]]
    n: int
    options: GenerationOptions
    echo_texts: list[str]  # per prompt ("" without echo)
    logprobs: int | None
    echo_logprobs: bool
    include_usage: bool
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class _Choice:
    """What one sequence has produced so far."""

    text: str = ""
    finish_reason: str | None = None
    n_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


class CompletionService:
    """The completions and chat endpoints' logic over one :class:`Scheduler`.

    Args:
        model: the model (the scheduler puts it in eval mode and owns it).
        tokenizer: its tokenizer.
        model_name: the id clients use (``model`` field); requests naming another model get 404.
        n_loops: default recurrent loops (None: the model's default).
        limits: caps on requests (default :class:`ServeLimits`).
        exit_rule: the exit rule of requests that do not set ``exit_rule`` (``openmythos
            serve``: the one a Hugging Face export's config sets); None: none.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, model_name: str = "openmythos",
                 n_loops: int | None = None, limits: ServeLimits | None = None,
                 exit_rule: ExitRule | None = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.n_loops = n_loops
        self.exit_rule = as_exit_rule(exit_rule)
        self.limits = limits or ServeLimits()
        self.looped = is_looped(model)
        if self.exit_rule is not None and not self.looped:
            raise ValueError("exit_rule needs a looped model: this one is a fixed-depth baseline")
        self.max_n_loops = self.limits.n_loops_cap(model.cfg.max_loop_iters)
        if n_loops is not None and self.looped and n_loops > self.max_n_loops:
            raise ValueError(f"the default n_loops={n_loops} is above this server's cap of "
                             f"{self.max_n_loops} loops per request (max_n_loops): raise the "
                             "cap or lower the default")
        self.vocab = vocab_bound(model, tokenizer)
        self.scheduler = Scheduler(model, tokenizer, self.limits)
        self.created = int(time.time())

    def start(self) -> None:
        self.scheduler.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler: running requests end with 503."""
        self.scheduler.stop(timeout)

    def model_card(self) -> dict[str, Any]:
        cfg = self.model.cfg
        looped = self.looped  # a fixed-depth model takes no n_loops: its loop fields are null
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "openmythos", "max_seq_len": cfg.max_seq_len, "looped": looped,
                "max_loop_iters": cfg.max_loop_iters if looped else None,
                "default_n_loops": self.n_loops if looped else None,
                "max_n_loops": self.max_n_loops if looped else None,
                "default_exit_rule": (None if self.exit_rule is None
                                      else asdict(self.exit_rule)),
                "max_tokens": self.limits.max_tokens}

    # --- validation ----------------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest) -> _Call:
        """Validate and tokenize; raises :class:`APIError` (400/404)."""
        self._check_model(req.model)
        self._check_supported(req)
        given = req.prompt_list()
        # Cheap checks first: tokenizing a million prompts only to refuse them stalls
        # every client of the event loop.
        self._check_batch(len(given), req.n)
        limit = self.model.cfg.max_seq_len
        # The byte tokenizer gives at least a token per character (a special token's name
        # is shorter than any context), so a longer text is refused unread.
        bytewise = isinstance(self.tokenizer, ByteTokenizer)
        for i, p in enumerate(given):
            if (not isinstance(p, str) or bytewise) and len(p) > limit:
                count = f"{len(p)} tokens" if not isinstance(p, str) else \
                    f"at least {len(p)} tokens ({len(p)} characters)"
                raise APIError(400, f"prompt {i} has {count}, more than the model's "
                               f"context of {limit}", param="prompt")
        # Text as /tokenize encodes it, so that the ids a client counted there are the
        # ones this request uses.
        texts, given = given, [self.encode_text(p) if isinstance(p, str) else p for p in given]
        try:
            for i, (text, ids) in enumerate(zip(texts, given)):
                if isinstance(text, str):
                    check_encoded(text, ids, f"prompt {i}")
            prompts = encode_prompts(self.tokenizer, given)
        except ValueError as err:  # text with no tokens; empty and no BOS/EOS to start from
            raise APIError(400, str(err), param="prompt") from None
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        options = self._options(req, prompts, max_tokens, req.stop_list(), "prompt", "max_tokens")
        self._check_logprobs(req.logprobs)
        echo = [self._echo(text, ids, req.logprobs) if req.echo else ""
                for text, ids in zip(texts, prompts)]
        return _Call(False, prompts, req.n, options, echo, req.logprobs,
                     req.echo and req.logprobs is not None, req.include_usage(),
                     f"cmpl-{uuid.uuid4().hex}")

    def _echo(self, text: str | list[int], ids: list[int], logprobs: int | None) -> str:
        """The prompt as ``echo`` returns it: the text sent (OpenAI's and vLLM's echo),
        token ids as they decode. With logprobs, the prompt tokens' text offsets count the
        decoded text (no clean-up of spaces): where a tokenizer that normalises text (BERT's
        lower case and spaced punctuation) decodes the text sent otherwise, that text."""
        decoded = self.tokenizer.decode_piece(ids)
        if isinstance(text, str) and (logprobs is None or decoded == text):
            return text
        return decoded

    def prepare_chat(self, req: ChatCompletionRequest) -> _Call:
        self._check_model(req.model)
        self._check_supported(req)
        self._check_batch(1, req.n)
        text, stops = render_chat(self.tokenizer, req.messages)
        try:
            prompts = encode_prompts(self.tokenizer, [text])
        except ValueError as err:  # e.g. a lone surrogate: not encodable text
            raise APIError(400, str(err), param="messages") from None
        max_tokens, tokens_param = req.token_limit()
        if max_tokens is None:
            room = self.model.cfg.max_seq_len - len(prompts[0])
            if room <= 0:  # a 200 with an empty reply would not say why
                raise APIError(400, f"the conversation is {len(prompts[0])} tokens and fills "
                               f"the context of {self.model.cfg.max_seq_len}: no room for a "
                               "reply", param="messages")
            max_tokens = min(self.limits.max_tokens, room)
        options = self._options(req, prompts, max_tokens, req.stop_list() + stops, "messages",
                                tokens_param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self._check_logprobs(logprobs, "top_logprobs")
        return _Call(True, prompts, req.n, options, [""], logprobs, False, req.include_usage(),
                     f"chatcmpl-{uuid.uuid4().hex}")

    def encode_text(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a text prompt (``/tokenize`` and ``/v1/completions``). A prompt that
        is exactly the name of a special token (``<eos>``; any of the tokenizer's:
        :meth:`Tokenizer.special_token_id`) is that token; inside longer
        text the name is its characters, as the byte tokenizer encodes it.
        ``add_special_tokens=None``: BOS first when the tokenizer adds it by default (a
        task run's, trained on ``BOS prompt answer``); True: BOS first if it has one."""
        tok = self.tokenizer
        special = tok.special_token_id(text)  # any special token's name, <|endoftext|> too
        if special is not None:
            return [special]
        if add_special_tokens and tok.bos_token_id is None:
            add_special_tokens = False  # as vLLM's default: nothing to add (it was a 400)
        try:
            return tok.encode(text, add_bos=add_special_tokens)
        except ValueError as err:  # e.g. a lone surrogate: not encodable text
            raise APIError(400, str(err), param="prompt") from None

    def _check_batch(self, n_prompts: int, n: int) -> None:
        """``n`` and ``n_prompts x n`` against their caps: before tokenizing (cheap)."""
        if n > self.limits.max_choices:
            raise APIError(400, f"n={n} is above this server's cap of "
                           f"{self.limits.max_choices} (--max-choices)", param="n")
        cap = self.limits.max_batch
        if n_prompts * n > cap:
            raise APIError(400, f"{n_prompts} prompts x n={n} sequences is above this "
                           f"server's batch cap of {cap} (--max-batch)", param="n")

    def _check_supported(self, req: SamplingFields) -> None:
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"not supported by this server: {', '.join(bad)} (only "
                           "their neutral values are accepted)", param=bad[0])

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            # repr: a name may hold what UTF-8 cannot encode (a lone surrogate, "\ud800")
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def _options(self, req: SamplingFields, prompts: list[list[int]], max_tokens: int,
                 stop: tuple[str, ...], prompt_param: str, tokens_param: str
                 ) -> GenerationOptions:
        """The generation options of a request; ``prompt_param`` and ``tokens_param`` name
        the fields that gave the prompt and the token limit (for the error's ``param``)."""
        lim = self.limits
        if req.n_loops is not None and not self.looped:
            raise APIError(400, "n_loops needs a looped model: this one is a fixed-depth "
                           "baseline", param="n_loops")
        caps = [("n_loops", req.n_loops or 0, self.max_n_loops, "--max-n-loops"),
                (tokens_param, max_tokens, lim.max_tokens, "--max-tokens")]
        for param, value, cap, flag in caps:
            if value > cap:
                raise APIError(400, f"{param}={value} is above this server's cap of {cap} ({flag})",
                               param=param)
        vocab, context = self.vocab, self.model.cfg.max_seq_len
        for i, p in enumerate(prompts):
            if p and (min(p) < 0 or max(p) >= vocab):
                raise APIError(400, f"prompt {i} has token ids outside [0, {vocab})",
                               param=prompt_param)
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > context:
            raise APIError(400, f"the prompt ({longest} tokens) + {tokens_param} ({max_tokens}) "
                           f"exceeds the model's context of {context} tokens", param=tokens_param)
        exit_rule = None if "exit_rule" in req.model_fields_set else self.exit_rule
        if req.exit_rule is not None:
            if not self.looped:
                raise APIError(400, "exit_rule needs a looped model", param="exit_rule")
            try:
                exit_rule = req.exit_rule.rule()
            except ValueError as err:
                raise APIError(400, str(err), param="exit_rule") from None
        greedy = req.temperature == 0.0
        options = GenerationOptions(
            max_new_tokens=max_tokens,
            n_loops=req.n_loops if req.n_loops is not None else self.n_loops,
            do_sample=not greedy, temperature=1.0 if greedy else req.temperature,
            top_k=req.top_k or None, top_p=None if req.top_p >= 1.0 else req.top_p,
            stop=stop, seed=req.seed, exit_rule=exit_rule)
        try:
            validate(self.model, prompts, options)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        return options

    def _check_logprobs(self, logprobs: int | None, param: str = "logprobs") -> None:
        if logprobs is not None and logprobs > self.limits.max_logprobs:
            raise APIError(400, f"{param}={logprobs} is above this server's cap of "
                           f"{self.limits.max_logprobs}", param=param)
        if logprobs is not None and logprobs > self.vocab:
            raise APIError(400, f"{param}={logprobs} is above the {self.vocab} tokens of "
                           "this model's vocabulary", param=param)

    # --- running -------------------------------------------------------------------------
    def submit(self, call: _Call) -> tuple[Job, asyncio.Queue[Event]]:
        """Queue ``call`` on the scheduler; raises :class:`APIError` 429 / 503. Call from
        the event loop: events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # on the scheduler thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening
                job.cancel()

        job = Job(call.prompts, call.options, emit, n=call.n, logprobs=call.logprobs,
                  echo_logprobs=call.echo_logprobs, timeout=self.limits.request_timeout)
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, f"the server is busy ({err}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER)}) from None
        except SchedulerStopped as err:
            raise APIError(503, str(err), "service_unavailable") from None
        return job, queue

    async def _events(self, job: Job, queue: asyncio.Queue[Event],
                      request: Request | None) -> AsyncIterator[Event]:
        """The job's events up to the last; the job is cancelled if the consumer stops
        early (a closed stream) or ``request``'s client disconnects."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    event = None
                if request is not None and time.monotonic() - checked >= DISCONNECT_POLL:
                    if await request.is_disconnected():
                        return
                    checked = time.monotonic()
                if event is None:
                    continue
                yield event
                if isinstance(event, (JobDone, JobFailed)):
                    return
        finally:
            job.cancel()  # a no-op once the job is done

    async def complete(self, call: _Call, request: Request | None = None) -> Response:
        """The whole response of a non-streaming request. Its body (megabytes with ``n``
        choices of ``top_logprobs``) is built and encoded on a worker thread: on the event
        loop it held every other client's stream (up to seconds)."""
        job, queue = self.submit(call)
        choices = [_Choice() for _ in range(len(call.prompts) * call.n)]
        async for event in self._events(job, queue, request):
            if isinstance(event, JobFailed):
                raise APIError(event.status, event.message, event.type)
            if isinstance(event, PromptLogprobs):
                choices[event.index].prompt_logprobs = event.tokens
            elif isinstance(event, SeqDelta):
                c = choices[event.index]
                c.text += event.text
                c.logprobs.extend(event.logprobs)
                if event.finish_reason is not None:
                    c.finish_reason, c.n_tokens = event.finish_reason, event.n_tokens
        return Response(await run_in_threadpool(self._body, call, choices),
                        media_type="application/json")

    def _body(self, call: _Call, choices: list[_Choice]) -> bytes:
        """The JSON of a non-streaming response, encoded as Starlette's ``JSONResponse``
        would (UTF-8, no NaN)."""
        used = sum(c.n_tokens for c in choices)
        body = {"id": call.id, "object": call.object, "created": call.created,
                "model": self.model_name, "choices": [self._choice_body(call, i, c)
                                                      for i, c in enumerate(choices)],
                "usage": usage(call.prompt_tokens(), used)}
        return json.dumps(body, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")

    def _choice_body(self, call: _Call, i: int, c: _Choice) -> dict[str, Any]:
        if call.chat:
            logprobs = None if call.logprobs is None else {"content": chat_logprobs(c.logprobs)}
            return {"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs, "finish_reason": c.finish_reason}
        echo = call.echo_texts[i // call.n]
        logprobs = None
        if call.logprobs is not None:
            lp = CompletionLogprobs().add(c.prompt_logprobs)
            lp.offset = len(echo)  # generated tokens count from the end of the echo
            logprobs = lp.add(c.logprobs).body()
        return {"text": echo + c.text, "index": i, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    async def stream(self, call: _Call, job: Job, queue: asyncio.Queue[Event]
                     ) -> AsyncIterator[str]:
        """Server-sent events of a streaming request (already submitted), ending with
        ``data: [DONE]``."""
        chunk_object = "chat.completion.chunk" if call.chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": call.id, "object": chunk_object, "created": call.created,
                    "model": self.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        rows = len(call.prompts) * call.n
        offsets = [len(call.echo_texts[i // call.n]) for i in range(rows)]
        used = 0
        if call.chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(rows)])
        else:
            for i in range(rows):
                if call.echo_texts[i // call.n] and not call.echo_logprobs:
                    yield event([_text_choice(i, call.echo_texts[i // call.n], None, None)])
        async for ev in self._events(job, queue, None):
            if isinstance(ev, JobFailed):
                yield f"data: {json.dumps(error_body(ev.message, ev.type))}\n\n"
                break
            if isinstance(ev, PromptLogprobs):
                lp = CompletionLogprobs().add(ev.tokens)
                yield event([_text_choice(ev.index, call.echo_texts[ev.index // call.n],
                                          None, lp.body())])
            elif isinstance(ev, SeqDelta):
                used += ev.n_tokens
                if not (ev.text or ev.finish_reason or ev.logprobs):
                    continue
                if call.chat:
                    logprobs = None if call.logprobs is None else {
                        "content": chat_logprobs(ev.logprobs)}
                    delta = {"content": ev.text} if ev.text else {}
                    yield event([{"index": ev.index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": ev.finish_reason}])
                else:
                    logprobs = None
                    if call.logprobs is not None:
                        logprobs = CompletionLogprobs(offsets[ev.index]).add(ev.logprobs).body()
                    yield event([_text_choice(ev.index, ev.text, ev.finish_reason, logprobs)])
            elif isinstance(ev, JobDone) and call.include_usage:
                yield event([], usage=usage(call.prompt_tokens(), used))
        yield "data: [DONE]\n\n"


def _text_choice(index: int, text: str, finish_reason: str | None,
                 logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def create_app(service: CompletionService) -> FastAPI:
    """The FastAPI application serving ``service`` (its scheduler is started here)."""
    service.start()
    app = FastAPI(title="OpenMythos completions", version="2")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.limits.max_request_bytes)
    app.add_middleware(StoppingAnswer, stopping=lambda: service.scheduler.stopping)
    _add_error_handlers(app)
    _add_model_routes(app, service)
    _add_tokenizer_routes(app, service)
    _add_completion_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered with OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        # Starlette's headers kept: a 405 names the allowed methods (Allow), where HEAD
        # goes with GET (_get_and_head: separate routes, of which Starlette names one).
        headers = dict(getattr(err, "headers", None) or {})
        allow = headers.get("Allow", "").split(", ")
        if "GET" in allow and "HEAD" not in allow:
            headers["Allow"] = ", ".join([*allow, "HEAD"])
        return APIError(err.status_code, str(err.detail), type=kind,
                        headers=headers or None).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        return APIError(500, f"{type(err).__name__}: {err}", type="server_error").response()


#: Problems a validation error names; the rest are counted (a list of a million bad
#: items would otherwise make an answer many times the size of the request).
MAX_PROBLEMS = 10


def _validation_error(err: RequestValidationError | ValidationError) -> APIError:
    """A 400 naming the invalid fields of a request pydantic refused (the first
    :data:`MAX_PROBLEMS`, then how many more)."""
    problems, param = [], None
    if isinstance(err, ValidationError):
        errors = err.errors(include_url=False, include_context=False, include_input=False)
    else:
        errors = err.errors()
    for e in errors[:MAX_PROBLEMS]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            problems.append("the request body is not valid JSON")
            param = None
            continue
        if e.get("type") == "extra_forbidden":
            msg = "unrecognized request argument"
        problems.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"... and {len(errors) - MAX_PROBLEMS} more")
    return APIError(400, "; ".join(problems) or "invalid request", param=param)


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], body: bytes, content_type: str | None) -> Body:
    """The request ``body`` parsed and validated as ``model``; raises :class:`APIError`
    (415 for a body that is not sent as JSON, 400 for an invalid one)."""
    media = (content_type or "").split(";")[0].strip().lower()
    # No content type is read as JSON (as FastAPI does). Anything else is refused: a form
    # post (curl -d without -H) would be "not a dictionary", and a browser may send
    # text/plain to a local server from any web page without asking.
    if media and media != "application/json" and not media.endswith("+json"):
        raise APIError(415, f"the request body must be JSON sent with Content-Type: "
                            f"application/json, not {media[:80]}")
    try:
        # Python's parser, as FastAPI's: pydantic's own refuses an escaped lone surrogate
        # as "invalid JSON", where the tokenizer names the problem.
        data = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, deep nesting
        what = "empty" if not body.strip() else "not valid JSON"
        raise APIError(400, f"the request body is {what}: send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {json_type(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None


async def _in_worker(request: Request, model: type[Body], then: Callable[[Body], Any]) -> Any:
    """Read the body on the event loop; parse, validate and ``then(request_body)`` on a
    worker thread, so that a large or hostile body does not stall the other clients."""
    body = await request.body()
    content_type = request.headers.get("content-type")
    return await run_in_threadpool(lambda: then(parse_body(model, body, content_type)))


def _get_and_head(app: FastAPI, path: str, endpoint: Callable[..., Any]) -> None:
    """``GET path`` and ``HEAD path`` (load balancers and uptime checks probe with HEAD);
    only GET in the OpenAPI schema (one operation id per route)."""
    app.add_api_route(path, endpoint, methods=["GET"])
    app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


def _add_model_routes(app: FastAPI, service: CompletionService) -> None:
    """``/health``, ``/v1/models`` and ``/v1/models/{id}``."""

    def health() -> dict[str, Any]:
        return {"status": "ok", **service.scheduler.stats()}

    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    def get_model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model",
                           code="model_not_found")
        return service.model_card()

    _get_and_head(app, "/health", health)
    _get_and_head(app, "/v1/models", list_models)
    # ":path": a served name may have a slash (--model-name org/model).
    _get_and_head(app, "/v1/models/{model_id:path}", get_model)


def _add_tokenizer_routes(app: FastAPI, service: CompletionService) -> None:
    """vLLM's tokenizer endpoints, which lm-eval's "remote" tokenizer backend uses."""

    def tokenizer_info() -> dict[str, Any]:
        tok = service.tokenizer
        name = lambda i: None if i is None else tok.decode([i], skip_special_tokens=False)  # noqa: E731
        return {"eos_token": name(tok.eos_token_id), "bos_token": name(tok.bos_token_id),
                "pad_token": name(tok.pad_token_id),
                "chat_template": chat_template_of(tok) or PLAIN_CHAT_TEMPLATE,
                "model_max_length": service.model.cfg.max_seq_len}

    _get_and_head(app, "/tokenizer_info", tokenizer_info)

    def tokens_of(req: TokenizeRequest) -> dict[str, Any]:
        ids = service.encode_text(req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": service.model.cfg.max_seq_len}

    def text_of(req: DetokenizeRequest) -> dict[str, str]:
        try:
            return {"prompt": service.tokenizer.decode(req.tokens)}
        except ValueError as err:
            raise APIError(400, str(err), param="tokens") from None

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await _in_worker(request, TokenizeRequest, tokens_of)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, str]:
        return await _in_worker(request, DetokenizeRequest, text_of)


def _add_completion_routes(app: FastAPI, service: CompletionService) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``. Async: the work happens on the
    scheduler thread; the event loop only waits."""

    async def run(call: _Call, stream: bool, request: Request) -> Response:
        if not stream:
            return await service.complete(call, request)
        job, queue = service.submit(call)
        return StreamingResponse(service.stream(call, job, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # Parsing, validating and tokenizing (a body may be megabytes) run on a worker thread,
    # not on the event loop that every other client's stream goes through.
    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        stream, call = await _in_worker(
            request, CompletionRequest, lambda req: (req.stream, service.prepare_completion(req)))
        return await run(call, stream, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        stream, call = await _in_worker(
            request, ChatCompletionRequest, lambda req: (req.stream, service.prepare_chat(req)))
        return await run(call, stream, request)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413, by its
    ``Content-Length`` before anything is read, or as soon as the bytes received pass the
    limit (a chunked body), so that no handler parses or tokenizes it."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse().response()(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # Raised inside FastAPI's body read, which passes HTTPException on (and
                # turns anything else into a 400): answered by the error handlers.
                raise HTTPException(413, self._refuse().message)
            return message

        await self.app(scope, counted, send)

    def _refuse(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of "
                             f"{self.limit} bytes (openmythos serve --max-request-bytes)",
                        type="invalid_request_error")


class StoppingAnswer:
    """ASGI middleware: a request uvicorn cancels at shutdown, once its graceful wait is
    over (a body still arriving), is answered 503 with OpenAI's body where nothing of a
    response was sent yet. uvicorn answered it with a plain-text 500 and logged the
    cancellation as an exception in the application."""

    def __init__(self, app: Any, stopping: Callable[[], bool]):
        self.app, self.stopping = app, stopping

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started or not self.stopping():
                raise
            # The request ends here, answered: the cancellation was meant for it alone.
            answer = APIError(503, "the server is shutting down", "service_unavailable")
            await answer.response()(scope, receive, send)


def read_timeout_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol, disconnecting a client that takes more than ``timeout``
    seconds to send a whole request (headers and body), counted from the connection, or
    from the first byte of the next request on a kept-alive connection. uvicorn itself
    bounds only the idle time between requests, so a client trickling a request a byte at
    a time holds a connection for ever, and a few hundred of them exhaust the process's
    file descriptors (slowloris).

    Likewise a client that reads nothing of its response for ``timeout`` seconds while
    the server has more for it (the socket's buffers full, writing paused) is dropped:
    a stream's client that never reads held its connection, and the output queued for it,
    for as long as it stayed connected. The connection is aborted (a close would wait to
    flush what the client does not read), which cancels the request.

    A connection closed after a response that left part of the request unread (a 413 by
    ``Content-Length`` to a ``Connection: close`` client) closes lingering: the server
    sends its FIN, then reads and drops what the client still sends until the client closes
    or ``timeout`` passes. Closed at once, the unread bytes made the kernel send a reset,
    and a client still sending lost the 413 before it could read it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _lingering: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._raw = transport
            # Every close uvicorn makes, the request cycle's included, goes through
            # _close, which lingers where the request was not read to its end.
            self.transport = _LingeringClose(transport, self._close)
            self._arm()

        def _close(self) -> None:
            raw = self._raw
            if (raw.is_closing() or self._lingering is not None
                    or self.conn.their_state is not h11.SEND_BODY or not raw.can_write_eof()):
                if self._lingering is None:
                    raw.close()
                return
            raw.write_eof()  # after what is buffered: the response, then the FIN
            raw.resume_reading()
            self._lingering = self.loop.call_later(timeout, raw.close)

        def eof_received(self) -> bool | None:
            if self._lingering is not None:  # the client is done too
                self._raw.close()
            return None

        def data_received(self, data: bytes) -> None:
            if self._lingering is not None:
                return  # the rest of a request already answered, dropped
            if self._deadline is None and self._receiving():
                self._arm()
            super().data_received(data)
            if not self._receiving():
                self._disarm()

        _stalled: asyncio.TimerHandle | None = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            for timer in (self._stalled, self._lingering):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stalled is None:
                self._stalled = self.loop.call_later(timeout, self._drop)

        def _drop(self) -> None:
            """Reset the connection: the kernel's buffers too are dropped at once (a
            plain close would leave them trying to reach a client that does not read)."""
            self._stalled = None
            sock = self._raw.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._raw.abort()

        def resume_writing(self) -> None:
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None
            super().resume_writing()

        def _receiving(self) -> bool:
            """Whether a request is still on its way in (or none has started)."""
            return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._receiving() and not self._raw.is_closing():
                self._raw.close()  # too slow: no lingering

    return ReadTimeoutH11Protocol


class _LingeringClose:
    """An asyncio transport whose ``close`` calls ``close`` (the protocol's lingering
    close); everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]):
        self._transport, self.close = transport, close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def make_server(service: CompletionService, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info", graceful_shutdown: float = 5.0, **config: Any):
    """A ``uvicorn.Server`` for ``service`` whose exit signal (SIGINT, SIGTERM) also stops
    the scheduler, so shutdown ends running requests (503) instead of waiting for them;
    ``graceful_shutdown`` bounds the wait for open connections. Connections use h11 with
    the read timeout of ``service.limits`` (:func:`read_timeout_protocol`) unless
    ``config`` names another ``http`` implementation."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.scheduler.stop(timeout=0)
            super().handle_exit(sig, frame)

    config.setdefault("http", read_timeout_protocol(service.limits.read_timeout))
    return _Server(uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=graceful_shutdown, **config))


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), for :func:`serve`: binding
    before the model loads makes a busy port an error at once, not after the load.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        # Listening now claims the port: two sockets bound with SO_REUSEADDR may share it
        # until one listens, so a second server would otherwise find out after its load.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(service: CompletionService, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Run the server until interrupted (on ``sock`` when given: see
    :func:`listening_socket`)."""
    server = make_server(service, host, port, log_level)
    server.run(sockets=None if sock is None else [sock])
    service.close()
