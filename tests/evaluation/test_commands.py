"""``openmythos sweep`` and ``openmythos report`` on checkpoints laid out as the trainer
writes them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.cli import main
from open_mythos.commands import sweep as sweep_command
from open_mythos.commands.argtypes import MAX_LOOPS, loop_counts
from open_mythos.evaluation import load_rows
from open_mythos.evaluation.runs import load_model, run_task, run_train_loops
from open_mythos.training import TrainConfig, to_toml
from open_mythos.training.checkpoint import TrainingCheckpoint, save_checkpoint, tied_parameters

from .conftest import act_model
from .test_report import assert_pngs, embedded_images, write_metrics

TASK_ARGS = {"lengths": [1, 3], "ood_lengths": [4, 5], "running": False}


def save_run(run_dir, model) -> None:
    """A run directory with one checkpoint of ``model`` trained on parity at 2 loops."""
    train_cfg = TrainConfig.from_dict({"data": {"task": "parity", "task_args": TASK_ARGS},
                                       "schedule": {"n_loops": 2}})
    tied = tied_parameters(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    save_checkpoint(run_dir, TrainingCheckpoint(3, state, model.cfg, to_toml(train_cfg), {}, {}),
                    tied)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = act_model()
    torch.manual_seed(0)
    baseline = DenseBaseline(matched_baseline_config(model.cfg, 2)).eval()
    save_run(root / "looped", model)
    save_run(root / "dense", baseline)
    write_metrics(root / "looped")
    return root, model, baseline


def cli(*argv: str) -> int:
    """``openmythos ARGV`` through the real command line (every command registered)."""
    return main(list(argv))


def test_load_model_restores_both_kinds(runs):
    root, model, baseline = runs
    for name, original in (("looped", model), ("dense", baseline)):
        loaded, cfg = load_model(root / name)
        assert type(loaded) is type(original) and cfg == original.cfg
        ids = torch.randint(0, 256, (1, 6))
        torch.testing.assert_close(loaded(ids, 2), original(ids, 2))
    assert run_task(root / "looped").levels["ood_length"] == (4, 5)
    assert run_train_loops(root / "looped") == 2


def test_an_hf_export_reports_the_depth_it_records(runs, tmp_path, capsys):
    """A Hugging Face export keeps the training depth as its config's n_loops; report
    marked max_loop_iters as the training depth instead (info said 2, report 4)."""
    from open_mythos.integrations.convert import training_to_hf

    root, model, _ = runs
    assert model.cfg.max_loop_iters != 2
    training_to_hf(root / "looped", tmp_path / "hf")
    assert run_train_loops(tmp_path / "hf") == 2
    assert cli("report", "--run", str(tmp_path / "hf"), "--task", "parity", "--task-args",
               json.dumps(TASK_ARGS), "--loops", "1,2", "--n-examples", "2", "--exit-loops",
               "0", "--device", "cpu", "--out", str(tmp_path / "report")) == 0
    assert "training depth: 2 loops" in (tmp_path / "report" / "report.md").read_text()
    # An export with another default depth (`openmythos export --n-loops 3`) records the
    # trained one apart: report called its default the training depth.
    assert cli("export", str(root / "looped"), "--out", str(tmp_path / "hf3"),
               "--n-loops", "3") == 0
    from open_mythos.checkpoints import read_config

    assert read_config(tmp_path / "hf3")[1] == 3  # the default depth, as asked
    assert run_train_loops(tmp_path / "hf3") == 2
    # An export that records no trained depth (before 2026-12-07): its default is taken
    # for it, which is said (report marked it as the training depth without a word).
    config = tmp_path / "hf3" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k != "trained_depth"}))
    args = ["report", "--run", str(tmp_path / "hf3"), "--task", "parity", "--task-args",
            json.dumps(TASK_ARGS), "--loops", "1", "--n-examples", "2", "--exit-loops", "0",
            "--device", "cpu", "--out"]
    assert cli(*args, str(tmp_path / "report3")) == 0
    assert ("does not record the depth it was trained at (an export of before 2026-12-07): "
            "its default n_loops, 3, is taken for it") in capsys.readouterr().err
    assert cli(*args, str(tmp_path / "report4"), "--train-loops", "2") == 0
    assert "does not record" not in capsys.readouterr().err


def test_sweep_command(runs, tmp_path, capsys):
    root, _, _ = runs
    out = tmp_path / "sweep.csv"
    status = cli("sweep", "--checkpoint", str(root / "looped"), "--baseline", str(root / "dense"),
                 "--loops", "1,3", "--n-examples", "4", "--device", "cpu", "--out", str(out))
    assert status == 0
    rows = load_rows(out)
    assert [(r.model, r.split, r.n_loops, r.early_exit) for r in rows] == [
        ("looped", "id", 1, False), ("looped", "id", 1, True),
        ("looped", "id", 3, False), ("looped", "id", 3, True),
        ("looped", "ood_length", 1, False), ("looped", "ood_length", 1, True),
        ("looped", "ood_length", 3, False), ("looped", "ood_length", 3, True),
        ("baseline", "id", 2, False), ("baseline", "ood_length", 2, False)]
    assert "| looped | id | 1 | off |" in capsys.readouterr().out


def test_a_split_left_out_is_one_line_in_the_commands_style(runs, tmp_path, capsys):
    """The only sign that the out-of-distribution split was dropped came as a Python
    warning with a source path and a line of code, which read as a crash."""
    root, _, _ = runs
    longer = json.dumps({**TASK_ARGS, "ood_lengths": [300, 310]})
    for command in ("sweep", "report"):
        out = tmp_path / (command + (".json" if command == "sweep" else ""))
        where = ("--checkpoint" if command == "sweep" else "--run")
        assert cli(command, where, str(root / "looped"), "--n-examples", "2", "--loops", "1",
                   "--early-exit", "off", "--task-args", longer, "--out", str(out),
                   *(["--exit-loops", "0"] if command == "report" else [])) == 0
        err = capsys.readouterr().err
        assert (f"openmythos {command}: warning: sweep: split(s) ood_length of 'parity' "
                "exceed max_seq_len") in err
        assert "UserWarning" not in err and "sweep.py" not in err


def test_sweep_command_with_an_exit_rule(runs, tmp_path, capsys):
    """A rule that fires after two loops makes the 4-loop rows equal the 2-loop rows."""
    root, _, _ = runs
    argv = ("sweep", "--checkpoint", str(root / "looped"), "--n-examples", "6",
            "--early-exit", "off", "--device", "cpu")
    assert cli(*argv, "--loops", "2", "--out", str(tmp_path / "two.json")) == 0
    assert cli(*argv, "--loops", "4", "--exit-entropy", "1e9", "--exit-min-loops", "2",
               "--out", str(tmp_path / "rule.json")) == 0
    two, rule = load_rows(tmp_path / "two.json"), load_rows(tmp_path / "rule.json")
    assert [r.accuracy for r in rule] == [r.accuracy for r in two]
    assert all("argmax_streak" in r.exit_rule and "entropy=1000000000.0" in r.exit_rule
               for r in rule)
    assert f"with the exit rule {rule[0].exit_rule}" in capsys.readouterr().out
    assert cli("report", "--run", str(root / "looped"), "--sweep", str(tmp_path / "rule.json"),
               "--exit-loops", "0", "--out", str(tmp_path / "r")) == 0
    assert f"ran with the exit rule {rule[0].exit_rule}" in (tmp_path / "r" / "report.md").read_text()
    # Two sweeps merged into one file (with and without the rule, the natural way to compare
    # them): the report kept one row per cell without a word and labelled every row with
    # the rule. It is refused, naming the cell and what differs.
    assert cli(*argv, "--loops", "4", "--out", str(tmp_path / "plain.json")) == 0
    from open_mythos.evaluation.sweep import save_rows

    save_rows(load_rows(tmp_path / "plain.json") + rule, tmp_path / "merged.json")
    capsys.readouterr()
    assert cli("report", "--run", str(root / "looped"), "--sweep",
               str(tmp_path / "merged.json"), "--exit-loops", "0",
               "--out", str(tmp_path / "r2")) == 2
    err = capsys.readouterr().err
    assert "at 4 loops (early exit off) twice (exit_rule '' and 'ExitRule(" in err
    assert "merges several sweeps" in err


def test_sweep_command_errors(runs, tmp_path, capsys, monkeypatch):
    from open_mythos.commands import sweep as sweep_cmd

    root, _, _ = runs
    assert cli("sweep", "--checkpoint", str(tmp_path / "nothing"), "--task", "parity",
               "--out", str(tmp_path / "s.json")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli("sweep", "--checkpoint", str(root / "looped"), "--task", "nope",
               "--out", str(tmp_path / "s.json")) == 2
    assert "unknown task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("sweep", "--checkpoint", "x", "--loops", "0,2", "--out", "s.json")
    # Without --task: a missing checkpoint is named as such (it read "records no task").
    assert cli("sweep", "--checkpoint", str(tmp_path / "nothing"), "--out",
               str(tmp_path / "s.json")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # A results file of another kind is refused before the sweep (it came after minutes of
    # evaluation, and the results were lost).
    evaluated = []
    monkeypatch.setattr(sweep_cmd, "sweep_models", lambda *a: evaluated.append(a))
    assert cli("sweep", "--checkpoint", str(root / "looped"), "--out",
               str(tmp_path / "s.txt")) == 2
    assert ".json or .csv" in capsys.readouterr().err and not evaluated


def test_report_command(runs, tmp_path):
    root, _, _ = runs
    out = tmp_path / "report"
    status = cli("report", "--run", str(root / "looped"), "--baseline", str(root / "dense"),
                 "--loops", "1-3", "--n-examples", "3", "--early-exit", "on", "--device", "cpu",
                 "--out", str(out))
    assert status == 0
    text = (out / "report.md").read_text()
    assert_pngs(out, embedded_images(text))
    assert len(embedded_images(text)) == 6
    assert "training depth: 2 loops" in text
    rows = load_rows(out / "sweep.json")
    assert {r.model for r in rows} == {"looped", "baseline"}
    assert all(r.early_exit for r in rows if r.model == "looped")
    # The exit-rule section: fixed depths 1..4 (twice the training depth) and the rules;
    # its fixed-depth accuracies are the sweep's (same examples, early exit on).
    table = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.split("## Exit rules against fixed depth")[1].splitlines()
        if line.startswith("| fixed") or line.startswith("| kl") or line.startswith("| argmax"))}
    assert [k for k in table if k.startswith("fixed")] == [f"fixed {k}" for k in range(1, 5)]
    assert {"kl<0.01", "argmax x2"} <= set(table)
    for r in rows:
        if r.model == "looped" and r.split == "id":
            assert float(table[f"fixed {r.n_loops}"][-1]) == pytest.approx(r.accuracy, abs=1e-4)
    for cells in table.values():
        assert 1 <= float(cells[2]) <= int(cells[1])  # loops/position within the loops run
    assert "Greedy answers to 3 in-distribution examples" in text
    # A rerun into the same directory without the exit-rule section and from a sweep
    # file: the old exit_pareto.png does not stay beside the new report; a sweep.json
    # stays (a report from --sweep writes none, and one there may be the user's sweep).
    keep = tmp_path / "kept.json"
    keep.write_text((out / "sweep.json").read_text())
    (out / "notes.txt").write_text("mine")
    assert cli("report", "--run", str(root / "looped"), "--sweep", str(keep), "--exit-loops",
               "0", "--n-examples", "3", "--out", str(out)) == 0
    assert not (out / "exit_pareto.png").exists() and (out / "sweep.json").exists()
    assert (out / "notes.txt").read_text() == "mine" and keep.is_file()
    assert_pngs(out, embedded_images((out / "report.md").read_text()))
    # From a sweep file, the exit-rule table takes as many examples as the sweep's tables
    # beside it (it drew --n-examples' default, 128, against the sweep's 3).
    assert cli("report", "--run", str(root / "looped"), "--sweep", str(keep), "--exit-loops",
               "2", "--out", str(tmp_path / "again")) == 0
    assert "Greedy answers to 3 in-distribution examples" in (
        tmp_path / "again" / "report.md").read_text()
    # A sweep written into a directory where no report was (`openmythos sweep --out
    # DIR/sweep.json`) is not an earlier report's: a report from another sweep file kept
    # it (it was deleted).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "sweep.json").write_text(keep.read_text())
    for _ in range(2):  # the second run finds the first one's report.md beside it
        assert cli("report", "--run", str(root / "looped"), "--sweep", str(keep),
                   "--exit-loops", "0", "--out", str(fresh)) == 0
        assert (fresh / "sweep.json").read_text() == keep.read_text()
    # The exit rules at 1 loop: the fixed depth and the rules that can fire there only
    # (min_loops 2 rules were listed, each the fixed depth under its name); past the
    # deepest loop count the command line takes, refused (100000 ran for hours).
    assert cli("report", "--run", str(root / "looped"), "--sweep", str(keep), "--exit-loops",
               "1", "--out", str(tmp_path / "one")) == 0
    text = (tmp_path / "one" / "report.md").read_text().split("## Exit rules against fixed")[1]
    assert "| fixed 1" in text and "| entropy<0.5" in text and "| kl<" not in text
    with pytest.raises(SystemExit):
        cli("report", "--run", str(root / "looped"), "--exit-loops", "100000",
            "--out", str(tmp_path / "big"))


def test_loop_counts():
    assert loop_counts("1,2,4-6,4") == [1, 2, 4, 5, 6]
    assert loop_counts(f"1,{MAX_LOOPS}") == [1, MAX_LOOPS]
    for bad, says in (("", "no loop count"), (",", "no loop count"), ("a", "look like"),
                      ("0", "positive"), ("3-x", "look like"), ("3-1", "write 1-3"),
                      ("1--3", "positive"),  # it said "write -3-1", itself refused
                      ("2-", "look like"), ("2- ", "look like"),  # "2-" was read as 2
                      (f"1-{MAX_LOOPS + 1}", f"at most {MAX_LOOPS}")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            loop_counts(bad)


@pytest.fixture
def no_sweep(monkeypatch):
    """Records calls of the sweep instead of running it: the checks must come first. The
    report command's own name for it is patched too (imported first, so that it is not
    bound to the recorder for the rest of the session when this is its first import)."""
    import open_mythos.commands.report as report_command

    calls = []
    record = lambda *a: calls.append(a) or ([], [])  # noqa: E731
    monkeypatch.setattr(sweep_command, "sweep_models", record)
    monkeypatch.setattr(report_command, "sweep_models", record)
    return calls


def test_sweep_refuses_bad_arguments_before_any_evaluation(runs, tmp_path, capsys, no_sweep):
    root, _, _ = runs
    looped, dense = str(root / "looped"), str(root / "dense")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "a_dir.json").mkdir()
    cases = [
        (["--baseline", looped], "--baseline"),                      # a looped "baseline"
        (["--task-args", '{"bogus": 1}'], "takes no argument bogus"),
        (["--task-args", "{bogus"], "--task-args"),                  # not JSON
        (["--out", str(a_file / "s.json")], "is a file"),
        (["--out", str(tmp_path / "a_dir.json")], "is a directory"),
    ]
    for extra, says in cases:
        argv = ["sweep", "--checkpoint", looped, "--out", str(tmp_path / "s.json"), *extra]
        assert cli(*argv) == 2, extra
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (extra, err)
    # A fixed-depth checkpoint has no loops to sweep or exit from.
    for extra in (["--loops", "1-3"], ["--exit-kl", "0.1"]):
        assert cli("sweep", "--checkpoint", dense, "--out", str(tmp_path / "s.json"), *extra) == 2
        assert "fixed-depth" in capsys.readouterr().err
    assert not no_sweep and not (tmp_path / "s.json").exists()
    for extra in (["--n-examples", "0"], ["--batch-size", "0"], ["--splits", ","]):
        with pytest.raises(SystemExit):
            cli("sweep", "--checkpoint", looped, "--out", str(tmp_path / "s.json"), *extra)


def test_sweep_with_no_split_that_fits_fails(runs, tmp_path, capsys):
    root, model, _ = runs
    # Parity at 400-1000 bits does not fit the fixture's context.
    args = '{"lengths": [400, 400], "ood_lengths": [1000, 1000]}'
    assert cli("sweep", "--checkpoint", str(root / "looped"), "--task-args", args,
               "--out", str(tmp_path / "s.json")) == 2
    assert "no split of 'parity' fits" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_report_checks_its_sweep_file_and_out_first(runs, tmp_path, capsys, no_sweep):
    root, _, _ = runs
    looped = str(root / "looped")
    rows = [{"model": "looped", "task": "parity", "split": "id", "n_loops": 1,
             "early_exit": False, "n_examples": 1, "accuracy": 1.0, "loss": 0.0,
             "expected_loops": 1.0, "halt_loop": 1.0, "loops_run": 1.0, "loops_computed": 1.0,
             "seconds": 0.0}]
    files = {"empty.json": [], "dict.json": {"rows": rows}, "junk.json": [{"a": 1}],
             "other_task.json": [{**rows[0], "task": "multihop"}],
             "dense_only.json": [{**rows[0], "model": "baseline"}]}
    says = {"empty.json": "no rows of a looped model", "dict.json": "not a list",
            "junk.json": "row 0 is not a sweep row", "other_task.json": "sweep of multihop",
            "dense_only.json": "no rows of a looped model"}
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert cli("report", "--run", looped, "--sweep", str(tmp_path / name),
                   "--out", str(tmp_path / "r")) == 2
        err = capsys.readouterr().err
        assert says[name] in err and "Traceback" not in err, (name, err)
    (tmp_path / "not_json.json").write_text("{")
    assert cli("report", "--run", looped, "--sweep", str(tmp_path / "not_json.json"),
               "--out", str(tmp_path / "r")) == 2
    assert "not a JSON file of sweep rows" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert cli("report", "--run", looped, "--out", str(tmp_path / "a_file")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli("report", "--run", looped, "--baseline", looped, "--out", str(tmp_path / "r")) == 2
    assert "--baseline" in capsys.readouterr().err
    assert not no_sweep
    for extra in (["--exit-loops", "-1"], ["--train-loops", "0"]):
        with pytest.raises(SystemExit):
            cli("report", "--run", looped, "--out", str(tmp_path / "r"), *extra)


def test_task_args_override_the_runs_knobs_and_a_baseline_must_share_its_data(
        runs, tmp_path, capsys, monkeypatch):
    """--task-args replaced all of the run's knobs (a run trained with running=False was
    swept on running parity when only lengths were given); a baseline of another task or
    other knobs was accepted and its rows reported as the run's baseline."""
    root, _, baseline = runs
    looped = str(root / "looped")
    seen = []
    monkeypatch.setattr(sweep_command, "sweep_models",
                        lambda args, model, base, task, *_: seen.append(task) or ([], []))
    assert cli("sweep", "--checkpoint", looped, "--task-args", '{"ood_lengths": [6, 7]}',
               "--out", str(tmp_path / "s.json")) == 0
    task = seen[-1]
    assert task.level_range("ood_length") == (6, 7) and task.level_range("id") == (1, 3)
    assert task.running is False  # kept from the run
    assert cli("sweep", "--checkpoint", looped, "--task", "parity", "--task-args",
               '{"ood_lengths": [13, 14]}', "--out", str(tmp_path / "s.json")) == 0
    assert seen[-1].running is True and seen[-1].level_range("id") == (4, 12)  # defaults
    capsys.readouterr()
    other = TrainConfig.from_dict({"data": {"task": "parity", "task_args": {
        **TASK_ARGS, "running": True}}})
    tied = tied_parameters(baseline)
    state = {k: v for k, v in baseline.state_dict().items() if k not in tied}
    save_checkpoint(tmp_path / "other_dense", TrainingCheckpoint(
        3, state, baseline.cfg, to_toml(other), {}, {}), tied)
    for command in (["sweep", "--checkpoint", looped, "--out", str(tmp_path / "s2.json")],
                    ["report", "--run", looped, "--out", str(tmp_path / "r")]):
        assert cli(*command, "--baseline", str(tmp_path / "other_dense")) == 2
        err = capsys.readouterr().err
        assert "a baseline compares only on its run's data" in err and "running" in err



