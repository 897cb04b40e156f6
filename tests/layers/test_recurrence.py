import copy
import functools
import math

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

from open_mythos import OpenMythos
from open_mythos.layers import LoRAAdapter, LTIInjection, TransformerBlock
from tests.conftest import halting_model, tiny_config


def test_lti_A_stays_in_unit_interval_after_abusive_updates():
    inj = LTIInjection(16)
    opt = torch.optim.SGD(inj.parameters(), lr=1.0)
    for direction in (+1.0, -1.0):
        for _ in range(200):
            opt.zero_grad()
            (direction * inj.get_A().sum() * 1e4).backward()
            opt.step()
            A = inj.get_A()
            assert torch.isfinite(A).all()
            assert (A > 0).all() and (A < 1).all(), (A.min().item(), A.max().item())
        # The gradient never dies at a clamp: it can always move A back.
        inj.zero_grad()
        inj.get_A().sum().backward()
        assert inj.log_A.grad.abs().min() > 0


def test_lti_update_rule():
    inj = LTIInjection(8)
    torch.nn.init.normal_(inj.log_A)
    h, e, o = torch.randn(3, 2, 5, 8).unbind(0)
    A = torch.exp(-torch.exp(inj.log_dt.double() + inj.log_A.double()))
    ref = A * h.double() + inj.B.double() * e.double() + o.double()
    torch.testing.assert_close(inj(h, e, o).double(), ref, rtol=1e-5, atol=1e-5)


def test_lora_clamps_loop_index_beyond_trained_depth():
    lora = LoRAAdapter(16, 4, max_loops=3)
    torch.nn.init.normal_(lora.B)
    torch.nn.init.normal_(lora.scale.weight)
    x = torch.randn(2, 5, 16)
    ref = (x @ lora.down.weight.T * lora.scale.weight[2]) @ lora.B
    for t in (2, 3, 10, 1000):
        torch.testing.assert_close(lora(x, t), ref)
    assert not torch.allclose(lora(x, 1), ref)


def test_lora_learns_from_initialisation():
    """B starts at zero (identity adapter) but receives an O(1) gradient (SPEC §3.9)."""
    lora = LoRAAdapter(64, 8, 4)
    x = torch.randn(4, 10, 64)
    assert lora(x, 0).abs().max() == 0
    lora(x, 0).mul(torch.randn(4, 10, 64)).sum().backward()
    assert lora.B.grad.abs().mean() > 1e-2


def test_act_weights_are_convex_and_halted_positions_freeze(attn_type):
    model = halting_model(attn_type)
    ids = torch.randint(0, 97, (3, 20))
    states = []
    model.recurrent.injection.register_forward_hook(lambda m, args, out: states.append(args[0]))
    model(ids, n_loops=8, act_early_exit=False)
    w = model.recurrent.last_act_weights  # (loops, B, T)
    assert w.shape == (8, 3, 20) and (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones(3, 20))
    halted_at = (w > 0).long().cumsum(0).argmax(0)  # last loop with weight
    assert (halted_at < 6).sum() > 5 and halted_at.max() > halted_at.min()  # varied halting
    ponder = (w * torch.arange(1, 9).view(8, 1, 1)).sum(0)
    torch.testing.assert_close(model.recurrent.last_ponder_cost, ponder)
    # The state entering loop t of a position that halted before t never changes again.
    for t in range(1, 8):
        frozen = halted_at < t - 1
        torch.testing.assert_close(states[t][frozen], states[t - 1][frozen], rtol=0, atol=0)


def test_weights_sum_to_one_when_threshold_never_reached(attn_type):
    model = halting_model(attn_type)
    model.cfg.act_threshold = math.inf
    model(torch.randint(0, 97, (2, 9)), n_loops=5)
    assert model.recurrent.last_loops_run == 5
    torch.testing.assert_close(model.recurrent.last_act_weights.sum(0), torch.ones(2, 9))


