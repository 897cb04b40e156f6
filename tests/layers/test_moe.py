import pytest
import torch

from open_mythos.layers.moe import MoEFFN, grouped_matmul
from tests.conftest import tiny_config


def naive_moe_float64(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference in float64, written from the routing definition."""
    E, k, H = moe.n_experts, moe.topk, moe.expert_dim
    wr = moe.router.weight.double()
    wgu, wd = moe.w_gate_up.double(), moe.w_down.double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for i, tok in enumerate(x.double()):
        logits = wr @ tok
        probs = torch.softmax(logits, -1)
        chosen = sorted(range(E), key=lambda e: -(logits[e] + moe.router_bias[e].item()))[:k]
        z = sum(probs[e] for e in chosen)
        for e in chosen:
            gu = tok @ wgu[e]
            g, u = gu[:H], gu[H:]
            out[i] += probs[e] / z * ((torch.nn.functional.silu(g) * u) @ wd[e])
        if moe.shared is not None:
            s = moe.shared
            out[i] += s.down.weight.double() @ (
                torch.nn.functional.silu(s.gate.weight.double() @ tok) * (s.up.weight.double() @ tok))
    return out


def test_moe_matches_naive_float64_reference():
    torch.manual_seed(0)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=3, dim=32, expert_dim=24))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    moe.router_bias.copy_(torch.randn(8) * 0.3)  # selection bias must change the choice only
    x = torch.randn(2, 13, 32)
    out = moe(x)
    assert out.shape == x.shape
    ref = naive_moe_float64(moe, x.view(-1, 32)).view_as(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    # The same module in float64 takes the segment-wise fallback path: exact match.
    moe64 = moe.double()
    torch.testing.assert_close(moe64(x.double()), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_tokens", [1, 2])  # 3 or 6 slots <= 8 experts: gather dispatch
def test_few_tokens_gather_dispatch_matches_reference_and_sorted_path(n_tokens):
    torch.manual_seed(2)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=3, dim=32, expert_dim=24))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    moe.router_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(n_tokens, 1, 32, requires_grad=True)
    out = moe(x)
    ref = naive_moe_float64(moe, x.detach().view(-1, 32)).view_as(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    load = moe.last_expert_load.clone()
    assert load.sum().item() == 3 * n_tokens
    grads = torch.autograd.grad(out.square().sum(), [x, moe.w_gate_up, moe.w_down])
    # Against the sort + grouped-matmul path on the same rows.
    topk_idx, gates, _ = moe.route(x.view(-1, 32))
    sorted_out, sorted_load = moe._dispatch_sorted(x.view(-1, 32), topk_idx, gates, x.dtype)
    sorted_out = sorted_out + moe.shared(x.view(-1, 32))
    torch.testing.assert_close(sorted_out.view_as(out), out)
    torch.testing.assert_close(sorted_load, load)
    sorted_grads = torch.autograd.grad(sorted_out.square().sum(), [x, moe.w_gate_up, moe.w_down])
    for a, b in zip(grads, sorted_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget_slots, n_tokens, path", [
    (None, 10, "gather"),  # 30 slots > 8 experts, but small experts: still gathered
    (5, 2, "sorted"),      # 6 slots would copy more than the budget allows
    (6, 2, "gather"),      # exactly at the budget
])
def test_dispatch_choice_bounds_the_copied_expert_weights(budget_slots, n_tokens, path,
                                                          monkeypatch):
    """The gather dispatch copies each slot's expert weights, so it is taken only while
    that copy stays within GATHER_MAX_ELEMENTS (large experts sort even for one token);
    either path equals the float64 reference."""
    import open_mythos.layers.moe as moe_module

    torch.manual_seed(4)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=3, dim=32, expert_dim=24))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    per_expert = 32 * 2 * 24 + 24 * 32
    if budget_slots is not None:
        monkeypatch.setattr(moe_module, "GATHER_MAX_ELEMENTS", budget_slots * per_expert)
    assert moe.gathers(3 * n_tokens) == (path == "gather")
    taken = []
    for name in ("_dispatch_gather", "_dispatch_sorted"):
        real = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, real=real, name=name:
                            taken.append(name) or real(*a))
    x = torch.randn(n_tokens, 1, 32)
    with torch.no_grad():
        out = moe(x)
    assert taken == [f"_dispatch_{path}"]
    ref = naive_moe_float64(moe, x.view(-1, 32)).view_as(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_large_experts_sort_even_for_one_token():
    # dim 1024, expert width 512: one token's 4 slots would copy 6.3M weight elements.
    moe = MoEFFN(tiny_config(n_experts=64, n_experts_per_tok=4, dim=1024, expert_dim=512,
                             n_heads=8, n_kv_heads=8))
    assert not moe.gathers(4)
    small = MoEFFN(tiny_config(n_experts=4, n_experts_per_tok=2, dim=64, expert_dim=32))
    assert small.gathers(2) and small.gathers(64) and not small.gathers(200)
    # Where autograd records, at most one slot per expert is gathered.
    assert small.gathers(4, training=True) and not small.gathers(5, training=True)
    # Off the CPU (the budget was measured there only): at most one slot per expert.
    meta = MoEFFN(tiny_config(n_experts=64, n_experts_per_tok=4, dim=1024, expert_dim=512,
                              n_heads=8, n_kv_heads=8)).to("meta")
    assert meta.gathers(64) and not meta.gathers(65)


def test_moe_telemetry_and_gradients():
    torch.manual_seed(1)
    moe = MoEFFN(tiny_config())
    x = torch.randn(3, 7, 64, requires_grad=True)
    moe(x).square().sum().backward()
    assert moe.last_expert_load.sum().item() == 3 * 7 * moe.topk
    # Gates come from the router's softmax, so the router learns through the output.
    assert moe.w_gate_up.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def switch_balance_loss_float64(moe: MoEFFN, x: torch.Tensor, router_weight: torch.Tensor):
    """``E * sum_e f_e * P_e`` from the definition, in float64: ``f_e`` the fraction of the
    ``N * k`` slots whose top-k (on the biased logits) chose expert e, ``P_e`` the mean
    router probability of e. Differentiable in ``router_weight`` (through ``P`` only)."""
    flat = x.reshape(-1, moe.dim).double()
    logits = flat @ router_weight.T
    chosen = (logits.detach() + moe.router_bias.double()).topk(moe.topk, dim=-1).indices
    f = torch.bincount(chosen.flatten(), minlength=moe.n_experts).double() / chosen.numel()
    return moe.n_experts * (f * logits.softmax(-1).mean(0)).sum()


@pytest.mark.parametrize("n_tokens", [2, 21])  # gather and sorted dispatch
def test_balance_loss_matches_the_switch_formula(n_tokens):
    torch.manual_seed(4)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=3, dim=32, expert_dim=24))
    torch.nn.init.normal_(moe.router.weight, std=0.5)  # an uneven router
    moe.router_bias.copy_(torch.randn(8) * 0.3)  # selection (f) sees the bias, P does not
    x = torch.randn(n_tokens, 1, 32) + 0.5  # a common direction: some experts preferred
    moe(x)
    wr = moe.router.weight.detach().double().requires_grad_()
    ref = switch_balance_loss_float64(moe, x, wr)
    assert abs(ref.item() - 1.0) > 0.05  # unbalanced: a wrong formula shows
    torch.testing.assert_close(moe.last_aux_loss.double(), ref.detach(), rtol=1e-6, atol=0)
    # Differentiable through the router probabilities, as the reference.
    (grad,) = torch.autograd.grad(moe.last_aux_loss, moe.router.weight)
    (ref_grad,) = torch.autograd.grad(ref, wr)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    # A float64 layer computes it in float64 (the fractions were float32: off by ~1e-9).
    moe.double()(x.double())
    torch.testing.assert_close(moe.last_aux_loss, ref.detach(), rtol=1e-13, atol=0)


def test_balance_loss_is_one_with_a_uniform_router():
    # P_e = 1 / E whatever is chosen, so E * sum_e f_e / E = 1.
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=3, dim=32, expert_dim=24))
    torch.nn.init.zeros_(moe.router.weight)
    moe(torch.randn(2, 5, 32))
    assert moe.last_aux_loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("d_in", [8, 6])  # 6 floats: rows not 16-byte aligned -> fallback
def test_grouped_matmul_forward_backward_with_empty_groups(d_in):
    torch.manual_seed(2)
    counts = torch.tensor([3, 0, 5, 0, 2])
    x = torch.randn(10, d_in, requires_grad=True)
    w = torch.randn(5, d_in, 4, requires_grad=True)
    out = grouped_matmul(x, w, counts)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bounds = [0, 3, 3, 8, 8, 10]
    ref = torch.cat([xr[bounds[e]:bounds[e + 1]] @ wr[e] for e in range(5)])
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_dispatch_skips_autograd_wrappers_with_identical_output(grad_mode, monkeypatch):
    """Without autograd the sorted dispatch calls the gather and the native grouped kernel
    directly (the custom op and the autograd.Function only add dispatch cost); the output
    is bit-identical to the recorded path, and the float64 reference agrees."""
    import open_mythos.layers.moe as moe_module

    torch.manual_seed(3)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=2, dim=32, expert_dim=24))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    monkeypatch.setattr(moe_module, "GATHER_MAX_ELEMENTS", 0)  # the sorted path
    x = torch.randn(3, 7, 32)
    recorded = moe(x.clone().requires_grad_())
    wrapped = []
    real_op, real_fn = moe_module._grouped_mm, moe_module._PermuteRows.apply
    monkeypatch.setattr(moe_module, "_grouped_mm", lambda *a: wrapped.append("op") or real_op(*a))
    monkeypatch.setattr(moe_module._PermuteRows, "apply",
                        lambda *a: wrapped.append("fn") or real_fn(*a))
    if grad_mode == "frozen":  # grad enabled, but nothing requires it
        moe.requires_grad_(False)
        out = moe(x)
    else:
        with getattr(torch, grad_mode)():
            out = moe(x)
    assert wrapped == []
    assert torch.equal(out, recorded.detach())
    ref = naive_moe_float64(moe, x.view(-1, 32)).view_as(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    # With autograd recording, the wrappers are used (gradients need them).
    moe.requires_grad_(True)
    moe(x.clone().requires_grad_())
    assert "op" in wrapped and "fn" in wrapped


def test_router_bias_update_moves_towards_balance():
    moe = MoEFFN(tiny_config(router_bias_update_rate=0.1))
    moe.load_since_update.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    load = moe.update_router_bias()
    assert load.tolist() == [10.0, 0.0, 5.0, 5.0]
    b = moe.router_bias
    assert b[0] < b[2] == b[3] < b[1]  # over-loaded expert down, idle expert up
    assert abs(b.sum().item()) < 1e-6 and moe.load_since_update.sum() == 0


def test_router_bias_update_uses_the_load_it_is_given():
    # A caller's (e.g. all-reduced) load replaces the local accumulator, which is reset.
    moe = MoEFFN(tiny_config(router_bias_update_rate=0.1))
    moe.load_since_update.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    given = torch.tensor([0.0, 10.0, 5.0, 5.0])
    assert moe.update_router_bias(load=given).tolist() == given.tolist()
    b = moe.router_bias
    assert b[1] < b[2] == b[3] < b[0]  # follows the given load, not the local one
    assert moe.load_since_update.sum() == 0
    with pytest.raises(ValueError, match="shape"):
        moe.update_router_bias(load=torch.ones(3))
    # Counts as torch.bincount returns them (int64) are loads too.
    counts = torch.bincount(torch.tensor([1, 1, 2, 3]), minlength=4)
    before = moe.router_bias.clone()
    assert moe.update_router_bias(load=counts).tolist() == [0.0, 2.0, 1.0, 1.0]
    assert moe.router_bias[0] > before[0] and moe.router_bias[1] < before[1]


def test_looped_bf16_forward_casts_the_expert_weights_once(monkeypatch):
    """Under autocast the recurrent block casts the expert weights to bf16 once per forward,
    not once per loop, and the gradients are those of casting every loop (to bf16
    accumulation precision)."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    from open_mythos import OpenMythos

    torch.manual_seed(0)
    model = OpenMythos(tiny_config(use_act=False))
    ids = torch.randint(0, 97, (2, 16))
    shape = model.recurrent.block.ffn.w_gate_up.shape

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == shape:
                CountCasts.casts += 1
            return func(*args, **(kwargs or {}))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, n_loops=4).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "experts" in n
                or "w_" in n}

    with CountCasts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, n_loops=4)
    assert CountCasts.casts == 1
    shared = grads()
    monkeypatch.setattr(MoEFFN, "shared_casts", lambda self: contextlib.nullcontext())
    per_loop = grads()
    assert shared.keys() == per_loop.keys() and shared
    for name in shared:
        torch.testing.assert_close(shared[name], per_loop[name], rtol=2e-2, atol=1e-4, msg=name)


