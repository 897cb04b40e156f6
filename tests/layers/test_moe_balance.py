"""Aux-loss-free balancing on a short training run: without bias updates the routing
collapses onto one expert; with ``update_router_bias()`` after every step it spreads out.
"""

import torch
import torch.nn.functional as F

from open_mythos import OpenMythos
from open_mythos.layers.moe import MoEFFN
from tests.conftest import tiny_config

N_EXPERTS, TOP_K, DIM = 8, 2, 32


def train_moe(update_bias: bool, steps: int, seed: int = 0) -> torch.Tensor:
    """Fit an MoEFFN to a random teacher MLP; returns the expert load of the last 20 steps.

    The inputs share a common direction (as hidden states of real models do: a large mean
    component), so every token ranks the experts almost alike and the router starts out
    sending most tokens to the same few experts; training then reinforces them.
    """
    torch.manual_seed(seed)
    cfg = tiny_config(dim=DIM, n_experts=N_EXPERTS, n_experts_per_tok=TOP_K, expert_dim=16,
                      n_shared_experts=0, router_bias_update_rate=1e-2)
    moe = MoEFFN(cfg)
    teacher = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.Tanh(),
                                  torch.nn.Linear(64, DIM))
    common = torch.randn(DIM)
    common = 0.7 * common / common.norm() * DIM**0.5  # norm 0.7 of a token's random part
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    loads = []
    for _ in range(steps):
        x = common + torch.randn(128, DIM)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(moe(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if update_bias:
            moe.update_router_bias()
        loads.append(moe.last_expert_load)
    assert loss.item() < 0.1  # it really learns
    return torch.stack(loads[-20:]).sum(0)


def test_routing_collapses_without_bias_updates_and_balances_with_them():
    steps = 300
    collapsed = train_moe(update_bias=False, steps=steps)
    # One expert is in (nearly) every token's top-2: ~4x the mean load of 8 experts.
    assert collapsed.max() / collapsed.mean() > 3.5
    balanced = train_moe(update_bias=True, steps=steps)
    assert balanced.max() / balanced.mean() <= 2.0
    assert balanced.min() > 0  # no dead expert either


def test_load_is_counted_once_per_loop_even_with_checkpointing():
    """The recomputation in backward neither counts the load again nor overwrites the
    layer's ``last_*`` telemetry with loop 0's."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(use_act=False)).train()
    model.recurrent.gradient_checkpointing = True
    moe = model.recurrent.block.ffn
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    logits = model(ids, n_loops=3)
    last_load, last_aux = moe.last_expert_load.clone(), moe.last_aux_loss.detach().clone()
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()  # recomputes each loop
    per_depth = model.recurrent.last_expert_load  # (loops, n_experts)
    # The layer's telemetry is the forward's last loop, not loop 0's recomputation.
    torch.testing.assert_close(last_load, per_depth[-1])
    assert torch.equal(moe.last_expert_load, last_load)
    assert torch.equal(moe.last_aux_loss.detach(), last_aux)
    assert per_depth.shape == (3, moe.n_experts)
    assert torch.all(per_depth.sum(1) == 2 * 12 * moe.topk)
    torch.testing.assert_close(moe.load_since_update, per_depth.sum(0))
    used = moe.update_router_bias()
    torch.testing.assert_close(used, per_depth.sum(0))
    assert moe.load_since_update.sum() == 0
    # Eval-mode forwards do not feed the balancing statistics.
    model.eval()
    with torch.no_grad():
        model(ids, n_loops=2)
    assert moe.load_since_update.sum() == 0


def test_a_model_cast_to_bf16_keeps_its_balancing_state_in_float32():
    """model.to(bfloat16) (and load_model(..., dtype=bf16), HF from_pretrained(dtype=...))
    cast the router bias and the load counter too: a bias step of 1e-3 was then lost once
    the bias reached 0.5, and counts above 256 were rounded. They stay float32 now: the
    same loads and bias steps as a float32 reference, to the last bit."""
    cfg = tiny_config(dim=DIM, n_experts=4, n_experts_per_tok=2, expert_dim=16,
                      router_bias_update_rate=1e-3)
    moe = MoEFFN(cfg).train()
    moe.router_bias.copy_(torch.tensor([-1.0, 0.75, 0.25, 0.0]))
    moe.to(torch.bfloat16)
    assert moe.w_gate_up.dtype == torch.bfloat16
    assert (moe.router_bias.dtype, moe.load_since_update.dtype) == (torch.float32,) * 2
    assert moe.router_bias.tolist() == [-1.0, 0.75, 0.25, 0.0]
    bias = moe.router_bias.clone()
    torch.manual_seed(0)
    for _ in range(3):
        expected = torch.zeros(4)
        for _ in range(4):
            x = torch.randn(300, DIM, dtype=torch.bfloat16)
            moe(x)
            expected += torch.bincount(moe.route(x)[0].reshape(-1), minlength=4).float()
        assert torch.equal(moe.load_since_update, expected)  # 600 slots a call: exact
        used = moe.update_router_bias()
        step = 1e-3 * torch.sign(used.mean() - used)
        bias = bias + step
        bias = bias - bias.mean()
        torch.testing.assert_close(moe.router_bias, bias, rtol=0, atol=1e-7)


def test_a_meta_built_model_loaded_with_assign_counts_its_load():
    """Built on the meta device and loaded with load_state_dict(assign=True): the load
    counter (not in the state dict) stayed on the meta device and balancing did nothing."""
    with torch.device("meta"):
        model = OpenMythos(tiny_config(n_experts=4, router_bias_update_rate=1e-2))
    model.load_state_dict(OpenMythos(tiny_config(n_experts=4)).state_dict(), assign=True)
    moe = model.recurrent.block.ffn
    assert moe.load_since_update.device.type == "cpu"
    model.train()
    model(torch.randint(0, model.cfg.vocab_size, (2, 8)), n_loops=2).sum().backward()
    assert moe.load_since_update.sum().item() == 2 * 8 * 2 * moe.topk  # tokens x loops x k
    model.update_router_bias()
    assert moe.router_bias.abs().sum().item() > 0
