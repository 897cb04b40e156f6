"""Old user code from SPEC §2 runs unchanged."""

import math

import pytest
import torch


def test_upstream_script_runs_unchanged():
    from open_mythos import (  # noqa: F401
        MythosConfig,
        MythosTokenizer,
        OpenMythos,
        mythos_1b,
        mythos_1t,
        mythos_3b,
        mythos_10b,
        mythos_50b,
        mythos_100b,
        mythos_500b,
    )
    from open_mythos.main import ACTHalting, MoEFFN
    from open_mythos.main import MythosConfig as MainConfig
    from open_mythos.main import OpenMythos as MainModel

    assert MainConfig is MythosConfig and MainModel is OpenMythos
    cfg = MythosConfig(vocab_size=1000, dim=256, n_heads=8, n_kv_heads=2, max_seq_len=128,
                       max_loop_iters=4, prelude_layers=1, coda_layers=1, attn_type="gqa",
                       kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16,
                       qk_nope_head_dim=16, v_head_dim=32, n_experts=8, n_shared_experts=1,
                       n_experts_per_tok=2, expert_dim=64, act_threshold=0.99,
                       rope_theta=500000.0, lora_rank=8, max_output_tokens=4096, dropout=0.0)
    model = OpenMythos(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(ids, n_loops=4)
    assert logits.shape == (2, 16, 1000)

    cache = {}
    model(ids, n_loops=4, kv_cache=cache)
    step = model(ids[:, :1], n_loops=4, kv_cache=cache, start_pos=16)
    assert step.shape == (2, 1, 1000)

    out = model.generate(ids, max_new_tokens=8, n_loops=8, temperature=1.0, top_k=50)
    assert out.shape == (2, 24)

    A = model.recurrent.injection.get_A()
    assert A.shape == (256,) and (A > 0).all() and (A <= 1).all()
    h = torch.randn(2, 16, 256)
    p = model.recurrent.act(h)
    assert p.shape == (2, 16) and ((p > 0) & (p < 1)).all()
    ffn = model.recurrent.block.ffn
    assert isinstance(ffn, MoEFFN) and isinstance(model.recurrent.act, ACTHalting)
    assert isinstance(ffn.router, torch.nn.Linear) and ffn.router.out_features == ffn.n_experts
    assert ffn.router_bias.shape == (8,) and ffn.topk == 2
    assert model.recurrent.last_ponder_cost.shape == (2, 1)  # after the latest forward
    for mod in model.modules():
        if isinstance(mod, MoEFFN):
            assert mod.last_aux_loss.ndim == 0 and mod.last_expert_load.shape == (8,)
            mod.update_router_bias()


def test_instrumentation_by_replacing_forward():
    """Tutorials swap ``act.forward`` to force halting; the block must call it every loop."""
    from open_mythos.main import MythosConfig, OpenMythos

    cfg = MythosConfig(vocab_size=50, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32,
                       max_loop_iters=4, prelude_layers=1, coda_layers=1, attn_type="mla",
                       kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                       v_head_dim=8, n_experts=4, n_shared_experts=1, n_experts_per_tok=2,
                       expert_dim=16, lora_rank=4, act_threshold=math.inf)
    model = OpenMythos(cfg).eval()
    calls = []
    act = model.recurrent.act

    def always_halt(h):
        calls.append(h.shape)
        return torch.ones(h.shape[:2])

    act.forward = always_halt
    model.cfg.act_threshold = 0.5
    model(torch.randint(0, 50, (1, 6)), n_loops=8)
    assert calls == [torch.Size([1, 6, 64])] and model.recurrent.last_loops_run == 1
    model(torch.randint(0, 50, (1, 6)), n_loops=8, act_early_exit=False)
    assert len(calls) == 9


def test_lora_and_injection_are_instrumented_as_upstream_calls_them():
    """Upstream's loop calls ``lora(out, t)`` and ``injection(h, e, out)``: a forward hook
    on the LoRA never fired (the loop called its parts), a LoRA ablated by replacing its
    forward changed nothing, and an injection replaced with upstream's three arguments
    raised a TypeError. Reference: the model with the LoRA's B zeroed (a true ablation),
    and the unmodified model (an injection replaced by upstream's own formula)."""
    import copy

    from open_mythos import OpenMythos
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = OpenMythos(tiny_config("gqa", max_loop_iters=3)).eval()
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.3)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        want = model(ids, n_loops=3)
        ablated = copy.deepcopy(model)
        ablated.recurrent.lora.B.zero_()
        without_lora = ablated(ids, n_loops=3)
    seen = []
    handle = model.recurrent.lora.register_forward_hook(
        lambda module, args, out: seen.append((args[0].shape, args[1])))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, n_loops=3), want)
    handle.remove()
    assert seen == [(torch.Size([2, 6, 64]), t) for t in range(3)]
    grads = []
    handle = model.recurrent.lora.register_full_backward_hook(
        lambda module, grad_in, grad_out: grads.append(grad_out[0].shape))
    model(ids, n_loops=3).sum().backward()
    handle.remove()
    assert grads == [torch.Size([2, 6, 64])] * 3  # a backward hook, once per loop
    lora = model.recurrent.lora
    lora.forward = lambda x, loop_t: torch.zeros_like(x)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, n_loops=3), without_lora)
    del lora.forward
    inj = model.recurrent.injection
    inj.forward = lambda h, e, out: inj.get_A() * h + inj.B * e + out  # upstream's
    with torch.no_grad():
        torch.testing.assert_close(model(ids, n_loops=3), want)


