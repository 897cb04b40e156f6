"""Training-free exit rules: each decision equals a float64 re-computation of its rule, a
rule that cannot fire changes nothing, and cached decoding with exits equals full forwards
under the same exits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.inference import generate
from open_mythos.inference.cache import KVCache
from open_mythos.layers.recurrence import ExitRule
from tests.conftest import halting_model, tiny_config

N_LOOPS = 6
CRITERIA = ["kl", "entropy", "rel_change", "argmax_streak"]


def looped_model(attn_type: str, use_act: bool = False, lora_std: float = 0.05) -> OpenMythos:
    """A float64 tiny model whose loops keep changing the state (non-zero LoRA), so that
    positions exit at different depths; a large ``lora_std`` makes the loops change their
    readout's argmax too."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type, use_act=use_act, max_loop_iters=N_LOOPS))
    torch.nn.init.normal_(model.recurrent.lora.B, std=lora_std)
    return model.double().eval()


def loop_states(model: OpenMythos, ids: torch.Tensor, rule: ExitRule | None):
    """The prelude output and the state after every loop (frozen after a position exits),
    and the loops each position ran."""
    ctx = model._context(ids, 0, None, None)
    x = model.encode(ids, ctx)
    with torch.no_grad():
        model.recurrent(x, x, ctx, N_LOOPS, keep_states=range(1, N_LOOPS + 1), exit_rule=rule,
                        lens=model.logit_lens)
    states = [x] + [model.recurrent.last_states[d] for d in range(1, N_LOOPS + 1)]
    return states, model.recurrent.last_position_loops


