"""Text streaming: UTF-8 hold-back, stop strings, EOS, batching."""

from __future__ import annotations

import codecs
import random

import pytest
import torch

from open_mythos import ByteTokenizer
from open_mythos.integrations.textgen import (
    GenerationOptions,
    TextSequence,
    complete,
    encode_prompts,
    stream_text,
    validate,
)
from tests.integrations.conftest import (
    TRAINED_LOOPS,
    ScriptedModel,
    in_support,
    scripted_text,
)

TOK = ByteTokenizer()


def feed(seq: TextSequence, data: bytes) -> list[str]:
    out = []
    for b in data:
        out.append(seq.push(b))
        if seq.finish_reason is not None:
            break
    return out


def test_multibyte_characters_are_emitted_whole():
    seq = TextSequence(TOK, ())
    deltas = feed(seq, "é🌍a".encode())
    assert deltas == ["", "é", "", "", "", "🌍", "a"]
    assert seq.finish("length") == ""


def test_invalid_bytes_are_not_held_forever():
    seq = TextSequence(TOK, ())
    deltas = feed(seq, b"A\x80\x80\x80\x80\x80")
    assert deltas[0] == "A" and "".join(deltas).startswith("A\ufffd")
    assert "".join(deltas) + seq.finish("length") == b"A\x80\x80\x80\x80\x80".decode(errors="replace")


def char_starts(data: bytes) -> list[int]:
    """For each byte, the index of the character it belongs to in ``data`` decoded with
    replacement: from the decoder's own segmentation (each error span is one U+FFFD)."""
    spans: list[tuple[int, int]] = []

    def record(err: UnicodeDecodeError) -> tuple[str, int]:
        spans.append((err.start, err.end))
        return "\ufffd", err.end

    codecs.register_error("test_char_starts", record)
    data.decode("utf-8", errors="test_char_starts")
    starts, i, char = [], 0, 0
    while i < len(data):
        span = next((e for s, e in spans if s == i), None)
        if span is None:  # a valid character: its length from its lead byte
            lead = data[i]
            span = i + (1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4)
        starts += [char] * (span - i)
        i, char = span, char + 1
    return starts


def test_offsets_are_where_each_tokens_character_starts():
    """``last_offset`` of every byte token is the index of its character in the final
    text, invalid and truncated sequences included (a token after an invalid byte was
    placed one character early)."""
    rng = random.Random(0)
    pieces = [b"a", b"Z", "é".encode(), "€".encode(), "🌍".encode(), b"\x80", b"\xc3",
              b"\xe2\x82", b"\xf0\x9f\x8c", b"\xff"]
    for _ in range(200):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        seq = TextSequence(TOK, ())
        offsets = []
        for b in data:
            seq.push(b)
            offsets.append(seq.last_offset)
        assert offsets == char_starts(data), data
    seq = TextSequence(TOK, ())
    feed(seq, b"\x80a")
    seq.add(TOK.eos_token_id, TOK.eos_token_id)
    assert seq.last_offset == 2  # EOS: after all the text


def test_stop_string_is_cut_and_never_streamed():
    seq = TextSequence(TOK, ("o w", "zzz"))
    deltas = feed(seq, b"hello world")
    assert seq.finish_reason == "stop"
    assert "".join(deltas) == "hell"
    assert all("o" not in d for d in deltas)  # "o" was held back as a possible stop start
    assert seq.n_tokens == len("hello w")


def test_held_back_prefix_is_released_when_no_stop_follows():
    seq = TextSequence(TOK, ("ab!",))
    deltas = feed(seq, b"xabyab")
    assert "".join(deltas) == "xaby"  # the final "ab" may still become "ab!"
    assert seq.finish("length") == "ab"


