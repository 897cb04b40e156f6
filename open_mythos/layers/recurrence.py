"""The looped core: loop-index embedding, depth-wise LoRA, LTI injection, ACT halting, and
the :class:`RecurrentBlock` that runs one shared block ``n_loops`` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules import module as nn_module
from torch.utils.checkpoint import checkpoint

from ..config import MythosConfig
from .attention import AttnContext, DepthCarry
from .block import TransformerBlock
from .norm import RMSNorm, at_least_fp32
from .rope import table_dtype
from .telemetry import CopiesDetached


def loop_signal(
    loop_t: int, loop_dim: int, dim: int, theta: float = 10000.0,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The loop index's sinusoid on the first ``loop_dim`` of ``dim`` channels, zeros on the
    rest: a (dim,) vector in ``dtype``, float32 (angles in float32, exact for any loop
    count) or float64 (for a float64 model)."""
    half = (loop_dim + 1) // 2
    freqs = theta ** (-torch.arange(half, device=device, dtype=dtype) * 2 / loop_dim)
    angles = loop_t * freqs
    emb = torch.cat((angles.sin(), angles.cos()))[:loop_dim]  # (loop_dim,)
    return F.pad(emb, (0, dim - loop_dim))


def loop_index_embedding(
    h: torch.Tensor,
    loop_t: int,
    loop_dim: int,
    theta: float = 10000.0,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Add a sinusoidal signal of the loop index to the first ``loop_dim`` channels of ``h``.

    The signal is :func:`loop_signal`; the sum is taken in float32 and cast back to
    ``h.dtype``. ``scale`` multiplies the signal: a float, or a tensor broadcastable to
    ``h`` such as the per-position RMS of ``h`` (what :class:`RecurrentBlock` uses, so that
    the signal neither swamps a small residual stream nor vanishes in a large one).
    Shape of ``h``: (..., dim) -> same.
    """
    return add_loop_signal(h, loop_signal(loop_t, loop_dim, h.shape[-1], theta, h.device), scale)


def add_loop_signal(h: torch.Tensor, signal: torch.Tensor,
                    scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``h + signal * scale`` taken in float32 at least, cast back to ``h.dtype``."""
    return (at_least_fp32(h) + signal * scale).to(h.dtype)


class LoRAAdapter(nn.Module):
    """Depth-wise LoRA: ``delta(x, t) = (down(x) * scale[t]) @ B``.

    ``down`` and ``B`` are shared by all loops; each trained loop index has its own scale
    vector. Initialisation follows LoRA practice (``B = 0``, scales 1), so the adapter starts
    as the identity on the block output and learns at a normal rate. Loop indices beyond the
    ``max_loops`` trained scales reuse the last one (depth extrapolation).
    """

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.empty(rank, dim))
        self.scale = nn.Embedding(max_loops, rank)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=self.down.in_features ** -0.5)
        nn.init.zeros_(self.B)
        nn.init.ones_(self.scale.weight)

    def loop_scale(self, loop_t: int) -> torch.Tensor:
        """The (rank,) scale of loop ``loop_t`` (the last trained one beyond ``max_loops``)."""
        return self.scale.weight[min(loop_t, self.scale.num_embeddings - 1)]

    def delta(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, dim) and a loop's ``scale`` (rank,) -> delta (B, T, dim)."""
        return (self.down(x) * scale) @ self.B

    def forward(self, x: torch.Tensor, loop_t: int) -> torch.Tensor:
        """``x``: (B, T, dim) -> delta (B, T, dim)."""
        return self.delta(x, self.loop_scale(loop_t))


