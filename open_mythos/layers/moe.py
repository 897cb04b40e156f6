"""SwiGLU experts and the fine-grained mixture-of-experts FFN of the recurrent block.

Routing (DeepSeek-V3 style): softmax router scores; the top-k experts are *selected* on
``logits + router_bias`` but *weighted* by the unbiased scores renormalised over the chosen
experts, so the balancing bias never enters the gradient. ``update_router_bias`` moves the
bias towards uniform load (aux-loss-free balancing); ``last_aux_loss`` is the optional
Switch-style balance loss.

Dispatch is sort-based: token->expert assignments are sorted by expert, the experts run on
contiguous groups with one grouped matmul per projection, and results are scattered back
weighted by the gates. No Python loop over experts or top-k slots where the grouped matmul
kernel exists for the device and dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import MythosConfig


class Expert(nn.Module):
    """Dense SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``; (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device, dtype and shape."""
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


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row groups of ``x`` times their expert's matrix.

    Args:
        x: (N, d_in) rows sorted by expert.
        w: (E, d_in, d_out) one matrix per expert.
        counts: (E,) rows per expert, summing to N.

    Returns:
        (N, d_out) where rows of group e are ``x_e @ w[e]``.
    """
    if grouped_mm_supported(x, w):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.to(x.dtype), offs=offs)
    # Segment-wise fallback (float64 references, older GPUs): one host sync for the sizes.
    parts = x.split(counts.tolist())
    return torch.cat([p @ w[e] for e, p in enumerate(parts)], dim=0)


class MoEFFN(nn.Module):
    """Routed + shared SwiGLU experts (DeepSeekMoE).

    Attributes kept for instrumentation:
        router: ``Linear(dim, n_experts)`` producing routing logits.
        router_bias: (n_experts,) buffer added to the logits for selection only.
        topk, n_experts, n_shared: routing sizes.
        last_expert_load: (n_experts,) float tensor, token-slot assignments per expert in the
            latest call.
        last_aux_loss: scalar Switch balance loss of the latest call,
            ``n_experts * sum_e f_e * P_e`` (1.0 when perfectly balanced).
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.dim, self.expert_dim = cfg.dim, cfg.expert_dim
        self.n_experts, self.topk, self.n_shared = (
            cfg.n_experts, cfg.n_experts_per_tok, cfg.n_shared_experts)
        self.bias_update_rate = cfg.router_bias_update_rate
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts))
        # Gate and up projections of every routed expert, fused: (E, dim, 2 * expert_dim).
        self.w_gate_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, 2 * cfg.expert_dim))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.expert_dim, cfg.dim))
        # n_shared experts of width expert_dim * topk are one SwiGLU of the summed width.
        shared_dim = cfg.n_shared_experts * cfg.expert_dim * cfg.n_experts_per_tok
        self.shared = Expert(cfg.dim, shared_dim) if shared_dim else None
        self.register_buffer("load_since_update", torch.zeros(cfg.n_experts), persistent=False)
        self.last_expert_load: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        # False while activation checkpointing recomputes a forward (load already counted).
        self.record_load = True
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts for each row of ``flat`` (N, dim).

        Returns:
            ``(topk_idx (N, k) long, gates (N, k) float32 summing to 1, probs (N, E) float32)``.
        """
        logits = self.router(flat)  # (N, E), at least float32 for the softmax
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.softmax(dim=-1)
        topk_idx = (logits + self.router_bias.to(logits.dtype)).topk(self.topk, dim=-1).indices
        gates = probs.gather(-1, topk_idx)
        return topk_idx, gates / gates.sum(dim=-1, keepdim=True), probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, T, dim) (or (N, dim)) -> same shape."""
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, D)
        n_tokens = flat.shape[0]
        topk_idx, gates, probs = self.route(flat)

        expert_of_slot = topk_idx.reshape(-1)  # (N*k,)
        order = expert_of_slot.argsort(stable=True)
        token_of_sorted = order // self.topk
        counts = torch.bincount(expert_of_slot, minlength=self.n_experts)  # (E,)

        xs = flat.index_select(0, token_of_sorted)  # (N*k, D) grouped by expert
        gate_up = grouped_matmul(xs, self.w_gate_up, counts)
        g, u = gate_up.chunk(2, dim=-1)
        ys = grouped_matmul(F.silu(g) * u, self.w_down, counts)  # (N*k, D)
        ys = ys * gates.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        out = torch.zeros_like(flat, dtype=ys.dtype).index_add_(0, token_of_sorted, ys)
        if self.shared is not None:
            out = out + self.shared(flat)

        load = counts.to(torch.float32)
        self.last_expert_load = load.detach()
        frac = load / max(n_tokens * self.topk, 1)
        self.last_aux_loss = self.n_experts * (frac * probs.mean(dim=0)).sum()
        if self.training and self.record_load:
            with torch.no_grad():
                self.load_since_update.add_(load)
        return out.to(x.dtype).reshape(shape)

    @torch.no_grad()
    def update_router_bias(self, rate: float | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step (DeepSeek-V3): raise the bias of under-loaded experts.

        Uses the load accumulated by training-mode forwards since the previous call (summed
        over all ranks when ``torch.distributed`` is initialised, so every rank keeps the same
        bias), moves each bias by ``rate`` (default ``cfg.router_bias_update_rate``) towards
        the mean load, and resets the accumulator.

        Returns:
            The load (n_experts,) that the update used.
        """
        rate = self.bias_update_rate if rate is None else rate
        load = self.load_since_update.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() > 0:
            self.router_bias.add_(rate * torch.sign(load.mean() - load))
            self.router_bias.sub_(self.router_bias.mean())  # only differences matter
        self.load_since_update.zero_()
        return load
