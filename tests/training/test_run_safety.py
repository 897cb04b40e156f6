"""Runs that never lose or misreport work (#14 items 1-3): a locked, append-only run
directory; verified checkpoints with a fallback; honest exit statuses and one-line errors.

Most cases go through the real command line (``open_mythos.cli.main``) on
``configs/tiny.toml``; the concurrent-writer and dead-holder cases use a second process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from open_mythos.checkpoints import (
    CheckpointCorrupt,
    file_sha256,
    latest_checkpoint,
    load_checkpoint,
    verify_checkpoint,
)
from open_mythos.cli import main
from open_mythos.config import MythosConfig
from open_mythos.training import ConfigError, OptimConfig, Trainer, TrainingDiverged
from open_mythos.training import checkpoint as ckpt_mod
from open_mythos.training import trainer as trainer_mod
from open_mythos.training.data import TRAIN, build_data_source
from open_mythos.training.rundir import RunLock

from .conftest import REPO, TINY, cli_command, read_metrics, subprocess_env, tiny_config


def train_cli(out, *args: str) -> int:
    return main(["train", "--config", str(TINY), "--out", str(out), "--no-progress",
                 "--eval-every", "0", *args])


def nan_losses_after(monkeypatch, n_finite: int) -> None:
    """Make every training loss after the first ``n_finite`` NaN (a deterministic
    divergence: skipped steps, no update)."""
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def nan_after(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > n_finite:
            parts.objective = parts.objective * float("nan")
        return parts

    monkeypatch.setattr(trainer_mod, "compute_loss", nan_after)


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The command's stderr: exactly one line, naming every needle, no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("openmythos train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def ckpt_dir(run, step: int):
    return run / "checkpoints" / f"step_{step:08d}"


def flip_bytes(path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of a file (past a safetensors header: tensor data)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


# 1. The run directory protects itself ---------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = RunLock.acquire(run)  # another writer (flock is per open file)
    try:
        assert train_cli(run, "--steps", "2") == 2
        one_line_error(capsys, 2, f"PID {os.getpid()}", socket.gethostname(), str(run))
        assert not (run / "metrics.jsonl").exists() and not (run / "config.toml").exists()
    finally:
        holder.release()
    assert train_cli(run, "--steps", "2") == 0  # released: the run goes ahead


@pytest.mark.slow
def test_concurrent_runs_on_one_out_and_a_dead_holders_lock(tmp_path, capsys):
    """Two runs on one --out: the second is refused naming the first's PID and host, and
    the first's metrics are untouched; after the first is killed with SIGKILL, its lock is
    taken over."""
    run = tmp_path / "run"
    first = subprocess.Popen(cli_command("--out", str(run), "--steps", "100000", "--eval-every",
                                         "0", "--save-every", "0"),
                             env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or len(read_metrics(run)) < 3:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert train_cli(run, "--steps", "5", "--resume") == 2
        one_line_error(capsys, 2, f"PID {first.pid}", socket.gethostname(), "in use")
        rows = read_metrics(run)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # not truncated
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == first.pid  # left behind
    assert train_cli(run, "--steps", "3", "--resume", "auto") == 0
    assert f"took over the run lock of PID {first.pid}" in capsys.readouterr().err
    assert (run / "run.lock").read_text() == ""  # released cleanly


def test_a_stale_lock_record_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    record = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "2026-01-01"}
    (run / "run.lock").write_text(json.dumps(record))  # left by a process that died
    Trainer(tiny_config(run, run__steps=2)).train()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_resume_with_nothing_to_resume_is_an_error_and_keeps_the_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "6", "--save-every", "0") == 0
    shutil.rmtree(run / "checkpoints")  # or killed before its first save
    (run / "latest").unlink()
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train_cli(run, "--steps", "8", "--resume") == 2
    one_line_error(capsys, 2, "nothing to resume", str(run), "--resume auto")
    assert (run / "metrics.jsonl").read_bytes() == before
    assert not (run / "checkpoints").exists()
    assert train_cli(tmp_path / "typo", "--steps", "8", "--resume") == 2
    one_line_error(capsys, 2, "nothing to resume", "does not exist")
    assert not (tmp_path / "typo").exists()


def test_a_file_name_that_is_not_utf8_is_a_one_line_error_leaving_nothing(tmp_path, capsys):
    """Such a name reaches Python as lone surrogates, which no UTF-8 config.toml can hold:
    the run was a traceback (exit 1) that left config.toml.<hex>.tmp behind."""
    odd = os.fsdecode(b"\xff\xfename.txt")
    (tmp_path / odd).write_text("hello world " * 300)
    run = tmp_path / "run"
    assert train_cli(run, "--text", str(tmp_path / odd), "--seq-len", "16", "--steps", "1") == 2
    one_line_error(capsys, 2, "not valid UTF-8", "rename")
    assert not run.exists()


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "config.toml"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        ckpt_mod.write_text_atomic(target, "a \udcff b")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_a_run_with_an_unreachable_act_threshold_resumes_and_saves_strict_json(tmp_path):
    """act_threshold = inf (TOML has inf, JSON does not): config.toml keeps the float, the
    checkpoint's config.json writes "inf", and both read back for --resume."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2",
                     "--set", "model.act_threshold=inf") == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--save-every", "3",
                 "--no-progress"]) == 0  # the run's own config.toml
    saved = json.loads((ckpt_dir(run, 3) / "config.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"config.json holds {c}"))
    assert saved["act_threshold"] == "inf"
    assert load_checkpoint(run)[1].act_threshold == float("inf")


def test_resume_auto_starts_again_and_keeps_the_old_rows_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "5", "--save-every", "0") == 0
    shutil.rmtree(run / "checkpoints")
    before = (run / "metrics.jsonl").read_bytes()
    assert train_cli(run, "--steps", "3", "--resume", "auto") == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert (run / "metrics.replaced.jsonl").read_bytes() == before  # nothing lost
    # With a checkpoint, auto resumes it.
    assert train_cli(run, "--steps", "4", "--resume", "auto") == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert "resumed from" in capsys.readouterr().err


def test_resume_appends_after_the_checkpoint_and_moves_only_later_rows(tmp_path):
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "6", "--save-every", "4") == 0
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    # As if killed after logging step 6 but before saving it; and a torn last line.
    shutil.rmtree(ckpt_dir(run, 6))
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 7, "lo')
    assert train_cli(run, "--steps", "7", "--resume") == 0
    now = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert now[:4] == lines[:4]  # rows up to the checkpoint, byte for byte
    assert [json.loads(x)["step"] for x in now] == list(range(1, 8))
    assert (run / "metrics.replaced.jsonl").read_bytes() == b"".join(lines[4:]) + b'{"step": 7, "lo\n'


