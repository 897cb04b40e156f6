"""Upstream's building-block interface over our layers.

Code written against the reference implementation composes its modules directly: it
builds a complex RoPE table with :func:`precompute_rope_freqs` and calls attention and
blocks as ``forward(x, freqs_cis, mask, kv_cache, cache_key)`` and the recurrent block as
``forward(h, e, freqs_cis, mask, n_loops, kv_cache)``. The classes here are our layers
(same parameters, same state dict, same computation) whose ``forward`` also accepts those
arguments: it turns them into the :class:`~open_mythos.layers.AttnContext` our layers take
and runs the layer's own code. Called with an ``AttnContext`` (as our blocks call their
attention), ``forward`` is the layer's own. :mod:`open_mythos.main` re-exports these names;
``docs/api.md`` ("Drop-in for upstream code") lists where behaviour differs on purpose.
"""

from __future__ import annotations

import torch

from .config import AttnType
from .inference.cache import as_cache_store
from .layers.attention import AttnContext
from .layers.attention import GQAttention as _GQAttention
from .layers.attention import MLAttention as _MLAttention
from .layers.block import TransformerBlock as _TransformerBlock
from .layers.recurrence import RecurrentBlock as _RecurrentBlock
from .layers.rope import apply_rope as _apply_rope
from .layers.rope import rope_cos_sin as _rope_cos_sin

__all__ = [
    "GQAttention", "MLAttention", "RecurrentBlock", "TransformerBlock", "apply_rope",
    "precompute_rope_freqs",
]


