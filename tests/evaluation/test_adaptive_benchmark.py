"""``benchmarks/adaptive.py`` runs on a task run and a text run and prints its tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from open_mythos.training import Trainer
from open_mythos.training.config import UNSET
from tests.training.conftest import tiny_config

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "adaptive.py"


def test_adaptive_benchmark_tables_and_plot(tmp_path, capsys, monkeypatch):
    Trainer(tiny_config(tmp_path / "task", run__steps=3)).train()
    Trainer(tiny_config(tmp_path / "text", run__steps=3, data__task=UNSET)).train()
    spec = importlib.util.spec_from_file_location("adaptive_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks itself up
    spec.loader.exec_module(bench)
    plot = tmp_path / "exits.png"
    assert bench.main(["--task-run", str(tmp_path / "task"), "--text-run", str(tmp_path / "text"),
                       "--loops", "3", "--n-examples", "8", "--prompts", "2", "--prompt-len", "8",
                       "--new-tokens", "4", "--speculative-batch", "2",
                       "--speculative-tokens", "6", "--plot", str(plot)]) == 0
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
    # Speculative decoding: one plain row and six draft settings, all with the same tokens.
    spec = out.split("self-speculative")[1].splitlines()
    rows = [line for line in spec if line.strip().startswith("2 ")]
    assert len(rows) == 7 and all(line.rstrip().endswith("100%") for line in rows)
