"""torchrun with the gloo backend on 2 CPU processes: DDP equals one process on the same
global batch; FSDP2 trains, agrees, and its sharded checkpoint loads (and resumes) in one
process (resharding and the shard layout: test_sharded_checkpoint.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open_mythos.checkpoints import latest_checkpoint
from open_mythos.training import LoopSchedule, Trainer, load_checkpoint

from .conftest import (
    REPO,
    cli_command,
    read_metrics,
    run_checked,
    subprocess_env,
    tiny_config,
    torchrun_command,
)

STEPS = 6
# Sampled loop counts: the ranks must agree on every step (the trainer checks it).
ARGS = ("--task", "parity", "--steps", str(STEPS), "--seed", "1", "--eval-every", "3",
        "--set", "schedule.loops=sampled", "--set", "schedule.n_loops=2",
        "--set", "optim.aux_weight=0")  # the balance loss is per process (product of means)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 4: the reference for 2 ranks x batch 2."""
    out = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(out, run__steps=STEPS, run__seed=1, run__eval_every=3,
                                  data__batch_size=4, schedule__loops="sampled",
                                  schedule__n_loops=2, optim__aux_weight=0.0))
    trainer.train()
    return trainer, read_metrics(out)


def assert_same_run(rows, ref_rows, tol):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loops"] for r in rows] == [r["loops"] for r in ref_rows]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=tol)
    assert rows[-1]["val_loss"] == pytest.approx(ref_rows[-1]["val_loss"], abs=tol)


def assert_same_weights(model, ref, tol):
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=name)


def run_two_ranks(out, parallel: str) -> list[dict]:
    """The metrics of a 2-rank x batch 2 run of ``ARGS`` under ``--parallel parallel``."""
    run_checked(torchrun_command(2, *ARGS, "--batch-size", "2", "--parallel", parallel,
                                 "--out", str(out)))
    return read_metrics(out)


def test_ddp_matches_single_process(tmp_path, single):
    trainer, ref_rows = single
    rows = run_two_ranks(tmp_path, "ddp")
    assert_same_run(rows, ref_rows, 1e-5)
    sampler = LoopSchedule.from_config(trainer.cfg.schedule, STEPS, 1)
    assert [r["loops"] for r in rows] == [sampler(s) for s in range(STEPS)]
    model, _ = load_checkpoint(tmp_path)
    assert_same_weights(model, trainer.core, 1e-4)
    # A sweep of the run rebuilds the validation rows both ranks scored (it took rank 0's
    # half, 2 of 4 rows a batch), and the checkpoint's fingerprint of them holds.
    import warnings

    from open_mythos.evaluation.runs import run_val_batches

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two, one = run_val_batches(tmp_path), run_val_batches(trainer.out)
    # Each global batch as its two ranks' shards (no more rows per forward than a rank's).
    assert [b["input_ids"].shape[0] for b in two] == [2] * 2 * trainer.cfg.data.eval_batches
    for i, b in enumerate(one):
        shards = two[2 * i:2 * i + 2]
        assert all(torch.equal(torch.cat([s[k] for s in shards]), b[k]) for k in b)


def test_fsdp_trains_and_loads_in_one_process(tmp_path, single):
    trainer, ref_rows = single
    rows = run_two_ranks(tmp_path, "fsdp")
    assert_same_run(rows, ref_rows, 1e-4)
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, cfg = load_checkpoint(tmp_path)  # read whole from the ranks' shards, tie intact
    assert model.head.weight is model.embed.weight
    assert_same_weights(model, trainer.core, 1e-4)
    # The sharded run's optimizer state resumes in a single process.
    resumed = Trainer(tiny_config(tmp_path, run__steps=STEPS + 2, run__seed=1,
                                  data__batch_size=4, schedule__loops="sampled",
                                  schedule__n_loops=2, optim__aux_weight=0.0), resume=True)
    resumed.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, STEPS + 3))


