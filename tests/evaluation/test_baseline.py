"""The dense baseline: FLOPs matched to the looped model, forward, cache and generation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from open_mythos import MythosConfig, OpenMythos, mythos_1b
from open_mythos.baseline import (
    BaselineConfig,
    DenseBaseline,
    build_model,
    config_from_dict,
    flops_per_token,
    matched_baseline_config,
    matched_ffn_dim,
)
from open_mythos.inference import generate
from tests.conftest import tiny_config


def measured_flops_per_token(model: torch.nn.Module, seq_len: int = 4, **kwargs) -> float:
    """Matmul FLOPs counted by ``torch.utils.flop_counter`` in float64 (where the MoE runs
    plain per-expert matmuls that the counter sees), divided by the tokens.

    Whether the attention scores are counted depends on the SDPA kernel; a short sequence
    keeps them a few percent of the total either way.
    """
    model = model.double().eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, **kwargs)
    return counter.get_total_flops() / ids.numel()


@pytest.mark.parametrize("train_loops", [1, 4, 8])
def test_analytic_flops_match_at_training_depth(attn_type, train_loops):
    for cfg in (tiny_config(attn_type), mythos_1b(), tiny_config(attn_type, use_act=False,
                                                                 lora_rank=0, n_shared_experts=0)):
        base = matched_baseline_config(cfg, train_loops)
        looped = flops_per_token(cfg, n_loops=train_loops)
        assert flops_per_token(base) == pytest.approx(looped, rel=0.10)
        # The rounding rule is much tighter than the 10% the issue allows.
        assert abs(flops_per_token(base) - looped) <= 3 * cfg.dim * train_loops


def test_measured_flops_match_at_training_depth(attn_type):
    torch.manual_seed(0)
    cfg = tiny_config(attn_type, act_threshold=float("inf"))  # every position runs every loop
    base = matched_baseline_config(cfg, 4)
    looped = measured_flops_per_token(OpenMythos(cfg), n_loops=4)
    dense = measured_flops_per_token(DenseBaseline(base))
    assert dense == pytest.approx(looped, rel=0.10)
    assert dense == pytest.approx(flops_per_token(base), rel=0.05)
    assert looped == pytest.approx(flops_per_token(cfg, 4), rel=0.05)


def test_config_depth_width_and_round_trip():
    cfg = tiny_config("gqa")
    base = matched_baseline_config(cfg, 3)
    assert isinstance(base, BaselineConfig) and isinstance(base, MythosConfig)
    assert base.n_layers == cfg.prelude_layers + cfg.coda_layers + 3
    assert base.core_ffn_dim == matched_ffn_dim(cfg)
    assert base.ffn_dim == cfg.ffn_dim  # Prelude and Coda blocks are the looped model's
    assert config_from_dict(base.to_dict()) == base
    assert type(config_from_dict(cfg.to_dict())) is MythosConfig
    assert isinstance(build_model(base), DenseBaseline)
    assert isinstance(build_model(cfg), OpenMythos)
    assert BaselineConfig(**cfg.to_dict()).core_layers == cfg.max_loop_iters


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_config_rejects_bad_depth(bad):
    with pytest.raises(ValueError, match="core_layers"):
        BaselineConfig(**tiny_config("gqa").to_dict(), core_layers=bad)
    with pytest.raises(ValueError, match="train_loops"):
        matched_baseline_config(tiny_config("gqa"), bad)


def test_model_structure_and_forward(attn_type):
    torch.manual_seed(0)
    cfg = matched_baseline_config(tiny_config(attn_type), 3)
    model = DenseBaseline(cfg).eval()
    assert len(model.core) == 3 and len(model.prelude) == len(model.coda) == 1
    assert model.head.weight is model.embed.weight
    assert model.core[0].ffn.gate.out_features == cfg.core_ffn_dim
    assert model.moe_layers() == [] and model.aux_loss is None
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, cfg.vocab_size)
    # Fixed depth: the loop options are accepted and ignored.
    torch.testing.assert_close(model(ids, n_loops=7, act_early_exit=True), logits)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_forward_rejects_invalid_n_loops(bad):
    model = DenseBaseline(matched_baseline_config(tiny_config("gqa"), 2))
    with pytest.raises(ValueError, match="n_loops"):
        model(torch.zeros(1, 4, dtype=torch.long), n_loops=bad)


def test_cached_forward_matches_full_forward(attn_type):
    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(tiny_config(attn_type), 2)).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids)
    cache: dict = {}
    first = model(ids[:, :7], kv_cache=cache)
    rest = model(ids[:, 7:], kv_cache=cache, start_pos=7)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)
    assert set(cache) == {"prelude_0", "core_0", "core_1", "coda_0"}


def test_greedy_generation_matches_full_forwards(attn_type):
    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(tiny_config(attn_type), 2)).eval()
    ids = torch.randint(0, 97, (2, 6))
    out = generate(model, ids, max_new_tokens=6, n_loops=3, do_sample=False)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(ids, 6, 3, do_sample=False), expected)


def test_left_padded_generation_matches_unpadded(attn_type):
    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(tiny_config(attn_type), 2)).eval()
    short = torch.randint(0, 97, (1, 4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    alone = generate(model, short, 5, do_sample=False)[:, 4:]
    batched = generate(model, padded, 5, do_sample=False, attention_mask=mask)[:, 7:]
    assert torch.equal(alone, batched)


def test_generation_past_max_seq_len_is_a_clear_error():
    model = DenseBaseline(matched_baseline_config(tiny_config("gqa", max_seq_len=8), 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 6, dtype=torch.long), 4, do_sample=False)


def test_gradient_checkpointing_recomputes_each_core_block_with_equal_gradients(attn_type):
    """The dense baseline had no checkpointing: run.gradient_checkpointing (and the HF
    wrapper's switch) did nothing for it. Now each core block is recomputed in the backward:
    the same gradients (float64), fewer tensors saved, and a KV cache fed in chunks before
    one backward is left as the forward wrote it."""
    from open_mythos.inference import KVCache

    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(tiny_config(attn_type), 4)).double().train()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    runs = []
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids).pow(2).mean()
        loss.backward()
        cache = KVCache(max_len=16, dtype=torch.float64)
        chunked = sum(model(ids[:, a:a + 4], kv_cache=cache, start_pos=a).pow(2).mean()
                      for a in (0, 4))
        chunked.backward()
        with torch.no_grad():
            after = model(ids[:, 8:], kv_cache=cache, start_pos=8)
        runs.append(({n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved),
                     after))
    (plain, plain_saved, plain_after), (ckpt, ckpt_saved, ckpt_after) = runs
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)
    assert ckpt_saved < 0.6 * plain_saved
    torch.testing.assert_close(ckpt_after, plain_after, rtol=1e-12, atol=1e-12)


def test_gradient_checkpointing_compiles_as_one_graph_with_equal_gradients():
    """``--compile model`` with checkpointing: a closure as checkpoint's context_fn made
    dynamo fail ("checkpoint not implemented for NestedUserFunctionVariable")."""
    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(tiny_config("gqa"), 2)).train()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for compiled in (False, True):
        model.gradient_checkpointing = compiled
        model.zero_grad(set_to_none=True)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        run(ids).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7,
                                   msg=name)
