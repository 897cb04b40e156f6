"""``benchmarks/train.py`` and its reference-style baseline: the baseline computes what our
model computes (same parameters, same FLOPs, the same MoE output), and the MoE section runs
and prints its rows."""

from __future__ import annotations

import pytest
import torch

from open_mythos import MythosConfig, OpenMythos
from open_mythos.layers.moe import MoEFFN
from tests.conftest import load_benchmark


def config(attn_type: str) -> MythosConfig:
    return MythosConfig(
        vocab_size=101, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=3,
        prelude_layers=1, coda_layers=1, attn_type=attn_type, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_experts=8,
        n_shared_experts=1, n_experts_per_tok=2, expert_dim=16, lora_rank=4)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_reference_style_model_has_our_parameters_and_flops(attn_type, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    ref_style = load_benchmark("reference_style", monkeypatch)
    bench = load_benchmark("train", monkeypatch)
    cfg = config(attn_type)
    ours, ref = OpenMythos(cfg), ref_style.ReferenceStyleLM(cfg)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    flops = []
    for model in (ours, ref):
        with FlopCounterMode(display=False, custom_mapping=bench.flop_mapping()) as counter:
            model(ids, n_loops=3).sum().backward()
        flops.append(counter.get_total_flops())
    # With the benchmark's formulas for the CPU attention kernels the counts agree up to
    # the causal mask's handling (SDPA's flash kernel is counted as full attention).
    assert flops[0] == pytest.approx(flops[1], rel=0.02)


def test_reference_style_moe_equals_ours_in_float64(monkeypatch):
    ref_style = load_benchmark("reference_style", monkeypatch)
    cfg = config("gqa")
    torch.manual_seed(0)
    ours = MoEFFN(cfg).double()
    torch.nn.init.normal_(ours.router.weight, std=0.5)  # distinct top-k choices
    ref = ref_style.LoopMoE(cfg).double()
    H = cfg.expert_dim
    with torch.no_grad():
        ref.router.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ref.experts):
            expert.gate.weight.copy_(ours.w_gate_up[e, :, :H].t())
            expert.up.weight.copy_(ours.w_gate_up[e, :, H:].t())
            expert.down.weight.copy_(ours.w_down[e].t())
        for name in ("gate", "up", "down"):
            getattr(ref.shared[0], name).weight.copy_(getattr(ours.shared, name).weight)
    x = torch.randn(2, 16, cfg.dim, dtype=torch.float64)
    torch.testing.assert_close(ref(x), ours(x), rtol=1e-10, atol=1e-12)


def test_moe_section_prints_its_rows(monkeypatch, capsys):
    bench = load_benchmark("train", monkeypatch)
    bench.main(["--quick", "--only", "moe", "--threads", "1"])
    out = capsys.readouterr().out
    assert "native bf16:" in out
    for kind in ("fwd", "fwd+bwd"):
        line = next(row for row in out.splitlines()
                    if row.startswith(f"MoE {kind}: sorted grouped"))
        assert line.split()[-1].endswith("x") and "%" in line
    # The routed experts' matmuls alone: 1024 tokens x top-4, dim 512, expert width 128,
    # forward and both gradients of the two projections (gate/up 2x128 wide, down 128).
    routed = 3 * 2 * (1024 * 4) * 512 * (2 * 128 + 128) / 1e9
    # bf16 rows where the CPU has native bf16 matmuls, else one row saying they are skipped.
    native_bf16 = any(row.startswith("MoE fwd: sorted grouped") and " bf16 " in row
                      for row in out.splitlines())
    assert native_bf16 != ("skipped: no native bf16 matmul on this CPU" in out)
    for dtype in ("fp32", "bf16") if native_bf16 else ("fp32",):
        for label in ("MoE routed matmuls (fwd+bwd): torch._grouped_mm",
                      "MoE routed matmuls: bmm", "MoE routed matmuls: one expert's weights"):
            line = next(row for row in out.splitlines()
                        if row.startswith(label) and f" {dtype} " in row)
            assert f" {routed:.2f} " in line


def test_task_section_counts_fewer_flops_at_the_supervised_positions_only(monkeypatch, capsys):
    bench = load_benchmark("train", monkeypatch)
    bench.main(["--quick", "--only", "task", "--threads", "1"])
    out = capsys.readouterr().out.splitlines()
    full = next(row for row in out if row.startswith("task (") and "all logits" in row)
    rows = next(row for row in out if row.startswith("task (") and "supervised positions" in row)
    gflop = [float(row.split("fp32")[1].split()[1]) for row in (full, rows)]
    assert gflop[1] < gflop[0] and rows.split()[-1].endswith("x")


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_reference_style_cached_decoding_equals_full_forwards(attn_type, monkeypatch):
    ref_style = load_benchmark("reference_style", monkeypatch)
    torch.manual_seed(0)
    model = ref_style.ReferenceStyleLM(config(attn_type)).eval()
    ids = torch.randint(0, 101, (2, 8))
    cached = torch.cat(list(ref_style.greedy_stream(model, ids, 5, 3)), 1)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq, 3)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq[:, 8:])


def test_profile_lists_the_operators_that_take_a_steps_time(monkeypatch, capsys):
    """``--profile N``: where a step's time goes, per step. Reference: the step's own
    matmul count (two per linear layer in the backward, one in the forward), and shares
    that add up to at most 100%."""
    bench = load_benchmark("train", monkeypatch)
    torch.manual_seed(0)
    model = OpenMythos(config("gqa")).train()
    ids = torch.randint(0, 101, (2, 16))
    bench.print_profile("tiny", bench.make_step(model, ids, bf16=False, n_loops=2), 40,
                        torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("profile: tiny: aten ops by self CPU time, per step")
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines() if line.startswith("| aten::"))}
    assert 0 < len(rows) <= 40 and "aten::mm" in rows
    assert sum(float(r[2].rstrip("%")) for r in rows.values()) <= 100 + len(rows)  # rounding
    assert int(rows["aten::mm"][0]) >= 3 * 2  # a forward and two gradients, some layers
