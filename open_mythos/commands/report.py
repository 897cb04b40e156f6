"""``openmythos report``: figures and a markdown report of a training run's depth behaviour.

::

    openmythos report --run runs/parity --baseline runs/parity-dense --out report/

Sweeps the run's latest checkpoint (or reads ``--sweep FILE`` written by ``openmythos
sweep``), probes its ACT halting and expert load, and writes PNGs and ``report.md`` into
``--out`` (plus ``sweep.json`` when it ran the sweep itself). A run trained on text gets its
validation loss against loops instead (``loss_vs_loops.png``, ``loss_vs_loops.json``), with
the language-depth checks.

Exit status: 0 on success, 2 for invalid arguments or a missing checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .argtypes import check_output_dir, loop_count_or_zero, positive_int
from .notes import warnings_as_notes
from .sweep import (
    EVAL_DEFAULTS,
    SweepProgress,
    add_eval_arguments,
    load_models,
    print_loss,
    resolve_device,
    resolve_task,
    sweep_models,
    sweep_options,
    text_run_conflicts,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``report`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "report",
        help="write a depth-extrapolation report (PNG figures + report.md)",
        description="Training curves, accuracy against loops per split (training depth and "
                    "dense baseline marked), ACT halting heatmap, ponder-cost histogram and "
                    "expert load per loop depth for a training run.",
    )
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory (metrics.jsonl and checkpoints)")
    p.add_argument("--baseline", metavar="DIR", help="run or checkpoint of the dense baseline")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--sweep", metavar="FILE",
                   help="reuse results of `openmythos sweep` instead of sweeping again")
    p.add_argument("--train-loops", type=positive_int, metavar="N",
                   help="training depth to mark (default: from the run's schedule)")
    p.add_argument("--exit-loops", type=loop_count_or_zero, metavar="N",
                   help="depth the exit rules' Pareto plot starts from (default: twice the "
                        "training depth; 0 skips it)")
    add_eval_arguments(p)
    p.set_defaults(func=run)
    return p


def run_text(args: argparse.Namespace) -> Path:
    """The report of a text run; returns the path of ``report.md``."""
    import json

    from ..evaluation.exits import text_exit_points
    from ..evaluation.report import write_text_report
    from ..evaluation.runs import run_loss_vs_loops, run_train_loops, run_val_batches
    from ..evaluation.sweep import loss_rows
    from ..registry import is_looped

    batches = run_val_batches(args.run)  # built (and their data checked) once
    model, losses = run_loss_vs_loops(args.run, resolve_device(args.device), args.loops,
                                      print_loss, batches=batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_loops = args.train_loops or run_train_loops(args.run)
    points = []
    exit_loops = _exit_loops(args, train_loops or model.cfg.max_loop_iters)
    if exit_loops and is_looped(model):
        print(f"exit rules from {exit_loops} loops ...", file=sys.stderr)
        model.eval()
        points = text_exit_points(model, batches, exit_loops)
    with _staged_report(out, keep_sweep=False) as stage:
        (stage / "loss_vs_loops.json").write_text(json.dumps(loss_rows(losses), indent=1))
        path = write_text_report(args.run, stage, losses, model=model,
                                 train_loops=train_loops, exit_points=points)
    return out / path.name


@contextlib.contextmanager
def _staged_report(out: Path, keep_sweep: bool) -> Iterator[Path]:
    """A directory beside the report's files to write the new report into; once it is
    whole, the files of the earlier report (:func:`_clear_old_report`) give way to it. A
    report stopped before then (Ctrl-C, a kill) leaves the earlier one as it was."""
    import os

    from ..staging import remove_killed, staging_folder

    out.mkdir(parents=True, exist_ok=True)
    live = remove_killed(out, STAGING_PREFIX)  # a killed report's folder goes
    if live:
        raise ValueError(f"another report is being written into {out} (its folder "
                         f"{live[0].name} is locked); wait for it or choose another --out")
    with staging_folder(out, STAGING_PREFIX) as stage:
        yield stage
        _clear_old_report(out, keep_sweep)
        for path in stage.iterdir():
            os.replace(path, out / path.name)


#: The hidden folder inside ``--out`` that a report is written to (:mod:`open_mythos.staging`).
STAGING_PREFIX = ".openmythos-report.partial-"


def _clear_old_report(out: Path, keep_sweep: bool) -> None:
    """Remove the files an earlier report wrote into ``out`` (so that none of its figures is
    left beside the new ``report.md``), ``sweep.json`` only when not ``keep_sweep``: the
    new report's own sweep, or one given with ``--sweep`` (it may be a sweep written into
    the directory, ``openmythos sweep --out DIR/sweep.json``, which nothing tells apart
    from an earlier report's)."""
    from ..evaluation.report import REPORT_FILES

    for name in REPORT_FILES:
        if keep_sweep and name == "sweep.json":
            continue
        if (out / name).is_file():
            (out / name).unlink()


