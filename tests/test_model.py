import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from open_mythos import OpenMythos
from tests.conftest import halting_model, tiny_config


def test_causality(attn_type):
    model = halting_model(attn_type)
    ids = torch.randint(0, 97, (2, 16))
    ref = model(ids, n_loops=6, act_early_exit=False)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    out = model(changed, n_loops=6, act_early_exit=False)
    torch.testing.assert_close(out[:, :10], ref[:, :10], rtol=0, atol=1e-6)
    assert (out[:, 10] - ref[:, 10]).abs().max() > 1e-4


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1, 97]]), r"token ids must be in \[0, 97\)"),
    (torch.tensor([[-1, 3]]), r"token ids must be in"),
    (torch.zeros(1, 65, dtype=torch.long), r"exceed max_seq_len=64"),
    (torch.zeros(1, 4), r"integer token ids"),
    (torch.zeros(4, dtype=torch.long), r"\(batch, seq\)"),
])
def test_input_validation(bad, match):
    model = OpenMythos(tiny_config())
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_n_loops_validation():
    model = OpenMythos(tiny_config())
    ids = torch.zeros(1, 3, dtype=torch.long)
    # A meta tensor has no value to read (it raised RuntimeError from .item()).
    for bad in (0, -2, 1.5, torch.tensor(3.0), torch.tensor(True), torch.tensor([3]),
                torch.tensor(3, device="meta")):
        with pytest.raises(ValueError, match="n_loops must be a positive integer"):
            model(ids, n_loops=bad)
    # A 0-d integer tensor is a count, as in upstream's range(n_loops) (it was refused with
    # "must be a positive integer, got tensor(3)").
    with torch.no_grad():
        torch.testing.assert_close(model(ids, n_loops=torch.tensor(3)), model(ids, n_loops=3),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model(ids, kv_cache={}, start_pos=62)


def test_forward_options_of_the_wrong_kind_are_named():
    from open_mythos.inference import KVCache

    model = OpenMythos(tiny_config()).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    # A float or bool start_pos failed deep inside (a view, a narrow), and without a cache
    # 2.5 was taken as a RoPE offset.
    for bad, cache in ((-1, {}), (4.0, {}), (True, {}), ("4", {}), (2.5, None)):
        with pytest.raises(ValueError, match=r"start_pos \(the number of cached positions\) "
                                             "must be a non-negative integer"):
            model(ids, kv_cache=cache, start_pos=bad)
    cache = {}
    model(ids, kv_cache=cache)
    step = model(ids[:, :1], kv_cache=cache, start_pos=np.int64(3))  # NumPy's ints are ints
    assert step.shape == (1, 1, model.cfg.vocab_size)
    step = model(ids[:, :1], kv_cache=cache, start_pos=torch.tensor(4))  # upstream took it
    assert step.shape == (1, 1, model.cfg.vocab_size)
    with pytest.raises(ValueError, match="start_pos"):
        model(ids[:, :1], kv_cache=cache, start_pos=torch.tensor(5.0))
    with pytest.raises(TypeError, match="act_early_exit must be True, False or None"):
        model(ids, act_early_exit="no")  # a truthy string is not read as True
    with pytest.raises(TypeError, match="readout depths must be a collection"):
        model(ids, n_loops=3, readout_depths=2)
    with pytest.raises(ValueError, match="cache dtype must be a floating dtype"):
        KVCache(8, dtype=torch.int8)  # integer keys and values were silently rounded
    with pytest.raises(TypeError, match="cache dtype must be a torch.dtype"):
        KVCache(8, dtype="float16")


def test_numpy_integers_are_counts_like_python_ints():
    """Loop counts and generation lengths from NumPy (a sweep over ``np.arange``) work as
    Python ints, and reach the model as Python ints (no NumPy scalars in its arithmetic)."""
    np = pytest.importorskip("numpy")
    from open_mythos.config import check_loops
    from open_mythos.inference import generate, speculative_generate
    from open_mythos.inference.sampling import SamplingParams

    model = halting_model("gqa").eval()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids, n_loops=np.int64(3)), model(ids, n_loops=3))
    assert type(check_loops(np.int64(3))) is int
    assert type(SamplingParams(True, 1.0, np.int64(5)).top_k) is int
    kw = dict(do_sample=True, generator=torch.Generator().manual_seed(1))
    want = generate(model, ids, 6, 3, top_k=5, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    assert torch.equal(generate(model, ids, np.int64(6), np.int32(3), top_k=np.int64(5), **kw),
                       want)
    greedy = generate(model, ids, 6, 3, do_sample=False)
    assert torch.equal(speculative_generate(model, ids, np.int64(6), np.int64(3),
                                            draft_loops=np.int64(1), draft_tokens=np.int64(2)),
                       greedy)
    for bad in (np.float64(2.0), np.bool_(True), np.int64(0)):
        with pytest.raises(ValueError, match="n_loops must be a positive integer"):
            model(ids, n_loops=bad)


def test_bf16_forward_finite_and_close_to_fp32(attn_type):
    """bf16 (autocast, or the weights cast) against fp32, and bf16 cached decoding against
    the bf16 full forward, at bands that a loop more or fewer falls outside of.

    The old bands accepted a wrong depth: rtol = atol = 0.05 took the 3-loop logits for
    the 4-loop ones in the cached comparison (both attention types), and a relative error
    below 0.05 took a 5-loop forward for the 4-loop one (GQA: 0.047).
    """
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type)).eval()
    ids = torch.randint(0, 97, (2, 24))
    ref = model(ids, n_loops=4)
    wrong_depths = [model(ids, n_loops=n) for n in (3, 5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(ids, n_loops=4)
    half = model.to(torch.bfloat16)(ids, n_loops=4)
    assert half.dtype == torch.bfloat16

    def rel_err(out):
        return ((out.float() - ref).abs().max() / ref.abs().max()).item()

    # bf16 keeps 8 bits (a rounding is 2^-9 relative) through ~10 blocks: measured at most
    # 0.0052 over 20 random models; a loop more or fewer is 0.044 or more.
    for out in (auto, half):
        assert torch.isfinite(out).all()
        assert rel_err(out) < 0.01
    assert min(rel_err(w) for w in wrong_depths) > 0.03
    # Cached decoding in bf16 too (the cache stores bf16). The same bf16 operations on the
    # same values (equal on CPU); the band allows two bf16 ulps at the largest logits
    # (|logit| < 2, ulp 2^-7) for kernels that round differently for one row.
    cache = {}
    model(ids[:, :20], n_loops=4, kv_cache=cache)
    step = model(ids[:, 20:21], n_loops=4, kv_cache=cache, start_pos=20)
    assert half[:, 20].float().abs().max() < 2
    torch.testing.assert_close(step[:, 0].float(), half[:, 20].float(), rtol=0, atol=2**-6)
    three = model(ids, n_loops=3)[:, 20].float()
    assert (three - half[:, 20].float()).abs().max() > 2 * 2**-6


def test_safetensors_round_trip_keeps_tied_head(tmp_path, attn_type):
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type))
    model.recurrent.block.ffn.router_bias.fill_(0.25)
    save_model(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    loaded = OpenMythos(tiny_config(attn_type))
    load_model(loaded, tmp_path / "model.safetensors")
    assert loaded.head.weight is loaded.embed.weight
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_state_dict_round_trip(attn_type):
    a = OpenMythos(tiny_config(attn_type))
    b = OpenMythos(tiny_config(attn_type))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["looped", "baseline"])