def test_a_move_of_rows_cut_short_by_a_kill_is_finished_once(tmp_path):
    """Killed after appending the rows to metrics.replaced.jsonl but before cutting them
    from metrics.jsonl, the next start appended them a second time: one run's rows read as
    two killed runs'."""
    from open_mythos.training.rundir import replace_metrics_after

    rows = [json.dumps({"step": s, "tokens_per_s": 1000.0 + s}).encode() + b"\n"
            for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(rows))
    (tmp_path / "metrics.replaced.jsonl").write_bytes(rows[2] + b"".join(rows[4:]))  # killed
    assert replace_metrics_after(tmp_path, 4) == 3
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(rows[:4])
    assert (tmp_path / "metrics.replaced.jsonl").read_bytes() == rows[2] + b"".join(rows[4:])
    assert replace_metrics_after(tmp_path, 4) == 0
    # Another run's rows after the same step are moved too.
    again = json.dumps({"step": 5, "tokens_per_s": 2000.0}).encode() + b"\n"
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(rows[:4]) + again)
    assert replace_metrics_after(tmp_path, 4) == 1
    assert (tmp_path / "metrics.replaced.jsonl").read_bytes() == (
        rows[2] + b"".join(rows[4:]) + again)


# 2. Verified checkpoints ----------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, run__steps=4, run__save_every=2, run__keep_checkpoints=0)).train()
    return run


