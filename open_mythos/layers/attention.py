"""Causal self-attention: grouped-query (GQA) and multi-latent (MLA), both on :func:`attend`
(SDPA, or explicit matmuls for short sequences on the CPU).

Both modules take an :class:`AttnContext` built once per model forward (RoPE tables, mask,
cache) and an optional :class:`DepthCarry` used by the recurrent block: a position that has
halted keeps, at deeper loop depths, the keys and values of the last depth it computed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttnType, MythosConfig
from .kv import CacheStore, Entries
from .norm import RMSNorm
from .rope import apply_rope


@dataclass
class AttnContext:
    """Per-forward attention inputs shared by every layer.

    Attributes:
        cos, sin: RoPE tables for the chunk's positions, (T, r/2) or (B, T, r/2), float32
            (float64 in a float64 model).
        start_pos: position of the chunk's first token in the sequence.
        mask: boolean (B or 1, 1, T, S) mask, True where a query may attend, or None.
        is_causal: with ``mask`` None, whether to apply SDPA's causal mask (T == S).
        cache: cache store, or None.
        rows: when set, the layer input holds only these batch rows (sequences still
            looping after ACT early exit); caches and carries keep the whole batch.
        token_mask: (B, T) bool, False at the chunk's (left) padding tokens, or None when
            every token is real. Only token-mixing layers outside attention need it
            (:class:`~open_mythos.layers.conv.TokenConv`); attention reads ``mask``.
        replay: a gradient-checkpointing recomputation: attention reads the cache as the
            forward did and writes nothing (the forward wrote it, and a later chunk may
            have written after it since).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    start_pos: int = 0
    mask: torch.Tensor | None = None
    is_causal: bool = True
    cache: CacheStore | None = None
    rows: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    replay: bool = False

    def select_rows(self, rows: torch.Tensor | None) -> AttnContext:
        """The context for a sub-batch ``rows`` (a 1-D index into the full batch)."""
        if rows is None:
            return dataclasses.replace(self, rows=None)
        per_row = self.cos.dim() == 3
        mask = self.mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask.index_select(0, rows)
        return dataclasses.replace(
            self,
            cos=self.cos.index_select(0, rows) if per_row else self.cos,
            sin=self.sin.index_select(0, rows) if per_row else self.sin,
            mask=mask,
            rows=rows,
            token_mask=None if self.token_mask is None else self.token_mask.index_select(0, rows),
        )


class DepthCarry:
    """Keys/values of the current chunk at the previous loop depth, for one loop.

    ``prev`` holds the previous depth's entries (None at the first loop) and ``fresh`` a
    (B, T) bool tensor of positions recomputed at this depth (None: all of them); the others
    reuse the previous depth's entries (depth-wise KV sharing for halted positions).
    :meth:`merge` leaves both as they are and keeps its result in ``merged``, from which
    :meth:`next` makes the following loop's carry: what a loop reads never changes after
    it ran, so recomputing it (activation checkpointing, the built-in flag or a user's
    ``torch.utils.checkpoint`` around the looped block) attends over what its forward did.
    """

    def __init__(self, prev: Entries | None = None, fresh: torch.Tensor | None = None) -> None:
        self.prev = prev
        self.fresh = fresh
        self.merged: Entries | None = None

    def merge(self, new: Entries, rows: torch.Tensor | None = None) -> Entries:
        """Combine this depth's ``new`` entries with the previous depth's; full batch out.

        ``new`` covers the batch rows ``rows`` only (all rows when None).
        """
        if self.prev is None or self.fresh is None:
            if rows is not None:
                raise ValueError("a row subset needs the previous depth's entries")
            self.merged = new
            return new
        fresh = self.fresh if rows is None else self.fresh.index_select(0, rows)
        prev = self.prev if rows is None else {n: t.index_select(0, rows) for n, t in self.prev.items()}
        new = {n: torch.where(_seq_mask(fresh, t), t, prev[n]) for n, t in new.items()}
        if rows is not None:
            new = {n: self.prev[n].index_copy(0, rows, t) for n, t in new.items()}
        self.merged = new
        return new

    def next(self, fresh: torch.Tensor | None) -> DepthCarry:
        """The following loop's carry: this loop's merged entries (its own ``prev`` when
        no attention merged), ``fresh`` the positions that loop recomputes."""
        return DepthCarry(self.prev if self.merged is None else self.merged, fresh)


