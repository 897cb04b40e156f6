import torch

from open_mythos.layers import RMSNorm, apply_rope, loop_index_embedding, rope_cos_sin


def test_rmsnorm_matches_float64_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 32) * 100
    ref = x.double() / x.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    # Only the final cast is lossy: error of one bf16 rounding of the exact result.
    refb = xb.double() / xb.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight.double()
    # Rounding to nearest moves a value by at most half a bf16 ulp, 2^-8 of its magnitude
    # (the old 8e-3 / 1e-2 band also accepted statistics computed in bf16).
    torch.testing.assert_close(out.double(), refb, rtol=2**-8, atol=1e-6)


def test_rope_matches_complex_rotation():
    """Rotating channel pairs (i, i + d/2) equals multiplying by e^{i m theta_k}."""
    d, T = 16, 37
    x = torch.randn(2, 3, T, d, dtype=torch.float64)
    pos = torch.arange(100, 100 + T)
    cos, sin = rope_cos_sin(pos, d, 10000.0)
    out = apply_rope(x.float(), cos, sin).double()
    k = torch.arange(d // 2, dtype=torch.float64)
    angle = pos.double()[:, None] * 10000.0 ** (-2 * k / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    ref = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Relative position property: <R(m) q, R(n) k> depends only on m - n.
    q, kk = torch.randn(d), torch.randn(d)

    def dot(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), d, 10000.0)
        cn, sn = rope_cos_sin(torch.tensor([n]), d, 10000.0)
        return (apply_rope(q.view(1, 1, 1, d), cm, sm) * apply_rope(kk.view(1, 1, 1, d), cn, sn)).sum()

    torch.testing.assert_close(dot(7, 3), dot(1007, 1003), rtol=1e-4, atol=1e-4)


def test_rope_per_sequence_positions():
    x = torch.randn(2, 3, 5, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    cos, sin = rope_cos_sin(pos, 8, 500000.0)
    out = apply_rope(x, cos, sin)
    for b in range(2):
        c, s = rope_cos_sin(pos[b], 8, 500000.0)
        torch.testing.assert_close(out[b : b + 1], apply_rope(x[b : b + 1], c, s))


def test_loop_index_embedding_matches_naive_and_low_precision():
    h = torch.zeros(1, 2, 64)
    for t in (0, 1, 7, 100):
        out = loop_index_embedding(h, t, 8)
        freqs = [10000.0 ** (-(2 * i) / 8) for i in range(4)]
        ref = torch.tensor([torch.sin(torch.tensor(t * f, dtype=torch.float64)).item() for f in freqs]
                           + [torch.cos(torch.tensor(t * f, dtype=torch.float64)).item() for f in freqs],
                           dtype=torch.float64)
        torch.testing.assert_close(out[0, 0, :8].double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.all(out[..., 8:] == 0)
    # In bf16 the angle is still computed in fp32: loop 100 and 101 stay distinct.
    hb = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    a, b = loop_index_embedding(hb, 100, 8), loop_index_embedding(hb, 101, 8)
    assert a.dtype == torch.bfloat16 and not torch.equal(a, b)


def test_float64_pieces_pass_gradcheck_and_stay_float64():
    """Every "at least float32" computation keeps float64 inputs in float64: RMSNorm,
    the rotation, the loop signal and the halting head downcast them to float32, so a
    float64 gradient check of the model failed."""
    from open_mythos.layers.recurrence import ACTHalting, LTIInjection

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(8).double()
    halting = ACTHalting(8).double()
    cos, sin = rope_cos_sin(torch.arange(3), 8, 10000.0)
    for fn in (norm, halting, lambda t: loop_index_embedding(t, 2, 8),
               lambda t: apply_rope(t, cos.double(), sin.double())):
        assert fn(x).dtype == torch.float64
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    lti = LTIInjection(8).double()
    assert lti.get_A().dtype == torch.float64


def test_a_float64_model_matches_its_float32_self_closely_and_passes_gradcheck():
    from tests.conftest import halting_model

    model = halting_model("gqa", act_threshold=0.99)
    ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f32 = model(ids, n_loops=3)
    model = model.double()
    f64 = model(ids, n_loops=3)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), f32, rtol=1e-4, atol=1e-4)
    # d logits / d (the injection's log_A and the halting head) through every loop, ACT
    # weights included.
    names = ("recurrent.injection.log_A", "recurrent.act.halt.weight")
    params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_()
                   for n in names)

    def out(*values):
        return torch.func.functional_call(model, dict(zip(names, values)),
                                          (ids,), {"n_loops": 2})[0, -1, :5]

    assert torch.autograd.gradcheck(out, params, eps=1e-6, atol=1e-6, rtol=1e-4)
