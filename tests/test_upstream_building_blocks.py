"""Upstream's building blocks through ``open_mythos.main``: RoPE helpers, module
constructors and ``forward`` signatures, MoE expert views (SPEC §2).

Each adapter is checked against an independent reference (float64 complex rotation, a naive
attention, upstream's per-expert dispatch written out here) or against our own layer run on
the same weights through its own interface.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from open_mythos import layers
from open_mythos.layers import AttnContext, rope_cos_sin
from open_mythos.main import (
    Expert,
    GQAttention,
    MLAttention,
    MoEFFN,
    RecurrentBlock,
    TransformerBlock,
    apply_rope,
    precompute_rope_freqs,
)
from tests.conftest import tiny_config


def causal_additive(T: int, S: int | None = None) -> torch.Tensor:
    """Upstream's mask: (1, 1, T, S) with 0 where query t may see key s, -inf elsewhere."""
    S = T if S is None else S
    q = torch.arange(S - T, S).view(T, 1)
    allowed = torch.arange(S).view(1, S) <= q
    return torch.zeros(T, S).masked_fill(~allowed, float("-inf")).view(1, 1, T, S)


def our_context(T: int, rope_dim: int, theta: float, causal: bool = True) -> AttnContext:
    cos, sin = rope_cos_sin(torch.arange(T), rope_dim, theta)
    return AttnContext(cos, sin, 0, None, causal, None)


# RoPE helpers ------------------------------------------------------------------------------


