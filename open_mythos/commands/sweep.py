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
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from .argtypes import check_output_file, loop_counts, name_list, positive_int
from .exit_options import add_exit_arguments, exit_rule_from_args
from .notes import warnings_as_notes

#: Defaults of the evaluation options (a text run refuses any other value: they do not apply).
EVAL_DEFAULTS: dict[str, Any] = dict(n_examples=128, early_exit="both", batch_size=64, seed=0)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sweep`` and ``report``: task, splits, loops, examples, device."""
    p.add_argument("--task", help="task name (default: the task the run was trained on)")
    p.add_argument("--task-args", metavar="JSON",
                   help='task difficulty knobs as a JSON object, e.g. \'{"lengths": [4, 12]}\': '
                        "they replace the run's knobs of those names, the others stay (with "
                        "--task, only these knobs over the task's defaults)")
    p.add_argument("--splits", type=name_list,
                   help="comma-separated splits (default: id and every ood split that fits); "
                        "a split may be one difficulty level, e.g. hops=4 for multihop")
    p.add_argument("--loops", type=loop_counts,
                   help="loop counts, e.g. 1,2,4,8 or 1-16 (default: 1 to 4x max_loop_iters)")
    p.add_argument("--n-examples", type=positive_int, default=EVAL_DEFAULTS["n_examples"],
                   metavar="N", help="examples per split (default %(default)s)")
    p.add_argument("--early-exit", choices=["off", "on", "both"],
                   default=EVAL_DEFAULTS["early_exit"],
                   help="ACT early exit setting(s) to evaluate (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_DEFAULTS["batch_size"],
                   help="examples per forward (default %(default)s)")
    p.add_argument("--seed", type=int, default=EVAL_DEFAULTS["seed"],
                   help="example seed (default %(default)s)")
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
    """The task named on the command line, else the run's; ValueError if neither, or for
    task arguments the task does not take (FileNotFoundError if ``run_path`` holds no
    checkpoint at all)."""
    from ..checkpoints import detect_format
    from ..evaluation.runs import parse_task_args, read_train_config
    from ..tasks import get_task
    from ..tasks.batching import check_task

    if args.task is None:
        detect_format(run_path)  # "no checkpoint in ...", rather than "records no task"
        cfg = read_train_config(run_path)
        if cfg is None or cfg.data.task is None:
            raise ValueError(f"{run_path} records no task: pass --task")
        # The knobs given replace the run's; the others stay (a run trained with
        # statements=8 keeps them when only ood_hops is given).
        name, knobs = cfg.data.task, dict(cfg.data.task_args)
    else:
        name, knobs = args.task, {}
    try:
        task = get_task(name, **{**knobs, **parse_task_args(args.task_args)})
    except (TypeError, ValueError) as err:
        if not args.task_args:
            raise
        raise ValueError(f"--task-args {args.task_args}: {err}") from None
    try:  # a user task's mistakes, named before any forward
        check_task(task)
    except (TypeError, AttributeError) as err:
        raise ValueError(str(err)) from None
    return task


def load_models(args: argparse.Namespace, path: str, device: Any) -> tuple[Any, Any, Any]:
    """``(model, its config, dense baseline or None)``: ``path`` and ``--baseline`` loaded
    and checked against the options (a baseline must be dense; loop counts and exit rules
    need a looped model)."""
    from ..checkpoints import load_checkpoint
    from ..registry import is_looped

    model, cfg = load_checkpoint(path, device)
    if not is_looped(model):
        given = [name for name, value in (("--loops", args.loops),
                                          ("--exit-*", _exit_rule_given(args))) if value]
        if given:
            raise ValueError(f"{path} holds a fixed-depth model; options for looped models "
                             f"only: {', '.join(given)}")
    baseline = None
    if args.baseline:
        baseline = load_checkpoint(args.baseline, device)[0]
        if is_looped(baseline):
            raise ValueError(f"--baseline {args.baseline} holds a looped model; it takes the "
                             "fixed-depth baseline (a run trained with model.core_layers set)")
        check_baseline_data(path, args.baseline)
    return model, cfg, baseline


def check_baseline_data(path: str, baseline_path: str) -> None:
    """ValueError unless the baseline at ``baseline_path`` was trained on the data of the
    run at ``path`` (the same task and knobs): both are evaluated on one task, so a
    baseline of another task or difficulty compares nothing. Runs that do not record
    their data (exported models) are not checked."""
    from ..evaluation.runs import read_train_config

    ours, theirs = read_train_config(path), read_train_config(baseline_path)
    if ours is None or theirs is None:
        return
    mine = (ours.data.task, ours.data.task_args)
    other = (theirs.data.task, theirs.data.task_args)
    if mine != other and not _same_task(mine, other):
        def say(task: Any, knobs: Any) -> str:
            return "text data" if task is None else f"task {task!r} with {knobs}"
        raise ValueError(f"--baseline {baseline_path} was trained on {say(*other)}, the run "
                         f"{path} on {say(*mine)}: a baseline compares only on its run's data")


def _same_task(mine: tuple[Any, Any], other: tuple[Any, Any]) -> bool:
    """Whether two ``(task, task_args)`` build the same task: knobs written out at their
    defaults (``lengths = [4, 12]`` for parity) or left out describe one task."""
    from ..evaluation.sweep import task_fingerprint
    from ..tasks import get_task

    if mine[0] is None or other[0] is None or mine[0] != other[0]:
        return False
    try:
        return (task_fingerprint(get_task(mine[0], **(mine[1] or {})))
                == task_fingerprint(get_task(other[0], **(other[1] or {}))))
    except (ValueError, TypeError):  # knobs a task no longer takes: not provably the same
        return False


def text_run_conflicts(args: argparse.Namespace, path: str, text_options: str) -> None:
    """ValueError naming the options given for the text run at ``path`` that it does not
    use: a text run is evaluated by its validation loss at each loop count."""
    given = [f"--{name.replace('_', '-')}" for name, default in EVAL_DEFAULTS.items()
             if getattr(args, name) != default]
    given += [f"--{name.replace('_', '-')}" for name in ("baseline", "task_args", "splits")
              if getattr(args, name)]
    if _exit_rule_given(args):
        given.append("--exit-*")
    if given:
        raise ValueError(f"{path} is a text run, evaluated by its validation loss at each "
                         f"loop count; options that do not apply to it: {', '.join(given)} "
                         f"(it takes {text_options})")


def _exit_rule_given(args: argparse.Namespace) -> bool:
    """Whether the ``--exit-*`` options (``sweep`` only) describe a rule."""
    return hasattr(args, "exit_kl") and exit_rule_from_args(args) is not None


def sweep_models(args: argparse.Namespace, model: Any, baseline: Any, task: Any,
                 progress: SweepProgress | None = None) -> tuple[list, list]:
    """``(looped rows, baseline rows)`` for the options of :func:`add_eval_arguments`;
    with ``progress``, rows it holds are not evaluated again and each new row goes to it."""
    from ..evaluation.sweep import check_splits_fit, sweep

    settings = {"off": (False,), "on": (True,), "both": (False, True)}[args.early_exit]
    common: dict[str, Any] = dict(splits=args.splits, n_examples=args.n_examples,
                                  seed=args.seed, batch_size=args.batch_size)
    if progress is not None:
        common.update(resume=progress.previous, on_row=progress.add)
    # Only ``sweep`` has the --exit-* options (``report`` shares the rest).
    exit_rule = exit_rule_from_args(args) if hasattr(args, "exit_kl") else None
    if baseline is not None and args.splits:  # before the looped model's sweep, not after
        try:
            check_splits_fit(baseline, task, args.splits, args.n_examples, args.seed)
        except ValueError as err:
            raise ValueError(f"the baseline (--baseline {args.baseline}): {err}") from None
    rows = sweep(model, task, loops=args.loops, early_exit=settings, exit_rule=exit_rule,
                 **common)
    base_rows = sweep(baseline, task, **common) if baseline is not None else []
    return rows, base_rows


#: Options of progress files written before 2026-12-07 that every row now names itself
#: (the baseline by its fingerprint): left out when such a file is compared.
_ROW_KEYED_OPTIONS = frozenset({"splits", "loops", "early_exit", "baseline"})


def _comparable(options: Any) -> Any:
    """``options`` without :data:`_ROW_KEYED_OPTIONS` (files written before they stopped
    being options still name them)."""
    if not isinstance(options, dict):
        return options
    return {k: v for k, v in options.items() if k not in _ROW_KEYED_OPTIONS}


class SweepProgress:
    """The rows of a running sweep, kept in ``<out>.partial.json`` as each one is made.

    A sweep that dies (a kill, Ctrl-C, a lost machine) keeps the rows it made; the same
    command run again finds them and evaluates only the rest. The file is JSON lines: the
    sweep's options (with fingerprints of the models and task) first, then one row per
    line, appended (a line cut short by a kill is ignored); rows of a sweep with other
    options are not reused. The splits, loop counts, early-exit settings and the baseline
    are not among those options: every row names its own (its model by fingerprint), so a
    command that asks for fewer or more of them reuses the rows it shares with the earlier
    one. The file is rewritten only when this command makes its first row (a command that
    fails its checks leaves it as it was); :meth:`finish` removes it once the command's
    results are written, or keeps only the rows that command did not ask for.
    """

    def __init__(self, out: str | Path, options: dict[str, Any], command: str = "sweep",
                 legacy_task: str | None = None):
        """``legacy_task``: the task's fingerprint as files written before 2026-12-07 give
        it (:func:`~open_mythos.evaluation.sweep.task_fingerprint` ``legacy=True``): their
        rows are of this task too."""
        self.path = Path(out).with_name(Path(out).name + ".partial.json")
        self.options = json.loads(json.dumps(options))  # as the file gives it back
        self.legacy_task = legacy_task
        self.command = command
        self.rows: list[Any] = []
        self.previous = self._read()
        self._previous_ids = {id(r) for r in self.previous}  # rows handed back as they are
        if self.previous:
            self._say(f"resuming: {len(self.previous)} row(s) already evaluated in {self.path}")
        self._started = False

    def _start(self) -> None:
        """Write the file afresh (once, before this command's first row): the options line
        and the rows kept (a last line a kill cut short is not left for the next row to
        run into)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in [
            {"options": self.options}, *map(dataclasses.asdict, self.previous)]))
        self._started = True

    def _say(self, text: str) -> None:
        print(f"openmythos {self.command}: {text}", file=sys.stderr, flush=True)

    def _read(self) -> list[Any]:
        """The rows of an earlier run of this sweep in the file ([] if none usable)."""
        from ..evaluation.sweep import rows_from_records

        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text().splitlines()
            head = json.loads(lines[0]) if lines else None
            if not isinstance(head, dict) or "options" not in head:
                raise ValueError("no options line")
        except (ValueError, UnicodeDecodeError) as err:
            self._say(f"{self.path} is not a sweep's progress file ({err}); starting over")
            return []
        written = head["options"]
        if (isinstance(written, dict) and self.legacy_task is not None
                and written.get("task") == self.legacy_task):
            written = {**written, "task": self.options.get("task")}  # an older file's hash
        if _comparable(written) != _comparable(self.options):
            self._say(f"{self.path} holds a sweep with other options or another checkpoint; "
                      "starting over")
            return []
        records = []
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except ValueError:  # the last line, cut short by a kill
                break
        try:
            rows = rows_from_records(records, str(self.path))
        except ValueError as err:
            self._say(f"{err}; starting over")
            return []
        # An older file's rows name the task by its older hash: the same task (the options
        # said so), named as this command names it.
        return [dataclasses.replace(r, task_id=self.options["task"])
                if self.legacy_task is not None and r.task_id == self.legacy_task else r
                for r in rows]

    def add(self, row: Any) -> None:
        """Keep ``row`` (appended to the file unless it came from it) and say what it
        measured."""
        self.rows.append(row)
        reused = id(row) in self._previous_ids
        if not reused:
            if not self._started:
                self._start()
            with open(self.path, "a") as fh:
                fh.write(json.dumps(dataclasses.asdict(row)) + "\n")
        where = "from the progress file" if reused else f"{row.seconds:.1f} s"
        exit_setting = f", early exit {'on' if row.early_exit else 'off'}" \
            if row.model == "looped" else ""
        print(f"  {row.model} {row.split}, {row.n_loops} loops{exit_setting}: accuracy "
              f"{row.accuracy:.3f}, loss {row.loss:.4f} ({where})", file=sys.stderr,
              flush=True)

    def interrupted(self) -> None:
        """Say where the rows made so far are, after Ctrl-C."""
        kept = len(self.previous) + sum(id(r) not in self._previous_ids for r in self.rows)
        if kept:
            self._say(f"interrupted; {kept} row(s) kept in {self.path}: the same command "
                      "continues from them")
        else:
            self._say("interrupted before the first row")

    def finish(self) -> None:
        """The command's results are written: the progress file goes, unless it holds
        rows this command did not ask for (an interrupted wider sweep's), which stay for
        that sweep to resume from."""
        used = {id(r) for r in self.rows}
        unused = [r for r in self.previous if id(r) not in used]
        if not unused:
            self.path.unlink(missing_ok=True)
            return
        self.previous, self.rows = unused, []
        self._start()
        self._say(f"kept {len(unused)} row(s) this command did not ask for in {self.path} "
                  "(an earlier, wider sweep's: the command that made them resumes from them; "
                  "delete the file if it will not run again)")


