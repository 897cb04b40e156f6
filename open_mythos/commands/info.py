"""``openmythos info``: size, KV cache and compute per token of a variant or checkpoint.

::

    openmythos info --variant mythos_1b --n-loops 16
    openmythos info --checkpoint runs/parity --n-loops 32 --context 512 --json

Works for every model kind of :mod:`open_mythos.registry`: the looped model at ``n_loops``
loops, or the dense baseline, whose depth is fixed (``--n-loops`` does not apply). Formulas
(``L`` attention layers per token: ``prelude_layers + n_loops + coda_layers`` for the looped
model, since each loop depth of the recurrent block is a layer of its own in the cache;
``prelude_layers + core_layers + coda_layers`` for the baseline):

* parameters: exact counts of :func:`open_mythos.variants.count_parameters`; *active* leaves
  out the routed experts a token does not choose (the baseline has none).
* KV cache bytes per token: ``L * e * bytes(dtype)`` with ``e = 2 * n_kv_heads * head_dim``
  for GQA (rotated keys and values) and ``e = kv_lora_rank + qk_rope_head_dim`` for MLA
  (the normalised latent plus one shared RoPE key); ``L`` is read off the model's
  ``cache_keys``.
* FLOPs per token: :func:`open_mythos.registry.flops_per_token` of the model's kind,
  ``2 * M + A * S``. ``M`` is the number of matrix-multiply weights a token uses: every
  ``nn.Linear`` of the Prelude and Coda and the LM head once, and per loop the recurrent
  block's (attention projections, router, shared experts, ACT head, LoRA ``down`` and
  ``B``) plus its ``n_experts_per_tok`` routed experts; for the baseline, every block once.
  ``A * S`` is attention over ``S`` context positions: per layer, ``QK^T`` and ``PV`` cost
  ``2 * n_heads * (d_qk + d_v)`` per position, with ``d_qk = d_v = head_dim`` for GQA and
  ``d_qk = qk_nope_head_dim + qk_rope_head_dim``, ``d_v = v_head_dim`` for MLA (expanded
  form). Norms, RoPE, softmax, the embedding lookup and the LTI injection are not counted.
  With ACT early exit a token may run fewer loops, so this is the cost at ``n_loops``
  loops. A training step costs about 3x the forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class ModelInfo:
    """What ``openmythos info`` reports (see the module docstring for the formulas).

    ``kind`` is the registry name (``"looped"``, ``"dense"``); ``n_loops`` is None for a
    fixed-depth kind, whose ``matmul_params_per_loop`` is 0.
    """

    name: str
    kind: str
    attn_type: str
    n_loops: int | None
    total_params: int
    active_params: int
    cache_layers: int
    kv_values_per_layer: int
    kv_bytes_per_token: dict[str, int]
    matmul_params_once: int
    matmul_params_per_loop: int
    matmul_flops_per_token: int
    attention_flops_per_position: int
    context: int
    flops_per_token: int


def kv_values_per_layer(cfg: Any) -> int:
    """Cached values per token per attention layer (one loop depth counts as one layer)."""
    if str(cfg.attn_type) == "gqa":
        return 2 * cfg.n_kv_heads * cfg.head_dim
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def cache_layers(cfg: Any, n_loops: int | None = None) -> int:
    """Cache entries a token fills: the keys a forward at ``n_loops`` loops (default
    ``max_loop_iters``; ignored by a fixed-depth model) writes, from a meta-device model."""
    from ..registry import build_model

    return _cache_layers(build_model(cfg, device="meta"), n_loops)


def _cache_layers(model: Any, n_loops: int | None) -> int:
    return len(model.cache_keys(model.cfg.max_loop_iters if n_loops is None else n_loops))


def kv_cache_bytes_per_token(cfg: Any, n_loops: int | None, bytes_per_value: int) -> int:
    """Bytes the KV cache grows by per token with every position running ``n_loops``."""
    return cache_layers(cfg, n_loops) * kv_values_per_layer(cfg) * bytes_per_value


def matmul_params(cfg: Any) -> tuple[int, int]:
    """``(once, per_loop)``: matrix-multiply weights a token uses outside the recurrent
    block (Prelude, Coda, LM head) and in one loop of it (routed experts: only the chosen);
    for a fixed-depth model, ``(all of them, 0)``. Half the context-free FLOPs of
    :func:`open_mythos.registry.flops_per_token` at one and two loops."""
    from ..registry import flops_per_token

    one, two = flops_per_token(cfg, 1, 0), flops_per_token(cfg, 2, 0)
    per_loop = (two - one) // 2
    return one // 2 - per_loop, per_loop


def attention_flops_per_position(cfg: Any, n_loops: int | None = None) -> int:
    """FLOPs of ``QK^T`` and ``PV`` per token per attended position, over all layers."""
    from ..registry import flops_per_token

    return flops_per_token(cfg, n_loops, 1) - flops_per_token(cfg, n_loops, 0)


def model_info(cfg: Any, name: str, n_loops: int | None = None,
               context: int | None = None) -> ModelInfo:
    """Everything ``info`` prints, for ``cfg`` (any model kind) run at ``n_loops`` (default
    ``max_loop_iters``; ignored by a fixed-depth kind) with ``context`` attended positions
    (default ``max_seq_len``)."""
    from ..registry import build_model, flops_per_token, kind_of
    from ..variants import count_parameters

    kind = kind_of(cfg)
    n_loops = (cfg.max_loop_iters if n_loops is None else n_loops) if kind.looped else None
    context = cfg.max_seq_len if context is None else context
    model = build_model(cfg, device="meta")
    counts = count_parameters(model)
    layers = _cache_layers(model, n_loops)
    once, per_loop = matmul_params(cfg)
    return ModelInfo(
        name=name, kind=kind.name, attn_type=str(cfg.attn_type), n_loops=n_loops,
        total_params=counts.total, active_params=counts.active,
        cache_layers=layers, kv_values_per_layer=kv_values_per_layer(cfg),
        kv_bytes_per_token={k: layers * kv_values_per_layer(cfg) * b
                            for k, b in DTYPE_BYTES.items()},
        matmul_params_once=once, matmul_params_per_loop=per_loop,
        matmul_flops_per_token=flops_per_token(cfg, n_loops, 0),
        attention_flops_per_position=attention_flops_per_position(cfg, n_loops),
        context=context, flops_per_token=flops_per_token(cfg, n_loops, context))


def format_info(info: ModelInfo, cfg: Any) -> str:
    """The human-readable report."""
    from ..variants import format_count

    kv = info.kv_bytes_per_token
    if info.n_loops is not None:
        moe = f"{cfg.n_experts} experts top-{cfg.n_experts_per_tok}, {cfg.n_shared_experts} shared"
        arch = (f"{cfg.prelude_layers} prelude + recurrent block x {info.n_loops} loops + "
                f"{cfg.coda_layers} coda, {moe}")
        matmul = (f"{format_count(info.matmul_params_once)} once + {info.n_loops} x "
                  f"{format_count(info.matmul_params_per_loop)} per loop")
    else:
        arch = (f"dense baseline, {cfg.prelude_layers} prelude + "
                f"{cfg.core_layers} core blocks (FFN width {cfg.core_ffn_dim}) + "
                f"{cfg.coda_layers} coda, fixed depth")
        matmul = f"{cfg.n_layers} blocks and the head, once"
    lines = [
        f"{info.name}: {info.attn_type.upper()} attention, dim {cfg.dim}, {arch}",
        f"  parameters        total {info.total_params:,} ({format_count(info.total_params)}), "
        f"active {info.active_params:,} ({format_count(info.active_params)})",
        f"  kv cache / token  {info.cache_layers} layers x {info.kv_values_per_layer} values: "
        f"{kv['fp32']:,} B fp32, {kv['bf16']:,} B bf16 "
        f"({_format_bytes(kv['bf16'] * info.context)} bf16 at {info.context:,} tokens)",
        f"  flops / token     {format_count(info.flops_per_token)} at context {info.context:,} = "
        f"2 x {format_count(info.matmul_flops_per_token // 2)} matmul weights ({matmul}) + "
        f"{format_count(info.attention_flops_per_position)} attention per context position",
    ]
    return "\n".join(lines)


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``info`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "info", help="parameters, KV cache and FLOPs per token of a variant or checkpoint",
        description="Exact parameter counts, KV cache bytes per token (fp32 and bf16) and "
                    "forward FLOPs per token at a loop count.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--variant", help="preset name, e.g. mythos_1b (or 1b)")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="training checkpoint, run directory or Hugging Face directory")
    p.add_argument("--n-loops", type=int, metavar="N",
                   help="loops per token (default: the checkpoint's n_loops, else max_loop_iters)")
    p.add_argument("--context", type=int, metavar="S",
                   help="attended positions for the attention FLOPs (default max_seq_len)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the report of ``--variant`` or ``--checkpoint``."""
    from ..registry import kind_of

    try:
        if args.variant:
            from ..variants import get_variant

            cfg, stored_loops = get_variant(args.variant), None
            name = args.variant if args.variant.startswith("mythos_") else f"mythos_{args.variant}"
        else:
            from ..checkpoints import read_config

            cfg, stored_loops = read_config(args.checkpoint)
            name = args.checkpoint
        n_loops = stored_loops if args.n_loops is None else args.n_loops
        if n_loops is not None and n_loops < 1:
            raise ValueError(f"--n-loops must be a positive integer, got {n_loops}")
        if args.n_loops is not None and not kind_of(cfg).looped:
            raise ValueError(f"--n-loops does not apply to {name}: a {kind_of(cfg).name} "
                             "model has a fixed depth")
        if args.context is not None and args.context < 0:
            raise ValueError(f"--context must be >= 0, got {args.context}")
        info = model_info(cfg, name, n_loops, args.context)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"openmythos info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(info), indent=2) if args.json else format_info(info, cfg))
    return 0
