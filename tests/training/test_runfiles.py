"""A run directory that can be handed on (#15 item 1): the tokenizer copied in, local paths
absolute, the trained depth recorded, and ``--resume`` with only ``--out``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from open_mythos.checkpoints import load_model, read_config
from open_mythos.cli import main
from open_mythos.integrations.convert import find_tokenizer_dir, resolve_tokenizer
from open_mythos.training import ScheduleConfig
from open_mythos.training.config import tomllib

from .conftest import TINY, read_metrics

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 40


def _hf_byte_tokenizer(path: Path) -> Path:
    from open_mythos.integrations.hf import byte_tokenizer_for_transformers

    byte_tokenizer_for_transformers().save_pretrained(str(path))
    return path


@pytest.fixture
def text_run(tmp_path, monkeypatch) -> Path:
    """A 4-step text run launched from ``tmp_path/launch`` with *relative* paths to its
    text file and tokenizer directory, at 2 loops (the model has 4)."""
    launch = tmp_path / "launch"
    (launch / "data").mkdir(parents=True)
    (launch / "data" / "corpus.txt").write_text(TEXT)
    _hf_byte_tokenizer(launch / "tok")
    monkeypatch.chdir(launch)
    code = main(["train", "--config", str(TINY), "--text", "data/corpus.txt", "--tokenizer",
                 "tok", "--out", "run", "--steps", "4", "--save-every", "2", "--n-loops", "2",
                 "--eval-every", "0", "--no-progress"])
    assert code == 0
    monkeypatch.chdir(tmp_path)
    return launch / "run"


def test_config_toml_stores_absolute_paths(text_run):
    data = tomllib.loads((text_run / "config.toml").read_text())["data"]
    launch = text_run.parent
    assert data["text"] == [str(launch / "data" / "corpus.txt")]
    assert data["tokenizer"] == str(launch / "tok")


def test_the_tokenizer_is_copied_into_the_run_and_used_when_the_original_is_gone(text_run):
    launch = text_run.parent
    originals = sorted(p.name for p in (launch / "tok").iterdir())
    copied = text_run / "tokenizer"
    assert sorted(p.name for p in copied.iterdir()) == originals
    for name in originals:
        assert (copied / name).read_bytes() == (launch / "tok" / name).read_bytes()
    shutil.rmtree(launch / "tok")
    loaded = load_model(text_run)
    assert find_tokenizer_dir(loaded.path) == copied
    tok = resolve_tokenizer(loaded)
    assert tok.encode("cat") == list(b"cat")


def test_the_byte_tokenizer_of_a_run_is_written_too(tmp_path):
    code = main(["train", "--config", str(TINY), "--text",
                 str(_write(tmp_path / "c.txt")), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--eval-every", "0", "--no-progress"])
    assert code == 0
    assert (tmp_path / "run" / "tokenizer" / "byte_tokenizer.json").is_file()
    assert find_tokenizer_dir(load_model(tmp_path / "run").path) == tmp_path / "run" / "tokenizer"


def _write(path: Path) -> Path:
    path.write_text(TEXT)
    return path


def test_the_trained_depth_is_the_loaded_default(text_run):
    loaded = load_model(text_run)
    assert loaded.cfg.max_loop_iters == 4
    assert loaded.n_loops == 2
    assert read_config(text_run) == (loaded.cfg, 2)


@pytest.mark.parametrize("mode, expected", [("fixed", 3), ("sampled", 3), ("curriculum", 6),
                                            ("uniform", 6)])
def test_trained_depth_per_loop_schedule(mode, expected):
    schedule = ScheduleConfig(loops=mode, n_loops=3, min_loops=1, max_loops=6)
    assert schedule.trained_depth == expected


def test_resume_with_only_out_continues_with_the_runs_own_config(text_run, tmp_path, capsys):
    # From another working directory, no --config, no data flags: the run's config.toml
    # (dim 32, its text, its tokenizer) is used; only --steps changes, and that is said.
    capsys.readouterr()
    code = main(["train", "--out", str(text_run), "--resume", "--steps", "6", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"resuming with {text_run}/config.toml, overridden: run.steps: 4 -> 6" in err
    assert [r["step"] for r in read_metrics(text_run)] == [1, 2, 3, 4, 5, 6]
    cfg = tomllib.loads((text_run / "config.toml").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["run"]["steps"] == 6


def test_resume_without_overrides_says_so_and_a_changed_model_is_still_refused(text_run, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(text_run), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"resuming with {text_run}/config.toml\n" in err and "overridden" not in err
    code = main(["train", "--out", str(text_run), "--resume", "--set", "model.dim=64",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "dim: 32 -> 64" in err


def test_resume_uses_the_runs_tokenizer_copy_when_the_original_moved(text_run, capsys):
    shutil.rmtree(text_run.parent / "tok")
    assert main(["train", "--out", str(text_run), "--resume", "--steps", "5",
                 "--no-progress"]) == 0
    assert read_metrics(text_run)[-1]["step"] == 5


def test_sweep_and_report_of_a_text_run_from_elsewhere_after_its_tokenizer_moved(
        text_run, tmp_path, capsys):
    shutil.rmtree(text_run.parent / "tok")
    out = tmp_path / "depth.json"
    assert main(["sweep", "--checkpoint", str(text_run), "--loops", "1-2", "--out", str(out)]) == 0
    assert [r["n_loops"] for r in json.loads(out.read_text())] == [1, 2]
    assert "non-increasing up to T_train=2" in capsys.readouterr().out  # the trained depth
    assert main(["report", "--run", str(text_run), "--loops", "1-2",
                 "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "loss_vs_loops.png").is_file()


def test_absolute_paths_touches_local_paths_only(tmp_path, monkeypatch):
    from open_mythos.training import load_config
    from open_mythos.training.runfiles import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.jsonl").write_text("{}\n")
    (tmp_path / "tok").mkdir()
    cfg = absolute_paths(load_config(None, [("data.hf_dataset", "local.jsonl"),
                                            ("data.tokenizer", "tok"),
                                            ("run.init_from", "runs/stage1")]))
    assert cfg.data.hf_dataset == str(tmp_path / "local.jsonl")
    assert cfg.data.tokenizer == str(tmp_path / "tok")
    assert cfg.run.init_from == str(tmp_path / "runs" / "stage1")  # need not exist yet
    hub = absolute_paths(load_config(None, [("data.hf_dataset", "roneneldan/TinyStories"),
                                            ("data.prepared", None)]))
    assert hub.data.hf_dataset == "roneneldan/TinyStories" and hub.data.tokenizer == "byte"
    prepared = absolute_paths(load_config(None, [("data.prepared", "shards")]))
    assert prepared.data.prepared == str(tmp_path / "shards")


def test_copy_tokenizer_skips_task_runs_and_non_local_tokenizers(tmp_path):
    from open_mythos.training import load_config
    from open_mythos.training.runfiles import copy_tokenizer

    task = load_config(TINY)
    hub = load_config(None, [("data.tokenizer", "gpt2")])
    assert copy_tokenizer(task, tmp_path) is None and copy_tokenizer(hub, tmp_path) is None
    assert not (tmp_path / "tokenizer").exists()


def test_resume_of_a_run_named_with_a_quoted_home_directory(tmp_path, monkeypatch, capsys):
    """``--out "~/run"`` (the shell leaves a quoted ~): the run was written under the home
    directory, but ``--resume`` without ``--config`` looked for its config.toml under a
    folder named ``~`` and refused the checkpoint as a changed model."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(TINY), "--no-progress", "--steps", "2",
                 "--out", "~/run"]) == 0
    assert main(["train", "--no-progress", "--steps", "3", "--out", "~/run", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "home" / "run")] == [1, 2, 3]
    assert not (tmp_path / "~").exists()