def test_meta_device_materialisation_equals_a_normal_build(kind):
    from open_mythos.baseline import BaselineConfig, DenseBaseline

    cfg = tiny_config("mla", init_std=None, embed_init_std=None)
    cls = OpenMythos
    if kind == "baseline":
        cfg, cls = BaselineConfig(**{**cfg.to_dict(), "core_layers": 2}), DenseBaseline
    ref = cls(cfg)
    with torch.device("meta"):
        model = cls(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    for t in [*model.parameters(), *model.buffers()]:
        t.data.fill_(float("nan"))  # what uninitialised memory may hold
    torch.manual_seed(3)
    model.reset_parameters()
    torch.manual_seed(3)
    ref.reset_parameters()
    # Every tensor, non-persistent buffers included (the MoE load accumulator).
    named = lambda m: {**dict(m.named_parameters()), **dict(m.named_buffers())}  # noqa: E731
    got, want = named(model), named(ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert model.head.weight is model.embed.weight
    ids = torch.randint(0, 97, (1, 4))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["looped", "baseline"])
def test_loading_onto_a_meta_model_with_assign_keeps_the_head_tied(kind):
    """PyTorch's way to load a large model: build it on the meta device, then
    ``load_state_dict(state, assign=True)``. The assignment gave the head and the embedding
    a parameter each (until 2026-12-07): counted twice, and trained apart by AdamW."""
    from open_mythos.baseline import BaselineConfig, DenseBaseline

    cfg, cls = tiny_config(), OpenMythos
    if kind == "baseline":
        cfg, cls = BaselineConfig(**{**cfg.to_dict(), "core_layers": 2}), DenseBaseline
    torch.manual_seed(0)
    ref = cls(cfg).train()
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # two distinct tensors
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(state, assign=True)
    model.train()
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    ids = torch.randint(0, 97, (2, 12))
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
    torch.testing.assert_close(model.embed.weight, ref.embed.weight, rtol=0, atol=0)
    assert model.head.weight is model.embed.weight
    # The matrix stored once (this project's safetensors files, HF exports): the head is
    # reported missing, as PyTorch reports every alias (safetensors.torch.load_model
    # relies on it), and tied.
    once = {k: v.clone() for k, v in ref.state_dict().items() if k != "head.weight"}
    with torch.device("meta"):
        model = cls(cfg)
    assert model.load_state_dict(once, assign=True, strict=False).missing_keys == ["head.weight"]
    assert model.head.weight is model.embed.weight
    torch.testing.assert_close(model.embed.weight, ref.embed.weight, rtol=0, atol=0)


def test_training_step_reduces_loss(attn_type):
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1], n_loops=3)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
        loss = loss + 0.01 * model.aux_loss + 1e-3 * model.recurrent.last_ponder_cost.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("kind", ["looped", "baseline"])