def _seq_mask(fresh: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, T) mask broadcast to a (B, ..., T, d) tensor with the sequence on dim -2."""
    b, t = fresh.shape
    return fresh.view(b, *([1] * (like.dim() - 3)), t, 1)


def _remember(
    new: Entries, ctx: AttnContext, cache_key: str, carry: DepthCarry | None
) -> Entries:
    """Merge with the depth carry, write the cache; return the entries to attend over."""
    if carry is not None:
        new = carry.merge(new, ctx.rows)
    elif ctx.rows is not None:
        raise ValueError("a row subset is only supported inside the recurrent block")
    if ctx.cache is not None:
        stopped = getattr(ctx.cache, "stopped_entries", None)  # a shared-depth KVCache's
        if stopped is not None and carry is not None and carry.fresh is not None:
            new = stopped(cache_key, ctx.start_pos, new, carry.fresh)
        store = ctx.cache.replay if ctx.replay else ctx.cache.write
        new = store(cache_key, ctx.start_pos, new)
    if ctx.rows is not None:
        new = {n: t.index_select(0, ctx.rows) for n, t in new.items()}
    return new


#: On the CPU, attention that autograd records over at most this many keys per query runs
#: as explicit matmuls and a softmax (:func:`attend`) instead of SDPA's fused flash kernel,
#: whose blocking is made for long sequences and whose bfloat16/float16 backward is slow
#: (those dtypes: up to :data:`SMALL_ATTENTION_KEYS_LOW_PRECISION` keys). Without autograd
#: (prefill, decode: MLA's absorbed decode folds heads into several queries) SDPA's one call
#: costs less than the explicit route's several. Measured with
#: ``python benchmarks/attention.py``: docs/benchmarks.md.
SMALL_ATTENTION_KEYS = 64
SMALL_ATTENTION_KEYS_LOW_PRECISION = 128
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` by the cheaper route for the shape.

    ``q`` (B, H, T, d), ``k`` (B, Hkv, S, d), ``v`` (B, Hkv, S, dv); ``mask`` broadcastable
    to (B, H, T, S), bool (True where a query may attend) or float (added to the scores); a
    query that may attend nowhere gets zeros, as from SDPA; ``is_causal`` (without
    ``mask``) is SDPA's causal mask (query ``i`` sees keys ``0..i``). On the CPU, where
    autograd records ``q``, with more than one query, few keys (see
    :data:`SMALL_ATTENTION_KEYS`) and no dropout, the attention is computed explicitly in
    float32 (``baddbmm`` for the scores, softmax, ``bmm``) and returned in ``q``'s dtype;
    everything else goes to SDPA.
    """
    T, S = q.shape[-2], k.shape[-2]
    limit = SMALL_ATTENTION_KEYS_LOW_PRECISION if q.dtype in _LOW_PRECISION \
        else SMALL_ATTENTION_KEYS
    recorded = q.requires_grad and torch.is_grad_enabled()
    if q.device.type != "cpu" or not recorded or dropout_p > 0 or T == 1 or S > limit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout_p, scale=scale,
                                              enable_gqa=enable_gqa)
    with torch.autocast("cpu", enabled=False):
        return _explicit_attention(q, k, v, mask, is_causal, scale)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, is_causal: bool, scale: float | None
                        ) -> torch.Tensor:
    """:func:`attend`'s explicit route: ``baddbmm`` for the scores (scale and mask folded
    in), softmax, ``bmm`` for the output, all in float32 at least (bfloat16 inputs are
    upcast: more accurate than SDPA's fused kernel in bfloat16, and as fast at these
    sizes); grouped key heads repeated."""
    B, H, T, d = q.shape
    S = k.shape[-2]
    dtype = q.dtype
    if dtype in _LOW_PRECISION:
        q, k, v = q.float(), k.float(), v.float()
    if k.shape[1] != H:  # grouped-query: every query head of a group reads its key head
        group = H // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = d ** -0.5 if scale is None else scale
    keep = None  # the queries that may attend somewhere, when a given mask may leave none
    if mask is None and is_causal:  # SDPA's causal mask: top-left aligned
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    elif mask is not None:
        keep = (mask if mask.dtype == torch.bool else mask != float("-inf")).any(-1, keepdim=True)
    if mask is None:
        bias = q.new_zeros(1, 1)
    else:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask, float("-inf"))
        else:  # an additive float mask, as SDPA takes one
            bias = mask.to(q.dtype)
        if keep is not None:  # finite scores on rows with no key: no NaN, in or out of autograd
            bias = bias.masked_fill(~keep, 0.0)
        # One (T, S) bias for every row and head where the mask allows, else (B * H, T, S).
        if math.prod(mask.shape[:-2]) == 1:
            bias = bias.reshape(bias.shape[-2:]).broadcast_to(T, S)
        else:
            bias = bias.broadcast_to(B, H, T, S).reshape(B * H, T, S)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, d), k.reshape(B * H, S, d).transpose(1, 2),
                           alpha=scale)
    out = torch.bmm(scores.softmax(-1), v.reshape(B * H, S, v.shape[-1]))
    out = out.view(B, H, T, v.shape[-1])
    out = out if keep is None else out.masked_fill(~keep, 0.0)
    return out.to(dtype)


