"""Attention on the CPU: SDPA's fused kernel against explicit matmuls, per shape and dtype.

::

    python benchmarks/attention.py            # fp32, and bf16 where the CPU has native bf16
    python benchmarks/attention.py --quick    # fewer shapes and repeats

``open_mythos.layers.attention.attend`` sends short CPU attention (at most
``SMALL_ATTENTION_KEYS`` keys; bf16/fp16 only under autograd, up to
``SMALL_ATTENTION_KEYS_LOW_PRECISION``) to explicit ``baddbmm``/softmax/``bmm`` in float32
and the rest to ``F.scaled_dot_product_attention``. The table times both routes on causal
self-attention (4 heads, 4,096 tokens per call) for a training call (forward and backward)
and an inference call (no autograd), the two interleaved; "taken" is the route ``attend``
picks. bf16 rows run only on CPUs with native bf16 matmuls (a bf16 matmul at least as fast
as fp32); elsewhere the output says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_medians, matmul_peak, print_table  # noqa: E402

from open_mythos.commands.argtypes import positive_int  # noqa: E402
from open_mythos.devices import keep_freed_memory  # noqa: E402
from open_mythos.layers import attention  # noqa: E402

SHAPES = [(16, 16), (36, 16), (64, 16), (128, 16), (256, 16), (512, 16),
          (36, 64), (64, 64), (128, 64), (256, 64), (512, 64)]
QUICK_SHAPES = [(36, 16), (128, 16), (128, 64), (512, 64)]
TOKENS, HEADS = 4096, 4


def native_bf16() -> bool:
    """Whether bf16 matmuls run at least as fast as fp32 here (native instructions)."""
    return matmul_peak(torch.bfloat16, n=512, repeats=3) >= matmul_peak(torch.float32, n=512,
                                                                          repeats=3)


def kernel_rows(dtype: torch.dtype, shapes, repeats: int) -> list[list[object]]:
    return [row for T, d in shapes for row in kernel_shape_rows(dtype, T, d, repeats)]


def kernel_shape_rows(dtype: torch.dtype, T: int, d: int, repeats: int) -> list[list[object]]:
    """A training and an inference row for causal self-attention over ``T`` tokens."""
    B = max(1, TOKENS // T)
    g = torch.Generator().manual_seed(T * d)
    q, k, v = (torch.randn(B, HEADS, T, d, generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    grad = torch.randn(B, HEADS, T, d, generator=g).to(dtype)

    def explicit():
        return attention._explicit_attention(q, k, v, None, True, None)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        diff = (explicit().double() - sdpa().double()).abs().max().item()
    rows = []
    for mode in ("train", "infer"):
        if mode == "train":
            fns = {"sdpa": lambda: sdpa().backward(grad),
                   "explicit": lambda: explicit().backward(grad)}
            taken = _route(q, k)
        else:
            fns = {"sdpa": torch.no_grad()(sdpa), "explicit": torch.no_grad()(explicit)}
            taken = _route(q.detach(), k)
        t = alternating_medians(fns, repeats, warmup=2)
        faster = "explicit" if t["explicit"] < t["sdpa"] else "sdpa"
        rows.append([str(dtype).removeprefix("torch."), T, d, B, mode,
                     1e3 * t["sdpa"], 1e3 * t["explicit"],
                     f"{t['sdpa'] / t['explicit']:.2f}x", taken,
                     "yes" if taken == faster else "no", f"{diff:.1e}"])
        print(f"  measured: {rows[-1][:5]}", file=sys.stderr, flush=True)
    return rows


def _route(q: torch.Tensor, k: torch.Tensor) -> str:
    """The route ``attend`` takes for these inputs (it calls SDPA or not)."""
    called = []
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *a, **kw: called.append(1) or real(*a, **kw)
    try:
        with torch.no_grad() if not q.requires_grad else torch.enable_grad():
            attention.attend(q[:1], k[:1], k[:1], is_causal=True)
    finally:
        F.scaled_dot_product_attention = real
    return "sdpa" if called else "explicit"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as openmythos train does: no page faults on every step
    dtypes = [torch.float32]
    if native_bf16():
        dtypes.append(torch.bfloat16)
    else:
        print("bf16: skipped (no native bf16 matmuls on this CPU: a bf16 matmul is slower "
              "than fp32 here, so its timings would measure emulation)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, key limits "
          f"{attention.SMALL_ATTENTION_KEYS} / {attention.SMALL_ATTENTION_KEYS_LOW_PRECISION} "
          "(low precision under autograd)")
    shapes, repeats = (QUICK_SHAPES, 5) if args.quick else (SHAPES, 15)
    rows = [row for dtype in dtypes for row in kernel_rows(dtype, shapes, repeats)]
    print("\nCausal self-attention, 4 heads, 4,096 tokens per call (median ms, routes interleaved):")
    print_table(["dtype", "keys", "head dim", "batch", "call", "sdpa ms", "explicit ms",
                 "explicit speed-up", "taken", "taken is faster", "max |diff|"], rows)


if __name__ == "__main__":
    main()
