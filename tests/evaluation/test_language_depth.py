"""Depth on language (issue #12, item 6) at tiny size: a model trained on the built-in
corpus with sampled loop counts (ACT off, loop-index signal clamped) has a validation loss
that falls up to its training depth and stays within 1% of its best at 4x that depth (no
overthinking)."""

from __future__ import annotations

from pathlib import Path

import pytest

from open_mythos.cli import main
from open_mythos.evaluation.runs import run_loss_vs_loops
from open_mythos.evaluation.sweep import depth_checks
from open_mythos.training import Trainer, load_config

T_TRAIN = 3
#: The documented recipe (docs/depth_extrapolation.md, "Depth on language"), as documented.
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "text_depth.toml"

# The module fixture trains the text run within the first test's timeout: about 30 s on one
# idle core (600 steps), many times that on a machine shared with other jobs. It trains on
# the one thread every test gets (tests/conftest.py): with two, beside another pytest-xdist
# worker on 2 cores, OpenMP's spin-waits made it 4x slower.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("language") / "run"
    cfg = load_config(CONFIG, [("run.out", str(out)), ("run.progress", False)])
    assert cfg.schedule.n_loops == T_TRAIN and cfg.data.task is None
    Trainer(cfg).train()
    return out


def test_loss_against_loops_meets_the_language_checks(text_run):
    _, losses = run_loss_vs_loops(text_run, "cpu", list(range(1, 4 * T_TRAIN + 1)))
    curve = {n: r.loss for n, r in losses.items()}
    assert curve[1] < 2.5  # it learned the corpus (uniform over bytes: 5.6 nats)
    assert curve[T_TRAIN] < 0.99 * curve[1]  # and the loops pay: 1% or more below 1 loop
    checks = depth_checks(curve, T_TRAIN)
    assert checks[0].endswith("yes") and checks[1].endswith("yes)"), (checks, curve)


def test_report_plots_the_same_curve(text_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--run", str(text_run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert (out / "loss_vs_loops.png").stat().st_size > 0
    assert f"non-increasing up to T_train={T_TRAIN}: yes" in md
    assert f"at 4x T_train ({4 * T_TRAIN} loops)" in md and "(target within 1%: yes)" in md
    # The exit rules against every fixed depth up to twice the training depth.
    assert (out / "exit_pareto.png").stat().st_size > 0
    section = md.split("## Exit rules against fixed depth")[1]
    rules = [line.split("|")[1].strip() for line in section.splitlines()
             if line.startswith("| ") and not line.startswith("| rule")]
    assert rules[:2 * T_TRAIN] == [f"fixed {k}" for k in range(1, 2 * T_TRAIN + 1)]
    assert len(rules) == 2 * T_TRAIN + 6
