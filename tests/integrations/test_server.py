"""The OpenAI-compatible server, run by a real uvicorn on a free local port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.integrations.openai_api import CompletionRequest  # noqa: E402
from open_mythos.integrations.server import APIError, CompletionService, make_server  # noqa: E402
from open_mythos.serving import ServeLimits  # noqa: E402
from tests.integrations.conftest import (  # noqa: E402
    TRAINED_LOOPS,
    ScriptedModel,
    byte_baseline,
    in_support,
    scripted_text,
)

SCRIPT = b"abc. def. ghi. "
TIMEOUT = 30.0


@contextlib.contextmanager
def running_server(service: CompletionService) -> Iterator[httpx.Client]:
    """``service`` served by uvicorn on a free local port; a client of it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = make_server(service, log_level="warning", lifespan="off")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
        yield client
    srv.should_exit = True
    thread.join(timeout=TIMEOUT)
    sock.close()
    service.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server():
    """The scripted stand-in, for the tests whose point is an exact expected text."""
    model = ScriptedModel(SCRIPT, real_positions=True)
    with running_server(CompletionService(model, ByteTokenizer(), model_name="tiny",
                                          n_loops=2)) as client:
        yield client, model


@pytest.fixture(scope="module")
def real_server(trained_model):
    """A real trained model behind the server, for sampling."""
    service = CompletionService(trained_model, ByteTokenizer(), model_name="tiny",
                                n_loops=TRAINED_LOOPS)
    with running_server(service) as client:
        yield client


def sse_events(response: httpx.Response) -> list[str]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: "):] for line in lines]


def test_models_lists_the_served_model(server):
    client, _ = server
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/health").json() == {"status": "ok", "running": 0, "prefilling": 0,
                                            "waiting": 0, "decode_steps": 0, "peak_batch": 0}


def test_completion(server):
    client, model = server
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Q", "max_tokens": 12,
                                             "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice == {"text": scripted_text(SCRIPT, 1, 12), "index": 0, "logprobs": None,
                      "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 12, "total_tokens": 13}
    assert model.calls[-1] == 2  # the server's default n_loops


def test_stop_n_echo_and_n_loops(server):
    client, model = server
    r = client.post("/v1/completions", json={
        "prompt": ["Q", "RR"], "n": 2, "max_tokens": 12, "stop": [". g", "zz"], "seed": 1,
        "n_loops": 3, "echo": True})
    body = r.json()
    assert r.status_code == 200, body
    # Each row continues the script from its own prompt's length.
    q, rr = (scripted_text(SCRIPT, n, 12) for n in (1, 2))
    q, rr = q[: q.index(". g")], rr[: rr.index(". g")]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["Q" + q, "Q" + q, "RR" + rr, "RR" + rr]
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    assert body["usage"]["prompt_tokens"] == 3
    assert model.calls[-1] == 3