class LTIInjection(nn.Module):
    """Stable input injection ``h <- A * h + B * e + block_out`` with diagonal ``A`` in (0, 1).

    ``A = exp(-exp(log_dt + log_A))`` (zero-order-hold discretisation of a negative diagonal
    system). The exponent is held in ``[log 1e-6, log 80]`` by a straight-through clamp: the
    value is clamped, so in float32 ``A`` can neither round to 1 nor underflow to 0, but the
    gradient passes as if unclamped, so no optimiser step can strand the parameters where
    the gradient is zero.

    The state ``h`` is kept in its own dtype: in a model converted to bfloat16 (8
    significant bits) a channel whose ``A`` is above about 0.996 does not decay from one
    loop to the next, as ``A * h`` rounds back to ``h``. Autocast keeps the state float32.
    """

    LOG_MIN_RATE = math.log(1e-6)
    LOG_MAX_RATE = math.log(80.0)

    def __init__(self, dim: int):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.full((dim,), 0.1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.log_A)
        nn.init.zeros_(self.log_dt)
        nn.init.constant_(self.B, 0.1)

    def get_A(self) -> torch.Tensor:
        """Diagonal of the state matrix, float32 (float64 for float64 parameters) (dim,),
        every entry in (0, 1)."""
        s = at_least_fp32(self.log_dt + self.log_A)
        s = s + (s.clamp(self.LOG_MIN_RATE, self.LOG_MAX_RATE) - s).detach()
        return torch.exp(-torch.exp(s))

    def forward(self, h: torch.Tensor, e: torch.Tensor, transformer_out: torch.Tensor,
                A: torch.Tensor | None = None) -> torch.Tensor:
        """All inputs (B, T, dim) -> next state (B, T, dim) in ``h``'s dtype. ``A``: the
        diagonal from :meth:`get_A`, when the caller computed it once for several steps."""
        A = self.get_A() if A is None else A
        return A.to(h.dtype) * h + self.B.to(h.dtype) * e + transformer_out