def test_every_checkpoint_has_a_manifest_of_sizes_and_checksums(two_checkpoints):
    ckpt = ckpt_dir(two_checkpoints, 4)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    names = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names and manifest["step"] == 4
    for name, entry in manifest["files"].items():
        assert entry == {"size": (ckpt / name).stat().st_size,
                         "sha256": file_sha256(ckpt / name)}
    verify_checkpoint(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_loads(two_checkpoints, damage,
                                                                         caplog):
    run = two_checkpoints
    weights = ckpt_dir(run, 4) / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    else:
        flip_bytes(weights)
    with pytest.raises(CheckpointCorrupt, match="model.safetensors"):
        load_checkpoint(ckpt_dir(run, 4))  # named explicitly: no fallback
    with caplog.at_level(logging.WARNING, logger="open_mythos.checkpoints"):
        model, _ = load_checkpoint(run)
    assert str(weights) in caplog.text and "step_00000002" in caplog.text
    older, _ = load_checkpoint(ckpt_dir(run, 2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  older.state_dict().values()))


def test_resume_falls_back_to_the_newest_intact_checkpoint(two_checkpoints, capsys):
    run = two_checkpoints
    flip_bytes(ckpt_dir(run, 4) / "optimizer.pt")
    assert train_cli(run, "--steps", "5", "--resume") == 0
    err = capsys.readouterr().err
    assert "optimizer.pt" in err and "resumed from" in err and "step_00000002 at step 2" in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_a_damaged_checkpoint_without_a_manifest_is_a_one_line_error(two_checkpoints, capsys):
    """Checkpoints written before manifests (2026-12-03) pass verification on their files'
    presence; a truncated one was found only when read, and the resume ended in a
    traceback naming the directory."""
    run = two_checkpoints
    for step in (2, 4):
        (ckpt_dir(run, step) / "manifest.json").unlink()
    optimizer = ckpt_dir(run, 4) / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    assert train_cli(run, "--steps", "6", "--resume") == 2
    one_line_error(capsys, 2, f"{optimizer} is unreadable")


def test_resume_when_every_checkpoint_is_damaged_is_an_error(two_checkpoints, capsys):
    run = two_checkpoints
    for step in (2, 4):
        flip_bytes(ckpt_dir(run, step) / "model.safetensors")
    assert train_cli(run, "--steps", "6", "--resume", "auto") == 2
    one_line_error(capsys, 2, "every checkpoint is damaged", "step_00000002")


def test_latest_must_point_inside_the_run(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(tiny_config(a, run__steps=2)).train()
    Trainer(tiny_config(b, run__steps=3, run__seed=1)).train()
    # A zero-filled pointer (a crash of the file system) raised "embedded null byte" in
    # every reader, and resume failed the same way at every restart.
    for pointer in ("../b/checkpoints/step_00000003", str(ckpt_dir(b, 3)), "\0" * 25):
        (a / "latest").write_text(pointer + "\n")
        with caplog.at_level(logging.WARNING, logger="open_mythos.checkpoints"):
            assert latest_checkpoint(a) == ckpt_dir(a, 2)
        assert "not a checkpoint inside" in caplog.text and repr(pointer) in caplog.text
        caplog.clear()


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=2))
    trainer.train()
    with torch.no_grad():
        trainer.core.embed.weight[3, 5] = float("nan")
    trainer.state.step = 3
    with pytest.raises(TrainingDiverged, match="embed.weight"):
        trainer.save()
    assert not ckpt_dir(tmp_path / "run", 3).exists()
    assert latest_checkpoint(tmp_path / "run") == ckpt_dir(tmp_path / "run", 2)


def test_the_last_good_checkpoint_named_after_divergence_gives_finite_logits(
        tmp_path, monkeypatch, capsys):
    """Two finite steps, then every loss is NaN (injected: a huge learning rate diverges
    after a number of steps that depends on the machine's numerics). The error names the
    checkpoint whose weights then gave a finite loss (the next step's batch gives finite
    logits), and ``latest`` points back at it; no checkpoint is written while steps are
    skipped."""
    nan_losses_after(monkeypatch, 2)
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "30", "--save-every", "1") == 1
    line = one_line_error(capsys, 1, "last good checkpoint is")
    named = Path(re.search(r"last good checkpoint is (\S*step_\d{8})", line).group(1))
    assert latest_checkpoint(run) == named
    step = int(named.name.removeprefix("step_"))
    rows = read_metrics(run)
    assert rows[step]["step"] == step + 1 and not rows[step]["skipped"]
    cfg = tiny_config(run)
    batch = build_data_source(cfg.data, cfg.run.seed, 1).batch(TRAIN, step)  # step + 1's
    model, _ = load_checkpoint(run)
    with torch.no_grad():
        assert torch.isfinite(model(batch["input_ids"], n_loops=cfg.schedule.n_loops)).all()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    skipped = [r["step"] for r in rows if r["skipped"]]
    assert saved and not {f"step_{s:08d}" for s in skipped} & set(saved)
    for name in saved:
        state = load_checkpoint(run / "checkpoints" / name)[0].state_dict()
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# 3. Honest failure ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,field", [
    (["--lr", "inf"], "optim.lr"),
    (["--lr", "1e308"], "optim.lr"),
    (["--set", "optim.eps=0"], "optim.eps"),
    (["--set", "optim.weight_decay=inf"], "optim.weight_decay"),
    (["--set", "optim.grad_clip=inf"], "optim.grad_clip"),
    (["--set", "model.init_std=inf"], "init_std"),
    (["--set", "model.embed_init_std=inf"], "embed_init_std"),
    (["--set", "model.norm_eps=inf"], "norm_eps"),
])
def test_non_finite_or_non_positive_hyperparameters_are_rejected(tmp_path, capsys, args, field):
    assert train_cli(tmp_path / "run", "--steps", "8", *args) == 2
    one_line_error(capsys, 2, field)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_classes_name_the_bad_field():
    for kwargs, field in [(dict(lr=float("inf")), "optim.lr"), (dict(eps=0.0), "optim.eps"),
                          (dict(grad_clip=float("nan")), "optim.grad_clip")]:
        with pytest.raises(ConfigError, match=field):
            OptimConfig(**kwargs)
    for name in ("init_std", "embed_init_std", "init_logit_std", "norm_eps", "rope_theta"):
        with pytest.raises(ValueError, match=f"MythosConfig.{name}=inf"):
            MythosConfig(**{name: float("inf")})