def test_every_exported_name_exists():
    """SPEC §3.11: the reference's ``__all__`` named functions that did not exist."""
    import importlib

    for module in ("open_mythos", "open_mythos.main", "open_mythos.layers", "open_mythos.inference",
                   "open_mythos.tasks", "open_mythos.training", "open_mythos.evaluation"):
        mod = importlib.import_module(module)
        missing = [name for name in mod.__all__ if not hasattr(mod, name)]
        assert not missing, (module, missing)


def test_upstream_module_paths_and_classes_reach_the_model():
    """Upstream scripts import ``open_mythos.tokenizer`` and the layer classes from the
    package, and select the model's layers by class (an FSDP wrap policy)."""
    import open_mythos
    import open_mythos.main as M
    from open_mythos.tokenizer import MythosTokenizer
    from open_mythos.tokenizers import MythosTokenizer as ours
    from tests.conftest import tiny_config

    assert MythosTokenizer is ours
    for name in ("MoEFFN", "RMSNorm", "GQAttention", "RecurrentBlock", "apply_rope",
                 "precompute_rope_freqs", "loop_index_embedding"):
        assert getattr(open_mythos, name) is getattr(M, name)
    for attn_type in ("gqa", "mla"):
        model = M.OpenMythos(tiny_config(attn_type))
        wrapped = [n for n, mod in model.named_modules()
                   if isinstance(mod, (M.TransformerBlock, M.RecurrentBlock))]
        assert wrapped == ["prelude.0", "recurrent", "recurrent.block", "coda.0"]
        assert isinstance(model.prelude[0].attn, (M.GQAttention, M.MLAttention))
        # Upstream's call works on the model's own block (it used to fail deep inside).
        torch.manual_seed(0)
        x = torch.randn(2, 6, model.cfg.dim)
        rope = model.prelude[0].rope_width
        freqs = M.precompute_rope_freqs(rope, 6, model.cfg.rope_theta)
        mask = torch.full((6, 6), float("-inf")).triu(1)
        ours_out = model.prelude[0](x, freqs, mask)
        assert ours_out.shape == x.shape and torch.isfinite(ours_out).all()


