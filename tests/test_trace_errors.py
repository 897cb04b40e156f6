"""experiments/trace_errors.py: where a looped model's per-loop readouts leave the chain."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from open_mythos import MythosConfig, OpenMythos
from open_mythos.tasks import VOCAB_SIZE
from open_mythos.tasks.batching import encode_prompt
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "trace_errors.py"


@pytest.fixture
def trace_errors(monkeypatch):
    return load_script(SCRIPT, "trace_errors", monkeypatch)


# Chain a -> b -> c -> 7 in the prompt "c=7;a=b;d=4;b=c?a".
PROMPT, QUERY, TRACE = "c=7;a=b;d=4;b=c?a", "a", ["b", "c", "7"]


@pytest.mark.parametrize("named, expected", [
    (["b", "c", "7", "7"], None),                # follows the chain, then holds
    (["a", "b", "c"], (1, "stall")),             # the query again at loop 1
    (["b", "b", "7"], (2, "stall")),             # step 1 again at loop 2
    (["c", "c", "7"], (1, "ahead")),             # skips to step 2
    (["b", "7", "7"], (2, "answer")),            # the answer one step early
    (["b", "c", "4"], (3, "prompt")),            # another digit of the prompt
    (["b", "x", "7"], (2, "other")),             # not in the prompt at all
])
def test_classify_names_the_first_wrong_loop_and_what_it_names(trace_errors, named, expected):
    assert trace_errors.classify(QUERY, TRACE, named, PROMPT) == expected


def test_classify_needs_a_readout_per_step(trace_errors):
    with pytest.raises(ValueError, match="2 readouts cannot check a trace of 3 steps"):
        trace_errors.classify(QUERY, TRACE, ["b", "c"], PROMPT)


def test_named_per_loop_matches_a_separate_forward_per_depth(trace_errors):
    """One readout forward per batch names at each loop what a forward of that many loops
    names through the head lens (ACT off: a state is the last loop's); prompts of several
    lengths are batched apart."""
    torch.manual_seed(0)
    model = OpenMythos(MythosConfig(vocab_size=VOCAB_SIZE, dim=32, n_heads=4, n_kv_heads=2,
                                    max_seq_len=32, max_loop_iters=3, n_experts=4,
                                    n_experts_per_tok=2, expert_dim=16, use_act=False)).eval()
    prompts = ["c=7;a=b;b=c?a", "a=1?a", "q=3;r=q?r", "d=5;e=d?e", "x=9?x"]
    named = trace_errors.named_per_loop(model, prompts, n_loops=4, batch_size=2)
    assert [len(n) for n in named] == [4] * len(prompts)
    distinct = set()
    for prompt, names in zip(prompts, named):
        ids = encode_prompt(prompt).unsqueeze(0)
        for d in range(1, 5):
            with torch.no_grad():
                h = model.hidden_states(ids, n_loops=d, lens="head")
            token = int(model.head(h[0, -1]).argmax())
            assert names[d - 1] == (chr(token) if token < 128 else "\ufffd")
            distinct.add(names[d - 1])
    assert len(distinct) > 1  # a random model names several things: the check has teeth


@pytest.mark.slow
def test_every_example_is_counted_once_on_a_trained_run(tmp_path, trace_errors):
    """``main`` on a briefly trained multihop run: per level, the exact examples and the
    first wrong loops add up to the examples, and the accuracies cover level..loops."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "open_mythos", "train", "--config",
         str(REPO / "configs" / "multihop_chain.toml"), "--out", str(run),
         "--set", "run.init_from=", "--set", "run.steps=2", "--set", "run.save_every=2",
         "--set", "data.batch_size=8", "--set", "run.compile=off", "--set", "run.progress=false"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "errors.json"
    assert trace_errors.main(["--checkpoint", str(run), "--levels", "2,4", "--loops", "3",
                              "--n-examples", "12", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["level"] for r in results] == [2, 4]
    # The same run's dense baseline has no loops to read: refused in one line.
    base = tmp_path / "base"
    done = subprocess.run(
        [sys.executable, "-m", "open_mythos", "train", "--config",
         str(REPO / "configs" / "multihop_chain.toml"), "--out", str(base),
         "--set", "run.init_from=", "--set", "run.steps=1", "--set", "run.save_every=1",
         "--set", "data.batch_size=8", "--set", "run.compile=off", "--set", "run.progress=false",
         "--set", "model.core_layers=3"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(base)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "fixed-depth model (DenseBaseline)" in refused.stderr
    assert "Traceback" not in refused.stderr
    # A level the task's prompts cannot hold, a knob it does not take: one line each.
    assert trace_errors.main(["--checkpoint", str(run), "--levels", "9"]) == 2
    assert trace_errors.main(["--checkpoint", str(run), "--task-args", '{"colour": 1}']) == 2
    for r in results:
        assert r["exact"] + sum(r["first_wrong"].values()) == r["n"] == 12
        assert sum(r["kinds"].values()) == r["n"] - r["exact"]
        loops = max(r["level"], 3)
        assert sorted(int(d) for d in r["accuracy"]) == list(range(r["level"], loops + 1))
    # Level 4 above --loops 3 is read at 4 loops: the column says so (it said "at 3").
    from types import SimpleNamespace
    rows = [SimpleNamespace(**{**r, "accuracy": {int(k): v for k, v in r["accuracy"].items()},
                               "first_wrong": {int(k): v for k, v in r["first_wrong"].items()}})
            for r in results]
    header = trace_errors.table(rows, 3).splitlines()[0]
    assert "| answer at max(level, 3) |" in header


def test_a_path_without_a_checkpoint_is_refused(tmp_path, trace_errors, capsys):
    assert trace_errors.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trace_errors: ") and "missing" in err and "Traceback" not in err
