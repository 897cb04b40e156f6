"""``torch.compile`` of the recurrent block's inner TransformerBlock (the loop stays in
Python) and of the MoE alone, and the absence of host synchronisation in training.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from open_mythos import OpenMythos
from open_mythos.layers import moe as moe_module
from open_mythos.layers.moe import MoEFFN
from tests.conftest import halting_model, tiny_config

# Ops that read a device tensor on the host (a CUDA synchronisation).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "equal",
              "is_nonzero", "_unique2", "unique_consecutive", "unique_dim"}


class HostReadRecorder(TorchDispatchMode):
    """Records every dispatched op that would synchronise with the device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_segment_fallback(monkeypatch):
    """Fail if the grouped matmul takes the loop fallback (the one path that reads sizes)."""

    def forbidden(offs):
        raise AssertionError("grouped matmul fell back to the host-synchronising loop")

    monkeypatch.setattr(moe_module, "_segments", forbidden)


def _train_step(model: OpenMythos, ids: torch.Tensor, n_loops: int):
    model.zero_grad(set_to_none=True)
    logits = model(ids, n_loops=n_loops)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss = loss + 0.01 * model.aux_loss + 0.01 * model.recurrent.last_ponder_cost.mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def test_moe_fullgraph_compile_matches_eager(no_segment_fallback):
    torch.manual_seed(0)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=2, expert_dim=16)).train()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    compiled = torch.compile(copy.deepcopy(moe), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, out_c = moe(x), compiled(x2)
    torch.testing.assert_close(out_c, out)
    out.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    for (name, p), p_c in zip(moe.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, msg=name)
    compiled_moe = compiled._orig_mod
    torch.testing.assert_close(compiled_moe.load_since_update, moe.load_since_update)
    torch.testing.assert_close(compiled_moe.last_expert_load, moe.last_expert_load)


@pytest.mark.parametrize("backend, use_act", [
    ("aot_eager", True),
    ("aot_eager", False),
    # Inductor generates and builds C++ kernels: ~5 s with a warm cache, ~40 s cold.
    pytest.param("inductor", True, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("target", ["block", "loop"])
def test_compiled_recurrent_block_matches_eager(backend, use_act, target):
    torch.manual_seed(0)
    cfg = tiny_config(use_act=use_act, act_threshold=0.7, act_halt_bias_init=0.0)
    eager = OpenMythos(cfg).train()
    torch.nn.init.normal_(eager.recurrent.act.halt.weight, std=0.3)  # positions halt at
    compiled = copy.deepcopy(eager)                                    # different loops
    # The loop stays in Python; the block (or the whole loop body) compiles to one graph for
    # loop 0 and one for the later loops (the depth carry holds the previous keys/values
    # from loop 1 on).
    if target == "block":
        compiled.recurrent.block.compile(fullgraph=True, backend=backend)
    else:
        compiled.recurrent.compile_loop(fullgraph=True, backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    for _ in range(2):
        logits, grads = _train_step(eager, ids, n_loops=3)
        logits_c, grads_c = _train_step(compiled, ids, n_loops=3)
        torch.testing.assert_close(logits_c, logits, rtol=1e-4, atol=1e-5)
        assert grads_c.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(compiled.recurrent.last_expert_load,
                                   eager.recurrent.last_expert_load)


@pytest.mark.parametrize("backprop_loops", [None, 1])
def test_compiled_loop_body_with_gradient_checkpointing_matches_eager(backprop_loops):
    """``openmythos train --compile --gradient-checkpointing`` failed at its first backward:
    the recomputation set a flag the compiled body read, got another graph, and saved other
    tensors than the forward ("a different number of tensors was saved")."""
    torch.manual_seed(0)
    eager = OpenMythos(tiny_config(act_threshold=0.7, act_halt_bias_init=0.0)).train()
    eager.recurrent.gradient_checkpointing = True
    compiled = copy.deepcopy(eager)
    compiled.recurrent.compile_loop(fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, eager.cfg.vocab_size, (2, 16))
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        logits = model(ids, n_loops=3, backprop_loops=backprop_loops)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + 0.01 * model.aux_loss
        loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # The forward's own telemetry, not the recomputation's, and the load counted once.
    for attr in ("last_expert_load", "load_since_update"):
        torch.testing.assert_close(getattr(compiled.recurrent.block.ffn, attr),
                                   getattr(eager.recurrent.block.ffn, attr))


def test_compiled_loop_body_serves_every_loop_index_and_count():
    """Two graphs (first loop, later loops) whatever the loop index or the number of loops:
    the loop index reaches the compiled body only as tensors."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = OpenMythos(tiny_config(max_loop_iters=3)).train()
    model.recurrent.compile_loop(fullgraph=True, backend=counter)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    for n_loops in (3, 6, 2):
        model(ids, n_loops=n_loops).sum().backward()
    assert counter.frame_count == 2


def test_training_loop_never_reads_device_values_on_the_host(no_segment_fallback):
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(act_threshold=0.7, act_halt_bias_init=0.0)).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    recorder = HostReadRecorder()
    # Armed for the recurrent loop's forward and for the whole backward pass.
    def arm(*_):
        recorder.__enter__()

    def disarm(*_):
        recorder.__exit__(None, None, None)

    pre = model.recurrent.register_forward_pre_hook(arm)
    post = model.recurrent.register_forward_hook(disarm)
    logits = model(ids, n_loops=4)
    pre.remove()
    post.remove()
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + model.aux_loss
    with recorder:
        loss.backward()
        model.update_router_bias()
    assert recorder.calls == []


def test_whole_model_compiles_to_one_graph_for_inference(attn_type):
    """``torch.compile(model)`` in eval mode, where the ACT early exit is on by default: the
    exit test reads a device value on the host, so under compile it is off, the forward is
    one graph, and the logits equal eager's (which exits early)."""
    torch._dynamo.reset()
    model = halting_model(attn_type)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        for n_loops in (2, 8):
            torch.testing.assert_close(compiled(ids, n_loops=n_loops),
                                       model(ids, n_loops=n_loops), rtol=1e-5, atol=1e-5)


def test_whole_model_compiled_by_a_user_trains_with_changing_loop_counts():
    """``torch.compile(model)`` with dynamo's defaults and a loop count (and truncated
    backpropagation) that change between steps, as depth-sampled training does: a count seen
    a second time becomes a symbolic int, and the forward and gradients still equal eager's,
    with and without per-loop readouts."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = OpenMythos(tiny_config(max_loop_iters=3)).train()
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    ids = torch.randint(0, eager.cfg.vocab_size, (2, 12))
    with torch._dynamo.config.patch(specialize_int=False):  # dynamo's default
        for n_loops, backprop_loops, depths in [(2, None, None), (3, None, None), (4, 2, None),
                                                (5, 3, [4, 5]), (3, 1, range(1, 4))]:
            losses = []
            for model in (eager, compiled):
                model.zero_grad(set_to_none=True)
                out = model(ids, n_loops=n_loops, backprop_loops=backprop_loops,
                            readout_depths=depths, readout_lens="head")
                if depths is not None:
                    out = torch.stack([out.depth_logits[d] for d in depths])
                loss = out.float().pow(2).mean()
                loss.backward()
                losses.append(loss)
            torch.testing.assert_close(losses[1], losses[0])
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
                # (a compiled backward gives zeros where eager leaves no gradient)
                grads = [torch.zeros_like(p) if x.grad is None else x.grad for x in (p, q)]
                torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6, msg=name)


def test_a_copy_of_a_model_with_a_compiled_loop_runs_its_own_weights():
    """``compile_loop`` kept a compiled method bound to the model: a deepcopy (an EMA or
    best-model snapshot in mid-training) ran the original's loop body and weights, and
    pickle or ``torch.save`` of the model failed. A copy now runs its own loop body
    (uncompiled, as copies of ``Module.compile``'d modules are). Reference: a fresh model
    holding the copy's weights."""
    import io
    import pickle

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = OpenMythos(tiny_config()).train()
    model.recurrent.compile_loop(backend="eager")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8))
    model(ids, n_loops=2).sum().backward()
    snapshot = copy.deepcopy(model)
    with torch.no_grad():
        for p in snapshot.recurrent.parameters():
            p.add_(0.05)
    reference = OpenMythos(tiny_config()).train()
    reference.load_state_dict(snapshot.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(snapshot(ids, n_loops=2), reference(ids, n_loops=2))
        want = model(ids, n_loops=2)
        assert not torch.allclose(want, snapshot(ids, n_loops=2))
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for restored in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(restored(ids, n_loops=2), want)