def test_a_baseline_of_the_same_task_spelt_otherwise_is_its_runs_data(monkeypatch):
    """A knob written out at its default (parity's lengths = [4, 12]) describes the same
    task as leaving it out: such a baseline was refused, with no way round the check."""
    configs = {name: TrainConfig.from_dict({"data": {"task": "parity", "task_args": args}})
               for name, args in (("run", {}), ("same", {"lengths": [4, 12]}),
                                  ("other", {"lengths": [4, 13]}))}
    monkeypatch.setattr("open_mythos.evaluation.runs.read_train_config", configs.get)
    sweep_command.check_baseline_data("run", "same")
    with pytest.raises(ValueError, match="a baseline compares only on its run's data"):
        sweep_command.check_baseline_data("run", "other")


def test_report_refuses_a_sweep_of_other_knobs_and_options_it_would_ignore(
        runs, tmp_path, capsys):
    root, _, _ = runs
    looped = str(root / "looped")
    sweep_file = tmp_path / "s.json"
    assert cli("sweep", "--checkpoint", looped, "--loops", "1,2", "--n-examples", "2",
               "--early-exit", "off", "--out", str(sweep_file)) == 0
    other = tmp_path / "other.json"
    assert cli("sweep", "--checkpoint", looped, "--loops", "1", "--n-examples", "2",
               "--early-exit", "off", "--task-args", '{"ood_lengths": [6, 7]}',
               "--out", str(other)) == 0
    capsys.readouterr()
    base = ["report", "--run", looped, "--out", str(tmp_path / "r"), "--exit-loops", "0"]
    assert cli(*base, "--sweep", str(other)) == 2
    assert "other knobs" in capsys.readouterr().err
    for extra, says in ((["--loops", "7,8"], "--loops"), (["--splits", "id"], "--splits"),
                        (["--early-exit", "on"], "--early-exit"),
                        (["--baseline", str(root / "dense")], "no baseline rows")):
        assert cli(*base, "--sweep", str(sweep_file), *extra) == 2, extra
        assert says in capsys.readouterr().err
    # The same knobs given to the report: the file is accepted.
    assert cli(*base, "--sweep", str(other), "--task-args", '{"ood_lengths": [6, 7]}') == 0
    # A sweep of another checkpoint of the same task: its figures were reported under this
    # run's header.
    other_run = tmp_path / "other_run"
    save_run(other_run, act_model(seed=1))
    write_metrics(other_run)
    assert cli("report", "--run", str(other_run), "--out", str(tmp_path / "r2"), "--exit-loops",
               "0", "--sweep", str(sweep_file)) == 2
    assert "its looped rows are of another model" in capsys.readouterr().err
    # A file of a version that recorded neither hash cannot be checked: taken, with a word
    # (it was taken silently, even for another model's sweep).
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{**row, "task_id": "", "model_id": ""}
                               for row in json.loads(sweep_file.read_text())]))
    assert cli("report", "--run", str(other_run), "--out", str(tmp_path / "r3"), "--exit-loops",
               "0", "--sweep", str(old)) == 0
    assert ("does not record the task's knobs or the models swept"
            in capsys.readouterr().err)
    assert cli(*base, "--sweep", str(sweep_file)) == 0
    assert "warning" not in capsys.readouterr().err


