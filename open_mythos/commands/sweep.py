"""``openmythos sweep``: accuracy and loss of a checkpoint at each inference loop count.

::

    openmythos sweep --checkpoint runs/parity --baseline runs/parity-dense --task parity \\
        --loops 1,2,4,8,16 --n-examples 256 --out sweep.csv
    openmythos sweep --checkpoint runs/text --loops 1-16 --out depth.json   # a text run

A run trained on text (no task) gets its validation loss at each loop count instead, on the
run's own validation batches, with the language-depth checks (non-increasing up to the
training depth, within 1% of the best at 4x).

Exit status: 0 on success, 2 for invalid arguments or a missing checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from .exit_options import add_exit_arguments, exit_rule_from_args


def parse_loops(text: str) -> list[int]:
    """``"1,2,4,8"`` or a range ``"1-16"`` (or a mix) -> sorted distinct positive ints."""
    loops: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            loops.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"loops must look like 1,2,4,8 or 1-16, got {text!r}") from None
    if not loops or min(loops) < 1:
        raise argparse.ArgumentTypeError(f"loops must be positive integers, got {text!r}")
    return sorted(loops)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sweep`` and ``report``: task, splits, loops, examples, device."""
    p.add_argument("--task", help="task name (default: the task the run was trained on)")
    p.add_argument("--task-args", metavar="JSON",
                   help='task difficulty knobs as a JSON object, e.g. \'{"lengths": [4, 12]}\' '
                        "(default: the run's)")
    p.add_argument("--splits", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated splits (default: id and every ood split that fits); "
                        "a split may be one difficulty level, e.g. hops=4 for multihop")
    p.add_argument("--loops", type=parse_loops,
                   help="loop counts, e.g. 1,2,4,8 or 1-16 (default: 1 to 4x max_loop_iters)")
    p.add_argument("--n-examples", type=int, default=128, metavar="N",
                   help="examples per split (default 128)")
    p.add_argument("--early-exit", choices=["off", "on", "both"], default="both",
                   help="ACT early exit setting(s) to evaluate (default both)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward (default 64)")
    p.add_argument("--seed", type=int, default=0, help="example seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sweep`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "sweep",
        help="evaluate a checkpoint at many loop counts",
        description="Exact-match accuracy (greedy), answer loss and loops used of a looped "
                    "checkpoint at each loop count, per task split; optionally the dense "
                    "baseline (one row per split). Results go to a .json or .csv file.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--baseline", metavar="DIR", help="checkpoint of the dense baseline")
    add_eval_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="results file, .json or .csv")
    add_exit_arguments(p)
    p.set_defaults(func=run)
    return p


def resolve_task(args: argparse.Namespace, run_path: str) -> Any:
    """The task named on the command line, else the run's; ValueError if neither
    (FileNotFoundError if ``run_path`` holds no checkpoint at all)."""
    from ..checkpoints import detect_format
    from ..evaluation.runs import parse_task_args, run_task
    from ..tasks import get_task

    if args.task is not None:
        return get_task(args.task, **parse_task_args(args.task_args))
    detect_format(run_path)  # "no checkpoint in ...", rather than "records no task"
    task = run_task(run_path)
    if task is None:
        raise ValueError(f"{run_path} records no task: pass --task")
    if args.task_args:
        task = get_task(task.name, **parse_task_args(args.task_args))
    return task


def sweep_models(args: argparse.Namespace, model: Any, baseline: Any, task: Any) -> tuple[list, list]:
    """``(looped rows, baseline rows)`` for the options of :func:`add_eval_arguments`."""
    from ..evaluation.sweep import sweep

    settings = {"off": (False,), "on": (True,), "both": (False, True)}[args.early_exit]
    common = dict(splits=args.splits, n_examples=args.n_examples, seed=args.seed,
                  batch_size=args.batch_size)
    # Only ``sweep`` has the --exit-* options (``report`` shares the rest).
    exit_rule = exit_rule_from_args(args) if hasattr(args, "exit_kl") else None
    rows = sweep(model, task, loops=args.loops, early_exit=settings, exit_rule=exit_rule,
                 **common)
    base_rows = sweep(baseline, task, **common) if baseline is not None else []
    return rows, base_rows


def run_text(args: argparse.Namespace) -> int:
    """A text run: validation loss against loops, written to ``--out`` (.json or .csv)."""
    import csv
    import json
    from pathlib import Path

    from ..evaluation.report import loss_table
    from ..evaluation.runs import run_loss_vs_loops, run_train_loops
    from ..evaluation.sweep import depth_checks, loss_rows

    _, losses = run_loss_vs_loops(args.checkpoint, resolve_device(args.device), args.loops)
    rows = loss_rows(losses)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        out.write_text(json.dumps(rows, indent=1))
    print(loss_table(losses))
    train_loops = run_train_loops(args.checkpoint)
    if train_loops is not None:
        print("\n".join(depth_checks({n: r.loss for n, r in losses.items()}, train_loops)))
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint(s), sweep, write ``--out`` and print the table."""
    from ..checkpoints import load_checkpoint
    from ..evaluation.report import sweep_table
    from ..evaluation.runs import is_text_run
    from ..evaluation.sweep import save_rows

    try:
        # Before any work: a sweep can take minutes.
        if Path(args.out).suffix not in (".json", ".csv"):
            raise ValueError(f"sweep results go to a .json or .csv file, got {args.out!r}")
        if args.task is None and is_text_run(args.checkpoint):
            return run_text(args)
        device = resolve_device(args.device)
        task = resolve_task(args, args.checkpoint)
        model, _ = load_checkpoint(args.checkpoint, device)
        baseline = load_checkpoint(args.baseline, device)[0] if args.baseline else None
        rows, base_rows = sweep_models(args, model, baseline, task)
        path = save_rows([*rows, *base_rows], args.out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"openmythos sweep: error: {err}", file=sys.stderr)
        return 2
    print(sweep_table([*rows, *base_rows]))
    print(f"wrote {path}")
    return 0
