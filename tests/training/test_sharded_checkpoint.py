"""Sharded checkpoints of FSDP2 runs (#14 item 5): every rank writes its own shard with
torch.distributed.checkpoint, the manifest covers the shards, a checkpoint resumes at another
world size (2 -> 1 and 1 -> 2 under gloo) with the uninterrupted run's losses, and
``load_model`` reads it whole in one process.

The runs use ``configs/tiny.toml`` at ``model.dim=128``: DCP stores each tensor as its own
``torch.save`` record (about 1.5 KB of framing), which at dim 32 outweighs the data itself
and would hide whether a file holds half the state or all of it. ``optim.aux_weight=0``:
the balance loss is a per-process product of means, so it depends on the world size by
design. ``model.embed_init_std=0.02`` keeps the loss near 5, where fp32 resolves 1e-6.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from open_mythos.checkpoints import CheckpointCorrupt, load_model
from open_mythos.training import Trainer, TrainingDiverged
from open_mythos.training import sharded as sharded_mod

from .conftest import read_metrics, run_checked, tiny_config, torchrun_command
from .test_run_safety import ckpt_dir, flip_bytes, one_line_error, train_cli

STEPS, SAVE_EVERY, SEED = 6, 3, 1
SETTINGS = {"model.dim": 128, "optim.aux_weight": 0.0, "model.embed_init_std": 0.02}
TOL = 1e-6  # the target of #14: fp32 losses on CPU


def cli_args(out, batch_size: int, *extra: str) -> list[str]:
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    return ["--task", "parity", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--seed", str(SEED), "--eval-every", "0", "--batch-size", str(batch_size),
            "--parallel", "fsdp", "--out", str(out), *sets, *extra]


def one_process_config(out, parallel: str, **overrides):
    """The run of :func:`cli_args` in this process at batch 4 (the 2 x 2 global batch)."""
    settings = {k.replace(".", "__"): v for k, v in SETTINGS.items()}
    return tiny_config(out, run__steps=STEPS, run__save_every=SAVE_EVERY, run__seed=SEED,
                       data__batch_size=4, run__parallel=parallel, **settings, **overrides)


def back_to_step_3(src, dst):
    """A copy of run ``src`` whose newest checkpoint is step 3 (a run killed before step 6
    was saved: its rows for steps 4-6 are set aside by the resume)."""
    shutil.copytree(src, dst)
    shutil.rmtree(ckpt_dir(dst, 6))
    return dst


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


def max_loss_difference(resumed, uninterrupted) -> float:
    rows, ref = read_metrics(resumed), read_metrics(uninterrupted)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert rows[:3] == ref[:3]  # kept byte for byte
    # The resume really started at step 3: the first run's rows 4-6 were set aside.
    replaced = [json.loads(x) for x in (resumed / "metrics.replaced.jsonl").read_text().splitlines()]
    assert [r["step"] for r in replaced] == [4, 5, 6]
    return max(abs(a - b) for a, b in zip(losses(resumed), losses(uninterrupted)))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks x batch 2 under FSDP2, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    run_checked(torchrun_command(2, *cli_args(out, 2)))
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """1 rank x batch 4 under FSDP2 (a one-process group), checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    torch.set_num_threads(1)
    Trainer(one_process_config(out, "fsdp")).train()
    return out


