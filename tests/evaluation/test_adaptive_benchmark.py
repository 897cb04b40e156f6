"""``benchmarks/adaptive.py`` runs on a task run and a text run and prints its tables."""

from __future__ import annotations

import pytest

from open_mythos.training import Trainer
from open_mythos.training.config import UNSET
from tests.conftest import load_benchmark
from tests.training.conftest import tiny_config


def test_adaptive_benchmark_tables_and_plot(tmp_path, capsys, monkeypatch):
    Trainer(tiny_config(tmp_path / "task", run__steps=3)).train()
    Trainer(tiny_config(tmp_path / "text", run__steps=3, data__task=UNSET)).train()
    bench = load_benchmark("adaptive", monkeypatch)
    plot = tmp_path / "exits.png"
    assert bench.main(["--task-run", str(tmp_path / "task"), "--text-run", str(tmp_path / "text"),
                       "--loops", "3", "--n-examples", "8", "--prompts", "2", "--prompt-len", "8",
                       "--new-tokens", "4", "--speculative-batch", "2",
                       "--speculative-tokens", "6", "--speculative-prompts", "4",
                       "--cache-runs", str(tmp_path / "text"),
                       "--cache-loops", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = len(bench.RULES) + 2  # and fixed depths 1 and 2
    for table in ("## Task run", "## Text run"):
        section = out.split(table)[1]
        body = [line for line in section.splitlines()[4:] if line.strip()][:rows]
        assert [line.split()[0] for line in body][:2] == ["none", "kl<0.001"]
        assert len(body) == rows and body[-1].startswith("fixed 2 loops")
    # The rule "none" at --loops runs every loop; "fixed 1 loops" runs one.
    assert "  3.00     0%" in out and "  1.00    67%" in out
    assert plot.stat().st_size > 10_000
    # Speculative decoding: one plain row and eight draft settings (four through the Coda,
    # four through the head lens), each decoding 4 prompts in 2 batches of 2, all with the
    # same tokens.
    spec = out.split("self-speculative")[1].splitlines()
    rows = [line for line in spec if line.strip().startswith("2 ")]
    assert len(rows) == 9 and all(line.rstrip().endswith("100%") for line in rows)
    assert all(line.split()[1] == "4" for line in rows)
    assert sum("head lens" in line for line in rows) == 4
    # Its cost model: every forward's time over the plain decode step's (3 loops, 1 token).
    costs = out.split("Cost of one cached forward at batch 2")[1].splitlines()
    cells = {line[:26].strip(): line.split()[-4:] for line in costs[4:12]}
    assert len(cells) == 8 and cells["verify 6 drafts"][:2] == ["7", "3"]
    assert cells["draft, 1 loop, head lens"][:2] == ["1", "1"]
    plain_ms = float(cells["plain step (1 token)"][2])
    for *_, ms, ratio in cells.values():
        # Printed to 2 decimals each: allow their rounding.
        slack = 0.005 + float(ratio) * (0.005 / float(ms) + 0.005 / plain_ms) + 1e-6
        assert abs(float(ratio) - float(ms) / plain_ms) <= slack
    # Cache modes: per-depth at 2 loops holds 1 prelude + 2 loops + 1 coda entries, "last"
    # 1 + 1 + 1; the fp32 per-depth GQA cache is the reference's size.
    cache = {tuple(line.split()[3:5]): line.split() for line in out.split("Depth-sharing")[1]
             .splitlines() if line.startswith(f"{tmp_path / 'text'} ")}
    per_depth, last = cache[("float32", "per_depth")], cache[("float32", "last")]
    assert per_depth[7] == "1.0x" and float(per_depth[5]) == 4 / 3 * float(last[5])
    assert float(cache[("bfloat16", "per_depth")][5]) == float(per_depth[5]) / 2
    # Options the runs cannot serve are errors, not shorter prompts or a traceback.
    # Checked before the first table: a prompt and its tokens the context cannot hold.
    capsys.readouterr()
    for extra, says in ((["--prompt-len", "999"], "--prompt-len 999 + --new-tokens 32"),
                        (["--prompt-len", "48"], "--prompt-len 48 + --new-tokens 32"),
                        (["--speculative-tokens", "60"], "--speculative-tokens 60 exceeds")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--text-run", str(tmp_path / "text"), *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says in err and "max_seq_len=64" in err
    with pytest.raises(SystemExit, match="--prompt-len 40: the run's validation sequences"):
        bench.main(["--text-run", str(tmp_path / "text"), "--prompt-len", "40",
                    "--new-tokens", "8", "--speculative-tokens", "8"])
    with pytest.raises(SystemExit, match="--split: .*unknown split 'nope'"):
        bench.main(["--task-run", str(tmp_path / "task"), "--split", "nope"])
