"""``benchmarks/inference.py --only moe``: both MoE dispatches timed, the one taken named."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


def test_moe_dispatch_section(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("inference_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    # A small layer (gathered for a few tokens) and a large one (sorted from one token).
    monkeypatch.setattr(bench, "MOE_SHAPES", ((64, 32, 4, 2), (1024, 512, 64, 4)))
    bench.main(["--only", "moe", "--quick", "--repeats", "2", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.split("MoE dispatch")[1].splitlines()
            if line.startswith(("64/32", "1024/512"))]
    assert [(r[0], r[3], r[-1]) for r in rows] == [
        ("64/32,", "1", "gather"), ("64/32,", "4", "gather"), ("64/32,", "16", "gather"),
        ("1024/512,", "1", "sorted"), ("1024/512,", "4", "sorted"),
        ("1024/512,", "16", "sorted")]
    # Copied weights: slots x one expert's 64 x 64 + 32 x 64 elements.
    assert rows[0][5] == f"{2 * 6144 / 1e6:.2f}M"
    # The speed-up column is sorted ms over gather ms of its own row.
    for r in rows:
        gather, sort, speedup = float(r[6]), float(r[7]), float(r[8].rstrip("x"))
        slack = 0.005 + speedup * (0.0005 / gather + 0.0005 / sort) + 1e-6  # 3-decimal ms
        assert abs(speedup - sort / gather) <= slack
    assert "## Greedy decode" not in out and "KV cache bytes" not in out
