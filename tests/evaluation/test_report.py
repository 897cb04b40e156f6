"""The report: figures written, ``report.md`` embedding them, ACT-off models handled."""

from __future__ import annotations

import json
import re

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.evaluation import probe_model, sample_examples, sweep, write_report

from .conftest import act_model, small_parity, task_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps: int = 20) -> None:
    """A ``metrics.jsonl`` as the trainer writes it, with a validation row and a null loss."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for step in range(1, steps + 1):
            row = {"step": step, "loss": 3.0 / step if step != 7 else None, "ce": 2.9 / step,
                   "ponder": 2.0, "lr": 1e-3, "loops": 1 + step % 4, "tokens_per_s": 1e4,
                   "expert_load_max_over_mean": 1.5, "skipped": step == 7}
            if step % 10 == 0:
                row.update(val_loss=2.5 / step, val_acc=0.1 * step / 10, val_loops=4)
            fh.write(json.dumps(row) + "\n")
        fh.write('{"step": 21, "loss": ')  # torn last line of a killed run


def embedded_images(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def assert_pngs(out, names) -> None:
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_full_report(tmp_path):
    task = small_parity()
    model = act_model()
    torch.manual_seed(0)
    baseline = DenseBaseline(matched_baseline_config(model.cfg, 2)).eval()
    rows = sweep(model, task, loops=[1, 2, 3], n_examples=4)
    base_rows = sweep(baseline, task, n_examples=4)
    run = tmp_path / "run"
    write_metrics(run)
    path = write_report(run, tmp_path / "out", rows, base_rows, model=model, baseline=baseline,
                        task=task, train_loops=2, probe_examples=3)
    out = path.parent
    images = embedded_images(path.read_text())
    assert images == ["training_curves.png", "depth_sweep.png", "act_halting.png",
                      "ponder_hist.png", "expert_load.png"]
    assert_pngs(out, images)
    text = path.read_text()
    assert "| loops | id | ood_length |" in text
    assert "| baseline (2 core blocks) |" in text
    assert "20 logged steps" in text and "FLOPs/token" in text
    assert f"from `{run / 'metrics.jsonl'}`." in text
    # Reported from a checkpoint of the run: the file read is the run's, named as such
    # (it named RUN/checkpoints/step_N/metrics.jsonl, which does not exist).
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    text = write_report(ckpt, tmp_path / "out2", rows, base_rows, task=task,
                        train_loops=2).read_text()
    assert f"from `{run / 'metrics.jsonl'}`, up to the checkpoint's step 10." in text
    # The rows of one file holding both models (`openmythos sweep --baseline`) give the
    # same report (the baseline's accuracy was shown as the looped model's at 2 loops).
    mixed = write_report(ckpt, tmp_path / "out3", [*rows, *base_rows], task=task,
                         train_loops=2).read_text()
    assert mixed == text.replace("out2", "out3")
    with pytest.raises(ValueError, match="baseline rows given both"):
        write_report(ckpt, tmp_path / "out4", [*rows, *base_rows], base_rows)


def test_probe_collects_halting_ponder_and_expert_load():
    model = act_model()
    probe = probe_model(model, small_parity(), n_loops=5, n_examples=3)
    n_tokens = len(probe.tokens)
    assert probe.tokens[0] == "<s>" and probe.tokens[-1] == "</s>"
    assert probe.act_weights.shape == (5, n_tokens)
    torch.testing.assert_close(probe.act_weights.sum(0), torch.ones(n_tokens))
    assert set(probe.ponder) == {"id", "ood_length"}
    assert all(((v >= 1) & (v <= 5)).all() for v in probe.ponder.values())
    assert probe.expert_load.shape == (5, model.cfg.n_experts)
    tokens = sum(len(v) for v in probe.ponder.values())
    torch.testing.assert_close(probe.expert_load.sum(-1),
                               torch.full((5,), float(tokens * model.cfg.n_experts_per_tok)))
    # A one-level split is probed as the sweep evaluates it (it was refused).
    task = small_parity()
    level = f"{task.level_name}={task.level_range('ood_length')[0]}"
    probe = probe_model(model, task, n_loops=3, splits=[level], n_examples=2)
    assert set(probe.ponder) == {level}
    assert all(task.level_of(ex.prompt) == task.level_range("ood_length")[0]
               for ex in sample_examples(task, level, 2))


def test_act_off_model_and_missing_metrics(tmp_path):
    torch.manual_seed(0)
    model = OpenMythos(task_config(use_act=False)).eval()
    task = small_parity()
    rows = sweep(model, task, splits=["id"], loops=[1, 2], n_examples=3, early_exit=[False])
    path = write_report(tmp_path / "no-run", tmp_path / "out", rows, model=model, task=task,
                        train_loops=2, probe_examples=2)
    text = path.read_text()
    assert "ACT is off" in text and "No training metrics" in text
    assert embedded_images(text) == ["depth_sweep.png", "expert_load.png"]
    assert not (path.parent / "act_halting.png").exists()
    assert_pngs(path.parent, embedded_images(text))


def test_report_without_a_model(tmp_path):
    path = write_report(None, tmp_path, [], [])
    assert "No sweep results" in path.read_text()
    assert embedded_images(path.read_text()) == []
    # A fixed-depth model with its task: named as such ("no looped model and task were
    # given" said the task was missing).
    baseline = DenseBaseline(matched_baseline_config(act_model().cfg, 2)).eval()
    text = write_report(None, tmp_path / "dense", [], model=baseline,
                        task=small_parity()).read_text()
    assert "fixed-depth transformer" in text and "No looped model" not in text


# Figures a reader understands at a glance (#15 item 6) ------------------------------------


def test_ema_is_the_debiased_weighted_mean():
    from open_mythos.evaluation.report import ema

    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    span = 3
    a = 2 / (span + 1)
    for t, got in enumerate(ema(values, span)):  # reference: the weights written out
        w = [(1 - a) ** (t - k) for k in range(t + 1)]
        assert got == pytest.approx(sum(wk * v for wk, v in zip(w, values)) / sum(w))
    assert ema(values, 1) == values
    assert ema([2.5] * 10, 5) == pytest.approx([2.5] * 10)


def _lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_training_curves_smooth_per_step_series_and_label_every_axis(tmp_path):
    from open_mythos.evaluation.report import (
        ema,
        read_metrics,
        smoothing_span,
        training_curves_figure,
    )

    run = tmp_path / "my-run"
    write_metrics(run, steps=60)
    records = read_metrics(run)
    # A checkpoint of the run (report --run RUN/checkpoints/step_N) reads the run's rows up
    # to its step (it found no metrics at all).
    ckpt = run / "checkpoints" / "step_00000030"
    ckpt.mkdir(parents=True)
    assert read_metrics(ckpt) == [r for r in records if r["step"] <= 30]
    assert read_metrics(tmp_path / "elsewhere" / "step_00000030") == []
    fig = training_curves_figure(records, "my-run")
    assert fig._suptitle.get_text() == "training curves: my-run"
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"loss", "loops", "validation next-token accuracy", "expert load"}
    for ax in axes.values():
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
    loops_ax = axes["loops"]
    steps = [r["step"] for r in records if "loops" in r]
    raw = [r["loops"] for r in records if "loops" in r]
    span = smoothing_span(len(raw))
    assert span > 1
    smooth = _lines_by_label(loops_ax)[f"loops (EMA over {span} steps)"]
    assert list(smooth.get_xdata()) == steps
    assert list(smooth.get_ydata()) == pytest.approx(ema(raw, span))
    faint = [line for line in loops_ax.get_lines() if list(line.get_ydata()) == raw]
    assert len(faint) == 1 and faint[0].get_alpha() < 0.5  # the raw series, faint
    ticks = [t for t in loops_ax.get_yticks() if loops_ax.get_ylim()[0] <= t <= loops_ax.get_ylim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    # Two per-step series in one panel differ in dash as well as colour.
    loss, ce = [line for line in axes["loss"].get_lines() if "EMA" in line.get_label()]
    assert (loss.get_label(), ce.get_label()) == ("loss (EMA over 5 steps)",
                                                  "ce (EMA over 6 steps)")  # 59 and 60 points
    assert loss.get_linestyle() != ce.get_linestyle()


def test_depth_sweep_keeps_early_exit_lines_visible_over_identical_ones():
    from open_mythos.evaluation.report import depth_sweep_figure

    task = small_parity()
    model = act_model()
    rows = sweep(model, task, splits=["id"], loops=[1, 2, 3], n_examples=4)
    fig = depth_sweep_figure(rows, [], train_loops=2, name="parity-run")
    assert fig._suptitle.get_text() == "accuracy and loss against loops: parity-run"
    for ax in fig.axes:
        lines = _lines_by_label(ax)
        off, on = lines["id"], lines["id (early exit)"]
        assert off.get_linestyle() != on.get_linestyle() and off.get_marker() != on.get_marker()
        assert on.get_zorder() > off.get_zorder() and on.get_markerfacecolor() == "none"
        assert ax.get_xlabel() == "loops at inference" and ax.get_ylabel()
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_report_figures_name_the_run(tmp_path, monkeypatch):
    from open_mythos.evaluation import report as report_mod

    titles = []
    monkeypatch.setattr(report_mod, "_save",
                        lambda fig, path: titles.append(fig._suptitle.get_text()) or path)
    task = small_parity()
    model = act_model()
    rows = sweep(model, task, splits=["id"], loops=[1, 2], n_examples=3)
    run = tmp_path / "parity-7"
    write_metrics(run)
    write_report(run, tmp_path / "out", rows, model=model, task=task, train_loops=2,
                 probe_examples=2)
    assert len(titles) == 5 and all(t.endswith(": parity-7") for t in titles), titles


@pytest.mark.parametrize("accuracy, n, expected", [
    (0.5, 100, (0.4038, 0.5962)),   # published Wilson 95% intervals
    (0.5, 10, (0.2366, 0.7634)),
    (0.0, 10, (0.0, 0.2775)),       # not empty at 0: z^2 / (n + z^2) above it
    (1.0, 10, (0.7225, 1.0)),
])
def test_wilson_interval_matches_published_values(accuracy, n, expected):
    from open_mythos.evaluation.report import wilson_interval

    assert wilson_interval(accuracy, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_refuses_what_has_no_interval():
    from open_mythos.evaluation.report import wilson_interval

    with pytest.raises(ValueError, match="at least one example"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match=r"accuracy must be in \[0, 1\]"):
        wilson_interval(1.5, 10)


def test_sweep_table_prints_each_accuracy_with_its_interval():
    from open_mythos.evaluation.report import sweep_table
    from open_mythos.evaluation.sweep import SweepRow

    row = SweepRow(model="looped", task="multihop", split="id", n_loops=3, early_exit=False,
                   n_examples=100, accuracy=0.5, loss=0.1, expected_loops=3, halt_loop=3,
                   loops_run=3, loops_computed=3, seconds=0.0)
    header, _, line = sweep_table([row]).splitlines()
    assert "| accuracy | 95% interval |" in header
    assert "| 0.500 | 0.404-0.596 |" in line


def test_accuracy_pivot_marks_cells_not_swept():
    """A grid with a hole (a split swept at fewer depths) shows a dash there, not "nan",
    which read as a failed evaluation."""
    import dataclasses

    from open_mythos.evaluation.report import accuracy_pivot
    from open_mythos.evaluation.sweep import SweepRow

    row = SweepRow(model="looped", task="parity", split="id", n_loops=1, early_exit=False,
                   n_examples=10, accuracy=0.5, loss=0.1, expected_loops=1, halt_loop=1,
                   loops_run=1, loops_computed=1, seconds=0.0)
    rows = [row, dataclasses.replace(row, n_loops=2, accuracy=0.75),
            dataclasses.replace(row, split="ood_length", accuracy=0.25)]
    base = [dataclasses.replace(row, model="baseline", accuracy=1.0)]
    lines = accuracy_pivot(rows, base).splitlines()
    assert lines[0] == "| loops | id | ood_length |"
    assert lines[2:] == ["| 1 | 0.500 | 0.250 |", "| 2 | 0.750 | - |",
                         "| baseline (1 core blocks) | 1.000 | - |"]
