"""``openmythos generate`` and ``openmythos info``: argument parsing, output, formulas."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from open_mythos import ByteTokenizer, OpenMythos
from open_mythos.cli import build_parser, main
from open_mythos.commands import info as info_cmd
from open_mythos.commands import serve as serve_cmd
from open_mythos.inference import KVCache
from open_mythos.inference import generate as our_generate
from tests.conftest import tiny_config
from tests.integrations.conftest import byte_baseline, byte_model, write_training_checkpoint

TOK = ByteTokenizer()
REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    """The real ``openmythos`` parser (every command registered), as the console script."""
    return build_parser().parse_args(argv)


def openmythos(capsys, *argv: str) -> tuple[int, str, str]:
    """``openmythos ARGV`` in process: exit status, stdout, stderr."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_generate_streams_our_greedy_tokens_from_training_and_hf_checkpoints(tmp_path, capsys):
    model = byte_model("mla")
    run = tmp_path / "run"
    write_training_checkpoint(run, model)
    prompt = "Hello"
    ids = torch.tensor([TOK.encode(prompt)])
    expected = TOK.decode(our_generate(model, ids, 10, 3, do_sample=False)[0, len(prompt):])

    status, text, err = openmythos(capsys, "generate", "--checkpoint", str(run), "--prompt",
                                   prompt, "--greedy", "--n-loops", "3", "--max-new-tokens", "10",
                                   "--device", "cpu")
    assert status == 0 and text == prompt + expected + "\n"
    assert "10 tokens" in err

    pytest.importorskip("transformers")
    from open_mythos.integrations.convert import training_to_hf

    hf_dir = training_to_hf(run, tmp_path / "hf", n_loops=3)  # n_loops stored with the model
    status, text, _ = openmythos(capsys, "generate", "--checkpoint", str(hf_dir), "--prompt",
                                 prompt, "--greedy", "--max-new-tokens", "10", "--no-echo")
    assert status == 0 and text == expected + "\n"


def test_generate_sampling_is_reproducible_with_a_seed(tmp_path, capsys):
    write_training_checkpoint(tmp_path / "run", byte_model("gqa"))
    argv = ("generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "ab",
            "--temperature", "0.9", "--top-p", "0.9", "--max-new-tokens", "12")
    status, first, _ = openmythos(capsys, *argv, "--seed", "7")
    assert status == 0 and openmythos(capsys, *argv, "--seed", "7")[1] == first
    assert openmythos(capsys, *argv, "--seed", "8")[1] != first


def test_generate_adaptive_options(tmp_path, capsys):
    """Speculative greedy decoding prints the plain greedy text; an exit rule that stops
    every position after one loop prints the one-loop text; a shared cache runs."""
    from open_mythos import ExitRule

    model = byte_model("gqa")
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.5)  # loops that change the output
    write_training_checkpoint(tmp_path / "run", model)
    argv = ("generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "Hello", "--greedy",
            "--n-loops", "4", "--max-new-tokens", "12", "--no-echo")
    ids = torch.tensor([TOK.encode("Hello")])

    def text(n_loops, **kw):
        return TOK.decode(our_generate(model, ids, 12, n_loops, do_sample=False, **kw)[0, 5:])

    status, plain, _ = openmythos(capsys, *argv)
    assert status == 0 and plain == text(4) + "\n"
    assert openmythos(capsys, *argv, "--draft-tokens", "3", "--draft-loops", "1")[1] == plain
    assert openmythos(capsys, *argv, "--draft-tokens", "3", "--draft-lens", "head")[1] == plain
    rule = ExitRule(entropy=1e9)
    status, early, _ = openmythos(capsys, *argv, "--exit-entropy", "1e9")
    assert status == 0 and early == text(4, exit_rule=rule) + "\n" == text(1) + "\n"
    status, shared, _ = openmythos(capsys, *argv, "--depth-sharing", "last")
    assert status == 0 and shared == text(4, depth_sharing="last") + "\n"
    for bad, message in ((("--depth-sharing", "some"), "depth_sharing"),
                         (("--draft-tokens", "2", "--compile"), "does not take compile"),
                         (("--exit-kl", "-1"), "ExitRule.kl")):
        status, _, err = openmythos(capsys, *argv, *bad)
        assert status == 2 and message in err