# Layout -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_each_rank_writes_its_shard_and_no_file_holds_half_the_state(two_ranks):
    ckpt = ckpt_dir(two_ranks, 3)
    files = {p.relative_to(ckpt).as_posix(): p.stat().st_size
             for p in ckpt.rglob("*") if p.is_file()}
    assert "model.safetensors" not in files and "optimizer.pt" not in files
    model = load_model(ckpt).model
    n_params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    weights = 4 * n_params
    full_state = 3 * weights  # fp32 weights and AdamW's two moments
    # Each rank wrote its own half of the weights (nothing was gathered to rank 0) ...
    for rank in (0, 1):
        assert 0.45 * weights < files[f"model.dcp/__{rank}_0.distcp"] < 0.6 * weights
        assert f"optimizer.dcp/__{rank}_0.distcp" in files
    # ... and no file of the checkpoint holds half of the full state.
    largest = max(files.values())
    print(f"largest file / full state = {largest / full_state:.3f} "
          f"({largest} of {full_state} bytes)")
    assert largest <= full_state / 2
    # The manifest covers every file, the shards included.
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_load_model_reads_a_sharded_checkpoint_whole(two_ranks, tmp_path):
    loaded = load_model(two_ranks)
    assert loaded.path == ckpt_dir(two_ranks, 6) and loaded.cfg.dim == 128
    assert loaded.model.head.weight is loaded.model.embed.weight
    # Reference: PyTorch's own converter of a DCP directory to one torch.save file.
    dcp_to_torch_save(ckpt_dir(two_ranks, 6) / "model.dcp", tmp_path / "full.pt")
    reference = torch.load(tmp_path / "full.pt", weights_only=True)
    state = loaded.model.state_dict()
    assert set(state) - set(reference) == {"head.weight"}
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_shard_is_named_and_the_previous_checkpoint_loads(two_ranks, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    shard = ckpt_dir(run, 6) / "model.dcp" / "__1_0.distcp"
    flip_bytes(shard)
    with pytest.raises(CheckpointCorrupt, match="__1_0.distcp"):
        load_model(ckpt_dir(run, 6))
    with caplog.at_level(logging.WARNING, logger="open_mythos.checkpoints"):
        assert load_model(run).path == ckpt_dir(run, 3)
    assert str(shard) in caplog.text


# Resharding ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp", "ddp", "none"])
def test_resume_two_ranks_on_one(two_ranks, tmp_path, parallel, capsys):
    """2 -> 1: under FSDP2 and DDP on a one-process group, and in a plain process (no
    group); the log says the random streams were reseeded."""
    run = back_to_step_3(two_ranks, tmp_path / "run")
    Trainer(one_process_config(run, parallel), resume=True).train()
    assert "written by 2 process(es), resumed on 1: the random streams are reseeded" \
        in capsys.readouterr().err
    diff = max_loss_difference(run, two_ranks)
    print(f"2 -> 1 ({parallel}): max |loss difference| {diff:.3g}")
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_one_rank_on_two(one_rank, tmp_path):
    run = back_to_step_3(one_rank, tmp_path / "run")
    run_checked(torchrun_command(2, *cli_args(run, 2, "--resume")))
    diff = max_loss_difference(run, one_rank)
    print(f"1 -> 2: max |loss difference| {diff:.3g}")
    assert diff <= TOL
    assert (ckpt_dir(run, 6) / "model.dcp" / "__1_0.distcp").is_file()  # written by 2 ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_resume_at_the_same_world_size_is_exact(one_rank, tmp_path):
    run = back_to_step_3(one_rank, tmp_path / "run")
    Trainer(one_process_config(run, "fsdp"), resume=True).train()
    assert losses(run) == losses(one_rank)
    resumed, uninterrupted = load_model(run).model, load_model(one_rank).model
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_gathered_checkpoint_resumes_under_fsdp_and_the_layouts_mix(tmp_path):
    """A checkpoint written gathered (one process, DDP, or FSDP2 before sharding) resumes
    under FSDP2; the run then holds both layouts and each loads."""
    torch.set_num_threads(1)
    ref, run = tmp_path / "ref", tmp_path / "run"
    Trainer(tiny_config(ref, run__steps=5, run__save_every=3)).train()
    Trainer(tiny_config(run, run__steps=3)).train()
    assert (ckpt_dir(run, 3) / "model.safetensors").is_file()
    Trainer(tiny_config(run, run__steps=5, run__save_every=3, run__parallel="fsdp"),
            resume=True).train()
    assert losses(run) == pytest.approx(losses(ref), abs=TOL, rel=0)
    assert (ckpt_dir(run, 5) / "model.dcp" / ".metadata").is_file()
    for step in (3, 5):
        a, b = load_model(ckpt_dir(run, step)).model, load_model(ckpt_dir(ref, step)).model
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


# Failures -----------------------------------------------------------------------------------


def test_non_finite_weights_write_no_sharded_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", run__steps=1, run__parallel="fsdp")
    trainer = Trainer(cfg, on_step=lambda step, row: poison(trainer))  # a finite loss, then
    with pytest.raises(TrainingDiverged, match="no longer finite.*hold NaN or inf"):  # NaN weights to save
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_while_writing_shards_is_one_line(tmp_path, capsys, monkeypatch):
    real = sharded_mod.dcp.FileSystemWriter

    class FullDisk(real):
        def write_data(self, plan, planner):
            if "step_00000004" in str(self.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write_data(plan, planner)

    monkeypatch.setattr(sharded_mod.dcp, "FileSystemWriter", FullDisk)
    run = tmp_path / "run"
    assert train_cli(run, "--steps", "4", "--save-every", "2", "--parallel", "fsdp") == 3
    one_line_error(capsys, 3, "No space left on device", str(run / "checkpoints"))
    assert load_model(run).path == ckpt_dir(run, 2) and not ckpt_dir(run, 4).exists()


def poison(trainer) -> None:
    """Make one weight NaN (what a diverged update leaves)."""
    with torch.no_grad():
        next(trainer.core.parameters()).fill_(float("nan"))
