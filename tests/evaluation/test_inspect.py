"""``openmythos inspect``: the per-loop readout equals separate forwards at each depth, and
the figures and JSON are written."""

from __future__ import annotations

import json

import torch

from open_mythos.checkpoints import load_model
from open_mythos.cli import main
from open_mythos.commands import inspect as inspect_command
from open_mythos.tokenizers import ByteTokenizer
from open_mythos.training import Trainer
from tests.training.conftest import tiny_config


def test_inspect_reads_out_every_loop(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(run, run__steps=3, model__use_act=False)).train()
    prompt = "0110"
    out = tmp_path / "inspect"
    assert main(["inspect", "--checkpoint", str(run), "--prompt", prompt, "--n-loops", "5",
                 "--exit-kl", "0.001", "--exit-min-loops", "2", "--lens", "coda",
                 "--out", str(out)]) == 0
    first = capsys.readouterr()
    assert "the exit rule decides on the head lens" in first.err
    data = json.loads((out / "inspect.json").read_text())
    assert data["lens"] == "coda"
    model = load_model(run).model.eval()
    ids = torch.tensor([ByteTokenizer().encode(prompt, add_bos=True)])
    assert len(data["top"]) == 5 and len(data["top"][0]) == ids.shape[1]
    # ACT off: the coda readout after d loops is the output of a d-loop forward.
    with torch.no_grad():
        logp = [torch.log_softmax(model(ids, n_loops=d)[0].double(), -1) for d in range(1, 6)]
    for d in range(5):
        assert data["top"][d] == logp[d].argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(data["prob"][d], dtype=torch.float64),
                                   logp[d].exp().max(-1).values, rtol=1e-4, atol=1e-6)
    for d in range(1, 5):
        kl = (logp[d].exp() * (logp[d] - logp[d - 1])).sum(-1)
        torch.testing.assert_close(torch.tensor(data["kl"][d - 1], dtype=torch.float64), kl,
                                   rtol=1e-3, atol=1e-6)
    assert data["act_loops"] is None
    assert all(2 <= k <= 5 for k in data["exit_loops"])
    for name in ("lens.png", "kl.png", "depth.png"):
        assert (out / name).stat().st_size > 5_000
    printed = first.out
    assert printed.splitlines()[0].split()[:2] == ["loop", "<bos>"]
    # With a rule and no --lens, the KL shown is the rule's own (the head lens): it showed
    # the coda lens's KL beside exit depths the rule had read off the head lens.
    assert main(["inspect", "--checkpoint", str(run), "--prompt", prompt, "--n-loops", "5",
                 "--exit-kl", "0.001", "--out", str(out)]) == 0
    assert json.loads((out / "inspect.json").read_text())["lens"] == "head"
    assert "note" not in capsys.readouterr().err
    # Again without an exit rule, at one loop: no KL or depth figure, and none left over.
    assert main(["inspect", "--checkpoint", str(run), "--prompt", prompt, "--n-loops", "1",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["lens.png"]
    # The bytes of a multi-byte character are told apart (each was labelled "\ufffd").
    assert main(["inspect", "--checkpoint", str(run), "--prompt", "0\u00e9", "--n-loops", "1",
                 "--out", str(out)]) == 0
    assert json.loads((out / "inspect.json").read_text())["tokens"] == [
        "<bos>", "0", "\\xc3", "\\xa9"]


def test_inspect_errors_are_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny_config(run, run__steps=1)).train()
    assert main(["inspect", "--checkpoint", str(run), "--prompt", "01", "--exit-kl", "-1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "ExitRule.kl" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "01",
                 "--out", str(tmp_path / "x")]) == 2
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["inspect", "--checkpoint", str(run), "--prompt", "01",
                 "--out", str(a_file)]) == 2
    assert "not a directory" in capsys.readouterr().err
    # A readout too large to hold fails at once, before the forward (the bound lowered to
    # what this tiny model reaches).
    monkeypatch.setattr(inspect_command, "MAX_READOUT_ENTRIES", 8 * 3 * 259)
    assert main(["inspect", "--checkpoint", str(run), "--prompt", "01", "--n-loops", "9",
                 "--out", str(tmp_path / "x")]) == 2
    assert "too large a readout" in capsys.readouterr().err


def test_inspect_stopped_or_failing_midway_leaves_the_earlier_prompts_files(
        tmp_path, capsys, monkeypatch):
    """inspect.json was written into --out first, the figures after it and the earlier
    prompt's stale figures last: Ctrl-C or a full disk in between left the new prompt's JSON
    beside the old prompt's figures (and a traceback). Reference: the earlier files."""
    run = tmp_path / "run"
    Trainer(tiny_config(run, run__steps=1, model__use_act=False)).train()
    out = tmp_path / "inspect"
    args = ["inspect", "--checkpoint", str(run), "--out", str(out)]
    assert main([*args, "--prompt", "0110", "--n-loops", "3", "--exit-kl", "0.01"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"inspect.json", "lens.png", "kl.png", "depth.png"} <= set(before)
    real = inspect_command._plot_kl

    def fails(error):
        def plot(*a, **kw):
            raise error
        return plot

    for error, code in ((KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), 2)):
        monkeypatch.setattr(inspect_command, "_plot_kl", fails(error))
        assert main([*args, "--prompt", "11111111", "--n-loops", "2"]) == code
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "No space left on device" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.setattr(inspect_command, "_plot_kl", real)
    assert main([*args, "--prompt", "11111111", "--n-loops", "2"]) == 0
    assert json.loads((out / "inspect.json").read_text())["n_loops"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["inspect.json", "kl.png", "lens.png"]
