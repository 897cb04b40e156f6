"""Every command that runs a run defaults to the depth it trained at (#15 item 4), and
``openmythos info RUN`` says what a run is (#15 item 7)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from open_mythos import ByteTokenizer
from open_mythos.checkpoints import load_model
from open_mythos.cli import main
from open_mythos.inference import generate
from open_mythos.variants import count_parameters
from tests.integrations.conftest import byte_model
from tests.integrations.test_export import write_run

TRAINED = 3
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = byte_model("gqa")
    assert model.cfg.max_loop_iters == 4 != TRAINED
    run_dir = write_run(tmp_path_factory.mktemp("depth") / "run", model)
    # A metrics log as the trainer writes it; the checkpoint is step 7, so the validation
    # at step 8 (logged by a run killed before saving it) is not the checkpoint's.
    rows = [{"step": 5, "loss": 2.5, "val_loss": 2.25}, {"step": 6, "loss": 2.4},
            {"step": 8, "loss": 2.3, "val_loss": 2.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir, model


def test_generate_defaults_to_the_trained_depth(run, capsys):
    run_dir, model = run
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the", "--greedy",
                 "--max-new-tokens", "6", "--no-echo", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    ids = torch.tensor([TOK.encode("the")])
    ref = generate(model, ids, 6, n_loops=TRAINED, do_sample=False)[0, ids.shape[1]:]
    assert captured.out.rstrip("\n") == TOK.decode(ref.tolist())
    assert f"{TRAINED} loops" in captured.err


def test_lm_eval_and_serve_loader_default_to_the_trained_depth(run):
    pytest.importorskip("lm_eval")
    from open_mythos.integrations.lm_eval import OpenMythosLM

    run_dir, _ = run
    assert OpenMythosLM(pretrained=str(run_dir)).n_loops == TRAINED
    assert load_model(run_dir).n_loops == TRAINED  # what `serve` passes as its default


def test_info_on_a_run(run, capsys):
    run_dir, model = run
    assert main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    total = count_parameters(model).total
    assert info["n_loops"] == TRAINED
    assert info["cache_layers"] == model.cfg.prelude_layers + TRAINED + model.cfg.coda_layers
    r = info["run"]
    assert (r["step"], r["val_step"], r["val_loss"]) == (7, 5, 2.25)
    assert r["tokenizer"] == str(run_dir / "tokenizer") and r["tokenizer_vocab_size"] == 259
    assert r["trained_depth"] == TRAINED and r["vocab_size"] == model.cfg.vocab_size
    # The checkpoint stores every parameter once in float32 (the tied head once) plus the
    # buffers that are saved; its bytes are at least the parameters'.
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values()) \
        - model.head.weight.numel() * 4
    assert r["param_bytes"] == {"stored": stored, "fp32": 4 * total, "bf16": 2 * total}
    assert r["stored_dtype"] == "F32"

    assert main(["info", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "step 7, validation loss 2.2500 (step 5)" in text
    assert f"trained at {TRAINED} loops" in text and "259 ids" in text
    assert main(["info", str(run_dir), "--n-loops", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_loops"] == 4


def test_info_without_tokenizer_or_metrics_says_so(run, tmp_path, capsys):
    run_dir, _ = run
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "checkpoints", bare / "checkpoints")
    (bare / "latest").write_text((run_dir / "latest").read_text())
    assert main(["info", str(bare)]) == 0
    text = capsys.readouterr().out
    assert "no validation loss logged" in text
    assert "byte (259 ids" in text  # a byte-vocabulary model without its files: the byte one


def test_info_on_an_export_names_its_depth_as_the_exports(run, tmp_path, capsys):
    """An export's n_loops is what export was given; info called it the trained depth. The
    export records the trained depth apart (``trained_depth``), which info reads; an export
    older than that key names only its default."""
    pytest.importorskip("transformers")
    run_dir, _ = run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf"), "--n-loops", "5"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf")]) == 0
    text = capsys.readouterr().out
    assert f"trained at {TRAINED} loops; n_loops 5 by default (set at export)" in text
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["run"]
    assert (r["trained_depth"], r["default_n_loops"], r["trained_depth_recorded"]) == (
        TRAINED, 5, True)
    # A plain export records its depth: said as known, not as "unless --n-loops".
    assert main(["export", str(run_dir), "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "plain")]) == 0
    assert f"trained at {TRAINED} loops (the default n_loops)" in capsys.readouterr().out
    config = tmp_path / "hf" / "config.json"
    data = json.loads(config.read_text())
    del data["trained_depth"]
    config.write_text(json.dumps(data))
    assert main(["info", str(tmp_path / "hf")]) == 0
    text = capsys.readouterr().out
    assert "n_loops 5 by default (set at export" in text and "trained at" not in text
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["trained_depth_recorded"] is False


def test_an_export_converted_back_records_the_trained_depth(run, tmp_path, capsys):
    """hf_to_training of an export given another ``--n-loops`` recorded that default as
    the depth trained at; so did every later export of the copy."""
    pytest.importorskip("transformers")
    from open_mythos.checkpoints import read_training_depth
    from open_mythos.integrations.convert import hf_to_training
    from open_mythos.integrations.hf import OpenMythosForCausalLM

    run_dir, model = run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf"), "--n-loops", "5"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export records its depth: nothing to say
        back = hf_to_training(tmp_path / "hf", tmp_path / "back")
    assert read_training_depth(back) == load_model(back).n_loops == TRAINED
    # An export older than trained_depth: its default n_loops is all there is, said so.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "hf", old)
    data = json.loads((old / "config.json").read_text())
    del data["trained_depth"]
    (old / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="records no trained_depth.*n_loops \\(5\\)"):
        hf_to_training(old, tmp_path / "old_back")
    assert main(["export", str(back), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["trained_depth"] == TRAINED
    # An HF directory that records its trained depth but no default n_loops (from_mythos
    # without one) runs max_loop_iters by default; info said "n_loops None by default".
    OpenMythosForCausalLM.from_mythos(model, trained_depth=TRAINED).save_pretrained(tmp_path / "td")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "td")]) == 0
    assert (f"trained at {TRAINED} loops; no n_loops set, so max_loop_iters "
            f"({model.cfg.max_loop_iters}) by default") in capsys.readouterr().out
