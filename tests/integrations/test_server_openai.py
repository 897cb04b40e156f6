"""Real clients against a real server on the trained tiny model: the official ``openai``
package (completions and chat, streaming and not), and logprobs checked against a full
forward of the model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.integrations.openai_api import ChatMessage, render_chat  # noqa: E402
from open_mythos.integrations.server import CompletionService  # noqa: E402
from open_mythos.integrations.textgen import PLAIN_CHAT_STOP, GenerationOptions, complete  # noqa: E402
from tests.integrations.conftest import TRAINED_LOOPS  # noqa: E402
from tests.integrations.test_server import running_server  # noqa: E402

TOK = ByteTokenizer()
PROMPT = "the dog sat on "
MESSAGES = [{"role": "system", "content": "a cat"}, {"role": "user", "content": "the dog"}]


@pytest.fixture(scope="module")
def client(trained_model):
    service = CompletionService(trained_model, TOK, model_name="tiny", n_loops=TRAINED_LOOPS)
    with running_server(service) as http:
        yield openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", max_retries=0,
                            timeout=30.0)


def greedy(model, prompt: str, max_tokens: int, stop: tuple[str, ...] = ()):
    """The unbatched library path's greedy completion of ``prompt``."""
    options = GenerationOptions(max_new_tokens=max_tokens, n_loops=TRAINED_LOOPS,
                                do_sample=False, stop=stop)
    return complete(model, TOK, [TOK.encode(prompt)], options)[0]


def test_completions_with_the_openai_client(client, trained_model):
    expected = greedy(trained_model, PROMPT, 20)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    [choice] = r.choices
    assert (choice.text, choice.finish_reason) == (expected.text, expected.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT), 20)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20,
                                            temperature=0, stream=True))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_clients_get_their_unbatched_greedy_text(client, trained_model):
    """Eight clients at once (decoded in one batch) each get the text the unbatched path
    gives their prompt alone."""
    prompts = ["the cat", "a dog sat on", "the log. a", "on the m", "a", "the dog sat on the",
               "cat and a dog", "sat"]
    expected = [greedy(trained_model, p, 24).text for p in prompts]
    assert len(set(expected)) == len(expected)

    def ask(prompt: str) -> str:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == expected
    health = httpx.get(str(client.base_url).removesuffix("v1/") + "health").json()
    assert health["peak_batch"] >= 4  # they were decoded together


def test_chat_with_the_openai_client(client, trained_model):
    prompt, stops = render_chat(TOK, [ChatMessage(**m) for m in MESSAGES])
    assert prompt == "System: a cat\nUser: the dog\nAssistant:" and stops == (PLAIN_CHAT_STOP,)
    expected = greedy(trained_model, prompt, 12, stops)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                       temperature=0)
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 12)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # Without max_tokens a chat reply may run to the end of the context.
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= trained_model.cfg.max_seq_len
    # A conversation that fills the context is a 400 saying so (it was a 200 with "").
    frame = len(render_chat(TOK, [ChatMessage(role="user", content="")])[0])
    full = [{"role": "user", "content": "a" * (trained_model.cfg.max_seq_len - frame)}]
    assert len(render_chat(TOK, [ChatMessage(**m) for m in full])[0]) == \
        trained_model.cfg.max_seq_len
    with pytest.raises(openai.BadRequestError, match="fills the context"):
        client.chat.completions.create(model="tiny", messages=full, temperature=0)


def test_tool_messages_with_their_call_ids(client):
    """A conversation replayed from a tool-using client: the tool message carries its
    ``tool_call_id`` (it was refused as an unknown field); only a tool message may."""
    tool = [*MESSAGES, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    prompt, _ = render_chat(TOK, [ChatMessage(**m) for m in tool])
    assert prompt == "System: a cat\nUser: the dog\nTool: 42\nAssistant:"
    r = client.chat.completions.create(model="tiny", messages=tool, max_tokens=2)
    assert r.usage.prompt_tokens == len(prompt)
    with pytest.raises(openai.BadRequestError, match="tool_call_id belongs to a tool message"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "tool_call_id": "call_1", "content": "hi"}])


def test_a_chat_template_sees_name_and_tool_call_id():
    pytest.importorskip("transformers")
    from open_mythos.integrations.hf import byte_tokenizer_for_transformers
    from open_mythos.tokenizers import MythosTokenizer

    hf = byte_tokenizer_for_transformers()
    hf.chat_template = ("{% for m in messages %}<{{ m['role'] }}"
                        "{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}"
                        "{% if m.name %} {{ m.name }}{% endif %}>{{ m['content'] }}\n"
                        "{% endfor %}")
    tok = MythosTokenizer.from_tokenizer(hf)
    messages = [ChatMessage(role="user", name="ann", content="2+2?"),
                ChatMessage(role="tool", tool_call_id="c7", content="4")]
    assert render_chat(tok, messages) == ("<user ann>2+2?\n<tool c7>4\n", ())


