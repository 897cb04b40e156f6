"""``benchmarks/inference.py``: the MoE dispatch section (both dispatches timed, the one
taken named), the prefill section (logits of every position against the last one's) and
the session section."""

from __future__ import annotations

from tests.conftest import load_benchmark


def test_prefill_section_times_both_prefills_and_checks_the_logits(capsys, monkeypatch):
    bench = load_benchmark("inference", monkeypatch)
    bench.main(["--only", "prefill", "--quick", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.split("## Prefill")[1].splitlines()
            if line.strip().startswith("1000 ")]
    assert [r[1] for r in rows] == ["64", "512"] and all(r[-1] == "yes" for r in rows)
    for r in rows:  # the speed-up column is its row's ratio
        every, last, speedup = float(r[2]), float(r[3]), float(r[4].rstrip("x"))
        assert abs(speedup - every / last) <= 0.005 + speedup * (0.05 / every + 0.05 / last)
    assert "## Greedy decode" not in out


def test_moe_dispatch_section(capsys, monkeypatch):
    bench = load_benchmark("inference", monkeypatch)
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


def test_session_section_goes_eager_compiling_compiled(monkeypatch):
    """The default generate over a session: eager calls until their steps add up to the
    policy's compilation estimate, one compiling call, then compiled calls (the fixed-shape
    step run uncompiled here), each phase against the reference-style model."""
    import open_mythos.inference.autocompile as autocompile
    import open_mythos.inference.static as static

    bench = load_benchmark("inference", monkeypatch)
    small = bench.small_config
    monkeypatch.setattr(bench, "small_config", lambda attn: small(
        attn, dim=32, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=96, expert_dim=16,
        n_experts=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8))
    monkeypatch.setattr(static, "_compiled", lambda device_type, shape: static.decode_step)
    monkeypatch.setattr(autocompile, "compile_unavailable", lambda device_type: None)
    rows, notes = bench.session_rows("gqa", 8, 6, 2, after_s=0.02, max_calls=200, cost_s=0.02)
    assert [(r[2], r[3] if r[2] == "compiling" else "n") for r in rows] == [
        ("eager", "n"), ("compiling", 1), ("compiled", "n")]
    for r in rows:
        ours, ref, ratio = float(r[5]), float(r[6]), float(r[7].rstrip("x"))
        assert abs(ratio - ours / ref) <= 0.01 * ratio + 0.005
    assert len(notes) == 1 and "the compiling call took" in notes[0]
