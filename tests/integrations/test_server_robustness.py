"""The server tried as a hostile client would (issue #16): early-closed streams,
disconnects, caps, huge seeds, strict numbers, time limits, a full queue, SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.integrations.server import CompletionService, make_server  # noqa: E402
from open_mythos.serving import ServeLimits  # noqa: E402
from tests.integrations.conftest import (  # noqa: E402
    TRAINED_LOOPS,
    ScriptedModel,
    scripted_text,
    write_training_checkpoint,
)
from tests.integrations.test_server import SCRIPT, TIMEOUT, running_server  # noqa: E402

LIMITS = ServeLimits(max_n_loops=6, max_tokens=59, max_choices=16, max_batch=32, max_logprobs=5)


class SlowModel(ScriptedModel):
    """:class:`ScriptedModel` taking ``delay`` seconds more per forward: long requests
    without long tests."""

    def __init__(self, delay: float):
        super().__init__(SCRIPT, real_positions=True)
        self.delay = delay
        self.gate: threading.Event | None = None

    def forward(self, *args, **kwargs):
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        time.sleep(self.delay)
        return super().forward(*args, **kwargs)


@pytest.fixture(scope="module")
def real(trained_model):
    service = CompletionService(trained_model, ByteTokenizer(), model_name="tiny",
                                n_loops=TRAINED_LOOPS, limits=LIMITS)
    with running_server(service) as client:
        yield client, service


def wait_until(condition, what: str, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def test_an_early_closed_stream_does_not_wedge_the_server(real):
    """The issue's report: max_tokens 59, n 16, closed after 3 events; every later request
    timed out. Now the stream's sequences leave the batch and the next request answers."""
    client, service = real
    body = {"prompt": "the ", "max_tokens": 59, "n": 16, "stream": True, "temperature": 0}
    for _ in range(3):
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # The scheduler drops the closed stream's rows instead of generating on.
        wait_until(lambda: service.scheduler.stats()["running"] == 0, "the rows to leave")
    r = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 8}, timeout=5.0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("field, cap", [("n_loops", LIMITS.max_n_loops),
                                        ("max_tokens", LIMITS.max_tokens),
                                        ("n", LIMITS.max_choices),
                                        ("logprobs", LIMITS.max_logprobs)])
def test_caps_answer_400_just_above_the_documented_value(real, field, cap):
    client, _ = real
    base = {"prompt": "a", "max_tokens": 2, field: cap}
    ok = client.post("/v1/completions", json=base)
    assert ok.status_code == 200, ok.text
    for value in (cap + 1, 30_000):
        r = client.post("/v1/completions", json={**base, field: value})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == field and str(cap) in error["message"]


def test_the_batch_cap_bounds_prompts_times_n(real):
    client, _ = real
    r = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 11, "max_tokens": 1})
    assert r.status_code == 400 and "batch" in r.json()["error"]["message"]
    models = client.get("/v1/models/tiny").json()
    assert (models["max_n_loops"], models["max_tokens"]) == (LIMITS.max_n_loops, LIMITS.max_tokens)


