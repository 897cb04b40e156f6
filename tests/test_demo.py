"""``make demo`` runs end to end (quick mode: seconds, checks the pipeline, not the science)."""

import pytest

from open_mythos.cli import main


@pytest.mark.slow
def test_quick_demo_writes_report_and_prints_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| loops | id | ood_hops |" in out and "| baseline (2 core blocks) |" in out
    assert "Targets:" in out and "in-distribution accuracy at T_train=2" in out
    report = tmp_path / "demo" / "report"
    text = (report / "report.md").read_text()
    for png in ("depth_sweep.png", "training_curves.png"):
        assert (report / png).stat().st_size > 1000 and png in text
    assert (tmp_path / "demo" / "sweep.json").exists()
    assert (tmp_path / "demo" / "looped" / "metrics.jsonl").exists()
    assert (tmp_path / "demo" / "baseline" / "metrics.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.init_std=-1"], "MythosConfig.init_std=-1.0 is invalid"),
    (["--set", "optim.bogus=1"], "unknown config key 'optim.bogus'"),
    (["--task-args", "[1]"], "--task-args must be a JSON object"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_fail_before_training(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d" / "looped").exists()
