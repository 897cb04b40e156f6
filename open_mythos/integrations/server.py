"""An OpenAI-compatible completions server for one OpenMythos model (FastAPI + uvicorn).

Endpoints:
    ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
    ``POST /v1/completions``: the OpenAI completions API. ``prompt`` is a string, a list of
        strings, a list of token ids or a list of such lists; ``max_tokens`` (default 16),
        ``temperature`` (0 means greedy), ``top_p``, ``n``, ``stop`` (up to 4 strings),
        ``seed``, ``echo``, ``stream`` (server-sent events ``data: {...}`` ending with
        ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk).
        Extensions: ``n_loops`` (recurrent depth of this request) and ``top_k``.
        ``logprobs``, ``best_of``, ``suffix``, ``logit_bias`` and the penalties are accepted
        only at their neutral values.
    ``GET /health``.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for an
invalid request (validated by pydantic), 404 for an unknown model or route, 500 otherwise.

The model runs one request at a time (a lock around every generation); a request's
prompts and its ``n`` choices run as one batch.

Usage::

    openmythos serve --checkpoint runs/my_run --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 32, "n_loops": 8}'
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model import OpenMythos
from ..tokenizers import Tokenizer
from .textgen import GenerationOptions, TextDelta, encode_prompts, stream_text, validate

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(
            self.message, self.type, self.param, self.code))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class CompletionRequest(BaseModel):
    """Body of ``POST /v1/completions`` (unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    user: str | None = None
    # OpenMythos extensions.
    n_loops: int | None = Field(default=None, ge=1, strict=True)
    top_k: int | None = Field(default=None, ge=0)
    # Accepted only at their neutral values.
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (
                not self.prompt or any(isinstance(p, list) and not p for p in self.prompt)):
            raise ValueError("prompt must not be an empty list")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings")
        unsupported = {
            "logprobs": self.logprobs is not None, "best_of": self.best_of not in (None, 1),
            "suffix": bool(self.suffix), "logit_bias": bool(self.logit_bias),
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)}")
        return self

    def prompt_list(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return list(p)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


@dataclass
class _Job:
    request: CompletionRequest
    prompts: list[list[int]]  # one per choice (each prompt repeated n times)
    n_prompts: int
    options: GenerationOptions
    echo_texts: list[str]
    id: str
    created: int


class CompletionService:
    """Runs completions on one model, one request at a time.

    Args:
        model: the model (put in eval mode by generation).
        tokenizer: its tokenizer.
        model_name: the id clients use (``model`` field); requests naming another model get 404.
        n_loops: default recurrent loops (None: ``cfg.max_loop_iters``).
    """

    def __init__(self, model: OpenMythos, tokenizer: Tokenizer, model_name: str = "openmythos",
                 n_loops: int | None = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.n_loops = n_loops
        self.created = int(time.time())
        self.lock = threading.Lock()

    def model_card(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "openmythos", "max_seq_len": cfg.max_seq_len,
                "max_loop_iters": cfg.max_loop_iters, "default_n_loops": self.n_loops}

    def prepare(self, req: CompletionRequest) -> _Job:
        """Validate and tokenize; raises :class:`APIError` (400/404)."""
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                           f"`{self.model_name}`", param="model", code="model_not_found")
        try:
            prompts = encode_prompts(self.tokenizer, req.prompt_list())
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None
        greedy = req.temperature == 0.0
        options = GenerationOptions(
            max_new_tokens=16 if req.max_tokens is None else req.max_tokens,
            n_loops=req.n_loops if req.n_loops is not None else self.n_loops,
            do_sample=not greedy, temperature=1.0 if greedy else req.temperature,
            top_k=req.top_k or None, top_p=None if req.top_p >= 1.0 else req.top_p,
            stop=req.stop_list(), seed=req.seed)
        try:
            validate(self.model, prompts, options)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        echo = [self.tokenizer.decode(p) if req.echo else "" for p in prompts]
        return _Job(
            request=req, prompts=[p for p in prompts for _ in range(req.n)],
            n_prompts=len(prompts), options=options,
            echo_texts=[e for e in echo for _ in range(req.n)],
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()))

    def _deltas(self, job: _Job) -> Iterator[TextDelta]:
        with self.lock:
            yield from stream_text(self.model, self.tokenizer, job.prompts, job.options)

    def _usage(self, job: _Job, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in job.prompts[:: job.request.n])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def complete(self, job: _Job) -> dict[str, Any]:
        """The whole response body of a non-streaming request."""
        texts = list(job.echo_texts)
        finish: list[str | None] = [None] * len(job.prompts)
        used = 0
        for d in self._deltas(job):
            texts[d.index] += d.text
            if d.finish_reason is not None:
                finish[d.index], used = d.finish_reason, used + d.n_tokens
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": job.id, "object": "text_completion", "created": job.created,
                "model": self.model_name, "choices": choices, "usage": self._usage(job, used)}

    def stream(self, job: _Job) -> Iterator[str]:
        """Server-sent events of a streaming request, ending with ``data: [DONE]``."""

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": job.id, "object": "text_completion", "created": job.created,
                    "model": self.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        used = 0
        try:
            for i, text in enumerate(job.echo_texts):
                if text:
                    yield event([_choice(i, text, None)])
            for d in self._deltas(job):
                used += d.n_tokens
                if d.text or d.finish_reason is not None:
                    yield event([_choice(d.index, d.text, d.finish_reason)])
            options = job.request.stream_options or {}
            if options.get("include_usage"):
                yield event([], usage=self._usage(job, used))
        except Exception as err:  # the status line is already sent: report in the stream
            yield f"data: {json.dumps(error_body(str(err), 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def create_app(service: CompletionService) -> FastAPI:
    """The FastAPI application serving ``service``."""
    app = FastAPI(title="OpenMythos completions", version="1")
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for e in err.errors():
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
        return APIError(400, "; ".join(problems) or "invalid request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        return APIError(500, f"{type(err).__name__}: {err}", type="server_error").response()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model",
                           code="model_not_found")
        return service.model_card()

    # Sync endpoints: FastAPI runs them in its thread pool, so a generation never blocks
    # the event loop; the service lock serialises the model.
    @app.post("/v1/completions", response_model=None)
    def completions(req: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        job = service.prepare(req)
        if req.stream:
            return StreamingResponse(service.stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return service.complete(job)

    return app


def serve(service: CompletionService, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