def test_generate_applies_an_exports_configured_exit_rule(tmp_path, capsys):
    """An export whose config sets exit_rule (the Hugging Face model applies it to every
    forward) was decoded at full depth by ``generate``: the CLI and ``AutoModel`` gave two
    answers for one directory. Reference: our generate with and without the rule."""
    pytest.importorskip("transformers")
    from open_mythos import ExitRule
    from open_mythos.integrations.hf import OpenMythosForCausalLM

    model = byte_model("gqa", use_act=False)
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.5)  # loops that change the output
    torch.nn.init.normal_(model.embed.weight, std=0.02)  # not the input echoed at any depth
    ids = torch.tensor([TOK.encode("Hello")])

    def text(**kw):
        return TOK.decode(our_generate(model, ids, 12, 4, do_sample=False, **kw)[0, 5:])

    rule = ExitRule(entropy=1e9)  # every position stops after one loop
    assert text(exit_rule=rule) != text()
    OpenMythosForCausalLM.from_mythos(model, n_loops=4, exit_rule=rule).save_pretrained(
        tmp_path / "hf")
    argv = ("generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "Hello", "--greedy",
            "--max-new-tokens", "12", "--no-echo")
    status, early, err = openmythos(capsys, *argv)
    assert status == 0 and early == text(exit_rule=rule) + "\n"
    assert "the config's ExitRule(" in err
    assert openmythos(capsys, *argv, "--no-exit-rule")[1] == text() + "\n"
    assert openmythos(capsys, *argv, "--exit-kl", "1e-12")[1] == text(
        exit_rule=ExitRule(kl=1e-12)) + "\n"
    for bad, message in ((("--no-exit-rule", "--exit-kl", "0.1"), "contradicts"),
                         (("--compile",), "pass --no-exit-rule"),
                         (("--draft-tokens", "2"), "pass --no-exit-rule")):
        status, _, err = openmythos(capsys, *argv, *bad)
        assert status == 2 and message in err, (bad, err)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["exit_rule"] = {"kl": -1.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    status, _, err = openmythos(capsys, *argv)
    assert status == 2 and "config.json" in err and "kl" in err


def test_generate_reports_errors_with_status_2(tmp_path, capsys):
    status, _, err = openmythos(capsys, "generate", "--checkpoint", str(tmp_path / "missing"),
                                "--prompt", "x")
    assert status == 2 and "no checkpoint" in err
    write_training_checkpoint(tmp_path / "run", byte_model("gqa"))
    status, _, err = openmythos(capsys, "generate", "--checkpoint", str(tmp_path / "run"),
                                "--prompt", "x", "--max-new-tokens", "500")
    assert status == 2 and "context" in err
    # Without --max-new-tokens a model of a short context generates what fits after the
    # prompt (the default of 128 was an error on every shipped config of max_seq_len 64).
    limit = byte_model("gqa").cfg.max_seq_len
    assert limit < 128
    status, out, err = openmythos(capsys, "generate", "--checkpoint", str(tmp_path / "run"),
                                  "--prompt", "xy", "--greedy")
    assert status == 0, err
    assert 0 < int(re.search(r"\[(\d+) tokens", err).group(1)) <= limit - 2
    status, _, err = openmythos(capsys, "generate", "--checkpoint", str(tmp_path / "run"),
                                "--prompt", "x" * limit)
    assert status == 2 and "context" in err
    with pytest.raises(SystemExit):
        parse("generate", "--checkpoint", "x", "--prompt", "y", "--n-loops", "0")
    # Refused requests print no prompt first, and name the command-line option.
    for extra, says in ((["--temperature", "0"], "pass --greedy"),
                        (["--top-p", "2"], "top_p must be in (0, 1]"),
                        (["--compile", "--exit-kl", "0.1"], "exit rules need compile=False")):
        status, out, err = openmythos(capsys, "generate", "--checkpoint", str(tmp_path / "run"),
                                      "--prompt", "an echo", *extra)
        assert status == 2 and says in err and out == "", (extra, out, err)
    write_training_checkpoint(tmp_path / "dense", byte_baseline("gqa"))
    status, out, err = openmythos(capsys, "generate", "--checkpoint", str(tmp_path / "dense"),
                                  "--prompt", "x", "--n-loops", "3")
    assert status == 2 and "fixed-depth" in err and out == ""
    # Refused before the prompt is echoed (these were errors only after it), or refused
    # at all (options that were ignored without a word).
    for checkpoint, extra, says in (
            ("dense", ["--exit-kl", "0.1"], "only a looped model takes an exit rule"),
            ("dense", ["--draft-tokens", "2"], "only a looped model takes draft tokens"),
            ("dense", ["--depth-sharing", "last"], "only a looped model takes depth sharing"),
            ("run", ["--depth-sharing", "bogus"], "depth_sharing='bogus' is invalid"),
            ("run", ["--depth-sharing", "every:0"], "depth_sharing='every:0' is invalid"),
            ("run", ["--draft-loops", "2"], "give --draft-tokens K too"),
            ("run", ["--draft-lens", "head"], "give --draft-tokens K too"),
            ("run", ["--exit-min-loops", "2"], "--exit-min-loops needs a criterion")):
        status, out, err = openmythos(capsys, "generate", "--checkpoint",
                                      str(tmp_path / checkpoint), "--prompt", "x", *extra)
        assert status == 2 and says in err and out == "", (extra, out, err)
    # A second --prompt was kept and the first dropped without a word.
    with pytest.raises(SystemExit):
        parse("generate", "--checkpoint", "x", "--prompt", "0110=", "--prompt", "1=")
    assert "--prompt takes one value and was given twice ('0110=', then '1=')" \
        in capsys.readouterr().err


def test_info_names_an_unreadable_weights_file(tmp_path, capsys):
    from open_mythos.integrations.convert import training_to_safetensors

    write_training_checkpoint(tmp_path / "run", byte_model("gqa"))
    # A weights-only directory: no manifest whose sizes would catch the damage first.
    weights = training_to_safetensors(tmp_path / "run", tmp_path / "st") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3])  # truncated in its header
    status, _, err = openmythos(capsys, "info", str(weights.parent))
    assert status == 2 and f"{weights} is unreadable" in err and "Traceback" not in err