def test_streaming_sends_deltas_then_done(server):
    client, _ = server
    request = {"prompt": "Q", "max_tokens": 20, "temperature": 0, "stop": "ghi",
               "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=request) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert len(deltas) > 3  # streamed piece by piece
    assert "".join(d["text"] for d in deltas) == "abc. def. "
    assert [d["finish_reason"] for d in deltas][-1] == "stop"
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == len("abc. def. ghi")
    plain = client.post("/v1/completions", json={**request, "stream": False}).json()
    assert plain["choices"][0]["text"] == "abc. def. "


@pytest.mark.parametrize("body, status, param", [
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "a", "n_loops": 0}, 400, "n_loops"),
    ({"prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
    ({"prompt": "a", "unknown_field": 1}, 400, "unknown_field"),
    ({"prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 64}, 400, "max_tokens"),  # beyond the context of 64
    ({"prompt": "a", "logprobs": 100}, 400, "logprobs"),
    ({"prompt": "a", "best_of": 2}, 400, "best_of"),
    ({"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param):
    client, _ = server
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_prompts_are_tokenized_off_the_event_loop(monkeypatch):
    """A request's tokenizing runs on a worker thread (megabytes of text held every other
    client's stream), and a byte-tokenized text longer than the context is refused unread."""
    service = CompletionService(ScriptedModel(SCRIPT, real_positions=True), ByteTokenizer(),
                                model_name="tiny", n_loops=2)
    seen: list[bool] = []
    for name in ("prepare_completion", "prepare_chat", "encode_text"):
        original = getattr(service, name)

        def spy(*args, _original=original, **kwargs):
            try:
                asyncio.get_running_loop()
                seen.append(True)
            except RuntimeError:
                seen.append(False)
            return _original(*args, **kwargs)

        monkeypatch.setattr(service, name, spy)
    with running_server(service) as client:
        assert client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 2}).status_code == 200
        assert client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Q"}], "max_tokens": 2}).status_code == 200
        assert client.post("/tokenize", json={"prompt": "Q"}).status_code == 200
        r = client.post("/v1/completions", json={"prompt": "x" * 2_000_000, "max_tokens": 1})
        assert r.status_code == 400 and "at least 2000000 tokens" in r.json()["error"]["message"]
    assert seen and not any(seen)  # no call ran on the event loop's thread


def test_malformed_json_and_unknown_routes(server):
    client, _ = server
    r = client.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.get("/v1/chat/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_concurrent_requests_are_all_answered(server):
    client, _ = server
    body = {"prompt": "Q", "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(4)))
    assert {r.status_code for r in results} == {200}
    assert {r.json()["choices"][0]["text"] for r in results} == {scripted_text(SCRIPT, 1, 8)}


# Sampling through the server, on a real trained model ------------------------------------
PROMPT = "the cat sat on the "


def completions(client, **body) -> list[dict]:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def test_seed_reproduces_the_choices_and_n_choices_differ(real_server):
    first = completions(real_server, n=4, seed=11)
    assert [c["index"] for c in first] == [0, 1, 2, 3]
    assert completions(real_server, n=4, seed=11) == first
    texts = [c["text"] for c in first]
    assert [c["text"] for c in completions(real_server, n=4, seed=12)] != texts
    assert len(set(texts)) > 1  # n choices are n draws, not one draw repeated
    # Without a seed, two requests draw differently.
    assert completions(real_server, n=4) != completions(real_server, n=4)


@pytest.mark.parametrize("option, value", [("top_k", 3), ("top_p", 0.6)])
def test_top_k_and_top_p_restrict_the_sampled_tokens(real_server, trained_model, option, value):
    """Every token of every choice lies in the top-k set / the nucleus of the distribution
    it was drawn from (a full forward of the model recomputes it); the same request
    without the option samples outside of it."""
    temperature = 1.5
    prompt = ByteTokenizer().encode(PROMPT)

    def inside(choices) -> tuple[torch.Tensor, torch.Tensor]:
        return in_support(trained_model, prompt, [(c["text"], c["finish_reason"]) for c in choices],
                          option, value, temperature)

    flags, last = inside(completions(real_server, n=8, seed=3, temperature=temperature,
                                     **{option: value}))
    assert flags.all()
    # Sampled (not greedy) up to the edge of the support, not from a narrower one (k - 1
    # tokens, or a nucleus without the token whose mass reaches top_p).
    assert last.any()
    # Without the option: some choice has a token outside (checked on the choices whose
    # bytes can be recovered from their text).
    unrestricted = completions(real_server, n=8, seed=3, temperature=temperature)
    plain = [c for c in unrestricted if c["text"].isascii()]
    assert len(plain) >= 4
    flags, _ = inside(plain)
    assert not flags.all()


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "3"},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
])
def test_bad_chat_requests_get_400(server, body, param):
    client, _ = server
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_choices_stream_with_stop_strings(server):
    """n choices of a chat stream each end at the request's stop string; the content is
    the script continued after the plain template's prompt."""
    client, _ = server
    messages = [{"role": "user", "content": "Q"}]
    prompt_len = len("User: Q\nAssistant:")
    request = {"messages": messages, "max_tokens": 20, "n": 2, "stop": [". g"], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=request) as r:
        chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    texts, finish = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
    text = scripted_text(SCRIPT, prompt_len, 20)
    assert texts == [text[: text.index(". g")]] * 2 and finish == ["stop", "stop"]


def test_tokenizer_endpoints(server):
    client, _ = server
    info = client.get("/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["model_max_length"]) == ("<eos>", "<bos>", 64)
    # The chat template a client renders itself (lm-eval's remote tokenizer): the server's
    # own plain template (it was null, and lm-eval refused chat), rendered as Jinja, as
    # transformers renders one, writes exactly the chat endpoint's prompt.
    import itertools

    import jinja2

    from open_mythos.integrations.textgen import chat_prompt

    # (lm-eval's plain Environment, and transformers' trim_blocks/lstrip_blocks, which
    # deleted the newlines after block tags)
    templates = [jinja2.Environment().from_string(info["chat_template"]),
                 jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
                     info["chat_template"])]
    for template, messages in itertools.product(templates, ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
                     [])):
        for gen in (True, False):
            assert template.render(messages=messages, add_generation_prompt=gen) == \
                chat_prompt(ByteTokenizer(), messages, add_generation_prompt=gen)[0], (messages, gen)
    assert client.post("/tokenize", json={"prompt": "hé"}).json()["tokens"] == [104, 195, 169]
    assert client.post("/tokenize", json={"prompt": "<eos>"}).json()["tokens"] == [258]
    # A completion's text prompt is encoded as /tokenize encodes it.
    for text in ("hé", "<eos>", "<bos>"):
        count = client.post("/tokenize", json={"prompt": text}).json()["count"]
        r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
        assert r.json()["usage"]["prompt_tokens"] == count
    assert client.post("/detokenize", json={"tokens": [104, 195, 169]}).json() == {"prompt": "hé"}
    r = client.post("/detokenize", json={"tokens": [5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_a_padded_vocabulary_never_reaches_the_client():
    """A model with more embedding rows than the tokenizer has ids (320 against 259), whose
    script puts ids 300 and 310 on top: greedy decoding and logprobs stay within the
    tokenizer's ids, as the text paths do (they were a 500: "token id 300 is outside
    [0, 259)"); prompts and logprobs asking beyond them are a 400."""
    tok = ByteTokenizer()
    model = ScriptedModel([ord("a"), 300, ord("b"), 310], vocab_size=320)
    service = CompletionService(model, tok, model_name="pad", n_loops=2,
                                limits=ServeLimits(max_logprobs=1000))
    with running_server(service) as client:
        r = client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 6,
                                                 "temperature": 0, "logprobs": 3})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        # The reference: full forwards, the argmax over the tokenizer's ids.
        ids = tok.encode("Q")
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids]), 2)[0, -1, :tok.vocab_size].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
        assert choice["text"] == tok.decode(ids[1:])
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"]
        assert all(len(top) == 3 for top in lp["top_logprobs"])
        for path, body in (("/v1/completions", {"prompt": [300], "echo": True}),
                           ("/v1/completions", {"prompt": "Q", "logprobs": 260}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Q"}],
                                                     "logprobs": True, "top_logprobs": 300})):
            r = client.post(path, json={"max_tokens": 1, **body})
            assert r.status_code == 400, (body, r.text)
            assert "259" in r.json()["error"]["message"]


