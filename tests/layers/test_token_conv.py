"""The causal convolution over the token embeddings (``MythosConfig.token_conv``).

References: a float64 loop over positions for the layer; the full forward (no cache, no
padding) for every cached, padded, fixed-shape, batched-serving, speculative and
``transformers`` path, which must read the convolution's past from the cache.
"""

from __future__ import annotations

import pytest
import torch

from open_mythos import MythosConfig
from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.inference import KVCache, generate
from open_mythos.inference.speculative import speculative_generate
from open_mythos.inference.static import CompiledDecoder
from open_mythos.layers import AttnContext, TokenConv
from open_mythos.layers.rope import rope_cos_sin
from open_mythos.model import OpenMythos
from tests.conftest import halting_model, tiny_config

WIDTH = 4


def model_of(kind: str, seed: int = 0, **overrides):
    if kind == "dense":
        torch.manual_seed(seed)
        return DenseBaseline(matched_baseline_config(tiny_config("gqa", token_conv=WIDTH,
                                                                 **overrides), 3)).eval()
    return halting_model(kind, seed=seed, token_conv=WIDTH, **overrides)


@pytest.fixture(params=["gqa", "mla", "dense"])
def model(request):
    return model_of(request.param)


def test_layer_equals_a_float64_loop():
    torch.manual_seed(0)
    conv = TokenConv(6, WIDTH)
    x = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # left padding: contributes nothing to later positions
    cos, sin = rope_cos_sin(torch.arange(9), 2, 1e4)
    got = conv(x, AttnContext(cos, sin, token_mask=mask))
    w, xd = conv.weight.detach().double(), x.double()
    want = xd.clone()
    for b in range(2):
        for t in range(9):
            for j in range(WIDTH):  # j positions back: column WIDTH - 1 - j
                if t - j >= 0 and mask[b, t - j]:
                    want[b, t] += w[:, WIDTH - 1 - j] * xd[b, t - j]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_width_is_checked():
    with pytest.raises(ValueError, match="token_conv"):
        MythosConfig(**{**tiny_config().__dict__, "token_conv": -1})
    with pytest.raises(ValueError, match="width"):
        TokenConv(4, 0)


def test_parameters_exist_only_when_enabled():
    on, off = model_of("gqa"), halting_model("gqa")
    assert "token_conv.weight" in dict(on.named_parameters())
    assert not any("token_conv" in n for n, _ in off.named_parameters())
    assert on.cache_keys(2)[0] == "token_conv"
    assert "token_conv" not in off.cache_keys(2)


@torch.no_grad()
@pytest.mark.parametrize("cache_kind", ["kv", "dict"])
def test_cached_chunks_equal_the_full_forward(model, cache_kind):
    """Chunks shorter and longer than the convolution's reach: each reads its past from the
    cache (with the past ignored, the first positions of every chunk differ)."""
    ids = torch.randint(0, 97, (2, 14))
    want = model(ids, 3, act_early_exit=False)
    cache = KVCache(16) if cache_kind == "kv" else {}
    got, pos = [], 0
    for n in (5, 1, 2, 6):
        got.append(model(ids[:, pos:pos + n], 3, cache, pos, act_early_exit=False))
        pos += n
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_left_padding_changes_nothing(model):
    ids = torch.randint(1, 97, (1, 8))
    alone = model(ids, 3, act_early_exit=False)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    got = model(padded, 3, attention_mask=mask, act_early_exit=False)[:, 5:]
    torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_generate_with_left_padding_equals_each_row_alone(model):
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 0, 1, 1, 1]])
    got = generate(model, ids, 6, 3, do_sample=False, attention_mask=mask)
    assert torch.equal(got[0, 7:], generate(model, a, 6, 3, do_sample=False)[0, 7:])
    assert torch.equal(got[1, 7:], generate(model, b, 6, 3, do_sample=False)[0, 3:])