def test_info_prints_exact_counts_and_cache_sizes_of_a_variant(capsys):
    assert main(["info", "--variant", "mythos_1b", "--n-loops", "16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # Counts from the mythos_1b docstring; MLA caches 256 + 32 values per layer and depth.
    assert (info["total_params"], info["active_params"]) == (1_007_404_930, 299_616_130)
    assert info["cache_layers"] == 2 + 16 + 2
    assert info["kv_bytes_per_token"] == {"fp32": 20 * 288 * 4, "bf16": 20 * 288 * 2}
    assert info["flops_per_token"] == info["matmul_flops_per_token"] + 4096 * info[
        "attention_flops_per_position"]
    assert main(["info", "--variant", "1b", "--n-loops", "4"]) == 0
    text = capsys.readouterr().out
    assert "1,007,404,930" in text and "8 layers x 288 values" in text
    # n_loops=0 is an error, not the default depth (SPEC §3.10).
    assert main(["info", "--variant", "1b", "--n-loops", "0"]) == 2
    assert "--n-loops" in capsys.readouterr().err


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
@pytest.mark.parametrize("token_conv", [0, 4])
def test_kv_cache_formula_matches_a_real_cache(attn_type, token_conv):
    cfg = tiny_config(attn_type, act_threshold=float("inf"), token_conv=token_conv)
    model = OpenMythos(cfg).eval()
    T, n_loops = 12, 5
    cache = KVCache(T)
    model(torch.randint(0, cfg.vocab_size, (1, T)), n_loops, cache, 0)
    assert cache.nbytes() == T * info_cmd.kv_cache_bytes_per_token(cfg, n_loops, 4)
    info = info_cmd.model_info(cfg, "tiny", n_loops)
    assert info.kv_bytes_per_token["fp32"] * T == cache.nbytes()
    assert info.cache_layers == 1 + n_loops + 1


def test_flops_formula_matches_counted_matmuls():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_config("gqa", act_threshold=float("inf"))
    model = OpenMythos(cfg).eval()
    T, n_loops = 16, 3
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, T)), n_loops)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    dense = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    # The counter sees ordinary matmuls only (not grouped expert matmuls or SDPA): compare
    # them with the formula minus the routed experts' share.
    once, per_loop = info_cmd.matmul_params(cfg)
    per_expert = 3 * cfg.dim * cfg.expert_dim
    assert dense == 2 * T * (once + n_loops * (per_loop - cfg.n_experts_per_tok * per_expert))
    # Attention, by hand: QK^T and PV over head_dim per head, in every layer and depth.
    assert info_cmd.attention_flops_per_position(cfg, n_loops) == \
        (1 + n_loops + 1) * 2 * 2 * cfg.n_heads * cfg.head_dim


