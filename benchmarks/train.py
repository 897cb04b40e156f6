"""Training-step benchmark: step time, achieved FLOP/s against the machine's matmul peak,
and ratios against baselines measured in the same run.

    python benchmarks/train.py                 # everything (~15 minutes on 2 cores)
    python benchmarks/train.py --quick         # fewer repeats, no bf16/compiled 63M rows
    python benchmarks/train.py --only moe      # one section: moe | small | small-mla | 63m | dense | task
    python benchmarks/train.py --device cuda --dtype bf16   # on a GPU: MFU against its bf16 peak
    python benchmarks/train.py --only 63m --only dense --compile blocks --compile model
                                               # compile modes (+ cudagraphs on CUDA)
    python benchmarks/train.py --only 63m --only dense --dtype bf16 --profile 12
                                               # + where each eager step's time goes

A train step is forward + cross-entropy + backward + fused AdamW step (+ the router-bias
update for OpenMythos). FLOPs are counted once per configuration by
``torch.utils.flop_counter.FlopCounterMode`` on one eager fp32 step (matmuls and attention;
the grouped expert matmuls and the CPU attention kernels are added to its registry here).
The peaks are one large fp32 and one bf16 matmul measured at the start of the run.

Sections:
    moe        the MoE layer alone (64 experts top-4, 1024 tokens, dim 512, expert dim 128,
               one shared expert of width 512), forward and forward+backward, against the
               reference's dispatch (a Python loop over top-k slots x experts with a boolean
               mask per expert); then its routed experts' six matmuls alone, against
               the same FLOPs as a bmm over equal groups and as one dense matmul;
    small      the small GQA config (dim 256, 8 heads / 2 kv heads, 8 experts top-2, expert
               dim 64, 1 prelude + 1 coda, vocab 1000) at B=4, T=128, 4 loops;
    small-mla  the same with MLA attention (upstream's MLA widths);
    63m        the 63M-parameter GQA config (dim 768, 12 heads / 4 kv heads, 2 + 2 dense
               layers, 16 experts top-2 + 1 shared, expert dim 512, vocab 32000) at B=2,
               T=256, 4 loops;
    dense      PyTorch's own ``nn.TransformerEncoder`` (8 layers, dim 768, tied 32000-token
               LM head) with its FFN width chosen so that a step has the 63M config's FLOPs.
    task       the demo's model (``openmythos demo``: dim 64, 4 experts top-2, byte vocabulary)
               on a batch of 128 ``multihop`` prompts (3 loops, the loss on the answer tokens
               only), with logits for every position (the baseline) against logits only at
               the supervised positions (``forward(..., logits_at=...)``, what the trainer
               does for such batches).

Each model section times the reference-style model (``reference_style.py``: the reference's
computation, done the reference's way) in the same run, alternating its steps with ours, and
reports ours against it. "Compiled" is what ``openmythos train --compile`` does: every
Prelude/Coda block and the loop body compiled (the loop and ACT stay in Python); its cold
cost is printed as "cold s": the first two steps (they compile both loop-body graphs, and
CUDA graphs record on the second) minus two warm steps. ``--compile model`` adds "compiled whole
step" rows (forward and loss as one graph, what ``openmythos train --compile model``
compiles), and on CUDA ``--compile cudagraphs`` that graph replayed as CUDA graphs; the
dense encoder is then compiled the same ways, for like-for-like ratios. bf16 rows run under
``torch.autocast``. Rows whose matmul peak is far below fp32's (bf16 on CPUs without native bf16 instructions) are
skipped, and the output says so, unless ``--force-bf16``.

All models start from upstream's N(0, 0.02) embedding. Our default unit embedding makes the
tied head's softmax saturate at initialisation (``docs/initialization.md``): for the first
tens of steps a quarter of the logits' gradient is denormal and the head's backward matmuls
run ~40x slower; timing that would measure the first steps of a run, not its steady state.

By default glibc's allocator is told to keep freed memory, as ``openmythos train`` does
(``open_mythos.devices.keep_freed_memory``; ``--malloc default`` to opt out): large tensors
are otherwise returned to the OS on every free and page-faulted back on every step, which on
virtual machines costs ~0.6 ms per MB. Every row, baselines included, runs under the same
setting. Compilation starts from an empty inductor cache (a temporary directory, removed at
the end of the run) unless ``--warm-cache``, so "cold s" is what a first run on a machine
pays.

On CUDA (``--device cuda``) the same rows run on the GPU, timed with a device
synchronisation around each step; "% peak" is then the model FLOPs utilisation (MFU) against
a large bf16 (or fp32, TF32 off as PyTorch's default) matmul measured on that GPU in the same
run, and the MoE section's bf16 rows use the native grouped matmul on Hopper and newer (on
a CPU they run where bf16 matmuls are native, like the other bf16 rows). The task section is eager fp32 only: ``--compile`` does
not apply to it, and ``--dtype bf16`` alone skips it.
``--batch-scale N`` multiplies the model sections' batches (a GPU needs more work per step
than these CPU-sized batches give it).

Run it on an otherwise idle machine: with other busy processes, OpenMP's spinning barriers
make multi-threaded steps many times slower (``OMP_WAIT_POLICY=PASSIVE`` limits the damage).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    alternating_medians,
    count_flops,
    matmul_peak,
    median_time,
    print_table,
    sync,
)
from reference_style import ReferenceStyleLM  # noqa: E402

from open_mythos import MythosConfig, OpenMythos  # noqa: E402
from open_mythos.commands.argtypes import positive_int  # noqa: E402
from open_mythos.devices import keep_freed_memory  # noqa: E402
from open_mythos.layers.moe import Expert, MoEFFN  # noqa: E402
from open_mythos.training.trainer import compile_blocks  # noqa: E402
from open_mythos.variants import count_parameters  # noqa: E402

SECTIONS = ("moe", "small", "small-mla", "63m", "dense", "task")

SMALL = MythosConfig(
    vocab_size=1000, dim=256, n_heads=8, n_kv_heads=2, max_seq_len=128, max_loop_iters=4,
    prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=8, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=64, lora_rank=8, embed_init_std=0.02,
)
SMALL_MLA = dataclasses.replace(SMALL, attn_type="mla")
M63 = MythosConfig(
    vocab_size=32000, dim=768, n_heads=12, n_kv_heads=4, max_seq_len=256, max_loop_iters=4,
    prelude_layers=2, coda_layers=2, attn_type="gqa", n_experts=16, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=512, lora_rank=16, embed_init_std=0.02,
)
MOE = MythosConfig(
    vocab_size=1000, dim=512, n_heads=8, n_kv_heads=8, attn_type="gqa", n_experts=64,
    n_shared_experts=1, n_experts_per_tok=4, expert_dim=128,
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
        self.shared = copy.deepcopy(moe.shared)

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
        if self.shared is not None:
            out = out + self.shared(flat)
        return out


class DenseLM(nn.Module):
    """``nn.TransformerEncoder`` language model (pre-norm, GELU, causal, tied head)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # upstream's, as every model here
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.encoder(self.embed(ids), mask=mask, is_causal=True)))