def test_a_run_that_ends_on_skipped_steps_exits_non_zero(tmp_path, monkeypatch, capsys):
    """Fewer than max_bad_steps skipped steps, but the last one among them: no final
    checkpoint, exit status 1 (it used to print "done" and save)."""
    nan_losses_after(monkeypatch, 2)
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "6", "--save-every", "2") == 1
    one_line_error(capsys, 1, "ended on 4 skipped steps", "not saved", "step_00000002")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert [r["skipped"] for r in read_metrics(run)] == [False, False, True, True, True, True]


def test_weights_that_are_no_longer_finite_fail_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", run__steps=1)
    trainer = Trainer(cfg, on_step=lambda step, row: poison(trainer))  # a finite loss, then
    with pytest.raises(TrainingDiverged, match="no longer finite"):  # NaN weights to save
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_non_finite_validation_loss_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_mod, "cross_entropy_sum",  # used by evaluate() only here
                        lambda logits, y: logits.sum() * float("inf"))
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "4", "--eval-every", "2") == 1
    one_line_error(capsys, 1, "validation loss at step 2")
    row = read_metrics(run)[1]
    assert row["step"] == 2 and row["val_loss"] is None  # strict JSON
    assert not (run / "checkpoints").exists()


def _raise_on(path_part: str, err: int, real):
    def fake(path, *args, **kwargs):
        if path_part in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *args, **kwargs)
    return fake


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_an_unusable_out_is_one_line_naming_it(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "run",
           "read_only": tmp_path / "ro" / "run"}[case]
    if case == "read_only":  # (root ignores chmod, so the filesystem's answer is simulated)
        monkeypatch.setattr(os, "mkdir", _raise_on(str(tmp_path / "ro"), errno.EROFS, os.mkdir))
    assert train_cli(out, "--steps", "2") == 3
    one_line_error(capsys, 3, str(out.parent if case == "read_only" else out))


def test_a_directory_in_the_way_of_latest_is_named(tmp_path, capsys):
    """The error named the temporary file that ``latest`` is written through (deleted by
    then, and another on every retry), not the directory in the way."""
    run = tmp_path / "run"
    (run / "latest").mkdir(parents=True)
    assert train_cli(run, "--steps", "2", "--save-every", "2") == 3
    one_line_error(capsys, 3, f"{run / 'latest'}: ", "a directory is in the way of a file")