def test_stop_string_tokens_are_left_out_of_the_logprobs(server):
    """The text ends before the stop string: so do the logprobs, and every text_offset
    falls inside the text (the stop string's tokens were listed past its end)."""
    client, _ = server
    r = client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 20, "stop": [". g"],
                                             "logprobs": 1, "temperature": 0})
    choice = r.json()["choices"][0]
    text = scripted_text(SCRIPT, 1, 20)
    assert choice["text"] == text[: text.index(". g")] and choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == list(range(len(choice["text"])))
    # Ended by length, every token is listed (the last one's text included).
    r = client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 5, "logprobs": 0})
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 5


@pytest.mark.parametrize("stream", [False, True])
def test_a_token_held_back_as_a_stop_prefix_is_not_listed_with_the_text_before_it(stream):
    """Text "nt a t the": after "t " the text " t" is shown, while the last " " waits as
    the start of the stop string " the". Its logprob went out with " t", so the choice
    listed the stop string's first token (text_offset == len(text))."""
    model = ScriptedModel(b"nt a t the end ", real_positions=True)
    body = {"prompt": "Q", "max_tokens": 14, "stop": " the", "logprobs": 0,
            "temperature": 0, "stream": stream}
    with running_server(CompletionService(model, ByteTokenizer(), model_name="tiny",
                                          n_loops=2)) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: {")]
            text = "".join(e["choices"][0]["text"] for e in events)
            tokens = [t for e in events if e["choices"][0]["logprobs"]
                      for t in e["choices"][0]["logprobs"]["tokens"]]
            offsets = [o for e in events if e["choices"][0]["logprobs"]
                       for o in e["choices"][0]["logprobs"]["text_offset"]]
        else:
            choice = client.post("/v1/completions", json=body).json()["choices"][0]
            text, tokens = choice["text"], choice["logprobs"]["tokens"]
            offsets = choice["logprobs"]["text_offset"]
    assert text == "nt a t"
    assert "".join(tokens) == text and offsets == list(range(len(text)))


def test_a_fixed_depth_model_refuses_n_loops_and_shows_no_loop_fields():
    service = CompletionService(byte_baseline(), ByteTokenizer(), model_name="dense")
    card = service.model_card()
    assert card["looped"] is False
    assert card["max_loop_iters"] is None and card["max_n_loops"] is None
    with pytest.raises(APIError, match="fixed-depth") as err:
        service.prepare_completion(CompletionRequest(prompt="Q", n_loops=2))
    assert err.value.param == "n_loops"
    service.prepare_completion(CompletionRequest(prompt="Q"))  # without it: fine
    service.close()


def test_a_default_exit_rule_applies_to_requests_that_set_none():
    """The server's default exit rule (``openmythos serve``: an export's configured one)
    runs for requests without the field; ``"exit_rule": null`` runs none and a request's
    own rule replaces it. Reference: our greedy generate with each rule."""
    from open_mythos import ExitRule
    from open_mythos.inference import generate
    from tests.integrations.conftest import byte_model

    model = byte_model("gqa", use_act=False)
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.5)  # loops that change the output
    torch.nn.init.normal_(model.embed.weight, std=0.02)
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("Hello")])

    def text(**kw):
        return tok.decode(generate(model, ids, 8, 4, do_sample=False, **kw)[0, 5:])

    rule, own = ExitRule(entropy=1e9), ExitRule(argmax_streak=2)
    assert len({text(exit_rule=rule), text(), text(exit_rule=own)}) > 1
    service = CompletionService(model, tok, model_name="m", n_loops=4, exit_rule=rule)
    with running_server(service) as client:
        card = client.get("/v1/models/m").json()
        assert card["default_exit_rule"] == {"kl": None, "entropy": 1e9, "rel_change": None,
                                             "argmax_streak": None, "min_loops": 1}
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
        for extra, want in (({}, text(exit_rule=rule)), ({"exit_rule": None}, text()),
                            ({"exit_rule": {"argmax_streak": 2}}, text(exit_rule=own))):
            got = client.post("/v1/completions", json=body | extra).json()
            assert got["choices"][0]["text"] == want, extra
    with pytest.raises(ValueError, match="needs a looped model"):
        CompletionService(byte_baseline(), tok, exit_rule=rule)


