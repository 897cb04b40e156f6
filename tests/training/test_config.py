"""TOML configuration: validation errors name the key, overrides, round trip, presets."""

from __future__ import annotations

import argparse

import pytest

from open_mythos.cli import build_parser, main
from open_mythos.training import (
    Compile,
    ConfigError,
    LoopMode,
    Parallel,
    TrainConfig,
    load_config,
    parse_override,
    to_toml,
)
from open_mythos.training.command import config_from_args

from .conftest import REPO, TINY


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = TrainConfig()
    assert cfg.run.parallel is Parallel.NONE
    assert cfg.model.build(259).vocab_size == 259


@pytest.mark.parametrize("text, names", [
    ("[optim]\nlr = 1e-3\nbogus = 1\n", ["'optim.bogus'"]),
    ("[optim]\nlearning_rate = 1e-3\n", ["'optim.learning_rate'"]),
    ("[trainer]\nsteps = 3\n", ["section 'trainer'"]),
    ("[model]\ndimension = 64\n", ["'model.dimension'", "did you mean 'model.dim'"]),
    ("[run]\nstep = 3\n", ["'run.step'", "did you mean 'run.steps'"]),
    # A real key in the wrong section: it got no hint, or the near-miss 'optim.eps'.
    ("[optim]\nwarmup_steps = 3\n", ["did you mean 'schedule.warmup_steps'"]),
    ("[optim]\nsteps = 3\n", ["did you mean 'run.steps'"]),
    ("[model]\nlr = 0.1\n", ["did you mean 'optim.lr'"]),
    ("[data]\nmax_seq_len = 64\n", ["did you mean 'model.max_seq_len'"]),
    # A key above every [section] header was called an unknown section, with no hint.
    ("lr = 0.01\n[run]\nsteps = 1\n", ["key 'lr' is outside any [section]",
                                         "did you mean 'optim.lr'"]),
])
def test_unknown_keys_are_named(tmp_path, text, names):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("text, key, kind", [
    ('[optim]\nlr = "fast"\n', "optim.lr", "number"),
    ("[run]\nsteps = 1.5\n", "run.steps", "integer"),
    ('[run]\ncompile = "yes"\n', "run.compile", "boolean"),
    ("[data]\nbatch_size = true\n", "data.batch_size", "integer"),
    ('[model]\ndim = "wide"\n', "model.dim", "integer"),
    ('[schedule]\nloops = "random"\n', "schedule.loops", "'fixed', 'curriculum', 'sampled'"),
    ('[run]\nprecision = "fp8"\n', "run.precision", "'fp32', 'bf16'"),
])
def test_bad_types_are_named(tmp_path, text, key, kind):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value) and kind in str(err.value)


@pytest.mark.parametrize("pairs, key", [
    ([("optim.lr", -1.0)], "optim.lr"),
    ([("run.steps", 0)], "run.steps"),
    ([("schedule.min_loops", 5), ("schedule.max_loops", 2)], "schedule.min_loops"),
    ([("schedule.loops", "sampled"), ("schedule.n_loops", 9)], "schedule.n_loops"),
    ([("data.task", "parity"), ("data.text", ["a.txt"])], "data"),
    ([("run.device", "tpu")], "run.device"),
    ([("run.dist_timeout", -1.0)], "run.dist_timeout"),
    ([("run.dist_timeout", float("inf"))], "run.dist_timeout"),
    ([("run.seed", 2**64)], "run.seed"),
])
def test_out_of_range_values_are_named(pairs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, pairs)


def test_model_fields_are_validated_by_mythos_config():
    cfg = load_config(None, [("model.n_experts_per_tok", 9), ("model.n_experts", 4)])
    with pytest.raises(ConfigError, match="n_experts_per_tok"):
        cfg.model.build(259)
    small_vocab = load_config(None, [("model.vocab_size", 100)])
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        small_vocab.model.build(259)


def test_variant_by_name_and_override():
    cfg = load_config(None, [("model.variant", "mythos_1b"), ("model.max_loop_iters", 4)])
    mcfg = cfg.model.build(259)
    assert (mcfg.dim, mcfg.max_loop_iters, mcfg.vocab_size) == (2048, 4, 32000)
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(None, [("model.variant", "mythos_2b")]).model.build(259)


def test_overrides_parse_toml_values():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 1e-3)
    assert parse_override("model.attn_type=mla") == ("model.attn_type", "mla")
    assert parse_override('data.text=["a", "b"]') == ("data.text", ["a", "b"])
    assert parse_override("run.compile=true") == ("run.compile", True)
    assert parse_override("data.task_args.lengths=[2, 6]") == ("data.task_args.lengths", [2, 6])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_override("lr=1e-3")
    # Meant as TOML but not valid: once a bare string, then refused for its type.
    for bad in ("data.task_args={lengths=[4,8], }", "data.text=[\"a\"", 'run.out="x'):
        with pytest.raises(ConfigError, match="not a valid TOML value"):
            parse_override(bad)
    # A number where a string is expected says how to quote it.
    with pytest.raises(ConfigError, match="""quote it.*--set 'run.out=\\"...\\"'"""):
        load_config(None, [parse_override("run.out=2024")])
    cfg = load_config(None, [parse_override("data.task_args.lengths=[2, 6]"),
                             parse_override("schedule.decay_steps=none")])
    assert cfg.data.task_args == {"lengths": [2, 6]}
    assert cfg.schedule.decay_steps is None


