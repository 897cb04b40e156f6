"""Preset model sizes (``mythos_1b`` ... ``mythos_1t``) and exact parameter counting.

Every preset uses MLA attention and the MoE recurrent block. Larger presets raise the number
of shared experts, experts per token and the depth-LoRA rank; from 100B on, ``rope_theta``
rises and ``max_output_tokens`` is 131072 (as upstream). ``expert_dim`` is chosen so that
the *total* parameter count (tied embedding counted once) is within 1% of the nominal size;
the docstrings give the exact counts, which ``tests/test_variants.py`` checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .config import MythosConfig
from .layers.moe import MoEFFN
from .registry import build_model


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model.

    Attributes:
        total: every parameter, tied weights once.
        active: parameters a token uses: ``total`` minus the routed experts it does not
            choose, ``(n_experts - n_experts_per_tok)`` experts per MoE layer.
    """

    total: int
    active: int

    def __str__(self) -> str:
        return f"{format_count(self.total)} total, {format_count(self.active)} active"


def format_count(n: float) -> str:
    """Human-readable count with two decimals: ``1_030_000_000 -> "1.03B"``, ``512 -> "512"``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


def count_parameters(cfg_or_model: MythosConfig | nn.Module) -> ParamCount:
    """Exact total and per-token active parameter counts.

    A config is built as the model of its kind (:func:`open_mythos.registry.build_model`:
    ``OpenMythos``, or ``DenseBaseline`` for a ``BaselineConfig``) on the meta device (no
    memory, fast at any size). A module is counted as is; each :class:`MoEFFN` in it removes
    its unchosen routed experts from the active count (the dense baseline has none, so its
    active count is its total).
    """
    if isinstance(cfg_or_model, MythosConfig):
        model: nn.Module = build_model(cfg_or_model, device="meta")
    else:
        model = cfg_or_model
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.modules():
        if isinstance(moe, MoEFFN):
            per_expert = (moe.w_gate_up.numel() + moe.w_down.numel()) // moe.n_experts
            inactive += (moe.n_experts - moe.topk) * per_expert
    return ParamCount(total=total, active=total - inactive)


def mythos_1b() -> MythosConfig:
    """~1B: dim 2048, 64 experts (top-4, 2 shared), 16 loops, 4k context.

    Exact: 1,007,404,930 total, 299,616,130 active parameters.
    """
    return MythosConfig(
        vocab_size=32000, dim=2048, n_heads=16, n_kv_heads=4, max_seq_len=4096,
        max_loop_iters=16, prelude_layers=2, coda_layers=2, attn_type="mla",
        kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=32, qk_nope_head_dim=64,
        v_head_dim=64, n_experts=64, n_shared_experts=2, n_experts_per_tok=4, expert_dim=1920,
        rope_theta=500000.0, lora_rank=8,
    )


def mythos_3b() -> MythosConfig:
    """~3B: dim 3072, 64 experts (top-4, 2 shared), 16 loops, 4k context.

    Exact: 2,999,257,858 total, 769,723,138 active parameters.
    """
    return MythosConfig(
        vocab_size=32000, dim=3072, n_heads=24, n_kv_heads=6, max_seq_len=4096,
        max_loop_iters=16, prelude_layers=2, coda_layers=2, attn_type="mla",
        kv_lora_rank=384, q_lora_rank=768, qk_rope_head_dim=32, qk_nope_head_dim=96,
        v_head_dim=96, n_experts=64, n_shared_experts=2, n_experts_per_tok=4, expert_dim=4032,
        rope_theta=500000.0, lora_rank=8,
    )


def mythos_10b() -> MythosConfig:
    """~10B: dim 4096, 128 experts (top-4, 2 shared), 24 loops, 8k context.

    Exact: 9,981,316,994 total, 1,399,771,010 active parameters.
    """
    return MythosConfig(
        vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=8, max_seq_len=8192,
        max_loop_iters=24, prelude_layers=2, coda_layers=2, attn_type="mla",
        kv_lora_rank=512, q_lora_rank=1024, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_experts=128, n_shared_experts=2, n_experts_per_tok=4, expert_dim=5632,
        rope_theta=500000.0, lora_rank=16,
    )


def mythos_50b() -> MythosConfig:
    """~50B: dim 6144, 256 experts (top-4, 4 shared), 32 loops, 8k context.

    Exact: 50,374,247,426 total, 5,189,010,434 active parameters.
    """
    return MythosConfig(
        vocab_size=32000, dim=6144, n_heads=48, n_kv_heads=8, max_seq_len=8192,
        max_loop_iters=32, prelude_layers=3, coda_layers=3, attn_type="mla",
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_experts=256, n_shared_experts=4, n_experts_per_tok=4, expert_dim=9728,
        rope_theta=500000.0, lora_rank=32,
    )


def mythos_100b() -> MythosConfig:
    """~100B: dim 8192, 256 experts (top-8, 4 shared), 32 loops, 1M context, 128k output.

    Exact: 100,102,128,130 total, 17,407,230,466 active parameters.
    """
    return MythosConfig(
        vocab_size=100000, dim=8192, n_heads=64, n_kv_heads=8, max_seq_len=1_000_000,
        max_loop_iters=32, prelude_layers=4, coda_layers=4, attn_type="mla",
        kv_lora_rank=512, q_lora_rank=2048, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_experts=256, n_shared_experts=4, n_experts_per_tok=8,
        expert_dim=13568, rope_theta=1_000_000.0, lora_rank=64, max_output_tokens=131072,
    )


def mythos_500b() -> MythosConfig:
    """~500B: dim 12288, 512 experts (top-8, 8 shared), 48 loops, 1M context, 128k output.

    Exact: 497,849,137,154 total, 69,778,470,914 active parameters.
    """
    return MythosConfig(
        vocab_size=100000, dim=12288, n_heads=96, n_kv_heads=16, max_seq_len=1_000_000,
        max_loop_iters=48, prelude_layers=4, coda_layers=4, attn_type="mla",
        kv_lora_rank=1024, q_lora_rank=3072, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_experts=512, n_shared_experts=8, n_experts_per_tok=8,
        expert_dim=23040, rope_theta=1_000_000.0, lora_rank=128, max_output_tokens=131072,
    )


def mythos_1t() -> MythosConfig:
    """~1T: dim 16384, 512 experts (top-8, 8 shared), 64 loops, 1M context, 128k output.

    Exact: 999,326,352,386 total, 143,185,019,906 active parameters.
    """
    return MythosConfig(
        vocab_size=100000, dim=16384, n_heads=128, n_kv_heads=16, max_seq_len=1_000_000,
        max_loop_iters=64, prelude_layers=6, coda_layers=6, attn_type="mla",
        kv_lora_rank=1024, q_lora_rank=4096, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_experts=512, n_shared_experts=8, n_experts_per_tok=8,
        expert_dim=34560, rope_theta=2_000_000.0, lora_rank=256, max_output_tokens=131072,
    )


VARIANTS: dict[str, Callable[[], MythosConfig]] = {
    f.__name__: f
    for f in (mythos_1b, mythos_3b, mythos_10b, mythos_50b, mythos_100b, mythos_500b, mythos_1t)
}

NOMINAL_SIZES: dict[str, int] = {
    "mythos_1b": 10**9, "mythos_3b": 3 * 10**9, "mythos_10b": 10**10, "mythos_50b": 5 * 10**10,
    "mythos_100b": 10**11, "mythos_500b": 5 * 10**11, "mythos_1t": 10**12,
}


def get_variant(name: str) -> MythosConfig:
    """The preset called ``name`` (``"mythos_1b"`` or just ``"1b"``, case-insensitive)."""
    key = name.lower()
    key = key if key.startswith("mythos_") else f"mythos_{key}"
    if key not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]()