def _exit_loops(args: argparse.Namespace, train_loops: int) -> int:
    return 2 * train_loops if args.exit_loops is None else args.exit_loops


def read_sweep(path: str, task: Any, model: Any = None, baseline: Any = None
               ) -> tuple[list, list]:
    """``(looped rows, baseline rows)`` of a file written by ``openmythos sweep``, checked to
    be a sweep of ``task`` with looped rows (of ``model``, and baseline rows of
    ``baseline``, where given and the file records which model it swept)."""
    from ..evaluation.sweep import load_rows, model_fingerprint, task_fingerprint

    loaded = load_rows(path)
    rows = [r for r in loaded if r.model == "looped"]
    base_rows = [r for r in loaded if r.model == "baseline"]
    if not rows:
        raise ValueError(f"--sweep {path} holds no rows of a looped model")
    tasks = sorted({r.task for r in loaded})
    if tasks != [task.name]:
        raise ValueError(f"--sweep {path} is a sweep of {', '.join(tasks)}, and the run "
                         f"was trained on {task.name}")
    others = sorted({r.model for r in loaded} - {"looped", "baseline"})
    if others:
        raise ValueError(f"--sweep {path} has rows of unknown model kind(s) {others}")
    ids = {r.task_id for r in loaded} - {""}
    if ids and not ids <= {task_fingerprint(task), task_fingerprint(task, legacy=True)}:
        raise ValueError(f"--sweep {path} is a sweep of {task.name} with other knobs than "
                         "the run was trained with (or given by --task-args): sweep this "
                         "run, or pass the knobs of that sweep")
    for kind, swept, given in (("looped", rows, model), ("baseline", base_rows, baseline)):
        ids = {r.model_id for r in swept} - {""}
        if given is not None and ids and ids != {model_fingerprint(given)}:
            raise ValueError(f"--sweep {path}: its {kind} rows are of another model than "
                             f"this report's {kind} checkpoint (sweep this checkpoint)")
    # Files of before 2026-12-05 (task) and 2026-12-06 (models) name neither: taken as
    # they are, which is said.
    unchecked = [what for what, missing in (
        ("the task's knobs", any(not r.task_id for r in loaded)),
        ("the models swept", any(not r.model_id for r in loaded))) if missing]
    if unchecked:
        print(f"openmythos report: warning: --sweep {path} was written by an older version "
              f"that does not record {' or '.join(unchecked)}: its rows are taken as this "
              "run's without that check (sweep the run again to be sure)", file=sys.stderr)
    _refuse_merged_sweeps(path, loaded)
    return rows, base_rows


def _refuse_merged_sweeps(path: str, rows: list) -> None:
    """ValueError for a file that holds one cell (model, split, loops, early exit) twice:
    sweeps merged into one file (another exit rule, seed or example count). The report
    would keep one of the rows in its tables without a word and label them all with one
    exit rule."""
    seen: dict[tuple, Any] = {}
    for r in rows:
        cell = (r.model, r.split, r.n_loops, r.early_exit)
        if cell in seen:
            first = seen[cell]
            differ = [f"{name} {getattr(first, name)!r} and {getattr(r, name)!r}"
                      for name in ("exit_rule", "n_examples") if getattr(first, name) != getattr(r, name)]
            raise ValueError(
                f"--sweep {path} holds the {r.model} row for split {r.split!r} at {r.n_loops} "
                f"loops (early exit {'on' if r.early_exit else 'off'}) twice"
                + (f" ({'; '.join(differ)})" if differ else "")
                + ": it merges several sweeps, and a report shows one; write each sweep "
                "to its own file and report them one at a time")
        seen[cell] = r


