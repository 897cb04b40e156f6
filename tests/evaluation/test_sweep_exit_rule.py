"""A sweep with an exit rule: rows record the rule, and a rule that stops every position
after two loops makes every deeper row equal the two-loop row without a rule."""

from __future__ import annotations

import pytest
import torch

from open_mythos import ExitRule
from open_mythos.evaluation import load_rows, sample_examples, save_rows, sweep
from open_mythos.evaluation.exits import count_loops, task_exit_points
from open_mythos.evaluation.sweep import _greedy_examples
from open_mythos.tasks import EOS_ID, encode_prompt, get_task

from .conftest import act_model, small_parity


def test_sweep_with_an_exit_rule(parity_model, tmp_path):
    task = small_parity()
    two = sweep(parity_model, task, splits=["id"], loops=[2], n_examples=24, early_exit=(False,))
    rule = ExitRule(entropy=1e9, min_loops=2)  # fires as soon as it may: after loop 2
    rows = sweep(parity_model, task, splits=["id"], loops=[2, 4, 8], n_examples=24,
                 early_exit=(False,), exit_rule=rule)
    assert [r.exit_rule for r in rows] == [repr(rule)] * 3 and two[0].exit_rule == ""
    for row in rows:
        assert row.accuracy == two[0].accuracy
        assert row.loss == pytest.approx(two[0].loss, rel=1e-6)
        assert row.expected_loops == pytest.approx(two[0].expected_loops, rel=1e-6)
    for suffix in (".json", ".csv"):
        assert load_rows(save_rows(rows, tmp_path / f"rows{suffix}")) == rows


@torch.no_grad()
def loops_per_answer_position(model, examples, n_loops, rule):
    """Mean loops per position, one example at a time without a cache or padding: the
    last forward of a greedy decode holds every position the answer depended on (the
    prompt and each token fed back), and the loops each ran."""
    budget = max(len(ex.answer) for ex in examples) + 1
    total = count = 0
    for ex in examples:
        ids = encode_prompt(ex.prompt).unsqueeze(0)
        for step in range(budget):
            tok = model(ids, n_loops, act_early_exit=True, exit_rule=rule)[0, -1].argmax()
            if int(tok) == EOS_ID or step == budget - 1:
                break
            ids = torch.cat([ids, tok.view(1, 1)], dim=1)
        loops = model.recurrent.last_position_loops
        total, count = total + int(loops.sum()), count + loops.numel()
    return total / count


def test_exit_points_count_answer_positions_only():
    """The Pareto table's loops per position leave out left padding and the steps a
    finished sequence decodes while its batch goes on."""
    model = act_model("gqa").double()
    with torch.no_grad():  # a random model that stops some answers at once, not others
        model.embed.weight[EOS_ID] *= 3
    task = get_task("parity", lengths=(1, 3), ood_lengths=(4, 5), running=True)
    examples = sample_examples(task, "ood_length", 8, seed=2)  # 4 and 5 bits
    assert len({len(ex.prompt) for ex in examples}) == 2  # the batch is padded
    rule = ExitRule(argmax_streak=1, min_loops=2)
    points = task_exit_points(model, examples, 4, rules=[("argmax x1", rule)])
    decoded = _greedy_examples(model, examples, 4, True, rule)
    lengths = {len(a) for a in decoded.answers}
    assert len(lengths) > 1, lengths  # some sequences finish before others
    for point in points:
        rule_ = None if point.fixed else rule
        expected = loops_per_answer_position(model, examples, point.n_loops, rule_)
        assert point.loops_per_position == pytest.approx(expected, abs=1e-12), point
    assert len({round(p.loops_per_position, 6) for p in points}) > 2  # not all alike


@torch.no_grad()
def test_count_loops_leaves_out_padding():
    model = act_model("gqa")
    ids = torch.randint(3, 20, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[1, :2] = 0
    with count_loops(model, 5) as counter:
        model(ids, 5, attention_mask=mask, act_early_exit=True)
    loops = model.recurrent.last_position_loops
    assert loops[mask == 0].float().mean() != loops[mask == 1].float().mean()
    assert counter.positions == int(mask.sum())
    assert counter.per_position == pytest.approx(float(loops[mask == 1].float().mean()))