def make_step(model: nn.Module, ids: torch.Tensor, bf16: bool, compile_mode: str | None = None,
              **forward_kwargs):
    """One training step closure: forward, CE loss, backward, fused AdamW, zero_grad.

    ``compile_mode`` "model": forward and loss ``torch.compile``d as one graph
    (``fullgraph=True``; the backward is compiled with it); "cudagraphs": the same graph
    replayed as CUDA graphs (``mode="reduce-overhead"``, CUDA only).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.head.weight.shape[0]
    is_mythos = isinstance(model, OpenMythos)
    # Next-token targets. Targets equal to the inputs would be learnt at initialisation by a
    # model with a tied embedding (the residual stream carries the input's embedding): the
    # softmax saturates, a quarter of the logits' gradient is denormal, and the head's
    # backward matmuls run ~40x slower than on normal numbers.
    targets = ids.roll(-1, dims=1)

    def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, **forward_kwargs)
            return F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))

    if compile_mode is not None:
        if compile_mode not in ("model", "cudagraphs"):
            raise ValueError(f"compile_mode must be 'model' or 'cudagraphs', got {compile_mode!r}")
        if compile_mode == "cudagraphs" and ids.device.type != "cuda":
            raise ValueError("compile_mode 'cudagraphs' needs CUDA tensors")
        torch._dynamo.reset()
        loss_of = torch.compile(loss_of, fullgraph=True,
                                mode="reduce-overhead" if compile_mode == "cudagraphs" else None)

    def step() -> None:
        if compile_mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        loss_of(ids, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if is_mythos:
            model.update_router_bias()

    return step


def compiled(model: nn.Module) -> nn.Module:
    """``model`` compiled as ``openmythos train --compile`` compiles it."""
    # Fresh caches: graphs of another config compiled earlier in this run would otherwise
    # turn on dynamic shapes for this one.
    torch._dynamo.reset()
    compile_blocks(model)
    return model


def first_call_seconds(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@dataclass
class Peaks:
    fp32: float
    bf16: float
    bf16_n: int


def measure_peaks(quick: bool, device: torch.device) -> Peaks:
    if device.type == "cuda":
        # A GPU needs a large product to reach its rate; bf16 is native on every GPU we time.
        return Peaks(matmul_peak(torch.float32, n=8192, repeats=10, device=device),
                     matmul_peak(torch.bfloat16, n=8192, repeats=10, device=device), 8192)
    fp32 = matmul_peak(torch.float32, n=2048, repeats=3 if quick else 5)
    # Probe bf16 small first: without native bf16 instructions it can be 100x slower.
    n = 256
    probe = matmul_peak(torch.bfloat16, n=n, repeats=2)
    while n < 2048 and 2 * (2 * n) ** 3 / probe < 0.5:
        n *= 2
        probe = matmul_peak(torch.bfloat16, n=n, repeats=2 if quick else 3)
    return Peaks(fp32, probe, n)


# Sections --------------------------------------------------------------------------------

@dataclass
class Row:
    workload: str
    dtype: str
    seconds: float | None = None
    flops: int | None = None
    peak: float | None = None
    baseline: str = ""
    cold_s: float | None = None
    note: str = ""


class Rows(list):
    """The table's rows; each is also printed when it is measured (a run that dies late
    keeps what it measured)."""

    def append(self, row: Row) -> None:
        super().append(row)
        timing = f"{row.seconds:.4f} s" if row.seconds else ""
        print(f"  measured: {row.workload} [{row.dtype}] {timing} {row.note}".rstrip(),
              file=sys.stderr, flush=True)


def bench_moe(args, peaks: Peaks, rows: list[Row]) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    moe = MoEFFN(MOE).to(device)
    nn.init.normal_(moe.router.weight, std=0.02)
    naive = NaiveMoE(moe).to(device)
    x = torch.randn(1024, MOE.dim, device=device, requires_grad=True)
    g = torch.randn(1024, MOE.dim, device=device)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive(x), rtol=1e-4, atol=1e-5)
    repeats = 3 if args.quick else 10
    x_in = x.detach()

    def fwd(m, bf16: bool):
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            m(x_in)

    def fwd_bwd(m, bf16: bool):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = m(x)
        (out.float() * g).sum().backward()
        x.grad = None
        for p in m.parameters():
            p.grad = None

    # bf16 rows where they mean something: on a GPU (the native grouped kernel on Hopper)
    # and on a CPU with native bf16 matmuls.
    dtypes = [d for d in ("fp32", "bf16") if d in args.dtype
              and (d == "fp32" or device.type == "cuda" or bf16_usable(args, peaks))]
    if "bf16" in args.dtype and "bf16" not in dtypes:
        rows.append(Row("MoE: all rows", "bf16", note=BF16_SKIPPED))
    for dtype in dtypes:
        bf16 = dtype == "bf16"
        peak = peaks.bf16 if bf16 else peaks.fp32
        for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            flops = step_flops(partial(fn, moe, bf16))
            t = alternating_medians({"naive": partial(fn, naive, bf16),
                                     "ours": partial(fn, moe, bf16)},
                                    repeats=repeats, warmup=2)
            rows.append(Row(f"MoE {kind}: reference dispatch (baseline)", dtype, t["naive"],
                            flops, peak, "1.00x"))
            rows.append(Row(f"MoE {kind}: sorted grouped", dtype, t["ours"], flops, peak,
                            f"{t['naive'] / t['ours']:.2f}x"))
    for dtype in dtypes if device.type == "cpu" else ():
        if hasattr(torch, "_grouped_mm"):
            bench_routed_matmuls(moe, x_in, repeats, peaks, rows, dtype)
        else:
            rows.append(Row("MoE routed matmuls", dtype,
                            note="skipped: this torch has no torch._grouped_mm"))


def bench_routed_matmuls(moe: MoEFFN, x: torch.Tensor, repeats: int, peaks: Peaks,
                         rows: list[Row], dtype: str = "fp32") -> None:
    """Where the MoE layer's time goes: the six grouped matmuls of its routed experts
    (forward, input and weight gradients of both projections) at this batch's routing, run
    by PyTorch's grouped kernel (what the layer runs: one product after another, each split
    across the threads), against the same FLOPs as ``torch.bmm`` over equal groups (the
    batch split across threads, each product on one thread: the ceiling for groups this
    size, which uneven groups cannot reach without padding), and one matmul of all the
    rows against one expert's weights (the same FLOPs as a dense layer: the ceiling for
    matmuls this wide). ``dtype``: "fp32" or "bf16", the operands' dtype."""
    with torch.no_grad():
        counts = torch.bincount(moe.route(x)[0].reshape(-1), minlength=moe.n_experts)
    offs = counts.cumsum(0).to(torch.int32)
    slots, E, D, H = int(counts.sum()), moe.n_experts, moe.dim, moe.expert_dim
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    w1, w2 = (w.detach().to(torch_dtype) for w in (moe.w_gate_up, moe.w_down))
    xs, h = torch.randn(slots, D, dtype=torch_dtype), torch.randn(slots, H, dtype=torch_dtype)
    g1 = torch.randn(slots, 2 * H, dtype=torch_dtype)
    g2 = torch.randn(slots, D, dtype=torch_dtype)

    def native():
        torch._grouped_mm(xs, w1, offs=offs), torch._grouped_mm(h, w2, offs=offs)
        torch._grouped_mm(g2, w2.transpose(1, 2), offs=offs)
        torch._grouped_mm(g1, w1.transpose(1, 2), offs=offs)
        torch._grouped_mm(xs.t(), g1, offs=offs), torch._grouped_mm(h.t(), g2, offs=offs)

    per = slots // E
    bx, bh = xs[:E * per].view(E, per, D), h[:E * per].view(E, per, H)
    b1, b2 = g1[:E * per].view(E, per, 2 * H), g2[:E * per].view(E, per, D)

    def batched():
        torch.bmm(bx, w1), torch.bmm(bh, w2), torch.bmm(b2, w2.transpose(1, 2))
        torch.bmm(b1, w1.transpose(1, 2))
        torch.bmm(bx.transpose(1, 2), b1), torch.bmm(bh.transpose(1, 2), b2)

    v1, v2 = w1[0], w2[0]

    def dense():
        xs @ v1, h @ v2, g2 @ v2.t(), g1 @ v1.t(), xs.t() @ g1, h.t() @ g2

    flops = 3 * 2 * slots * D * (2 * H + H)
    peak = peaks.bf16 if dtype == "bf16" else peaks.fp32
    t = alternating_medians({"native": native, "bmm": batched, "dense": dense},
                            repeats=repeats, warmup=2)
    label = f"{E} groups, {per} rows on average, {int(counts.max())} at most"
    rows.append(Row(f"MoE routed matmuls (fwd+bwd): torch._grouped_mm ({label})", dtype,
                    t["native"], flops, peak, "1.00x"))
    bmm_s = t["bmm"] * slots / (E * per)  # scaled to the same FLOPs
    rows.append(Row(f"MoE routed matmuls: bmm, {E} equal groups of {per} rows", dtype, bmm_s,
                    flops, peak, f"{t['native'] / bmm_s:.2f}x",
                    note="the ceiling for groups this size"))
    rows.append(Row(f"MoE routed matmuls: one expert's weights for all {slots} rows", dtype,
                    t["dense"], flops, peak, f"{t['native'] / t['dense']:.2f}x",
                    note="a dense layer's matmuls of the same FLOPs"))


