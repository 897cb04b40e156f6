import itertools
import re

import pytest
import torch

from open_mythos import MythosConfig, OpenMythos
from open_mythos.baseline import BaselineConfig, DenseBaseline, matched_baseline_config
from open_mythos.variants import (
    NOMINAL_SIZES,
    VARIANTS,
    ParamCount,
    count_parameters,
    format_count,
    get_variant,
    mythos_1b,
)


def _mla_attention(c: MythosConfig) -> int:
    H, nope, rope, v = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    q = c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * (nope + rope)
    kv = c.dim * (c.kv_lora_rank + rope) + c.kv_lora_rank + c.kv_lora_rank * H * (nope + v)
    return q + kv + H * v * c.dim


def _gqa_attention(c: MythosConfig) -> int:
    hd = c.dim // c.n_heads
    return 2 * c.dim * c.n_heads * hd + 2 * c.dim * c.n_kv_heads * hd


def _routed_expert(c: MythosConfig) -> int:
    return 3 * c.dim * c.expert_dim


def analytic_params(c: MythosConfig) -> int:
    """Independent count from the architecture: tied embedding, norms, attention, FFNs,
    MoE and the recurrence's own parameters."""
    attn = _mla_attention(c) if str(c.attn_type) == "mla" else _gqa_attention(c)
    ffn_dim = c.dense_ffn_dim or 4 * c.dim // 3
    dense_block = 2 * c.dim + attn + 3 * c.dim * ffn_dim
    moe = (c.dim * c.n_experts  # router
           + c.n_experts * _routed_expert(c)
           + 3 * c.dim * c.n_shared_experts * c.n_experts_per_tok * c.expert_dim)
    injection = c.dim + 1 + c.dim  # log_A, log_dt, B
    halt = c.dim + 1
    lora = 2 * c.lora_rank * c.dim + c.max_loop_iters * c.lora_rank
    recurrent = 2 * c.dim + attn + moe + injection + halt + lora + c.dim  # + loop input norm
    return (c.vocab_size * c.dim + (c.prelude_layers + c.coda_layers) * dense_block
            + recurrent + c.dim)


def small_gqa() -> MythosConfig:
    return MythosConfig(
        vocab_size=101, dim=48, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=3,
        prelude_layers=1, coda_layers=2, attn_type="gqa", n_experts=6, n_shared_experts=1,
        n_experts_per_tok=2, expert_dim=20, lora_rank=5,
    )


def analytic_active(c: MythosConfig) -> int:
    """Parameters one token uses: all but the ``n_experts - n_experts_per_tok`` routed
    experts it does not choose."""
    return analytic_params(c) - (c.n_experts - c.n_experts_per_tok) * _routed_expert(c)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_counts_are_analytic_and_within_one_percent_of_nominal(name):
    """The module docstring of ``variants`` promises every preset within 1% of its nominal
    size: checked on the analytic count, which the exact count must equal."""
    cfg = VARIANTS[name]()
    total, active = analytic_params(cfg), analytic_active(cfg)
    assert abs(total / NOMINAL_SIZES[name] - 1) <= 0.01, total
    assert count_parameters(cfg) == ParamCount(total, active)
    # The module itself, built by hand on the meta device (no memory at any size).
    with torch.device("meta"):
        model = OpenMythos(cfg)
    assert sum(p.numel() for p in model.parameters()) == total  # the tied head once


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_docstring_states_exact_counts(name):
    fn = VARIANTS[name]
    m = re.search(r"Exact: ([\d,]+) total, ([\d,]+) active", fn.__doc__)
    assert m, f"{name} docstring lacks the exact counts"
    stated = ParamCount(*(int(g.replace(",", "")) for g in m.groups()))
    assert stated == ParamCount(analytic_params(fn()), analytic_active(fn()))


def small_mla() -> MythosConfig:
    return small_gqa().replace(attn_type="mla", kv_lora_rank=16, q_lora_rank=24,
                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize("cfg", [
    small_gqa(),
    small_mla(),
    small_gqa().replace(dense_ffn_dim=40, n_kv_heads=1, max_loop_iters=7),
    small_gqa().replace(lora_rank=0, n_shared_experts=0, n_experts_per_tok=6),
], ids=["gqa", "mla", "gqa-ffn40-kv1", "no-lora-no-shared-all-experts"])
def test_count_of_a_real_model_matches_the_analytic_formula(cfg):
    torch.manual_seed(0)
    model = OpenMythos(cfg)
    assert model.head.weight is model.embed.weight  # tied: counted once
    expected = ParamCount(analytic_params(cfg), analytic_active(cfg))
    assert count_parameters(model) == count_parameters(cfg) == expected
    if cfg.n_experts_per_tok == cfg.n_experts:
        assert expected.active == expected.total  # every expert chosen


def analytic_baseline_params(c: BaselineConfig) -> int:
    """Independent count of the dense baseline: tied embedding, every block (the core ones
    with SwiGLU width ``core_ffn_dim``), final norm."""
    attn = _mla_attention(c) if str(c.attn_type) == "mla" else _gqa_attention(c)
    block = lambda width: 2 * c.dim + attn + 3 * c.dim * width  # noqa: E731
    return (c.vocab_size * c.dim + (c.prelude_layers + c.coda_layers) * block(c.ffn_dim)
            + c.core_layers * block(c.core_ffn_dim) + c.dim)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
@pytest.mark.parametrize("kind", ["looped", "dense"])
def test_count_of_a_config_is_the_model_of_its_kind(kind, attn_type):
    cfg = small_gqa().replace(attn_type=attn_type, kv_lora_rank=16, q_lora_rank=24,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    if kind == "dense":
        cfg = matched_baseline_config(cfg, 4)
    # The real count, from a module built by hand (not through count_parameters).
    real = DenseBaseline(cfg) if kind == "dense" else OpenMythos(cfg)
    total = sum(p.numel() for p in real.parameters())  # the tied head once
    count = count_parameters(cfg)
    assert count.total == total
    assert count.total == (analytic_baseline_params(cfg) if kind == "dense" else analytic_params(cfg))
    unchosen = (cfg.n_experts - cfg.n_experts_per_tok) * _routed_expert(cfg)
    assert count.active == (total if kind == "dense" else total - unchosen)


def test_variant_configs_follow_the_scaling_recipe():
    cfgs = [fn() for fn in VARIANTS.values()]
    assert all(str(c.attn_type) == "mla" for c in cfgs)
    for small, big in itertools.pairwise(cfgs):
        assert big.dim >= small.dim and big.lora_rank >= small.lora_rank
        assert big.n_shared_experts >= small.n_shared_experts
        assert big.n_experts_per_tok >= small.n_experts_per_tok
    for c in (VARIANTS[n]() for n in ("mythos_100b", "mythos_500b", "mythos_1t")):
        assert c.max_output_tokens == 131072 and c.rope_theta >= 1e6


def test_get_variant_and_format_count():
    assert get_variant("1B") == mythos_1b() == get_variant("mythos_1b")
    with pytest.raises(ValueError, match="mythos_1t"):
        get_variant("7b")
    assert format_count(1_030_000_000) == "1.03B"
    assert format_count(2_500_000) == "2.50M"
    assert format_count(1.2e12) == "1.20T"
    assert format_count(512) == "512"
