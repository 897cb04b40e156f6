"""Training-step benchmark: step time, achieved FLOP/s against the machine's matmul peak,
and ratios against baselines measured in the same run.

    python benchmarks/train.py                 # everything (~10 minutes on 2 cores)
    python benchmarks/train.py --quick         # fewer repeats, no bf16/compiled 63M rows
    python benchmarks/train.py --only moe      # one section: moe | small | 63m | dense

A train step is forward + cross-entropy + backward + fused AdamW step (+ the router-bias
update for OpenMythos). FLOPs are counted once per configuration by
``torch.utils.flop_counter.FlopCounterMode`` on one eager fp32 step (matmuls and attention;
the grouped expert matmuls and the CPU attention kernels are added to its registry here).
The peaks are one large fp32 and one bf16 matmul measured at the start of the run.

Sections:
    moe    the MoE layer alone (64 experts top-4, 1024 tokens, dim 512, expert dim 128, no
           shared expert), forward and forward+backward, against a faithful re-implementation
           of the reference's dispatch (a Python loop over top-k slots x experts with a boolean
           mask per expert);
    small  the small GQA config (dim 256, 8 heads / 2 kv heads, 8 experts top-2, expert dim
           64, 1 prelude + 1 coda, vocab 1000) at B=4, T=128, 4 loops;
    63m    the 63M-parameter GQA config (dim 768, 12 heads / 4 kv heads, 2 + 2 dense layers,
           16 experts top-2 + 1 shared, expert dim 512, vocab 32000) at B=2, T=256, 4 loops;
    dense  PyTorch's own ``nn.TransformerEncoder`` (8 layers, dim 768, tied 32000-token LM
           head) with its FFN width chosen so that a step has the 63M config's FLOPs.

"Compiled" compiles every TransformerBlock (the recurrent loop stays in Python); bf16 rows
run under ``torch.autocast``. Rows whose matmul peak is far below fp32's (bf16 on CPUs
without native bf16 instructions) are skipped unless ``--force-bf16``.

By default glibc's allocator is told to keep freed memory (``--malloc default`` to opt
out): large tensors are otherwise returned to the OS on every free and page-faulted back on
every step, which on virtual machines costs ~0.6 ms per MB (20 ms for one 33 MB gradient).
Every row, baselines included, runs under the same setting.

Run it on an otherwise idle machine: with other busy processes, OpenMP's spinning barriers
make multi-threaded steps many times slower (``OMP_WAIT_POLICY=PASSIVE`` limits the damage).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import count_flops, matmul_peak, median_time, print_table  # noqa: E402

from open_mythos import MythosConfig, OpenMythos  # noqa: E402
from open_mythos.layers.block import TransformerBlock  # noqa: E402
from open_mythos.layers.moe import Expert, MoEFFN  # noqa: E402
from open_mythos.variants import count_parameters  # noqa: E402

SECTIONS = ("moe", "small", "63m", "dense")
# SPEC section 5: the reference implementation on the project's benchmark machine.
REFERENCE_S = {"moe fwd": 0.097, "moe fwd+bwd": 0.402, "small": 0.168, "63m": 2.15, "dense": 1.79}

SMALL = MythosConfig(
    vocab_size=1000, dim=256, n_heads=8, n_kv_heads=2, max_seq_len=128, max_loop_iters=4,
    prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=8, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=64, lora_rank=8,
)
M63 = MythosConfig(
    vocab_size=32000, dim=768, n_heads=12, n_kv_heads=4, max_seq_len=256, max_loop_iters=4,
    prelude_layers=2, coda_layers=2, attn_type="gqa", n_experts=16, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=512, lora_rank=16,
)
MOE = MythosConfig(
    vocab_size=1000, dim=512, n_heads=8, n_kv_heads=8, attn_type="gqa", n_experts=64,
    n_shared_experts=0, n_experts_per_tok=4, expert_dim=128,
)


# FLOP counting ---------------------------------------------------------------------------

def _grouped_flops(a_shape, b_shape, *args, **kwargs) -> int:
    # (N, d_in) x (E, d_in, d_out), or (d_in, N) x (N, d_out) -> (E, d_in, d_out)
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def _weight_grad_flops(x_shape, grad_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * grad_shape[1]


def _attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    b, h, s_q, d_q = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * (d_q + d_v)  # QK^T and PV, causal mask not discounted


def _attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return 2 * _attention_flops(q_shape, k_shape, v_shape)  # dQ, dK, dV, dP


def flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {
        aten._grouped_mm: _grouped_flops,
        torch.ops.open_mythos.grouped_mm: _grouped_flops,
        torch.ops.open_mythos.grouped_mm_weight_grad: _weight_grad_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    }
    return mapping  # keyed by overload packet, as the counter looks ops up


def step_flops(step: Callable[[], object]) -> int:
    return count_flops(step, custom_mapping=flop_mapping())


# Workloads -------------------------------------------------------------------------------

class NaiveMoE(nn.Module):
    """The reference's dispatch, with the weights of a :class:`MoEFFN` copied per expert."""

    def __init__(self, moe: MoEFFN):
        super().__init__()
        H = moe.expert_dim
        self.topk, self.n_experts = moe.topk, moe.n_experts
        self.router = copy.deepcopy(moe.router)
        self.register_buffer("router_bias", moe.router_bias.clone())
        self.routed_experts = nn.ModuleList(Expert(moe.dim, H) for _ in range(moe.n_experts))
        with torch.no_grad():
            for e, ex in enumerate(self.routed_experts):
                ex.gate.weight.copy_(moe.w_gate_up[e, :, :H].t())
                ex.up.weight.copy_(moe.w_gate_up[e, :, H:].t())
                ex.down.weight.copy_(moe.w_down[e].t())

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        logits = self.router(flat)
        scores = F.softmax(logits, dim=-1)
        _, topk_idx = (logits + self.router_bias).topk(self.topk, dim=-1)
        topk_scores = scores.gather(-1, topk_idx)
        topk_scores = topk_scores / topk_scores.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for i in range(self.topk):
            expert_ids = topk_idx[:, i]
            token_scores = topk_scores[:, i].unsqueeze(-1)
            for eid in range(self.n_experts):
                mask = expert_ids == eid
                if not mask.any():
                    continue
                out[mask] += token_scores[mask] * self.routed_experts[eid](flat[mask])
        return out


