"""``openmythos serve``: an OpenAI-compatible completions and chat server for one
checkpoint, continuously batched.

::

    openmythos serve --checkpoint runs/tinystories --port 8000 --n-loops 8
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0.8}'

Endpoints and request fields: :mod:`open_mythos.integrations.server`; the caps
(``--max-*``, ``--request-timeout``) default to :class:`open_mythos.serving.ServeLimits`'s
values. Needs the ``serve`` extra (``pip install 'open-mythos[serve]'``: FastAPI and uvicorn).

Exit status: 2 for invalid arguments, an address it cannot listen on (checked before the
model loads) or an unreadable checkpoint; on SIGTERM or Ctrl-C the
scheduler ends running requests (503) and uvicorn, once shut down, re-raises the signal.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from pathlib import Path

from ..serving.jobs import ServeLimits
from .argtypes import port_number
from .exit_options import add_no_exit_rule_argument
from .generate import add_model_arguments

_LIMIT_HELP = {
    "max_n_loops": "most recurrent loops per request (default: twice the model's "
                   "max_loop_iters)",
    "max_tokens": "most tokens generated per sequence",
    "max_choices": "most choices (n) per request",
    "max_batch": "most sequences decoding at once (and per request)",
    "max_queue": "most requests waiting to start",
    "prefill_chunk": "most prompt tokens prefilled between two decode steps",
    "request_timeout": "seconds before a request is ended with 504",
    "max_logprobs": "most logprobs alternatives per token",
    "max_request_bytes": "largest request body in bytes (larger: 413)",
    "read_timeout": "seconds a client may take to send a whole request, or leave its "
                    "response unread, before it is disconnected",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve one model: /v1/completions and /v1/chat/completions (streaming "
                    "included), /v1/models, /health, and the tokenizer endpoints /tokenize, "
                    "/detokenize and /tokenizer_info.")
    add_model_arguments(p)
    add_no_exit_rule_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-name", metavar="NAME",
                   help="model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    limits = p.add_argument_group("limits (requests beyond a cap get 400; a full queue 429)")
    for f in dataclasses.fields(ServeLimits):
        flag = "--" + f.name.replace("_", "-")
        limits.add_argument(flag, type=float if f.type == "float" else int, default=f.default,
                            metavar="S" if f.type == "float" else "N",
                            help=_LIMIT_HELP[f.name] + (
                                "" if f.default is None else f" (default {f.default})"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted."""
    try:
        from ..integrations.server import listening_socket
    except ImportError as err:
        print(f"openmythos serve: error: {err}; install the server extra: "
              "pip install 'open-mythos[serve]'", file=sys.stderr)
        return 2
    try:
        limits = ServeLimits(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(ServeLimits)})
    except ValueError as err:
        print(f"openmythos serve: error: {err}", file=sys.stderr)
        return 2
    try:  # before the model loads: a busy port is an error at once, not after the load
        sock = listening_socket(args.host, args.port)
    except OSError as err:
        print(f"openmythos serve: error: cannot listen on {args.host}:{args.port}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 2
    with sock:
        return _load_and_serve(args, limits, sock)


def _load_and_serve(args: argparse.Namespace, limits: ServeLimits, sock: socket.socket) -> int:
    from ..integrations.server import CompletionService, serve
    from .exit_options import resolve_exit_rule
    from .generate import load_for_inference

    try:
        loaded, tokenizer = load_for_inference(args)
        exit_rule, configured = resolve_exit_rule(args, loaded)
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        print(f"openmythos serve: error: {err}", file=sys.stderr)
        return 2
    name = args.model_name or _default_name(args.checkpoint)
    try:
        service = CompletionService(loaded.model, tokenizer, model_name=name,
                                    n_loops=args.n_loops or loaded.n_loops, limits=limits,
                                    exit_rule=exit_rule)
    except ValueError as err:
        print(f"openmythos serve: error: {err}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    print(f"serving {name!r} ({loaded.format.value} checkpoint {loaded.path}) on "
          f"http://{args.host}:{port}/v1", file=sys.stderr)
    if configured:
        print(f"requests without an exit_rule run the config's {exit_rule} (--no-exit-rule: "
              "none)", file=sys.stderr)
    serve(service, host=args.host, port=port, log_level=args.log_level, sock=sock)
    return 0


def _default_name(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser().resolve()
    if path.parent.name == "checkpoints":  # RUN/checkpoints/step_N -> RUN
        path = path.parent.parent
    return path.name or "openmythos"