def test_a_mask_that_misses_the_cached_keys_is_refused_before_the_cache_changes():
    import open_mythos.main as M
    from tests.conftest import tiny_config

    for attn_type in ("gqa", "mla"):
        cfg = tiny_config(attn_type)
        layer = M.TransformerBlock(cfg)
        x = torch.randn(1, 8, cfg.dim)
        freqs = M.precompute_rope_freqs(layer.rope_width, 16, cfg.rope_theta)
        causal = torch.full((8, 8), float("-inf")).triu(1)
        cache = {}
        layer(x, freqs[:8], causal, cache, "L0")
        before = {k: v.clone() for k, v in cache["L0"].items()}
        with pytest.raises(ValueError, match=r"8 positions cached under 'L0'"):
            layer(x[:, :3], freqs[8:11], causal[:3, :3], cache, "L0")  # (T, T), not (T, S)
        assert cache["L0"].keys() == before.keys()
        assert all(torch.equal(cache["L0"][k], v) for k, v in before.items())
        with pytest.raises(ValueError, match=r"does not broadcast"):
            layer(x, freqs[:8], torch.zeros(1, 1, 8, 9))


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_upstreams_forward_written_by_hand_through_the_model_equals_the_model(attn_type):
    """Upstream's ``OpenMythos.forward``, written out with its attributes (``freqs_cis``,
    ``freqs_cis_mla``, ``_causal_mask``) and its layer calls, against the model's own."""
    import open_mythos.main as M
    from tests.conftest import halting_model

    model = halting_model(attn_type)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10))
    T = ids.shape[1]
    with torch.no_grad():
        freqs = (model.freqs_cis_mla if model.cfg.attn_type == "mla" else model.freqs_cis)[:T]
        mask = M.OpenMythos._causal_mask(T, ids.device)
        x = model.embed(ids)
        for i, layer in enumerate(model.prelude):
            x = layer(x, freqs, mask, None, f"prelude_{i}")
        x = model.recurrent(x, x, freqs, mask, 5, None)
        for i, layer in enumerate(model.coda):
            x = layer(x, freqs, mask, None, f"coda_{i}")
        by_hand = model.head(model.norm(x))
        torch.testing.assert_close(by_hand, model(ids, n_loops=5), rtol=1e-5, atol=1e-5)
    assert model.freqs_cis.shape == (model.cfg.max_seq_len, model.cfg.dim // model.cfg.n_heads // 2)
    assert model.freqs_cis_mla.dtype == torch.complex64
    assert "freqs_cis" not in model.state_dict()


def test_upstream_attribute_names_of_the_model_and_its_attention():
    """Names upstream code and its tutorials use: ``_causal_mask(T, device, dtype)``,
    ``_init_weights()`` after ``to_empty``, the attention widths, ``generate(n_loops=None)``,
    and ``freqs_cis`` as a table that is built once, not on every access."""
    import open_mythos.main as M
    from open_mythos.upstream import precompute_rope_freqs
    from tests.conftest import halting_model

    mask = M.OpenMythos._causal_mask(4, "cpu", torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0].isinf(), torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert (mask[0, 0].tril() == 0).all()

    mla = halting_model("mla")
    attn = mla.recurrent.block.attn
    cfg = mla.cfg
    assert (attn.qk_rope_dim, attn.qk_nope_dim, attn.q_head_dim) == (
        cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim + cfg.qk_nope_head_dim)
    gqa = halting_model("gqa")
    assert gqa.recurrent.block.attn.groups == cfg.n_heads // cfg.n_kv_heads

    table = mla.freqs_cis
    assert mla.freqs_cis is table  # kept, as upstream's buffer was
    want = precompute_rope_freqs(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    assert torch.equal(table, want)
    with pytest.raises(AttributeError, match="max_seq_len"):
        mla.freqs_cis = table
    mla.cfg.max_seq_len //= 2  # a changed config builds a new table
    assert mla.freqs_cis.shape[0] == cfg.max_seq_len

    with torch.device("meta"):
        lazy = M.OpenMythos(gqa.cfg)
    lazy.to_empty(device="cpu")
    lazy._init_weights()
    assert all(torch.isfinite(p).all() for p in lazy.parameters())
    assert lazy.head.weight is lazy.embed.weight

    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    torch.testing.assert_close(
        gqa.generate(ids, 3, None, do_sample=False),
        gqa.generate(ids, 3, gqa.cfg.max_loop_iters, do_sample=False), rtol=0, atol=0)


def test_a_plain_dict_cache_holds_upstreams_layout():
    """Code written for upstream reads a GQA entry's cached length as ``k.shape[1]`` (upstream
    stores (B, S, n_kv_heads, head_dim)); the keys are the rotated keys, the values the
    values, of the positions cached, as a fresh forward of the attention computes them."""
    from open_mythos.main import GQAttention, precompute_rope_freqs
    from tests.conftest import tiny_config

    cfg = tiny_config("gqa")
    attn = GQAttention(cfg).eval()
    freqs = precompute_rope_freqs(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 8, cfg.dim)
    cache = {}
    with torch.no_grad():
        attn(x[:, :5], freqs[:5], None, cache, "layer0")
        k_len = cache["layer0"]["k"].shape[1]
        attn(x[:, 5:], freqs[5:8], None, cache, "layer0")
    head_dim = cfg.dim // cfg.n_heads
    assert k_len == 5
    for name in ("k", "v"):
        assert cache["layer0"][name].shape == (2, 8, cfg.n_kv_heads, head_dim)
    # Two calls cache what one call over the 8 positions caches; the values are the value
    # projection of each position, head by head.
    with torch.no_grad():
        whole = {}
        attn(x, freqs[:8], None, whole, "layer0")
    for name in ("k", "v"):
        torch.testing.assert_close(cache["layer0"][name], whole["layer0"][name])
    v = attn.wv(x).view(2, 8, cfg.n_kv_heads, head_dim)
    torch.testing.assert_close(cache["layer0"]["v"], v.detach())


def test_a_plain_dict_cache_holds_upstreams_mla_entries():
    """MLA entries under upstream's names: ``c_kv`` (B, S, kv_lora_rank), the latent before
    ``kv_norm`` (as upstream caches it), and ``k_rope``, one rotated RoPE key per position
    (upstream's per-head copies are SPEC §3.5's defect); a decode over them equals the
    full forward."""
    from open_mythos import OpenMythos
    from open_mythos.main import MLAttention, precompute_rope_freqs
    from tests.conftest import tiny_config

    cfg = tiny_config("mla")
    attn = MLAttention(cfg).eval()
    freqs = precompute_rope_freqs(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 8, cfg.dim)
    cache = {}
    with torch.no_grad():
        attn(x[:, :5], freqs[:5], None, cache, "mla0")
        first_len = cache["mla0"]["c_kv"].shape[1]
        # Each tensor holds only itself (a slice of the wider projection kept all of it
        # alive, and the byte count of SPEC §2 fell short of what the dict holds).
        for t in cache["mla0"].values():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        attn(x[:, 5:], freqs[5:8], None, cache, "mla0")
        c_kv = attn.kv_down(x)[..., :cfg.kv_lora_rank]
    assert first_len == 5 and set(cache["mla0"]) == {"c_kv", "k_rope"}
    torch.testing.assert_close(cache["mla0"]["c_kv"], c_kv)
    assert cache["mla0"]["k_rope"].shape == (2, 8, cfg.qk_rope_head_dim)

    torch.manual_seed(0)
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids, n_loops=3)
        cache = {}
        model(ids[:, :6], n_loops=3, kv_cache=cache)
        steps = [model(ids[:, t:t + 1], n_loops=3, kv_cache=cache, start_pos=t)
                 for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=1e-4, atol=1e-5)
    assert all(set(e) == {"c_kv", "k_rope"} for k, e in cache.items() if "conv" not in k)