def test_fsdp_bf16_mixed_precision(tmp_path):
    """MixedPrecisionPolicy: bf16 compute, fp32 master weights and checkpoint; resume of a
    sharded FSDP checkpoint on a one-process group."""
    cfg = dict(run__steps=3, run__precision="bf16", run__parallel="fsdp")
    trainer = Trainer(tiny_config(tmp_path, **cfg))
    seen = {}

    def record(module, args, output):
        # fully_shard swaps the class for an FSDP subclass: name the original.
        name = next(c.__name__ for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))
        if isinstance(output, torch.Tensor) and module.training:
            seen.setdefault(name, set()).add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        trainer.train()
    finally:
        handle.remove()
    # Parameters are gathered in bf16, so activations are bf16 from the embedding to the
    # logits; the halting probabilities and norms' statistics are fp32 by design.
    assert seen["OpenMythos"] == {torch.bfloat16}
    assert seen["Embedding"] == seen["RecurrentBlock"] == {torch.bfloat16}
    rows = read_metrics(tmp_path)
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)
    assert {p.dtype for p in trainer.core.parameters()} == {torch.float32}
    model, _ = load_checkpoint(tmp_path)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    Trainer(tiny_config(tmp_path, **{**cfg, "run__steps": 5}), resume=True).train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("parallel, lens", [("ddp", "coda"), ("fsdp", "coda"), ("fsdp", "head")])
def test_loop_supervision_under_data_parallelism_matches_one_process(tmp_path, parallel, lens):
    """Per-loop readout loss with per-loop targets, and the progressive loss (a second forward
    and backward per micro-batch), give the single-process run under DDP and FSDP2."""
    loop_args = ("--set", "optim.loop_loss_weight=0.5", "--set", "optim.loop_targets=true",
                 "--set", f"optim.loop_readout={lens}",
                 "--set", "optim.progressive_weight=0.3", "--set", "model.use_act=false")
    common = ("--task", "multihop", "--steps", "3", "--seed", "1", "--eval-every", "0",
              "--set", "schedule.loops=uniform", "--set", "schedule.min_loops=2",
              "--set", "schedule.max_loops=3", "--set", "optim.aux_weight=0",
              "--set", 'data.task_args={hops=[1,2],ood_hops=[3,4]}', *loop_args)
    run_checked(cli_command(*common, "--batch-size", "4", "--out", str(tmp_path / "one")))
    run_checked(torchrun_command(2, *common, "--batch-size", "2", "--parallel", parallel,
                                 "--out", str(tmp_path / "two")))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "ce", "loop_ce"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-4), key


def _worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the ``agent`` process)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone, or not ours to read
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under process {agent}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank through /proc")
@pytest.mark.parametrize("save_every", [0, 1], ids=["unsaved-step", "saved-step"])
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_saved(tmp_path, save_every):
    """SIGTERM (a scheduler's stop) to rank 1 only: the ranks agree in the step's
    all-reduce, every rank finishes the same step, the step is saved (a collective), and
    the run can resume from it. It used to kill the run unsaved. On a step just saved
    (save_every=1), only rank 0 knew it was saved: rank 1 began another save and the job
    hung until dist_timeout, then said nothing was saved."""
    out = tmp_path / "run"
    err = _signal_rank_after_three_steps(out, 1, signal.SIGTERM, save_every=save_every)
    steps = [r["step"] for r in read_metrics(out)]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 100000
    assert latest_checkpoint(out) == out / "checkpoints" / f"step_{last:08d}"
    assert f"interrupted by SIGTERM after step {last}, saved in" in err, err[-3000:]
    assert "not saved" not in err and "lost its peers" not in err, err[-3000:]
    # (A saved DDP step resumes exactly: test_resume_sigkill.py, test_sharded_checkpoint.py.)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank through /proc")
