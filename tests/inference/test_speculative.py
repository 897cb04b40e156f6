"""Self-speculative decoding: greedy output equals plain greedy decoding (GQA, MLA, batched,
left-padded, with stop tokens); sampled tokens follow the full-depth model's distribution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from open_mythos import ExitRule, OpenMythos
from open_mythos.inference import KVCache, generate
from open_mythos.inference.speculative import (
    SpeculativeStats,
    speculative_generate,
    speculative_stream,
)
from tests.conftest import tiny_config

N_LOOPS = 6


def deep_model(attn_type: str, lora_std: float = 1.0, **overrides) -> OpenMythos:
    """A float64 tiny model whose loops change its predictions (non-zero LoRA)."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type, max_loop_iters=N_LOOPS, use_act=False,
                                   **overrides))
    torch.nn.init.normal_(model.recurrent.lora.B, std=lora_std)
    return model.double().eval()


@pytest.mark.parametrize("draft_loops,draft_tokens", [(1, 3), (3, 5), (N_LOOPS, 2)])
def test_greedy_equals_plain_greedy(attn_type, draft_loops, draft_tokens):
    model = deep_model(attn_type)
    ids = torch.randint(0, 97, (1, 7))
    want = generate(model, ids, 20, N_LOOPS, do_sample=False)
    stats = SpeculativeStats()
    got = speculative_generate(model, ids, 20, N_LOOPS, draft_loops=draft_loops,
                               draft_tokens=draft_tokens, stats=stats)
    assert torch.equal(got, want)
    assert stats.tokens == 20 and stats.cycles < 20
    if draft_loops == N_LOOPS:  # the draft is the verifier: every draft is accepted
        assert stats.acceptance_rate == 1.0
    else:
        assert 0.0 < stats.acceptance_rate < 1.0
    # One object passed to several generations sums them (tokens was overwritten, so
    # tokens_per_cycle fell with every call).
    once = dataclasses.replace(stats)
    for _ in range(2):
        speculative_generate(model, ids, 20, N_LOOPS, draft_loops=draft_loops,
                             draft_tokens=draft_tokens, stats=stats)
    assert (stats.tokens, stats.cycles, stats.generations) == (
        3 * once.tokens, 3 * once.cycles, 3)
    assert stats.tokens_per_cycle == pytest.approx(once.tokens_per_cycle)


def test_default_depth_and_sampling_defaults_are_streams():
    """n_loops=None is the model's default depth, as for generate (it was refused), and
    sampling keeps generate's top_k=50 unless told otherwise."""
    import inspect

    from open_mythos.inference import speculative_stream, stream

    model = deep_model("gqa")
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(speculative_generate(model, ids, 6, None, draft_loops=1),
                       generate(model, ids, 6, None, do_sample=False))
    defaults = {name: p.default for name, p in inspect.signature(stream).parameters.items()}
    assert inspect.signature(speculative_stream).parameters["top_k"].default == defaults["top_k"]


def test_tokens_per_cycle_counts_only_the_cycles_tokens():
    """Drafts as deep as the verifier are all accepted: each cycle emits its 2 drafts and
    the verifier's token, after the one token the prompt's forward emits (1 + 6 x 3)."""
    model = deep_model("gqa")
    stats = SpeculativeStats()
    speculative_generate(model, torch.randint(0, 97, (1, 7)), 19, N_LOOPS,
                         draft_loops=N_LOOPS, draft_tokens=2, stats=stats)
    assert (stats.tokens, stats.cycles) == (19, 6)
    assert stats.tokens_per_cycle == 3.0


def test_greedy_equals_plain_greedy_batched_padded_with_stop_tokens(attn_type):
    model = deep_model(attn_type)
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    plain = generate(model, ids, 16, N_LOOPS, do_sample=False, attention_mask=mask)
    # A stop token that some rows emit early: the one row 0 emits third.
    eos = int(plain[0, 9 + 2])
    want = generate(model, ids, 16, N_LOOPS, do_sample=False, attention_mask=mask,
                    eos_token_id=eos, pad_token_id=0)
    got = speculative_generate(model, ids, 16, N_LOOPS, draft_loops=2, draft_tokens=4,
                               attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)


def test_draft_with_an_exit_rule(attn_type):
    model = deep_model(attn_type)
    ids = torch.randint(0, 97, (2, 5))
    want = generate(model, ids, 12, N_LOOPS, do_sample=False)
    stats = SpeculativeStats()
    got = speculative_generate(model, ids, 12, N_LOOPS, draft_loops=None,
                               draft_exit_rule=ExitRule(rel_change=0.3, min_loops=2),
                               stats=stats)
    assert torch.equal(got, want)
    assert stats.drafted > 0


def exact_two_token_marginal(model: OpenMythos, prompt: torch.Tensor, temperature: float):
    """P(second generated token), float64, from full-depth forwards: sum over the first."""
    with torch.no_grad():
        p1 = torch.softmax(model(prompt, N_LOOPS)[0, -1] / temperature, -1)  # (V,)
        V = p1.shape[0]
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V).unsqueeze(1)], dim=1)
        p2 = torch.softmax(model(seqs, N_LOOPS)[:, -1] / temperature, -1)  # (V, V)
    return p1, p1 @ p2