def test_info_reads_a_checkpoint(tmp_path, capsys):
    model = byte_model("gqa")
    write_training_checkpoint(tmp_path / "run", model)
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--json", "--context", "10"]) == 0
    info = json.loads(capsys.readouterr().out)
    from open_mythos.variants import count_parameters

    assert info["total_params"] == count_parameters(model).total
    assert info["n_loops"] == model.cfg.max_loop_iters and info["context"] == 10
    # FLOPs at a context the model cannot attend to are refused, not printed.
    beyond = str(model.cfg.max_seq_len + 1)
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--context", beyond]) == 2
    assert f"max_seq_len = {model.cfg.max_seq_len}" in capsys.readouterr().err


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_info_reports_a_dense_baseline_as_itself(attn_type, tmp_path, capsys):
    from open_mythos.registry import flops_per_token

    base = byte_baseline(attn_type, core_layers=3)
    cfg = base.cfg
    write_training_checkpoint(tmp_path / "run", base)
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--json", "--context", "10"]) == 0
    info = json.loads(capsys.readouterr().out)
    # The real count, from the module itself: no experts, so active == total.
    total = sum(p.numel() for p in base.parameters())
    assert (info["kind"], info["n_loops"]) == ("dense", None)
    assert (info["total_params"], info["active_params"]) == (total, total)
    # One cache entry per block, as a real forward writes them.
    cache = KVCache(8)
    with torch.no_grad():
        base(torch.randint(0, cfg.vocab_size, (1, 8)), kv_cache=cache)
    assert info["cache_layers"] == cfg.n_layers == 5
    assert info["kv_bytes_per_token"]["fp32"] * 8 == cache.nbytes()
    assert info["flops_per_token"] == flops_per_token(cfg, context_len=10)
    assert info["matmul_flops_per_token"] == flops_per_token(cfg)
    assert (info["matmul_params_once"], info["matmul_params_per_loop"]) == (
        flops_per_token(cfg) // 2, 0)

    assert main(["info", "--checkpoint", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "dense baseline" in text and "3 core blocks" in text and f"{total:,}" in text
    assert "recurrent" not in text and "experts" not in text
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--n-loops", "4"]) == 2
    assert "fixed depth" in capsys.readouterr().err


def test_serve_parser_defaults():
    args = parse("serve", "--checkpoint", "runs/x/checkpoints/step_00000010")
    assert (args.host, args.port, args.func) == ("127.0.0.1", 8000, serve_cmd.run)
    assert serve_cmd._default_name(args.checkpoint) == "x"
    # A port out of range is a usage error before the model loads (it was a uvicorn
    # traceback once the model had loaded).
    for bad in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as exit_:
            parse("serve", "--checkpoint", "x", "--port", bad)
        assert exit_.value.code == 2
    assert parse("serve", "--checkpoint", "x", "--port", "0").port == 0


def test_serve_on_a_busy_port_fails_before_loading_the_model(capsys, tmp_path):
    """The port is taken before the checkpoint is read (this one does not exist): a busy
    port is an error at once, not after a long load (it was a uvicorn traceback then)."""
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        status, _, err = openmythos(capsys, "serve", "--checkpoint", str(tmp_path / "none"),
                                    "--port", port)
    assert status == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert "checkpoint" not in err


@pytest.mark.slow  # two fresh interpreters importing torch: about 10 s on 2 busy cores
def test_console_script_and_python_dash_m_run_info_and_generate(tmp_path):
    """The installed ``openmythos`` console script (``[project.scripts]``) and
    ``python -m open_mythos``, in fresh processes, on this checkout's code."""
    script = Path(sys.executable).with_name("openmythos")
    assert script.is_file(), (f"{script} is missing: install the package (pip install -e "
                              "'.[dev]', as `make test` does)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([str(script), "info", "--variant", "mythos_1b"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1,007,404,930" in done.stdout
    model = byte_model("gqa")
    write_training_checkpoint(tmp_path / "run", model)
    done = subprocess.run(
        [sys.executable, "-m", "open_mythos", "generate", "--checkpoint", str(tmp_path / "run"),
         "--prompt", "Hi", "--greedy", "--n-loops", "2", "--max-new-tokens", "6", "--no-echo"],
        capture_output=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = our_generate(model, torch.tensor([TOK.encode("Hi")]), 6, 2, do_sample=False)[0, 2:]
    assert done.stdout.decode() == TOK.decode(expected) + "\n"


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``openmythos info ... | head -1``: the pipe closes before the output is written; the
    command exits 141 (as a process killed by SIGPIPE) with no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "open_mythos", "info", "--variant", "mythos_1b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started: every write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err


def test_standard_output_that_cannot_be_written_is_one_line(capsys, monkeypatch):
    """A full disk (``>/dev/full``) raised a traceback from the command's print, status 1;
    a closed standard output lost a command's results (generate: an AttributeError). A
    Ctrl-C while the commands load (seconds) printed a traceback of the imports."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "open_mythos", "info", "--variant", "mythos_1b"]
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            done = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, timeout=120)
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, err
        assert err.strip() == ("openmythos info: error: cannot write to standard output: "
                               "No space left on device")
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                          preexec_fn=lambda: os.close(1))  # started with fd 1 closed
    assert done.returncode == 2
    assert "standard output is closed" in done.stderr.decode()
    from open_mythos import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["info", "--variant", "mythos_1b"]) == 130
    assert capsys.readouterr().err == "openmythos: interrupted\n"
