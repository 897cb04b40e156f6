"""Timing helpers shared by the benchmark scripts: a median-of-N timer, a matmul-peak probe
and a plain-text table printer.

Timings on shared CPU machines drift by tens of percent between runs, so every script
measures its baselines in the same run and prints ratios against them.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (CUDA only; CPU work is synchronous)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2,
                device: torch.device | str | None = None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    return statistics.median(_times(fn, repeats, warmup, device))


def _times(fn: Callable[[], object], repeats: int, warmup: int,
           device: torch.device | str | None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def alternating_medians(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, their calls interleaved so that drift in the
    machine's speed falls on all of them alike (queued GPU work is waited for)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5,
                device: torch.device | str = "cpu") -> float:
    """Achieved FLOP/s of one large square matmul in ``dtype``, computed the way ``nn.Linear``
    computes it (``F.linear``: on CPUs without native bf16 it takes a oneDNN path that is
    several times faster than ``a @ b``). The fastest of ``repeats`` calls: a peak is what
    the machine can do, and another process busy for part of the measurement only ever
    slows a call down (a median taken while the machine was briefly shared put rows at
    146% of it)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = min(_times(lambda: torch.nn.functional.linear(a, b), repeats, 1, device))
    return 2 * n**3 / seconds


def count_flops(fn: Callable[[], object], custom_mapping: dict | None = None) -> int:
    """FLOPs of one call of ``fn`` as counted by :class:`torch.utils.flop_counter.FlopCounterMode`
    (matmuls, convolutions and attention; elementwise work is not counted). ``custom_mapping``
    adds formulas for ops the counter does not know (``{op: f(*arg_shapes, **kw) -> int}``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
        fn()
    return counter.get_total_flops()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` under ``headers`` as an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(c.ljust(w) for c, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


#: A number as the scripts print one: an optional sign, digits (with thousands commas), a
#: fraction, an exponent, then an optional "x" (a ratio) or "%"; or an infinity or a NaN.
_NUMBER = re.compile(r"[+-]?(?:(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|inf|nan)[x%]?",
                     re.IGNORECASE)


def _numeric(cell: str) -> bool:
    """Whether ``cell`` is a number (right-aligned): "12", "-0.5", "+0.0", "1,234", "1e-05",
    "1.23x", "34%"."""
    return _NUMBER.fullmatch(cell) is not None
