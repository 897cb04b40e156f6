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
import os
import shutil
import sys
from collections.abc import Callable
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


#: The hidden folder inside ``--out`` that an export is written to before its files move
#: into ``--out`` (a name of this form found there is a killed export's, removed).
PARTIAL_PREFIX = ".openmythos-export.partial-"


def _export_into(out: Path, write: Callable[[Path], object]) -> None:
    """``write`` the export into a hidden folder inside the empty directory ``out``, then
    move its files up (renames within one directory: ``--out`` may be ``.``, a symlink or a
    mount point). On any error or interrupt, ``out`` is left empty again: no half-written
    export that loads as a model and fails as a tokenizer."""
    partial = out / f"{PARTIAL_PREFIX}{os.getpid()}"
    partial.mkdir()
    moved: list[Path] = []
    try:
        write(partial)
        for child in sorted(partial.iterdir()):
            child.rename(out / child.name)
            moved.append(out / child.name)
        partial.rmdir()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for path in moved:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Export ``args.run`` to ``args.out``."""
    from ..checkpoints import CheckpointCorrupt, detect_format, floating_dtype, read_config
    from ..integrations.convert import training_to_hf, training_to_safetensors
    from ..registry import is_looped

    out = Path(args.out)
    created = False
    try:
        check_output_dir(out)
        if out.is_dir():
            for stale in out.glob(f"{PARTIAL_PREFIX}*"):  # left by a killed export
                shutil.rmtree(stale, ignore_errors=True)
            if any(out.iterdir()):
                raise ValueError(f"{out} already exists and is not an empty directory")
        if args.n_loops is not None and not is_looped(read_config(detect_format(args.run)[1])[0]):
            raise ValueError(f"{args.run} holds a fixed-depth model: --n-loops applies to "
                             "looped models only")
        if args.format != "hf" and (args.n_loops is not None or args.dtype is not None):
            raise ValueError("--n-loops and --dtype apply to --format hf only")

        def write(where: Path) -> None:
            if args.format == "hf":
                extra = {} if args.n_loops is None else {"n_loops": args.n_loops}
                training_to_hf(args.run, where, tokenizer=args.tokenizer,
                               dtype=floating_dtype(args.dtype), **extra)
            else:
                training_to_safetensors(args.run, where, tokenizer=args.tokenizer)

        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        _export_into(out, write)
    except BaseException as err:  # an interrupt too: no --out this command made is left
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if not isinstance(err, (OSError, CheckpointCorrupt, ValueError, KeyError, TypeError)):
            raise
        print(f"openmythos export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format})")
    return 0
