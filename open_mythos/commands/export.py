"""``openmythos export``: a run (or checkpoint) as a directory to hand to someone.

::

    openmythos export runs/tinystories --format hf --out export/tinystories
    openmythos export runs/tinystories --format safetensors --out export/weights

``--format hf`` writes a Hugging Face directory (:func:`~open_mythos.integrations.convert.
training_to_hf`): weights, ``config.json`` whose ``n_loops`` is the depth the run trained at,
the tokenizer (left padding, ``model_max_length = max_seq_len``) and the modeling code named
by ``auto_map``, so that, with only ``torch`` and ``transformers`` installed::

    AutoModelForCausalLM.from_pretrained("export/tinystories", trust_remote_code=True)

``--format safetensors`` writes the weights-only training layout (``model.safetensors``,
``config.json``, ``train_config.toml``, the tokenizer), which every ``openmythos`` command
reads.

Exit status: 0 on success, 2 for a missing or unreadable checkpoint, no known tokenizer, or an
``--out`` that already holds files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .argtypes import check_output_dir, loop_count


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "export", help="write a run as a Hugging Face or safetensors directory",
        description="Export the latest intact checkpoint of a run (or a checkpoint directory) "
                    "with its tokenizer and trained depth.")
    p.add_argument("run", metavar="RUN", help="run directory or training checkpoint directory")
    p.add_argument("--format", choices=["hf", "safetensors"], default="hf",
                   help="hf: transformers directory with its modeling code (default); "
                        "safetensors: weights-only training layout")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="'byte' or a tokenizer directory (default: the run's own)")
    p.add_argument("--n-loops", type=loop_count, metavar="N",
                   help="default loops of the hf export (default: the trained depth)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the weights of the hf export (default: as stored)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Export ``args.run`` to ``args.out``."""
    from ..checkpoints import CheckpointCorrupt, detect_format, floating_dtype, read_config
    from ..integrations.convert import check_out_dir, training_to_hf, training_to_safetensors
    from ..registry import is_looped

    out = Path(args.out)
    try:
        check_output_dir(out)
        check_out_dir(out, args.run)  # before the model is read: a clear refusal at once
        if args.n_loops is not None and not is_looped(read_config(detect_format(args.run)[1])[0]):
            raise ValueError(f"{args.run} holds a fixed-depth model: --n-loops applies to "
                             "looped models only")
        if args.format != "hf" and (args.n_loops is not None or args.dtype is not None):
            raise ValueError("--n-loops and --dtype apply to --format hf only")
        # The conversion writes into a hidden folder and moves its files up at the end; on
        # an error or interrupt it leaves --out as it was (removed if it made it).
        if args.format == "hf":
            extra = {} if args.n_loops is None else {"n_loops": args.n_loops}
            training_to_hf(args.run, out, tokenizer=args.tokenizer,
                           dtype=floating_dtype(args.dtype), **extra)
        else:
            training_to_safetensors(args.run, out, tokenizer=args.tokenizer)
    except (OSError, CheckpointCorrupt, ValueError, KeyError, TypeError) as err:
        print(f"openmythos export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format})")
    return 0
