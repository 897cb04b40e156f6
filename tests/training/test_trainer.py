"""The training loop in process: metrics, exact resume, accumulation, non-finite steps."""

from __future__ import annotations

import shutil

import pytest
import torch

from open_mythos.cli import main
from open_mythos.training import ConfigError, LoopSchedule, Trainer, TrainingDiverged
from open_mythos.training import trainer as trainer_mod
from open_mythos.training.trainer import build_optimizer

from .conftest import TINY, read_metrics, tiny_config

REQUIRED = {"step", "loss", "lr", "tokens_per_s", "ponder", "loops",
            "expert_load_max_over_mean", "grad_norm"}


def losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir)]


def test_short_run_writes_metrics_config_and_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", run__steps=6, run__eval_every=3,
                      schedule__loops="sampled", schedule__n_loops=2)
    state = Trainer(cfg).train()
    rows = read_metrics(tmp_path / "run")
    assert state.step == 6 and [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        assert REQUIRED <= set(row) and not row["skipped"]
        assert row["loss"] > 0 and row["grad_norm"] > 0 and row["tokens_per_s"] > 0
        assert 1 <= row["loops"] <= 4 and row["expert_load_max_over_mean"] >= 1.0
    sampler = LoopSchedule.from_config(cfg.schedule, cfg.run.steps, cfg.run.seed)
    assert [r["loops"] for r in rows] == [sampler(s) for s in range(6)]
    assert "val_loss" in rows[2] and "val_loss" in rows[5] and "val_loss" not in rows[0]
    assert (tmp_path / "run" / "config.toml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors").is_file()


def test_resume_in_process_is_exact(tmp_path):
    common = dict(schedule__loops="sampled", schedule__decay_steps=8, schedule__warmup_steps=2,
                  optim__grad_accum=2, run__save_every=4, optim__aux_weight=0.01,
                  optim__ponder_weight=0.01)
    full = Trainer(tiny_config(tmp_path / "full", run__steps=8, **common))
    full.train()
    Trainer(tiny_config(tmp_path / "part", run__steps=5, **common)).train()
    # Resume from the step-4 checkpoint (the step-5 rows are dropped and redone).
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000005")
    (tmp_path / "part" / "latest").unlink()
    resumed = Trainer(tiny_config(tmp_path / "part", run__steps=8, **common), resume=True)
    resumed.train()
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    for a, b in zip(full.core.state_dict().values(), resumed.core.state_dict().values()):
        assert torch.equal(a, b)


def test_existing_run_needs_resume_and_same_model(tmp_path):
    Trainer(tiny_config(tmp_path / "run", run__steps=2)).train()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(tmp_path / "run", run__steps=4)).train()
    config_before = (tmp_path / "run" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="dim: 32 -> 64"):
        Trainer(tiny_config(tmp_path / "run", run__steps=4, model__dim=64), resume=True).train()
    assert (tmp_path / "run" / "config.toml").read_text() == config_before  # untouched
    Trainer(tiny_config(tmp_path / "run", run__steps=3), resume=True).train()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    # No balance loss: it is a product of batch means, computed per micro-batch.
    big = tiny_config(tmp_path / "big", run__steps=4, data__batch_size=4, optim__aux_weight=0.0)
    acc = tiny_config(tmp_path / "acc", run__steps=4, data__batch_size=2, optim__grad_accum=2,
                      optim__aux_weight=0.0)
    Trainer(big).train()
    Trainer(acc).train()
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    def hook(step, loss):
        return loss * float("nan") if step == 2 else loss

    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=5), loss_hook=hook)
    state = trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] is None and rows[2]["bad_steps"] == 1 and rows[4]["bad_steps"] == 1
    assert state.bad_steps == 1 and state.consecutive_bad == 0
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {4}  # five steps, one never applied
    assert all(torch.isfinite(p).all() for p in trainer.core.parameters())


def test_too_many_bad_steps_stop_the_run(tmp_path):
    def hook(step, loss):
        return loss + float("inf") if step >= 1 else loss

    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        Trainer(tiny_config(tmp_path / "run", run__steps=10, run__max_bad_steps=3),
                loss_hook=hook).train()
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, True, True, True]


def test_cli_exit_status_when_diverging(tmp_path, monkeypatch, capsys):
    real = trainer_mod.compute_loss

    def nan_loss(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.objective = parts.objective * float("nan")
        return parts

    monkeypatch.setattr(trainer_mod, "compute_loss", nan_loss)
    code = main(["train", "--config", str(TINY), "--out", str(tmp_path / "run"), "--steps", "5",
                 "--max-bad-steps", "2", "--no-progress"])
    assert code == 1
    assert "diverged" in capsys.readouterr().err


def test_gradient_checkpointing_and_truncated_backprop(tmp_path):
    plain = tiny_config(tmp_path / "a", run__steps=3)
    ckpt = tiny_config(tmp_path / "b", run__steps=3, run__gradient_checkpointing=True)
    Trainer(plain).train()
    Trainer(ckpt).train()
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)
    trunc = tiny_config(tmp_path / "c", run__steps=3, schedule__n_loops=3,
                        schedule__backprop_loops=1)
    Trainer(trunc).train()
    rows = read_metrics(tmp_path / "c")
    assert all(r["loss"] is not None for r in rows)
    assert rows[0]["loss"] != pytest.approx(losses(tmp_path / "a")[0])  # 3 loops, not 2


def test_bf16_autocast_and_tensorboard(tmp_path):
    cfg = tiny_config(tmp_path / "run", run__steps=3, run__precision="bf16",
                      run__tensorboard=True, run__log_every=1)
    trainer = Trainer(cfg)
    trainer.train()
    assert all(r["loss"] is not None for r in read_metrics(tmp_path / "run"))
    assert trainer.core.embed.weight.dtype == torch.float32  # master weights stay fp32
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.distributed
def test_fsdp_on_one_process_matches_plain(tmp_path):
    """The FSDP2 code path (a one-process gloo group) agrees with plain training."""
    Trainer(tiny_config(tmp_path / "plain", run__steps=3)).train()
    Trainer(tiny_config(tmp_path / "fsdp", run__steps=3, run__parallel="fsdp")).train()
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    assert not torch.distributed.is_initialized()


def test_weight_decay_groups():
    from open_mythos import OpenMythos
    from tests.conftest import tiny_config as model_config

    model = OpenMythos(model_config())
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in exempt  # and so the tied head
    assert {"recurrent.lora.scale.weight", "norm.weight", "recurrent.act.halt.bias",
            "recurrent.injection.log_A"} <= exempt
    assert {"recurrent.block.ffn.w_gate_up", "prelude.0.attn.wq.weight"} <= decayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_dense_baseline_trains_from_the_same_config(tmp_path):
    """``model.core_layers`` selects the FLOPs-matched non-looped baseline."""
    from open_mythos.baseline import DenseBaseline
    from open_mythos.training import load_checkpoint

    cfg = tiny_config(tmp_path / "base", run__steps=6, model__core_layers=3)
    Trainer(cfg).train()
    rows = read_metrics(tmp_path / "base")
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    model, model_cfg = load_checkpoint(tmp_path / "base")
    assert isinstance(model, DenseBaseline) and model_cfg.core_layers == 3
    assert model.head.weight is model.embed.weight
