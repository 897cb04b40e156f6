"""``openmythos export`` (#15 item 2): an HF directory that ships its modeling code, loads
where this package is not installed, pads left, knows its length and its trained depth."""

from __future__ import annotations

import ast
import json
import logging
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from open_mythos import ByteTokenizer  # noqa: E402
from open_mythos.checkpoints import HF_MODEL_TYPE, load_model  # noqa: E402
from open_mythos.cli import main  # noqa: E402
from open_mythos.integrations import hf as hf_mod  # noqa: E402
from open_mythos.integrations.remote_code import modeling_sources  # noqa: E402
from open_mythos.training.checkpoint import (  # noqa: E402
    TrainingCheckpoint,
    gather_model_state,
    save_checkpoint,
    tied_parameters,
)
from tests.integrations.conftest import byte_model  # noqa: E402

TRAINED = 3  # the depth the test run "trained" at; its model has max_loop_iters 4


def write_run(run_dir: Path, model, n_loops: int = TRAINED) -> Path:
    """A run directory holding ``model`` as its checkpoint, trained (per its schedule) at
    ``n_loops``, with the byte tokenizer copied in as the trainer does."""
    tied = tied_parameters(model)
    toml = f'[data]\ntokenizer = "byte"\n\n[schedule]\nloops = "fixed"\nn_loops = {n_loops}\n'
    save_checkpoint(run_dir, TrainingCheckpoint(
        step=7, model_state=gather_model_state(model, tied), model_config=model.cfg,
        train_config_toml=toml, optimizer_state={}, trainer_state={}), tied)
    ByteTokenizer().save_pretrained(run_dir / "tokenizer")
    return run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("export")
    model = byte_model("gqa")
    assert model.cfg.max_loop_iters != TRAINED
    run = write_run(root / "run", model)
    assert main(["export", str(run), "--format", "hf", "--out", str(root / "hf")]) == 0
    return run, root / "hf", model


def test_config_has_auto_map_trained_depth_and_the_code_is_shipped(exported):
    _, out, _ = exported
    config = json.loads((out / "config.json").read_text())
    assert config["n_loops"] == TRAINED
    assert config["auto_map"] == {
        "AutoConfig": "modeling_openmythos.OpenMythosHFConfig",
        "AutoModelForCausalLM": "modeling_openmythos.OpenMythosForCausalLM"}
    shipped = {p.name for p in out.glob("*.py")}
    assert shipped == set(modeling_sources())
    for name in shipped:  # every import of this package became a flat relative one
        for node in ast.walk(ast.parse((out / name).read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("open_mythos")
                if node.level == 1:
                    assert all(f"{m}.py" in shipped for m in
                               ([node.module] if node.module else [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("open_mythos") for a in node.names)


def test_tokenizer_pads_left_and_knows_max_seq_len(exported):
    from transformers import AutoTokenizer

    _, out, model = exported
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert tok.padding_side == "left" and tok.model_max_length == model.cfg.max_seq_len
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0] == [256, 256, 97] and batch["attention_mask"][0] == [0, 0, 1]


def test_native_load_defaults_to_the_trained_depth(exported):
    from transformers import AutoModelForCausalLM

    _, out, model = exported
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(hf) is hf_mod.OpenMythosForCausalLM  # the registered class, not the shipped one
    ids = torch.tensor([ByteTokenizer().encode("the cat")])
    with torch.no_grad():
        ref = model(ids, n_loops=TRAINED)
        other = model(ids, n_loops=model.cfg.max_loop_iters)
        got = hf(ids).logits
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, other)  # the default depth is visible in the output
    assert load_model(out).n_loops == TRAINED


def test_hf_generate_logs_no_deprecation_warning(exported, caplog):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    _, out, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            hf.generate(torch.tensor([[97, 98]]), max_new_tokens=3, do_sample=False)
            hf.generate(torch.tensor([[97, 98]]), max_new_tokens=3, do_sample=False)
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text


def test_model_type_matches_the_checkpoint_reader():
    assert hf_mod.MODEL_TYPE == HF_MODEL_TYPE


def test_safetensors_export_loads_with_its_depth_and_tokenizer(exported, tmp_path, capsys):
    run, _, model = exported
    out = tmp_path / "st"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert not (out / "optimizer.pt").exists()
    loaded = load_model(out)
    assert loaded.n_loops == TRAINED and (out / "byte_tokenizer.json").is_file()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], t, rtol=0, atol=0)
    # info reads it too (it asked for trainer_state.pt, which an export does not ship).
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == sum(
        p.numel() for p in model.parameters())


