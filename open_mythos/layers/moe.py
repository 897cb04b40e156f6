"""SwiGLU experts and the fine-grained mixture-of-experts FFN of the recurrent block.

Routing (DeepSeek-V3 style): softmax router scores; the top-k experts are *selected* on
``logits + router_bias`` but *weighted* by the unbiased scores renormalised over the chosen
experts, so the balancing bias never enters the gradient. ``update_router_bias`` moves the
bias towards uniform load (aux-loss-free balancing); ``last_aux_loss`` is the optional
Switch-style balance loss.

Dispatch is sort-based and has no Python loop over experts or top-k slots:

1. the ``N * k`` token->expert assignments ("slots") are sorted by expert;
2. the token rows are gathered into that order and each expert multiplies its contiguous
   group with one grouped matmul per projection (:func:`grouped_matmul`);
3. the gate weights scale the expert hidden activations (``expert_dim`` wide, cheaper than
   scaling the ``dim``-wide outputs; the down projection is linear), and each token's ``k``
   results are gathered back and summed.

Steps 2 and 3 are the same row permutation in opposite directions, so each one's backward
is the other one's forward (:class:`_PermuteRows`): gathers both ways, no scatter-add.
Nothing on this path reads a tensor on the host, so on CUDA it never synchronises, and the
whole layer traces with ``torch.compile(fullgraph=True)``.

With few slots of small experts (decoding a few sequences of a small model, a short
prefill or a speculative verification) the layer instead gathers each slot's expert
weights and batch-multiplies (:meth:`MoEFFN._dispatch_gather`): no sort and no per-group
kernels, which would dominate such a step. The copy grows with the slots and the expert
size, so it is taken only while it stays under :data:`GATHER_MAX_ELEMENTS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from ..config import MythosConfig
from .telemetry import CopiesDetached


class Expert(nn.Module):
    """Dense SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``; (..., dim) -> (..., dim).

    ``expert_dim`` is the hidden width (upstream's argument name).
    """

    def __init__(self, dim: int, expert_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, expert_dim, bias=False)
        self.up = nn.Linear(dim, expert_dim, bias=False)
        self.down = nn.Linear(expert_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


#: On the CPU, the most weight elements the gather dispatch may copy (its slots times one
#: expert's ``gate_up`` and ``down`` elements; 4 MiB in fp32); above it the layer sorts.
#: The copy is cheap for small experts and ruinous for large ones: at one decoded token
#: with top-4, dim 1024 and expert width 512 (6.3M elements) gathering took 2.6 ms against
#: 1.7 ms sorted, and at dim 2048 with 16 tokens 2.0 s against 0.19 s; for dim 64 or 256
#: it is the faster path up to about 1M elements (``benchmarks/inference.py --only moe``).
GATHER_MAX_ELEMENTS = 1 << 20

#: The MoE layer's balancing state, float32 whatever narrower dtype the weights are converted
#: to (``MoEFFN._apply``; float64 in a float64 model).
BALANCE_BUFFERS = ("router_bias", "load_since_update")


# Grouped matmul ---------------------------------------------------------------------------


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the native ``torch._grouped_mm`` kernel runs for this device, dtype and shape."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The kernel needs row strides that are multiples of 16 bytes.
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * x.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _segments(offs: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end)]`` row ranges of the groups ending at ``offs`` (reads ``offs`` on the host)."""
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def _grouped_mm_impl(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(N, d_in) rows grouped by ``offs`` (E,) int32 group ends, times w (E, d_in, d_out)."""
    if grouped_mm_supported(x, w) and x.dtype == w.dtype:
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    for e, (a, b) in enumerate(_segments(offs)):
        torch.mm(x[a:b], w[e], out=out[a:b])
    return out


def _grouped_mm_weight_grad_impl(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor
                                 ) -> torch.Tensor:
    """Per-group ``x_e^T @ grad_e``: (N, d_in), (N, d_out) -> (E, d_in, d_out)."""
    if grouped_mm_supported(x, grad) and x.dtype == grad.dtype:
        return torch._grouped_mm(x.t(), grad, offs=offs)
    out = x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])
    for e, (a, b) in enumerate(_segments(offs)):
        torch.mm(x[a:b].t(), grad[a:b], out=out[e])
    return out


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    dx = _grouped_mm(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_weight_grad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


# FLOP counting (torch.utils.flop_counter does not see inside custom ops): every row meets
# exactly one expert matrix, so a grouped matmul costs what one dense (N, d_in, d_out) does.
def _grouped_mm_flops(x_shape, w_shape, offs_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


def _grouped_mm_weight_grad_flops(x_shape, grad_shape, offs_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * grad_shape[-1]


def _define_ops() -> None:
    """Register ``open_mythos::grouped_mm`` and ``open_mythos::grouped_mm_weight_grad``
    (with their fake kernels, autograd and FLOP formulas) unless this process already has.

    A directory written by ``openmythos export --format hf`` ships a copy of this module,
    which ``trust_remote_code`` loads under another name: beside the package, or beside
    another export, the ops would be defined twice, and a second definition breaks both
    (intermittent "no schema registered" errors and crashes in training). The first copy's
    definitions serve every copy (these ops' meaning never changes; a changed op gets a new
    name)."""
    if hasattr(torch.ops.open_mythos, "grouped_mm"):
        return
    mm = torch.library.custom_op("open_mythos::grouped_mm", _grouped_mm_impl, mutates_args=())
    mm.register_fake(lambda x, w, offs: x.new_empty(x.shape[0], w.shape[-1]))
    dw = torch.library.custom_op("open_mythos::grouped_mm_weight_grad",
                                 _grouped_mm_weight_grad_impl, mutates_args=())
    dw.register_fake(lambda x, grad, offs: x.new_empty(offs.shape[0], x.shape[1], grad.shape[1]))
    mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
    register_flop_formula(torch.ops.open_mythos.grouped_mm)(_grouped_mm_flops)
    register_flop_formula(torch.ops.open_mythos.grouped_mm_weight_grad)(
        _grouped_mm_weight_grad_flops)


_define_ops()
_grouped_mm = torch.ops.open_mythos.grouped_mm.default
_grouped_mm_weight_grad = torch.ops.open_mythos.grouped_mm_weight_grad.default


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor | None = None,
    *,
    offs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row groups of ``x`` times their expert's matrix; differentiable in ``x`` and ``w``.

    Args:
        x: (N, d_in) rows sorted by expert.
        w: (E, d_in, d_out) one matrix per expert, in ``x``'s dtype.
        counts: (E,) rows per expert, summing to N; or
        offs: (E,) int32 cumulative ``counts`` (group ends), if already at hand.

    Returns:
        (N, d_out) where rows of group e are ``x_e @ w[e]``.

    On CUDA with a native grouped kernel (bf16, Hopper or newer) this is
    ``torch._grouped_mm``, so ``torch.compile`` can pick its own kernel. Elsewhere it is the
    ``open_mythos::grouped_mm`` custom op: the native CPU kernel where it applies, a loop
    over groups otherwise (float64 references, older GPUs; that loop reads the group sizes
    on the host).
    """
    if offs is None:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
    if x.device.type == "cuda" and grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    if (not _tracks_grad(x, w) and not torch.compiler.is_compiling()
            and grouped_mm_supported(x, w) and x.dtype == w.dtype):
        # NOTE: without autograd the custom op only adds its dispatch (~40 us a call on
        # CPU, which shows in a prefill or a speculative verification of a few tokens).
        return torch._grouped_mm(x, w, offs=offs)
    return _grouped_mm(x, w, offs)


def _recomputing() -> bool:
    """Whether this eager call runs inside a backward pass: an activation checkpoint
    recomputing its forward (the autograd engine runs a graph task only in backward)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# Row permutation for dispatch and combine -------------------------------------------------


class _PermuteRows(torch.autograd.Function):
    """``src.index_select(0, index)`` then sum of each run of ``group`` consecutive rows.

    Dispatch and combine are this operation with the roles of the two index tensors
    swapped, and each one's gradient is the other one, so forward and backward are both
    gathers (no scatter-add, deterministic).
    """

    @staticmethod
    def forward(ctx, src, index, group, back_index, back_group):
        ctx.save_for_backward(back_index, index)
        ctx.group, ctx.back_group = group, back_group
        return _gather_sum(src, index, group)

    @staticmethod
    def backward(ctx, grad):
        back_index, index = ctx.saved_tensors
        return (_PermuteRows.apply(grad, back_index, ctx.back_group, index, ctx.group),
                None, None, None, None)


def _permute_rows(src: torch.Tensor, index: torch.Tensor, group: int, back_index: torch.Tensor,
                  back_group: int) -> torch.Tensor:
    """:class:`_PermuteRows`, or its forward alone where autograd records nothing."""
    if _tracks_grad(src):
        return _PermuteRows.apply(src, index, group, back_index, back_group)
    return _gather_sum(src, index, group)


def _gather_sum(src: torch.Tensor, index: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return src.index_select(0, index)
    # NOTE: embedding_bag is a fused gather-and-sum, several times faster than
    # index_select + sum (one pass, no (N*k, D) temporary) on CPU and GPU.
    return F.embedding_bag(index.view(-1, group), src, mode="sum")


# The layer --------------------------------------------------------------------------------


class MoEFFN(CopiesDetached, nn.Module):
    """Routed + shared SwiGLU experts (DeepSeekMoE).

    Attributes kept for instrumentation:
        router: ``Linear(dim, n_experts)`` producing routing logits.
        router_bias: (n_experts,) buffer added to the logits for selection only.
        topk, n_experts, n_shared: routing sizes.
        last_expert_load: (n_experts,) float32 tensor, token-slot assignments per expert in
            the latest call (detached; never read on the host by the layer itself).
        last_aux_loss: scalar Switch balance loss of the latest call,
            ``n_experts * sum_e f_e * P_e`` (1.0 when perfectly balanced), differentiable
            through the router.

    Balancing without an auxiliary loss: training-mode forwards add their load to
    ``load_since_update`` (the recurrent block calls the layer once per loop, so all loop
    depths count; recomputation under activation checkpointing does not count twice);
    :meth:`update_router_bias`, once per optimiser step, turns it into a bias step.
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.dim, self.expert_dim = cfg.dim, cfg.expert_dim
        self.n_experts, self.topk, self.n_shared = (
            cfg.n_experts, cfg.n_experts_per_tok, cfg.n_shared_experts)
        self.bias_update_rate = cfg.router_bias_update_rate
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        # Gate and up projections of every routed expert, fused: (E, dim, 2 * expert_dim).
        self.w_gate_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, 2 * cfg.expert_dim))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.expert_dim, cfg.dim))
        # n_shared experts of width expert_dim * topk are one SwiGLU of the summed width.
        shared_dim = cfg.n_shared_experts * cfg.expert_dim * cfg.n_experts_per_tok
        self.shared = Expert(cfg.dim, shared_dim) if shared_dim else None
        self.register_buffer("load_since_update", torch.zeros(cfg.n_experts, dtype=torch.float32),
                             persistent=False)
        self.last_expert_load: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        # dtype -> (w_gate_up, w_down) cast once for several calls (see shared_casts).
        self._casts: dict[tuple[torch.dtype, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        """``module.to(dtype)``, ``.half()``, ``.bfloat16()``: the weights take the new
        dtype, the balancing state (:data:`BALANCE_BUFFERS`) stays at least float32. In bf16 a bias
        step of 1e-3 is lost once the bias reaches 0.5, and the load counter rounds counts
        above 256 (one expert's load of a batch), so balancing stopped without a word."""
        kept = {name: self._buffers[name] for name in BALANCE_BUFFERS}
        super()._apply(fn, recurse)
        self._keep_balance_fp32(kept)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        upstream = sorted(k for k in state_dict
                          if k.startswith((prefix + "routed_experts.", prefix + "shared_experts.")))
        if upstream:  # an error even with strict=False, which would leave random experts
            error_msgs.append(
                f"{upstream[0]}...: a state dict of upstream's layout (one Expert module per "
                "expert). This implementation stores the experts fused (w_gate_up, w_down, "
                "shared) and differs from upstream in its RoPE channel pairing and loop-signal "
                "scale, so upstream's weights do not load into it (docs/api.md, 'Drop-in for "
                "upstream code')")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._keep_balance_fp32({})
        # load_state_dict(assign=True) onto a model built on the meta device: the load
        # counter is not in a state dict, so it stayed on the meta device (and balancing
        # did nothing). It starts at zero wherever the bias landed.
        if self.load_since_update.is_meta and not self.router_bias.is_meta:
            self.load_since_update = torch.zeros_like(self.router_bias)

    def _keep_balance_fp32(self, before: dict[str, torch.Tensor]) -> None:
        """Buffers of :data:`BALANCE_BUFFERS` that a conversion made less precise than
        float32 become float32 again, from their values ``before`` it where given."""
        for name in BALANCE_BUFFERS:
            buf = self._buffers[name]
            if buf.is_floating_point() and torch.finfo(buf.dtype).bits < 32:
                source = before.get(name, buf)
                self._buffers[name] = source.to(device=buf.device, dtype=torch.float32)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """The routed experts' weights N(0, ``std``); the router bias and the load
        accumulator zero (so a model materialised from the meta device starts balanced).
        The router and the shared expert are ``nn.Linear`` submodules, initialised by
        their owner (:func:`open_mythos.layers.init.init_tree`)."""
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)
        # nn.init (not .zero_()): transformers guards nn.init calls on loaded tensors.
        nn.init.zeros_(self.router_bias)
        nn.init.zeros_(self.load_since_update)

    @property
    def routed_experts(self) -> nn.ModuleList:
        """The routed experts one by one, as upstream's ``ModuleList`` of :class:`Expert`.

        Views built on each access (not submodules: the state dict and ``parameters()`` are
        unchanged). Expert ``e``'s ``gate.weight`` and ``up.weight`` (expert_dim, dim) and
        ``down.weight`` (dim, expert_dim) share storage with ``w_gate_up[e]`` and
        ``w_down[e]``, so reading them, or editing them in place (``p.data.zero_()``,
        ``p.copy_(...)`` under ``no_grad``), reads or edits this layer. Calling a view computes
        that expert alone; gradients of such a call land on the view's tensors, not on this
        layer's parameters. ``module.to(...)`` moves the parameters to new storage: take
        fresh views after it.
        """
        H = self.expert_dim
        gate_up, down = self.w_gate_up.detach(), self.w_down.detach()
        grad = self.w_gate_up.requires_grad
        return _ExpertViews(
            _expert_view(gate_up[e, :, :H].t(), gate_up[e, :, H:].t(), down[e].t(), grad)
            for e in range(self.n_experts))

    @property
    def shared_experts(self) -> nn.ModuleList:
        """The ``n_shared`` always-on experts as upstream's ``ModuleList`` of :class:`Expert`.

        This layer keeps them as one SwiGLU (``self.shared``) whose hidden units are the
        experts' units side by side (a sum of SwiGLUs is one SwiGLU of the summed width);
        view ``i`` holds units ``[i * W, (i + 1) * W)`` with ``W = expert_dim * topk``
        (upstream's shared width), sharing storage as in :attr:`routed_experts`. The views'
        outputs sum to ``self.shared(x)``. Empty when ``n_shared == 0``.
        """
        if self.shared is None:
            return _ExpertViews()
        W = self.expert_dim * self.topk
        gate, up = self.shared.gate.weight.detach(), self.shared.up.weight.detach()
        down = self.shared.down.weight.detach()
        grad = self.shared.gate.weight.requires_grad
        return _ExpertViews(
            _expert_view(gate[i * W:(i + 1) * W], up[i * W:(i + 1) * W],
                         down[:, i * W:(i + 1) * W], grad)
            for i in range(self.n_shared))

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts for each row of ``flat`` (N, dim).

        Returns:
            ``(topk_idx (N, k) long, gates (N, k) float32 summing to 1, probs (N, E) float32)``.
        """
        logits = self.router(flat)  # (N, E), at least float32 for the softmax
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.softmax(dim=-1)
        topk_idx = (logits + self.router_bias.to(logits.dtype)).topk(self.topk, dim=-1).indices
        # Renormalised softmax over the chosen experts == softmax of their logits; its
        # gradient touches only the k chosen entries.
        gates = logits.gather(-1, topk_idx).softmax(dim=-1)
        return topk_idx, gates, probs

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B, T, dim) (or (N, dim)) -> same shape and dtype.

        ``token_mask``: (B, T) bool, False at padding. Padding is routed like any token (its
        output is ignored downstream) but left out of the expert load and the balance loss:
        every pad position has the same state, so counting them would make their experts
        look overloaded and push real tokens away from them."""
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, D)
        n_tokens, k = flat.shape[0], self.topk
        topk_idx, gates, probs = self.route(flat)

        dtype = _compute_dtype(flat)
        if self.gathers(n_tokens * k, training=_tracks_grad(flat, self.w_gate_up)):
            out, load = self._dispatch_gather(flat.to(dtype), topk_idx, gates, dtype)
        else:
            out, load = self._dispatch_sorted(flat.to(dtype), topk_idx, gates, dtype)
        if self.shared is not None:
            out = out + self.shared(flat)

        # The fractions in the probabilities' precision (float64 in a float64 layer).
        if token_mask is None:
            frac = load.to(probs.dtype) / max(n_tokens * k, 1)
            mean_probs = probs.mean(dim=0)
        else:
            real = token_mask.reshape(-1).to(torch.float32)  # (N,)
            load = torch.zeros_like(load).index_add(0, topk_idx.reshape(-1),
                                                    real.repeat_interleave(k))
            n_real = real.sum().clamp(min=1)
            frac = load.to(probs.dtype) / (n_real * k)
            mean_probs = (probs * real.unsqueeze(-1)).sum(dim=0) / n_real
        aux = self.n_experts * (frac * mean_probs).sum()
        # Recorded by every call, a checkpoint's recomputation too: the values are the
        # forward's, and a recomputed RecurrentBlock (a checkpoint around it) reads them
        # back. (The built-in checkpointing puts the forward's last loop back after it.)
        self.last_expert_load, self.last_aux_loss = load, aux
        # Counted once: not by an eager recomputation inside the backward (a user's
        # torch.utils.checkpoint around the looped block). Compiled, a flag read here would
        # give the recomputation another graph, saving other tensors: the built-in
        # checkpointing restores the count instead.
        if self.training and not _recomputing():
            self.load_since_update.add_(load)
        return out.to(x.dtype).reshape(shape)

    def _dispatch_sorted(self, flat: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort the slots by expert, one grouped matmul per projection. Returns the routed
        output (N, D) and the load (E,) float32."""
        k = self.topk
        # Slot s = n * k + j is token n's j-th choice.
        expert_of_slot = topk_idx.reshape(-1)  # (N*k,)
        sorted_experts, order = expert_of_slot.sort(stable=True)
        rank = torch.empty_like(order).scatter_(  # inverse permutation: slot -> sorted row
            0, order, torch.arange(order.shape[0], device=order.device))
        token_of_sorted = order // k
        # Group ends (E,): slots whose expert is <= e.
        ends = torch.searchsorted(
            sorted_experts, torch.arange(self.n_experts, device=flat.device), right=True)
        offs = ends.to(torch.int32)

        xs = _permute_rows(flat, token_of_sorted, 1, rank, k)  # (N*k, D)
        w_gate_up, w_down = self._expert_weights(dtype)
        gate_up = grouped_matmul(xs, w_gate_up, offs=offs)  # (N*k, 2H)
        g, u = gate_up.chunk(2, dim=-1)
        gate_sorted = gates.reshape(-1).index_select(0, order).to(dtype).unsqueeze(-1)
        h = F.silu(g) * u * gate_sorted  # (N*k, H), already weighted by the gate
        ys = grouped_matmul(h, w_down, offs=offs)  # (N*k, D)
        out = _permute_rows(ys, rank, k, token_of_sorted, 1)  # (N, D)
        load = torch.diff(ends, prepend=ends.new_zeros(1)).to(torch.float32)  # (E,)
        return out, load

    @contextlib.contextmanager
    def shared_casts(self) -> Iterator[None]:
        """Within the block, the expert weights are cast to a compute dtype (bf16 under
        autocast) once and the cast is reused by every call: the looped block calls this
        layer once per loop, and casting (n_experts, dim, 2H) weights each time cost ~28 ms
        per forward of the 63M model. Gradients flow through the one cast to the fp32
        weights. A cast made with autograd off (the loops before ``backprop_loops``) is kept
        apart from one made with it on, which the differentiated loops use: reusing the
        first would cut the experts off from the gradient. Gradient-checkpointing
        recomputation (outside the block) casts afresh."""
        self._casts = {}
        try:
            yield
        finally:
            self._casts = None

    def _expert_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype == self.w_gate_up.dtype:
            return self.w_gate_up, self.w_down
        cache = None if torch.compiler.is_compiling() else self._casts
        if cache is None:
            return self.w_gate_up.to(dtype), self.w_down.to(dtype)
        key = (dtype, torch.is_grad_enabled())
        if key not in cache:
            cache[key] = (self.w_gate_up.to(dtype), self.w_down.to(dtype))
        return cache[key]

    def gathers(self, slots: int, training: bool = False) -> bool:
        """Whether ``slots`` token-expert pairs take the gather dispatch; the sorted
        dispatch otherwise.

        On the CPU the copied weights must stay within :data:`GATHER_MAX_ELEMENTS`.
        Where autograd records (``training``), and on other devices (where the budget was
        not measured, and the sorted path may read its group sizes on the host), the
        slots are also at most ``n_experts``: the gather's backward adds one weight
        gradient per slot, and a training step keeps the sorted path's single cast of the
        expert weights per forward (:meth:`shared_casts`).
        """
        on_cpu = self.w_gate_up.device.type == "cpu"
        if slots > self.n_experts and (training or not on_cpu):
            return False
        return not on_cpu or slots * self.expert_elements <= GATHER_MAX_ELEMENTS

    @property
    def expert_elements(self) -> int:
        """Weight elements of one routed expert (``gate_up`` and ``down``): what the gather
        dispatch copies per slot."""
        return self.w_gate_up[0].numel() + self.w_down[0].numel()

    def _dispatch_gather(self, flat: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Few slots of small experts: gather each slot's expert weights and batch-multiply.

        It skips the sort, the group offsets and the per-group kernel launches, which
        dominate a decode step of a small model, at the price of copying every slot's
        expert weights (:meth:`gathers` bounds the copy); every shape is static, so it
        compiles into the decode graph. Same results as :meth:`_dispatch_sorted`.
        """
        n, k = topk_idx.shape
        idx = topk_idx.reshape(-1)  # (S,) with S = N * k
        xs = flat.unsqueeze(1).expand(n, k, self.dim).reshape(n * k, 1, self.dim)
        # Select first, then cast: only the chosen experts' weights are converted.
        gate_up = torch.bmm(xs, self.w_gate_up.index_select(0, idx).to(dtype))  # (S, 1, 2H)
        g, u = gate_up.chunk(2, dim=-1)
        h = F.silu(g) * u * gates.reshape(-1, 1, 1).to(dtype)
        ys = torch.bmm(h, self.w_down.index_select(0, idx).to(dtype))  # (S, 1, D)
        out = ys.view(n, k, self.dim).sum(dim=1)
        load = torch.zeros(self.n_experts, dtype=torch.float32, device=flat.device)
        load = load.index_add(0, idx, torch.ones(idx.shape[0], dtype=torch.float32, device=flat.device))
        return out, load

    @torch.no_grad()
    def update_router_bias(self, rate: float | None = None, load: torch.Tensor | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step (DeepSeek-V3): raise the bias of under-loaded experts.

        Moves each bias by ``rate`` (default ``cfg.router_bias_update_rate``) towards the
        mean load, ``b_e += rate * sign(mean_load - load_e)``, and resets the accumulator.
        ``load`` (n_experts,) defaults to the load accumulated by training-mode forwards
        since the previous call (``load_since_update``). This layer runs no collective: in a
        data-parallel run the caller passes the load summed over ranks, so that every rank
        keeps the same bias (the trainer does, with one all-reduce for every MoE layer; see
        :func:`open_mythos.training.distributed.reduced_expert_loads`). No host
        synchronisation: an all-zero load leaves the bias unchanged.

        ``rate`` is in logit units per step. The bias only changes which experts are
        selected, so an expert preferred by a margin of ``d`` logits is rebalanced after about
        ``d / rate`` steps, after which the biases jitter by about ``rate`` around balance.
        1e-2 undoes a one-logit preference in ~100 steps, the right scale for runs of
        hundreds to tens of thousands of steps (``tests/layers/test_moe_balance.py``: a
        collapsed router balanced within 300 steps); DeepSeek-V3's 1e-3 (on sigmoid scores,
        ~4e-3 in logits) suits pre-training runs of 100k+ steps.

        Returns:
            The load (n_experts,) that the update used.
        """
        rate = self.bias_update_rate if rate is None else rate
        load = (self.load_since_update.clone() if load is None  # counts: bincount gives int64
                else load.to(self.router_bias.device, torch.float32))
        if load.shape != self.router_bias.shape:
            raise ValueError(f"load must have shape {tuple(self.router_bias.shape)}, got {tuple(load.shape)}")
        # sign(0) = 0: an empty accumulator (mean 0, all loads 0) moves nothing.
        self.router_bias.add_(rate * torch.sign(load.mean() - load))
        self.router_bias.sub_(self.router_bias.mean())  # only differences matter
        self.load_since_update.zero_()
        return load


_FREEZE_VIEW = (
    "an expert view (routed_experts[e], shared_experts[i], or their layers) cannot freeze its "
    "expert: its weights alias part of the MoE layer's fused tensors (w_gate_up / w_down, "
    "shared), whose requires_grad is the layer's. To freeze routed expert e, zero its "
    "gradient rows, e.g. moe.w_gate_up.register_hook(lambda g: g.index_fill(0, "
    "torch.tensor([e]), 0)) (and the same for w_down)")


class _RefusesFreezing:
    """``requires_grad_`` of an expert view, of its layers and of the list of views: what
    upstream code calls to freeze an expert, which would silently leave the fused layer
    trainable here."""

    def requires_grad_(self, requires_grad: bool = True) -> Any:
        raise RuntimeError(_FREEZE_VIEW)


class _ViewWeight(nn.Parameter):
    """A weight of an expert view: setting its ``requires_grad`` to another value raises
    (``for p in moe.routed_experts[e].parameters(): p.requires_grad = False``, upstream's
    way to freeze an expert, changed only the view, built afresh on the next access)."""

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return torch._C.TensorBase.requires_grad.__get__(self)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if bool(value) != self.requires_grad:
            raise RuntimeError(_FREEZE_VIEW)

    def requires_grad_(self, requires_grad: bool = True) -> _ViewWeight:
        self.requires_grad = requires_grad
        return self


class _ViewLinear(_RefusesFreezing, nn.Linear):
    """One projection of an expert view."""


class _ExpertViews(_RefusesFreezing, nn.ModuleList):
    """:attr:`MoEFFN.routed_experts` / :attr:`MoEFFN.shared_experts`."""


class _ExpertView(_RefusesFreezing, Expert):
    """An :class:`Expert` whose weights alias a fused MoE layer's (:func:`_expert_view`).

    The layer's forward never calls it, and its parameters are not the layer's: freezing
    it is refused, and a hook on it is warned about (it fires only when the view itself is
    called)."""

    def _warn_hook(self) -> None:
        import warnings

        warnings.warn("the MoE layer computes its experts fused, without calling these "
                      "views: a hook on a view fires only when you call the view itself "
                      "(the layer's last_expert_load counts what each routed expert got)",
                      RuntimeWarning, stacklevel=3)

    def register_forward_hook(self, *args: Any, **kwargs: Any) -> Any:
        self._warn_hook()
        return super().register_forward_hook(*args, **kwargs)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        self._warn_hook()
        return super().register_forward_pre_hook(*args, **kwargs)


def _expert_view(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 requires_grad: bool) -> Expert:
    """An :class:`Expert` whose weights are the given tensors (aliases, not copies).

    ``gate``, ``up``: (hidden, dim); ``down``: (dim, hidden), as ``nn.Linear`` stores them.
    """
    with torch.device("meta"):  # the layers' own weights are replaced below
        expert = _ExpertView(gate.shape[1], gate.shape[0])
        for name, weight in (("gate", gate), ("up", up), ("down", down)):
            linear = _ViewLinear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight = _ViewWeight(weight, requires_grad=requires_grad)
            setattr(expert, name, linear)
    return expert


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: the autocast dtype inside an autocast region
    (as ``nn.Linear`` would), else ``x``'s own."""
    device = x.device.type
    if device == "meta":  # (autocast has no meta device: shapes only)
        return x.dtype
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
