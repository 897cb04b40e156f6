"""The one checkpoint loader: every layout (training checkpoint, run, Hugging Face) of every
model kind, without ``transformers``; the old entry points are the same loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from open_mythos.checkpoints import (
    CheckpointCorrupt,
    CheckpointFormat,
    detect_format,
    load_checkpoint,
    load_model,
    read_config,
)
from tests.integrations.conftest import KIND_PARAMS, byte_model_of, write_training_checkpoint

KIND_IDS = ["-".join(p) for p in KIND_PARAMS]


def write_hf_by_hand(out: Path, model: torch.nn.Module, n_loops: int | None = None) -> Path:
    """The Hugging Face layout, written without ``transformers`` or our HF wrapper: every
    configuration field (the baseline's None for a looped model), ``model.``-prefixed
    tensors, the tied head left out."""
    out.mkdir(parents=True)
    config = {"model_type": "openmythos", "core_layers": None, "core_ffn_dim": None,
              **model.cfg.to_dict(), "n_loops": n_loops, "architectures": ["X"],
              "tie_word_embeddings": True, "transformers_version": "5.0"}
    (out / "config.json").write_text(json.dumps(config))
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()
               if k != "head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind,attn_type", KIND_PARAMS, ids=KIND_IDS)
def test_every_layout_of_every_kind_loads_to_the_same_model(kind, attn_type, tmp_path):
    model = byte_model_of(kind, attn_type)
    ckpt = write_training_checkpoint(tmp_path / "run", model)
    hf = write_hf_by_hand(tmp_path / "hf", model, n_loops=2)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6))
    with torch.no_grad():
        want = model(ids, n_loops=3)
    for path, fmt, loops in ((tmp_path / "run", CheckpointFormat.TRAINING, None),
                             (ckpt, CheckpointFormat.TRAINING, None),
                             (hf, CheckpointFormat.HF, 2)):
        assert detect_format(path) == (fmt, ckpt if fmt is CheckpointFormat.TRAINING else hf)
        assert read_config(path) == (model.cfg, loops)
        loaded = load_model(path)
        assert type(loaded.model) is type(model) and type(loaded.cfg) is type(model.cfg)
        assert loaded.cfg == model.cfg and loaded.n_loops == loops and loaded.format is fmt
        assert same_weights(loaded.model, model) and not loaded.model.training
        assert loaded.model.head.weight is loaded.model.embed.weight
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids, n_loops=3), want, rtol=0, atol=0)


def test_buffers_a_checkpoint_does_not_hold_start_at_their_initial_value(tmp_path):
    model = byte_model_of("looped", "gqa")
    with torch.no_grad():
        model.recurrent.block.ffn.load_since_update.fill_(5.0)  # not persistent: not saved
    write_training_checkpoint(tmp_path / "run", model)
    loaded = load_model(tmp_path / "run").model
    assert torch.equal(loaded.recurrent.block.ffn.load_since_update,
                       torch.zeros(model.cfg.n_experts))


def test_loading_leaves_the_global_rng_alone(tmp_path):
    write_training_checkpoint(tmp_path / "run", byte_model_of("looped", "gqa"))
    torch.manual_seed(7)
    want = torch.rand(4)
    torch.manual_seed(7)
    load_model(tmp_path / "run")
    assert torch.equal(torch.rand(4), want)  # a seeded run samples the same after loading


@pytest.mark.parametrize("kind", ["looped", "dense"])
def test_device_and_dtype_and_the_pair_form(kind, tmp_path):
    model = byte_model_of(kind, "mla")
    write_training_checkpoint(tmp_path / "run", model)
    got, cfg = load_checkpoint(tmp_path / "run", device="cpu", dtype=torch.float64)
    assert cfg == model.cfg and type(got) is type(model)
    assert {p.dtype for p in got.parameters()} == {torch.float64}
    assert torch.equal(got.embed.weight, model.embed.weight.double())


def test_weights_load_in_the_dtype_they_are_stored_in(tmp_path):
    """Without ``dtype``, a bfloat16 file loads as bfloat16 (as transformers 5 loads it),
    float32 stays float32, and a file of mixed dtypes loads as float32."""
    from open_mythos.integrations.convert import training_to_hf

    model = byte_model_of("looped", "gqa")
    write_training_checkpoint(tmp_path / "run", model)
    assert {p.dtype for p in load_model(tmp_path / "run").model.parameters()} == {torch.float32}
    training_to_hf(tmp_path / "run", tmp_path / "bf16", dtype=torch.bfloat16)
    got = load_model(tmp_path / "bf16").model
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}
    assert torch.equal(got.embed.weight, model.embed.weight.bfloat16())
    assert {p.dtype for p in load_model(tmp_path / "bf16", dtype="float32").model.parameters()} \
        == {torch.float32}
    # The MoE balancing state stays float32 in a bf16 model (in the file too), and does not
    # make the file's dtype "mixed".
    assert got.recurrent.block.ffn.router_bias.dtype == torch.float32
    weights = tmp_path / "bf16" / "model.safetensors"
    state = load_file(str(weights))
    assert {v.dtype for k, v in state.items() if k.endswith("router_bias")} == {torch.float32}
    from open_mythos.commands.info import run_info

    info = run_info(str(tmp_path / "bf16"), got.cfg, None, sum(p.numel() for p in got.parameters()))
    assert info.stored_dtype == "BF16"  # as `openmythos info` shows it (not "BF16/F32")
    first = next(k for k, v in state.items() if v.dtype == torch.bfloat16)
    state[first] = state[first].float()
    save_file(state, str(weights))
    assert {p.dtype for p in load_model(tmp_path / "bf16").model.parameters()} == {torch.float32}


def test_float64_weights_load_without_rounding(tmp_path):
    """A float64 checkpoint was loaded into float32 parameters and cast back: every weight
    rounded to float32 (logits off by ~4e-7), and the conversions through load_model,
    documented as lossless, with it."""
    from open_mythos.integrations.convert import training_to_hf

    model = byte_model_of("looped", "gqa").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-9)  # digits float32 does not hold
    write_training_checkpoint(tmp_path / "run", model)
    got = load_model(tmp_path / "run").model
    assert {p.dtype for p in got.parameters()} == {torch.float64}
    for (name, want), have in zip(model.state_dict().items(), got.state_dict().values()):
        assert torch.equal(have, want), name
    training_to_hf(tmp_path / "run", tmp_path / "hf")
    assert torch.equal(load_model(tmp_path / "hf").model.embed.weight, model.embed.weight)


def test_the_old_entry_points_are_the_one_loader(tmp_path):
    import open_mythos.evaluation.runs as runs
    import open_mythos.integrations.convert as convert
    import open_mythos.training as training
    import open_mythos.training.checkpoint as tckpt

    assert convert.load_model is load_model and convert.read_config is read_config
    assert runs.load_model is training.load_checkpoint is tckpt.load_checkpoint is load_checkpoint
    base = byte_model_of("dense", "gqa")  # the kind the old evaluation loader special-cased
    write_training_checkpoint(tmp_path / "run", base)
    model, cfg = runs.load_model(tmp_path / "run")
    assert type(model) is type(base) and same_weights(model, base)


def test_mismatched_weights_name_the_tensors(tmp_path):
    model = byte_model_of("dense", "gqa")
    hf = write_hf_by_hand(tmp_path / "hf", model)
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "head.weight"}
    state.pop("model.core.0.ffn.down.weight")
    state["model.recurrent.act.halt.bias"] = torch.zeros(1)
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing \['core.0.ffn.down.weight'\], "
                                       r"unexpected \['recurrent.act.halt.bias'\]"):
        load_model(hf)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["model.head.weight"] += 1  # stored twice, and not tied any more
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match="head.weight differs from embed.weight"):
        load_model(hf)
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "head.weight"}
    down = state["model.core.0.ffn.down.weight"]
    state["model.core.0.ffn.down.weight"] = down[:, :-1].contiguous()
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"core.0.ffn.down.weight \({down.shape[0]}, "
                                         rf"{down.shape[1] - 1}\) \(model: \({down.shape[0]}, "
                                         rf"{down.shape[1]}\)\)"):
        load_model(hf)


def test_loading_never_imports_transformers(tmp_path):
    model = byte_model_of("dense", "mla")
    write_training_checkpoint(tmp_path / "run", model)
    write_hf_by_hand(tmp_path / "hf", model)
    code = (
        "import sys; sys.modules['transformers'] = None  # any import of it fails\n"
        "from open_mythos.checkpoints import load_model\n"
        f"for p in ({str(tmp_path / 'run')!r}, {str(tmp_path / 'hf')!r}):\n"
        "    print(type(load_model(p).model).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["DenseBaseline", "DenseBaseline"]


def test_a_run_still_training_is_read_at_its_newest_checkpoint(tmp_path, monkeypatch):
    """Reading a run directory while its run trains on: pruning may remove the checkpoint
    that was found before its weights are read (a reader in a loop failed 12 times in 850
    with a raw 'unable to open file'). The newest checkpoint is then found again."""
    import shutil

    from open_mythos import checkpoints as ckpt_mod

    run = tmp_path / "run"
    older = write_training_checkpoint(run, byte_model_of("looped", "gqa"), step=2)
    newer = write_training_checkpoint(run, byte_model_of("looped", "gqa"), step=4)
    read = ckpt_mod.read_weights

    def pruned_while_reading(fmt, ckpt_dir):
        if Path(ckpt_dir) == newer and newer.exists():  # the trainer moves on meanwhile
            (run / "latest").write_text(f"checkpoints/{older.name}\n")
            shutil.rmtree(newer)
        return read(fmt, ckpt_dir)

    monkeypatch.setattr(ckpt_mod, "read_weights", pruned_while_reading)
    assert load_model(run).path == older
    # A checkpoint named by its own directory is not swapped for another.
    newer = write_training_checkpoint(run, byte_model_of("looped", "gqa"), step=4)
    with pytest.raises((OSError, RuntimeError, ValueError)):
        load_model(newer)


def test_a_damaged_hf_export_is_named_in_one_line(tmp_path, capsys):
    """A truncated model.safetensors (an interrupted copy) or a damaged shard index gave
    generate, sweep, inspect and report a raw SafetensorError/JSON traceback."""
    from open_mythos.cli import main
    from open_mythos.integrations.convert import training_to_hf

    write_training_checkpoint(tmp_path / "run", byte_model_of("looped", "gqa"))
    training_to_hf(tmp_path / "run", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    capsys.readouterr()  # the export's progress bar
    with pytest.raises(CheckpointCorrupt, match="model.safetensors is unreadable"):
        load_model(tmp_path / "hf")
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "ab",
                 "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is unreadable" in err
    weights.unlink()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointCorrupt, match="is not a shard index"):
        load_model(tmp_path / "hf")
    # Shard names that are not file names beside the index (a TypeError from the path
    # arithmetic leaked out for a number).
    for bad in (1, "../model.safetensors", ""):
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed.weight": bad}}))
        with pytest.raises(CheckpointCorrupt, match="is not a shard index"):
            load_model(tmp_path / "hf")


@pytest.mark.parametrize("content", [b"null", b"[1, 2]", b'"text"', b"{\"dim\": \xe1}"],
                         ids=["null", "array", "string", "latin1"])
def test_a_config_json_that_is_no_json_object_is_named_in_one_line(tmp_path, content, capsys):
    """JSON of another kind, or bytes that are not UTF-8, in config.json gave an
    AttributeError or UnicodeDecodeError traceback that named no file; a training
    checkpoint's manifest names the damage, one without a manifest the file."""
    from open_mythos.cli import main
    from open_mythos.integrations.convert import training_to_hf

    ckpt = write_training_checkpoint(tmp_path / "run", byte_model_of("looped", "gqa"))
    training_to_hf(tmp_path / "run", tmp_path / "hf")
    hf = tmp_path / "hf"
    (hf / "config.json").write_bytes(content)
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(CheckpointCorrupt, match="config.json (has .* bytes|does not match)"):
        load_model(ckpt)
    (ckpt / "manifest.json").unlink()  # as a checkpoint older than manifests
    for where in (ckpt, hf):
        for read in (load_model, read_config):
            with pytest.raises(CheckpointCorrupt, match=f"{where / 'config.json'} (holds|is not)"):
                read(where)
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(hf)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err


def test_a_manifest_of_the_wrong_shape_falls_back_to_the_older_checkpoint(tmp_path):
    """A manifest whose ``files`` is a list, or lists a number, raised a TypeError that
    escaped the fallback to the next older checkpoint."""
    run = tmp_path / "run"
    older = write_training_checkpoint(run, byte_model_of("looped", "gqa"), step=2)
    newer = write_training_checkpoint(run, byte_model_of("looped", "gqa"), step=4)
    manifest = newer / "manifest.json"
    good = json.loads(manifest.read_text())
    for files in (list(good["files"]), {name: 1 for name in good["files"]}):
        manifest.write_text(json.dumps({**good, "files": files}))
        assert load_model(run).path == older
        with pytest.raises(CheckpointCorrupt, match="manifest.json is unreadable"):
            load_model(newer)


def test_a_bad_field_in_an_hf_config_names_the_file(tmp_path):
    from open_mythos.integrations.convert import training_to_hf

    write_training_checkpoint(tmp_path / "run", byte_model_of("looped", "gqa"))
    training_to_hf(tmp_path / "run", tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dim": "32"}))
    with pytest.raises(ValueError, match=r"hf/config.json: MythosConfig.dim='32'"):
        read_config(tmp_path / "hf")