@pytest.mark.parametrize("draft_lens", ["coda", "head"])
def test_sampling_follows_the_full_depth_distribution(draft_lens):
    model = deep_model("gqa", vocab_size=11)
    with torch.no_grad():
        model.norm.weight.mul_(10)  # sharper distributions, different at 1 and 6 loops
    prompt = torch.randint(0, 11, (1, 5))
    temperature = 1.0
    p1, p2 = exact_two_token_marginal(model, prompt, temperature)
    with torch.no_grad():
        q1 = torch.softmax(model(prompt, 1, readout_lens=draft_lens)[0, -1] / temperature, -1)
    n = 4000
    gen = torch.Generator().manual_seed(0)
    stats = SpeculativeStats()
    out = speculative_generate(model, prompt.expand(n, -1), 2, N_LOOPS, draft_loops=1,
                               draft_tokens=2, draft_lens=draft_lens, do_sample=True,
                               temperature=temperature, top_k=None, generator=gen, stats=stats)
    emp1 = torch.bincount(out[:, 5], minlength=11).double() / n
    emp2 = torch.bincount(out[:, 6], minlength=11).double() / n
    tv = lambda a, b: float((a - b).abs().sum() / 2)  # noqa: E731
    # The draft's own distribution is far from the target's; the output is not.
    assert tv(q1, p1) > 0.2
    assert tv(emp1, p1) < 0.04 and tv(emp2, p2) < 0.05
    assert 0.0 < stats.acceptance_rate < 1.0


def test_head_lens_forward_is_the_last_depths_head_readout(attn_type):
    """``readout_lens="head"`` without readout depths: the head lens of the last loop's
    state, with a cache as without one, and not the Coda's output."""
    model = deep_model(attn_type)
    ids = torch.randint(0, 97, (2, 9))
    want = model.readout(ids, 3, depths=[3], lens="head").depth_logits[3]
    got = model(ids, 3, readout_lens="head")
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, model(ids, 3))
    cache = KVCache(16)
    model(ids[:, :5], 3, cache, 0, readout_lens="head")
    torch.testing.assert_close(model(ids[:, 5:], 3, cache, 5, readout_lens="head"), want[:, 5:])
    with pytest.raises(ValueError, match="readout_depths"):
        model(ids, 3, readout_lens="none")
    with pytest.raises(ValueError, match="lens"):
        model.hidden_states(ids, 3, lens="coda2")


@pytest.mark.parametrize("draft_loops", [1, 3])
def test_head_lens_drafts_keep_greedy_output(attn_type, draft_loops):
    """Drafts read through the head lens (the Coda skipped and its cache left unwritten
    until the verification) change the acceptance, not the tokens: batched, left-padded."""
    model = deep_model(attn_type)
    ids = torch.randint(0, 97, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = generate(model, ids, 16, N_LOOPS, do_sample=False, attention_mask=mask)
    calls = []  # (loops, lens) of every forward
    forward = model.forward

    def spy(ids, n_loops=None, *args, **kwargs):
        calls.append((n_loops, kwargs.get("readout_lens", "coda")))
        return forward(ids, n_loops, *args, **kwargs)

    model.forward = spy
    for lens in ("coda", "head"):
        calls.clear()
        stats = SpeculativeStats()
        got = speculative_generate(model, ids, 16, N_LOOPS, draft_loops=draft_loops,
                                   draft_tokens=4, draft_lens=lens, attention_mask=mask,
                                   stats=stats)
        assert torch.equal(got, want)
        assert stats.cycles < 16 and stats.acceptance_rate > 0.0
        # Drafts through the chosen lens, prefill and verifications through the Coda.
        assert {c for c in calls if c[0] == draft_loops} == {(draft_loops, lens)}
        assert {c for c in calls if c[0] == N_LOOPS} == {(N_LOOPS, "coda")}


def test_arguments_are_checked():
    model = deep_model("gqa")
    ids = torch.randint(0, 97, (1, 4))
    for bad in (dict(draft_tokens=0), dict(draft_loops=0), dict(draft_loops=None),
                dict(draft_lens="none")):
        with pytest.raises(ValueError, match="draft"):
            list(speculative_stream(model, ids, 4, N_LOOPS, **bad))
    with pytest.raises(ValueError, match="max_seq_len"):
        list(speculative_stream(model, ids, 100, N_LOOPS))
    # Drafts deeper than the verification were accepted (each cost more than it saved).
    with pytest.raises(ValueError, match=f"draft_loops={N_LOOPS + 1} is above n_loops={N_LOOPS}"):
        list(speculative_stream(model, ids, 4, N_LOOPS, draft_loops=N_LOOPS + 1))
    assert torch.equal(speculative_generate(model, ids, 0, N_LOOPS), ids)
    # generate's options that this decoder does not take are refused with the reason.
    for name, value, why in (("exit_rule", ExitRule(argmax_streak=2), "draft_exit_rule="),
                             ("act_early_exit", True, "all n_loops"),
                             ("compile", True, "eager"),
                             ("depth_sharing", "shared", "per depth")):
        with pytest.raises(TypeError, match=f"{name}=: .*{why}"):
            speculative_generate(model, ids, 4, N_LOOPS, **{name: value})
    with pytest.raises(TypeError, match="'draft_loop'"):
        speculative_generate(model, ids, 4, N_LOOPS, draft_loop=1)
    # A bad draft rule is named as the caller passed it (the error named exit_rule, which
    # this function refuses).
    with pytest.raises(TypeError, match="^draft_exit_rule must be an ExitRule"):
        speculative_generate(model, ids, 4, N_LOOPS, draft_exit_rule=0.1)


def test_greedy_equals_plain_greedy_with_act_halting(attn_type):
    """ACT early exit in the drafts and in the verification forward changes nothing."""
    from tests.conftest import halting_model

    model = halting_model(attn_type, max_loop_iters=N_LOOPS).double()
    ids = torch.randint(0, 97, (2, 6))
    want = generate(model, ids, 12, N_LOOPS, do_sample=False)
    got = speculative_generate(model, ids, 12, N_LOOPS, draft_loops=2, draft_tokens=3)
    assert torch.equal(got, want)