def test_precompute_rope_freqs_matches_float64_phasors():
    dim, max_len, theta = 12, 300, 10000.0
    freqs = precompute_rope_freqs(dim, max_len, theta)
    assert freqs.dtype == torch.complex64 and freqs.shape == (max_len, dim // 2)
    t = torch.arange(max_len, dtype=torch.float64).view(-1, 1)
    k = torch.arange(dim // 2, dtype=torch.float64).view(1, -1)
    ref = torch.exp(1j * t * theta ** (-2 * k / dim))
    torch.testing.assert_close(freqs.to(torch.complex128), ref, rtol=0, atol=2e-7)
    # Upstream's default base.
    assert torch.equal(precompute_rope_freqs(8, 5), precompute_rope_freqs(8, 5, 500000.0))
    assert not torch.equal(precompute_rope_freqs(8, 5), precompute_rope_freqs(8, 5, 10000.0))
    with pytest.raises(ValueError, match="even"):
        precompute_rope_freqs(7, 4)


def test_apply_rope_is_complex_multiplication_of_adjacent_pairs():
    torch.manual_seed(0)
    B, T, H, d = 2, 9, 3, 10
    x = torch.randn(B, T, H, d, dtype=torch.float64)
    freqs = precompute_rope_freqs(d, 40, 10000.0)[20:20 + T]
    out = apply_rope(x.float(), freqs)
    assert out.dtype == torch.float32 and out.shape == x.shape
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # pair k = channels (2k, 2k + 1)
    angle = torch.arange(20, 20 + T, dtype=torch.float64).view(T, 1) * 10000.0 ** (
        -torch.arange(0, d, 2, dtype=torch.float64) / d)
    rotated = z * torch.exp(1j * angle).view(T, 1, d // 2)
    ref = torch.stack((rotated.real, rotated.imag), dim=-1).flatten(-2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_apply_rope_keeps_dtype_and_rejects_wrong_table():
    freqs = precompute_rope_freqs(8, 16)
    x = torch.randn(1, 4, 2, 8)
    for dtype in (torch.float16, torch.bfloat16):
        out = apply_rope(x.to(dtype), freqs[:4])
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), apply_rope(x, freqs[:4]), rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="positions"):
        apply_rope(x, freqs)  # 16 rows for 4 positions
    with pytest.raises(RuntimeError):
        apply_rope(x, precompute_rope_freqs(6, 4))
    with pytest.raises(TypeError, match="complex"):
        apply_rope(x, freqs.real[:4])


def test_apply_rope_three_argument_form_is_our_rotation():
    x = torch.randn(2, 3, 5, 8)  # (B, H, T, d)
    cos, sin = rope_cos_sin(torch.arange(5), 8, 500000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), layers.apply_rope(x, cos, sin))


# Attention ---------------------------------------------------------------------------------


def naive_gqa(attn: layers.GQAttention, x: torch.Tensor, theta: float,
              causal: bool) -> torch.Tensor:
    """float64 GQA over positions 0..T-1; RoPE pairs channel halves (our layers' layout)."""
    W = {name: p.detach().double() for name, p in attn.named_parameters()}
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = x.double()
    q = (x @ W["wq.weight"].T).view(B, T, H, hd)
    k = (x @ W["wk.weight"].T).view(B, T, Hkv, hd)
    v = (x @ W["wv.weight"].T).view(B, T, Hkv, hd)
    half = hd // 2
    angle = torch.arange(T, dtype=torch.float64).view(T, 1) * theta ** (
        -2 * torch.arange(half, dtype=torch.float64) / hd)
    phasor = torch.exp(1j * angle).view(T, 1, half)

    def rotate(t):
        z = torch.complex(t[..., :half], t[..., half:]) * phasor
        return torch.cat((z.real, z.imag), dim=-1)

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
    return out @ W["wo.weight"].T


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_upstream_call_matches_naive_attention(causal):
    torch.manual_seed(0)
    cfg = tiny_config("gqa", rope_theta=10000.0)
    attn = GQAttention(cfg)
    x = torch.randn(2, 7, cfg.dim)
    freqs = precompute_rope_freqs(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    # Upstream: mask=None attends everywhere; the causal mask is additive.
    out = attn(x, freqs[:7], causal_additive(7) if causal else None)
    torch.testing.assert_close(out.double(), naive_gqa(attn, x, cfg.rope_theta, causal),
                               rtol=1e-5, atol=1e-5)


def test_a_table_cast_to_real_by_module_to_is_refused_saying_why():
    """Upstream's own benchmark registers the table as a buffer and calls ``.to(dtype=
    float32)``, which drops the imaginary part; upstream then rotated by cos alone. The
    error says what happened and what to do."""
    cfg = tiny_config("gqa")
    attn = GQAttention(cfg)
    holder = torch.nn.Module()
    holder.register_buffer("freqs_cis", precompute_rope_freqs(cfg.dim // cfg.n_heads, 16))
    with pytest.warns(UserWarning, match="discards the imaginary part"):
        holder.to(dtype=torch.float32)
    with pytest.raises(TypeError, match=r"module.to\(dtype\) loses its sines"):
        attn(torch.randn(1, 4, cfg.dim), holder.freqs_cis[:4])


def test_decode_with_dict_cache_matches_full_sequence(attn_type):
    """Prefill then one-token steps through upstream's call with a plain dict cache: the
    full table is sliced at the cached length; an exactly sliced table gives the same."""
    torch.manual_seed(1)
    cfg = tiny_config(attn_type)
    attn = (GQAttention if attn_type == "gqa" else MLAttention)(cfg).eval()
    rope = attn.rope_width
    freqs = precompute_rope_freqs(rope, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 9, cfg.dim)
    with torch.no_grad():
        full = attn(x, freqs[:9], causal_additive(9))
        cache, sliced = {}, {}
        steps = [attn(x[:, :5], freqs, causal_additive(5), cache, "k")]
        attn(x[:, :5], freqs[:5], causal_additive(5), sliced, "k")
        for t in range(5, 9):
            steps.append(attn(x[:, t:t + 1], freqs, None, cache, "k"))
            exact = attn(x[:, t:t + 1], freqs[t:t + 1], None, sliced, "k")
            torch.testing.assert_close(exact, steps[-1], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert set(cache) == {"k"} and all(t.shape[1] == 9 for t in cache["k"].values())
    with pytest.raises(ValueError, match="rows"):
        attn(x[:, :1], freqs[:5], None, cache, "k")  # 5 rows: neither 1 nor >= 10


def test_attention_adapter_is_our_layer(attn_type):
    torch.manual_seed(2)
    cfg = tiny_config(attn_type)
    adapter = (GQAttention if attn_type == "gqa" else MLAttention)(cfg)
    ours = layers.build_attention(cfg)
    assert type(ours) is not type(adapter) and isinstance(adapter, type(ours))
    ours.load_state_dict(adapter.state_dict())  # strict: the same parameters
    rope = adapter.rope_width
    x = torch.randn(2, 6, cfg.dim)
    expected = ours(x, our_context(6, rope, cfg.rope_theta))
    freqs = precompute_rope_freqs(rope, 6, cfg.rope_theta)
    out = adapter(x, freqs, causal_additive(6))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # Our own interface still works on the adapter (our blocks call it that way).
    torch.testing.assert_close(adapter(x, our_context(6, rope, cfg.rope_theta), "key"), expected)
    with pytest.raises(ValueError, match="RoPE width"):
        adapter(x, precompute_rope_freqs(rope + 2, 6))


# Blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_moe", [False, True])
def test_transformer_block_adapter_matches_our_block(attn_type, use_moe):
    torch.manual_seed(3)
    cfg = tiny_config(attn_type)
    block = TransformerBlock(cfg, use_moe=use_moe)
    assert isinstance(block.attn, GQAttention if attn_type == "gqa" else MLAttention)
    ours = layers.TransformerBlock(cfg, use_moe=use_moe)
    ours.load_state_dict(block.state_dict())
    rope = block.attn.rope_width
    x = torch.randn(2, 8, cfg.dim)
    expected = ours(x, our_context(8, rope, cfg.rope_theta), "b")
    freqs = precompute_rope_freqs(rope, cfg.max_seq_len, cfg.rope_theta)
    cache = {}
    out = block(x, freqs[:8], causal_additive(8), cache, "b")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert list(cache) == ["b"]


def test_recurrent_block_adapter_matches_our_block(attn_type):
    torch.manual_seed(4)
    cfg = tiny_config(attn_type, act_threshold=0.5, act_halt_bias_init=0.0)
    rec = RecurrentBlock(cfg).eval()
    assert isinstance(rec.block, TransformerBlock)
    ours = layers.RecurrentBlock(cfg).eval()
    ours.load_state_dict(rec.state_dict())
    torch.nn.init.normal_(rec.act.halt.weight, std=0.3)  # positions halt at different loops
    ours.act.load_state_dict(rec.act.state_dict())
    rope = rec.block.attn.rope_width
    h, e = torch.randn(2, 2, 6, cfg.dim).unbind(0)
    freqs = precompute_rope_freqs(rope, cfg.max_seq_len, cfg.rope_theta)
    with torch.no_grad():
        for n_loops in (1, 3):
            expected = ours(h, e, our_context(6, rope, cfg.rope_theta), n_loops)
            out = rec(h, e, freqs[:6], causal_additive(6), n_loops)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # n_loops defaults to max_loop_iters; a cache gets every depth's entry.
        cache = {}
        rec(h, e, freqs[:6], causal_additive(6), None, cache)
        assert rec.last_loops_run == cfg.max_loop_iters
        assert sorted(cache) == [f"recurrent_loop_{t}" for t in range(cfg.max_loop_iters)]
    with pytest.raises(ValueError, match="n_loops"):
        rec(h, e, freqs[:6], None, 0)


# Experts -----------------------------------------------------------------------------------


def test_expert_takes_upstream_keyword():
    expert = Expert(dim=32, expert_dim=16)
    assert expert.gate.weight.shape == (16, 32) and expert.down.weight.shape == (32, 16)
    x = torch.randn(5, 32)
    ref = expert.down.weight @ (F.silu(expert.gate.weight @ x.T) * (expert.up.weight @ x.T))
    torch.testing.assert_close(expert(x), ref.T)


@pytest.mark.parametrize("n_tokens", [1, 24])  # decode (gather) and sorted dispatch
def test_moe_equals_upstream_dispatch_over_expert_views(n_tokens):
    torch.manual_seed(5)
    cfg = tiny_config(n_shared_experts=2, n_experts=6, n_experts_per_tok=2)
    moe = MoEFFN(cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    torch.nn.init.normal_(moe.router_bias, std=0.5)
    torch.nn.init.normal_(moe.shared.gate.weight, std=0.2)
    x = torch.randn(n_tokens, cfg.dim)
    routed, shared = moe.routed_experts, moe.shared_experts
    assert len(routed) == cfg.n_experts and len(shared) == cfg.n_shared_experts
    assert routed[0].gate.weight.shape == (cfg.expert_dim, cfg.dim)
    assert shared[0].gate.weight.shape == (cfg.expert_dim * cfg.n_experts_per_tok, cfg.dim)

    # Upstream's forward, token by token: select on biased logits, weight by the
    # renormalised unbiased softmax, add every shared expert.
    logits = x @ moe.router.weight.T
    scores = logits.softmax(-1)
    idx = (logits + moe.router_bias).topk(cfg.n_experts_per_tok, dim=-1).indices
    gates = scores.gather(-1, idx)
    gates = gates / gates.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    for n in range(n_tokens):
        for j in range(cfg.n_experts_per_tok):
            ref[n] += gates[n, j] * routed[int(idx[n, j])](x[n])
    ref += sum(expert(x) for expert in shared)
    torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)


def test_expert_views_share_storage_and_leave_the_module_unchanged():
    torch.manual_seed(6)
    cfg = tiny_config()
    moe = MoEFFN(cfg)
    names = [n for n, _ in moe.named_parameters()]
    x = torch.randn(2, 8, cfg.dim)
    shared_only = moe.shared(x)
    for expert in moe.routed_experts:  # upstream's test: zero every routed expert
        for p in expert.parameters():
            p.data.zero_()
    assert moe.w_gate_up.abs().sum() == 0 and moe.w_down.abs().sum() == 0
    torch.testing.assert_close(moe(x), shared_only)
    with torch.no_grad():
        moe.routed_experts[1].down.weight.copy_(torch.ones(cfg.dim, cfg.expert_dim))
    assert torch.equal(moe.w_down[1], torch.ones(cfg.expert_dim, cfg.dim))
    assert moe.w_down[0].abs().sum() == 0
    assert [n for n, _ in moe.named_parameters()] == names  # views are not registered
    assert "routed_experts" not in dict(moe.named_modules())
    cfg0 = tiny_config(n_shared_experts=0)
    assert len(MoEFFN(cfg0).shared_experts) == 0
    # What would silently do nothing to the layer: freezing a view is refused (its weights
    # are the layer's fused tensors), a hook on one is warned about (the layer never calls
    # it); a hook still fires when the view itself is called.
    with pytest.raises(RuntimeError, match="cannot freeze"):
        moe.routed_experts[2].requires_grad_(False)
    with pytest.raises(RuntimeError, match="cannot freeze"):
        moe.shared_experts[0].requires_grad_(False)
    with pytest.raises(RuntimeError, match="cannot freeze"):
        moe.routed_experts.requires_grad_(False)
    with pytest.raises(RuntimeError, match="cannot freeze"):
        moe.routed_experts[0].gate.requires_grad_(False)
    # Upstream's per-tensor idiom changed only the view (the next access built a new one,
    # trainable, and a step still moved the expert).
    for view in (moe.routed_experts[0], moe.shared_experts[0]):
        for p in view.parameters():
            p.requires_grad = True  # its own value: allowed
            with pytest.raises(RuntimeError, match="cannot freeze"):
                p.requires_grad = False
            with pytest.raises(RuntimeError, match="cannot freeze"):
                p.requires_grad_(False)
            assert p.requires_grad
    assert moe.w_gate_up.requires_grad
    view, calls = moe.routed_experts[2], []
    with pytest.warns(RuntimeWarning, match="without calling these views"):
        view.register_forward_hook(lambda *a: calls.append(1))
    moe(x)
    assert calls == []
    view(x)
    assert calls == [1]


def test_an_upstream_state_dict_is_refused_naming_its_layout():
    """Upstream saves one ``Expert`` module per expert. Loaded here it failed with a list of
    keys, and ``strict=False`` "worked", leaving random experts behind."""
    cfg = tiny_config(n_experts=4, n_shared_experts=1)
    moe = MoEFFN(cfg)
    upstream = {f"routed_experts.{e}.{name}.weight": torch.zeros(1)
                for e in range(cfg.n_experts) for name in ("gate", "up", "down")}
    upstream |= {"router.weight": moe.router.weight.detach().clone(),
                 "router_bias": torch.zeros(cfg.n_experts)}
    before = moe.w_gate_up.detach().clone()
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="upstream's layout"):
            moe.load_state_dict(upstream, strict=strict)
    assert torch.equal(moe.w_gate_up, before)
    moe.load_state_dict(MoEFFN(cfg).state_dict())  # our own layout loads