def test_huge_prompt_lists_are_refused_before_tokenizing(real, monkeypatch):
    """A million prompts (or one prompt of a million ids) is refused by its count, without
    tokenizing or checking every token first (that stalled every client for seconds)."""
    client, service = real
    encoded = []
    monkeypatch.setattr(service.tokenizer.__class__, "encode",
                        lambda self, *a, **k: encoded.append(a) or [1])
    r = client.post("/v1/completions", json={"prompt": ["a"] * 200_000, "max_tokens": 1})
    assert r.status_code == 400 and "200000 prompts x n=1" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "n": 33, "max_tokens": 1})
    assert r.status_code == 400 and "n=33" in r.json()["error"]["message"]
    assert encoded == []
    r = client.post("/v1/completions", json={"prompt": [1] * 100_000, "max_tokens": 1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "prompt" and "100000 tokens" in error["message"]


def test_a_validation_error_names_ten_problems_and_counts_the_rest(real):
    """Each bad field was one line of the 400: the first ten are named, the rest counted."""
    client, _ = real
    r = client.post("/v1/completions", json={"prompt": "a", **{f"x{i}": 1 for i in range(12)}})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.count("unrecognized request argument") == 10
    assert message.endswith("and 2 more")


@pytest.mark.parametrize("body, param, words", [
    # A million nulls made pydantic build three million errors (one per member of the
    # prompt's union): a minute of work before the 400, every other client blocked.
    ({"prompt": [None] * 200_000}, "prompt", "item 0 is null"),
    ({"prompt": [1] * 50 + [None] * 200_000}, "prompt", "item 50 is null"),
    ({"prompt": [[1, 2], [3, "4"]] + [[None]] * 50_000}, "prompt", "item 1[1] is a string"),
    ({"prompt": "a", "stop": [None] * 200_000}, "stop", "stop"),
    ({"prompt": "a", "logit_bias": {str(i): None for i in range(200_000)}}, "logit_bias", ""),
    ({"prompt": "a", **{f"x{i}": 1 for i in range(200_000)}}, None,
     "200000 unrecognized fields"),
    ({"messages": [None] * 200_000}, "messages", "messages.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}] * 200_000}]}, "messages",
     "messages.0.content"),
])
def test_a_flood_of_bad_items_is_one_problem(real, body, param, words):
    """Lists and maps stop validating at their first bad item, so a hostile body costs
    the server little: the answer names one problem, not one per item."""
    client, _ = real
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "more" not in error["message"] and len(r.content) < 1_000


def post_while_held(client, monkeypatch, owner, name: str, body: dict):
    """POST ``body`` to /v1/completions while ``owner.name`` (work the server does on a
    worker thread) is held inside the request; /health must answer meanwhile. Returns
    the request's response, once released."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def held(*args):
        entered.set()
        assert release.wait(TIMEOUT)
        return real(*args)

    monkeypatch.setattr(owner, name, held)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", client.post(
        "/v1/completions", json=body)))
    worker.start()
    try:
        assert entered.wait(TIMEOUT)
        with httpx.Client(base_url=client.base_url, timeout=5.0) as other:
            assert other.get("/health").status_code == 200
    finally:
        release.set()
        worker.join(TIMEOUT)
    return result["r"]


def test_a_body_is_parsed_and_validated_off_the_event_loop(real, monkeypatch):
    """Parsing and validating a body (megabytes of JSON) ran on the event loop, before
    the handler: every other client waited. Now a worker thread does it; while one
    request's validation is held, /health answers."""
    client, _ = real
    from open_mythos.integrations import server as server_module

    r = post_while_held(client, monkeypatch, server_module, "parse_body",
                        {"prompt": "the ", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_response_body_is_built_off_the_event_loop(real, monkeypatch):
    """A small request can ask for a response of megabytes (n choices with top_logprobs):
    building and encoding it on the event loop froze every other client, /health for
    6 s in a hostile client's run. Now a worker thread does it; while it is held, /health
    answers, and the body is the JSON the client expects."""
    client, service = real
    r = post_while_held(client, monkeypatch, service, "_body",
                        {"prompt": "the ", "max_tokens": 3, "n": 2, "logprobs": 2,
                         "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    choices = r.json()["choices"]
    assert len(choices) == 2 and all(len(c["logprobs"]["tokens"]) == 3 for c in choices)


def test_a_model_name_utf8_cannot_encode_is_a_404(real):
    """``"model": "\ud800"`` was echoed into the 404's message, which could not be encoded:
    a 500."""
    client, _ = real
    for path, body in (("/v1/completions", {"prompt": "a", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                 "max_tokens": 1})):
        for stream in (False, True):
            raw = json.dumps({**body, "model": "\ud800", "stream": stream})
            r = client.post(path, content=raw.encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("content, headers, status, words", [
    (b'{"prompt": "a", "max_tokens": 1}', {"content-type": "text/plain"}, 415, "text/plain"),
    (b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}, 415,
     "Content-Type: application/json"),
    (b'{"prompt": "a", "max_tokens": 1}', {}, 200, ""),  # no content type: read as JSON
    (b'{"prompt": "a", "max_tokens": 1}', {"content-type": "application/json; charset=utf-8"},
     200, ""),
    (b"", {"content-type": "application/json"}, 400, "empty"),
    (b"[1, 2]", {"content-type": "application/json"}, 400, "a JSON object, not an array"),
    (b'{"prompt": "a", "temperature": NaN}', {"content-type": "application/json"}, 400,
     "finite"),
])
def test_bodies_that_are_not_a_json_object(real, content, headers, status, words):
    """A form post (curl -d without -H) was "Input should be a valid dictionary"; NaN was
    refused as "less than or equal to 2"."""
    client, _ = real
    r = client.post("/v1/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    if status != 200:
        assert words in r.json()["error"]["message"], r.text


def test_errors_name_the_field_the_client_sent(real):
    client, _ = real
    chat = {"messages": [{"role": "user", "content": "a"}]}
    r = client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 10**9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    assert "max_completion_tokens=" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 50})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_completion_tokens", r.text
    assert "context" in error["message"]
    r = client.post("/v1/completions", json={"prompt": [5, 100_000], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_every_get_route_answers_head_and_the_schema_has_unique_operations(real):
    client, _ = real
    for path in ("/health", "/v1/models", "/v1/models/tiny", "/tokenizer_info"):
        assert client.head(path).status_code == 200, path
    schema = client.get("/openapi.json").json()
    ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}],
                              "max_tokens": 2}, "messages"),
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, "prompt"),
    ("/tokenize", {"prompt": "a\ud800"}, "prompt"),
])
def test_a_lone_surrogate_is_a_400_everywhere(real, path, body, param):
    """Text that is not encodable (a lone UTF-16 surrogate) got a 500 from chat and
    /tokenize."""
    client, _ = real
    raw = json.dumps(body)  # ASCII: the surrogate travels as the escape \\ud800
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_any_integer_seed_is_accepted_and_reproducible(real):
    """Seeds >= 2**63 answered 500 and reset the keep-alive connection."""
    client, _ = real
    for seed in (2**63, 2**64, 2**64 + 1, 10**40, -1):
        body = {"prompt": "the ", "max_tokens": 12, "n": 2, "seed": seed}
        first = client.post("/v1/completions", json=body)
        assert first.status_code == 200, (seed, first.text)
        # The same keep-alive connection answers the next request, identically.
        again = client.post("/v1/completions", json=body)
        assert [c["text"] for c in again.json()["choices"]] == [
            c["text"] for c in first.json()["choices"]]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.0), ("n", "2"), ("n", True),
    ("n_loops", True), ("n_loops", "2"), ("temperature", "0.5"), ("temperature", False),
    ("seed", "1"), ("seed", 1.5), ("top_k", "3"), ("echo", "yes"), ("logprobs", True),
    ("exit_rule", {"kl": "0.1"}), ("exit_rule", {"kl": -1.0}), ("exit_rule", {"min_loops": 2}),
    ("exit_rule", {"argmax_streak": 2**80}),  # once a 500: int64 overflow in the rule's test
])
def test_numbers_are_not_coerced(real, field, value):
    client, _ = real
    r = client.post("/v1/completions", json={"prompt": "a", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_nulls_stream_options_and_http_methods_as_clients_send_them(real):
    """An explicit null where OpenAI marks a field nullable is the default; stream_options is
    as strict as every other field; HEAD works where GET does; a 405 names what is allowed."""
    client, _ = real
    body = {"prompt": "0110=", "max_tokens": 3, "temperature": 0.0, "top_k": 1}
    want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    nulls = {k: None for k in ("top_p", "n", "stream", "echo", "presence_penalty",
                               "frequency_penalty")}
    r = client.post("/v1/completions", json={**body, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "temperature": None,
        "logprobs": None})
    assert r.status_code == 200, r.text
    for options in ({"include_usage": "false"}, {"include_usage": True, "bogus": 1}):
        r = client.post("/v1/completions", json={**body, "stream": True,
                                                  "stream_options": options})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    for path in ("/health", "/v1/models", "/v1/models/tiny", "/tokenizer_info"):
        assert client.head(path).status_code == 200, path
        r = client.delete(path)  # Allow lists HEAD too (it named GET alone)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", path
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_served_name_with_a_slash_is_found():
    service = CompletionService(ScriptedModel(SCRIPT), ByteTokenizer(), model_name="org/tiny")
    with running_server(service) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["org/tiny"]
        assert client.get("/v1/models/org/tiny").json()["id"] == "org/tiny"
        assert client.get("/v1/models/org/other").status_code == 404


def test_a_client_disconnect_cancels_its_work():
    """A non-streaming request whose client goes away stops generating (the issue: work
    went on after the client left, blocking the others)."""
    model = SlowModel(delay=0.02)
    service = CompletionService(model, ByteTokenizer(), model_name="tiny", n_loops=1)
    with running_server(service) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 60, "n": 4},
                        timeout=0.3)
        wait_until(lambda: service.scheduler.stats()["running"] == 0, "the rows to leave", 3.0)
        steps = service.scheduler.steps
        assert steps < 40  # 60 were asked for; about 0.3 s + one poll of steps were run
        time.sleep(0.2)
        assert service.scheduler.steps == steps