def test_numeric_argument_types():
    from open_mythos.commands.argtypes import non_negative_int, positive_float, positive_int

    assert (positive_int("3"), non_negative_int("0"), positive_float("0.5")) == (3, 0, 0.5)
    for parse, bad in ((positive_int, "0"), (positive_int, "2.5"), (non_negative_int, "-1"),
                       (positive_float, "0"), (positive_float, "-1"), (positive_float, "inf"),
                       (positive_float, "nan"), (positive_float, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_output_file_argument_type(tmp_path):
    from open_mythos.commands.argtypes import output_file

    assert output_file(str(tmp_path / "new" / "x.json")) == tmp_path / "new" / "x.json"
    (tmp_path / "afile").write_text("")
    for bad in (tmp_path, tmp_path / "afile" / "x.json"):  # a directory; under a file
        with pytest.raises(argparse.ArgumentTypeError):
            output_file(str(bad))


def test_an_interrupted_sweep_keeps_its_rows_and_the_same_command_continues(
        runs, tmp_path, capsys, monkeypatch):
    root, _, _ = runs
    sweep_module = importlib.import_module("open_mythos.evaluation.sweep")  # not the function
    real = sweep_module.evaluate_examples
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2:4])  # (n_loops, early_exit)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_examples", counted)
    out = tmp_path / "sweep.json"
    argv = ("sweep", "--checkpoint", str(root / "looped"), "--baseline", str(root / "dense"),
            "--loops", "1,3", "--n-examples", "4", "--device", "cpu", "--out", str(out))
    interrupt_at = 4  # the 4th of 10 evaluations: 3 rows done
    assert cli(*argv) == 130
    partial = tmp_path / "sweep.json.partial.json"
    assert not out.exists() and partial.exists()
    assert "3 row(s) kept" in capsys.readouterr().err
    calls.clear()
    interrupt_at = 0
    assert cli(*argv) == 0
    assert "resuming: 3 row(s)" in capsys.readouterr().err
    assert len(calls) == 7 and not partial.exists()
    resumed = load_rows(out)
    # The same sweep in one go: the same rows, apart from their timings.
    calls.clear()
    assert cli(*argv[:-1], str(tmp_path / "whole.json")) == 0
    assert len(calls) == 10
    whole = load_rows(tmp_path / "whole.json")
    strip = [dict(vars(r), seconds=0) for r in resumed]
    assert strip == [dict(vars(r), seconds=0) for r in whole]
    # Progress of a sweep with other options is not reused.
    calls.clear()
    interrupt_at = 2
    assert cli(*argv) == 130
    calls.clear()
    interrupt_at = 0
    assert cli(*argv[:-4], "--seed", "1", "--device", "cpu", "--out", str(out)) == 0
    assert "other options" in capsys.readouterr().err and len(calls) == 10