def test_stream_text_batches_left_padded_prompts_with_stop_strings():
    script = b"one two three four "
    model = ScriptedModel(script)
    prompts = encode_prompts(TOK, ["Q", "a longer prompt", ""])
    # An empty prompt starts after EOS, as a training document does (a text run never saw
    # BOS); a task run's tokenizer starts it from BOS.
    assert prompts[2] == [TOK.eos_token_id]
    from open_mythos.tokenizers import task_tokenizer

    assert encode_prompts(task_tokenizer(), [""]) == [[TOK.bos_token_id]]
    width = max(map(len, prompts))  # left padding: every row continues at position 15
    options = GenerationOptions(max_new_tokens=30, n_loops=2, do_sample=False, stop=("thr",))
    got = complete(model, TOK, prompts, options)
    expected = scripted_text(script, width, 30)
    assert expected.startswith("four one two three")
    assert [c.text for c in got] == ["four one two "] * 3
    assert [(c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in got] == [
        ("stop", 1, 16), ("stop", 15, 16), ("stop", 1, 16)]
    assert set(model.calls) == {2}


def test_eos_and_max_new_tokens_end_a_sequence():
    script = list(b"one two") + [TOK.eos_token_id]
    model = ScriptedModel(script)
    done = complete(model, TOK, [[65]], GenerationOptions(max_new_tokens=40, seed=0))
    assert (done[0].text, done[0].finish_reason) == ("one two", "stop")  # sampled, p ~ 1
    assert done[0].completion_tokens == len(script)  # the EOS counts
    short = complete(model, TOK, [[65]], GenerationOptions(max_new_tokens=3))
    assert (short[0].text, short[0].finish_reason, short[0].completion_tokens) == ("one", "length", 3)


def test_every_sequence_gets_exactly_one_final_delta():
    model = ScriptedModel(b"abcdef")
    deltas = list(stream_text(model, TOK, [[65], [66, 67]], GenerationOptions(max_new_tokens=0)))
    assert [(d.index, d.text, d.finish_reason) for d in deltas] == [(0, "", "length"), (1, "", "length")]


@pytest.mark.parametrize("options, prompts, match", [
    (GenerationOptions(max_new_tokens=100), [[1, 2]], "exceeds the model's context"),
    (GenerationOptions(temperature=0.0), [[1]], "temperature"),
    (GenerationOptions(n_loops=0), [[1]], "n_loops"),
    (GenerationOptions(), [[300]], "outside"),
    (GenerationOptions(), [], "no prompt"),
    (GenerationOptions(draft_tokens=2, draft_lens="none"), [[1]], "draft_lens"),
])
def test_validate_rejects_bad_requests_before_generating(options, prompts, match):
    with pytest.raises(ValueError, match=match):
        validate(ScriptedModel(b"a"), prompts, options)


def test_the_draft_lens_reaches_speculative_decoding(trained_model, monkeypatch):
    """Output is the same through either lens, so follow the option to the drafts."""
    from open_mythos.integrations import textgen

    seen = []
    real = textgen.speculative_stream

    def spy(*args, **kwargs):
        seen.append(kwargs["draft_lens"])
        return real(*args, **kwargs)

    monkeypatch.setattr(textgen, "speculative_stream", spy)
    prompts = [TOK.encode("the cat ")]
    outs = [complete(trained_model, TOK, prompts, GenerationOptions(
        max_new_tokens=8, do_sample=False, draft_tokens=3, draft_lens=lens))
        for lens in ("coda", "head")]
    assert seen == ["coda", "head"] and outs[0] == outs[1]


# Sampling on a real trained model -------------------------------------------------------
PROMPT = "the cat sat on the "


def sample(model, n: int = 4, **options) -> list:
    opts = GenerationOptions(**{"max_new_tokens": 16, "n_loops": TRAINED_LOOPS, **options})
    return complete(model, TOK, [TOK.encode(PROMPT)] * n, opts)


def test_seed_reproduces_a_sampled_batch_and_rows_differ(trained_model):
    first = [c.text for c in sample(trained_model, seed=5)]
    assert [c.text for c in sample(trained_model, seed=5)] == first
    assert [c.text for c in sample(trained_model, seed=6)] != first
    assert len(set(first)) > 1  # each row of a batch draws its own tokens


@pytest.mark.parametrize("option, value", [("top_k", 2), ("top_p", 0.5)])
def test_top_k_and_top_p_sample_only_inside_their_support(trained_model, option, value):
    """Every sampled token is inside the top-k set / the nucleus of the distribution it was
    drawn from, recomputed by a full forward; without the option some token is not."""
    temperature = 1.5  # flattens the distributions: more tokens outside the support
    prompt = TOK.encode(PROMPT)

    def inside(completions) -> tuple[torch.Tensor, torch.Tensor]:
        return in_support(trained_model, prompt, [(c.text, c.finish_reason) for c in completions],
                          option, value, temperature)

    flags, last = inside(sample(trained_model, n=8, seed=0, temperature=temperature,
                                **{option: value}))
    assert flags.all()
    # Sampled (not greedy) up to the edge of the support, not from a narrower one (k - 1
    # tokens, or a nucleus without the token whose mass reaches top_p).
    assert last.any()
    flags, _ = inside(sample(trained_model, n=8, seed=0, temperature=temperature))
    assert not flags.all()  # the check can tell: unrestricted sampling leaves the support


def test_a_model_with_more_rows_than_its_tokenizer_never_emits_an_undecodable_id():
    """A vocabulary padded past the tokenizer's ids (model.vocab_size=320 over the byte
    tokenizer's 259): sampling an id the tokenizer cannot decode crashed generate and the
    server mid-answer. Text generation is bounded by the tokenizer's ids."""
    from tests.integrations.conftest import byte_model

    model = byte_model("gqa", vocab_size=320)
    with torch.no_grad():  # make the padding rows the most likely next tokens
        model.embed.weight[TOK.vocab_size:] *= 50
    prompts = encode_prompts(TOK, ["the cat", "a"])
    sampled = GenerationOptions(max_new_tokens=20, n_loops=2, do_sample=True,
                                temperature=5.0, seed=0)
    greedy = GenerationOptions(max_new_tokens=20, n_loops=2, do_sample=False)
    for options in (sampled, greedy):
        for choice in complete(model, TOK, prompts, options):
            assert choice.completion_tokens > 0
    from open_mythos.inference import generate

    raw = generate(model, torch.tensor([prompts[0]]), 20, 2, do_sample=False)
    assert (raw >= TOK.vocab_size).any()  # without the bound the padded rows do win


def test_a_prompt_the_tokenizer_cannot_encode_is_refused_and_a_lossy_one_named(tmp_path):
    """A BPE without an unknown token drops characters it has no token for: "中文" encoded
    to nothing and the model answered an empty prompt without a word."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from open_mythos.integrations.textgen import lossy_readback
    from open_mythos.tokenizers import MythosTokenizer

    bpe = tokenizers.Tokenizer(models.BPE())  # no unk_token
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.BPEDecoder()
    bpe.train_from_iterator(["hello the world"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["</s>"], show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>").save_pretrained(
        tmp_path / "tok")
    tok = MythosTokenizer(str(tmp_path / "tok"))
    assert tok.encode("中文") == []
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_prompts(tok, ["中文"])
    assert encode_prompts(tok, ["  "]) == [[tok.eos_token_id]]  # blank: an empty prompt
    ids = encode_prompts(tok, ["hello 中文 world"])[0]
    assert lossy_readback(tok, "hello 中文 world", ids) == tok.decode(ids) != "hello 中文 world"
    assert lossy_readback(tok, "hello world", encode_prompts(tok, ["hello world"])[0]) is None
    assert lossy_readback(TOK, "中文 ✓", encode_prompts(TOK, ["中文 ✓"])[0]) is None