@dataclass(frozen=True)
class QueryRows:
    """Queries at a few positions only (the last layer of a model whose logits are needed
    there): every selected position becomes a one-token query sequence of its own, attending
    over the whole keys of its batch row.

    Built by :func:`query_rows` from flat indices into the ``B * T`` positions of a chunk.

    Attributes:
        batch: (N,) long, each query's batch row (for gathering keys and values).
        cos, sin: (N, 1, r/2) RoPE tables at the queries' positions (per-sequence form).
        mask: (N, 1, 1, S) bool, the keys each query may attend to.
    """

    batch: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor


def query_rows(ctx: AttnContext, index: torch.Tensor, T: int, S: int) -> QueryRows:
    """The :class:`QueryRows` of flat positions ``index`` (N,) of a (B, T) chunk attending
    over ``S`` keys per row (the chunk's and the cache's), causal as ``ctx`` says."""
    if ctx.rows is not None:
        raise ValueError("queries at selected positions do not combine with a row subset")
    batch, pos = index.div(T, rounding_mode="floor"), index.remainder(T)
    if ctx.cos.dim() == 3:  # per-sequence positions
        cos, sin = ctx.cos[batch, pos], ctx.sin[batch, pos]
    else:
        cos, sin = ctx.cos.index_select(0, pos), ctx.sin.index_select(0, pos)
    if ctx.mask is not None:
        mask = ctx.mask.expand(-1, -1, T, -1)
        mask = mask[batch if mask.shape[0] > 1 else torch.zeros_like(batch), 0, pos]
    elif ctx.is_causal and T > 1:
        # The chunk's last position sees every key: position t sees S - T + t of them.
        mask = torch.arange(S, device=index.device).view(1, S) <= (pos + (S - T)).view(-1, 1)
    else:
        mask = torch.ones(index.numel(), S, dtype=torch.bool, device=index.device)
    return QueryRows(batch, cos.unsqueeze(1), sin.unsqueeze(1), mask.view(-1, 1, 1, S))