def test_early_exit_skips_loops_with_identical_output(attn_type):
    # A seed whose sequences both halt within 30 loops at threshold 0.5, at different loops.
    model = halting_model(attn_type, seed=2, act_threshold=0.5)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    full = model(ids, n_loops=30, act_early_exit=False)
    fast = model(ids, n_loops=30, act_early_exit=True)
    assert model.recurrent.last_loops_run < 30 and model.recurrent.last_work_fraction < 0.9
    # Sub-batches change matmul blocking only: equal up to float rounding.
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_depth_matters_at_initialisation(attn_type):
    """SPEC §3.1: the reference halts everything after 2-3 loops, so 16 loops == 3 loops."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type, max_loop_iters=16)).eval()
    ids = torch.randint(0, 97, (2, 12))
    out4, out16 = model(ids, n_loops=4), model(ids, n_loops=16)
    assert model.recurrent.last_loops_run == 16
    assert (out16 - out4).abs().max() > 1e-3 * out4.abs().max()


def test_act_off_returns_last_state_and_runs_every_loop():
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(use_act=False)).eval()
    calls = []
    model.recurrent.act.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 97, (1, 5))
    model(ids, n_loops=6)
    assert model.recurrent.last_loops_run == 6 and not calls
    assert torch.all(model.recurrent.last_ponder_cost == 6)


def test_gradient_checkpointing_and_truncated_backprop(attn_type):
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type)).train()
    ids = torch.randint(0, 97, (2, 10))

    def grads(**kw):
        model.zero_grad()
        model.recurrent.block.ffn.load_since_update.zero_()
        model(ids, n_loops=4, **kw).square().mean().backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return g, model.recurrent.block.ffn.load_since_update.clone()

    ref, load = grads()
    model.recurrent.gradient_checkpointing = True
    ckpt, load_ckpt = grads()
    model.recurrent.gradient_checkpointing = False
    assert ref.keys() == ckpt.keys()
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    assert torch.equal(load, load_ckpt)  # recomputation does not count the load twice
    trunc, _ = grads(backprop_loops=1)
    # Prelude only feeds the loop through e, which is also injected in the tracked loop.
    assert "prelude.0.ffn.gate.weight" in trunc
    assert not torch.allclose(trunc["recurrent.block.attn.wo.weight"],
                              ref["recurrent.block.attn.wo.weight"])


@pytest.mark.parametrize("wrap", ["checkpoint", "apply_activation_checkpointing"])
@pytest.mark.parametrize("backprop_loops", [None, 2])
def test_a_users_activation_checkpointing_of_the_looped_block(attn_type, wrap, backprop_loops):
    """Checkpointing the looped block by PyTorch's own tools (not the built-in flag): each
    recomputed loop attends over its own depth's keys and values, so the gradients and the
    counted expert load equal those of the uncheckpointed model. Until 2026-12-07 every loop
    read one carry that later loops overwrote: recomputation raised CheckpointError, or, with
    truncated backprop, gave wrong gradients (``wv``'s zero) without a word."""
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))

    def grads(model):
        model.recurrent.block.ffn.load_since_update.zero_()
        out = model(ids, n_loops=5, backprop_loops=backprop_loops)
        (out.square().mean() + model.aux_loss).backward()
        g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return g, model.recurrent.block.ffn.load_since_update.clone()

    reference = halting_model(attn_type).train()
    assert reference.cfg.use_act
    wrapped = copy.deepcopy(reference)
    if wrap == "checkpoint":
        block = wrapped.recurrent.block
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    else:
        apply_activation_checkpointing(
            wrapped, check_fn=lambda m: isinstance(m, TransformerBlock),
            checkpoint_wrapper_fn=functools.partial(
                checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
        assert not isinstance(wrapped.recurrent.block, TransformerBlock)
    ref, ref_load = grads(reference)
    # The positions really halt at different loops: the carry mixes depths.
    assert len(set(reference.recurrent.last_position_loops.flatten().tolist())) > 1
    got, load = grads(wrapped)
    names = {n.replace("._checkpoint_wrapped_module", "") for n in got}
    assert names == set(ref)
    for n, g in got.items():
        torch.testing.assert_close(g, ref[n.replace("._checkpoint_wrapped_module", "")],
                                   rtol=1e-5, atol=1e-7, msg=n)
    assert torch.equal(load, ref_load)  # the recomputation counted nothing


def test_a_reentrant_checkpoint_of_the_looped_block_is_refused():
    """``use_reentrant=True`` (PyTorch's default when not given) runs the block under
    ``no_grad``: the keys and values each loop carries to the next would get no gradient,
    and the gradients came out silently wrong (relative error up to 1.6)."""
    model = halting_model("gqa").train()
    block = model.recurrent.block
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=True)
    ids = torch.randint(0, 97, (2, 10))
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(ids, n_loops=3)
    # One differentiated loop after loops without autograd: its input has no gradient to
    # lose, but its balance loss (the router's gradient) would.
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(ids, n_loops=3, backprop_loops=1)
    with torch.no_grad():  # without autograd nothing is lost: it runs
        model(ids, n_loops=3)


def test_truncated_backprop_keeps_the_balance_loss_strength():
    """With ``backprop_loops=k`` the balance loss reads the mean over every loop but
    differentiates as the mean over the ``k`` recorded loops: the mean over all would scale
    the configured ``aux_weight`` by ``k / n_loops``."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(n_experts=4, n_experts_per_tok=2)).train()
    ids = torch.randint(0, 97, (2, 9))
    ffn = model.recurrent.block.ffn
    per_loop = []
    ffn.register_forward_hook(lambda m, a, o: per_loop.append(m.last_aux_loss))
    router = ffn.router.weight
    model(ids, n_loops=4)
    full = model.aux_loss.detach()
    per_loop.clear()
    model(ids, n_loops=4, backprop_loops=2)
    assert len(per_loop) == 4
    assert not per_loop[0].requires_grad and per_loop[3].requires_grad
    torch.testing.assert_close(model.aux_loss.detach(), full)  # the value: every loop
    torch.testing.assert_close(model.aux_loss.detach(), torch.stack(per_loop).mean().detach())
    (got,) = torch.autograd.grad(model.aux_loss, router, retain_graph=True)
    (want,) = torch.autograd.grad(torch.stack(per_loop[2:]).mean(), router)
    torch.testing.assert_close(got, want)
    assert want.abs().sum() > 0


def test_hooks_see_every_loop():
    """Upstream tutorials instrument act and the MoE FFN; keep those calls observable."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(act_threshold=math.inf)).eval()
    act_calls, ffn_shapes = [], []
    model.recurrent.act.register_forward_hook(lambda m, a, o: act_calls.append(o.shape))
    model.recurrent.block.ffn.register_forward_hook(lambda m, a, o: ffn_shapes.append(a[0].shape))
    model(torch.randint(0, 97, (2, 7)), n_loops=5)
    assert act_calls == [torch.Size([2, 7])] * 5
    assert ffn_shapes == [torch.Size([2, 7, 64])] * 5
    assert model.recurrent.last_expert_load.shape == (5, 4)


def test_clamp_loop_index_repeats_the_last_signal(monkeypatch):
    from open_mythos.layers import RecurrentBlock, loop_index_embedding

    seen = []
    original = RecurrentBlock.loop_body

    def spy(self, h, e, signal, *args, **kwargs):
        seen.append(signal)
        return original(self, h, e, signal, *args, **kwargs)

    monkeypatch.setattr(RecurrentBlock, "loop_body", spy)
    ids = torch.randint(0, 97, (1, 5))
    zeros = torch.zeros(1, 64)
    for clamp, want in ((False, [0, 1, 2, 3, 4, 5]), (True, [0, 1, 2, 2, 2, 2])):
        seen.clear()
        model = OpenMythos(tiny_config(max_loop_iters=3, use_act=False, clamp_loop_index=clamp))
        model(ids, n_loops=6)
        # Each loop's signal is the sinusoid of its (clamped) index.
        assert len(seen) == 6
        for signal, t in zip(seen, want):
            torch.testing.assert_close(signal.expand(1, 64),
                                       loop_index_embedding(zeros, t, model.cfg.loop_dim))
    # Same weights: the clamp changes nothing up to max_loop_iters loops, and beyond it the
    # deeper loops see the old signal, so the outputs differ.
    torch.manual_seed(0)
    a = OpenMythos(tiny_config(max_loop_iters=3, use_act=False, clamp_loop_index=True)).eval()
    b = OpenMythos(tiny_config(max_loop_iters=3, use_act=False)).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(ids, n_loops=3), b(ids, n_loops=3), rtol=0, atol=0)
        assert not torch.allclose(a(ids, n_loops=5), b(ids, n_loops=5))


def test_training_after_an_inference_mode_forward():
    """Per-loop constants cached by a forward under ``torch.inference_mode`` (as the server
    runs) must not break a later training forward and backward."""
    model = OpenMythos(tiny_config())
    ids = torch.randint(0, 97, (2, 8))
    with torch.inference_mode():
        model(ids, n_loops=2)
    model.train()
    model(ids, n_loops=3).sum().backward()
    assert model.recurrent.injection.log_A.grad is not None


def test_a_state_of_zeros_has_finite_gradients():
    """With no Prelude the first loop's state is the embedding: a zeroed row (a pad token's,
    as ``nn.Embedding(padding_idx=...)`` leaves it) must not make the loop signal's RMS
    scale's gradient 0 * inf = NaN in every recurrent parameter."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(prelude_layers=0))
    with torch.no_grad():
        model.embed.weight[0].zero_()
    ids = torch.randint(1, 97, (2, 8))
    ids[:, :3] = 0
    model(ids, n_loops=3).logsumexp(-1).mean().backward()
    bad = [n for n, p in model.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []
    assert model.recurrent.injection.log_A.grad.abs().sum() > 0