def test_init_std_and_embed_init_std(kind):
    from open_mythos.baseline import build_model, matched_baseline_config

    cfg = tiny_config(dim=128, n_heads=8, init_std=0.125, embed_init_std=1.0, vocab_size=400)
    torch.manual_seed(0)
    model = build_model(cfg if kind == "looped" else matched_baseline_config(cfg, 2))
    assert model.head.weight is model.embed.weight
    assert abs(model.embed.weight.std().item() - 1.0) < 0.03
    assert abs(model.prelude[0].attn.wq.weight.std().item() - 0.125) < 0.005
    assert abs(model.coda[0].ffn.down.weight.std().item() - 0.125) < 0.005
    if kind == "looped":
        assert abs(model.recurrent.block.ffn.w_gate_up.std().item() - 0.125) < 0.005
        # The recurrence's own inits are kept: LoRA B = 0, halting bias from the config.
        assert model.recurrent.lora.B.abs().max() == 0
    upstream = build_model(tiny_config(dim=128, n_heads=8, vocab_size=400, init_std=0.02,
                                       embed_init_std=0.02))
    assert abs(upstream.embed.weight.std().item() - 0.02) < 0.002
    assert abs(upstream.prelude[0].attn.wq.weight.std().item() - 0.02) < 0.002
    assert torch.equal(upstream.norm.weight, torch.ones(128))  # upstream's final norm


@pytest.mark.parametrize("dim", [64, 256])
@pytest.mark.parametrize("logit_std", [None, 8.0])
def test_default_init_scales_with_width(dim, logit_std):
    """Matrices N(0, 1/dim), a unit-variance embedding, and a final-norm gain that caps the
    tied head's initial logit std at ``init_logit_std`` (1 by default; measured on a
    forward, not read off the config)."""
    torch.manual_seed(0)
    extra = {} if logit_std is None else {"init_logit_std": logit_std}
    model = OpenMythos(tiny_config(dim=dim, n_heads=4, vocab_size=1000, init_std=None,
                                   embed_init_std=None, **extra)).eval()
    cap = logit_std or 1.0
    assert abs(model.prelude[0].attn.wq.weight.std().item() - dim ** -0.5) < 0.1 * dim ** -0.5
    assert abs(model.recurrent.block.ffn.w_gate_up.std().item() - dim ** -0.5) < 0.1 * dim ** -0.5
    assert abs(model.embed.weight.std().item() - 1.0) < 0.05
    assert torch.allclose(model.norm.weight, torch.full((dim,), min(1.0, cap / dim ** 0.5)))
    ids = torch.randint(0, 1000, (4, 32))
    with torch.no_grad():
        logits = model(ids, n_loops=4)
    assert 0.85 * cap < logits.std().item() < 1.15 * cap
    # The first loss: within a few nats of uniform logits' log(vocab) at std 1 (the tied
    # head still favours the input token), far above it at 8.
    loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 1000, (4 * 32,))).item()
    assert loss < math.log(1000) + 3 if logit_std is None else loss > 4 * math.log(1000)