def shown(token_id: int) -> str:
    """How logprobs name a byte-tokenizer token: ASCII as itself, any other byte as
    ``bytes:\\xNN`` (one byte is not a character), special tokens by name."""
    if token_id < 128:
        return chr(token_id)
    return f"bytes:\\x{token_id:02x}" if token_id < 256 else TOK.decode([token_id], False)


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) log-probabilities of each next token, from one full forward."""
    return model(torch.tensor([ids]), TRAINED_LOOPS)[0, :-1].float().log_softmax(-1)


def test_echo_logprobs_match_a_full_forward(client, trained_model):
    """What lm-eval's local-completions asks for: the prompt's tokens with their
    logprobs (echo), then the generated ones, each with its top alternatives."""
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                  echo=True, logprobs=3)
    [choice] = r.choices
    lp = choice.logprobs
    ids = TOK.encode(choice.text)
    assert choice.text.startswith(PROMPT) and lp.tokens == [chr(i) for i in ids]
    assert len(ids) == len(PROMPT) + 6 and lp.token_logprobs[0] is None
    ref = reference_logprobs(trained_model, ids)
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=0)
    for p, top in enumerate(lp.top_logprobs[1:]):
        # The top 3, and the chosen token as OpenAI's (up to logprobs + 1 entries).
        values, best = ref[p].topk(3)
        chosen = ids[p + 1]
        want = best.tolist() + ([] if chosen in best.tolist() else [chosen])
        assert list(top) == [shown(i) for i in want]
        torch.testing.assert_close(torch.tensor(list(top.values())), ref[p][want], atol=1e-4,
                                   rtol=0)
    # Greedy: every generated token is its position's most likely one.
    generated = lp.top_logprobs[len(PROMPT):]
    assert all(max(top.values()) == lp.token_logprobs[len(PROMPT) + k]
               for k, top in enumerate(generated))
    assert lp.text_offset == list(range(len(ids)))
    # logprobs=0: each token's entry holds the chosen token alone (it was empty).
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                  echo=True, logprobs=0)
    zero = r.choices[0].logprobs
    assert zero.top_logprobs[0] is None
    assert [dict(t) for t in zero.top_logprobs[1:]] == [
        {tok: lp} for tok, lp in zip(zero.tokens[1:], zero.token_logprobs[1:])]
    # max_tokens 0 with echo: the prompt's logprobs alone (the scoring request).
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(PROMPT)]


def test_text_offsets_count_characters_across_multi_byte_tokens(client):
    """``text_offset`` is a character offset into the returned text. A byte token used to
    advance it by the length of its display string (``bytes:\\xc3``: 10), so every
    offset after a non-ASCII character pointed past the end of the text."""
    prompt = "é!€a"  # bytes c3 a9 21 e2 82 ac 61
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=0)
    assert r.choices[0].logprobs.text_offset == [0, 0, 1, 2, 2, 2, 3]
    # With generated tokens after the echo, streamed or not: offsets never decrease, stay
    # inside the text, and the generated ones count from the end of the prompt.
    kw = dict(model="tiny", prompt=prompt, max_tokens=6, echo=True, logprobs=0, temperature=0)
    lp = client.completions.create(**kw).choices[0].logprobs
    text = client.completions.create(**kw).choices[0].text
    offsets = lp.text_offset
    assert offsets[:7] == [0, 0, 1, 2, 2, 2, 3] and offsets[7] == len(prompt)
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    streamed = [o for chunk in client.completions.create(**kw, stream=True)
                for o in (chunk.choices[0].logprobs.text_offset
                          if chunk.choices[0].logprobs else [])]
    assert streamed == offsets
    # An invalid byte is one character: the token after it starts one further on.
    r = client.completions.create(model="tiny", prompt=[0x80, 0x61, 0xE2, 0x82, 0x62],
                                  max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].text == "\ufffda\ufffdb"
    assert r.choices[0].logprobs.text_offset == [0, 1, 2, 2, 3]


def test_chat_logprobs_match_a_full_forward(client, trained_model):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    prompt, _ = render_chat(TOK, [ChatMessage(**m) for m in MESSAGES])
    ids = TOK.encode(prompt + r.choices[0].message.content)
    ref = reference_logprobs(trained_model, ids)[len(prompt) - 1:]
    assert [c.token for c in content] == list(r.choices[0].message.content)
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]),
                               ref.max(-1).values, atol=1e-4, rtol=0)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    # ``bytes`` holds the token's raw bytes: one byte for a byte token that is not a
    # character (shown as ``bytes:\\xNN``), not the UTF-8 of that display string.
    for c, row in zip(content, ref):
        best = row.topk(2).indices.tolist()
        assert [t.token for t in c.top_logprobs] == [shown(i) for i in best]
        assert [t.bytes for t in c.top_logprobs] == [raw_bytes(i) for i in best]
    assert content[0].bytes == raw_bytes(ids[len(prompt)])


def raw_bytes(token_id: int) -> list[int]:
    return [token_id] if token_id < 256 else list(TOK.decode([token_id], False).encode())


def test_chat_logprobs_give_a_byte_token_its_raw_byte():
    from open_mythos.integrations.openai_api import chat_logprobs
    from open_mythos.serving.jobs import TokenLogprob

    [entry] = chat_logprobs([TokenLogprob(0xc3, shown(0xc3), -0.5, ((0xc3, shown(0xc3), -0.5),
                                                                     (0x61, "a", -1.0)))])
    assert entry["token"] == "bytes:\\xc3" and entry["bytes"] == [0xc3]
    assert [t["bytes"] for t in entry["top_logprobs"]] == [[0xc3], [0x61]]


def test_lm_eval_local_completions_scores_like_the_in_process_model(client, trained_model):
    """lm-eval's ``local-completions`` model (its remote tokenizer, loglikelihood through
    echo + logprobs, generate_until) against the server, compared with lm-eval's
    in-process ``openmythos`` model on the same requests."""
    pytest.importorskip("tenacity")  # lm-eval's "api" extra
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from open_mythos.integrations.lm_eval import OpenMythosLM

    remote = LocalCompletionsAPI(base_url=f"{client.base_url}completions", model="tiny",
                                 tokenizer_backend="auto", num_concurrent=2, max_retries=1,
                                 max_length=64)
    assert remote.tokenizer_backend == "remote"
    local = OpenMythosLM(pretrained=trained_model, tokenizer=TOK, n_loops=TRAINED_LOOPS)
    pairs = [("the cat sat on the", " mat"), ("the cat sat on the", " dog"), ("a dog", " sat")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got, expected = remote.loglikelihood(requests), local.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in expected]
    torch.testing.assert_close(torch.tensor([s for s, _ in got], dtype=torch.float64),
                               torch.tensor([s for s, _ in expected], dtype=torch.float64),
                               atol=1e-3, rtol=0)
    assert got[0][0] > got[1][0]  # the corpus has "on the mat", not "on the dog"
    until = [Instance("generate_until", {}, ("the dog", {"until": ["."], "max_gen_toks": 12}), 0)]
    assert remote.generate_until(until) == [greedy(trained_model, "the dog", 12, (".",)).text]


TINY_TASK = """task: tiny_cats
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
TINY_DOCS = [
    {"context": "the cat sat on the", "choices": [" mat", " dog", " xyz"], "label": 0},
    {"context": "the dog sat on the", "choices": [" log", " cat", " qqq"], "label": 0},
    {"context": "a cat and a", "choices": [" dog", " zzz"], "label": 0},
    {"context": "the dog sat", "choices": [" on", " in"], "label": 1},
]


