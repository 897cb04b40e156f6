"""A reference-style looped model: the baseline that ``benchmarks/train.py`` times us against.

It computes what the reference implementation computes (``../shared/reference``, SPEC
section 1), the way the reference computes it, so that a ratio measured in one run on one
machine says how much faster our code is than the reference's approach:

- RoPE through complex multiplication of a precomputed ``torch.polar`` table;
- GQA attention expanding K/V with ``repeat_interleave`` and an explicit
  ``softmax(QK^T * scale + mask) V`` with a fresh additive ``(1, 1, T, T)`` causal mask;
- MLA rebuilding K_nope and V from the latent every call, RoPE keys expanded per head;
- the MoE dispatch as a Python loop over top-k slots x experts with a boolean mask each,
  plus shared experts of width ``expert_dim * n_experts_per_tok``;
- the loop-index sinusoid rebuilt every loop, depth-wise LoRA with an embedding lookup of
  the loop index, LTI injection and ACT's running sums, one module call each.

``forward`` also takes the reference's cache (a dict grown by ``torch.cat``, one entry per
layer and loop) and :func:`greedy_stream` decodes with it, for ``benchmarks/inference.py``.

One deliberate difference: the loop always runs ``n_loops`` loops. The reference stops once
every position has halted, which with its ACT initialisation happens after two loops of
four (SPEC section 3.1); timing that would compare a different amount of work.

Written for this benchmark from the specification; not the reference's code. Only its
speed matters here; ``tests/test_train_benchmark.py`` checks that it runs and learns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from open_mythos import MythosConfig


class Norm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt() * self.weight


def rope_table(dim: int, length: int, theta: float) -> torch.Tensor:
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, H, d) rotated by ``table`` (T, d/2) complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table[None, :, None]).flatten(-2).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float):
    """(B, T, H, d) inputs -> (B, T, H * d_v) through an explicit softmax."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores + mask
    out = F.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).contiguous().flatten(2)


class GQA(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.h, self.kv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.h * self.d, bias=False)
        self.wk = nn.Linear(cfg.dim, self.kv * self.d, bias=False)
        self.wv = nn.Linear(cfg.dim, self.kv * self.d, bias=False)
        self.wo = nn.Linear(self.h * self.d, cfg.dim, bias=False)

    def forward(self, x, table, mask, cache=None, key=""):
        B, T, _ = x.shape
        q = rotate(self.wq(x).view(B, T, self.h, self.d), table)
        k = rotate(self.wk(x).view(B, T, self.kv, self.d), table)
        v = self.wv(x).view(B, T, self.kv, self.d)
        if cache is not None:  # a dict grown by concatenation, one entry per layer and loop
            if key in cache:
                k, v = torch.cat([cache[key][0], k], 1), torch.cat([cache[key][1], v], 1)
            cache[key] = (k, v)
        groups = self.h // self.kv
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        return self.wo(attend(q, k, v, mask, self.d ** -0.5))


