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
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(use_act=False)).train()
    model.recurrent.gradient_checkpointing = True
    moe = model.recurrent.block.ffn
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    logits = model(ids, n_loops=3)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()  # recomputes each loop
    per_depth = model.recurrent.last_expert_load  # (loops, n_experts)
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
