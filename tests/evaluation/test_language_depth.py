"""Depth on language (issue #12, item 6) at tiny size: a model trained on the built-in
corpus with sampled loop counts has a validation loss that does not rise up to its training
depth and stays within 1% of its best at 4x that depth (no overthinking)."""

from __future__ import annotations

import pytest
import torch

from open_mythos.cli import main
from open_mythos.evaluation.runs import run_loss_vs_loops
from open_mythos.evaluation.sweep import depth_checks
from open_mythos.training import Trainer, load_config
from open_mythos.training.config import parse_override

T_TRAIN = 3
#: The documented recipe (docs/depth_extrapolation.md, "Depth on language") at tiny size.
RECIPE = {
    "model.dim": 64, "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 64,
    "model.max_loop_iters": T_TRAIN, "model.n_experts": 4, "model.n_shared_experts": 1,
    "model.n_experts_per_tok": 2, "model.expert_dim": 32, "model.lora_rank": 4,
    "data.batch_size": 16, "data.seq_len": 64, "data.eval_batches": 4,
    "optim.lr": 3e-3, "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
    "schedule.warmup_steps": 30, "schedule.lr_decay": "cosine", "schedule.loops": "sampled",
    "schedule.n_loops": T_TRAIN, "schedule.min_loops": 1, "schedule.max_loops": 2 * T_TRAIN,
    "run.steps": 300, "run.eval_every": 0, "run.save_every": 300, "run.progress": "false",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("language") / "run"
    pairs = [parse_override(f"{k}={v}") for k, v in {**RECIPE, "run.out": str(out)}.items()]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Trainer(load_config(None, pairs)).train()
    finally:
        torch.set_num_threads(threads)
    return out


def test_loss_against_loops_meets_the_language_checks(text_run):
    _, losses = run_loss_vs_loops(text_run, "cpu", list(range(1, 4 * T_TRAIN + 1)))
    curve = {n: r.loss for n, r in losses.items()}
    assert curve[1] < 2.5  # it learned the corpus (uniform over bytes: 5.6 nats)
    checks = depth_checks(curve, T_TRAIN)
    assert checks[0].endswith("yes") and checks[1].endswith("yes)"), (checks, curve)


def test_report_plots_the_same_curve(text_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--run", str(text_run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert (out / "loss_vs_loops.png").stat().st_size > 0
    assert f"non-increasing up to T_train={T_TRAIN}: yes" in md
    assert f"at 4x T_train ({4 * T_TRAIN} loops)" in md and "(target within 1%: yes)" in md