# Input validation: a clear ValueError where a user's mistake used to reach a deep
# traceback, or was silently accepted.

def test_token_ids_must_be_int64_or_int32_and_the_batch_non_empty():
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(model(ids.int()), model(ids))
    for dtype in (torch.uint8, torch.int16):
        with pytest.raises(ValueError, match=r"int64 .*input_ids.long\(\)"):
            model(ids.to(dtype))
    with pytest.raises(ValueError, match="int64"):
        model(ids.float())
    with pytest.raises(ValueError, match="empty batch"):
        model(ids[:0])
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(ids[:0], max_new_tokens=2)


def test_attention_mask_must_be_a_tensor_of_ones_and_zeros():
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = model(ids, attention_mask=mask)
    for same in (mask.bool(), mask.float(), mask.int()):
        torch.testing.assert_close(model(ids, attention_mask=same), want)
    for bad in (0.5, 2.0, -1.0, float("nan")):
        # These were all read as "a real token": the output of no mask at all.
        with pytest.raises(ValueError, match="only 1 .* and 0"):
            model(ids, attention_mask=torch.where(mask.bool(), 1.0, bad))
    with pytest.raises(ValueError, match="must be a tensor"):
        model(ids, attention_mask=mask.tolist())


def test_logits_at_indices_are_checked():
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(model(ids, logits_at=torch.tensor([0, 9])),
                               model(ids).flatten(0, 1)[[0, 9]])
    for bad in ([10], [-1]):
        with pytest.raises(ValueError, match=r"in \[0, 10\)"):
            model(ids, logits_at=torch.tensor(bad))
    with pytest.raises(ValueError, match="must be a tensor"):
        model(ids, logits_at=[0, 1])


@pytest.mark.parametrize("bad", [0, -3, "a", 1.5])
def test_backprop_loops_must_be_a_positive_integer(bad):
    """0 and negative counts silently cut every gradient to the looped block."""
    model = halting_model("gqa").train()
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="backprop_loops must be a positive integer"):
        model(ids, n_loops=3, backprop_loops=bad)
    with pytest.raises(ValueError, match="backprop_loops must be a positive integer"):
        model(ids, n_loops=3, readout_depths=[1], backprop_loops=bad)


def test_a_cache_serves_one_batch_of_one_model():
    """A batch of 1 written into a batch-2 KVCache at position 0 was broadcast over both
    rows (silently); other misuses failed deep in attention with a shape error."""
    from open_mythos.inference import KVCache

    gqa, mla = halting_model("gqa"), halting_model("mla")
    two, one = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (1, 6))
    for cache in (KVCache(16), {}):
        gqa(two, kv_cache=cache)
        with pytest.raises(ValueError, match="a cache serves one batch of one model"):
            gqa(one[:, :1], kv_cache=cache, start_pos=6)
    cache = KVCache(16)
    gqa(two, kv_cache=cache)
    with pytest.raises(ValueError, match="a cache serves one batch of one model"):
        gqa(one, kv_cache=cache)
    cache = {}
    gqa(two, kv_cache=cache)
    with pytest.raises(ValueError, match="a cache serves one batch of one model"):
        mla(two[:, :1], kv_cache=cache, start_pos=6)