def test_export_errors_are_one_line_with_status_2(exported, tmp_path, capsys):
    run, out, _ = exported
    assert main(["export", str(run), "--out", str(out)]) == 2  # not empty
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_export_checks_what_it_writes_and_leaves_nothing_behind(exported, tmp_path, capsys):
    """Each refused export names the problem and leaves no (half-written) --out behind."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.integrations.conftest import byte_baseline

    run, _, model = exported
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)} | {"<unk>": 1000},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(
        tmp_path / "big_tok")
    # A weights-only export whose config says dim is twice what its weights hold.
    wide = tmp_path / "wide"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(wide)]) == 0
    config_file = wide / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "dim": 2 * config["dim"]}))
    dense = write_run(tmp_path / "dense", byte_baseline("gqa"))
    cases = [
        ([str(run), "--tokenizer", str(tmp_path / "big_tok")], "1001 ids but the model only 259"),
        ([str(run), "--format", "safetensors", "--tokenizer", str(tmp_path / "big_tok")],
         "1001 ids"),
        ([str(wide), "--format", "safetensors"], "do not match the model's configuration"),
        ([str(wide)], "do not match the model's configuration"),
        ([str(dense), "--n-loops", "4"], "fixed-depth"),
    ]
    (tmp_path / "empty").mkdir()
    for argv, says in cases:
        for out in (tmp_path / "new", tmp_path / "empty"):
            assert main(["export", *argv, "--out", str(out)]) == 2, argv
            err = capsys.readouterr().err
            assert says in err and "Traceback" not in err, (argv, err)
            assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["export", str(run), "--out", str(a_file / "x")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_an_interrupted_export_leaves_nothing_and_can_be_run_again(exported, tmp_path,
                                                                   monkeypatch):
    """Ctrl-C while the tokenizer is written (the last step) left a directory with weights
    and no tokenizer, which a second export then refused as not empty."""
    from open_mythos.integrations import convert

    run, _, _ = exported
    real = convert.save_tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_tokenizer", interrupted)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 130
    assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no partial folder
    monkeypatch.setattr(convert, "save_tokenizer", real)
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
        assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # --out as the current directory, through a symlink, and over a killed export's folder.
    here, target = tmp_path / "here", tmp_path / "target"
    here.mkdir()
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (target / ".openmythos-export.partial-99999").mkdir()  # a kill -9 leaves this
    monkeypatch.chdir(here)
    for out in (".", str(tmp_path / "link")):
        assert main(["export", str(run), "--format", "safetensors", "--out", out]) == 0
    for d in (here, target):
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        assert load_model(d).n_loops == TRAINED
        assert not [p for p in d.iterdir() if p.name.startswith(".")]


CLEAN_SCRIPT = r"""
import json, sys
try:
    import open_mythos
except ImportError:
    pass
else:
    sys.exit("open_mythos is importable: the environment is not clean")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