def test_progress_survives_a_failing_command_and_serves_fewer_or_more_loops(
        runs, tmp_path, capsys, monkeypatch):
    """A command that fails its checks rewrote the progress file of an interrupted sweep
    with its own options (every row lost); and a command asking for fewer loops or splits
    counted as other options and started over."""
    root, _, _ = runs
    sweep_module = importlib.import_module("open_mythos.evaluation.sweep")
    real, calls = sweep_module.evaluate_examples, []

    def counted(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_examples", counted)
    out, partial = tmp_path / "sweep.json", tmp_path / "sweep.json.partial.json"
    argv = ("sweep", "--checkpoint", str(root / "looped"), "--n-examples", "4",
            "--device", "cpu", "--out", str(out))
    stop_at = 4
    assert cli(*argv, "--loops", "1,3") == 130  # 3 rows kept
    kept = partial.read_bytes()
    stop_at = 0
    calls.clear()
    assert cli(*argv, "--loops", "1,3", "--splits", "idd") == 2  # a typo
    assert "idd" in capsys.readouterr().err
    assert partial.read_bytes() == kept and calls == []
    # A split that cannot fit is refused before the splits named before it run.
    assert cli(*argv, "--loops", "1,3", "--splits", "id,length=900") == 2
    err = capsys.readouterr().err
    assert "split 'length=900' needs" in err and calls == []
    assert partial.read_bytes() == kept
    # Fewer loop counts: the rows at 1 loop come from the file.
    assert cli(*argv, "--loops", "1") == 0
    err = capsys.readouterr().err
    assert "resuming: 3 row(s)" in err
    assert f"kept 1 row(s) this command did not ask for in {partial}" in err  # said, not silent
    resumed = len(calls)
    ones = load_rows(out)
    assert {r.n_loops for r in ones} == {1}
    calls.clear()
    assert cli(*argv[:-1], str(tmp_path / "fresh.json"), "--loops", "1") == 0
    assert resumed == len(calls) - 2  # the id split's two rows at 1 loop were kept
    assert [dict(vars(r), seconds=0) for r in ones] == \
        [dict(vars(r), seconds=0) for r in load_rows(tmp_path / "fresh.json")]
    # The narrower sweep's completion kept the row it did not use (3 loops) for the wider
    # one, which resumes from it: a file of before 2026-12-07, whose options also named the
    # splits, loops, early exit and baseline, resumes too. Adding --baseline keeps the
    # looped rows (each row names its model).
    head, *lines = partial.read_text().splitlines()
    options = json.loads(head)["options"]
    assert [json.loads(line)["n_loops"] for line in lines] == [3]
    # ... which also named the task by its older hash (without its knobs), as its rows
    # did: discarded as "other options", or resumed and then left unused.
    from open_mythos.evaluation.sweep import task_fingerprint
    from open_mythos.tasks import get_task

    old_id = task_fingerprint(get_task("parity", **TASK_ARGS), legacy=True)
    assert old_id != options["task"]
    legacy = {**options, "splits": None, "loops": [1, 3], "early_exit": "both", "baseline": None,
              "task": old_id}
    lines = [json.dumps({**json.loads(line), "task_id": old_id}) for line in lines]
    partial.write_text("\n".join([json.dumps({"options": legacy}), *lines]) + "\n")
    calls.clear()
    assert cli(*argv, "--loops", "1,3", "--baseline", str(root / "dense")) == 0
    assert "resuming: 1 row(s)" in capsys.readouterr().err
    assert len(calls) == 2 * 4 - 1 + 2  # 2 splits x 2 loop counts x 2 settings, one kept;
    assert not partial.exists()         # the baseline's 2 splits


def test_a_baseline_split_that_cannot_fit_fails_before_the_looped_sweep(
        runs, tmp_path, capsys, monkeypatch):
    """The baseline's fit was found only after the looped model's whole sweep."""
    root, model, _ = runs
    short = dataclasses.replace(model.cfg, max_seq_len=12)  # ood_length (4-5 bits) fits,
    torch.manual_seed(0)                                      # 16 bits do not
    save_run(tmp_path / "short", DenseBaseline(matched_baseline_config(short, 2)))
    sweep_module = importlib.import_module("open_mythos.evaluation.sweep")
    calls = []
    monkeypatch.setattr(sweep_module, "evaluate_examples",
                        lambda *a, **k: calls.append(a) or {})
    assert cli("sweep", "--checkpoint", str(root / "looped"), "--baseline",
               str(tmp_path / "short"), "--splits", "id,length=16", "--loops", "1",
               "--n-examples", "2", "--device", "cpu", "--out", str(tmp_path / "s.json")) == 2
    err = capsys.readouterr().err
    assert "split 'length=16' needs" in err and calls == []
    assert f"the baseline (--baseline {tmp_path / 'short'})" in err  # which model's length


def test_an_interrupted_report_resumes_its_sweep(runs, tmp_path, capsys, monkeypatch):
    root, _, _ = runs
    sweep_module = importlib.import_module("open_mythos.evaluation.sweep")
    real, calls = sweep_module.evaluate_examples, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_examples", counted)
    out = tmp_path / "report"
    argv = ("report", "--run", str(root / "looped"), "--loops", "1,2", "--n-examples", "4",
            "--exit-loops", "0", "--device", "cpu", "--out", str(out))
    stop_at = 3
    assert cli(*argv) == 130
    assert (out / "sweep.json.partial.json").exists()
    calls.clear()
    stop_at = 0
    capsys.readouterr()
    assert cli(*argv) == 0
    assert "resuming: 2 row(s)" in capsys.readouterr().err
    assert len(calls) == 6 and not (out / "sweep.json.partial.json").exists()
    assert len(load_rows(out / "sweep.json")) == 8
    # Stopped after its sweep (in the exit rules' evaluation): the rows stay kept.
    exits = importlib.import_module("open_mythos.evaluation.exits")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exits, "task_exit_points", stop)
    with_exits = [a for a in argv if a not in ("--exit-loops", "0")]
    calls.clear()
    assert cli(*with_exits) == 130
    assert "openmythos report: interrupted; 8 row(s) kept" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(sweep_module, "evaluate_examples", counted)
    calls.clear()
    assert cli(*argv) == 0
    assert "resuming: 8 row(s)" in capsys.readouterr().err and calls == []