def test_a_default_depth_above_the_cap_is_refused_at_start():
    model = ScriptedModel(SCRIPT)
    with pytest.raises(ValueError, match="above this server's cap of 8"):
        CompletionService(model, ByteTokenizer(), n_loops=50,
                          limits=ServeLimits(max_n_loops=8))


def test_a_listening_socket_claims_its_port():
    """Two servers on one port: the second fails when it binds (before its model loads).
    Bound with SO_REUSEADDR but not listening, both binds succeeded and the second server
    failed only once uvicorn listened, after the load."""
    from open_mythos.integrations.server import listening_socket

    with listening_socket("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", port).close()


def test_tokenize_with_special_tokens_for_a_tokenizer_without_bos():
    """vLLM's default ``add_special_tokens: true`` was a 400 ("no BOS token") for a
    tokenizer without BOS (GPT-2's kind); it adds what the tokenizer has: nothing."""
    import types

    class NoBos(ByteTokenizer):
        bos_token_id = None

    service = types.SimpleNamespace(tokenizer=NoBos())
    assert CompletionService.encode_text(service, "hé", add_special_tokens=True) == [104, 195, 169]
    with_bos = types.SimpleNamespace(tokenizer=ByteTokenizer())
    assert CompletionService.encode_text(with_bos, "h", add_special_tokens=True) == [257, 104]


