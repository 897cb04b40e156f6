"""``attend``: SDPA's result by either route (SDPA or explicit matmuls), checked against a
naive float64 softmax(q k^T) v, and the route each shape takes."""

import math

import pytest
import torch
import torch.nn.functional as F

from open_mythos import MythosConfig, OpenMythos
from open_mythos.layers import attention
from open_mythos.layers.attention import attend


def naive(q, k, v, mask=None, is_causal=False, scale=None):
    """Float64 attention written out, one (batch, head) at a time; rows with no key -> 0."""
    B, H, T, d = q.shape
    S, group = k.shape[2], H // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool).tril()
    allowed = torch.ones(B, H, T, S, dtype=torch.bool) if mask is None else mask.expand(B, H, T, S)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = allowed[b, h, t].nonzero().flatten()
                if keys.numel() == 0:
                    continue
                s = (k[b, h // group, keys].double() @ q[b, h, t].double()) * scale
                out[b, h, t] = s.softmax(0) @ v[b, h // group, keys].double()
    return out


def inputs(B=2, H=4, Hkv=4, T=7, S=7, d=8, dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Requiring gradients, as in training: the explicit route is for attention autograd records.
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for shape in
            ((B, H, T, d), (B, Hkv, S, d), (B, Hkv, S, dv))]


@pytest.fixture(params=["explicit", "sdpa"])
def route(request, monkeypatch):
    """Run each case through both routes (SDPA alone when no key count is small)."""
    if request.param == "sdpa":
        monkeypatch.setattr(attention, "SMALL_ATTENTION_KEYS", 0)
    return request.param


def masks():
    g = torch.Generator().manual_seed(1)
    per_row = torch.rand(2, 1, 7, 7, generator=g) > 0.5
    per_row[..., 0] = True  # every query may attend somewhere
    return {
        "causal": None,
        "per row": per_row,
        "shared": per_row[:1],
        "2-d": per_row[0, 0],
        "key padding": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]],
                                    dtype=torch.bool).view(2, 1, 1, 7),
    }


@pytest.mark.parametrize("name", list(masks()))
@pytest.mark.parametrize("Hkv", [4, 2])
def test_attend_equals_a_naive_float64_attention(route, name, Hkv):
    mask = masks()[name]
    q, k, v = inputs(Hkv=Hkv, dv=5)
    out = attend(q, k, v, mask=mask, is_causal=mask is None, scale=0.3,
                 enable_gqa=Hkv != 4)
    ref = naive(q, k, v, mask, is_causal=mask is None, scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_an_additive_float_mask_is_added_to_the_scores(route):
    """As SDPA: a float mask is added to the scores; -inf everywhere in a row gives zeros."""
    q, k, v = inputs()
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(2, 1, 7, 7, generator=g)
    bias[0, 0, 4] = float("-inf")
    bias[1, 0, 2, :3] = float("-inf")
    out = attend(q, k, v, mask=bias)
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k.double()) / math.sqrt(8) + bias.double()
    ref = torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v.double())
    ref[0, :, 4] = 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [None, torch.ones(1, 1, 5, 5, dtype=torch.bool),
                                  torch.ones(0, 1, 5, 5, dtype=torch.bool)])
def test_an_empty_batch_attends_to_an_empty_output(route, mask):
    """ACT's early exit can leave a rank looping on no rows (distributed halting)."""
    q, k, v = inputs(B=0, T=5, S=5)
    assert attend(q, k, v, mask=mask, is_causal=mask is None).shape == (0, 4, 5, 8)


def test_causal_with_fewer_queries_than_keys_is_sdpa_top_left(route):
    q, k, v = inputs(T=3, S=7)
    torch.testing.assert_close(attend(q, k, v, is_causal=True).double(),
                               naive(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)


def test_gradients_match_and_a_query_with_no_key_gets_zeros(route):
    """Both routes give SDPA's zeros for a fully masked query, with finite gradients equal
    to those of the naive reference (which leaves that row out)."""
    q, k, v = (t.double().requires_grad_() for t in inputs())
    mask = masks()["per row"].clone()
    mask[1, 0, 3] = False
    out = attend(q, k, v, mask=mask)
    assert out[1, :, 3].abs().max() == 0
    ref = naive(q, k, v, mask)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_explicit_route_computes_in_float32(autocast):
    """bf16 inputs under autograd (where bf16 takes the explicit route): it computes in
    float32 (autocast or not) and rounds the output once, so its error is bf16 rounding of
    the exact result, within SDPA's own."""
    q, k, v = (t.requires_grad_() for t in inputs(B=4, T=40, S=40, d=16, dv=16,
                                                    dtype=torch.bfloat16))
    ref = naive(q.detach(), k.detach(), v.detach(), is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = attend(q, k, v, is_causal=True).detach()
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True).detach()
    assert out.dtype == torch.bfloat16
    # One rounding to bf16 (unit roundoff 2**-8) of a float32 result, no more.
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
    assert (out.double() - ref).abs().max() <= (sdpa.double() - ref).abs().max()


def test_route_by_shape(monkeypatch):
    """The explicit route takes short multi-query CPU attention under autograd without
    dropout; one query, many keys, dropout and attention outside autograd go to SDPA."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    keys = attention.SMALL_ATTENTION_KEYS
    attend(*inputs(T=keys, S=keys), is_causal=True)
    assert calls == []
    for T, S, p in ((1, 9, 0.0), (keys + 1, keys + 1, 0.0), (8, 8, 0.1)):
        attend(*inputs(T=T, S=S), is_causal=T > 1, dropout_p=p)
    assert len(calls) == 3
    # Without autograd (prefill, decode) SDPA, in fp32 and bf16; bf16 under autograd up to
    # the low-precision limit.
    with torch.no_grad():
        attend(*inputs(T=8, S=8), is_causal=True)
        attend(*inputs(T=8, S=8, dtype=torch.bfloat16), is_causal=True)
    assert len(calls) == 5
    low = attention.SMALL_ATTENTION_KEYS_LOW_PRECISION
    attend(*inputs(T=low, S=low, dtype=torch.bfloat16), is_causal=True)
    assert len(calls) == 5


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_model_outputs_and_gradients_do_not_depend_on_the_route(attn_type, monkeypatch):
    """A padded batch through the whole model: the explicit route's logits and gradients
    equal SDPA's (every attention call of the first run takes the explicit route)."""
    cfg = MythosConfig(vocab_size=50, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=16,
                       max_loop_iters=2, attn_type=attn_type, n_experts=4, n_shared_experts=1,
                       n_experts_per_tok=2, expert_dim=16, kv_lora_rank=16, q_lora_rank=16,
                       qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, lora_rank=2)
    torch.manual_seed(0)
    model = OpenMythos(cfg).double()
    ids = torch.randint(0, 50, (2, 12))
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :3] = 0

    def run():
        model.zero_grad()
        out = model(ids, n_loops=2, attention_mask=pad)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    sdpa, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    explicit = run()
    assert calls == []
    monkeypatch.setattr(attention, "SMALL_ATTENTION_KEYS", 0)
    fused = run()
    assert calls
    torch.testing.assert_close(explicit[0], fused[0], rtol=1e-9, atol=1e-10)
    for a, b in zip(explicit[1], fused[1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