# What each writer raises on a full disk: ``write()``'s OSError (no file name), the
# safetensors writer's own error (a Rust I/O error's text) and torch's zip writer's.
FULL_DISK = {
    "oserror": ("save_file", lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    "safetensors": ("save_file", lambda: SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")),
    "torch.save": ("torch.save", lambda: RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 113344 vs 113232")),
}


@pytest.mark.parametrize("writer", sorted(FULL_DISK))
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
        tmp_path, capsys, monkeypatch, writer):
    run = tmp_path / "run"
    name, error = FULL_DISK[writer]
    import safetensors.torch

    real = safetensors.torch.save_file if name == "save_file" else torch.save

    def full_disk(state, path, *args, **kwargs):
        if "step_00000004" in str(path):
            Path(path).write_bytes(b"partial")  # what a writer leaves before the disk fills
            raise error()
        return real(state, path, *args, **kwargs)

    if name == "save_file":  # the safetensors writer itself, under the checkpoint code
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    else:
        monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    assert train_cli(run, "--steps", "4", "--save-every", "2") == 3
    reason = "the write failed" if writer == "torch.save" else "No space left on device"
    one_line_error(capsys, 3, reason, str(run / "checkpoints"))
    assert latest_checkpoint(run) == ckpt_dir(run, 2)
    # The partial checkpoint is gone (it would hold the space a retry needs).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]


def test_a_resume_removes_what_killed_writes_left(tmp_path, capsys):
    """SIGKILL during a save leaves a staging directory, during ``latest``'s update its
    temporary file: the next run on the directory (holding its lock) removes them, and
    nothing else."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2") == 0
    left = [run / "latest.0123abcd.tmp", run / "config.toml.89abcdef.tmp",
            run / "checkpoints" / ".tmp-step_00000004-deadbeef"]
    left[2].mkdir()
    (left[2] / "model.safetensors").write_bytes(b"partial")
    for f in left[:2]:
        f.write_text("partial")
    mine = run / "notes.tmp"  # not a name our writes use
    mine.write_text("keep")
    capsys.readouterr()
    assert train_cli(run, "--steps", "4", "--save-every", "4", "--resume") == 0
    assert not any(p.exists() for p in left) and mine.read_text() == "keep"
    assert ("removed what interrupted writes left: checkpoints/.tmp-step_00000004-deadbeef, "
            "config.toml.89abcdef.tmp, latest.0123abcd.tmp") in capsys.readouterr().err
    assert latest_checkpoint(run) == ckpt_dir(run, 4)


def test_other_writer_errors_are_not_called_a_full_disk(tmp_path):
    """A writer's error that is not an I/O error (safetensors refusing tensors that share
    memory) is raised as it is, and the staging directory is removed."""
    shared = torch.zeros(4)
    ckpt = ckpt_mod.TrainingCheckpoint(1, {"a": shared, "b": shared}, MythosConfig(),
                                       "", {}, {})
    with pytest.raises(RuntimeError, match="share memory"):
        ckpt_mod.save_checkpoint(tmp_path, ckpt, {})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_full_disk_writing_the_config_names_the_run_directory(tmp_path, capsys, monkeypatch):
    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer_mod, "write_text_atomic", full_disk)
    assert train_cli(tmp_path / "run", "--steps", "2") == 3
    one_line_error(capsys, 3, "No space left on device", str(tmp_path / "run"))


@pytest.mark.parametrize("case", ["directory", "missing", "unreadable", "binary"])
def test_an_unusable_config_is_one_line_naming_it(tmp_path, capsys, monkeypatch, case):
    from open_mythos.training import config as config_mod

    path = {"directory": tmp_path, "missing": tmp_path / "nope.toml",
            "unreadable": TINY, "binary": tmp_path / "bin.toml"}[case]
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00[model]\x00")
    if case == "unreadable":
        monkeypatch.setattr(config_mod, "open", _raise_on(str(TINY), errno.EACCES, open),
                            raising=False)
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    one_line_error(capsys, 2, str(path))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_saves_the_step_in_progress_and_resume_loses_nothing(tmp_path, monkeypatch,
                                                                    capsys, sig):
    """The first Ctrl-C used to print a traceback and lose every step since the last
    checkpoint, SIGTERM (a scheduler's stop) to kill the run silently, losing them too. Now
    the step in progress ends, is saved, and the command says so (130, 143); the resumed run
    matches one never interrupted."""
    real = trainer_mod.compute_loss
    calls = {"n": 0}
    handler = signal.getsignal(sig)

    def interrupt_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the signal arrives in the middle of step 5
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "compute_loss", interrupt_in_step_5)
    steps = ["--steps", "8", "--save-every", "0"]
    assert train_cli(tmp_path / "cut", *steps) == 128 + sig
    err = capsys.readouterr().err
    by = "" if sig == signal.SIGINT else " by SIGTERM"
    assert re.search(rf"interrupted{by} after step 5, saved in .*step_00000005; continue with "
                     r"--resume", err), err
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5]
    assert signal.getsignal(sig) is handler
    monkeypatch.setattr(trainer_mod, "compute_loss", real)
    assert train_cli(tmp_path / "cut", *steps, "--resume") == 0
    assert train_cli(tmp_path / "whole", *steps) == 0
    cut, whole = read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "whole")
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]


@pytest.mark.parametrize("save_every", [0, 2])
def test_a_second_ctrl_c_stops_at_once_and_says_what_was_saved(tmp_path, monkeypatch, capsys,
                                                               save_every):
    """The second Ctrl-C (while the first waits for the step to end) stops at once, as
    before; the command now says after which step and which checkpoint is left, not only
    'interrupted'."""
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def two_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "compute_loss", two_in_step_5)
    assert train_cli(tmp_path / "r", "--steps", "8", "--save-every", str(save_every)) == 130
    err = capsys.readouterr().err
    saved = (r"the newest checkpoint is .*step_00000004; continue from it with --resume"
             if save_every else "nothing was saved")
    assert re.search(rf"stopped at once by a second Ctrl-C after step 4; {saved}", err), err
    assert "Traceback" not in err and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_first_ctrl_c_outside_the_training_loop_is_not_called_a_second(tmp_path, capsys,
                                                                         monkeypatch):
    """A Ctrl-C while a resumed run set up (before the handler that turns it into a saved
    stop) was reported as "stopped at once by a second Ctrl-C"."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2") == 0
    capsys.readouterr()

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "_loop", ctrl_c)
    assert train_cli(run, "--steps", "4", "--resume") == 130
    line = one_line_error(capsys, 130, "interrupted by Ctrl-C after step 2",
                          "continue from it with --resume")
    assert "second" not in line


def test_resuming_with_fewer_total_steps_than_done_is_an_error(tmp_path, capsys):
    """It printed 'done' and rewrote config.toml with the smaller count."""
    assert train_cli(tmp_path / "r", "--steps", "4", "--save-every", "2") == 0
    config = (tmp_path / "r" / "config.toml").read_text()
    assert train_cli(tmp_path / "r", "--steps", "2", "--resume") == 2
    assert "at step 4 with run.steps=2" in capsys.readouterr().err
    assert (tmp_path / "r" / "config.toml").read_text() == config