@warnings_as_notes("report")
def run(args: argparse.Namespace) -> int:
    """Load the run, sweep (or read the sweep), and write the report."""
    from ..checkpoints import training_depth_recorded
    from ..evaluation.exits import task_exit_points
    from ..evaluation.report import write_report
    from ..evaluation.runs import is_text_run, run_train_loops
    from ..evaluation.sweep import eval_mode, sample_examples, save_rows, task_fingerprint
    from ..registry import is_looped

    progress: SweepProgress | None = None
    try:
        check_output_dir(args.out)  # before any work: a sweep can take minutes
        if args.task is None and is_text_run(args.run):
            if args.sweep:
                raise ValueError(f"{args.run} is a text run: --sweep takes a task sweep "
                                 "(openmythos sweep of a task run); a text run's report "
                                 "sweeps its loss against loops itself")
            text_run_conflicts(args, args.run,
                               "--loops, --train-loops, --exit-loops and --device")
            print(f"wrote {run_text(args)}")
            return 0
        device = resolve_device(args.device)
        task = resolve_task(args, args.run)
        model, cfg, baseline = load_models(args, args.run, device)
        if args.sweep:
            # The file's rows are the report's: options that choose rows would be ignored.
            unused = [f"--{n.replace('_', '-')}" for n in ("loops", "splits") if getattr(args, n)]
            unused += [f"--{n.replace('_', '-')}" for n in ("early_exit", "batch_size")
                       if getattr(args, n) != EVAL_DEFAULTS[n]]
            if unused:
                raise ValueError(f"--sweep {args.sweep} gives the rows; {', '.join(unused)} "
                                 "would choose rows of a new sweep (run openmythos sweep with "
                                 "them, or leave --sweep out)")
            rows, base_rows = read_sweep(args.sweep, task, model, baseline)
            if baseline is not None and not base_rows:
                raise ValueError(f"--sweep {args.sweep} holds no baseline rows for --baseline "
                                 f"{args.baseline} (sweep with --baseline, or leave it out)")
        else:
            # Each row is kept as it is made, until the report is written: a report stopped
            # mid-way (in the sweep or after it) resumes from them.
            progress = SweepProgress(Path(args.out) / "sweep.json",
                                     sweep_options(args, model, task), "report",
                                     legacy_task=task_fingerprint(task, legacy=True))
            rows, base_rows = sweep_models(args, model, baseline, task, progress)
        train_loops = args.train_loops or run_train_loops(args.run) or cfg.max_loop_iters
        if args.train_loops is None and is_looped(model) and not training_depth_recorded(args.run):
            print(f"openmythos report: warning: {args.run} does not record the depth it was "
                  f"trained at (an export of before 2026-12-07): its default n_loops, "
                  f"{train_loops}, is taken for it, which export --n-loops may have moved; "
                  "pass --train-loops N if it did", file=sys.stderr)
        points = []
        exit_loops = _exit_loops(args, train_loops)
        if exit_loops and is_looped(model):
            print(f"exit rules from {exit_loops} loops ...", file=sys.stderr)
            n_examples = args.n_examples
            swept = [r.n_examples for r in rows if r.split == "id"]
            if args.sweep and swept and n_examples == EVAL_DEFAULTS["n_examples"]:
                n_examples = max(swept)  # as many as the sweep's tables beside it
            examples = sample_examples(task, "id", n_examples, args.seed)
            with eval_mode(model):
                points = task_exit_points(model, examples, exit_loops)
        with _staged_report(Path(args.out), keep_sweep=True) as stage:
            if not args.sweep:  # the report's own sweep, in place with the rest of it
                save_rows([*rows, *base_rows], stage / "sweep.json")
            path = write_report(args.run, stage, rows, base_rows, model=model,
                                baseline=baseline, task=task, train_loops=train_loops,
                                seed=args.seed, exit_points=points,
                                exit_examples=len(examples) if points else None)
        path = Path(args.out) / path.name
        if progress is not None:
            progress.finish()
    except BrokenPipeError:  # the reader went away (| head): the CLI ends quietly
        raise
    except (OSError, ValueError, KeyError) as err:  # OSError: a full disk, a directory in the way
        print(f"openmythos report: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if progress is None:
            raise
        progress.interrupted()
        return 130
    print(f"wrote {path}")
    return 0