def test_truncated_backprop_under_autocast_trains_the_experts(monkeypatch):
    """The loops before ``backprop_loops`` run without autograd; their bf16 cast of the expert
    weights must not serve the differentiated loops, or the experts get no gradient (they
    got None, and a bf16 training run left them unchanged)."""
    import contextlib

    from open_mythos import OpenMythos
    from open_mythos.layers import moe as moe_module

    monkeypatch.setattr(moe_module, "GATHER_MAX_ELEMENTS", 0)  # the sorted dispatch always
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(use_act=False)).train()
    ids = torch.randint(0, 97, (2, 16))
    ffn = model.recurrent.block.ffn

    def grads() -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, n_loops=4, backprop_loops=2).float().square().mean().backward()
        return {"w_gate_up": ffn.w_gate_up.grad, "w_down": ffn.w_down.grad}

    shared = grads()
    monkeypatch.setattr(MoEFFN, "shared_casts", lambda self: contextlib.nullcontext())
    per_loop = grads()
    for name, grad in shared.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, per_loop[name], rtol=2e-2, atol=1e-4, msg=name)


def test_padding_is_left_out_of_the_load_and_the_balance_loss():
    """With a token mask the load and the aux loss are those of the real tokens alone (the
    same layer run on them only); the outputs do not change."""
    torch.manual_seed(3)
    moe = MoEFFN(tiny_config(n_experts=8, n_experts_per_tok=2, dim=32, expert_dim=16)).train()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(2, 6, 32)
    x[0, :4] = x[0, 0]  # four pads with one state, as left padding gives them
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :4] = False
    out = moe(x, mask)
    load, aux = moe.last_expert_load.clone(), moe.last_aux_loss.clone()
    assert torch.equal(moe.load_since_update, load) and load.sum().item() == 8 * 2
    real = x[mask].unsqueeze(0)  # (1, 8, 32)
    torch.testing.assert_close(moe(real)[0], out[mask])
    torch.testing.assert_close(load, moe.last_expert_load)
    torch.testing.assert_close(aux, moe.last_aux_loss)
    moe(x)  # unmasked, the pads count: a different load
    assert moe.last_expert_load.sum().item() == 12 * 2


