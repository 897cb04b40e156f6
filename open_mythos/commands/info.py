"""``openmythos info``: size, KV cache and compute per token of a variant or checkpoint.

::

    openmythos info --variant mythos_1b --n-loops 16
    openmythos info runs/parity                      # a run: also step, loss, tokenizer
    openmythos info --checkpoint runs/parity --n-loops 32 --context 512 --json

For a run, checkpoint or Hugging Face directory it also reports (:class:`RunInfo`) the step of
the checkpoint read, the run's last validation loss up to that step (``metrics.jsonl``), the
tokenizer stored with it and its vocabulary, the trained depth (the default ``n_loops``, used
for every figure below unless ``--n-loops`` is given) and the parameter memory (as stored,
and in fp32 and bf16).

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
  form). Norms, RoPE, softmax, the embedding lookup, the LTI injection and the token
  convolution (``token_conv``: ``2 * dim * K`` a token) are not counted.
  With ACT early exit a token may run fewer loops, so this is the cost at ``n_loops``
  loops. A training step costs about 3x the forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class RunInfo:
    """What ``info`` reads about a checkpoint beyond its architecture.

    ``step`` is None for a Hugging Face directory, ``val_loss`` (and ``val_step``, the step it
    was measured at) without a logged validation, ``tokenizer`` (``"byte"`` or a directory)
    when none is stored, ``trained_depth`` when the run records none (or a fixed-depth kind;
    for a Hugging Face directory, the export's ``trained_depth``, or for an export older
    than that key the ``n_loops`` it was given, by default the training depth);
    ``default_n_loops``: a Hugging Face directory's ``n_loops`` (None otherwise, where the
    trained depth is the default); ``trained_depth_recorded``: False for an export older
    than ``trained_depth``, whose trained depth is its ``n_loops`` unless export was given
    ``--n-loops``;
    ``param_bytes`` maps ``"stored"`` (the safetensors files' tensors, tied ones once, in
    their ``stored_dtype``; absent for sharded ``model.dcp/`` weights), ``"fp32"`` and
    ``"bf16"`` to bytes.
    """

    path: str
    format: str
    step: int | None
    val_loss: float | None
    val_step: int | None
    tokenizer: str | None
    tokenizer_vocab_size: int | None
    vocab_size: int
    trained_depth: int | None
    stored_dtype: str | None
    param_bytes: dict[str, int]
    default_n_loops: int | None = None
    trained_depth_recorded: bool = True


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
    run: RunInfo | None = None


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
    from ..layers.conv import TokenConv

    keys = model.cache_keys(model.cfg.max_loop_iters if n_loops is None else n_loops)
    return sum(key != TokenConv.cache_key for key in keys)


def conv_values(cfg: Any) -> int:
    """Cached values per token of the token convolution (``cfg.token_conv``): its input,
    ``dim`` of them, or 0 without one."""
    return cfg.dim if getattr(cfg, "token_conv", 0) else 0


def kv_cache_bytes_per_token(cfg: Any, n_loops: int | None, bytes_per_value: int) -> int:
    """Bytes the KV cache grows by per token with every position running ``n_loops``
    (attention layers and loop depths, plus the token convolution's input)."""
    values = cache_layers(cfg, n_loops) * kv_values_per_layer(cfg) + conv_values(cfg)
    return values * bytes_per_value


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
    cached_values = layers * kv_values_per_layer(cfg) + conv_values(cfg)
    once, per_loop = matmul_params(cfg)
    return ModelInfo(
        name=name, kind=kind.name, attn_type=str(cfg.attn_type), n_loops=n_loops,
        total_params=counts.total, active_params=counts.active,
        cache_layers=layers, kv_values_per_layer=kv_values_per_layer(cfg),
        kv_bytes_per_token={k: cached_values * b for k, b in DTYPE_BYTES.items()},
        matmul_params_once=once, matmul_params_per_loop=per_loop,
        matmul_flops_per_token=flops_per_token(cfg, n_loops, 0),
        attention_flops_per_position=attention_flops_per_position(cfg, n_loops),
        context=context, flops_per_token=flops_per_token(cfg, n_loops, context))


def run_info(path: str, cfg: Any, trained_depth: int | None, total_params: int) -> RunInfo:
    """The :class:`RunInfo` of a run, checkpoint or Hugging Face directory whose
    configuration ``cfg`` and default depth are already read."""
    from ..checkpoints import (
        CHECKPOINT_DIR,
        CheckpointFormat,
        LoadedModel,
        detect_format,
        read_training_depth,
        training_depth_recorded,
    )

    # The files loading reads are verified, as by generate: a damaged newest checkpoint of
    # a run is skipped with a warning.
    fmt, ckpt_dir = detect_format(path)
    default_n_loops, recorded = None, True
    if fmt is CheckpointFormat.HF:  # the export's default depth, and its trained one
        default_n_loops, trained_depth = trained_depth, read_training_depth(ckpt_dir)
        recorded = training_depth_recorded(ckpt_dir)
    files = sorted(ckpt_dir.glob("*.safetensors"))
    stored, dtypes, meta_step = _stored_bytes(files)
    step = None
    if fmt is CheckpointFormat.TRAINING:
        step = meta_step if meta_step is not None else _step_of(ckpt_dir.name)
    val_loss = val_step = None
    if ckpt_dir.parent.name == CHECKPOINT_DIR:
        val_step, val_loss = _last_val_loss(ckpt_dir.parent.parent / "metrics.jsonl", step)
    tokenizer, tok_vocab = _tokenizer(LoadedModel(None, cfg, ckpt_dir, fmt))  # type: ignore[arg-type]
    return RunInfo(
        path=str(ckpt_dir), format=fmt.value, step=step, val_loss=val_loss, val_step=val_step,
        tokenizer=tokenizer, tokenizer_vocab_size=tok_vocab, vocab_size=cfg.vocab_size,
        trained_depth=trained_depth, stored_dtype="/".join(sorted(dtypes)) or None,
        param_bytes={**({"stored": stored} if files else {}),
                     **{k: total_params * b for k, b in DTYPE_BYTES.items()}},
        default_n_loops=default_n_loops, trained_depth_recorded=recorded)


def _stored_bytes(files: list[Any]) -> tuple[int, set[str], int | None]:
    """``(bytes of the tensors, their dtypes, the "step" metadata)`` of safetensors files.

    Raises:
        CheckpointCorrupt: a file is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    from ..checkpoints import CheckpointCorrupt
    from ..layers.moe import BALANCE_BUFFERS

    total, dtypes, step = 0, set(), None
    sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "BOOL": 1,
             "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    for f in files:
        try:
            fh = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointCorrupt(f"{f} is unreadable: {err}") from None
        with fh:
            meta = fh.metadata() or {}
            if "step" in meta and str(meta["step"]).isdigit():
                step = int(meta["step"])
            for key in fh.keys():
                sl = fh.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                # The MoE balancing state is float32 in a model of any dtype: the dtype a
                # file is "stored in" is its weights' (as the loader reads it).
                if key.rpartition(".")[2] not in BALANCE_BUFFERS:
                    dtypes.add(sl.get_dtype())
                total += numel * sizes.get(sl.get_dtype(), 4)
    return total, dtypes, step


def _step_of(name: str) -> int | None:
    digits = name.rpartition("_")[2]
    return int(digits) if name.startswith("step_") and digits.isdigit() else None


def _last_val_loss(metrics: Any, step: int | None) -> tuple[int | None, float | None]:
    """``(step, val_loss)`` of the last logged validation at or before ``step``."""
    found: tuple[int | None, float | None] = (None, None)
    if not metrics.is_file():
        return found
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        loss = row.get("val_loss") if isinstance(row, dict) else None
        if isinstance(loss, (int, float)) and (step is None or row.get("step", 0) <= step):
            found = (int(row["step"]), float(loss))
    return found


def _tokenizer(loaded: Any) -> tuple[str | None, int | None]:
    """``(the tokenizer stored with a checkpoint, its vocabulary size)``, (None, None) if none."""
    from ..integrations.convert import stored_tokenizer
    from ..tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

    source = stored_tokenizer(loaded)
    if source is None:
        return None, None
    if isinstance(source, Tokenizer):  # a task run's byte tokenizer: no file behind it
        bos = ", BOS first (a task run)" if getattr(source, "add_bos_token", False) else ""
        name = ("byte" if isinstance(source, ByteTokenizer) else repr(source)) + bos
        return name, source.vocab_size
    return str(source), load_tokenizer(str(source)).vocab_size


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
        f"  kv cache / token  {info.cache_layers} layers x {info.kv_values_per_layer} values"
        f"{f' + {conv_values(cfg)} (token convolution)' if conv_values(cfg) else ''}: "
        f"{kv['fp32']:,} B fp32, {kv['bf16']:,} B bf16 "
        f"({_format_bytes(kv['bf16'] * info.context)} bf16 at {info.context:,} tokens)",
        f"  flops / token     {format_count(info.flops_per_token)} at context {info.context:,} = "
        f"2 x {format_count(info.matmul_flops_per_token // 2)} matmul weights ({matmul}) + "
        f"{format_count(info.attention_flops_per_position)} attention per context position",
    ]
    if info.run is not None:
        r = info.run
        where = f"step {r.step:,}" if r.step is not None else f"{r.format} directory"
        loss = (f"validation loss {r.val_loss:.4f} (step {r.val_step:,})"
                if r.val_loss is not None else "no validation loss logged")
        tok = (f"{r.tokenizer} ({r.tokenizer_vocab_size:,} ids; model vocabulary "
               f"{r.vocab_size:,})" if r.tokenizer else
               f"none stored (model vocabulary {r.vocab_size:,}; pass --tokenizer)")
        if r.trained_depth is None:
            depth = "no trained depth recorded"
        elif r.format == "hf" and r.default_n_loops is None:  # e.g. from_mythos(model)
            depth = (f"trained at {r.trained_depth} loops; no n_loops set, so "
                     f"max_loop_iters ({cfg.max_loop_iters}) by default")
        elif r.format == "hf" and r.default_n_loops != r.trained_depth:
            depth = (f"trained at {r.trained_depth} loops; n_loops {r.default_n_loops} by "
                     "default (set at export)")
        elif r.format == "hf" and r.trained_depth_recorded:
            depth = f"trained at {r.trained_depth} loops (the default n_loops)"
        elif r.format == "hf":  # an export older than trained_depth records only n_loops
            depth = (f"n_loops {r.trained_depth} by default (set at export, the training "
                     "depth unless export was given --n-loops)")
        else:
            depth = f"trained at {r.trained_depth} loops (the default n_loops)"
        mem = r.param_bytes
        lines[1:1] = [
            f"  checkpoint        {r.path}: {where}, {loss}",
            f"  tokenizer         {tok}",
            f"  depth             {depth}",
            "  parameter memory  "
            + (f"{_format_bytes(mem['stored'])} as stored ({r.stored_dtype}), "
               if "stored" in mem else "")
            + f"{_format_bytes(mem['fp32'])} fp32, {_format_bytes(mem['bf16'])} bf16",
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
    src.add_argument("run", nargs="?", metavar="RUN",
                     help="run directory, training checkpoint or Hugging Face directory")
    src.add_argument("--variant", help="preset name, e.g. mythos_1b (or 1b)")
    src.add_argument("--checkpoint", metavar="DIR", help="the same as RUN")
    p.add_argument("--n-loops", type=int, metavar="N",
                   help="loops per token (default: the trained depth, else max_loop_iters)")
    p.add_argument("--context", type=int, metavar="S",
                   help="attended positions for the attention FLOPs, at most max_seq_len "
                        "(the default)")
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

            name = args.run or args.checkpoint
            cfg, stored_loops = read_config(name)
        n_loops = stored_loops if args.n_loops is None else args.n_loops
        if n_loops is not None and n_loops < 1:
            raise ValueError(f"--n-loops must be a positive integer, got {n_loops}")
        if args.n_loops is not None and not kind_of(cfg).looped:
            raise ValueError(f"--n-loops does not apply to {name}: a {kind_of(cfg).name} "
                             "model has a fixed depth")
        if args.context is not None and not 0 <= args.context <= cfg.max_seq_len:
            raise ValueError(f"--context must be in [0, max_seq_len = {cfg.max_seq_len}] (the "
                             f"model attends to no more positions), got {args.context}")
        info = model_info(cfg, name, n_loops, args.context)
        if not args.variant:
            info = replace(info, run=run_info(name, cfg, stored_loops, info.total_params))
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        print(f"openmythos info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(info), indent=2) if args.json else format_info(info, cfg))
    return 0