def test_generation_arguments_of_other_integer_types():
    import numpy as np

    from open_mythos import MythosConfig
    from open_mythos.inference import SamplingParams, generate

    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 4))
    want = generate(model, ids, 6, 3, do_sample=False, eos_token_id=5, pad_token_id=0)
    for eos in (torch.tensor(5), np.int64(5), [np.int64(5)]):
        assert torch.equal(generate(model, ids, 6, 3, do_sample=False, eos_token_id=eos,
                                    pad_token_id=0), want)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, ids, 6, 3, do_sample=False, eos_token_id=5.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=True)
    with pytest.raises(ValueError, match="dropout"):
        MythosConfig(dropout="0.1")


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_right_padding_on_the_cpu_takes_the_causal_kernel(attn_type):
    """A trainer's task batch is padded on the right: the real tokens' logits are those of
    each row alone, the padding stays out of the MoE load, and no explicit attention mask
    is built (it cost ~5% of a training step)."""
    torch.manual_seed(0)
    model = halting_model(attn_type).train()
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    contexts = []
    build = model._context
    model._context = lambda *a: contexts.append(build(*a)) or contexts[-1]
    with torch.no_grad():
        out = model(ids, n_loops=3, attention_mask=mask)
        load = model.recurrent.last_expert_load.clone()
        ctx = contexts[-1]
        assert ctx.mask is None and ctx.is_causal and torch.equal(ctx.token_mask, mask)
        for row, n in ((0, 4), (1, 7)):
            alone = model(ids[row:row + 1, :n], n_loops=3)
            torch.testing.assert_close(out[row, :n], alone[0], rtol=1e-5, atol=1e-5)
    k = model.cfg.n_experts_per_tok
    assert load.sum(-1).tolist() == [(4 + 7) * k] * 3  # every loop's load: real tokens only
    # Left padding (batched prompts) keeps the explicit mask.
    with torch.no_grad():
        model(ids, n_loops=3, attention_mask=mask.flip(-1))
    assert contexts[-1].mask is not None


def test_torch_export_of_the_forward_with_a_dynamic_length(attn_type):
    """``torch.export`` (PyTorch's graph export; TorchScript's ``jit.trace`` is not
    supported) captures the eval forward at a fixed loop count, any sequence length."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type)).eval()
    ids = torch.randint(0, 97, (2, 12))
    length = torch.export.Dim("T", min=2, max=model.cfg.max_seq_len)
    program = torch.export.export(model, (ids,), kwargs={"n_loops": 3},
                                  dynamic_shapes=({1: length}, None))
    other = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other, n_loops=3), model(other, n_loops=3),
                                   rtol=1e-5, atol=1e-6)


def test_flops_and_shapes_on_the_meta_device_and_fake_tensors(attn_type):
    """Shapes without values (the meta device, FakeTensorMode) as FLOP and memory estimates
    of large configs use them: the forward skips the token-id range check (it read values
    on the host) and ACT's early exit (no values to halt on), and counts the real FLOPs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model, ids):
        with FlopCounterMode(display=False) as counter:
            model(ids, n_loops=3).float().square().mean().backward()
        return counter.get_total_flops()

    torch.manual_seed(0)
    real = flops(OpenMythos(tiny_config(attn_type)).train(), torch.randint(0, 97, (2, 12)))
    with torch.device("meta"):
        model, ids = OpenMythos(tiny_config(attn_type)).train(), torch.zeros(2, 12, dtype=torch.long)
    assert flops(model, ids) == real
    with torch.no_grad():  # eval: early exit on by default
        assert model.eval()(ids, n_loops=3).shape == (2, 12, 97)
    with FakeTensorMode():
        model = OpenMythos(tiny_config(attn_type)).train()
        assert flops(model, torch.zeros(2, 12, dtype=torch.long)) == real


def test_a_float64_model_computes_its_position_and_loop_tables_in_float64():
    """A float64 model (a reference for measuring bf16 error) rounded its RoPE tables and
    loop signal to float32: ~1e-7 off a float64 computation everywhere. Reference: the
    angles' cos and sin in Python floats; a float32 model keeps float32 tables."""
    import math

    for dtype, tol in ((torch.float64, 1e-15), (torch.float32, 1e-7)):
        model = OpenMythos(tiny_config("gqa")).to(dtype)
        ctx = model._context(torch.zeros(1, 6, dtype=torch.long), 3, None, None)
        dim, theta = model.rope_dim, model.cfg.rope_theta
        want = torch.tensor([[math.cos(p * theta ** (-2 * i / dim)) for i in range(dim // 2)]
                             for p in range(3, 9)], dtype=torch.float64)
        assert ctx.cos.dtype == dtype
        torch.testing.assert_close(ctx.cos.double(), want, rtol=0, atol=tol)
        rec = model.recurrent
        signal = rec._loop_signal(5, torch.zeros(1, 1, model.cfg.dim, dtype=dtype))
        half = (rec.loop_dim + 1) // 2
        freqs = [10000.0 ** (-2 * i / rec.loop_dim) for i in range(half)]
        want = torch.tensor(([math.sin(5 * f) for f in freqs] + [math.cos(5 * f) for f in freqs])
                            [:rec.loop_dim], dtype=torch.float64)
        assert signal.dtype == dtype
        torch.testing.assert_close(signal[:rec.loop_dim].double(), want, rtol=0, atol=tol)