ids = tok(["the cat", "a"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(json.dumps({"module": type(model).__module__, "n_loops": model.config.n_loops,
                  "logits": logits[0].tolist(), "generated": gen.tolist(),
                  "input_ids": ids["input_ids"].tolist()}))
"""


def run_clean(out: Path, tmp_path: Path) -> dict:
    """:data:`CLEAN_SCRIPT` on ``out`` under ``python -I -S``: no site processing, so the
    editable install's .pth is not read; only the venv's site-packages directories (torch,
    transformers) are on the path. Checks first that ``open_mythos`` does not import there."""
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    script = tmp_path / "clean.py"
    script.write_text(CLEAN_SCRIPT)
    boot = (f"import sys; sys.path[:0] = {paths!r}; sys.argv = ['clean', {str(out)!r}]; "
            f"exec(compile(open({str(script)!r}).read(), 'clean.py', 'exec'))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-I", "-S", "-c",
                            f"import sys; sys.path[:0] = {paths!r}; import open_mythos"],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'open_mythos'" in probe.stderr
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loads_with_trust_remote_code_where_open_mythos_is_not_installed(exported, tmp_path):
    from open_mythos.inference import generate

    _, out, model = exported
    res = run_clean(out, tmp_path)
    assert res["module"].startswith("transformers_modules.") and res["n_loops"] == TRAINED
    # Same numbers as this package's model at the trained depth (row 0 is unpadded).
    ids = torch.tensor([ByteTokenizer().encode("the cat")])
    with torch.no_grad():
        ref = model(ids, n_loops=TRAINED)[0]
    torch.testing.assert_close(torch.tensor(res["logits"]), ref, rtol=1e-4, atol=1e-4)
    greedy = generate(model, ids, max_new_tokens=4, n_loops=TRAINED, do_sample=False)
    assert res["generated"][0] == greedy[0].tolist()


@pytest.mark.slow
def test_a_native_save_pretrained_still_loads_where_open_mythos_is_not_installed(exported,
                                                                                  tmp_path):
    """Loaded with the package installed (its own class) and saved again, as after a
    fine-tune with transformers.Trainer: the config kept its auto_map but the directory had
    no modeling code, so trust_remote_code failed ("does not appear to have a file named
    modeling_openmythos.py")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, model = exported
    native = AutoModelForCausalLM.from_pretrained(out)
    assert type(native).__module__ == "open_mythos.integrations.hf"
    saved = tmp_path / "saved"
    native.save_pretrained(saved)
    AutoTokenizer.from_pretrained(out).save_pretrained(saved)
    assert (saved / "modeling_openmythos.py").is_file()
    res = run_clean(saved, tmp_path)
    ids = torch.tensor([ByteTokenizer().encode("the cat")])
    with torch.no_grad():
        ref = model(ids, n_loops=TRAINED)[0]
    torch.testing.assert_close(torch.tensor(res["logits"]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_dense_mla_baseline_loads_where_open_mythos_is_not_installed(tmp_path):
    from tests.integrations.conftest import byte_baseline

    base = byte_baseline("mla")
    run = write_run(tmp_path / "run", base)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    res = run_clean(tmp_path / "hf", tmp_path)
    assert res["n_loops"] is None  # a fixed-depth kind has no trained depth
    ids = torch.tensor([ByteTokenizer().encode("the cat")])
    with torch.no_grad():
        ref = base(ids)[0]
    torch.testing.assert_close(torch.tensor(res["logits"]), ref, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_exports_whole_weights_and_info_reads_it(tmp_path, capsys):
    """A checkpoint whose weights are a ``model.dcp/`` directory (FSDP2's layout; written
    here by DCP in one process, without a manifest, as older checkpoints are read)."""
    import torch.distributed.checkpoint as dcp

    from open_mythos.checkpoints import MANIFEST_FILE, MODEL_FILE, latest_checkpoint

    model = byte_model("gqa")
    run = write_run(tmp_path / "run", model)
    ckpt = latest_checkpoint(run)
    tied = tied_parameters(model)
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in tied}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(ckpt / "model.dcp")), no_dist=True)
    (ckpt / MODEL_FILE).unlink()
    (ckpt / MANIFEST_FILE).unlink()
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    loaded = load_model(tmp_path / "st")
    assert loaded.n_loops == TRAINED
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], t, rtol=0, atol=0)
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["run"]
    assert "stored" not in info["param_bytes"] and info["trained_depth"] == TRAINED


def test_weights_are_as_readable_as_every_other_file(exported, tmp_path):
    """safetensors writes its files 0600: a run's checkpoints and an export handed to
    someone were unreadable to anyone else, unlike every other file written beside them."""
    run, hf_dir, _ = exported
    old = os.umask(0o022)
    try:
        from open_mythos.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(run)
        assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == 0o644
        for out, fmt in ((tmp_path / "hf", "hf"), (tmp_path / "st", "safetensors")):
            assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
            modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
            assert modes and set(modes.values()) == {0o644}, modes
    finally:
        os.umask(old)