@torch.no_grad()
def test_fixed_shape_step_equals_the_full_forward(model):
    """The compilable step gathers the convolution's past at ``slot`` from the buffer
    (here run eagerly); left padding and the positions before the first are zeros."""
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :4] = 0
    cache = KVCache(32)
    model(ids[:, :6], 3, cache, 0, attention_mask=mask, act_early_exit=False)
    dec = CompiledDecoder(model, cache, 3, 6, mask, compile=False)
    got = torch.stack([dec.step(ids[:, t]) for t in range(6, 11)], 1)
    want0 = model(ids[:1], 3, act_early_exit=False)[:, 6:]
    want1 = model(ids[1:, 4:], 3, act_early_exit=False)[:, 2:]
    torch.testing.assert_close(got, torch.cat([want0, want1]), atol=2e-5, rtol=1e-4)
    # A one-token prompt: the first steps reach back before position 0.
    cache = KVCache(32)
    model(ids[:, :1], 3, cache, 0, act_early_exit=False)
    dec = CompiledDecoder(model, cache, 3, 1, compile=False)
    got = torch.stack([dec.step(ids[:, t]) for t in range(1, 5)], 1)
    want = model(ids[:, :5], 3, act_early_exit=False)[:, 1:]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "dense"])
def test_serving_batch_rows_equal_full_forwards(kind):
    """Prefills in chunks, rows joining a batch already decoding (their past right-aligned
    behind zeros), rows leaving."""
    from tests.serving.test_batch import N_LOOPS, schedule_logits

    model = model_of(kind)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (20, 16, 10)]
    prompt_lens, joins, ends = [7, 14, 2], [0, 2, 4], [20, 16, 10]
    with torch.no_grad():
        got, _, _ = schedule_logits(model, seqs, prompt_lens, joins, ends, chunk=3)
        for i, seq in enumerate(seqs):
            want = model(torch.tensor([seq]), N_LOOPS)[0, prompt_lens[i] - 1: ends[i]]
            torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_speculative_greedy_equals_plain_greedy_batched_padded():
    """Rejected drafts roll the convolution's cached input back with everything else."""
    model = model_of("gqa", act_threshold=float("inf")).double()
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.5)  # drafts that disagree
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = generate(model, ids, 12, 4, do_sample=False, attention_mask=mask)
    got = speculative_generate(model, ids, 12, 4, draft_loops=1, draft_tokens=3,
                               attention_mask=mask)
    assert torch.equal(got, want)


def test_the_loss_reaches_the_convolution():
    """The convolution is in the training graph: the loss has a gradient for every one of
    its weights (a convolution left out of the forward would get none)."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(token_conv=WIDTH))
    ids = torch.randint(0, 97, (2, 10))
    logits = model(ids, 2)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grad = model.token_conv.weight.grad
    assert grad is not None and bool((grad != 0).all())


@torch.no_grad()
def test_transformers_round_trip_and_generate_with_left_padding(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from open_mythos.integrations.hf import OpenMythosForCausalLM

    model = model_of("mla", act_threshold=float("inf"))
    OpenMythosForCausalLM.from_mythos(model, pad_token_id=0).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.config.token_conv == WIDTH
    torch.testing.assert_close(hf.model.token_conv.weight, model.token_conv.weight)
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 0, 1, 1, 1]])
    want = generate(model, ids, 6, 3, do_sample=False, attention_mask=mask)
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, n_loops=3)
    assert torch.equal(got, want)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_generate_equals_eager():
    """The compiled step (one fullgraph per step) gathers the convolution's past at a slot
    that is data, not a constant: same greedy tokens as the eager path."""
    model = model_of("gqa")
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.tensor([[1] * 7, [0, 0, 0, 0, 0, 1, 1]])
    kw = dict(do_sample=False, attention_mask=mask, act_early_exit=False)
    assert torch.equal(generate(model, ids, 8, 3, compile=True, **kw),
                       generate(model, ids, 8, 3, compile=False, **kw))