class DenseLM(nn.Module):
    """``nn.TransformerEncoder`` language model (pre-norm, GELU, causal, tied head)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.encoder(self.embed(ids), mask=mask, is_causal=True)))


def make_step(model: nn.Module, ids: torch.Tensor, bf16: bool, **forward_kwargs):
    """One training step closure: forward, CE loss, backward, fused AdamW, zero_grad."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.head.weight.shape[0]
    is_mythos = isinstance(model, OpenMythos)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, **forward_kwargs)
            loss = F.cross_entropy(logits.float().view(-1, vocab), ids.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if is_mythos:
            model.update_router_bias()

    return step


def compile_blocks(model: OpenMythos) -> OpenMythos:
    # Fresh caches: blocks of another config compiled earlier in this run would otherwise
    # turn on dynamic shapes for this one.
    torch._dynamo.reset()
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile(fullgraph=True)
    return model


@dataclass
class Peaks:
    fp32: float
    bf16: float
    bf16_n: int


def measure_peaks(quick: bool) -> Peaks:
    fp32 = matmul_peak(torch.float32, n=2048, repeats=3 if quick else 5)
    # Probe bf16 small first: without native bf16 instructions it can be 100x slower.
    n = 256
    probe = matmul_peak(torch.bfloat16, n=n, repeats=2)
    while n < 2048 and 2 * (2 * n) ** 3 / probe < 0.5:
        n *= 2
        probe = matmul_peak(torch.bfloat16, n=n, repeats=2 if quick else 3)
    return Peaks(fp32, probe, n)


# Sections --------------------------------------------------------------------------------

def bench_moe(args, rows: list) -> None:
    torch.manual_seed(0)
    moe = MoEFFN(MOE)
    nn.init.normal_(moe.router.weight, std=0.02)
    naive = NaiveMoE(moe)
    x = torch.randn(1024, MOE.dim, requires_grad=True)
    g = torch.randn(1024, MOE.dim)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive(x), rtol=1e-4, atol=1e-5)
    repeats = 3 if args.quick else 10

    x_in = x.detach()

    def fwd(m):
        with torch.no_grad():
            m(x_in)

    def fwd_bwd(m):
        (m(x) * g).sum().backward()
        x.grad = None
        for p in m.parameters():
            p.grad = None

    flops = {"fwd": step_flops(lambda: fwd(moe)), "fwd+bwd": step_flops(lambda: fwd_bwd(moe))}
    for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        t_naive = median_time(partial(fn, naive), repeats=max(3, repeats // 2), warmup=1)
        t_fast = median_time(partial(fn, moe), repeats=repeats, warmup=2)
        ref = REFERENCE_S[f"moe {kind}"]
        rows.append([f"MoE {kind}: naive loop (baseline)", "fp32", t_naive, flops[kind],
                     "", "", "1.00x", ref])
        rows.append([f"MoE {kind}: sorted grouped", "fp32", t_fast, flops[kind], "", "",
                     f"{t_naive / t_fast:.2f}x", ref])


def bench_mythos(name: str, cfg: MythosConfig, batch: int, seq: int, args, peaks: Peaks,
                 rows: list, totals: dict) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    base = OpenMythos(cfg).train()
    flops = step_flops(make_step(copy.deepcopy(base), ids, bf16=False, n_loops=4))
    totals[name] = flops
    label = f"{name} ({count_parameters(cfg).total:,} params, B={batch} T={seq} 4 loops)"
    repeats = (3 if args.quick else 5) if name == "63m" else (5 if args.quick else 10)
    eager_fp32 = None
    for compiled in (False, True):
        for bf16 in (False, True):
            kind = ("compiled" if compiled else "eager") + (" bf16" if bf16 else " fp32")
            if bf16 and not bf16_usable(args, peaks):
                rows.append([f"{label}: {kind}", "skipped", "", "", "", "", "", ""])
                continue
            if args.quick and name == "63m" and (compiled or bf16):
                continue
            model = copy.deepcopy(base)
            if compiled:
                compile_blocks(model)
            step = make_step(model, ids, bf16=bf16, n_loops=4)
            slow = bf16 and peaks.bf16 < peaks.fp32 / 4
            t = median_time(step, repeats=2 if slow else repeats, warmup=3 if compiled else 1)
            peak = peaks.bf16 if bf16 else peaks.fp32
            eager_fp32 = eager_fp32 or t
            rows.append([f"{label}: {kind}", "bf16" if bf16 else "fp32", t, flops, flops / t,
                         f"{100 * flops / t / peak:.0f}%", f"{eager_fp32 / t:.2f}x",
                         REFERENCE_S[name]])
            totals[f"{name} {kind}"] = t
            del model, step


def dense_ffn_for(target_flops: int, batch: int, seq: int) -> tuple[int, int]:
    """FFN width of the 8-layer dense model whose train step has ``target_flops``."""
    ids = torch.randint(0, M63.vocab_size, (batch, seq), device="meta")

    def flops(ffn: int) -> int:
        with torch.device("meta"):
            model = DenseLM(M63.vocab_size, M63.dim, 8, M63.n_heads, ffn)
        return step_flops(lambda: F.cross_entropy(
            model(ids).view(-1, M63.vocab_size), ids.view(-1)).backward())

    f0, f1 = flops(1024), flops(2048)
    ffn = max(64, round((1024 + (target_flops - f0) * 1024 / (f1 - f0)) / 64) * 64)
    return ffn, flops(ffn)


def bench_dense(args, peaks: Peaks, rows: list, totals: dict) -> None:
    batch, seq = 2, 256
    target = totals.get("63m")
    if target is None:
        torch.manual_seed(0)
        model = OpenMythos(M63).train()
        target = step_flops(make_step(model, torch.randint(0, M63.vocab_size, (batch, seq)),
                                      bf16=False, n_loops=4))
        totals["63m"] = target
        del model
    ffn, flops = dense_ffn_for(target, batch, seq)
    torch.manual_seed(0)
    ids = torch.randint(0, M63.vocab_size, (batch, seq))
    model = DenseLM(M63.vocab_size, M63.dim, 8, M63.n_heads, ffn).train()
    n_params = sum(p.numel() for p in model.parameters())
    label = f"dense nn.TransformerEncoder 8x768 ffn {ffn} ({n_params:,} params)"
    for bf16 in (False, True):
        if bf16 and (args.quick or not bf16_usable(args, peaks)):
            continue
        step = make_step(model, ids, bf16=bf16)
        t = median_time(step, repeats=3 if args.quick else 5, warmup=1)
        kind = "bf16" if bf16 else "fp32"
        looped = totals.get(f"63m eager {kind}")
        rows.append([f"{label}: eager {kind} (baseline)", kind, t, flops, flops / t,
                     f"{100 * flops / t / (peaks.bf16 if bf16 else peaks.fp32):.0f}%",
                     f"63m {t / looped:.2f}x" if looped else "", REFERENCE_S["dense"]])


def bf16_usable(args, peaks: Peaks) -> bool:
    return args.force_bf16 or peaks.bf16 >= peaks.fp32 / 4


def tune_malloc() -> bool:
    """Keep freed memory in the process (no mmap for large blocks, no trimming)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rows")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force-bf16", action="store_true",
                        help="run bf16 rows even where the bf16 matmul peak is low")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    args = parser.parse_args()
    sections = args.only or list(SECTIONS)
    torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.malloc == "tuned" else False

    peaks = measure_peaks(args.quick)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, glibc malloc {'tuned' if malloc else 'default'}, "
          f"load average {load:.1f} at start")
    if load > 0.5:
        print("WARNING: other processes are running. With more runnable threads than cores, "
              "OpenMP's spinning barriers stall\n(10x slower steps were seen); "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
              "PASSIVE limits the damage.")
    print(f"matmul peak: fp32 {peaks.fp32 / 1e9:.0f} GFLOP/s (2048^3), "
          f"bf16 {peaks.bf16 / 1e9:.1f} GFLOP/s ({peaks.bf16_n}^3)\n")

    rows: list = []
    totals: dict = {}
    if "moe" in sections:
        bench_moe(args, rows)
    if "small" in sections:
        bench_mythos("small", SMALL, 4, 128, args, peaks, rows, totals)
    if "63m" in sections:
        bench_mythos("63m", M63, 2, 256, args, peaks, rows, totals)
    if "dense" in sections:
        bench_dense(args, peaks, rows, totals)

    table = []
    for label, dtype, t, flops, rate, pct, ratio, ref in rows:
        table.append([
            label, dtype,
            f"{t:.4f}" if t != "" else "",
            f"{flops / 1e9:.2f}" if flops != "" else "",
            f"{rate / 1e9:.0f}" if rate != "" else "",
            pct, ratio,
            f"{ref:.3f}" if ref != "" else "",
        ])
    print_table(["workload", "dtype", "median s", "GFLOP", "GFLOP/s", "% peak",
                 "speed-up", "SPEC ref s"], table)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    print("\nspeed-up: against the first row of the same group (naive loop; eager fp32). Dense"
          "\nrows: dense time / 63M eager time of the same dtype (>= 1: looped no slower)."
          "\nSPEC ref s: the reference implementation on the SPEC machine, not this run.")


if __name__ == "__main__":
    main()
