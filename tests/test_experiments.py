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