def rule_values(model: OpenMythos, states: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Each criterion's value after loops 1..N, (B, T) float64, computed naively."""
    head = model.head.weight.double()
    gain = model.norm.weight.double()
    eps = model.norm.eps

    def logp(h):
        h = h.double()
        normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * gain
        return torch.log_softmax(normed @ head.T, dim=-1)

    out = {c: [] for c in CRITERIA}
    streak = torch.zeros(states[0].shape[:2], dtype=torch.long)
    for d in range(1, len(states)):
        lp, prev = logp(states[d]), logp(states[d - 1])
        out["entropy"].append(-(lp.exp() * lp).sum(-1))
        out["kl"].append((lp.exp() * (lp - prev)).sum(-1) if d > 1 else torch.full_like(lp[..., 0], torch.inf))
        change = (states[d].double() - states[d - 1].double()).norm(dim=-1)
        out["rel_change"].append(change / states[d].double().norm(dim=-1) if d > 1
                                 else torch.full_like(change, torch.inf))
        same = lp.argmax(-1) == prev.argmax(-1)
        streak = torch.where(same, streak + 1, 0) if d > 1 else torch.zeros_like(streak)
        out["argmax_streak"].append(streak.clone())
    return out


def threshold_between(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values of ``values``: it splits them
    with no value close to it."""
    v = values.detach().flatten().sort().values
    k = len(v) // 2
    return float(v[k - 1] + v[k]) / 2


def expected_exit_depths(values: list[torch.Tensor], fires, min_loops: int) -> torch.Tensor:
    """The first loop d >= min_loops at which ``fires(values[d - 1])`` holds, else N."""
    depth = torch.full(values[0].shape, N_LOOPS, dtype=torch.long)
    for d in range(N_LOOPS, 0, -1):
        if d >= min_loops:
            depth = torch.where(fires(values[d - 1]), d, depth)
    return depth


@pytest.mark.parametrize("criterion", CRITERIA)
def test_exit_decisions_equal_float64_recomputation(attn_type, criterion):
    model = looped_model(attn_type, lora_std=1.0 if criterion == "argmax_streak" else 0.05)
    ids = torch.randint(0, 97, (3, 10))
    # A threshold in the middle of what the loops produce, so that positions exit at
    # different depths: the median over positions of the criterion after loop 3.
    free_values = rule_values(model, loop_states(model, ids, None)[0])[criterion]
    if criterion == "argmax_streak":
        threshold = 2
    else:
        threshold = threshold_between(free_values[2])
    rule = ExitRule(**{criterion: threshold}, min_loops=2)
    states, depths = loop_states(model, ids, rule)
    values = rule_values(model, states)[criterion]
    if criterion == "argmax_streak":
        want = expected_exit_depths(values, lambda v: v >= threshold, 2)
    else:
        want = expected_exit_depths(values, lambda v: v < threshold, 2)
    assert torch.equal(depths, want)
    assert 1 < len(depths.unique()), "the threshold should split the positions"
    # After its exit, a position's state stays frozen.
    for d in range(2, N_LOOPS + 1):
        frozen = depths < d
        assert torch.equal(states[d][frozen], states[d - 1][frozen])


def never_firing_rules() -> list[ExitRule]:
    return [ExitRule(entropy=0.0), ExitRule(rel_change=0.0),
            ExitRule(argmax_streak=N_LOOPS + 1),
            ExitRule(kl=1e-9, entropy=0.0, min_loops=N_LOOPS + 1)]


@pytest.mark.parametrize("use_act", [False, True])
def test_rule_that_cannot_fire_changes_nothing(attn_type, use_act):
    model = (halting_model(attn_type, max_loop_iters=N_LOOPS).double() if use_act
             else looped_model(attn_type))
    ids = torch.randint(0, 97, (2, 8))
    want = model(ids, n_loops=N_LOOPS)
    want_loops = model.recurrent.last_position_loops
    tokens = generate(model, ids[:, :4], 6, n_loops=N_LOOPS, do_sample=False)
    for rule in never_firing_rules():
        assert torch.equal(model(ids, n_loops=N_LOOPS, exit_rule=rule), want)
        assert torch.equal(model.recurrent.last_position_loops, want_loops)
        assert torch.equal(generate(model, ids[:, :4], 6, n_loops=N_LOOPS, do_sample=False,
                                    exit_rule=rule), tokens)


def test_exit_rule_combines_with_act(attn_type):
    model = halting_model(attn_type, max_loop_iters=N_LOOPS).double()
    ids = torch.randint(0, 97, (2, 8))
    model(ids, n_loops=N_LOOPS)
    act_loops = model.recurrent.last_position_loops
    assert (act_loops > 2).any(), "some positions should run past two loops under ACT alone"
    out = model(ids, n_loops=N_LOOPS, exit_rule=ExitRule(entropy=1e9, min_loops=2))
    assert torch.equal(model.recurrent.last_position_loops, act_loops.clamp(max=2))
    # Every position's ACT weights sum to one, whatever stopped it.
    # (In float64, as this float64 model's halting sums are.)
    torch.testing.assert_close(model.recurrent.last_act_weights.sum(0),
                               torch.ones(2, 8, dtype=torch.float64))
    assert torch.isfinite(out).all()


def cached_logits(model, ids, mask, rule, prefill: int) -> torch.Tensor:
    """Logits at positions prefill-1.. of a prefill of ``prefill`` tokens followed by one
    decoding step per token, with ``rule`` in every forward."""
    cache = KVCache(ids.shape[1])
    out = [model(ids[:, :prefill], N_LOOPS, cache, 0, attention_mask=mask[:, :prefill],
                 exit_rule=rule)[:, -1]]
    for pos in range(prefill, ids.shape[1]):
        out.append(model(ids[:, pos:pos + 1], N_LOOPS, cache, pos,
                         attention_mask=mask[:, :pos + 1], exit_rule=rule)[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("use_act", [False, True])
def test_cached_decoding_with_exits_equals_full_forward(attn_type, use_act):
    model = (halting_model(attn_type, max_loop_iters=N_LOOPS).double() if use_act
             else looped_model(attn_type))
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    free = rule_values(model, loop_states(model, ids, None)[0])["kl"]
    rule = ExitRule(kl=threshold_between(free[2]), min_loops=2)
    full = model(ids, N_LOOPS, attention_mask=mask, exit_rule=rule)
    depths = model.recurrent.last_position_loops[mask.bool()]
    assert 1 < len(depths.unique()), "the rule should stop positions at different depths"
    prefill = 5
    got = cached_logits(model, ids, mask, rule, prefill)
    torch.testing.assert_close(got, full[:, prefill - 1:], rtol=1e-9, atol=1e-9)


def test_decoding_skips_the_loops_of_exited_sequences():
    model = looped_model("gqa")
    ids = torch.randint(0, 97, (4, 6))
    generate(model, ids, 4, n_loops=N_LOOPS, do_sample=False,
             exit_rule=ExitRule(entropy=1e9, min_loops=2))
    # Every sequence exits after its second loop: the last step ran 2 of 6 loops.
    assert model.recurrent.last_loops_run == 2
    assert model.recurrent.last_work_fraction == pytest.approx(2 / N_LOOPS)


def test_exit_rule_arguments_are_checked():
    with pytest.raises(ValueError, match="at least one"):
        ExitRule()
    for bad in (dict(kl=-1.0), dict(entropy=float("nan")), dict(rel_change=True),
                dict(argmax_streak=0), dict(kl=0.1, min_loops=0),
                dict(argmax_streak=2**80), dict(kl=0.1, min_loops=2**31),
                dict(kl=0.1, min_loops=None)):  # (accepted, then a TypeError in the loop)
        with pytest.raises(ValueError, match="ExitRule"):
            ExitRule(**bad)
    # NumPy scalars are numbers (they were refused as "not a finite number >= 0"), kept as
    # Python numbers, which a config's JSON can hold; a tensor's error says what to pass.
    import json

    import numpy as np
    rule = ExitRule(kl=np.float32(0.5), argmax_streak=np.int64(2), min_loops=np.int32(3))
    assert json.loads(json.dumps(dataclasses.asdict(rule))) == dict(
        kl=0.5, entropy=None, rel_change=None, argmax_streak=2, min_loops=3)
    with pytest.raises(ValueError, match="a Tensor: pass a Python number"):
        ExitRule(kl=torch.tensor(0.1))
    # A NumPy number out of range is refused for its range, not its type.
    for bad in (dict(kl=np.float32(-0.5)), dict(kl=0.1, min_loops=np.int64(0))):
        with pytest.raises(ValueError) as err:
            ExitRule(**bad)
        assert "pass a Python number" not in str(err.value)
    model = looped_model("gqa")
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="compile"):
        generate(model, ids, 2, n_loops=2, compile=True, act_early_exit=False,
                 exit_rule=ExitRule(kl=0.1))
    with pytest.raises(ValueError, match="exit_rule"):
        model(ids, 2, readout_depths=[1], exit_rule=ExitRule(kl=0.1))
    baseline = DenseBaseline(matched_baseline_config(tiny_config(), 2)).eval()
    with pytest.raises(ValueError, match="baseline"):
        baseline(ids, exit_rule=ExitRule(kl=0.1))