def sweep_options(args: argparse.Namespace, model: Any, task: Any
                  ) -> dict[str, Any]:
    """What decides a sweep's rows, beside the model (by fingerprint), split, loop count
    and early exit each row names: the looped model and task (by fingerprint) and the
    options."""
    from ..evaluation.sweep import model_fingerprint, task_fingerprint

    rule = exit_rule_from_args(args) if hasattr(args, "exit_kl") else None  # report: none
    return {"model": model_fingerprint(model),
            "task": task_fingerprint(task), "n_examples": args.n_examples,
            "batch_size": args.batch_size, "seed": args.seed,
            "exit_rule": None if rule is None else repr(rule)}


def print_loss(n_loops: int, result: Any, seconds: float) -> None:
    """A text sweep's progress: one line (stderr) per loop count as it is done."""
    print(f"  {n_loops} loops: val loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
          f"({seconds:.1f} s)", file=sys.stderr, flush=True)


def run_text(args: argparse.Namespace) -> int:
    """A text run: validation loss against loops, written to ``--out`` (.json or .csv)."""
    import csv
    import json

    from ..evaluation.report import loss_table
    from ..evaluation.runs import run_loss_vs_loops, run_train_loops
    from ..evaluation.sweep import depth_checks, loss_rows

    _, losses = run_loss_vs_loops(args.checkpoint, resolve_device(args.device), args.loops,
                                  print_loss)
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