@pytest.mark.slow
def test_lm_eval_runs_a_local_task_through_the_server(client, trained_model, tmp_path):
    """A whole lm-eval task (multiple choice, from local files) with local-completions
    against the server gives the per-document results of the in-process model."""
    pytest.importorskip("tenacity")
    import json

    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from open_mythos.integrations.lm_eval import OpenMythosLM

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in TINY_DOCS))
    (tmp_path / "tiny_cats.yaml").write_text(TINY_TASK.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path))
    remote = LocalCompletionsAPI(base_url=f"{client.base_url}completions", model="tiny",
                                 tokenizer_backend="remote", num_concurrent=4, max_retries=1,
                                 max_length=64)
    local = OpenMythosLM(pretrained=trained_model, tokenizer=TOK, n_loops=TRAINED_LOOPS)
    results = [lm_eval.simple_evaluate(model=lm, tasks=["tiny_cats"], task_manager=tasks,
                                       num_fewshot=0, log_samples=True)
               for lm in (remote, local)]
    served, in_process = ([s["acc"] for s in r["samples"]["tiny_cats"]] for r in results)
    assert served == in_process and len(served) == len(TINY_DOCS)
    assert 0 < sum(served) < len(TINY_DOCS)  # neither all right nor all wrong


def test_a_tokenizer_with_a_chat_template_renders_the_conversation():
    """A Hugging Face tokenizer's own chat template is used (no implicit stop string);
    the plain template is only for tokenizers without one."""
    pytest.importorskip("transformers")
    from open_mythos.integrations.hf import byte_tokenizer_for_transformers
    from open_mythos.tokenizers import MythosTokenizer

    hf = byte_tokenizer_for_transformers()
    hf.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [ChatMessage(**m) for m in MESSAGES]
    assert render_chat(MythosTokenizer.from_tokenizer(hf), messages) == (
        "<system>a cat\n<user>the dog\n<assistant>", ())
