"""The lab script behind docs/depth_extrapolation.md keeps running (a few steps, both models)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "experiments" / "multihop_lab.py"


@pytest.mark.parametrize("extra", [["--deep", "1", "--curriculum", "2", "--prompt-loss", "0.5"],
                                   ["--deep", "1", "--baseline"]])
def test_multihop_lab_runs_and_writes_its_results(tmp_path, extra):
    out = tmp_path / "run.json"
    done = subprocess.run(
        [sys.executable, str(LAB), "--steps", "3", "--bs", "8", "--eval-loops", "1,3",
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"id", "ood_hops"}
    loops = ["1"] if "--baseline" in extra else ["1", "3"]
    for split in results.values():
        assert list(split) == loops and all(0.0 <= v <= 1.0 for v in split.values())
    assert "hops=6" in done.stdout


@pytest.mark.parametrize("bad,message", [
    (["--lr", "nan"], "argument --lr: must be a positive finite number, got nan"),
    (["--deep", "-1"], "argument --deep: must be a finite number >= 0, got -1"),
    (["--prompt-loss", "inf"], "argument --prompt-loss: must be a finite number >= 0, got inf"),
])
def test_multihop_lab_checks_its_rates_before_training(bad, message):
    """A NaN or negative learning rate ended in the optimiser's traceback after the model
    was built, and negative loss weights were taken; the script says it checks every
    argument before training."""
    done = subprocess.run([sys.executable, str(LAB), "--steps", "1", *bad],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


PLAIN = Path(__file__).resolve().parents[1] / "experiments" / "plain_loop.py"


def test_plain_loop_benchmark_quick(tmp_path):
    """``--quick``: every task trains both models a few steps and the table has every row."""
    out = tmp_path / "plain.json"
    done = subprocess.run([sys.executable, str(PLAIN), "--quick", "--threads", "1",
                           "--max-loops", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"parity", "multihop", "phop"}
    assert set(results["phop"]["splits"]) == {"id", "ood_hops"}
    for task in results.values():
        for row in task["splits"].values():
            assert 0.0 <= row["plain"] <= 1.0 and list(row["ours"]) == ["1", "2", "3", "4", "5"]
    for line in ("| parity | id |", "| multihop | ood_hops |", "| phop | id |", "Targets:",
                 "| phop | id, exit rule |", "with the exit rule (min"):
        assert line in done.stdout
    for task in results.values():
        for row in task["splits"].values():
            # One loop: the rule cannot fire before its min_loops, so nothing changes.
            assert row["ours_exit"]["1"] == row["ours"]["1"]


def test_multihop_shortcut_rules_against_hand_solved_prompts():
    """The rules of ``experiments/multihop_shortcuts.py`` on prompts solved by hand, and a
    split's numbers as the script prints them."""
    sys.path.insert(0, str(LAB.parent))
    try:
        import multihop_shortcuts as shortcuts
    finally:
        sys.path.remove(str(LAB.parent))
    from open_mythos.tasks import get_task

    task = get_task("multihop")
    # a -> b -> c -> 7; d=3 is a distractor nobody points to; e points into the chain.
    table, query = shortcuts.assignments(task, "c=7;a=b;d=3;b=c;e=a?a")
    assert shortcuts.referenced(table, query) == {"7"}  # no hop followed, still right
    assert shortcuts.guess(table, query) == {"7", "3"}
    # A distractor pointed to by another: the rule cannot tell the two digits apart.
    table, query = shortcuts.assignments(task, "c=7;a=b;d=3;b=c;e=d?a")
    assert shortcuts.referenced(table, query) == {"7", "3"}
    # An open end (x is assigned nowhere) is the answer.
    table, query = shortcuts.assignments(task, "a=b;b=x;d=3?a")
    assert shortcuts.referenced(table, query) == {"x"}
    control = get_task("multihop", hops=(1, 3), ood_hops=(4, 6), statements=8, digits=3)
    acc = shortcuts.rule_accuracy(control, "hops=3", 64, 0)
    assert acc["guess"] == pytest.approx(1 / 3)  # three distinct digits in every prompt


@pytest.mark.parametrize("script, args, message", [
    # A bad split or count was a traceback (after the first rows of the table).
    ("multihop_shortcuts.py", ["--splits", "id,ood_hop"], "unknown split 'ood_hop'"),
    ("multihop_shortcuts.py", ["--n-examples", "0"], "must be a positive integer"),
    ("multihop_shortcuts.py", ["--task-args", "[1]"], "--task-args must be a JSON object"),
    # A model too short for the task failed only after the plain model had trained.
    ("plain_loop.py", ["--tasks", "parity", "--model", "max_seq_len=8"],
     "parity needs max_seq_len >= 24"),
])
def test_experiment_arguments_fail_before_any_work(script, args, message):
    done = subprocess.run([sys.executable, str(LAB.parent / script), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
