"""A sweep with an exit rule: rows record the rule, and a rule that stops every position
after two loops makes every deeper row equal the two-loop row without a rule."""

from __future__ import annotations

import pytest

from open_mythos import ExitRule
from open_mythos.evaluation import load_rows, save_rows, sweep

from .conftest import small_parity


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