def test_an_empty_source_name_clears_it(tmp_path):
    """--set data.task= trained on the built-in corpus but stored task = '', which later
    commands read as an unknown task."""
    cfg = tiny_config(tmp_path / "r", data__task="")
    assert cfg.data.task is None
    from open_mythos.evaluation.runs import is_text_run

    Trainer(tiny_config(tmp_path / "r", data__task="", run__steps=1)).train()
    assert is_text_run(tmp_path / "r")


def test_resuming_after_divergence_drops_the_abandoned_checkpoints(tmp_path):
    """After a divergence ``latest`` names the last good checkpoint, and a newer one holds
    the weights that first gave a non-finite loss. The resumed run's first checkpoint
    removes it: ``keep_checkpoints`` then keeps the good lineage, and a damaged newest
    checkpoint falls back to a good one, never to the diverged weights."""
    run = tmp_path / "run"
    kw = dict(run__save_every=5, run__keep_checkpoints=2, run__max_bad_steps=3)

    def nan_from_16(step, loss):
        return loss * float("nan") if step >= 16 else loss

    with pytest.raises(TrainingDiverged):
        Trainer(tiny_config(run, run__steps=40, **kw), loss_hook=nan_from_16).train()
    names = lambda: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert latest_checkpoint(run) == ckpt_dir(run, 10)
    assert names() == ["step_00000010", "step_00000015"]
    Trainer(tiny_config(run, run__steps=12, **kw), resume=True).train()
    assert names() == ["step_00000010", "step_00000012"]
    (ckpt_dir(run, 12) / "model.safetensors").write_bytes(b"damaged")
    assert latest_checkpoint(run) == ckpt_dir(run, 10)


def test_a_launcher_that_sets_rank_without_the_rendezvous_is_a_config_error(tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert train_cli(tmp_path / "run", "--steps", "2", "--parallel", "ddp") == 2
    one_line_error(capsys, 2, "MASTER_ADDR, MASTER_PORT", "torchrun")


@pytest.mark.parametrize("env,needle", [
    (dict(RANK="1", WORLD_SIZE="1"), "RANK=1 is not below WORLD_SIZE=1"),
    (dict(RANK="x", WORLD_SIZE="2"), "RANK='x' in the environment is not an integer"),
    (dict(RANK="0", WORLD_SIZE="0"), "WORLD_SIZE='0' in the environment is not an integer >= 1"),
])
def test_a_launch_environment_out_of_range_is_a_config_error(tmp_path, capsys, monkeypatch,
                                                             env, needle):
    """RANK >= WORLD_SIZE waited for a rank 0 that never came (30 minutes by torch's
    default), then ended in a traceback; a non-integer was a ValueError traceback. A rank
    other than 0 says its error after ``rank N:`` when no torchrun collects it (it printed
    nothing)."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing may be reached: the check comes first
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train_cli(tmp_path / "run", "--steps", "2", "--parallel", "ddp",
                     "--set", "run.dist_timeout=5") == 2
    err = capsys.readouterr().err.strip()
    prefix = "" if env["RANK"] == "0" else f"rank {env['RANK']}: "
    assert err.splitlines() == [f"{prefix}openmythos train: error: " + err.split("error: ", 1)[1]]
    assert needle in err and "Traceback" not in err


def test_an_error_of_a_rank_other_than_0_reaches_torchruns_summary(tmp_path, capsys,
                                                                   monkeypatch):
    """An error only rank 1 met (its config file missing on its node) was printed by no
    rank: rank 0 prints alone. Every rank now leaves its error where torchrun reads a failed
    rank's error file. Reference: torchrun's own reader of that file."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    assert train_cli(tmp_path / "run", "--config", str(tmp_path / "missing.toml")) == 2
    assert capsys.readouterr().err == ""  # torchrun shows it, once
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message == (f"openmythos train: error: config file "
                               f"'{tmp_path / 'missing.toml'}' does not exist")


def test_resuming_with_another_global_batch_says_so(tmp_path, capsys):
    """A run resumed with another global batch (another --batch-size here; likewise another
    number of processes) trained on silently; now the change and the flag that keeps the
    saved batch are named, and resuming with the saved batch says nothing."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2", "--batch-size", "4") == 0
    capsys.readouterr()
    assert train_cli(run, "--steps", "3", "--save-every", "3", "--batch-size", "2",
                     "--resume") == 0
    assert ("warning: the global batch changes from 4 to 2 sequences per step "
            "(data.batch_size 2 x 1 process(es) x optim.grad_accum 1); the run is no longer "
            "the one it would have been (--batch-size 4 keeps it)") in capsys.readouterr().err
    assert train_cli(run, "--steps", "4", "--save-every", "4", "--batch-size", "2",
                     "--resume") == 0
    assert "global batch" not in capsys.readouterr().err


def test_resuming_a_checkpoint_of_an_older_version(tmp_path, capsys):
    """A checkpoint of before 2026-12-05 (no manifest, no global batch recorded, model
    fields added since missing from its configuration): the global batch it was trained
    with comes from its configuration and process count, and the fields it does not name
    are no configuration change when the run holds their defaults (every resume of such a
    run listed them)."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2", "--batch-size", "4") == 0
    ckpt = run / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    del state["global_batch"]
    torch.save(state, ckpt / "trainer_state.pt")
    config = (ckpt / "train_config.toml").read_text()
    assert "token_conv = " in config
    (ckpt / "train_config.toml").write_text(
        "".join(line for line in config.splitlines(keepends=True)
                if not line.startswith(("token_conv = ", "clamp_loop_index = "))))
    (ckpt / "manifest.json").unlink()
    capsys.readouterr()
    assert train_cli(run, "--steps", "3", "--save-every", "3", "--batch-size", "2",
                     "--resume") == 0
    err = capsys.readouterr().err
    assert "the global batch changes from 4 to 2" in err
    line = next(x for x in err.splitlines() if "changed since" in x)
    assert "model." not in line and "run.steps: 2 -> 3" in line


