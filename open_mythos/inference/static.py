"""Compiled decode: one token per sequence as a single fixed-shape graph.

At the sizes people run on a laptop, an eager decode step is bound by operator dispatch
(a few thousand small kernels per token across prelude, loops and coda), not by arithmetic,
so a faster cache alone does not show up on the clock. This module makes a decode step a
function of fixed-shape tensors only, which ``torch.compile`` turns into one graph:

* the cache buffers are the preallocated :class:`~open_mythos.inference.cache.KVCache`
  entries, each ``max_len`` long; a step writes its keys and values at ``slot`` (a tensor,
  so the position is data, not a constant baked into the graph) and attends over the whole
  buffer through a key mask that hides unwritten positions and left padding;
* RoPE positions are a (B, 1) tensor, per sequence;
* every loop runs: ACT still weights and freezes positions exactly as in the eager model,
  but a data-dependent early exit cannot live inside a fixed graph (the eager path keeps it).

The graph is specialised on the model's structure, the batch size, ``max_len``, ``n_loops``
and the dtypes; :func:`cache_length` rounds ``max_len`` up so that calls with similar lengths
share one compilation. Prefill stays eager (one call per generation). On the CPU the graph
runs through inductor's C++ wrapper, and only a generation's first step evaluates every guard
(see :func:`_compiled` and :meth:`CompiledDecoder.step`).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ..layers.attention import AttnContext
from ..layers.rope import rope_cos_sin, table_dtype
from .cache import Entries, KVCache

if TYPE_CHECKING:
    from ..model import CausalLM

__all__ = ["CompiledDecoder", "cache_length"]


def cache_length(needed: int, max_seq_len: int, minimum: int = 64, step: int = 256) -> int:
    """Cache buffer length for ``needed`` positions, rounded up so that compiled graphs are
    reused across calls: the next power of two from ``minimum`` up to ``step``, then the
    next multiple of ``step`` (at most ``step - 1`` masked positions), capped at
    ``max_seq_len``."""
    length = minimum
    while length < min(needed, step):
        length *= 2
    if needed > length:
        length = -(-needed // step) * step
    return max(needed, min(length, max_seq_len))


class SlotCache:
    """Cache store for one compiled step: writes go to position ``slot``, reads return the
    whole buffer (the attention mask hides what is not valid)."""

    def __init__(self, buffers: dict[str, Entries], slot: torch.Tensor):
        self.buffers = buffers
        self.slot = slot

    def length(self, key: str) -> int:
        return next(iter(self.buffers[key].values())).shape[-2]

    def write(self, key: str, start: int, new: Entries) -> Entries:
        bufs = self.buffers[key]
        for name, t in new.items():
            buf = bufs[name]
            buf.index_copy_(buf.dim() - 2, self.slot, t.to(buf.dtype))
        return bufs

    def window(self, key: str, start: int, new: Entries, before: int) -> Entries:
        """Write the one new position at ``slot``; gather ``slot - before ... slot`` (zeros
        before position 0; left padding was written as zeros by the prefill)."""
        bufs = self.write(key, start, new)
        idx = self.slot + torch.arange(-before, 1, device=self.slot.device)
        keep = idx >= 0
        idx = idx.clamp(min=0)
        return {n: b.index_select(b.dim() - 2, idx) * keep.view(-1, 1).to(b.dtype)
                for n, b in bufs.items()}

    def fill_missing(self, key: str, src_key: str, upto: int) -> None:
        """Nothing to do: :meth:`CompiledDecoder.prepare` filled every depth beforehand."""

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a compiled decode step never rewinds the cache")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.buffers.values() for t in e.values())


def decode_step(
    model: CausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
    key_mask: torch.Tensor,
    buffers: dict[str, Entries],
    n_loops: int,
) -> torch.Tensor:
    """Logits (B, vocab) of one new token per sequence.

    Args:
        input_ids: (B, 1) the new tokens.
        positions: (B,) their RoPE positions (real tokens before them).
        slot: (1,) long, the cache position they are written to.
        key_mask: (B, max_len) bool, cache positions each sequence may attend to
            (including ``slot``).
        buffers: the cache buffers, ``{key: {name: (B, ..., max_len, d)}}``.
        n_loops: loops of the recurrent block (all run).
    """
    B = input_ids.shape[0]
    cos, sin = rope_cos_sin(positions.view(B, 1), model.rope_dim, model.cfg.rope_theta,
                            table_dtype(model.embed.weight.dtype))
    ctx = AttnContext(cos, sin, 0, key_mask.view(B, 1, 1, -1), False, SlotCache(buffers, slot))
    return model.head(model.trunk(input_ids, ctx, n_loops)[:, -1])


#: Run the CPU graph through inductor's C++ wrapper (``benchmarks/inference.py --ablate``
#: measures the step without it).
CPP_WRAPPER_ON_CPU = True
#: Evaluate the compiled step's guards in full on a generation's first step only (see
#: :meth:`CompiledDecoder.step`; ``--ablate`` measures the step without it).
SKIP_REPEATED_GUARDS = True

#: Per (device type, wrapper, shape): the compiled copies of :func:`decode_step`, in the
#: order they were made (a copy is added when the earlier ones are full, see :func:`_compiled`).
_compiled_steps: dict[tuple, list[Callable[..., torch.Tensor]]] = {}

#: Held by every change of the compiler's stance made while decoding, and by every first
#: compiled step of a generation (it may compile): the stance is one process-wide value
#: that each ``set_stance`` window restores on exit to what it found on entry, so the
#: overlapping windows of two threads left it set for good (every later compilation in
#: the process refused under "fail_on_recompile"), and another thread compiling inside
#: such a window was refused. Compiled code a user runs in other threads at the same time
#: is not covered.
STANCE_LOCK = threading.RLock()


@contextlib.contextmanager
def stance(name: str, **kwargs: object) -> Iterator[None]:
    """``torch.compiler.set_stance(name, **kwargs)`` under :data:`STANCE_LOCK`."""
    with STANCE_LOCK, torch.compiler.set_stance(name, **kwargs):
        yield


@contextlib.contextmanager
def eager_modules() -> Iterator[None]:
    """Run modules compiled in place (``torch.compile`` of a block, ``openmythos train
    --compile``'s) eagerly for one eager forward of decoding, where the stance may be set
    (:func:`may_set_stance`): every prompt length, cache position and cache key would
    compile them anew (tens of graphs for one short generation), and fill the recompile
    limit a training run sized for its own graphs. The compiled decode step is the
    compiled path."""
    if may_set_stance():
        with stance("force_eager"):
            yield
    else:
        yield


# torch >= 2.6 can skip the guards that do not tell cached graphs apart.
_CAN_SKIP_GUARDS = "skip_guard_eval_unsafe" in inspect.signature(
    getattr(torch.compiler, "set_stance", lambda: None)).parameters


def _compiled(device_type: str, shape: tuple[int, ...], copy: int = 0
              ) -> Callable[..., torch.Tensor]:
    """:func:`decode_step` compiled for one device type and one ``shape`` (batch size, cache
    length, loops): its ``copy``-th compiled copy.

    Each shape gets its own copies of the function's code object: Dynamo keeps at most
    ``torch._dynamo.config.recompile_limit`` (8) graphs per code object and, with
    ``fullgraph=True``, fails past that, while a long-running process (a server) meets many
    batch sizes, cache buckets and loop counts. Models that share a shape share a copy
    (one graph each for models that differ in structure, dtype or a constant the graph
    holds, such as ``cfg.act_threshold``); when a copy is full, :class:`CompiledDecoder`
    moves on to the next one (a sweep over ten model sizes or thresholds in one process).

    On the CPU the graph is called through a generated C++ wrapper (inductor's
    ``cpp_wrapper``, :data:`CPP_WRAPPER_ON_CPU`): a decode step runs a few hundred small
    kernels, and launching each from generated Python code costs about as much as running
    it. The price is a longer first compilation (it also compiles the wrapper).
    """
    cpp_wrapper = device_type == "cpu" and CPP_WRAPPER_ON_CPU
    copies = _copies(device_type, shape)
    while len(copies) <= copy:
        code = decode_step.__code__.replace()  # a distinct code object: its own graph cache
        fn = types.FunctionType(code, decode_step.__globals__, decode_step.__name__,
                                decode_step.__defaults__, decode_step.__closure__)
        options = {"cpp_wrapper": True} if cpp_wrapper else None
        copies.append(torch.compile(fn, fullgraph=True, dynamic=False, options=options))
    return copies[copy]


def _copies(device_type: str, shape: tuple[int, ...]) -> list[Callable[..., torch.Tensor]]:
    """The compiled copies of :func:`decode_step` made so far for this device and shape."""
    cpp_wrapper = device_type == "cpu" and CPP_WRAPPER_ON_CPU
    return _compiled_steps.setdefault((device_type, cpp_wrapper, *shape), [])


def may_set_stance() -> bool:
    """Whether decoding may change the compiler's stance for one call: torch has
    ``set_stance`` (2.6 on), this is the main thread, and the stance is the default (one
    the user set, such as ``force_eager`` or ``fail_on_recompile``, is kept). The stance is
    process-wide: set from a worker thread (a server, a web app's thread pool) it would
    also apply to compiled code the main thread runs meanwhile (its compilations refused
    under "fail_on_recompile", its guards skipped); the library's own windows and first
    steps are serialised by :data:`STANCE_LOCK`."""
    if not hasattr(torch.compiler, "set_stance"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)
    return stance is not None and stance.stance == "default" and stance.backend is None


def _may_skip_guards() -> bool:
    """Whether a repeated step may run with only the differentiating guards
    (:data:`SKIP_REPEATED_GUARDS`, where torch can, and :func:`may_set_stance`)."""
    return _CAN_SKIP_GUARDS and SKIP_REPEATED_GUARDS and may_set_stance()


class CompiledDecoder:
    """Drives compiled decode steps over a prefilled :class:`KVCache`.

    Args:
        model: the model (eval mode, no gradients: the caller's job, as in ``stream``).
        cache: the cache the prompt was prefilled into; its ``max_len`` fixes the graph.
        n_loops: loops per step.
        prompt_len: positions already cached (the prompt, padding included).
        attention_mask: optional (B, prompt_len) 1/0 mask of real prompt tokens.
        compile: ``False`` runs the same fixed-shape step eagerly (for tests and debugging).
    """

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        n_loops: int,
        prompt_len: int,
        attention_mask: torch.Tensor | None = None,
        compile: bool = True,
    ):
        if cache.depth_sharing != "per_depth":
            raise ValueError("the compiled decode step needs a per-depth cache "
                             f"(depth_sharing={cache.depth_sharing!r})")
        self.model, self.cache, self.n_loops = model, cache, n_loops
        self.pos = prompt_len
        self.prepare()
        buffers = cache.buffers()
        first = next(iter(next(iter(buffers.values())).values()))
        B, device = first.shape[0], first.device
        self._compile = compile
        self._device_type, self._shape, self._copy = device.type, (B, cache.max_len, n_loops), 0
        self._step = _compiled(device.type, self._shape) if compile else decode_step
        self._steps = 0
        self.key_mask = torch.zeros(B, cache.max_len, dtype=torch.bool, device=device)
        self.padded = attention_mask is not None
        if attention_mask is None:
            self.key_mask[:, :prompt_len] = True
            self.positions = torch.full((B,), prompt_len, dtype=torch.long, device=device)
        else:
            real = attention_mask.to(device=device, dtype=torch.bool)
            self.key_mask[:, :prompt_len] = real
            self.positions = real.long().sum(-1)

    def prepare(self) -> None:
        """Make every cache entry the step writes exist and hold ``pos`` positions.

        A recurrent depth the prefill did not reach (ACT early exit, fewer loops) is filled
        from the deepest one computed, the rule the eager forward applies.
        """
        from ..registry import is_looped  # imports the model, which imports this package

        self.keys = keys = self.model.cache_keys(self.n_loops)
        if is_looped(self.model):
            key = self.model.recurrent.cache_key
            for t in range(1, self.n_loops):
                self.cache.fill_missing(key(t), key(t - 1), self.pos)
        missing = [k for k in keys if self.cache.length(k) != self.pos]
        if missing:
            raise ValueError(f"cache entries {missing} do not hold the {self.pos} prompt positions")

    def _first_step(self, args: tuple) -> torch.Tensor:
        """The first compiled step: in the first copy of the shape's compiled step that has
        (or has room for) a graph for this model. Dynamo refuses a graph past its limit
        before running anything, so the step is simply retried in the next copy; under
        the ``"fail_on_recompile"`` stance (a shape the automatic policy believes
        compiled) a copy without this model's graph hands over to the next existing copy,
        and the refusal reaches the caller when no copy has it."""
        from torch._dynamo import exc

        from .autocompile import refused_recompile

        # torch < 2.7 names it FailOnCacheLimitHit.
        limit_hit = getattr(exc, "FailOnRecompileLimitHit", None) or exc.FailOnCacheLimitHit
        while True:
            try:
                return self._step(*args)
            except limit_hit:
                pass
            except RuntimeError as err:
                if not (refused_recompile(err)
                        and len(_copies(self._device_type, self._shape)) > self._copy + 1):
                    raise
            self._copy += 1
            self._step = _compiled(self._device_type, self._shape, self._copy)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (B,) tokens at the next position; return next-token logits (B, vocab)."""
        if self.pos >= self.cache.max_len:
            raise ValueError(f"the cache holds at most {self.cache.max_len} positions")
        slot = torch.tensor([self.pos], dtype=torch.long, device=tokens.device)
        self.key_mask[:, self.pos] = True
        args = (self.model, tokens.view(-1, 1), self.positions, slot, self.key_mask,
                self.cache.buffers(), self.n_loops)
        if self._compile and self._steps > 0 and _may_skip_guards():
            # The first step of this decoder ran every guard and chose (or built) its
            # graph; later steps pass the same model, the same buffer tensors and inputs of
            # the same shapes and dtypes, so only the guards that tell this shape's cached
            # graphs apart (another model of the same shape) are evaluated. A model
            # changed between two steps of one generation (dtype, device, train mode) would
            # go unnoticed: see the ``stream`` docstring.
            with stance("default", skip_guard_eval_unsafe=True):
                logits = self._step(*args)
        elif self._compile and self._steps == 0:
            with STANCE_LOCK:
                logits = self._first_step(args)
        else:
            logits = self._step(*args)
        self._steps += 1
        self.pos += 1
        self.positions = self.positions + 1
        self.cache.mark_filled(self.keys, self.pos)
        return logits