def at_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, ...) at the flat positions ``index`` (N,) of its ``B * T``, as a batch of
    one-position sequences (N, 1, ...)."""
    return x.flatten(0, 1).index_select(0, index).unsqueeze(1)


class GQAttention(nn.Module):
    """Grouped-query attention (Ainslie et al., 2023) with RoPE on the full head dim.

    ``n_kv_heads`` key/value heads are shared by groups of ``n_heads // n_kv_heads`` query
    heads. The cache stores rotated keys and values: 2 * n_kv_heads * head_dim per token.
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    @staticmethod
    def rope_dim(cfg: MythosConfig) -> int:
        return cfg.head_dim

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        cache_key: str = "default",
        carry: DepthCarry | None = None,
        query_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: (B, T, dim) -> (B, T, dim); with ``query_at`` (N,) flat positions, the
        output at those positions only, (N, 1, dim) (keys and values, and the cache, still
        cover every position)."""
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, ctx.cos, ctx.sin)
        kv = _remember({"k": k, "v": v}, ctx, cache_key, carry)
        keys, values = kv["k"], kv["v"]
        mask, is_causal = ctx.mask, ctx.is_causal and ctx.mask is None and T > 1
        cos, sin = ctx.cos, ctx.sin
        if query_at is not None:
            queries = query_rows(ctx, query_at, T, keys.shape[2])
            x, cos, sin, mask, is_causal = at_positions(x, query_at), queries.cos, queries.sin, \
                queries.mask, False
            keys, values = keys.index_select(0, queries.batch), values.index_select(0, queries.batch)
            B, T = x.shape[:2]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        q = apply_rope(q, cos, sin)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if T == 1 and self.n_kv_heads != self.n_heads:
            # Decode: the query heads of a group share one key head, so attend with the
            # group as the query axis ((B, Hkv, G, hd) against (B, Hkv, S, hd)) instead of
            # letting SDPA repeat the cached keys G times. NOTE: reshape, not view: CUDA's
            # kernels return the output in (B, G, Hkv, hd) memory order.
            group = self.n_heads // self.n_kv_heads  # not -1: B may be 0 (no query selected)
            out = attend(
                q.reshape(B, self.n_kv_heads, group, self.head_dim), keys, values,
                mask=mask, dropout_p=dropout_p).reshape(B, self.n_heads, 1, self.head_dim)
        else:
            out = attend(q, keys, values, mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                         enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLAttention(nn.Module):
    """Multi-latent attention (DeepSeek-V2) with decoupled RoPE.

    Queries go through a rank-``q_lora_rank`` bottleneck. Keys and values are rebuilt from a
    normalised latent ``c_kv`` of width ``kv_lora_rank``; position enters through one rotated
    key of width ``qk_rope_head_dim`` shared by all heads. The cache holds only
    ``[c_kv | k_rope]`` per token.

    Two equivalent evaluation orders:
      * plain: expand the latent through ``kv_up`` into per-head keys and values;
      * absorbed: fold ``kv_up`` into the query and the output, attending over the latent
        directly, so a decode step costs O(S * kv_lora_rank) per head instead of re-expanding
        the cache. :meth:`use_absorbed` picks the cheaper one from the shapes.
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim_, self.v_dim = (
            cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim_)
        self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.q_up_nope = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.nope_dim, bias=False)
        self.q_up_rope = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.rope_dim_, bias=False)
        self.kv_down = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope_dim_, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim),
                               bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        # None: choose by cost; True/False: force the absorbed/plain order (tests, benchmarks).
        self.absorb: bool | None = None

    @staticmethod
    def rope_dim(cfg: MythosConfig) -> int:
        return cfg.qk_rope_head_dim

    def kv_up_is_plain(self) -> bool:
        """Whether ``kv_up`` is the plain linear map the absorbed order folds in by reading
        its ``weight``. A quantized or adapter-wrapped layer (``quantize_dynamic``, a LoRA
        wrapper), a replaced ``forward`` or a forward hook has a computation of its own that
        only calling the module honours, so such a layer keeps the plain order."""
        kv_up = self.kv_up
        return (type(kv_up) is nn.Linear and "forward" not in vars(kv_up)
                and not kv_up._forward_hooks and not kv_up._forward_pre_hooks)

    def use_absorbed(self, n_queries: int, n_keys: int) -> bool:
        """True when attending over the latent costs fewer multiply-adds than expanding it.

        Per head, with latent rank r: the absorbed order maps each query into the latent
        (``T r n``), attends over the whole cached row of width ``r + rope`` for scores and
        values (``2 T S (r + rope)``) and maps the output back (``T r v``); the plain order
        expands every key (``S r (n + v)``) and attends at the head widths
        (``T S (n + rope + v)``). Decoding (few queries, many keys) takes the absorbed order;
        a training step or a prefill (``T == S``) the plain one.
        """
        if not self.kv_up_is_plain():
            if self.absorb:
                raise ValueError(
                    f"absorb=True needs kv_up to be a plain nn.Linear without hooks; it is "
                    f"{type(self.kv_up).__name__}")
            return False
        if self.absorb is not None:
            return self.absorb
        r, n, v, rope = self.kv_lora_rank, self.nope_dim, self.v_dim, self.rope_dim_
        T, S = n_queries, n_keys
        absorbed = T * r * (n + v) + 2 * T * S * (r + rope)
        plain = S * r * (n + v) + T * S * (n + rope + v)
        return absorbed < plain

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        cache_key: str = "default",
        carry: DepthCarry | None = None,
        query_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: (B, T, dim) -> (B, T, dim); with ``query_at`` (N,) flat positions, the
        output at those positions only, (N, 1, dim) (the latent, and the cache, still cover
        every position)."""
        B, T, _ = x.shape
        H, r = self.n_heads, self.kv_lora_rank
        c_kv, k_rope = self.kv_down(x).split([r, self.rope_dim_], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), ctx.cos, ctx.sin).squeeze(1)  # (B, T, rope)
        if getattr(ctx.cache, "upstream_entries", False):  # a user's dict: upstream's names
            kept = _remember({"c_kv": c_kv, "k_rope": k_rope}, ctx, cache_key, carry)
            latent = torch.cat((self.kv_norm(kept["c_kv"]), kept["k_rope"]), dim=-1)
        else:
            new = {"kv_latent": torch.cat((self.kv_norm(c_kv), k_rope), dim=-1)}  # (B, T, r+rope)
            latent = _remember(new, ctx, cache_key, carry)["kv_latent"]  # (B, S, r+rope)
        latent = latent.to(x.dtype)
        S = latent.shape[1]
        mask, is_causal = ctx.mask, ctx.is_causal and ctx.mask is None and T > 1
        cos, sin = ctx.cos, ctx.sin
        if query_at is not None:
            queries = query_rows(ctx, query_at, T, S)
            x, cos, sin, mask, is_causal = at_positions(x, query_at), queries.cos, queries.sin, \
                queries.mask, False
            latent = latent.index_select(0, queries.batch)
            B, T = x.shape[:2]
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, H, self.nope_dim).transpose(1, 2)  # (B, H, T, n)
        q_rope = self.q_up_rope(c_q).view(B, T, H, self.rope_dim_).transpose(1, 2)
        q_rope = apply_rope(q_rope, cos, sin)  # (B, H, T, rope)
        dropout_p = self.dropout if self.training else 0.0

        if self.use_absorbed(T, S):
            w_kv = self.kv_up.weight.view(H, self.nope_dim + self.v_dim, r)
            w_uk, w_uv = w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]  # (H, n, r), (H, v, r)
            q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
            q_cat = torch.cat((q_lat, q_rope), dim=-1)  # (B, H, T, r+rope)
            # Every head attends over the same latent keys, so fold the heads into the query
            # axis: one (H*T) x S attention, no per-head copy of the cache. The values are the
            # whole cached row (latent and RoPE key) and the RoPE part of the output is
            # dropped: equal key and value widths keep SDPA on its fused CPU kernel, which
            # is faster than the generic path for the narrower latent alone.
            latent = latent.unsqueeze(1)  # (B, 1, S, r+rope)
            o_lat = attend(
                q_cat.reshape(B, 1, H * T, r + self.rope_dim_), latent, latent,
                mask=_fold_heads_mask(mask, is_causal, H, T, S, cos.device),
                dropout_p=dropout_p, scale=self.scale)[..., :r].reshape(B, H, T, r)
            out = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
        else:
            # Widths spelt out: a batch of 0 rows (a rank whose sequences all halted, still
            # stepping with its peers) cannot infer a -1.
            kv = self.kv_up(latent[..., :r]).view(B, S, H, self.nope_dim + self.v_dim)
            kv = kv.transpose(1, 2)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, H, S, n), (B, H, S, v)
            k_pos = latent[..., r:].unsqueeze(1).expand(B, H, S, self.rope_dim_)
            q = torch.cat((q_nope, q_rope), dim=-1)
            k = torch.cat((k_nope, k_pos), dim=-1)
            out = attend(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                         scale=self.scale)  # (B, H, T, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.v_dim))


def _fold_heads_mask(
    mask: torch.Tensor | None, is_causal: bool, n_heads: int, T: int, S: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The (B or 1, 1, H*T, S) mask for queries folded as (head, position), or None;
    ``mask`` (B or 1, 1, T, S) or None (then causal or no mask, as ``is_causal`` says)."""
    if mask is None:
        if not is_causal:
            return None
        q_idx = torch.arange(S - T, S, device=device).view(T, 1)
        mask = (torch.arange(S, device=device).view(1, S) <= q_idx).view(1, 1, T, S)
    if T == 1:
        return mask  # broadcasts over the folded heads
    b = mask.shape[0]
    return mask.unsqueeze(2).expand(b, 1, n_heads, T, S).reshape(b, 1, n_heads * T, S)


ATTENTION: dict[AttnType, type[nn.Module]] = {AttnType.GQA: GQAttention, AttnType.MLA: MLAttention}


def build_attention(
    cfg: MythosConfig, classes: Mapping[AttnType, type[nn.Module]] = ATTENTION
) -> nn.Module:
    """The attention module selected by ``cfg.attn_type``, from ``classes`` (default
    :data:`ATTENTION`; the upstream-signature adapters pass their own subclasses)."""
    return classes[AttnType(cfg.attn_type)](cfg)