def test_sweep_progress_appends_rows_and_survives_a_line_cut_short(tmp_path, capsys):
    """One line per row, appended (rewriting every row after each one was quadratic); a
    last line a kill cut short is dropped, and rows after it are not lost."""
    from open_mythos.evaluation.sweep import SweepRow

    row = SweepRow(model="looped", task="parity", split="id", n_loops=1, early_exit=False,
                   n_examples=4, accuracy=0.5, loss=1.0, expected_loops=1, halt_loop=1,
                   loops_run=1, loops_computed=1, seconds=0.1)
    options = {"loops": [1, 2], "seed": 0}
    first = sweep_command.SweepProgress(tmp_path / "s.json", options)
    for n in (1, 2):
        first.add(dataclasses.replace(row, n_loops=n))
    lines = first.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["n_loops"] == 2
    with open(first.path, "a") as fh:
        fh.write('{"model": "looped", "task": "par')  # killed mid-write
    again = sweep_command.SweepProgress(tmp_path / "s.json", options)
    assert [r.n_loops for r in again.previous] == [1, 2]
    for r in again.previous:
        again.add(r)
    again.add(dataclasses.replace(row, n_loops=3))
    third = sweep_command.SweepProgress(tmp_path / "s.json", options)
    assert [r.n_loops for r in third.previous] == [1, 2, 3]
    assert "resuming: 3 row(s)" in capsys.readouterr().err