class MLA(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.h, self.rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = Norm(cfg.q_lora_rank)
        self.q_up_nope = nn.Linear(cfg.q_lora_rank, self.h * self.nope, bias=False)
        self.q_up_rope = nn.Linear(cfg.q_lora_rank, self.h * self.rope, bias=False)
        self.kv_down = nn.Linear(cfg.dim, self.rank + self.rope, bias=False)
        self.kv_norm = Norm(self.rank)
        self.kv_up = nn.Linear(self.rank, self.h * (self.nope + self.v), bias=False)
        self.wo = nn.Linear(self.h * self.v, cfg.dim, bias=False)

    def forward(self, x, table, mask, cache=None, key=""):
        B, T, _ = x.shape
        c_q = self.q_norm(self.q_down(x))
        q_rope = rotate(self.q_up_rope(c_q).view(B, T, self.h, self.rope), table)
        q = torch.cat([self.q_up_nope(c_q).view(B, T, self.h, self.nope), q_rope], dim=-1)
        latent = self.kv_down(x)
        c_kv, k_rope = latent[..., :self.rank], latent[..., self.rank:]
        k_rope = rotate(k_rope.unsqueeze(2).expand(B, T, self.h, self.rope).contiguous(), table)
        if cache is not None:  # the latent and the per-head RoPE keys
            if key in cache:
                c_kv = torch.cat([cache[key][0], c_kv], 1)
                k_rope = torch.cat([cache[key][1], k_rope], 1)
            cache[key] = (c_kv, k_rope)
        S = c_kv.shape[1]
        kv = self.kv_up(self.kv_norm(c_kv)).view(B, S, self.h, self.nope + self.v)
        k = torch.cat([kv[..., :self.nope], k_rope], dim=-1)
        return self.wo(attend(q, k, kv[..., self.nope:], mask, (self.nope + self.rope) ** -0.5))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LoopMoE(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.k, self.n = cfg.n_experts_per_tok, cfg.n_experts
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts))
        self.experts = nn.ModuleList(FFN(cfg.dim, cfg.expert_dim) for _ in range(self.n))
        self.shared = nn.ModuleList(FFN(cfg.dim, cfg.expert_dim * self.k)
                                    for _ in range(cfg.n_shared_experts))

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = self.router(flat)
        _, idx = (logits + self.router_bias).topk(self.k, dim=-1)
        weights = F.softmax(logits, dim=-1).gather(-1, idx)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for slot in range(self.k):
            for e in range(self.n):
                mask = idx[:, slot] == e
                if mask.any():
                    out[mask] += weights[mask, slot, None] * self.experts[e](flat[mask])
        for expert in self.shared:
            out = out + expert(flat)
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: MythosConfig, moe: bool):
        super().__init__()
        self.attn_norm, self.ffn_norm = Norm(cfg.dim), Norm(cfg.dim)
        self.attn = MLA(cfg) if cfg.attn_type == "mla" else GQA(cfg)
        self.ffn = LoopMoE(cfg) if moe else FFN(cfg.dim, cfg.dim * 4 // 3)

    def forward(self, x, table, mask, cache=None, key=""):
        x = x + self.attn(self.attn_norm(x), table, mask, cache, key)
        return x + self.ffn(self.ffn_norm(x))


def loop_signal(h: torch.Tensor, t: int, loop_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv = theta ** (-torch.arange(0, loop_dim, 2, device=h.device, dtype=h.dtype) / loop_dim)
    emb = torch.cat([(t * inv).sin(), (t * inv).cos()])[:loop_dim]
    full = torch.zeros(h.shape[-1], device=h.device, dtype=h.dtype)
    full[:loop_dim] = emb
    return h + full[None, None]


class Recurrent(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.block = Block(cfg, moe=True)
        self.norm = Norm(cfg.dim)
        self.log_A, self.log_dt = nn.Parameter(torch.zeros(cfg.dim)), nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.full((cfg.dim,), 0.1))
        self.halt = nn.Linear(cfg.dim, 1)
        self.lora_down = nn.Linear(cfg.dim, cfg.lora_rank, bias=False)
        self.lora_B = nn.Parameter(torch.randn(cfg.lora_rank, cfg.dim) * 0.02)
        self.lora_scale = nn.Embedding(cfg.max_loop_iters, cfg.lora_rank)

    def forward(self, h, e, table, mask, n_loops: int, cache=None):
        B, T, _ = h.shape
        halted = torch.zeros(B, T, dtype=torch.bool, device=h.device)
        mass = torch.zeros(B, T, device=h.device)
        out = torch.zeros_like(h)
        for t in range(n_loops):
            x = self.norm(loop_signal(h, t, self.cfg.dim // 8) + e)
            y = self.block(x, table, mask, cache, f"loop_{t}")
            s = self.lora_scale(torch.tensor(min(t, self.lora_scale.num_embeddings - 1),
                                             device=h.device))
            y = y + (self.lora_down(y) * s) @ self.lora_B
            A = torch.exp(-torch.exp((self.log_dt + self.log_A).clamp(-20, 20)))
            h = A * h + self.B * e + y
            p = torch.sigmoid(self.halt(h)).squeeze(-1)
            running = (~halted).float()
            w = torch.where(mass + p >= self.cfg.act_threshold, (1.0 - mass).clamp(min=0), p)
            out = out + (w * running).unsqueeze(-1) * h
            mass = mass + p * running
            halted = halted | (mass >= self.cfg.act_threshold)
        return out


class ReferenceStyleLM(nn.Module):
    """Prelude -> looped block -> Coda with a tied head, computed the reference's way."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.dim // cfg.n_heads
        self.register_buffer("table", rope_table(rope_dim, cfg.max_seq_len, cfg.rope_theta))
        self.prelude = nn.ModuleList(Block(cfg, moe=False) for _ in range(cfg.prelude_layers))
        self.recurrent = Recurrent(cfg)
        self.coda = nn.ModuleList(Block(cfg, moe=False) for _ in range(cfg.coda_layers))
        self.norm = Norm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, n_loops: int, cache: dict | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab); with ``cache`` (a dict), the keys of ``ids`` at positions
        ``start_pos...`` are appended to it, as the reference's decoding does."""
        T = ids.shape[1]
        table = self.table[start_pos:start_pos + T]
        mask = (torch.full((1, 1, T, T), float("-inf"), device=ids.device).triu(1)
                if T > 1 else None)
        x = self.embed(ids)
        for i, block in enumerate(self.prelude):
            x = block(x, table, mask, cache, f"prelude_{i}")
        x = self.recurrent(x, x, table, mask, n_loops, cache)
        for i, block in enumerate(self.coda):
            x = block(x, table, mask, cache, f"coda_{i}")
        return self.head(self.norm(x))


@torch.no_grad()
def greedy_stream(model: ReferenceStyleLM, ids: torch.Tensor, new: int, n_loops: int):
    """The reference's cached greedy decoding, one (B, 1) token at a time."""
    cache: dict = {}
    logits = model(ids, n_loops, cache)[:, -1]
    for step in range(new):
        token = logits.argmax(-1, keepdim=True)
        yield token
        if step < new - 1:
            logits = model(token, n_loops, cache, ids.shape[1] + step)[:, -1]
