"""A run killed with SIGKILL and resumed logs the same losses as one never interrupted."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from .conftest import REPO, cli_command, read_metrics, run_checked, subprocess_env

ARGS = ("--task", "parity", "--steps", "40", "--seed", "3", "--save-every", "5",
        "--eval-every", "10", "--set", "schedule.loops=sampled")


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    env = subprocess_env()
    # The reference and the victim run side by side (one thread each).
    ref = subprocess.Popen(cli_command(*ARGS, "--out", str(ref_dir)), env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(cli_command(*ARGS, "--out", str(run_dir)), env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "latest").exists():
        assert victim.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    steps_before = len(read_metrics(run_dir))
    assert 5 <= steps_before < 40

    run_checked(cli_command(*ARGS, "--out", str(run_dir), "--resume"))
    assert ref.wait(timeout=120) == 0, ref.stderr.read()
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in got] == list(range(1, 41))
    for a, b in zip(got, want):
        assert a["loops"] == b["loops"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-6)
