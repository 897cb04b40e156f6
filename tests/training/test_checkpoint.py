"""Checkpoints: weights in safetensors with the tie restored, atomic writes, pointers."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from open_mythos.training import Trainer, latest_checkpoint, load_checkpoint
from open_mythos.training import checkpoint as ckpt_mod

from .conftest import tiny_config


@pytest.fixture
def trained(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", run__steps=4, run__save_every=2,
                                  run__keep_checkpoints=0))
    trainer.train()
    return trainer


def test_weights_round_trip_with_tie(trained):
    run = trained.out
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000004"
    assert (run / "latest").read_text().strip() == "checkpoints/step_00000004"
    with safe_open(str(latest_checkpoint(run) / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "embed.weight" in keys and "head.weight" not in keys  # the tied weight, once
    assert "recurrent.block.ffn.router_bias" in keys  # balancing state is saved too

    model, cfg = load_checkpoint(run)
    assert cfg == trained.model_cfg and not model.training
    assert model.head.weight is model.embed.weight
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    trained.core.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, n_loops=3), trained.core(x, n_loops=3), rtol=0, atol=0)
    older, _ = load_checkpoint(run / "checkpoints" / "step_00000002")
    assert not torch.equal(older.embed.weight, model.embed.weight)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(run / "checkpoints")


def test_crash_mid_write_keeps_previous_checkpoint(trained, monkeypatch):
    run = trained.out
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if str(path).endswith(ckpt_mod.OPTIMIZER_FILE):
            with open(path, "r+b") as fh:  # a torn file, then the "crash"
                fh.truncate(10)
            raise OSError("simulated crash while writing the optimizer state")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    trained.state.step = 5
    with pytest.raises(OSError, match="simulated crash"):
        trained.save()
    monkeypatch.undo()

    ckpts = run / "checkpoints"
    assert latest_checkpoint(run) == ckpts / "step_00000004"
    assert not (ckpts / "step_00000005").exists()
    # The failed save removed its torn staging directory (a killed one: the next run does).
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    model, _ = load_checkpoint(run)  # still loads, from step 4
    assert model.head.weight is model.embed.weight
    trained.save()
    assert latest_checkpoint(run) == ckpts / "step_00000005"
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())


def test_latest_pointer_fallback_and_pruning(trained):
    run = trained.out
    (run / "latest").write_text("checkpoints/step_00000099\n")  # dangling
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000004"
    (run / "latest").unlink()
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000004"
    trained.cfg.run.keep_checkpoints = 1
    trained.state.step = 6
    trained.save()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006"]