def test_resuming_with_config_names_what_it_changes(tmp_path, capsys):
    """With --config, a resume that changed the data or the optimiser trained on silently
    (the keys were listed only without --config). Both configurations compared are
    resolved, so the model, data.seq_len and paths are not reported as changes."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2") == 0
    capsys.readouterr()
    assert train_cli(run, "--steps", "4", "--save-every", "2", "--resume") == 0
    err = capsys.readouterr().err
    assert ("at step 2; configuration changed since it was saved: run.steps: 2 -> 4\n"
            in err), err
    assert train_cli(run, "--steps", "6", "--save-every", "2", "--lr", "0.01",
                     "--task", "dyck", "--resume") == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "changed since" in x)
    assert "data.task: 'parity' -> 'dyck'" in line and "optim.lr: " in line
    assert "run.steps: 4 -> 6" in line and "model." not in line
    assert train_cli(run, "--steps", "6", "--save-every", "2", "--lr", "0.01",
                     "--task", "dyck", "--resume") == 0
    assert "changed since" not in capsys.readouterr().err  # the same again: nothing


def _signal_in_step(monkeypatch, step: int, *signals: int) -> None:
    """Send ``signals`` to this process in the middle of training step ``step``."""
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "compute_loss", signalled)


def test_a_repeated_sigterm_still_saves(tmp_path, monkeypatch, capsys):
    """A scheduler and torchrun may each send SIGTERM: the second must not kill the step."""
    _signal_in_step(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM)
    assert train_cli(tmp_path / "run", "--steps", "8", "--save-every", "0") == 143
    assert "interrupted by SIGTERM after step 3, saved in" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run") == ckpt_dir(tmp_path / "run", 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_in_the_last_step_lets_the_run_complete(tmp_path, monkeypatch, capsys):
    _signal_in_step(monkeypatch, 4, signal.SIGTERM)
    assert train_cli(tmp_path / "run", "--steps", "4", "--save-every", "0") == 0
    assert "interrupted" not in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run") == ckpt_dir(tmp_path / "run", 4)


def test_an_ignored_sigint_stays_ignored(tmp_path, monkeypatch):
    """A job started with ``&`` ignores SIGINT; the trainer must not start acting on it."""
    _signal_in_step(monkeypatch, 2, signal.SIGINT)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert train_cli(tmp_path / "run", "--steps", "4", "--save-every", "0") == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_ctrl_c_with_a_broken_stderr_still_saves(tmp_path, monkeypatch):
    """``openmythos train ... 2>&1 | tee log``: Ctrl-C kills tee too, and a message written
    from the signal handler (then: in the middle of a forward) failed the step unsaved."""
    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(trainer_mod.tqdm, "write", broken)
    monkeypatch.setattr(trainer_mod.tqdm, "update", broken)
    monkeypatch.setattr("builtins.print", broken)
    _signal_in_step(monkeypatch, 3, signal.SIGINT)
    assert train_cli(tmp_path / "run", "--steps", "8", "--save-every", "0") == 130
    assert latest_checkpoint(tmp_path / "run") == ckpt_dir(tmp_path / "run", 3)


def test_a_kill_between_the_swap_renames_keeps_the_checkpoint(tmp_path, capsys):
    """Re-saving a step moves the old copy aside, then renames the new one into place; a
    kill in between left ``latest`` naming a missing directory, and the start-up cleanup
    removed the new copy: nothing to resume. The old copy is now moved back."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2") == 0
    root = run / "checkpoints"
    shutil.copytree(root / "step_00000002", root / ".tmp-step_00000002-0badf00d")
    os.replace(root / "step_00000002", root / ".tmp-old-step_00000002-abcd1234")
    capsys.readouterr()
    assert train_cli(run, "--steps", "3", "--save-every", "3", "--resume") == 0
    err = capsys.readouterr().err
    assert "checkpoints/.tmp-old-step_00000002-abcd1234 (moved back to step_00000002)" in err
    assert "at step 2" in err
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_a_resume_applies_the_optimizer_settings_it_changes(tmp_path, monkeypatch):
    """Loading the optimizer's state used to bring back the saved weight decay, betas and
    eps: a resume that changed them (after a divergence, say) was listed as changed and
    trained on with the old values. The state (moments, steps) comes from the checkpoint,
    the hyper-parameters from this run's configuration."""
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "2", "--save-every", "2") == 0
    groups = []
    restore = trainer_mod.Trainer._restore

    def spy(self, ckpt):
        restore(self, ckpt)
        groups.append([dict(g, params=None) for g in self.optimizer.param_groups])
        groups.append(len(self.optimizer.state))

    monkeypatch.setattr(trainer_mod.Trainer, "_restore", spy)
    assert train_cli(run, "--steps", "3", "--save-every", "3", "--resume",
                     "--set", "optim.weight_decay=0.5", "--set", "optim.beta1=0.5",
                     "--set", "optim.beta2=0.6", "--set", "optim.eps=1e-3") == 0
    (decay, no_decay), n_states = groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    for group in (decay, no_decay):
        assert group["betas"] == (0.5, 0.6) and group["eps"] == 1e-3
    assert n_states > 0  # the moments were restored all the same