def test_a_report_stopped_midway_leaves_the_earlier_report_whole(runs, tmp_path, monkeypatch):
    """A rerun into the directory of a finished report removed that report's files before
    its own long work (the exit rules, then the figures); stopped there (Ctrl-C, a kill),
    it left neither report. The new report is now written beside the old one and takes
    its place once whole. Reference: the earlier report's files, byte for byte."""
    import open_mythos.evaluation.report as report_mod

    root, _, _ = runs
    out, keep = tmp_path / "report", tmp_path / "sweep.json"
    assert cli("sweep", "--checkpoint", str(root / "looped"), "--loops", "1-2", "--n-examples", "3",
               "--out", str(keep)) == 0
    args = ("report", "--run", str(root / "looped"), "--sweep", str(keep), "--n-examples", "3",
            "--out", str(out))
    assert cli(*args, "--exit-loops", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "exit_pareto.png" in before and "report.md" in before
    real = report_mod.write_report

    def killed_while_writing(run, out_dir, *a, **kw):
        (Path(out_dir) / "training_curves.png").write_bytes(b"half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "write_report", killed_while_writing)
    assert cli(*args, "--exit-loops", "0") == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(report_mod, "write_report", real)
    assert cli(*args, "--exit-loops", "0") == 0  # then it replaces the old one
    assert not (out / "exit_pareto.png").exists() and (out / "report.md").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_report_stopped_after_its_sweep_keeps_the_earlier_sweep_json(runs, tmp_path,
                                                                       monkeypatch):
    """The report's own sweep.json was written into --out before the report: stopped after
    the sweep, the directory held the new sweep beside the earlier report's tables."""
    import open_mythos.evaluation.report as report_mod

    root, _, _ = runs
    out = tmp_path / "report"
    args = ("report", "--run", str(root / "looped"), "--n-examples", "3", "--exit-loops", "0",
            "--out", str(out))
    assert cli(*args, "--loops", "1-2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "write_report", killed)
    assert cli(*args, "--loops", "1-3") == 130
    after = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".partial.json")}
    assert after == before


def test_reports_into_one_directory_keep_out_of_each_others_way(runs, tmp_path):
    """Every `.report-*` entry was removed as a killed report's leftovers: a user's own
    folder of that name, and the live staging folder of a report running into the same
    --out (which then failed on a file of its own). Now a locked folder is a live report's:
    the second is refused; a killed one's is removed; other names are left alone."""
    from open_mythos.commands.report import STAGING_PREFIX
    from tests.conftest import folder_locked_by_another_process

    root, _, _ = runs
    out = tmp_path / "report"
    (out / ".report-drafts").mkdir(parents=True)
    (out / ".report-drafts" / "notes.md").write_text("mine")
    (out / f"{STAGING_PREFIX}1").mkdir()  # a killed report's
    args = ("report", "--run", str(root / "looped"), "--n-examples", "3", "--exit-loops", "0",
            "--loops", "1", "--out", str(out))
    assert cli(*args) == 0
    assert (out / ".report-drafts" / "notes.md").read_text() == "mine"
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    live = out / f"{STAGING_PREFIX}2"
    live.mkdir()
    with folder_locked_by_another_process(live):
        assert cli(*args) == 2
    assert live.is_dir()


def test_a_file_that_cannot_be_written_is_one_line(runs, tmp_path, capsys):
    """A full disk or a directory where a file goes ended sweep and report in a traceback
    (exit 1): only FileNotFoundError was caught of the OSErrors."""
    root, _, _ = runs
    (tmp_path / "s.json.partial.json").mkdir()  # where the sweep keeps its rows
    assert cli("sweep", "--checkpoint", str(root / "looped"), "--loops", "1", "--n-examples",
               "2", "--out", str(tmp_path / "s.json")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s.json.partial.json" in err, err
    (tmp_path / "report" / "sweep.json").mkdir(parents=True)
    assert cli("report", "--run", str(root / "looped"), "--loops", "1", "--n-examples", "2",
               "--exit-loops", "0", "--out", str(tmp_path / "report")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("openmythos report: error:") and "sweep.json" in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_a_quoted_home_directory_is_the_home_directory_in_every_command(runs, tmp_path,
                                                                         monkeypatch):
    """``--out "~/x"`` reaches the program unexpanded: sweep and report made a folder named
    ``~`` in the working directory, report --run "~/run" found no training config (a task
    run said it recorded no task) and --sweep "~/s.json" no file."""
    import shutil

    root, _, _ = runs
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    shutil.copytree(root / "looped", home / "looped")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli("sweep", "--checkpoint", "~/looped", "--loops", "1", "--n-examples", "2",
               "--out", "~/s.json") == 0
    assert cli("report", "--run", "~/looped", "--sweep", "~/s.json", "--exit-loops", "0",
               "--out", "~/rep") == 0
    assert (home / "s.json").is_file() and (home / "rep" / "report.md").is_file()
    assert "training_curves.png" in {p.name for p in (home / "rep").iterdir()}
    assert not list(cwd.iterdir())
