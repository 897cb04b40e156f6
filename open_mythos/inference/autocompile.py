"""When ``generate`` compiles its decode step by itself (``compile=None``, the default).

A compiled decode step (:mod:`open_mythos.inference.static`) is several times cheaper than
an eager one, but compiling it costs a fixed time once per model, batch size, cache bucket
and loop count: about 22 s on two CPU cores for the small configurations, against eager
steps of ~5 ms and compiled ones of ~0.8 ms (``benchmarks/inference.py``). Whether that
pays depends on how much decoding will follow at that shape, which one call cannot know:
a single 32-token answer would wait 22 s to save 0.1 s; an evaluation loop or a notebook
session decoding thousands of tokens would run ~6x faster.

The policy is the classic answer to that question (the ski-rental rule): decode eagerly,
and once this process has spent as long in eager decode steps of one model at one shape
as compiling that shape costs (:attr:`AutoCompile.cost_s`), compile it. Whatever the
workload, the total time is then at most about twice what the better of "never compile"
and "compile at once" would have spent in hindsight; one-off calls never compile, and a
long session compiles after ``cost_s`` seconds. A shape already compiled for the model
(by an earlier call, with or without ``compile=True``) is used at once, under dynamo's
``"fail_on_recompile"`` stance: should the model have changed in a way that needs another
graph (``cfg.act_threshold`` is part of the shape; a flag such as gradient checkpointing,
frozen parameters or ``torch._dynamo.reset()`` are not), that call decodes eagerly and
the shape starts counting again, rather than pausing to compile unannounced (on the main
thread: the stance is process-wide, and set from a worker thread it would refuse the
compilations of other threads). The estimate
starts at :data:`DEFAULT_COST_S` and becomes the compilation time this process measured,
from compilations built from scratch only: a graph inductor's on-disk cache serves (a
script run again) or one traced already for another model of the same structure takes a
fraction of a new shape's cost, and taken as the estimate it made the policy compile a
new shape after a few seconds of eager decoding, to pause for ~4x longer.

Only calls that a compiled step can serve exactly are counted: no exit rule, no explicit
``act_early_exit=True``, the per-depth cache, a device whose compiler is present (a C++
compiler for inductor on the CPU, Triton on CUDA). A model with forward hooks or a replaced
``forward`` on any of its modules (:func:`instrumented`) stays eager, so hooks that count
or record calls see every one. ``compile=False`` always decodes
eagerly, ``compile=True`` always compiles; ``OPENMYTHOS_AUTO_COMPILE=0`` in the
environment (or ``auto_compile.enabled = False``) turns the policy off. When the policy
compiles, it logs one line (logger ``open_mythos.inference``) before the pause; should the
compilation fail, it warns with the error and decodes that shape eagerly from then on.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..devices import compile_unavailable

__all__ = ["AutoCompile", "DEFAULT_COST_S", "ShapeKey", "auto_compile", "built_from_scratch",
           "compile_counts", "instrumented", "refused_recompile"]

logger = logging.getLogger("open_mythos.inference")

#: The compilation time assumed before this process has measured one, in seconds: the
#: small configurations' first compiled step on two CPU cores (docs/inference.md).
DEFAULT_COST_S = 22.0

#: What one compiled decode graph is specialised on besides the model: device type, batch
#: size, cache bucket (:func:`~open_mythos.inference.static.cache_length`), loops, cache
#: dtype, the model's parameter dtype and its halting threshold (``cfg.act_threshold``, a
#: constant of the graph that docs/inference.md tells users to change between calls).
ShapeKey = tuple[str, int, int, int, torch.dtype, torch.dtype, "float | None"]


@dataclass
class _ModelRecord:
    eager_s: dict[ShapeKey, float] = field(default_factory=dict)
    compiled: set[ShapeKey] = field(default_factory=set)
    failed: set[ShapeKey] = field(default_factory=set)


class AutoCompile:
    """The process-wide policy of ``compile=None`` (see the module docstring).

    Attributes:
        enabled: False decodes every ``compile=None`` call eagerly.
        cost_s: seconds one compilation is expected to cost, per device type; a measured
            compilation replaces the estimate for its device type.
    """

    def __init__(self, enabled: bool = True, cost_s: float = DEFAULT_COST_S):
        self.enabled = enabled
        self.default_cost_s = cost_s
        self.cost_s: dict[str, float] = {}
        self._records: weakref.WeakKeyDictionary[torch.nn.Module, _ModelRecord] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def _record(self, model: torch.nn.Module) -> _ModelRecord:
        with self._lock:
            record = self._records.get(model)
            if record is None:
                record = self._records[model] = _ModelRecord()
            return record

    def expected_cost(self, device_type: str) -> float:
        return self.cost_s.get(device_type, self.default_cost_s)

    def eager_seconds(self, model: torch.nn.Module, key: ShapeKey) -> float:
        """Seconds this process has spent in eager decode steps of ``model`` at ``key``."""
        record = self._records.get(model)
        return 0.0 if record is None else record.eager_s.get(key, 0.0)

    def has_compiled(self, model: torch.nn.Module, key: ShapeKey) -> bool:
        """Whether ``model`` has run a compiled decode step at ``key`` in this process."""
        record = self._records.get(model)
        return record is not None and key in record.compiled

    def should_compile(self, model: torch.nn.Module, key: ShapeKey) -> bool:
        """Whether a ``compile=None`` call of ``model`` at ``key`` decodes compiled."""
        if not self.enabled or compile_unavailable(key[0]) is not None:
            return False
        if instrumented(model):
            return False
        record = self._records.get(model) or _ModelRecord()
        if key in record.failed:
            return False
        return key in record.compiled or \
            record.eager_s.get(key, 0.0) >= self.expected_cost(key[0])

    def add_eager(self, model: torch.nn.Module, key: ShapeKey, seconds: float) -> None:
        """Count ``seconds`` of eager decode steps of ``model`` at ``key``."""
        record = self._record(model)
        with self._lock:
            record.eager_s[key] = record.eager_s.get(key, 0.0) + seconds

    def compiling(self, model: torch.nn.Module, key: ShapeKey) -> None:
        """Log the compilation that the next step will run (if ``key`` is new)."""
        record = self._record(model)
        if key not in record.compiled:
            device, batch, bucket, loops = key[:4]
            logger.info(
                "compiling the decode step (batch %d, cache %d, %d loops on %s) after %.1f s of "
                "eager decoding at this shape; expect about %.0f s once (compile=False decodes "
                "eagerly; see open_mythos.inference.autocompile)", batch, bucket, loops, device,
                record.eager_s.get(key, 0.0), self.expected_cost(device))

    def compiled(self, model: torch.nn.Module, key: ShapeKey, seconds: float | None,
                 from_scratch: bool = True) -> None:
        """``model`` now has a compiled step at ``key``; ``seconds``: what compiling it took
        (None when it was compiled already); ``from_scratch``: whether that compilation
        built its graph (:func:`built_from_scratch`): only such a time becomes the
        estimate."""
        record = self._record(model)
        with self._lock:
            if seconds is not None and from_scratch and key not in record.compiled:
                self.cost_s[key[0]] = seconds
            record.compiled.add(key)

    def changed(self, model: torch.nn.Module, key: ShapeKey, error: BaseException) -> None:
        """The graph compiled for ``model`` at ``key`` no longer fits it (the model changed
        in a way the key does not hold: a flag, frozen parameters, the compiler's caches
        reset): rather than recompile unannounced, that shape counts its eager steps
        again from zero, as a new one."""
        record = self._record(model)
        with self._lock:
            record.compiled.discard(key)
            record.eager_s[key] = 0.0
        device, batch, bucket, loops = key[:4]
        reason = next((line.strip(" -") for line in str(error).splitlines()
                       if line.strip().startswith("- ")), "")
        logger.info(
            "the compiled decode step (batch %d, cache %d, %d loops on %s) does not fit the "
            "model any more%s; decoding eagerly, and compiling again once eager steps at "
            "this shape have cost as much as compiling", batch, bucket, loops, device,
            f" ({reason})" if reason else "")

    def failed(self, model: torch.nn.Module, key: ShapeKey, error: BaseException) -> None:
        """Compiling ``model`` at ``key`` failed: decode that shape eagerly from now on."""
        import warnings

        self._record(model).failed.add(key)
        warnings.warn(f"compiling the decode step failed ({type(error).__name__}: {error}); "
                      "this model decodes that shape eagerly from now on (compile=True "
                      "raises the error instead)", RuntimeWarning, stacklevel=4)

    def reset(self) -> None:
        """Forget every count and measurement (the compiled graphs themselves stay cached)."""
        with self._lock:
            self._records = weakref.WeakKeyDictionary()
            self.cost_s = {}


def refused_recompile(error: BaseException) -> bool:
    """Whether ``error`` is dynamo refusing to build a new graph under the
    ``"fail_on_recompile"`` stance (a plain ``RuntimeError``; no type of its own)."""
    return isinstance(error, RuntimeError) and "fail_on_recompile" in str(error)


def compile_counts() -> tuple[int, int, int]:
    """``(built, served, traced)``: graphs inductor compiled from scratch, graphs a compile
    cache served (inductor's FX graph cache, AOTAutograd's), and graphs dynamo traced, so
    far in this process (``torch._dynamo``'s counters)."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return (inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"],
            inductor["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
            counters["stats"]["unique_graphs"])


def built_from_scratch(before: tuple[int, int, int], after: tuple[int, int, int]) -> bool:
    """Whether a compilation between two :func:`compile_counts` built a graph: a cache
    miss, or a traced graph that no cache served (caches turned off)."""
    built, served, traced = (a - b for a, b in zip(after, before))
    return built > 0 or (traced > 0 and served == 0)


def instrumented(model: torch.nn.Module) -> bool:
    """Whether ``model`` is observed in a way a compiled step would not honour call by call:
    a forward (pre-)hook on it or on any submodule, a global module hook, or a ``forward``
    replaced on an instance. A compiled graph bakes a hook's Python side effects in at
    trace time, so counters and recorders would stop seeing calls."""
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)
               for m in model.modules())


#: The policy ``generate`` and ``stream`` consult for ``compile=None``.
auto_compile = AutoCompile(enabled=os.environ.get("OPENMYTHOS_AUTO_COMPILE", "1") != "0")