def test_echo_returns_the_prompt_as_sent():
    """``echo`` returned the prompt decoded: a tokenizer that normalises text (BERT's lower
    case and spaced punctuation) echoed ``don ' t stop`` for ``Don't stop``, and a client
    that cuts ``len(prompt)`` characters off the echo got a wrong completion. Now the text
    sent, as OpenAI and vLLM echo it; token ids, and text whose logprobs' offsets count
    the decoded text, as they decode."""
    from open_mythos import OpenMythos
    from tests.conftest import tiny_config
    from tests.integrations.conftest import hf_tokenizers

    wp = hf_tokenizers()["wordpiece"]
    model = OpenMythos(tiny_config(vocab_size=wp.vocab_size)).eval()
    service = CompletionService(model, wp, model_name="tiny", n_loops=1)
    text = "Don't stop"
    ids = wp.encode(text)
    decoded = wp.decode_piece(ids)
    assert decoded != text  # the tokenizer does normalise it
    for prompt, logprobs, want in ((text, None, text), ([text, text], None, text),
                                   (ids, None, decoded), (text, 1, decoded)):
        call = service.prepare_completion(CompletionRequest(
            prompt=prompt, echo=True, max_tokens=1, logprobs=logprobs))
        assert set(call.echo_texts) == {want}, (prompt, logprobs)
    call = service.prepare_completion(CompletionRequest(prompt=text, max_tokens=1))
    assert call.echo_texts == [""]


def test_a_prompt_that_is_any_special_tokens_name_is_that_token():
    """Only BOS, EOS and the pad token were taken for their names: ``<|endoftext|>`` or an
    added token marked special (Llama 3's kind) was encoded as its characters, and the
    server's greedy continuation differed from the one documented. An unknown name is text
    (a tokenizer gives <unk>'s id for a name it lacks)."""
    import types

    from tokenizers import AddedToken

    from open_mythos.tokenizers import MythosTokenizer
    from tests.integrations.conftest import hf_tokenizers

    for kind in ("byte-level", "sentencepiece", "wordpiece"):
        hf = hf_tokenizers()[kind].tokenizer
        hf.add_tokens([AddedToken("<|endoftext|>", special=True)])
        tok = MythosTokenizer.from_tokenizer(hf)
        service = types.SimpleNamespace(tokenizer=tok)
        marked = hf.convert_tokens_to_ids("<|endoftext|>")
        assert CompletionService.encode_text(service, "<|endoftext|>") == [marked]
        for name in hf.all_special_tokens:
            assert CompletionService.encode_text(service, name) == [
                hf.convert_tokens_to_ids(name)], (kind, name)
        for text in ("zzqx", "a<|endoftext|>", "<|endoftext|> "):
            assert CompletionService.encode_text(service, text) == tok.encode(text), (kind, text)
            assert marked not in CompletionService.encode_text(service, text)
