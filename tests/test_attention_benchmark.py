"""``benchmarks/attention.py``: both attention routes timed per shape, the route ``attend``
takes named, both outputs compared."""

from __future__ import annotations

from tests.conftest import load_benchmark


def test_attention_benchmark_tables(capsys, monkeypatch):
    bench = load_benchmark("attention", monkeypatch)
    monkeypatch.setattr(bench, "QUICK_SHAPES", [(36, 16), (128, 16)])
    monkeypatch.setattr(bench, "TOKENS", 512)
    monkeypatch.setattr(bench, "native_bf16", lambda: False)
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: None)  # process-wide otherwise
    bench.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert "bf16: skipped (no native bf16" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("float32 ")]
    assert [(r[1], r[4], r[8]) for r in rows] == [
        ("36", "train", "explicit"), ("36", "infer", "sdpa"),
        ("128", "train", "sdpa"), ("128", "infer", "sdpa")]
    assert all(float(r[-1]) < 1e-5 for r in rows)  # both routes give the same output
