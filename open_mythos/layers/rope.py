"""Rotary position embedding with real-valued cos/sin tables.

No complex tensors: the tables are recomputed in float32 (float64 for a float64 model) for the positions of each forward
(cheap next to the matmuls), so nothing is stored in buffers that ``model.to(dtype)`` could
quantise, models build on the meta device, and ``torch.compile`` traces the code.
Channel pairs are the two halves of the head (GPT-NeoX "rotate half" layout).
"""

from __future__ import annotations

import torch

from .norm import at_least_fp32


def rope_cos_sin(
    positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for ``positions``.

    Args:
        positions: integer positions, shape (T,) or (B, T).
        dim: rotated channels per head (even).
        theta: RoPE base frequency.
        dtype: float32, or float64 for a float64 model (a reference computation, whose
            tables rounded to float32 put a floor of ~1e-7 under its error).

    Returns:
        ``(cos, sin)`` in ``dtype``, shape ``positions.shape + (dim // 2,)``.
    """
    inv_freq = theta ** (
        -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    )
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def table_dtype(activations: torch.dtype) -> torch.dtype:
    """The dtype of the position and loop tables for a model computing in ``activations``:
    float64 for float64, float32 otherwise."""
    return torch.float64 if activations == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by the given tables.

    Args:
        x: (B, H, T, dim) queries or keys, any float dtype.
        cos, sin: (T, dim/2) or (B, T, dim/2) tables from :func:`rope_cos_sin`.

    Returns:
        Rotated tensor with the shape and dtype of ``x`` (computed in float32).
    """
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