@warnings_as_notes("sweep")
def run(args: argparse.Namespace) -> int:
    """Load the checkpoint(s), sweep, write ``--out`` and print the table."""
    from ..evaluation.report import sweep_table
    from ..evaluation.runs import is_text_run
    from ..evaluation.sweep import save_rows, task_fingerprint

    try:
        # Before any work: a sweep can take minutes.
        check_output_file(args.out, (".json", ".csv"))
        exit_rule_from_args(args)
        if args.task is None and is_text_run(args.checkpoint):
            text_run_conflicts(args, args.checkpoint, "--loops and --device")
            return run_text(args)
        device = resolve_device(args.device)
        task = resolve_task(args, args.checkpoint)
        model, _, baseline = load_models(args, args.checkpoint, device)
        progress = SweepProgress(args.out, sweep_options(args, model, task),
                                 legacy_task=task_fingerprint(task, legacy=True))
        try:
            rows, base_rows = sweep_models(args, model, baseline, task, progress)
        except KeyboardInterrupt:
            progress.interrupted()
            return 130
        path = save_rows([*rows, *base_rows], args.out)
        progress.finish()
    except BrokenPipeError:  # the reader went away (| head): the CLI ends quietly
        raise
    except (OSError, ValueError, KeyError) as err:  # OSError: a full disk, a directory in the way
        print(f"openmythos sweep: error: {err}", file=sys.stderr)
        return 2
    rules = sorted({r.exit_rule for r in rows} - {""})
    if rules:
        print(f"looped rows with the exit rule {', '.join(rules)}")
    print(sweep_table([*rows, *base_rows]))
    print(f"wrote {path}")
    return 0