def precompute_rope_freqs(dim: int, max_len: int, theta: float = 500000.0) -> torch.Tensor:
    """Upstream's RoPE table: ``e^{i * t * theta^(-2k / dim)}`` for positions ``t < max_len``.

    Args:
        dim: rotated channels per head (even).
        max_len: number of positions.
        theta: RoPE base frequency.

    Returns:
        complex64 (max_len, dim // 2) on the CPU, unit magnitude; row ``t`` is position
        ``t``. The angles are computed in float64 (as :func:`~open_mythos.layers.rope_cos_sin`
        does), so the table equals the cos/sin tables our layers use.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"precompute_rope_freqs: dim must be a positive even number, got {dim}")
    cos, sin = _rope_cos_sin(torch.arange(max_len), dim, theta)
    return torch.complex(cos, sin)


def apply_rope(
    x: torch.Tensor, freqs_cis: torch.Tensor, sin: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate ``x`` by upstream's complex table (adjacent channel pairs, (B, T, H, d) layout).

    Args:
        x: (..., T, H, d) queries or keys, any float dtype; channels ``2k`` and ``2k + 1``
            form pair ``k``.
        freqs_cis: complex (T, d // 2) table holding exactly the positions of ``x``
            (``precompute_rope_freqs(...)[start:start + T]``).
        sin: only for the other calling form, ``apply_rope(x, cos, sin)`` with real
            tables: then this is :func:`open_mythos.layers.apply_rope` (channel halves
            paired, (B, H, T, d) layout), the rotation our attention layers use.

    Returns:
        The rotated tensor, shape and dtype of ``x``; computed in float32 (float64 for a
        complex128 table).

    Raises:
        RuntimeError: the table's rows do not match the positions of ``x`` (as upstream).
    """
    if sin is not None:
        return _apply_rope(x, freqs_cis, sin)
    if not freqs_cis.is_complex():
        raise TypeError(
            "apply_rope(x, freqs_cis) needs the complex table of precompute_rope_freqs; "
            "for real cos/sin tables call apply_rope(x, cos, sin)")
    if x.dim() < 3 or x.shape[-3] != freqs_cis.shape[0] or 2 * freqs_cis.shape[-1] != x.shape[-1]:
        raise RuntimeError(
            f"apply_rope: x of shape {tuple(x.shape)} (positions on dim -3) needs a table of "
            f"shape ({x.shape[-3] if x.dim() >= 3 else '?'}, {x.shape[-1] // 2}), got "
            f"{tuple(freqs_cis.shape)}; slice the table to the positions of x")
    real = freqs_cis.real.dtype
    cos = freqs_cis.real.unsqueeze(-2)  # (T, 1, d/2): broadcast over heads
    sin_ = freqs_cis.imag.unsqueeze(-2)
    a, b = x.to(real).unflatten(-1, (-1, 2)).unbind(-1)  # (..., T, H, d/2) each
    out = torch.stack((a * cos - b * sin_, a * sin_ + b * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def upstream_context(
    x: torch.Tensor,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor | None,
    kv_cache: dict | None,
    cache_key: str,
    rope_dim: int,
) -> AttnContext:
    """The attention context for upstream's ``(freqs_cis, mask, kv_cache)`` arguments.

    Args:
        x: (B, T, dim) the layer input.
        freqs_cis: complex (T, rope_dim // 2) table of the chunk's positions, as upstream
            requires; or a longer table starting at position 0, from which the rows of
            positions ``[cached, cached + T)`` are taken (``cached``: positions already in
            ``kv_cache`` under ``cache_key``).
        mask: upstream's additive float mask (0 where a query may attend, ``-inf`` where
            not), shape broadcastable to (B, 1, T, S); a boolean mask (True: attend) is
            also accepted. ``None`` means no mask at all, as upstream: every query sees
            every key (upstream's model passes ``None`` only for one-token steps).
        kv_cache: ``None`` or a plain ``dict``; the new keys are appended after the
            positions cached under ``cache_key``.
        cache_key: the layer's entry in ``kv_cache``.
        rope_dim: the layer's rotated width (GQA: head_dim; MLA: qk_rope_head_dim).
    """
    T = x.shape[1]
    cache = as_cache_store(kv_cache)
    start = cache.length(cache_key) if cache is not None else 0
    cos, sin = _chunk_tables(freqs_cis, start, T, rope_dim, x.device)
    if mask is not None:
        S = start + T
        try:  # before anything is written to the cache
            torch.broadcast_shapes(mask.shape, (x.shape[0], 1, T, S))
        except RuntimeError:
            cached = (f": with {start} positions cached under {cache_key!r}, a chunk's mask "
                      "covers the cached keys too") if start else ""
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (batch, 1, "
                             f"queries, keys) = {(x.shape[0], 1, T, S)}{cached}") from None
        dtype = torch.bool if mask.dtype == torch.bool else _activation_dtype(x)
        mask = mask.to(x.device, dtype)
    return AttnContext(cos, sin, start, mask, False, cache)


def _chunk_tables(
    freqs_cis: torch.Tensor, start: int, T: int, rope_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(cos, sin)`` (T, rope_dim // 2) for positions ``start..start + T - 1``."""
    if not freqs_cis.is_complex():
        # A real table is most often a complex buffer that Module.to(dtype) cast, dropping
        # the sines: upstream then rotated by cos alone without a word.
        raise TypeError(
            f"freqs_cis must be a complex table from precompute_rope_freqs, got "
            f"{freqs_cis.dtype}: a complex buffer cast by module.to(dtype) loses its sines "
            "(rebuild the table after .to(), keep it out of the module's buffers, or pass it "
            "per call)")
    if freqs_cis.dim() != 2 or freqs_cis.shape[1] != rope_dim // 2:
        raise ValueError(
            f"freqs_cis must have shape (positions, {rope_dim // 2}) for this layer's RoPE "
            f"width {rope_dim}, got {tuple(freqs_cis.shape)}")
    rows = freqs_cis.shape[0]
    if rows != T:
        if rows < start + T:
            raise ValueError(
                f"freqs_cis has {rows} rows: pass the {T} rows of this chunk's positions, or a "
                f"table from position 0 with at least {start + T} rows ({start} are cached)")
        freqs_cis = freqs_cis[start:start + T]
    freqs_cis = freqs_cis.to(device)
    return freqs_cis.real.float(), freqs_cis.imag.float()


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention scores have: the autocast dtype inside autocast, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _UpstreamCall:
    """``forward`` for attention and block classes: our signature or upstream's, told apart
    by the type of the second argument. ``rope_width`` is the RoPE width of the attention."""

    rope_width: int

    def forward(self, x: torch.Tensor, freqs_cis, *args, **kwargs) -> torch.Tensor:
        if isinstance(freqs_cis, AttnContext):  # ours: forward(x, ctx, cache_key, carry)
            return super().forward(x, freqs_cis, *args, **kwargs)
        return self.upstream_forward(x, freqs_cis, *args, **kwargs)

    def upstream_forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: dict | None = None,
        cache_key: str = "default",
    ) -> torch.Tensor:
        """Upstream's call: (B, T, dim) -> (B, T, dim); see :func:`upstream_context`."""
        ctx = upstream_context(x, freqs_cis, mask, kv_cache, cache_key, self.rope_width)
        return super().forward(x, ctx, cache_key)


class GQAttention(_UpstreamCall, _GQAttention):
    """:class:`open_mythos.layers.GQAttention`; ``forward`` also takes upstream's
    ``(x, freqs_cis, mask=None, kv_cache=None, cache_key="default")`` with a
    (T, head_dim // 2) table. A plain dict cache's entry holds ``k`` and ``v`` as upstream:
    (B, S, n_kv_heads, head_dim)."""

    @property
    def rope_width(self) -> int:
        return self.head_dim

    @property
    def groups(self) -> int:
        """Upstream's name: query heads per key/value head."""
        return self.n_heads // self.n_kv_heads


class MLAttention(_UpstreamCall, _MLAttention):
    """:class:`open_mythos.layers.MLAttention`; ``forward`` also takes upstream's
    ``(x, freqs_cis, mask=None, kv_cache=None, cache_key="default")`` with a
    (T, qk_rope_head_dim // 2) table. A plain dict cache's entry holds upstream's ``c_kv``
    (B, S, kv_lora_rank), the latent before ``kv_norm``, and ``k_rope``
    (B, S, qk_rope_head_dim), one rotated RoPE key per position (not one per head)."""

    @property
    def rope_width(self) -> int:
        return self.rope_dim_

    # Upstream's names for the per-head widths.
    @property
    def qk_rope_dim(self) -> int:
        return self.rope_dim_

    @property
    def qk_nope_dim(self) -> int:
        return self.nope_dim

    @property
    def q_head_dim(self) -> int:
        return self.nope_dim + self.rope_dim_


class TransformerBlock(_UpstreamCall, _TransformerBlock):
    """:class:`open_mythos.layers.TransformerBlock` built with the attention classes above;
    ``forward`` also takes upstream's ``(x, freqs_cis, mask=None, kv_cache=None,
    cache_key="default")``."""

    attention_classes = {AttnType.GQA: GQAttention, AttnType.MLA: MLAttention}

    @property
    def rope_width(self) -> int:
        return self.attn.rope_width


class RecurrentBlock(_RecurrentBlock):
    """:class:`open_mythos.layers.RecurrentBlock` looping the :class:`TransformerBlock`
    above; ``forward`` also takes upstream's ``(h, e, freqs_cis, mask=None, n_loops=None,
    kv_cache=None)``."""

    block_class = TransformerBlock

    def forward(self, h: torch.Tensor, e: torch.Tensor, freqs_cis, *args, **kwargs) -> torch.Tensor:
        if isinstance(freqs_cis, AttnContext):
            return super().forward(h, e, freqs_cis, *args, **kwargs)
        return self.upstream_forward(h, e, freqs_cis, *args, **kwargs)

    def upstream_forward(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | None = None,
        n_loops: int | None = None,
        kv_cache: dict | None = None,
    ) -> torch.Tensor:
        """Upstream's call: ``h``, ``e`` (B, T, dim) -> (B, T, dim).

        ``n_loops`` defaults to ``cfg.max_loop_iters``; it must be at least 1 (upstream
        silently replaced 0 by the default). As upstream, the loop stops early once every
        position has halted only without a cache (and here only in eval mode), so with a
        cache every depth's entry is written; stopping early leaves the output unchanged,
        as halted positions are frozen.
        """
        n_loops = self.cfg.max_loop_iters if n_loops is None else n_loops
        if n_loops < 1:
            raise ValueError(f"n_loops must be >= 1, got {n_loops}")
        ctx = upstream_context(h, freqs_cis, mask, kv_cache, self.cache_key(0),
                               self.block.attn.rope_width)
        early_exit = kv_cache is None and not self.training
        return super().forward(h, e, ctx, n_loops, early_exit=early_exit)