def bench_mythos(name: str, cfg: MythosConfig, batch: int, seq: int, args, peaks: Peaks,
                 rows: list[Row], totals: dict) -> None:
    """Reference-style model, then ours eager and compiled, fp32 and bf16."""
    device = torch.device(args.device)
    batch *= args.batch_scale
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    ours = OpenMythos(cfg).train().to(device)
    ref = ReferenceStyleLM(cfg).train().to(device)
    flops = step_flops(make_step(copy.deepcopy(ours), ids, bf16=False, n_loops=4))
    ref_flops = step_flops(make_step(copy.deepcopy(ref), ids, bf16=False, n_loops=4))
    totals[name] = flops
    label = f"{name} ({count_parameters(cfg).total / 1e6:.2f}M params, B={batch} T={seq} 4 loops)"
    repeats = (3 if args.quick else 5) if name == "63m" else (5 if args.quick else 10)
    ref_s: dict[str, float] = {}
    for bf16 in (False, True):
        dtype = "bf16" if bf16 else "fp32"
        peak = peaks.bf16 if bf16 else peaks.fp32
        if dtype not in args.dtype:
            continue
        if bf16 and not bf16_usable(args, peaks):
            rows.append(Row(f"{label}: bf16", "bf16", note=BF16_SKIPPED))
            continue
        if bf16 and args.quick and name == "63m":
            continue
        # The baseline and our eager step, alternating.
        steps = {"ref": make_step(copy.deepcopy(ref), ids, bf16=bf16, n_loops=4),
                 "ours": make_step(copy.deepcopy(ours), ids, bf16=bf16, n_loops=4)}
        t = alternating_medians(steps, repeats=repeats)
        if args.profile:
            print_profile(f"{name} reference-style, {dtype}", steps["ref"], args.profile, device)
            print_profile(f"{name} eager, {dtype}", steps["ours"], args.profile, device)
        del steps
        ref_s[dtype] = t["ref"]
        rows.append(Row(f"{label}: reference-style (baseline)", dtype, t["ref"], ref_flops, peak,
                        "1.00x"))
        rows.append(Row(f"{label}: eager", dtype, t["ours"], flops, peak,
                        f"{t['ref'] / t['ours']:.2f}x"))
        totals[f"{name} eager {dtype}"] = t["ours"]
        if args.quick and name == "63m":
            continue
        for mode in args.compile:
            how = COMPILE_LABELS[mode]
            try:
                if mode == "blocks":
                    step = make_step(compiled(copy.deepcopy(ours)), ids, bf16=bf16, n_loops=4)
                else:
                    step = make_step(copy.deepcopy(ours), ids, bf16=bf16, compile_mode=mode,
                                     n_loops=4)
                # The first two steps: both loop-body graphs (blocks); CUDA graphs record
                # on the second call.
                cold = first_call_seconds(step) + first_call_seconds(step)
                warm = median_time(step, repeats=repeats, warmup=1, device=device)
            except Exception as err:  # a mode that fails is a row, not the end of the run
                rows.append(Row(f"{label}: {how}", dtype, note=failure(err)))
                continue
            rows.append(Row(f"{label}: {how}", dtype, warm, flops, peak,
                            f"{t['ref'] / warm:.2f}x", cold_s=cold - 2 * warm,
                            note=cudagraph_skips(mode)))
            totals[f"{name} {how} {dtype}"] = warm
            del step