def test_a_hung_rank_fails_the_run_after_dist_timeout(tmp_path):
    """A rank that hangs (SIGSTOP) rather than dies held the others for torch's default 30
    minutes; ``run.dist_timeout`` bounds the wait: rank 0 fails within seconds."""
    out = tmp_path / "run"
    cmd = torchrun_command(2, "--task", "parity", "--steps", "100000", "--batch-size", "2",
                           "--parallel", "ddp", "--save-every", "0", "--eval-every", "0",
                           "--set", "run.dist_timeout=3", "--out", str(out))
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    hung = None
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        rank0, hung = _worker_of_rank(proc.pid, 0), _worker_of_rank(proc.pid, 1)
        os.kill(hung, signal.SIGSTOP)
        stopped = time.monotonic()
        while Path(f"/proc/{rank0}").exists() and time.monotonic() - stopped < 60:
            time.sleep(0.2)
        waited = time.monotonic() - stopped
    finally:
        if hung is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert waited < 60, "rank 0 still waits for the hung rank after 60 s"
    # One line from the surviving rank, not gloo's traceback.
    assert "openmythos train: error: rank 0 lost its peers in a collective" in err, err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank0]:" not in err, err[-3000:]


def _signal_rank_after_three_steps(out, rank: int, signum: int, save_every: int) -> str:
    """Start a 2-process DDP parity run into ``out``, send ``signum`` to rank ``rank`` once
    three steps are logged, and return the launcher's stderr when it has exited."""
    cmd = torchrun_command(2, "--task", "parity", "--steps", "100000", "--batch-size", "2",
                           "--parallel", "ddp", "--save-every", str(save_every),
                           "--eval-every", "0", "--out", str(out))
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        os.kill(_worker_of_rank(proc.pid, rank), signum)
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank through /proc")
def test_a_killed_rank_leaves_one_line_from_the_survivor(tmp_path):
    """Rank 1 killed (SIGKILL) under DDP: rank 0's collective fails and torchrun sends it
    SIGTERM at once; the line naming the newest checkpoint was printed only after the
    trainer's cleanup, which that SIGTERM usually cut short (0 of 6 runs printed it)."""
    out = tmp_path / "run"
    err = _signal_rank_after_three_steps(out, 1, signal.SIGKILL, save_every=2)
    assert "openmythos train: error: rank 0 lost its peers in a collective" in err, err[-3000:]
    assert f"the newest checkpoint is {out / 'checkpoints'}" in err, err[-3000:]


def test_ranks_given_different_configurations_stop_at_once_naming_the_keys(tmp_path):
    """Each rank parses its own command line: rank 1 with another learning rate trained on
    silently (the DDP replicas drifted apart), with another step count it hung until the
    collective timeout. Now every rank stops before training, naming the keys."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        "from open_mythos.cli import main\n"
        "extra = ['--set', 'optim.lr=0.03', '--steps', '8'] if os.environ['RANK'] == '1' "
        "else []\n"
        "raise SystemExit(main(sys.argv[1:] + extra))\n")
    cmd = torchrun_command(2, "--task", "parity", "--steps", "4", "--batch-size", "2",
                           "--parallel", "ddp", "--out", str(tmp_path / "run"))
    at = cmd.index("-m", cmd.index("--master_port"))
    cmd[at:at + 2] = [str(launcher)]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert ("the processes were given different configurations (every rank must run the same "
            "command with the same files): rank 1 (against rank 0): optim.lr: ") in proc.stderr
    assert "run.steps: 4 -> 8" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_only_a_lost_peer_is_reported_as_one(monkeypatch):
    """A collective failing because a peer went away is one line; this rank's own failure
    inside a collective (out of memory, a misuse) keeps its traceback."""
    import torch.distributed as dist

    from open_mythos.training.distributed import lost_peer

    lost = [RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                         "[127.0.0.1]:46274"),
            RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                         "10000ms for recv operation to complete"),
            dist.DistNetworkError("connection reset")]
    own = [dist.DistBackendError("NCCL error: unhandled cuda error: out of memory"),
           RuntimeError("NCCL error: invalid usage"), RuntimeError("shape mismatch")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [lost_peer(e) for e in lost + own] == [True] * 3 + [False] * 3
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not any(lost_peer(e) for e in lost)