def test_a_padded_batch_counts_only_its_real_tokens_in_every_loop():
    """The model passes the attention mask's padding to the looped MoE (each loop's load,
    and the training accumulator, count the real tokens only), also when ACT early exit
    runs a subset of the rows."""
    from open_mythos import OpenMythos

    torch.manual_seed(0)
    model = OpenMythos(tiny_config())
    ids = torch.randint(0, 97, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    real, k = int(mask.sum()), model.cfg.n_experts_per_tok
    model.train()
    model(ids, n_loops=3, attention_mask=mask)
    loads = model.recurrent.last_expert_load
    assert loads.shape[0] == 3 and loads.sum(dim=1).tolist() == [real * k] * 3
    moe = model.recurrent.block.ffn
    assert moe.load_since_update.sum().item() == 3 * real * k
    # Eval with ACT early exit: loops past the first run only the rows still halting, and
    # the mask follows them (a whole-batch mask on a sub-batch would fail to broadcast).
    from tests.conftest import halting_model

    model = halting_model("gqa")
    model(ids, n_loops=8, attention_mask=mask, act_early_exit=True)
    assert model.recurrent.last_work_fraction < 1.0
    loads = model.recurrent.last_expert_load.sum(dim=1)
    assert loads[0].item() == real * k and bool((loads <= real * k).all())


def test_an_exported_copy_of_the_layer_reuses_the_custom_ops(tmp_path, monkeypatch):
    """An exported Hugging Face directory ships a copy of this module; loaded beside the
    package (or beside another export) it defined the ops a second time, which broke both
    at random in training ("no schema registered for open_mythos::grouped_mm",
    std::bad_alloc). The copy now uses the ops already defined, and trains the same."""
    import importlib
    import sys

    from open_mythos.integrations.remote_code import write_modeling_code
    from open_mythos.layers import moe

    pkg = tmp_path / "an_export"
    pkg.mkdir()
    write_modeling_code(pkg)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        copy = importlib.import_module("an_export.openmythos_layers_moe")
        assert copy is not moe and copy.grouped_matmul is not moe.grouped_matmul
        assert copy._grouped_mm is moe._grouped_mm
        assert copy._grouped_mm_weight_grad is moe._grouped_mm_weight_grad
        grads = []
        for module in (moe, copy):
            torch.manual_seed(0)
            x = torch.randn(7, 16, requires_grad=True)
            w = torch.randn(3, 16, 8, requires_grad=True)
            module.grouped_matmul(x, w, torch.tensor([2, 0, 5])).square().sum().backward()
            grads.append((x.grad, w.grad))
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    finally:
        for name in [n for n in sys.modules if n == "an_export" or n.startswith("an_export.")]:
            del sys.modules[name]