class ACTHalting(nn.Module):
    """Per-position halting probability ``sigmoid(halt(h))``, (B, T, dim) -> (B, T) float32
    (float64 for float64 states)."""

    def __init__(self, dim: int, bias_init: float = -3.0):
        super().__init__()
        self.bias_init = bias_init
        self.halt = nn.Linear(dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.halt.weight, std=0.02)
        nn.init.constant_(self.halt.bias, self.bias_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(at_least_fp32(self.halt(h))).squeeze(-1)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put(full: torch.Tensor, rows: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``full`` with batch rows ``rows`` replaced by ``part`` (``part`` itself if rows is None)."""
    return part if rows is None else full.index_copy(0, rows, part.to(full.dtype))


def local_any(flag: torch.Tensor) -> bool:
    """``flag.any()`` on this process alone: the early-exit test of a single process."""
    return bool(flag.any())


def agreed_any(flag: torch.Tensor) -> bool:
    """``flag.any()`` on any rank of the default process group (one all-reduce): the
    early-exit test of a data-parallel run, so every rank runs the same number of loops
    and the collectives inside them stay matched. This process's own answer when no
    group is initialised."""
    import torch.distributed as dist

    out = flag.any().to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return bool(out.item())


def _sharded_inside(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``module`` or a module inside it: each of
    their forwards then all-gathers parameters, a collective every rank must call."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


@dataclass(frozen=True)
class ExitRule:
    """Training-free exit test, applied per position after every loop at inference.

    A position exits after loop ``t`` (1-based) once ``t >= min_loops`` and any criterion
    that is set holds; its state is frozen from then on (its keys and values at the deeper
    depths are those of its last loop, as for an ACT-halted position). With ACT on, an exit
    halts the position with its remaining halting mass on the current state.

    Criteria (``None``: not used); the readout is the logit lens ``head(norm(h))`` of the
    state, a function of the position alone, so that a full forward and cached decoding
    take the same decisions:

    Attributes:
        kl: exit when ``KL(p_t || p_{t-1}) < kl`` (nats) between successive loops' readouts.
        entropy: exit when the readout's entropy is below ``entropy`` (nats).
        rel_change: exit when ``||h_t - h_{t-1}|| / ||h_t|| < rel_change``.
        argmax_streak: exit when the readout's argmax has stayed the same for this many
            successive loops (1: the same as the previous loop's).
        min_loops: never exit before this many loops.
    """

    kl: float | None = None
    entropy: float | None = None
    rel_change: float | None = None
    argmax_streak: int | None = None
    min_loops: int = 1

    #: The largest ``argmax_streak`` or ``min_loops``.
    MAX_COUNT: ClassVar[int] = 2**31 - 1

    def __post_init__(self) -> None:
        # NumPy scalars are taken and stored as Python numbers (a rule goes into JSON: a
        # checkpoint's config, a server's /v1/models).
        for name in ("kl", "entropy", "rel_change"):
            value = getattr(self, name)
            if value is None:
                continue
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                    and math.isfinite(value) and value >= 0):
                raise ValueError(f"ExitRule.{name} must be a finite number >= 0, got "
                                 f"{value!r}{_type_note(value)}")
            object.__setattr__(self, name, float(value))
        for name in ("argmax_streak", "min_loops"):
            value = getattr(self, name)
            if value is None and name == "argmax_streak":
                continue
            # The bound keeps the counts inside a tensor's int64 (2**80 overflowed there).
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                    and 1 <= value <= self.MAX_COUNT):
                raise ValueError(f"ExitRule.{name} must be an integer in [1, {self.MAX_COUNT}], "
                                 f"got {value!r}{_type_note(value)}")
            object.__setattr__(self, name, int(value))
        if self.kl is None and self.entropy is None and self.rel_change is None \
                and self.argmax_streak is None:
            raise ValueError("an ExitRule needs at least one of kl, entropy, rel_change, "
                             "argmax_streak")

    @property
    def needs_readout(self) -> bool:
        return self.kl is not None or self.entropy is not None or self.argmax_streak is not None


def _type_note(value: object) -> str:
    """`` (a Tensor)`` after a value whose type its repr does not show, such as a tensor
    (a Python or NumPy number is what a rule takes)."""
    if isinstance(value, (numbers.Real, str)) or value is None:  # NumPy's numbers too
        return ""
    return f" (a {type(value).__name__}: pass a Python number)"


def _instrumented(module: nn.Module, cls: type) -> bool:
    """Whether a user hooked ``module`` (forward or backward hooks, its own or global)
    or replaced its ``forward``: then it must be called as ``module(...)`` with upstream's
    arguments, not through the methods the loop calls for speed."""
    return bool(type(module).forward is not cls.forward or "forward" in module.__dict__
                or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def as_exit_rule(rule: ExitRule | Mapping[str, Any] | None,
                 name: str = "exit_rule") -> ExitRule | None:
    """An :class:`ExitRule` from itself or a mapping of its fields (validated), or None;
    ``name`` is the argument's, for the error.

    Raises:
        TypeError: anything else, or a mapping with fields an ExitRule does not have.
        ValueError: an invalid threshold (the message names the field).
    """
    if rule is None or isinstance(rule, ExitRule):
        return rule
    if not isinstance(rule, Mapping):
        raise TypeError(f"{name} must be an ExitRule or a dict of its fields, got {rule!r}")
    return ExitRule(**rule)


class _Exits:
    """An :class:`ExitRule`'s memory over one forward: the previous loop's log-probabilities
    and argmax, and the argmax streak, each (B, T, ...) for the whole batch."""

    def __init__(self, rule: ExitRule, lens: Callable[[torch.Tensor], torch.Tensor] | None,
                 h: torch.Tensor):
        if rule.needs_readout and lens is None:
            raise ValueError("this exit rule reads out the state; pass lens")
        self.rule, self.lens = rule, lens
        B, T, _ = h.shape
        self.logp: torch.Tensor | None = None
        self.argmax = torch.zeros(B, T, dtype=torch.long, device=h.device)
        self.streak = torch.zeros(B, T, dtype=torch.long, device=h.device)

    def update(self, h_in: torch.Tensor, h_new: torch.Tensor, rows: torch.Tensor | None,
               t: int) -> torch.Tensor:
        """Loop ``t`` (0-based) took rows ``rows`` from ``h_in`` to ``h_new``; returns the
        (b, T) positions of those rows whose rule fires."""
        rule = self.rule
        fire = torch.zeros(h_new.shape[:2], dtype=torch.bool, device=h_new.device)
        if rule.rel_change is not None and t > 0:
            new, old = at_least_fp32(h_new), at_least_fp32(h_in)
            fire |= (new - old).norm(dim=-1) < rule.rel_change * new.norm(dim=-1)
        if rule.needs_readout:
            logp = torch.log_softmax(at_least_fp32(self.lens(h_new)), dim=-1)
            if rule.entropy is not None:
                fire |= -(logp.exp() * logp).sum(-1) < rule.entropy
            if rule.kl is not None and t > 0:
                prev = _take(self.logp, rows)
                fire |= (logp.exp() * (logp - prev)).sum(-1) < rule.kl
            if rule.argmax_streak is not None:
                arg = logp.argmax(-1)
                same = (arg == _take(self.argmax, rows)) if t > 0 else torch.zeros_like(fire)
                streak = torch.where(same, _take(self.streak, rows) + 1, 0)
                fire |= streak >= rule.argmax_streak
                self.argmax = _put(self.argmax, rows, arg)
                self.streak = _put(self.streak, rows, streak)
            self.logp = logp if self.logp is None else _put(self.logp, rows, logp)
        return fire & (t + 1 >= rule.min_loops)


class _Halting:
    """ACT's running sums over one forward, all (B, T) float32 unless noted.

    Attributes:
        running: (B, T) bool, positions that have not halted yet.
        mass: halting probability spent so far.
        ponder: expected loop count so far (``sum_t (t + 1) * w_t``).
        h_out: (B, T, dim) the weighted mixture of the states so far.
        weights: each loop's detached (B, T) weights.
    """

    def __init__(self, h: torch.Tensor):
        B, T, dim = h.shape
        dtype = torch.promote_types(h.dtype, torch.float32)  # the sums' precision
        self.running = torch.ones(B, T, dtype=torch.bool, device=h.device)
        self.mass = torch.zeros(B, T, dtype=dtype, device=h.device)
        self.ponder = torch.zeros(B, T, dtype=dtype, device=h.device)
        self.h_out = torch.zeros(B, T, dim, dtype=dtype, device=h.device)
        self.weights: list[torch.Tensor] = []

    def update(self, h: torch.Tensor, h_in: torch.Tensor, h_new: torch.Tensor,
               p: torch.Tensor, rows: torch.Tensor | None, t: int, last: bool,
               threshold: float, stop: torch.Tensor | None = None) -> torch.Tensor:
        """Fold loop ``t``'s state ``h_new`` (rows ``rows`` of the batch, halting probability
        ``p``) into the sums; returns the next full state, frozen where already halted.
        ``stop``: (b, T) positions that halt now whatever their mass (an exit rule fired)."""
        mass_in, run_in = _take(self.mass, rows), _take(self.running, rows)
        step = p * (1.0 - mass_in)
        halt_now = (mass_in + step >= threshold) | last
        if stop is not None:
            halt_now = halt_now | stop
        w = torch.where(halt_now, 1.0 - mass_in, step) * run_in
        self.h_out = _put(self.h_out, rows,
                          _take(self.h_out, rows) + w.unsqueeze(-1) * at_least_fp32(h_new))
        self.mass = _put(self.mass, rows, mass_in + w)
        self.ponder = _put(self.ponder, rows, _take(self.ponder, rows) + (t + 1) * w)
        self.weights.append(_put(torch.zeros_like(self.mass), rows, w.detach()))
        self.running = _put(self.running, rows, run_in & ~halt_now)
        return _put(h, rows, torch.where(run_in.unsqueeze(-1), h_new, h_in))


def _check_differentiated(carry: DepthCarry, h: torch.Tensor, ffn: nn.Module) -> None:
    """Raise if a differentiated loop's block ran without autograd inside: the keys and
    values it carries to the next depth, and its balance loss, would get no gradient. That
    is ``torch.utils.checkpoint(..., use_reentrant=True)`` (PyTorch's default when
    ``use_reentrant`` is not given) around the looped block: its forward runs under
    ``no_grad`` and only the block's output is differentiated."""
    merged = carry.merged
    lost_kv = h.requires_grad and merged and not any(t.requires_grad for t in merged.values())
    aux, router = getattr(ffn, "last_aux_loss", None), getattr(ffn, "router", None)
    lost_aux = (isinstance(aux, torch.Tensor) and not aux.requires_grad
                and router is not None and router.weight.requires_grad)
    if lost_kv or lost_aux:
        raise RuntimeError(
            "the looped block ran without autograd inside a differentiated loop "
            "(torch.utils.checkpoint with use_reentrant=True around it?): the keys and values "
            "it carries to the next loop and its balance loss would get no gradient. Use "
            "use_reentrant=False, or "
            "model.recurrent.gradient_checkpointing = True")


class RecurrentBlock(CopiesDetached, nn.Module):
    """One :class:`TransformerBlock` with MoE FFN, looped.

    Each loop ``t``::

        x    = RMSNorm(loop_index_embedding(h, t, scale=rms(h)) + e)
        out  = block(x);  out = out + lora(out, t)
        h'   = A * h + B * e + out
        p    = act(h')                                    # halting probability (B, T)

    ACT (``cfg.use_act``) mixes the states of all loops with per-position weights that form
    a convex combination. The halting mass is stick-breaking: loop ``t`` takes
    ``p_t * (1 - c)`` where ``c`` is the mass already assigned; once ``c`` would reach
    ``act_threshold``, or at the last allowed loop, the position takes the whole remainder
    ``1 - c`` and halts. A halted position stops changing: its state is frozen and, at
    deeper loops, other positions attend to the keys and values of the last loop it
    computed (the same rule the KV cache applies, so cached and full forwards agree).
    A threshold above 1 never halts early; the weights still sum to 1.

    With ACT off, every position runs every loop and the output is the last state.

    After a forward:
        last_ponder_cost: (B, T) float32 expected number of loops per position
            (``sum_t (t + 1) * w_t``), differentiable, for a ponder penalty.
        last_act_weights: (loops_run, B, T) detached halting weights.
        last_loops_run: loops actually executed (fewer than requested after an early exit).
        last_work_fraction: sequence-loops computed / sequence-loops requested; below 1 when
            ACT early exit stopped some sequences (or all) before ``n_loops``.
        last_aux_loss: mean MoE balance loss over the loops (with ``backprop_loops=k``,
            its gradient is that of the mean over the last ``k``).
        last_expert_load: (loops_run, n_experts) expert load per loop depth.
        last_position_loops: (B, T) long, the loops each position ran before it halted or
            exited (the loops run for those that never did).

    Early exit stops the loop when no position of the batch is still running, as decided
    by ``any_alive`` (a callable: (B,) bool tensor -> bool; default :func:`local_any`). In
    a data-parallel run every rank must run the same number of loops (FSDP gathers each
    loop's weights collectively), so the distributed code sets ``any_alive`` to a test
    agreed across ranks (:func:`agreed_any`, through
    :func:`open_mythos.training.distributed.agree_across_ranks`). A block sharded by
    ``fully_shard`` (a user's own FSDP2 wrapping) takes the agreed test by itself;
    otherwise this layer runs no collective.

    Memory options for training with many loops:
        gradient_checkpointing: recompute each loop in the backward pass instead of
            storing its activations.
        ``forward(..., backprop_loops=k)``: truncated backpropagation, only the last ``k``
            loops are differentiated (the earlier ones run without autograd).
    """

    #: The class of the looped block (the upstream-signature adapter substitutes its own).
    block_class: ClassVar[type[TransformerBlock]] = TransformerBlock

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.block = self.block_class(cfg, use_moe=True)
        self.injection = LTIInjection(cfg.dim)
        self.act = ACTHalting(cfg.dim, cfg.act_halt_bias_init)
        self.lora = LoRAAdapter(cfg.dim, cfg.lora_rank, cfg.max_loop_iters) if cfg.lora_rank else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.loop_dim = cfg.loop_dim
        # The last loop index with a signal of its own (None: every loop has one).
        self.last_loop_index = cfg.max_loop_iters - 1 if cfg.clamp_loop_index else None
        self.last_ponder_cost: torch.Tensor | None = None
        self.last_act_weights: torch.Tensor | None = None
        self.last_loops_run: int = 0
        self.last_work_fraction: float = 1.0
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None
        self.last_states: dict[int, torch.Tensor] = {}
        self.last_position_loops: torch.Tensor | None = None
        self.gradient_checkpointing = False
        self._replaying = False  # inside a checkpoint's recomputation
        self.any_alive: Callable[[torch.Tensor], bool] = local_any
        # (loop index, device, dim, dtype) -> the loop signal: a constant, made once.
        self._signals: dict[tuple[int, torch.device, int, torch.dtype], torch.Tensor] = {}

    @staticmethod
    def cache_key(t: int) -> str:
        return f"recurrent_loop_{t}"

    def _loop_signal(self, t: int, h: torch.Tensor) -> torch.Tensor:
        t = t if self.last_loop_index is None else min(t, self.last_loop_index)
        if torch.compiler.is_compiling():
            # A compiled graph folds the signal into a constant; kept here, a tensor made
            # inside the graph would be one of its outputs, which CUDA graphs overwrite on
            # the next replay.
            return loop_signal(t, self.loop_dim, h.shape[-1], device=h.device,
                               dtype=table_dtype(h.dtype))
        key = (t, h.device, h.shape[-1], table_dtype(h.dtype))
        signal = self._signals.get(key)
        if signal is None:
            # A normal tensor even when first made under inference_mode (the server's), so
            # that a later training forward can save it for backward.
            with torch.inference_mode(False):
                signal = self._signals[key] = loop_signal(t, self.loop_dim, h.shape[-1],
                                                          device=h.device, dtype=key[3])
        return signal

    def _block_step(
        self, h: torch.Tensor, e: torch.Tensor, t: int, ctx: AttnContext, carry: DepthCarry,
        A: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One loop without halting: the next state h' (B, T, dim).

        The loop index enters only through tensors made here (its signal and LoRA scale),
        and the cache key only when there is a cache, so :meth:`loop_body` is the same
        function at every loop: compiled once (:meth:`compile_loop`), it serves them all.
        ``A``: the injection's diagonal, computed once per forward.
        """
        signal = self._loop_signal(t, h)
        # A LoRA or injection that a user hooked or whose forward they replaced (upstream's
        # instrumentation) is called as upstream called it: lora(out, t), injection(h, e,
        # out). The LoRA then takes the loop index as an int, and a compiled body one graph
        # per index.
        own_lora = self.lora is None or not _instrumented(self.lora, LoRAAdapter)
        lora_scale = self.lora.loop_scale(t) if self.lora is not None and own_lora else None
        key = self.cache_key(t) if ctx.cache is not None else None
        if h is e:
            # NOTE: at loop 0 the state is the encoded input itself. Passing one tensor as
            # two arguments makes a compiled loop_body guard on the aliasing, and PyTorch
            # 2.13 then fails (TypeError) explaining a recompilation for a second model.
            h = h.view_as(h)
        return self.loop_body(h, e, signal, lora_scale, ctx, key, carry, A,
                              None if own_lora else t,
                              _instrumented(self.injection, LTIInjection))

    def compile_loop(self, **compile_kwargs) -> None:
        """``torch.compile`` :meth:`loop_body` in place: one graph for every loop index and
        loop count (two specialisations: the first loop, which has no depth carry yet, and
        the rest; at batch size 1 a third, for the batch stride of the carry the first
        graph returns). The halting bookkeeping and the loop itself stay in Python. A copy
        (``copy.deepcopy``, pickling, ``torch.save`` of the model) runs its own loop body
        uncompiled, as a copy of a module compiled with ``Module.compile`` does."""
        self.loop_body = torch.compile(self.loop_body, **compile_kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # compile_loop's compiled method is bound to this instance: a copy would run the
        # original's weights (and pickle cannot write it).
        state.pop("loop_body", None)
        return state

    def loop_body(
        self, h: torch.Tensor, e: torch.Tensor, signal: torch.Tensor,
        lora_scale: torch.Tensor | None, ctx: AttnContext, cache_key: str | None,
        carry: DepthCarry, A: torch.Tensor | None = None, lora_t: int | None = None,
        upstream_injection: bool = False,
    ) -> torch.Tensor:
        """``h' = A * h + B * e + out`` with ``out = block(norm(h + rms(h) * signal + e))``
        plus its LoRA delta; ``signal`` (dim,) and ``lora_scale`` (rank,) are the loop's,
        ``A`` (dim,) the injection's diagonal (computed here when None). ``lora_t``: call the
        LoRA module itself with this loop index instead (a hooked or replaced LoRA);
        ``upstream_injection``: call the injection with upstream's three arguments."""
        # NOTE: an unscaled sinusoid (upstream) dwarfs a freshly initialised residual stream
        # (embeddings ~0.02), so after the norm every token looks alike and the router sends
        # all of them to the same experts. Scaling by the state's RMS keeps it proportionate.
        hf = at_least_fp32(h)
        # The clamp keeps sqrt's derivative finite at a state of zeros (an all-zero embedding
        # row with no Prelude): 0 * inf would make every recurrent gradient NaN. It changes
        # no other value.
        rms = hf.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(hf.dtype).tiny).sqrt()
        x = self.norm(add_loop_signal(hf, signal, rms).to(h.dtype) + e)
        out = self.block(x, ctx, cache_key, carry)
        if lora_scale is not None:
            out = out + self.lora.delta(out, lora_scale)
        elif lora_t is not None:
            out = out + self.lora(out, lora_t)
        if upstream_injection:
            return self.injection(h, e, out)
        return self.injection(h, e, out, A)

    def _step(
        self, h: torch.Tensor, e: torch.Tensor, t: int, ctx: AttnContext, carry: DepthCarry,
        A: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return self._block_step(h, e, t, ctx, carry, A)

        def run(h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            # The recomputation in backward must see the cache as the forward saw it, and
            # must not write it again (later chunks may have since). The carry is this
            # loop's own (DepthCarry.next), unchanged since.
            replay = self._replaying and ctx.cache is not None
            return self._block_step(h, e, t, dataclasses.replace(ctx, replay=True) if replay
                                    else ctx, carry, A)

        return checkpoint(run, h, e, use_reentrant=False, context_fn=self._checkpoint_contexts)

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        return contextlib.nullcontext(), self._recomputing()

    @contextlib.contextmanager
    def _recomputing(self) -> Iterator[None]:
        """During recomputation the attention reads the cache without writing it
        (:attr:`AttnContext.replay`), and what the MoE records (its load, counted a second
        time, and its ``last_*`` telemetry) is put back as the forward left it afterwards.
        The layer itself is not told: a flag read inside a compiled loop body gave the
        recomputation another graph, which saved other tensors than the forward's, and
        ``torch.utils.checkpoint`` refused it."""
        moe = self.block.ffn
        kept = moe.last_expert_load, moe.last_aux_loss
        counted = moe.load_since_update.clone()
        self._replaying = True
        try:
            yield
        finally:
            moe.last_expert_load, moe.last_aux_loss = kept
            moe.load_since_update.copy_(counted)
            self._replaying = False

    def forward(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        ctx: AttnContext,
        n_loops: int,
        early_exit: bool = False,
        backprop_loops: int | None = None,
        keep_states: Collection[int] = (),
        exit_rule: ExitRule | None = None,
        lens: Callable[[torch.Tensor], torch.Tensor] | None = None,
        states_out: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run up to ``n_loops`` loops.

        Args:
            h: initial state (B, T, dim), the Prelude output.
            e: encoded input re-injected every loop (B, T, dim).
            ctx: attention context (RoPE, mask, cache).
            n_loops: loops to run (>= 1); may exceed ``cfg.max_loop_iters``.
            early_exit: inference only: a sequence whose positions have all halted stops
                computing, and the loop ends once every sequence has halted. The decision to
                end is agreed across ranks under ``torch.distributed``.
            backprop_loops: differentiate only the last ``backprop_loops`` loops
                (``None``: all).
            keep_states: loop counts ``d`` (1-based: the state after ``d`` loops) whose
                states to keep in :attr:`last_states` (``{d: (B, T, dim)}``, still in the
                autograd graph) for a per-loop readout; not with ``early_exit``.
            exit_rule: freeze each position once this :class:`ExitRule` fires (with
                ``early_exit``, a sequence whose positions have all exited stops computing).
            lens: ``(b, T, dim) state -> (b, T, V) logits``, the readout of ``exit_rule``.
            states_out: a dict that receives the ``keep_states`` states of this call
                (:attr:`last_states` is the module's, which another thread's call replaces).

        Returns:
            (B, T, dim) in ``h``'s dtype: the ACT mixture of the loop states, or the last
            state with ACT off.
        """
        # NOTE: under torch.compile the early exit is off. Its test reads a device value on
        # the host after every loop, which splits the graph; and recompiling those pieces
        # for a second model crashed PyTorch 2.13 while it explained the recompilation (a
        # TypeError from its tensor-aliasing guard). The output is the same either way.
        # On the meta device and under FakeTensorMode (FLOP and memory estimates) there are
        # no values to halt on: every loop runs.
        early_exit = (early_exit and not torch.compiler.is_compiling()
                      and not (h.is_meta or is_fake(h)))
        with self.block.ffn.shared_casts():  # expert weights cast once for all loops
            return self._loops(h, e, ctx, n_loops, early_exit, backprop_loops, keep_states,
                               exit_rule, lens, {} if states_out is None else states_out)

    def _loops(self, h: torch.Tensor, e: torch.Tensor, ctx: AttnContext, n_loops: int,
               early_exit: bool, backprop_loops: int | None, keep_states: Collection[int],
               exit_rule: ExitRule | None,
               lens: Callable[[torch.Tensor], torch.Tensor] | None,
               states: dict[int, torch.Tensor]) -> torch.Tensor:
        if keep_states and early_exit:
            raise ValueError("keep_states needs every loop of every row: not with early_exit")
        B, T, _ = h.shape
        self.last_states = states
        carry = DepthCarry()
        fresh: torch.Tensor | None = None  # positions still computing (None: all)
        halting = _Halting(h) if self.cfg.use_act else None
        exits = None if exit_rule is None else _Exits(exit_rule, lens, h)
        running = torch.ones(B, T, dtype=torch.bool, device=h.device)
        depth = torch.full((B, T), n_loops, dtype=torch.long, device=h.device)
        aux, loads = [], []
        tracked_aux = 0  # the last loops' balance losses that autograd records
        grad_enabled = torch.is_grad_enabled()
        first_tracked = 0 if backprop_loops is None else n_loops - backprop_loops
        A = self.injection.get_A()  # a constant of the forward: computed once, not per loop
        rows: torch.Tensor | None = None  # batch rows still looping (None: all)
        sub_ctx = ctx
        work = 0
        t = 0
        any_alive = self.any_alive
        if early_exit and any_alive is local_any and _sharded_inside(self):
            any_alive = agreed_any  # per-rank decisions would leave all-gathers unmatched
        for t in range(n_loops):
            if ctx.cache is not None and t > 0:
                ctx.cache.fill_missing(self.cache_key(t), self.cache_key(t - 1), ctx.start_pos)
            # Under torch.compile, loop counts that changed between calls arrive as symbolic
            # ints: dynamo branches on their comparison (it guards on it), but cannot hand
            # the comparison to set_grad_enabled.
            tracked = grad_enabled
            if t < first_tracked:
                tracked = False
            with torch.set_grad_enabled(tracked):
                h_in, e_in = _take(h, rows), _take(e, rows)
                h_new = self._step(h_in, e_in, t, sub_ctx, carry, A)
                if tracked:
                    _check_differentiated(carry, h_in, self.block.ffn)
                work += h_new.shape[0]
                aux.append(self.block.ffn.last_aux_loss)
                tracked_aux += tracked
                loads.append(self.block.ffn.last_expert_load)
                stop = None if exits is None else exits.update(h_in, h_new, rows, t)
                h, now_running = self._advance(h, h_in, h_new, rows, t, n_loops, halting,
                                               running, stop)
                if now_running is not running:
                    depth = torch.where(running & ~now_running, t + 1, depth)
                    running = fresh = now_running
                carry = carry.next(fresh)
                if t + 1 in keep_states:
                    states[t + 1] = h
            if early_exit and (halting is not None or exits is not None):
                # A row stops once its real tokens have: padding never halts or exits on
                # its own terms, and its state is never read.
                real = running if ctx.token_mask is None else running & ctx.token_mask
                alive = real.any(dim=1)  # (B,)
                if not any_alive(alive):
                    break
                # Sequences that have fully halted stop computing.
                if not bool(alive.all()):
                    rows = alive.nonzero().squeeze(1)
                    sub_ctx = ctx.select_rows(rows)
        self.last_position_loops = torch.where(running, t + 1, depth)
        return self._finish(h, halting, aux, loads, loops_run=t + 1, n_loops=n_loops,
                            work=work, tracked_aux=tracked_aux)

    def _advance(self, h: torch.Tensor, h_in: torch.Tensor, h_new: torch.Tensor,
                 rows: torch.Tensor | None, t: int, n_loops: int, halting: _Halting | None,
                 running: torch.Tensor,
                 stop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full state after loop ``t`` took rows ``rows`` from ``h_in`` to ``h_new``, and
        the positions still running: halted or exited (``stop``) positions keep their state."""
        if halting is not None:
            h = halting.update(h, h_in, h_new, self.act(h_new), rows, t, t == n_loops - 1,
                               float(self.cfg.act_threshold), stop)
            return h, halting.running
        if stop is None:
            return h_new, running
        run_in = _take(running, rows)
        h = _put(h, rows, torch.where(run_in.unsqueeze(-1), h_new, h_in))
        return h, _put(running, rows, run_in & ~stop)

    def _finish(self, h: torch.Tensor, halting: _Halting | None, aux: list[torch.Tensor],
                loads: list[torch.Tensor], loops_run: int, n_loops: int,
                work: int, tracked_aux: int | None = None) -> torch.Tensor:
        """Record the forward's ``last_*`` attributes and return its output.

        ``tracked_aux``: how many of the last losses in ``aux`` autograd records (all when
        None). With fewer (``backprop_loops``), :attr:`last_aux_loss` keeps the mean over
        every loop as its value and takes the gradient of the mean over the recorded loops:
        the mean over all would scale the balance gradient by ``backprop_loops / n_loops``,
        weakening a configured ``aux_weight`` as loops are added."""
        B, T, _ = h.shape
        self.last_work_fraction = work / (B * n_loops)
        self.last_loops_run = loops_run
        self.last_aux_loss = torch.stack(aux).mean()
        if tracked_aux is not None and 0 < tracked_aux < len(aux):
            recorded = torch.stack(aux[-tracked_aux:]).mean()
            self.last_aux_loss = self.last_aux_loss.detach() + (recorded - recorded.detach())
        self.last_expert_load = torch.stack(loads)
        if halting is not None:
            self.last_ponder_cost = halting.ponder
            self.last_act_weights = torch.stack(halting.weights)
            return halting.h_out.to(h.dtype)
        self.last_ponder_cost = torch.full((B, T), float(n_loops), device=h.device)
        self.last_act_weights = None
        return h
