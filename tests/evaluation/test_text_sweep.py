"""``openmythos sweep`` on a run trained on text: validation loss against loops."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from open_mythos.cli import main
from open_mythos.evaluation.runs import run_val_batches
from open_mythos.evaluation.sweep import depth_checks
from open_mythos.training import Trainer, load_checkpoint, load_config
from open_mythos.training.config import UNSET

from ..training.conftest import TINY


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.txt"
    corpus.write_text("the loop reads its own state and writes the next one. " * 200)
    torch.set_num_threads(1)
    cfg = load_config(TINY, [("data.task", UNSET), ("data.text", [str(corpus)]),
                             ("data.seq_len", 24), ("run.out", str(root / "run")),
                             ("run.steps", 4), ("run.progress", False), ("run.eval_every", 0),
                             ("schedule.n_loops", 2), ("model.use_act", False)])
    Trainer(cfg).train()
    return root / "run"


def test_text_sweep_equals_an_independent_recomputation(text_run, tmp_path, capsys):
    out = tmp_path / "depth.json"
    assert main(["sweep", "--checkpoint", str(text_run), "--loops", "1-3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["n_loops"] for r in rows] == [1, 2, 3]
    model, _ = load_checkpoint(text_run)
    batches = run_val_batches(text_run)
    assert len(batches) == 2  # tiny.toml: eval_batches = 2
    for row in rows:
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                logits = model(b["input_ids"], n_loops=row["n_loops"]).double()
                total += F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(),
                                         ignore_index=-100, reduction="sum").item()
                count += int((b["targets"] != -100).sum())
        assert row["val_loss"] == pytest.approx(total / count, rel=1e-5)
        assert row["tokens"] == count
    captured = capsys.readouterr()
    printed = captured.out
    # Progress as each loop count is done (nothing was printed until the end).
    assert [line.split(":")[0].strip() for line in captured.err.splitlines()
            if "val loss" in line] == ["1 loops", "2 loops", "3 loops"]
    assert "| loops | val loss | perplexity | above best |" in printed
    assert "non-increasing up to T_train=2" in printed


def test_text_report_plots_the_curve_of_the_sweep(text_run, tmp_path, monkeypatch):
    from open_mythos.evaluation import runs

    sweep_out = tmp_path / "depth.json"
    assert main(["sweep", "--checkpoint", str(text_run), "--loops", "1-4", "--out", str(sweep_out)]) == 0
    out = tmp_path / "report"
    built = []
    real = runs.run_val_batches
    monkeypatch.setattr(runs, "run_val_batches", lambda *a, **k: built.append(a) or real(*a, **k))
    assert main(["report", "--run", str(text_run), "--loops", "1-4", "--out", str(out)]) == 0
    assert len(built) == 1  # the sweep and the exit rules read the same batches
    assert json.loads((out / "loss_vs_loops.json").read_text()) == json.loads(sweep_out.read_text())
    assert (out / "loss_vs_loops.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "training_curves.png").is_file()
    md = (out / "report.md").read_text()
    rows = json.loads(sweep_out.read_text())
    best = min(r["val_loss"] for r in rows)
    for r in rows:  # the table carries every loop count and its gap to the best
        gap = 100 * (r["val_loss"] - best) / best
        assert f"| {r['n_loops']} | {r['val_loss']:.4f} | {r['perplexity']:.3f} | {gap:.2f}% |" in md
    assert "![validation loss against loops](loss_vs_loops.png)" in md
    assert "non-increasing up to T_train=2" in md and "at 4x T_train (8 loops)" not in md


def test_depth_checks():
    assert depth_checks({1: 3.0, 2: 2.5, 3: 2.4, 8: 2.41}, 2) == [
        "non-increasing up to T_train=2: yes",
        "at 4x T_train (8 loops): 0.42% above the best loss (target within 1%: yes)"]
    assert depth_checks({1: 2.0, 2: 2.5}, 2)[0].endswith("no")
    assert depth_checks({1: 3.0, 2: 2.0, 8: 2.5}, 2)[1].endswith("no)")
    # Nothing to check is no pass: a single depth at or below T_train (a loss that rose
    # from 1 to 3 loops, 2 never measured), or the 4x depth compared with itself.
    assert depth_checks({1: 3.0, 3: 3.5}, 2) == [
        "non-increasing up to T_train=2: n/a (1 loop count measured at or below 2)"]
    assert depth_checks({8: 2.5}, 2) == [
        "non-increasing up to T_train=2: n/a (0 loop counts measured at or below 2)",
        "at 4x T_train (8 loops): n/a (no other depth measured to compare with)"]


def test_text_runs_refuse_the_options_of_task_sweeps(text_run, tmp_path, capsys):
    """A text run is evaluated by its validation loss: task options are refused, not ignored."""
    for extra, named in ((["--baseline", str(text_run)], "--baseline"),
                         (["--splits", "id"], "--splits"), (["--exit-kl", "0.1"], "--exit-*"),
                         (["--n-examples", "5", "--seed", "3"], "--n-examples, --seed")):
        assert main(["sweep", "--checkpoint", str(text_run), "--out", str(tmp_path / "s.json"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert "is a text run" in err and named in err, err
    assert main(["report", "--run", str(text_run), "--early-exit", "on",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--early-exit" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "r").exists()


def test_a_dense_text_run_has_no_loops_to_sweep(text_run, tmp_path, capsys):
    """A fixed-depth text run was "swept" over 8 loop counts (8 equal losses) and passed the
    depth checks; sweep and report now say it has one depth."""
    from open_mythos.training import TrainConfig

    src = load_config(text_run / "config.toml")
    cfg = load_config(text_run / "config.toml", [("model.core_layers", 2),
                                                 ("run.out", str(tmp_path / "dense"))])
    assert isinstance(cfg, TrainConfig) and src.data.text == cfg.data.text
    Trainer(cfg).train()
    for argv in (["sweep", "--checkpoint", str(tmp_path / "dense"), "--out",
                  str(tmp_path / "d.json")],
                 ["report", "--run", str(tmp_path / "dense"), "--out", str(tmp_path / "r")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "fixed-depth model" in err and "Traceback" not in err


def test_a_corpus_changed_since_training_is_named(tmp_path):
    """The sweep rebuilds the validation batches from the run's data paths; a corpus edited
    after training gave other losses without a word."""
    import warnings

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the loop reads its own state and writes the next one. " * 200)
    cfg = load_config(TINY, [("data.task", UNSET), ("data.text", [str(corpus)]),
                             ("data.seq_len", 24), ("run.out", str(tmp_path / "run")),
                             ("run.steps", 2), ("run.progress", False), ("run.eval_every", 0),
                             ("schedule.n_loops", 2), ("model.use_act", False)])
    Trainer(cfg).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same data: nothing to say
        run_val_batches(tmp_path / "run")
    with open(corpus, "a") as fh:
        fh.write("a new ending that moves the held-out tail. " * 40)
    with pytest.warns(UserWarning, match="not what the trainer evaluated on"):
        run_val_batches(tmp_path / "run")
    # Evaluation needs only the weights: a damaged trainer state skips the check with a
    # warning (the sweep and report refused the checkpoint).
    ckpt = next(p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    (ckpt / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="cannot check that the validation data"):
        assert len(run_val_batches(ckpt)) == cfg.data.eval_batches
    # Given the run directory, the checkpoint the model loads from (its model files are
    # intact) is the one checked (it was passed over as damaged, the check silently skipped).
    with pytest.warns(UserWarning, match="cannot check that the validation data"):
        run_val_batches(tmp_path / "run")


def test_a_multi_process_run_is_evaluated_on_every_process_rows(text_run, tmp_path):
    """A run of 2 processes evaluated 2 shards of each validation batch; the sweep scored
    rank 0's only. Its checkpoint's world size now says how many, and the fingerprint
    written by the first version (one process's rows) is still accepted."""
    import shutil
    import warnings

    from open_mythos.training.checkpoint import read_trainer_state

    src = next(p for p in (text_run / "checkpoints").iterdir() if p.is_dir())
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    one = run_val_batches(ckpt)
    state = read_trainer_state(ckpt)
    torch.save({**state, "world_size": 2}, ckpt / "trainer_state.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint of one process's rows: accepted
        two = run_val_batches(ckpt)
    # Packed text: global batch i of 2 shards holds the windows of one process's batches
    # 2i and 2i + 1, so the two processes' rows extend the one process's.
    assert len(two) == 2 * len(one)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, two))