def test_a_full_disk_under_tensorboard_is_one_line_without_the_writer_threads_traceback(
        tmp_path, capsys, monkeypatch):
    """TensorBoard writes from a thread of its own: a full disk printed that thread's
    traceback before the command's one-line error. The writer raises the error again in
    the training loop, which reports it; the thread's copy is not printed. Other threads'
    errors still reach the hook in place before."""
    import threading

    from tensorboard.summary.writer import record_writer

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))
    real_write = record_writer.RecordWriter.write
    calls = {"n": 0}

    def full_disk(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    code = train_cli(tmp_path / "run", "--steps", "40", "--tensorboard", "--log-every", "1")
    assert code == 3
    one_line_error(capsys, 3, "No space left on device")
    assert seen == []

    class Worker(threading.Thread):
        def run(self):
            raise ValueError("not a writer's")

    worker = Worker()
    worker.start()
    worker.join()
    assert seen == [ValueError]


def poison(trainer) -> None:
    """Make one weight NaN (what a diverged update leaves)."""
    with torch.no_grad():
        next(trainer.core.parameters()).fill_(float("nan"))


def test_two_ctrl_c_during_one_long_operation_stop_at_once(tmp_path, monkeypatch, capsys):
    """Two Ctrl-Cs that both arrive while the step is inside one call into C (a long
    backward pass) run Python's handler once: the run took them for one, finished the step
    and saved it. Now they stop at once, as two presses do. Reference: the same message as
    two presses handled apart (the test above)."""
    import threading
    import time

    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def two_during_a_matmul(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            inside = threading.Event()

            def press_twice():
                inside.wait()
                time.sleep(0.02)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.02)
                os.kill(os.getpid(), signal.SIGINT)

            threading.Thread(target=press_twice, daemon=True).start()
            a = torch.randn(1500, 1500) / 40
            inside.set()
            torch.linalg.matrix_power(a, 64)  # one call into C, of a few tenths of a second
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "compute_loss", two_during_a_matmul)
    assert train_cli(tmp_path / "r", "--steps", "8", "--save-every", "0") == 130
    err = capsys.readouterr().err
    assert re.search(r"stopped at once by a second Ctrl-C after step 4; nothing was saved",
                     err), err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_process_forked_during_training_does_not_count_ctrl_c_for_the_run():
    """The counter of Ctrl-Cs reads the signal wakeup socket. A child forked during
    training (a data loader's worker) kept it: one Ctrl-C at the terminal reaches the whole
    process group, the child wrote its delivery too, and the run counted two and stopped
    unsaved. Reference: the child's own wakeup descriptor (none) and the parent's (kept)."""
    import signal as signal_mod

    with trainer_mod._SignalCounter() as counter:
        assert counter._pair is not None
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its wakeup descriptor is gone
            os.write(write, b"1" if signal_mod.set_wakeup_fd(-1) == -1 else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1"
        os.close(read)
        os.close(write)
        assert counter._pair is not None
        assert signal_mod.set_wakeup_fd(counter._pair[1].fileno()) == counter._pair[1].fileno()