def print_profile(title: str, step: Callable[[], object], top: int,
                  device: torch.device) -> None:
    """Where a step's time goes: ``torch.profiler`` over two steps (after one warm-up), the
    ``top`` aten operators by self time (CPU; GPU kernel time on CUDA), per step, with
    their share of all aten self time. Operators only: the custom grouped matmul shows as
    the ``aten::mm``/``aten::_grouped_mm`` calls inside it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                    key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1
    print(f"\nprofile: {title}: aten ops by self {'GPU' if cuda else 'CPU'} time, per step "
          f"(all aten: {total / 2e3:.1f} ms)")
    print("| op | calls | ms | share |\n|---|---|---|---|")
    for e in events[:top]:
        spent = getattr(e, attr)
        print(f"| {e.key} | {e.count // 2} | {spent / 2e3:.1f} | {100 * spent / total:.0f}% |")


def failure(err: Exception) -> str:
    """A failed row's note: the error's type and first line (the traceback on stderr)."""
    traceback.print_exception(err, file=sys.stderr)
    first = (str(err).strip().splitlines() or [""])[0]
    return f"FAILED: {type(err).__name__}: {first[:160]}"


def cudagraph_skips(mode: str | None) -> str:
    """A note when inductor fell back from CUDA graphs since the last call (then the row
    timed plain compiled kernels), else ""."""
    if mode != "cudagraphs":
        return ""
    from torch._dynamo.utils import counters
    skips = counters["inductor"].pop("cudagraph_skips", 0)
    return f"CUDA GRAPHS SKIPPED for {skips} graph(s): compiled kernels only" if skips else ""


COMPILE_LABELS = {"blocks": "compiled", "model": "compiled whole step",
                  "cudagraphs": "compiled whole step + CUDA graphs"}
BF16_SKIPPED = "skipped: no native bf16 matmul on this CPU (emulated kernels; --force-bf16)"
TASK_LABEL = "task (demo model, multihop"
TASK_BF16_SKIPPED = "skipped: the task section is timed in eager fp32 only (add --dtype fp32)"
TASK_EAGER_NOTE = "eager: --compile does not apply to the task section"


def bench_task(args, peaks: Peaks, rows: list[Row]) -> None:
    """The demo's model on a task batch: every position's logits against the supervised
    positions' only, alternating, eager fp32 (a row saying so when ``--dtype`` leaves fp32
    out; the rows' note says so when ``--compile`` was given)."""
    import random

    if "fp32" not in args.dtype:
        rows.append(Row(f"{TASK_LABEL})", "/".join(args.dtype), note=TASK_BF16_SKIPPED))
        return

    from open_mythos.commands.demo import DEFAULT_TASK_ARGS, DEMO_MODEL
    from open_mythos.tasks import get_task, make_batch
    from open_mythos.training.losses import cross_entropy_sum, supervised_rows

    task = get_task("multihop", **{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in DEFAULT_TASK_ARGS.items()})
    device = torch.device(args.device)
    batch = make_batch(task, random.Random(0), "train", 128)
    ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
    torch.manual_seed(0)
    cfg = MythosConfig(**{**DEMO_MODEL, "vocab_size": 259, "max_loop_iters": 3})
    model = OpenMythos(cfg).train().to(device)
    sel = supervised_rows(targets)

    def make(rows: torch.Tensor | None) -> Callable[[], None]:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        y = targets if rows is None else targets.flatten()[rows]

        def step() -> None:
            loss = cross_entropy_sum(m(ids, n_loops=3, logits_at=rows), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.update_router_bias()
        return step

    full, rows_only = make(None), make(sel.to(device))
    flops_full, flops_rows = step_flops(full), step_flops(rows_only)
    t = alternating_medians({"full": full, "rows": rows_only}, repeats=5 if args.quick else 15)
    label = (f"{TASK_LABEL} B=128 T={ids.shape[1]}, 3 loops, "
             f"{len(sel)} of {targets.numel()} positions supervised)")
    note = TASK_EAGER_NOTE if args.compile_given else ""
    rows.append(Row(f"{label}: all logits (baseline)", "fp32", t["full"], flops_full,
                    peaks.fp32, "1.00x", note=note))
    rows.append(Row(f"{label}: supervised positions only", "fp32", t["rows"], flops_rows,
                    peaks.fp32, f"{t['full'] / t['rows']:.2f}x", note=note))


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


def bench_dense(args, peaks: Peaks, rows: list[Row], totals: dict) -> None:
    device = torch.device(args.device)
    batch, seq = 2 * args.batch_scale, 256
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
    ids = torch.randint(0, M63.vocab_size, (batch, seq), device=device)
    model = DenseLM(M63.vocab_size, M63.dim, 8, M63.n_heads, ffn).train().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    label = f"dense nn.TransformerEncoder 8x768 ffn {ffn} ({n_params / 1e6:.1f}M params)"
    for bf16 in (False, True):
        kind = "bf16" if bf16 else "fp32"
        if kind not in args.dtype:
            continue
        if bf16 and not bf16_usable(args, peaks):
            rows.append(Row(f"{label}: eager", kind, note=BF16_SKIPPED))
            continue
        if bf16 and args.quick:
            continue
        # The encoder eager, and compiled as one whole-step graph under each compile mode
        # asked for ("blocks" compiles it whole too: it has no loop to keep in Python).
        modes = [None] + sorted({"model" if m == "blocks" else m for m in args.compile},
                                key=["model", "cudagraphs"].index)
        for mode in modes:
            how = "eager" if mode is None else COMPILE_LABELS[mode]
            try:
                step = make_step(copy.deepcopy(model), ids, bf16=bf16, compile_mode=mode)
                cold = first_call_seconds(step) + first_call_seconds(step)
                t = median_time(step, repeats=3 if args.quick else 5, warmup=1, device=device)
            except Exception as err:
                rows.append(Row(f"{label}: {how}", kind, note=failure(err)))
                continue
            if args.profile and mode is None:
                print_profile(f"dense encoder eager, {kind}", step, args.profile, device)
            ours = [f"{h} {t / totals[f'63m {h} {kind}']:.2f}x"
                    for h in ("eager", *COMPILE_LABELS.values()) if f"63m {h} {kind}" in totals]
            rows.append(Row(f"{label}: {how} (63m's FLOPs)", kind, t, flops,
                            peaks.bf16 if bf16 else peaks.fp32,
                            cold_s=None if mode is None else cold - 2 * t,
                            note=" ".join(filter(None, [
                                cudagraph_skips(mode),
                                ("63m vs this: " + ", ".join(ours)) if ours else ""]))))
            del step


def cpu_description() -> str:
    """The CPU's model name and its native bf16 instruction sets, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU unknown (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, native bf16: {', '.join(native) if native else 'none'}"


def _percent(fraction: float) -> str:
    """A share of the peak: whole percents, one decimal below 10% (small GPU steps)."""
    return f"{100 * fraction:.0f}%" if fraction >= 0.1 else f"{100 * fraction:.1f}%"


def bf16_usable(args, peaks: Peaks) -> bool:
    return args.force_bf16 or peaks.bf16 >= peaks.fp32 / 4


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def fresh_inductor_cache(enabled: bool = True) -> Iterator[None]:
    """Inductor's on-disk cache in a new temporary directory for the block, removed after it
    (an exception included) with ``TORCHINDUCTOR_CACHE_DIR`` set back as it was; a no-op
    when not ``enabled``."""
    if not enabled:
        yield
        return
    previous = os.environ.get(INDUCTOR_CACHE_ENV)
    with tempfile.TemporaryDirectory(prefix="om_bench_inductor_",
                                     ignore_cleanup_errors=True) as cache:
        os.environ[INDUCTOR_CACHE_ENV] = cache
        try:
            yield
        finally:
            if "torch._inductor.utils" in sys.modules:  # in-memory entries of removed files
                sys.modules["torch._inductor.utils"].clear_caches()
            if previous is None:
                os.environ.pop(INDUCTOR_CACHE_ENV, None)
            else:
                os.environ[INDUCTOR_CACHE_ENV] = previous


def parse_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device``: cpu or cuda[:N] (an available GPU), else ``parser.error``."""
    from open_mythos.devices import resolve_device

    try:
        device = resolve_device(text)
    except ValueError as err:
        parser.error(f"--device: {err}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: use cpu or cuda[:N]")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rows")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--force-bf16", action="store_true",
                        help="run bf16 rows even where the bf16 matmul peak is low")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse inductor's on-disk cache (cold s then measures a warm start)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", action="append", choices=("fp32", "bf16"),
                        help="only rows of this dtype (repeatable; default both)")
    parser.add_argument("--compile", action="append", choices=tuple(COMPILE_LABELS),
                        help="compiled rows: 'blocks' (default; what `openmythos train "
                             "--compile` does), 'model' (forward+loss as one fullgraph), "
                             "'cudagraphs' (that graph as CUDA graphs; CUDA only); repeatable")
    parser.add_argument("--batch-scale", type=positive_int, default=1,
                        help="multiply the model sections' batch sizes (for a GPU)")
    parser.add_argument("--profile", type=positive_int, default=0, metavar="N",
                        help="also print the N operators that take the most time in each "
                             "eager step (reference-style, ours, the dense encoder)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ["fp32", "bf16"]
    args.compile_given = args.compile is not None  # the task section notes that it ignores it
    args.compile = args.compile or ["blocks"]
    device = parse_device(parser, args.device)
    if "cudagraphs" in args.compile and device.type != "cuda":
        parser.error("--compile cudagraphs needs --device cuda")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    with fresh_inductor_cache(not args.warm_cache):
        run(args, device)


def run(args, device: torch.device) -> None:
    """Measure the sections ``args`` asks for and print the table."""
    sections = args.only or list(SECTIONS)
    torch.set_num_threads(args.threads)
    malloc = keep_freed_memory() if args.malloc == "tuned" else False

    peaks = measure_peaks(args.quick, device)
    load = os.getloadavg()[0]
    print(cpu_description())
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, glibc malloc {'tuned' if malloc else 'default'}, "
          f"load average {load:.1f} at start")
    if load > 0.5:
        print("WARNING: other processes are running. With more runnable threads than cores, "
              "OpenMP's spinning barriers stall\n(10x slower steps were seen); "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
              "PASSIVE limits the damage.")
    fp32_n = 8192 if device.type == "cuda" else 2048
    print(f"matmul peak on {device.type}: fp32 {peaks.fp32 / 1e9:,.0f} GFLOP/s ({fp32_n}^3), "
          f"bf16 {peaks.bf16 / 1e9:,.1f} GFLOP/s ({peaks.bf16_n}^3)\n")

    rows: list[Row] = Rows()
    totals: dict = {}
    if "moe" in sections:
        bench_moe(args, peaks, rows)
    for name, cfg, batch, seq in (("small", SMALL, 4, 128), ("small-mla", SMALL_MLA, 4, 128),
                                  ("63m", M63, 2, 256)):
        if name in sections:
            bench_mythos(name, cfg, batch, seq, args, peaks, rows, totals)
    if "dense" in sections:
        bench_dense(args, peaks, rows, totals)
    if "task" in sections:
        bench_task(args, peaks, rows)

    table = []
    for r in rows:
        rate = r.flops / r.seconds if r.seconds and r.flops else None
        table.append([
            r.workload, r.dtype,
            f"{r.seconds:.4f}" if r.seconds else "",
            f"{r.flops / 1e9:.2f}" if r.flops else "",
            f"{rate / 1e9:.0f}" if rate else "",
            _percent(rate / r.peak) if rate and r.peak else "",
            r.baseline,
            f"{r.cold_s:.1f}" if r.cold_s is not None else "",
            r.note,
        ])
    print_table(["workload", "dtype", "median s", "GFLOP", "GFLOP/s", "% peak",
                 "vs baseline", "cold s", "note"], table)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    over = [r.workload for r in rows if r.seconds and r.flops and r.peak
            and r.flops / r.seconds > r.peak]
    if over:
        print(f"WARNING: {len(over)} row(s) above 100% of the peak ({over[0]}, ...): the "
              "machine was slower while the peak was measured; rerun it idle.")
    print("\nvs baseline: the baseline's median time / this row's, same dtype, same run (>1:"
          "\nfaster). % peak: against the matmul peak of that dtype measured at the start"
          "\n(on a GPU: the model FLOPs utilisation, MFU)."
          "\ncold s: extra seconds of the first two compiled steps (tracing and code"
          "\ngeneration for the two loop-body graphs) over two warm steps.")


if __name__ == "__main__":
    main()