def test_time_limit_answers_504_and_ends_streams_with_an_error():
    model = SlowModel(delay=0.02)
    service = CompletionService(model, ByteTokenizer(), model_name="tiny", n_loops=1,
                                limits=ServeLimits(request_timeout=0.3))
    with running_server(service) as client:
        start = time.monotonic()
        r = client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 60})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert time.monotonic() - start < 2.0
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "Q", "max_tokens": 60, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]" and "time limit" in json.loads(events[-2])["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 3}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after():
    model = SlowModel(delay=0.0)
    model.gate = threading.Event()  # forwards wait here: nothing finishes meanwhile
    service = CompletionService(model, ByteTokenizer(), model_name="tiny", n_loops=1,
                                limits=ServeLimits(max_batch=1, max_queue=1))
    stats = service.scheduler.stats
    with running_server(service) as client:
        body = {"prompt": "Q", "max_tokens": 5, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as running:
            assert running.status_code == 200
            wait_until(lambda: stats()["prefilling"] == 1, "the first request to start")
            with client.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200
                assert stats()["waiting"] == 1  # the batch (1 row) is full: it waits
                with httpx.Client(base_url=client.base_url, timeout=TIMEOUT) as other:
                    r = other.post("/v1/completions", json={"prompt": "Q", "max_tokens": 1})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                model.gate.set()
                texts = [[json.loads(line[6:])["choices"][0]["text"]
                          for line in resp.iter_lines() if line.startswith('data: {"id"')]
                         for resp in (running, waiting)]
    assert ["".join(t) for t in texts] == [scripted_text(SCRIPT, 1, 5)] * 2  # both in full


def test_sigterm_ends_running_requests_instead_of_waiting_for_them():
    """The exit signal stops the scheduler: a 60 x 0.1 s request ends with 503 at its
    next step and the server exits in well under the request's own time."""
    model = SlowModel(delay=0.1)
    service = CompletionService(model, ByteTokenizer(), model_name="tiny", n_loops=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = make_server(service, log_level="warning", lifespan="off")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, "uvicorn to start")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        body = {"prompt": "Q", "max_tokens": 60, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            start = time.monotonic()
            srv.handle_exit(signal.SIGTERM, None)
            rest = [line for line in lines if line]
        thread.join(timeout=TIMEOUT)
    assert not thread.is_alive() and time.monotonic() - start < 3.0
    assert "shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
    sock.close()


def test_a_body_still_arriving_at_shutdown_is_answered_503():
    """A request whose body is still being sent when the exit signal comes is cancelled by
    uvicorn after the graceful wait: it is answered 503 with OpenAI's body (uvicorn's own
    answer was a plain-text 500 and a logged traceback)."""
    model = SlowModel(delay=0.0)
    service = CompletionService(model, ByteTokenizer(), model_name="tiny", n_loops=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = make_server(service, log_level="critical", lifespan="off", graceful_shutdown=0.3)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, "uvicorn to start")
    body = b'{"prompt": "Q", "max_tokens": 1}'
    with socket.create_connection(sock.getsockname(), timeout=TIMEOUT) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
        time.sleep(0.2)  # the handler is waiting for the rest of the body
        srv.handle_exit(signal.SIGTERM, None)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    thread.join(timeout=TIMEOUT)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert json.loads(payload)["error"] == {
        "message": "the server is shutting down", "type": "service_unavailable",
        "param": None, "code": None}
    assert not thread.is_alive()
    sock.close()


@pytest.mark.slow
def test_sigterm_to_openmythos_serve_does_not_wait_for_a_long_request(tmp_path, trained_model):
    """The real command and a real signal: a request of 60 tokens at 200 loops each (many
    of seconds here) is decoding when SIGTERM arrives; it ends with a 503 event at the next
    step and the process exits within seconds instead of finishing the request."""
    ckpt = write_training_checkpoint(tmp_path / "run", trained_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    # One torch thread, as the test process has (tests/conftest.py): on a loaded 2-core
    # machine two OpenMP threads spin-waiting on each other made one step take seconds.
    proc = subprocess.Popen(
        [sys.executable, "-m", "open_mythos", "serve", "--checkpoint", str(ckpt), "--port",
         str(port), "--max-n-loops", "200", "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), "the server to start", timeout=120.0)
        body = {"prompt": "the", "max_tokens": 60, "n_loops": 200, "stream": True,
                "temperature": 0}
        with httpx.Client(base_url=url, timeout=120.0) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)  # the first token: the request is decoding
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - start < 10.0
        assert "shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert len(rest) < 40  # far from the 60 tokens asked for
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        print((tmp_path / "serve.log").read_text())  # shown when the test fails


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_default_n_loops_cap_is_twice_the_trained_depth(trained_model):
    service = CompletionService(trained_model, ByteTokenizer(), model_name="tiny")
    try:
        assert service.max_n_loops == 2 * trained_model.cfg.max_loop_iters
        assert service.model_card()["max_n_loops"] == service.max_n_loops
    finally:
        service.close()
    with pytest.raises(ValueError, match="max_n_loops"):
        ServeLimits(max_n_loops=0)


def serve_with(limits: ServeLimits):
    model = ScriptedModel(SCRIPT, real_positions=True)
    return running_server(CompletionService(model, ByteTokenizer(), model_name="tiny",
                                            n_loops=2, limits=limits))


def test_a_body_over_the_limit_is_refused_before_it_is_parsed():
    """A 40 MB prompt was tokenized in full (2.4 s, RSS to 3.1 GB, the event loop blocked)
    before the context check answered 400. Now 413, by Content-Length or while the bytes
    of a chunked body arrive."""
    with serve_with(ServeLimits(max_request_bytes=2000)) as client:
        big = {"prompt": "a" * 5000, "max_tokens": 1}
        r = client.post("/v1/completions", json=big)
        assert r.status_code == 413
        assert "--max-request-bytes" in r.json()["error"]["message"]

        def chunks():
            body = json.dumps(big).encode()
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]

        r = client.post("/v1/completions", content=chunks(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        ok = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        # A client that closes after its request (urllib does) still sending a large body
        # got a reset: the server closed with the body unread, which threw the 413 away.
        body = json.dumps({"prompt": "a" * 4_000_000}).encode()
        for connection in (b"close", b"keep-alive"):
            with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=10) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: %s\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                          % (connection, len(body)) + body)
                got = b""
                while not got.endswith(b"}") and (chunk := s.recv(65536)):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 413"), (connection, got[:80])
            assert b"--max-request-bytes" in got


def test_a_client_too_slow_to_send_its_request_is_disconnected():
    """Slowloris: half a request line, or headers trickled byte by byte, held a connection
    (and a file descriptor) for ever; ~250 of them made the server refuse everyone."""
    with serve_with(ServeLimits(read_timeout=1.0)) as client:
        port = client.base_url.port

        def closed_after(payload: bytes, trickle: bool) -> float:
            """Seconds until the server closes a connection sending ``payload`` at once or
            one byte every 0.2 s (the server may answer a broken request first)."""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                start = time.monotonic()
                try:
                    pieces = [payload[i:i + 1] for i in range(len(payload))] if trickle \
                        else [payload]
                    for piece in pieces:
                        s.sendall(piece)
                        if trickle:
                            time.sleep(0.2)
                    while s.recv(1024):
                        pass
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return time.monotonic() - start

        assert closed_after(b"", trickle=False) < 5  # connected, says nothing
        assert closed_after(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", trickle=False) < 5
        slow = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{}"
        assert closed_after(slow, trickle=True) < 5  # one byte every 0.2 s
        # A request that arrives in time is served, also when it takes a while to answer.
        r = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 3})
        assert r.status_code == 200


def test_an_empty_stop_string_stops_nothing(real):
    """As documented: clients that send ``"stop": ""`` for "none" get the full reply."""
    client, _ = real
    body = {"prompt": "the ", "max_tokens": 6, "temperature": 0}
    want = client.post("/v1/completions", json=body).json()["choices"][0]
    for stop in ("", [""], ["", "\x00"]):
        got = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
        assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"]), stop


def test_a_prompt_that_encodes_to_nothing_is_a_400(real, monkeypatch):
    """Text a tokenizer has no token for (a BPE without an unknown token drops it) was
    answered as an empty prompt; blank text still is one."""
    client, service = real
    real_encode = service.tokenizer.__class__.encode
    monkeypatch.setattr(service.tokenizer.__class__, "encode",
                        lambda self, text, *a, **k: [] if text == "中文" else
                        real_encode(self, text, *a, **k))
    r = client.post("/v1/completions", json={"prompt": ["ok", "中文"], "max_tokens": 1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "prompt" and "prompt 1 encodes to no tokens" in error["message"]
    assert client.post("/v1/completions", json={"prompt": "", "max_tokens": 1}).status_code == 200



def test_a_client_that_reads_nothing_of_its_stream_is_disconnected():
    """A stream's client that never reads (its receive window full, the server's writes
    paused) kept its connection, and megabytes of output queued for it, for as long as it
    stayed connected. After the read timeout without the server's buffers draining the
    connection is dropped: the client never sees the end of the stream, and the server
    answers the next client."""
    limits = ServeLimits(read_timeout=1.0, max_logprobs=250, max_choices=16, max_batch=32)
    with serve_with(limits) as client:
        body = json.dumps({"prompt": "Q", "max_tokens": 59, "n": 16, "logprobs": 250,
                           "stream": True}).encode()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", client.base_url.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(6)  # reads nothing: the server's buffers fill, then it waits 1 s
            # Aborted (a reset), not closed: a close would wait to flush what nobody reads.
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
            s.settimeout(10)
            got = b""
            try:
                while chunk := s.recv(1 << 16):
                    got += chunk
            except ConnectionResetError:
                pass
        assert got.startswith(b"HTTP/1.1 200") or not got
        assert b"[DONE]" not in got  # dropped before the end (the stream is ~15 MB)
        r = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 3})
        assert r.status_code == 200
