"""Training checkpoints <-> Hugging Face directories, and loading either, for every model
kind (looped and dense baseline) and both attention types."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors import safe_open

from open_mythos import ByteTokenizer
from open_mythos.integrations.convert import (
    CheckpointFormat,
    detect_format,
    hf_to_training,
    load_model,
    read_config,
    resolve_tokenizer,
    training_to_hf,
)
from open_mythos.training.checkpoint import load_checkpoint
from tests.integrations.conftest import (
    BYTE_VOCAB,
    KIND_PARAMS,
    byte_model,
    byte_model_of,
    write_training_checkpoint,
)

transformers = pytest.importorskip("transformers")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(params=KIND_PARAMS, ids=["-".join(p) for p in KIND_PARAMS])
def run_dir(request, tmp_path):
    model = byte_model_of(*request.param)
    write_training_checkpoint(tmp_path / "run", model)
    return model, tmp_path / "run"


def test_training_to_hf_loads_with_auto_classes(run_dir, tmp_path):
    import open_mythos.integrations.hf  # noqa: F401  (registers the Auto classes)

    model, run = run_dir
    out = training_to_hf(run, tmp_path / "hf", n_loops=3)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "byte_tokenizer.json", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert (config["n_loops"], config["eos_token_id"], config["pad_token_id"]) == (3, 258, 256)

    # The kind travels with the config: the baseline's depth and width, None for the looped.
    assert (config["core_layers"], config["core_ffn_dim"]) == (
        getattr(model.cfg, "core_layers", None), getattr(model.cfg, "core_ffn_dim", None))

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf.model) is type(model) and hf.config.to_mythos_config() == model.cfg
    assert same_weights(hf.model, model) and hf.config.n_loops == 3
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("hé", add_special_tokens=False) == ByteTokenizer().encode("hé")
    ids = torch.randint(0, BYTE_VOCAB, (1, 8))
    torch.testing.assert_close(hf(ids).logits, model(ids, n_loops=3), rtol=1e-5, atol=1e-6)


def test_hf_to_training_and_back_is_lossless(run_dir, tmp_path):
    model, run = run_dir
    hf_dir = training_to_hf(run, tmp_path / "hf")
    back = hf_to_training(hf_dir, tmp_path / "ckpt")
    assert (back / "byte_tokenizer.json").is_file()
    with safe_open(str(back / "model.safetensors"), "pt") as fh:
        assert "head.weight" not in fh.keys()
        assert json.loads(fh.metadata()["tied"]) == {"head.weight": "embed.weight"}
    reloaded, cfg = load_checkpoint(back)  # the trainer's own loader
    assert type(reloaded) is type(model) and cfg == model.cfg and same_weights(reloaded, model)
    assert reloaded.head.weight is reloaded.embed.weight
    # The default depth survives both ways (it was dropped: commands then ran
    # max_loop_iters); a fixed-depth kind has none.
    looped = not hasattr(model.cfg, "core_layers")
    # (A weights-only checkpoint records no depth, so neither does its export.)
    with (pytest.warns(UserWarning, match="records no trained_depth") if looped
          else contextlib.nullcontext()):
        deep = hf_to_training(training_to_hf(run, tmp_path / "hf3", n_loops=3), tmp_path / "c3")
    assert load_model(deep).n_loops == read_config(deep)[1] == (3 if looped else None)
    assert load_model(training_to_hf(deep, tmp_path / "hf4")).n_loops == (3 if looped else None)
    again = training_to_hf(back, tmp_path / "hf2")
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as a, \
            safe_open(str(again / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_load_model_reads_every_layout_to_the_same_weights(run_dir, tmp_path):
    model, run = run_dir
    hf_dir = training_to_hf(run, tmp_path / "hf", n_loops=2)
    ckpt = next((run / "checkpoints").iterdir())
    assert detect_format(run) == (CheckpointFormat.TRAINING, ckpt)
    assert detect_format(ckpt) == (CheckpointFormat.TRAINING, ckpt)
    assert detect_format(hf_dir) == (CheckpointFormat.HF, hf_dir)
    for path, loops in ((run, None), (ckpt, None), (hf_dir, 2)):
        loaded = load_model(path)
        assert type(loaded.model) is type(model) and type(loaded.cfg) is type(model.cfg)
        assert same_weights(loaded.model, model) and not loaded.model.training
        assert loaded.model.head.weight is loaded.model.embed.weight
        assert loaded.n_loops == loops and read_config(path) == (model.cfg, loops)
        assert isinstance(resolve_tokenizer(loaded), ByteTokenizer)


@pytest.mark.parametrize("kind", ["looped", "dense"])
def test_sharded_hf_directory_loads(kind, tmp_path):
    from open_mythos.integrations.hf import OpenMythosForCausalLM

    model = byte_model_of(kind, "mla")
    OpenMythosForCausalLM.from_mythos(model).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert same_weights(load_model(tmp_path).model, model)
    # Saved again unsharded over it: transformers removes the shards, may keep the index,
    # and reads the one file; so must we.
    other = byte_model_of(kind, "mla")
    with torch.no_grad():
        other.embed.weight.add_(1.0)
    OpenMythosForCausalLM.from_mythos(other).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed.weight": "model-00001-of-00008.safetensors"}}))
    assert same_weights(load_model(tmp_path).model, other)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model, not OpenMythos"):
        load_model(tmp_path)
    model = byte_model("gqa", vocab_size=300)
    write_training_checkpoint(tmp_path / "text_run", model)
    (next((tmp_path / "text_run" / "checkpoints").iterdir()) / "train_config.toml").write_text(
        f'[data]\ntokenizer = "{tmp_path / "gone"}"\n')  # its tokenizer directory is gone
    loaded = load_model(tmp_path / "text_run")
    with pytest.raises(ValueError, match="--tokenizer"):
        resolve_tokenizer(loaded)
    assert isinstance(resolve_tokenizer(loaded, "byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="already a Hugging Face"):
        training_to_hf(training_to_hf(tmp_path / "text_run", tmp_path / "hf", tokenizer="byte"),
                       tmp_path / "x")


def test_export_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    """A GPT-2-style tokenizer (EOS only): the export's config pads with EOS, as our
    tokenizer wrapper does, and so does the exported tokenizer, so a batched
    ``tok(texts, padding=True)`` works."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat", "a dog"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert tok.pad_token is None
    tok.save_pretrained(tmp_path / "tok")
    model = byte_model("gqa", vocab_size=len(tok))
    write_training_checkpoint(tmp_path / "run", model, tokenizer=str(tmp_path / "tok"))
    out = training_to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=tmp_path / "tok")

    config = json.loads((out / "config.json").read_text())
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported.pad_token_id == config["pad_token_id"] == tok.eos_token_id
    batch = exported(["the cat", "a dog sat on"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.eos_token_id and batch.attention_mask[0, 0] == 0


def test_an_hf_config_with_a_bad_default_depth_is_refused_naming_the_file(tmp_path):
    from open_mythos.integrations.hf import OpenMythosForCausalLM

    OpenMythosForCausalLM.from_mythos(byte_model("gqa"), n_loops=2).save_pretrained(tmp_path)
    assert load_model(tmp_path).n_loops == 2
    config = json.loads((tmp_path / "config.json").read_text())
    for bad in (0, "3", 2.5, -1):
        (tmp_path / "config.json").write_text(json.dumps({**config, "n_loops": bad}))
        with pytest.raises(ValueError, match="config.json: n_loops"):
            load_model(tmp_path)


def test_a_path_that_holds_no_checkpoint_is_named_for_what_it_is(tmp_path):
    """The plausible mistakes each get their own reason (all were "no checkpoint in X
    (expected model.safetensors, ...)", contradictory for model.safetensors itself)."""
    model = byte_model("gqa")
    run = write_training_checkpoint(tmp_path / "run", model)
    ckpt = load_model(run).path
    cases = {
        tmp_path / "missing": "the path does not exist",
        ckpt / "model.safetensors": "it is a file; give the directory that holds it",
        ckpt.parent: "a run's checkpoints/ folder; give the run directory",
    }
    fresh = tmp_path / "fresh"  # a run that has started and not saved yet
    fresh.mkdir()
    (fresh / "config.toml").write_text("")
    (fresh / "metrics.jsonl").write_text("")
    cases[fresh] = "no checkpoint in the run .* yet"
    cases[tmp_path / "empty"] = r"no checkpoint in .*expected model.safetensors"
    (tmp_path / "empty").mkdir()
    for path, says in cases.items():
        with pytest.raises(FileNotFoundError, match=says):
            load_model(path)


def test_conversions_never_write_over_files_or_into_their_source(tmp_path):
    """The Python conversions wrote into any directory: hf_to_training(d, d) overwrote the
    export's config and weights before failing; training_to_hf(run, run) put an export at
    the run's top level, which load_model(run) then read instead of the checkpoints; an
    existing export became a mix of two layouts. Reference: the files, unchanged."""
    from open_mythos.integrations.convert import training_to_safetensors

    run = tmp_path / "run"
    write_training_checkpoint(run, byte_model("gqa"))
    hf = training_to_hf(run, tmp_path / "hf")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for convert, source, out, match in (
            (hf_to_training, hf, hf, "is the source"),
            (training_to_hf, run, run, "is the source"),
            (training_to_hf, next((run / "checkpoints").iterdir()), run,
             "a directory holding the source"),
            (training_to_safetensors, run, hf, "already exists and is not an empty directory"),
            (hf_to_training, hf, run, "already exists and is not an empty directory")):
        with pytest.raises(ValueError, match=match):
            convert(source, out)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert detect_format(run)[0] is CheckpointFormat.TRAINING
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert detect_format(hf_to_training(hf, tmp_path / "empty"))[0] is CheckpointFormat.TRAINING


def test_hf_to_training_says_it_drops_the_exports_inference_defaults(tmp_path, recwarn):
    """An export's configured exit rule (and act_early_exit) has no place in a training
    checkpoint: it went without a word, and a re-export of the copy ran every loop."""
    import warnings

    run = tmp_path / "run"
    write_training_checkpoint(run, byte_model("gqa"))
    plain = training_to_hf(run, tmp_path / "plain")
    ruled = training_to_hf(run, tmp_path / "ruled", exit_rule={"kl": 0.5}, act_early_exit=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say for an export without defaults
        hf_to_training(plain, tmp_path / "back-plain")
    with pytest.warns(UserWarning, match=r"configures exit_rule=.*'kl': 0.5.* and "
                                         r"act_early_exit=False .* does not record"):
        hf_to_training(ruled, tmp_path / "back-ruled")


def test_a_failed_conversion_leaves_its_out_dir_as_it_was(tmp_path, monkeypatch):
    """hf_to_training wrote the weights, then failed on its tokenizer: the half-written
    directory loaded as a model (with the byte tokenizer a command falls back to) and
    refused the retry as not empty; a tokenizer with more ids than the model's rows was
    not checked at all. Every conversion now checks first and writes atomically."""
    import os

    from open_mythos.integrations import convert
    from open_mythos.integrations.convert import (
        PARTIAL_PREFIX,
        find_tokenizer_dir,
        training_to_safetensors,
    )
    from tests.conftest import folder_locked_by_another_process

    class Wide(ByteTokenizer):  # more ids than the model's 259 embedding rows
        vocab_size = 300

    run = tmp_path / "run"
    write_training_checkpoint(run, byte_model("gqa"))
    hf = training_to_hf(run, tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    outs = (tmp_path / "new", tmp_path / "empty")
    left = lambda: ([p.name for p in tmp_path.iterdir() if p.name not in ("run", "hf")],  # noqa: E731
                    [p.name for p in (tmp_path / "empty").iterdir()])
    for out in outs:
        with pytest.raises(FileNotFoundError, match="no_such_tokenizer_dir' does not exist"):
            hf_to_training(hf, out, tokenizer=tmp_path / "no_such_tokenizer_dir")
        with pytest.raises(ValueError, match="the tokenizer has 300 ids but the model only"):
            hf_to_training(hf, out, tokenizer=Wide())
    assert left() == (["empty"], [])
    real = convert.save_tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_tokenizer", interrupted)
    for conversion, source in ((hf_to_training, hf), (training_to_hf, run),
                               (training_to_safetensors, run)):
        for out in outs:
            with pytest.raises(KeyboardInterrupt):
                conversion(source, out)
    assert left() == (["empty"], [])
    monkeypatch.setattr(convert, "save_tokenizer", real)
    # A conversion still writing into a directory (it holds its folder's lock) keeps it
    # busy; a killed one's folder is removed by the next, whatever PID it names (in a
    # container the retry may have the killed process's PID: it was kept as "alive").
    busy = tmp_path / "empty" / f"{PARTIAL_PREFIX}1"
    busy.mkdir()
    with folder_locked_by_another_process(busy):
        with pytest.raises(ValueError, match=f"being written by another conversion .*"
                                             f"{busy.name} is locked"):
            hf_to_training(hf, tmp_path / "empty")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / f"{PARTIAL_PREFIX}{os.getpid()}").mkdir()  # killed, same PID
    for out in outs:
        assert same_weights(load_model(hf_to_training(hf, out)).model, load_model(hf).model)
        assert find_tokenizer_dir(out) == out
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