def test_toml_round_trip(tmp_path):
    cfg = load_config(TINY, [("schedule.loops", "sampled"), ("model.act_threshold", float("inf")),
                             ("data.task_args", {"lengths": [2, 6]}), ("optim.lr", 3)])
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg
    assert again.schedule.loops is LoopMode.SAMPLED


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_presets_are_valid(preset):
    cfg = load_config(preset)
    cfg.model.build(259)


def parse_train(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_cli_precedence_file_then_flags_then_set(tmp_path):
    args = parse_train(["--config", str(TINY), "--lr", "0.5", "--steps", "7", "--task", "dyck",
                        "--set", "optim.lr=0.25", "--parallel", "fsdp", "--compile"])
    cfg = config_from_args(args)
    assert cfg.optim.lr == 0.25  # --set wins over --lr
    assert cfg.run.steps == 7 and cfg.data.task == "dyck" and cfg.run.compile is Compile.BLOCKS
    assert cfg.run.parallel is Parallel.FSDP
    assert cfg.model.overrides["dim"] == 32  # from the file
    assert config_from_args(parse_train([])) == TrainConfig()
    # A source flag replaces the file's source (tiny.toml trains on a task).
    text = config_from_args(parse_train(["--config", str(TINY), "--text", "a.txt", "b.txt"]))
    # Given twice, --text adds up (the last one alone was read).
    twice = config_from_args(parse_train(["--config", str(TINY), "--text", "a.txt",
                                          "--text", "b.txt"]))
    assert twice.data.text == text.data.text
    assert text.data.task is None and text.data.text == ["a.txt", "b.txt"]
    prepared = config_from_args(parse_train(["--config", str(TINY), "--prepared", "shards"]))
    assert prepared.data.task is None and prepared.data.prepared == "shards"
    # ... with the file's task knobs, which belong to its task; --set gives the new one's.
    chain = REPO / "configs" / "multihop_chain.toml"
    phop = config_from_args(parse_train(["--config", str(chain), "--task", "phop"]))
    assert phop.data.task == "phop" and phop.data.task_args == {}
    knobs = config_from_args(parse_train(["--config", str(chain), "--task", "phop",
                                          "--set", "data.task_args={hops=[1,2]}"]))
    assert knobs.data.task_args == {"hops": [1, 2]}


def test_paths_and_values_a_shell_user_writes(tmp_path, monkeypatch):
    """``~`` is the home directory (not ./~), an empty run directory is refused (it trained
    into the current directory), and task knobs are not coerced: "false" is not True, 4.7
    is not 4."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_from_args(parse_train(["--config", str(TINY), "--out", "~/runs/x",
                                        "--set", "run.init_from=~/runs/y"]))
    assert (cfg.run.out, cfg.run.init_from) == (f"{tmp_path}/runs/x", f"{tmp_path}/runs/y")
    text = config_from_args(parse_train(["--config", str(TINY), "--text", "~/a.txt"]))
    assert text.data.text == [f"{tmp_path}/a.txt"]
    cleared = config_from_args(parse_train(["--variant", "mythos_1b", "--set", "model.variant="]))
    assert cleared.model.variant is None  # an empty name clears a preset, as for data.task
    for out in ("", " "):
        with pytest.raises(ConfigError, match="run.out=.* is invalid: name the run directory"):
            config_from_args(parse_train(["--config", str(TINY), "--out", out]))
    from open_mythos.tasks import get_task

    with pytest.raises(ValueError, match="running must be true or false, got 'false'"):
        get_task("parity", running="false")
    with pytest.raises(ValueError, match="reverse must be true or false"):
        get_task("addition", reverse=1)
    with pytest.raises(ValueError, match=r"lengths must be a \(lo, hi\) pair of ints"):
        get_task("parity", lengths=[4.7, 12])
    with pytest.raises(ValueError, match="modulus must be in 2..10"):
        get_task("modsum", modulus=3.5)


def test_cli_loops_flag_offers_every_loop_mode_and_task_help_names_every_task(capsys):
    from open_mythos.tasks import list_tasks

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    task_help = " ".join(capsys.readouterr().out.split())
    assert all(name in task_help.split("algorithmic task (")[1].split(")")[0]
               for name in list_tasks())
    for mode in LoopMode:
        assert config_from_args(parse_train(["--loops", mode.value])).schedule.loops is mode


def test_cli_reports_config_errors(tmp_path, capsys):
    code = main(["train", "--config", str(TINY), "--out", str(tmp_path / "r"),
                 "--set", "optim.bogus=1"])
    assert code == 2
    assert "'optim.bogus'" in capsys.readouterr().err


def test_cli_lists_train(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "train" in capsys.readouterr().out


def test_compile_modes(tmp_path):
    """``run.compile``: ``true``/``false`` (older configs) name "blocks"/"off"; "model" is
    for one process; the CLI's bare ``--compile`` is "blocks"."""
    for text, want in [("true", Compile.BLOCKS), ("false", Compile.OFF),
                       ('"model"', Compile.MODEL), ('"off"', Compile.OFF)]:
        cfg = load_config(write(tmp_path, f"[run]\ncompile = {text}\n"))
        assert cfg.run.compile is want
        assert load_config(write(tmp_path, to_toml(cfg))).run.compile is want
    with pytest.raises(ConfigError, match="'off', 'blocks', 'model'"):
        load_config(write(tmp_path, '[run]\ncompile = "yes"\n'))
    with pytest.raises(ConfigError, match="single process.*'blocks'"):
        load_config(None, [("run.compile", "model"), ("run.parallel", "ddp")])
    assert config_from_args(parse_train([])).run.compile is Compile.OFF
    assert config_from_args(parse_train(["--compile"])).run.compile is Compile.BLOCKS
    assert config_from_args(parse_train(["--compile", "model"])).run.compile is Compile.MODEL
    with pytest.raises(SystemExit):
        parse_train(["--compile", "graph"])


@pytest.mark.parametrize("data, unread", [
    ({"text": ["c.txt"], "task_args": {"hops": [1, 2]}}, ["task_args"]),
    ({"task": "parity", "tokenizer": "tok_dir", "val_fraction": 0.2}, ["tokenizer", "val_fraction"]),
    ({"hf_split": "validation"}, ["hf_split"]),
    ({"prepared": "shards", "encoding_errors": "replace"}, ["encoding_errors"]),
    ({"hf_dataset": "wikitext", "val_fraction": 0.1}, ["val_fraction"]),
    ({"text": ["c.txt"], "encoding_errors": "replace", "hf_text_field": "body"}, []),
    ({"hf_dataset": "wikitext", "hf_config": "raw", "hf_split": "test"}, []),
    ({"task": "multihop", "task_args": {"hops": [1, 2]}, "val_split": "ood_hops"}, []),
])
def test_keys_their_source_does_not_read_are_refused(tmp_path, data, unread):
    """A [data] key away from its default that the chosen source never reads was stored
    and ignored (task_args with text data, hf_split without a dataset)."""
    from open_mythos.training.trainer import open_data

    cfg = TrainConfig.from_dict({"data": data})
    assert cfg.data.unread_keys() == unread
    if unread:
        with pytest.raises(ConfigError) as err:
            open_data(cfg)
        assert all(f"data.{k}=" in str(err.value) for k in unread)
        assert "set it to its default" in str(err.value)


@pytest.mark.parametrize("pairs, match", [
    ([("data.task", "parity"), ("model.max_seq_len", 8)],
     r"task 'parity''s longest sequence is 27 tokens, above model.max_seq_len=8: raise "
     r"model.max_seq_len, or shorten the task \(data.task_args\)"),
    ([("data.task", "parity"), ("data.seq_len", 30), ("model.max_seq_len", 8)],
     "data.seq_len=30 exceeds model.max_seq_len=8"),
])
def test_a_sequence_length_too_long_says_where_it_came_from(pairs, match):
    """A task's own length was reported as "data.seq_len=27 exceeds ...", a key the user
    never set."""
    from open_mythos.training.trainer import open_data

    with pytest.raises(ConfigError, match=match):
        open_data(load_config(None, pairs))


@pytest.mark.parametrize("overrides, match", [
    ([("model.n_heads", 5)], "divisible by n_heads=5"),
    ([("data.seq_len", 64), ("model.max_seq_len", 32)], "data.seq_len=64 exceeds"),
])
def test_model_errors_come_before_the_corpus_is_read(tmp_path, monkeypatch, overrides, match):
    """A bad [model] key was reported only after the whole --text corpus was tokenised
    (minutes for a large one, on every rank): the data must not be opened at all."""
    from open_mythos.training import trainer

    def never(*args, **kwargs):
        raise AssertionError("the data was opened before the model configuration was checked")

    monkeypatch.setattr(trainer, "build_data_source", never)
    (tmp_path / "a.txt").write_text("some text " * 50)
    cfg = load_config(None, [("data.text", [str(tmp_path / "a.txt")]), *overrides])
    with pytest.raises(ConfigError, match=match):
        trainer.open_data(cfg)
