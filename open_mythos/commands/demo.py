"""``openmythos demo`` (what ``make demo`` runs): depth extrapolation in one command.

::

    python -m open_mythos demo                        # about 5-7 minutes on 2 CPU cores
    python -m open_mythos demo --quick --out /tmp/d   # checks the pipeline in seconds

On the ``multihop`` task (follow variable assignments to their end, a digit or, in half the
chains, a variable no assignment defines; one answer token, so every extra hop is extra
sequential computation for that token) it

1. trains a small looped model and the dense baseline of equal per-token FLOPs
   (``T_train`` unshared blocks, :mod:`open_mythos.baseline`) with
   :class:`~open_mythos.training.Trainer`, on the same batches, with the same losses and
   for the same number of steps, one process per model when two cores are free (one
   thread each, for the whole run, so that runs repeat exactly). Two
   stages, each an ``openmythos train`` configuration (``configs/multihop_lookup.toml``,
   ``configs/multihop_chain.toml``):

   - *lookup*: one-hop chains that end at a digit, with the per-loop readout loss (every
     loop must name the answer) and a constant learning rate: the model learns to look a
     variable up;
   - *chain*: from the lookup weights (``run.init_from``), 1 to ``T_train``-hop chains
     with per-loop targets (``optim.loop_targets``: loop ``t`` names the value reached
     after ``t`` hops): one hop per loop, exactly ``T_train`` loops per step. Half the
     chains end at a variable (``open_ends``), so naming one of the prompt's digits is
     no longer a good guess: a loop must look the current value up to know whether the
     chain goes on. (Not every shortcut is gone: answering the one variable that no
     statement assigns, when there is one, scores well above chance without following
     the chain.) The baseline gets the same targets after each of its core blocks.

2. sweeps the looped model from 1 to ``4 x T_train`` loops on the in-distribution split
   and on longer chains than any trained (``ood_hops``), once as it is and once with the
   training-free exit rule :data:`DEMO_EXIT_RULE_ARGS` (each position stops looping once its
   answer has settled), the two sweeps side by side in the training processes; the
   baseline has one depth;
3. writes ``report/`` (plots and ``report.md``), ``sweep.json``, ``demo.md`` and both runs;
4. prints the accuracy table, the depth-extrapolation targets as measured, the loops the
   exit rule lets positions and sequences skip at ``4 x T_train``, and a few greedy answers
   at low and high depth.

What is known about the recipe is in ``docs/depth_extrapolation.md``; every knob is a flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: The looped model (ACT off: every loop is supervised; the baseline gets the same sizes).
#: The default init; with upstream's N(0, 0.02) the lookup is never learned
#: (docs/initialization.md). A causal convolution over the embeddings (``token_conv``):
#: without it the lookup took 750-1270 steps by seed, with it both models learn it within
#: the 600 lookup steps on seeds 0-2; loops from the third on share its loop index
#: (``clamp_loop_index``), so loops past ``T_train`` repeat the trained hop.
DEMO_MODEL: dict[str, Any] = dict(
    dim=64, n_heads=4, n_kv_heads=4, max_seq_len=64, prelude_layers=1, coda_layers=1,
    attn_type="gqa", n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=32,
    lora_rank=4, use_act=False, clamp_loop_index=True, token_conv=4,
)
#: Chains of one length (8 assignments in every prompt): longer chains are harder by their
#: hops alone, not by a prompt longer than any trained (docs/depth_extrapolation.md).
DEFAULT_TASK_ARGS = {"hops": [1, 3], "ood_hops": [4, 6], "statements": 8, "open_ends": 0.5}
KINDS = ("looped", "baseline")
#: The exit rule of the second sweep: stop a position once its most likely next token has
#: stayed the same for two loops (docs/adaptive_inference.md).
DEMO_EXIT_RULE_ARGS: dict[str, int] = {"argmax_streak": 2, "min_loops": 2}
#: Defaults of the sizes ``--quick`` replaces.
#: 512 examples per split: the margin over the baseline is printed with its 95% interval
#: (about +-6 points; docs/depth_extrapolation.md), and 1024 would not fit the 5-minute
#: budget. 600 lookup steps: with the token convolution both models learn the lookup
#: by then on seeds 0, 1 and 2 (without it seed 2 needed about 1270).
DEFAULTS: dict[str, int] = {"steps": 1500, "lookup_steps": 600, "n_examples": 512,
                            "batch_size": 128}
#: Training keys the demo sets itself per model and stage (``--set`` cannot move them).
#: Keys the demo derives from its own flags (and states in its banner, sweeps and
#: ``demo.md``): ``--set`` may not change them behind the flag's back.
MANAGED_KEYS = {
    "run.out": "--out", "run.init_from": "--out",
    "data.task": "--task-args (the demo's task is multihop)", "data.task_args": "--task-args",
    "data.batch_size": "--batch-size", "run.steps": "--steps / --lookup-steps",
    "run.save_every": "--steps / --lookup-steps", "run.seed": "--seed",
    "model.max_loop_iters": "--train-loops", "model.core_layers": "--train-loops",
    "model.kind": "nothing (the demo trains one looped model and its dense baseline)",
    "model.core_ffn_dim": "nothing (the demo matches the baseline to the looped model)",
    "optim.loop_loss_weight": "--loop-loss", "optim.loop_targets": "--loop-loss",
    "run.compile": "--compile",
}
#: The two stages: name -> settings besides the shared ones.
STAGES: dict[str, dict[str, Any]] = {
    "lookup": {"optim.lr": 1e-3, "schedule.lr_decay": "constant"},
    "chain": {"optim.lr": 2e-3},
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "demo", help="train a looped model and its baseline, sweep depth, write a report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="output directory (default demo_out); new, empty or an earlier "
                        "demo's, whose runs and outputs this demo replaces")
    p.add_argument("--task-args", default=json.dumps(DEFAULT_TASK_ARGS), metavar="JSON",
                   help="multihop knobs of the chain stage and the sweep (default "
                        f"'{json.dumps(DEFAULT_TASK_ARGS)}'); the lookup stage trains 1 hop, on "
                        "chains that end at a digit")
    p.add_argument("--train-loops", type=int, default=3, metavar="T",
                   help="training depth T_train (default 3)")
    p.add_argument("--loops", choices=("fixed", "uniform"), default="fixed",
                   help="the looped model's loop counts in the chain stage: always T_train, "
                        "or uniform in [T_train, 2 x T_train] (default fixed; the lookup "
                        "stage samples 1 to T_train - 1)")
    p.add_argument("--lookup-steps", type=int, default=_Default(DEFAULTS["lookup_steps"]),
                   help=f"optimizer steps of the lookup stage (default {DEFAULTS['lookup_steps']}; "
                        "0 skips it)")
    p.add_argument("--steps", type=int, default=_Default(DEFAULTS["steps"]),
                   help=f"optimizer steps of the chain stage (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=_Default(DEFAULTS["batch_size"]),
                   help=f"examples per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--loop-loss", type=float, default=3.0,
                   help="weight of the per-loop readout loss (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and loops (default 0)")
    p.add_argument("--n-examples", type=int, default=_Default(DEFAULTS["n_examples"]),
                   help=f"examples per split in the sweep (default {DEFAULTS['n_examples']})")
    p.add_argument("--jobs", type=int, choices=(1, 2),
                   help="train the two models in parallel processes (2) or one after the other "
                        "(1); default 2 when the machine has at least 2 cores")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a training-config key of both models and stages, e.g. "
                        "model.init_std=0.02 or model.token_conv=0 (repeatable; see "
                        "openmythos train --help); not the keys the flags above set "
                        "(--set data.batch_size: use --batch-size)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step's blocks and loop body; auto (the "
                        "default): on when a C++ compiler for inductor is found, off with "
                        "--quick")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (seconds) to check the pipeline: 6 lookup + 12 chain steps "
                        "of 16 examples, 16 per split in the sweep (sizes given explicitly win)")
    p.set_defaults(func=run)
    return p


# Training ---------------------------------------------------------------------------------


def stage_task_args(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The multihop knobs of one stage: the lookup stage trains one hop."""
    task_args = json.loads(args.task_args)
    if stage == "lookup":
        task_args.pop("open_ends", None)
        return {**task_args, "hops": [1, 1], "ood_hops": [2, task_args.get("ood_hops", [4, 6])[1]]}
    return task_args


def train_config(args: argparse.Namespace, out: Path, kind: str, stage: str = "chain"):
    """The :class:`~open_mythos.training.TrainConfig` of one demo model in one stage."""
    from ..training import load_config
    from ..training.config import parse_override

    T = args.train_loops
    looped = kind == "looped"
    steps = args.lookup_steps if stage == "lookup" else args.steps
    pairs: list[tuple[str, Any]] = [(f"model.{k}", v) for k, v in DEMO_MODEL.items()]
    pairs += [
        ("model.max_loop_iters", T),
        ("data.task", "multihop"), ("data.task_args", stage_task_args(args, stage)),
        ("data.batch_size", args.batch_size), ("data.eval_batches", 2),
        ("optim.weight_decay", 0.01), ("optim.grad_clip", 0.0), ("optim.aux_weight", 0.01),
        ("optim.loop_loss_weight", args.loop_loss), ("optim.loop_targets", args.loop_loss > 0),
        ("optim.loop_readout", "head"),
        ("schedule.warmup_steps", max(1, min(10, steps // 10))),
        ("schedule.loops", ("uniform" if stage == "lookup" else args.loops) if looped else "fixed"),
        ("schedule.n_loops", T),
        # One hop needs one loop: the lookup stage samples cheap shallow depths.
        ("schedule.min_loops", 1 if stage == "lookup" else T),
        ("schedule.max_loops", max(1, T - 1) if stage == "lookup" else 2 * T),
        ("run.out", str(out / stage)), ("run.steps", steps), ("run.seed", args.seed),
        ("run.device", "cpu"), ("run.eval_every", 0), ("run.save_every", steps),
        ("run.log_every", max(1, min(10, steps // 20))), ("run.progress", False),
        *STAGES[stage].items(),
    ]
    if stage == "chain" and args.lookup_steps:
        pairs.append(("run.init_from", str(out / "lookup")))
    pairs.append(("run.compile", compile_choice(args.compile, args.quick)[0]))
    pairs += [parse_override(text) for text in args.overrides]
    if not looped:
        pairs.append(("model.core_layers", T))
    return load_config(None, pairs)


def training_loops(args: argparse.Namespace) -> str:
    """The looped model's loop counts in the final stage, in words for the outputs: with
    ``--loops uniform`` it also trains deeper than ``T_train`` (the baseline's depth)."""
    final = stages(args)[-1]
    sched = train_config(args, Path(args.out) / "looped", "looped", final).schedule
    if sched.loops.value == "fixed":
        return f"trained at {sched.n_loops} loops"
    how = {"uniform": "sampled uniformly", "sampled": "Poisson-lognormal",
           "curriculum": "a curriculum"}.get(sched.loops.value, sched.loops.value)
    return (f"trained with {sched.min_loops}-{sched.max_loops} loops per step, {how}, in its "
            f"{final} stage")


def compile_choice(choice: str, quick: bool) -> tuple[bool, str]:
    """Whether the demo compiles its training (``run.compile``), and why, for the header.

    Compiled, the demo's two models train ~1.3x faster after ~5 s of compilation per
    process with inductor's kernels cached from an earlier run, ~40 s on a fresh machine
    (docs/depth_extrapolation.md has the wall times). Inductor builds C++ kernels
    on the CPU, so ``auto`` compiles only when a C++ compiler is on the PATH, and not for a
    ``--quick`` run, whose few steps would not repay the compilation.
    """
    if choice != "auto":
        return choice == "on", choice
    if quick:
        return False, "off (--quick: compiling would take longer than the run)"
    from ..devices import cpp_compiler

    compiler = cpp_compiler()
    if compiler is None:
        return False, "off (no C++ compiler on the PATH for inductor)"
    return True, f"on (inductor with {compiler})"


def stages(args: argparse.Namespace) -> list[str]:
    """The stages this run trains (``--lookup-steps 0`` skips the lookup stage)."""
    return ["lookup", "chain"] if args.lookup_steps else ["chain"]


def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """Stop this worker process when the process that started it is gone (killed
    demo: no orphaned training left running)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _train_worker(args: argparse.Namespace, out: str, kind: str, threads: int,
                  parent: int | None = None) -> float:
    """Train one model through every stage in this process on ``threads`` threads (logs in
    each stage's ``train.log``); return seconds. With ``parent`` (a pid), exit when that
    process dies."""
    import torch

    from ..training import Trainer

    if parent is not None:
        _exit_with_parent(parent)
    torch.set_num_threads(threads)
    path = Path(out)
    if path.exists():
        shutil.rmtree(path)  # a demo always starts fresh
    start = time.perf_counter()
    for stage in stages(args):
        (path / stage).mkdir(parents=True)
        with open(path / stage / "train.log", "w") as log:
            stderr, sys.stderr = sys.stderr, log
            try:
                Trainer(train_config(args, path, kind, stage)).train()
            finally:
                sys.stderr = stderr
    return time.perf_counter() - start


def _progress(run: Path, args: argparse.Namespace) -> tuple[int, float | None]:
    """Steps done over all stages of one model's run, and the latest loss."""
    done, loss = 0, None
    for stage in stages(args):
        step, stage_loss = _last_step(run / stage / "metrics.jsonl")
        done += step
        loss = stage_loss if stage_loss is not None else loss
    return done, loss


def _last_step(metrics: Path, tail: int = 8192) -> tuple[int, float | None]:
    """Latest ``(step, loss)`` logged in a ``metrics.jsonl`` (``(0, None)`` before any).
    Reads the last ``tail`` bytes only: the file grows by a row per step and is polled
    twice a second while both cores train."""
    try:
        with open(metrics, "rb") as fh:
            offset = max(0, fh.seek(0, os.SEEK_END) - tail)
            fh.seek(offset)
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return 0, None
    if offset:
        lines = lines[1:]  # the tail starts inside a row
    for line in reversed(lines):
        try:
            row = json.loads(line)
            return int(row["step"]), row.get("loss")
        except (ValueError, KeyError):
            continue
    return 0, None


@contextlib.contextmanager
def worker_pool(jobs: int) -> Iterator[Any]:
    """Two spawned worker processes (a forked child can inherit a held OpenMP lock) for
    ``jobs == 2``, shared by the training and the sweeps (torch is imported once); None
    for ``jobs == 1``."""
    if jobs < 2:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def train_both(args: argparse.Namespace, out: Path, pool: Any = None) -> dict[str, float]:
    """Train the looped model and the baseline; return training seconds per model.

    With a ``pool`` (:func:`worker_pool`) each model trains in its own worker on one
    thread, and this process draws one progress bar per model from their
    ``metrics.jsonl``; without one, each model trains in turn in this process on two.

    A model's thread count is fixed for its whole run: its arithmetic depends on it
    (parallel reductions split their sums differently; weights trained 30 steps differ in
    their last bits when the count changed at step 10 or 20), so a count that changed with
    the clock would make the tables depend on the machine's speed. Until 2026-12-06 the
    model that finished first handed its core to the other at a step set by the clock
    (about 6% of the wall clock faster); running the looped model on two threads beside
    the baseline's one instead made its steps 2.3x slower in the demo's workers
    (``docs/depth_extrapolation.md``, "One thread per model").
    """
    from tqdm.auto import tqdm

    if pool is None:
        seconds = {}
        for kind in KINDS:
            print(f"-- training the {kind} model", flush=True)
            seconds[kind] = _train_worker(args, str(out / kind), kind, min(2, os.cpu_count() or 1))
        return seconds

    for kind in KINDS:
        if (out / kind).exists():  # an earlier demo's metrics would pass for progress
            shutil.rmtree(out / kind)
    total = args.steps + (args.lookup_steps or 0)
    bars = {k: tqdm(total=total, desc=f"train {k:<8}", unit="step", position=i,
                    dynamic_ncols=True, file=sys.stderr) for i, k in enumerate(KINDS)}
    futures = {k: pool.submit(_train_worker, args, str(out / k), k, 1, os.getpid())
               for k in KINDS}
    while not all(f.done() for f in futures.values()):
        time.sleep(0.5)
        for kind, bar in bars.items():
            step, loss = _progress(out / kind, args)
            if step > bar.n:  # a poll between a row's bytes finds none: never go back
                bar.update(step - bar.n)
            if loss is not None:
                bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
    seconds = {k: f.result() for k, f in futures.items()}  # re-raises a worker's error
    for bar in bars.values():
        bar.update(total - bar.n)
        bar.close()
    return seconds


# Reporting --------------------------------------------------------------------------------


#: What a demo writes in ``--out`` besides the runs (removed when a demo starts).
OUTPUTS = ("demo.md", "sweep.json", "sweep_exit_rule.json", "report")

#: Written into ``--out`` by every demo: a directory holding it (or an earlier demo's
#: ``demo.md``) is one the demo may clear; any other non-empty one is refused.
MARKER = ".openmythos-demo"


def check_demo_out(out: Path) -> None:
    """Refuse an ``--out`` that holds files some demo did not write: the demo deletes its
    runs and outputs there before it starts (``report/`` and ``looped/`` of another
    project went without a word).

    Raises:
        ValueError: naming a few of the entries found.
    """
    from .argtypes import check_output_dir

    check_output_dir(out)
    if not out.is_dir() or (out / MARKER).is_file():
        return
    entries = sorted(p.name for p in out.iterdir())
    summary = out / "demo.md"
    earlier = summary.is_file() and summary.read_text(errors="replace").startswith(
        "# openmythos demo\n")  # a demo's, written before the marker existed
    if entries and not earlier:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(
            f"--out {out} holds files a demo did not write ({shown}); the demo replaces "
            f"{', '.join(KINDS)}, {', '.join(OUTPUTS)} in its directory: give a new or empty "
            "one, or an earlier demo's")

#: The demo's budget on 2 CPU cores (the depth issue's target), in seconds.
TIME_BUDGET_S = 300


#: Answer cross-entropy below which a stage's task counts as learned (the lookup stage's
#: "guess a digit from the prompt" plateau is about 0.65; docs/depth_extrapolation.md).
LEARNED_CE = 0.1


def training_summary(out: Path, args: argparse.Namespace, last: int = 50) -> list[str]:
    """One line per model and stage: the answer cross-entropy at the end of the stage (mean
    of the last ``last`` logged steps of its ``metrics.jsonl``), and whether it is below
    :data:`LEARNED_CE`; for a lookup stage that is not, what to try."""
    lines = []
    for kind in KINDS:
        for stage in stages(args):
            rows = []
            try:
                for line in (out / kind / stage / "metrics.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    if row.get("ce") is not None:
                        rows.append(row["ce"])
            except (OSError, ValueError):
                continue
            if not rows:
                continue
            ce = sum(rows[-last:]) / len(rows[-last:])
            verdict = "learned" if ce < LEARNED_CE else "not learned"
            line = (f"{kind}, {stage} stage: answer cross-entropy {ce:.3f} at the end "
                    f"({verdict}; the threshold is {LEARNED_CE})")
            if stage == "lookup" and ce >= LEARNED_CE and kind == "looped":
                line += ("; the chain stage then has to learn the lookup too, which has cost "
                         "depth extrapolation (without the token convolution, seed 2 "
                         "missed the target so): try more --lookup-steps or another --seed "
                         "(docs/depth_extrapolation.md)")
            lines.append(line)
    return lines


def _mark(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _hold_mark(reference: float, ok: bool) -> str:
    """The mark of a check that accuracy *holds* past a depth: vacuous, and so not MET,
    when there was no accuracy to hold (a model at 0% everywhere keeps its 0%)."""
    if not reference > 0:
        return "n/a (no accuracy to hold)"
    return _mark(ok)


def check_targets(rows: Sequence[Any], base_rows: Sequence[Any], train_loops: int
                  ) -> tuple[bool, list[str]]:
    """``(met, lines)``: the demo's target and the other depth checks, one line each ending
    in MET / NOT MET. The target (``met``): on every out-of-distribution split, the best
    depth above ``T_train`` beats both ``T_train`` and the baseline by 10 points or more.
    Also measured: in-distribution accuracy at ``T_train`` and its drop at 2x and 4x.

    The margin over the baseline carries its sampling error: the 95% interval of the
    difference of two accuracies (:func:`~open_mythos.evaluation.report.difference_interval`),
    which treats the two samples as independent. Both models answer the same seeded
    examples, so where their errors are positively correlated the paired interval would be
    narrower (this one is conservative); and the best depth is the best of several measured
    on those examples, a selection the interval does not account for."""
    from ..evaluation.report import difference_interval

    acc = {(r.split, r.n_loops): r.accuracy for r in rows if not r.early_exit}
    count = {(r.split, r.n_loops): r.n_examples for r in rows if not r.early_exit}
    base = {r.split: r.accuracy for r in base_rows}
    base_n = {r.split: r.n_examples for r in base_rows}
    T = train_loops
    target, also = [], []
    met = True
    for split in sorted({s for s, _ in acc if s.startswith("ood")}):
        deeper = [n for (s, n) in acc if s == split and n > T]
        if not deeper:
            continue
        best = max(deeper, key=lambda n: (acc[(split, n)], -n))
        gain_t = acc[(split, best)] - acc.get((split, T), float("nan"))
        gain_b = acc[(split, best)] - base.get(split, float("nan"))
        ok = gain_t >= 0.10 and gain_b >= 0.10
        met = met and ok
        if split in base:
            lo, hi = difference_interval(acc[(split, best)], count[(split, best)],
                                         base[split], base_n[split])
            interval = f" (95% interval {100 * lo:+.1f} to {100 * hi:+.1f})"
        else:
            interval = ""
        target.append(f"{split}: best depth above T_train is {best} loops, {acc[(split, best)]:.1%}: "
                      f"{100 * gain_t:+.1f} points over T_train and {100 * gain_b:+.1f}"
                      f"{interval} over the baseline (target +10 over both) {_mark(ok)}")
    at_t = acc.get(("id", T), float("nan"))
    also.append(f"in-distribution accuracy at T_train={T}: {at_t:.1%} (target >= 99%) "
                f"{_mark(at_t >= 0.99)}")
    for mult in (2, 4):
        if ("id", mult * T) in acc:
            drop = at_t - acc[("id", mult * T)]
            also.append(f"in-distribution at {mult}x T_train ({mult * T} loops): "
                        f"{acc[('id', mult * T)]:.1%}, {100 * drop:.1f} points below T_train "
                        f"(target <= 1 point) {_hold_mark(at_t, drop <= 0.01)}")
    return bool(target) and met, target + [f"also measured: {line}" for line in also]


def exit_rule_checks(exit_rows: Sequence[Any], rows: Sequence[Any], train_loops: int
                     ) -> list[str]:
    """With the exit rule: does accuracy hold at depths past the best (in distribution at
    4x ``T_train`` within 1 point of ``T_train`` without the rule; out of distribution at
    twice the rule's best depth within 5 points of that best)?"""
    plain = {(r.split, r.n_loops): r.accuracy for r in rows if not r.early_exit}
    acc = {(r.split, r.n_loops): r.accuracy for r in exit_rows}
    T, lines = train_loops, []
    at_t, deep = plain.get(("id", T), float("nan")), acc.get(("id", 4 * T), float("nan"))
    lines.append(f"with the exit rule, in-distribution at 4x T_train ({4 * T} loops): "
                 f"{deep:.1%}, {100 * (at_t - deep):.1f} points below T_train without it "
                 f"(target <= 1 point) {_hold_mark(at_t, at_t - deep <= 0.01)}")
    for split in sorted({s for s, _ in acc if s.startswith("ood")}):
        depths = sorted(n for s, n in acc if s == split)
        best = max(depths, key=lambda n: (acc[(split, n)], -n))
        if (split, 2 * best) in acc:
            drop = acc[(split, best)] - acc[(split, 2 * best)]
            lines.append(f"with the exit rule, {split} at 2x its best depth ({2 * best} loops): "
                         f"{acc[(split, 2 * best)]:.1%}, {100 * drop:.1f} points below the best "
                         f"({best} loops, {acc[(split, best)]:.1%}; target <= 5 points) "
                         f"{_hold_mark(acc[(split, best)], drop <= 0.05)}")
    return lines


def exit_rule_work(model: Any, task: Any, rule: Any, n_loops: int, n_examples: int,
                   seed: int) -> list[str]:
    """The exit rule's effect at ``n_loops``, per split, over ``n_examples`` greedy answers
    decoded with early exit (a sequence stops computing once all its positions exited):
    the loop at which positions settled on average (the prompt's tokens and the answer's:
    :attr:`~open_mythos.evaluation.Decoded.per_position`; a settled position is frozen,
    but computed until its whole sequence has settled) and the share of the looped block's
    ``n_loops`` work that ran, over the prefill and every decoding step, each forward
    weighted by its positions."""
    from ..evaluation import greedy_decode, sample_examples
    from ..evaluation.sweep import eval_splits
    from ..tasks import encode_prompt

    lines = []
    for split in eval_splits(task, model.cfg.max_seq_len):
        examples = sample_examples(task, split, n_examples, seed)
        budget = max(len(ex.answer) for ex in examples) + 1
        out = greedy_decode(model, [ex.prompt for ex in examples], n_loops, budget,
                            early_exit=True, exit_rule=rule)
        # The prefill runs the left-padded prompts (BOS + the longest prompt), then one
        # position per sequence per decoding step.
        prompt = max(encode_prompt(ex.prompt).numel() for ex in examples)
        widths = [prompt] + [1] * (len(out.loops_computed) - 1)
        share = (sum(c * w for c, w in zip(out.loops_computed, widths))
                 / (n_loops * sum(widths)))
        lines.append(f"with the exit rule at {n_loops} loops, {split}: positions settled after "
                     f"{out.per_position:.1f} loops on average (prompt and answer tokens); the "
                     f"looped block ran {share:.0%} of its {n_loops}-loop work (prefill and "
                     f"decoding, {n_examples} examples)")
    return lines


def sample_answers(models: dict[str, Any], task: Any, depths: Sequence[int], seed: int) -> str:
    """A Markdown table: one prompt per difficulty level, greedy answers at several depths."""
    from ..evaluation import greedy_answers
    from ..evaluation.report import markdown_table

    rng = random.Random(f"demo/{seed}/samples")
    levels = sorted({lvl for split in task.splits
                     for lvl in range(task.level_range(split)[0], task.level_range(split)[1] + 1)})
    examples = [task.generate_at(rng, lvl) for lvl in levels]
    prompts = [e.prompt for e in examples]
    budget = max(len(e.answer) for e in examples) + 1
    answers = {n: greedy_answers(models["looped"], prompts, n, budget, early_exit=False)[0]
               for n in depths}
    base = greedy_answers(models["baseline"], prompts, 1, budget)[0]

    def cell(answer: str, truth: str) -> str:
        return f"{answer or '(none)'} {'ok' if answer == truth else 'x'}"

    rows = [[e.prompt, lvl, e.answer, *(cell(answers[n][i], e.answer) for n in depths),
             cell(base[i], e.answer)] for i, (e, lvl) in enumerate(zip(examples, levels))]
    headers = ["prompt", task.level_name, "answer", *(f"{n} loops" for n in depths), "baseline"]
    return markdown_table(headers, rows)


# Command ----------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> str | None:
    for name in ("steps", "batch_size", "train_loops", "n_examples"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.lookup_steps < 0:
        return "--lookup-steps must be >= 0"
    if not args.loop_loss >= 0:
        return "--loop-loss must be >= 0"
    try:
        task_args = json.loads(args.task_args)
    except json.JSONDecodeError as err:
        return f"--task-args is not valid JSON: {err}"
    if not isinstance(task_args, dict):
        return "--task-args must be a JSON object"
    from ..devices import resolve_device
    from ..tasks import get_task
    from ..training import ConfigError
    from ..training.config import parse_override
    from ..training.trainer import open_data
    try:
        check_demo_out(Path(args.out))
        get_task("multihop", **task_args)  # before the lookup stage's knobs are derived
        for text in args.overrides:
            key = parse_override(text)[0]
            managed = next((k for k in MANAGED_KEYS if key == k or key.startswith(k + ".")),
                           None)
            if managed is not None:
                return (f"--set {text}: the demo sets {managed} itself from its flags (and "
                        f"reports it): use {MANAGED_KEYS[managed]}")
        for kind in KINDS:  # every override must be valid for both models and stages
            for stage in stages(args):
                cfg = train_config(args, Path(args.out) / kind, kind, stage)
                open_data(cfg)  # what training opens first: task, context length
                resolve_device(cfg.run.device)
    except (ConfigError, ValueError, TypeError) as err:
        return str(err)
    return None


class _Default(int):
    """A size option's default, told apart from the same number given on the command line
    (which ``--quick`` must keep: a value equal to the default was taken as not given)."""


#: The sizes of a ``--quick`` run; an option given explicitly wins (even at its default).
QUICK: dict[str, int] = {"steps": 12, "lookup_steps": 6, "n_examples": 16, "batch_size": 16}


def run(args: argparse.Namespace) -> int:
    """Train, sweep, report, print. Exit status 0, or 2 for invalid arguments."""
    for name, value in QUICK.items():
        given = getattr(args, name)
        # Not given on the command line: --quick's size; then a plain int either way.
        setattr(args, name, value if args.quick and isinstance(given, _Default) else int(given))
    problem = _check_args(args)
    if problem:
        print(f"openmythos demo: error: {problem}", file=sys.stderr)
        return 2
    import torch

    from ..tasks import get_task

    try:
        task = get_task("multihop", **json.loads(args.task_args))
    except (KeyError, TypeError, ValueError) as err:
        print(f"openmythos demo: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        return _run(args, task, start)
    except BrokenPipeError:  # the reader went away (| head): the CLI ends quietly
        raise
    except OSError as err:  # a full disk, a directory in a file's way
        print(f"openmythos demo: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # as the caller had it (run in-process by tests)


def _run(args: argparse.Namespace, task: Any, start: float) -> int:
    """:func:`run` after its checks: train, sweep, report, print."""
    from ..training import ConfigError, load_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by openmythos demo: it may replace the runs and "
                              "outputs in this directory\n")
    for name in OUTPUTS:  # an earlier demo's results must not pass for this one's
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    jobs = args.jobs or (2 if (os.cpu_count() or 1) >= 2 else 1)
    _print_banner(args, task, jobs)
    with worker_pool(jobs) as pool:
        try:
            seconds = train_both(args, out, pool)
        except ConfigError as err:  # what the checks above could not see (a worker's data...)
            print(f"openmythos demo: error: {err}", file=sys.stderr)
            return 2
        final = stages(args)[-1]
        models = {kind: load_checkpoint(out / kind / final)[0].eval() for kind in KINDS}
        train_s = time.perf_counter() - start
        met = _evaluate(args, task, models, out, final, training_summary(out, args), pool)
    wall = time.perf_counter() - start
    print(f"wall clock {wall:.1f} s (training {train_s:.0f} s: looped {seconds['looped']:.0f} s, "
          f"baseline {seconds['baseline']:.0f} s)")
    print(f"demo: more loops beat T_train and the baseline by 10+ points out of distribution "
          f"{_mark(met)}; within {TIME_BUDGET_S} s {_mark(wall <= TIME_BUDGET_S)}")
    return 0


def _print_banner(args: argparse.Namespace, task: Any, jobs: int) -> None:
    ranges = ", ".join(f"{s} {task.level_range(s)[0]}-{task.level_range(s)[1]}"
                       for s in task.splits if s != "train")
    steps = " + ".join(f"{getattr(args, 'lookup_steps' if s == 'lookup' else 'steps')} {s}"
                       for s in stages(args))
    print(f"== OpenMythos demo: multihop ({task.level_name}: {ranges}), T_train={args.train_loops} "
          f"(the looped model {training_loops(args)}; the baseline has {args.train_loops} "
          f"blocks), {steps} steps x {args.batch_size} examples per model, {jobs} process(es), "
          f"compile {compile_choice(args.compile, args.quick)[1]} ==", flush=True)


def _sweep_worker(checkpoint: str, task_args: str, loops: list[int], n_examples: int,
                  seed: int, exit_rule: dict[str, int] | None = None,
                  splits: list[str] | None = None) -> list[Any]:
    """The demo's depth sweep of the looped model at ``checkpoint`` (on ``splits``, default
    all), in a worker of :func:`worker_pool` (one thread), with the exit rule
    ``ExitRule(**exit_rule)`` if given."""
    import torch

    from ..evaluation import sweep
    from ..layers.recurrence import ExitRule
    from ..tasks import get_task
    from ..training import load_checkpoint

    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint)[0].eval()
    task = get_task("multihop", **json.loads(task_args))
    rule = None if exit_rule is None else ExitRule(**exit_rule)
    return sweep(model, task, splits=splits, loops=loops, n_examples=n_examples,
                 early_exit=(False,), seed=seed, exit_rule=rule)


def _evaluate(args: argparse.Namespace, task: Any, models: dict[str, Any], out: Path,
              final: str, training: Sequence[str] = (), pool: Any = None) -> bool:
    """Sweep both models, write the sweep, report and summary, print the training summary
    (``training``: :func:`training_summary`), the table, the targets and sample answers;
    returns whether the demo's target is met. With a ``pool`` (:func:`worker_pool`) the
    looped model's two sweeps (without and with the exit rule) run in its two workers
    while this process sweeps the baseline and writes the report."""
    import torch

    from ..evaluation import save_rows, sweep, write_report
    from ..evaluation.report import accuracy_pivot
    from ..evaluation.sweep import fitting_splits
    from ..layers.recurrence import ExitRule

    T = args.train_loops
    loops = list(range(1, 4 * T + 1))
    looped_args = (str(out / "looped" / final), args.task_args, loops, args.n_examples,
                   args.seed)
    rule = ExitRule(**DEMO_EXIT_RULE_ARGS)
    threads = torch.get_num_threads()
    try:
        if pool is not None:  # the pool's sweeps read the trained looped model's checkpoint
            # One job per sweep and split, so that the two workers finish together; the
            # plain ones first: the report, written here meanwhile, needs their rows.
            splits = fitting_splits(task, models["looped"].cfg.max_seq_len)
            jobs = {(with_rule, split): pool.submit(
                        _sweep_worker, *looped_args, DEMO_EXIT_RULE_ARGS if with_rule else None,
                        [split])
                    for with_rule in (False, True) for split in splits}
            torch.set_num_threads(1)  # the workers have a core each, until their sweeps end
        base_rows = sweep(models["baseline"], task, n_examples=args.n_examples,
                          early_exit=(False,), seed=args.seed)
        rows = ([r for split in splits for r in jobs[False, split].result()]
                if pool is not None
                else sweep(models["looped"], task, loops=loops, n_examples=args.n_examples,
                           early_exit=(False,), seed=args.seed))
        save_rows([*rows, *base_rows], out / "sweep.json")
        report = write_report(out / "looped" / final, out / "report", rows, base_rows,
                              model=models["looped"], baseline=models["baseline"], task=task,
                              train_loops=T, seed=args.seed)
        exit_rows = ([r for split in splits for r in jobs[True, split].result()]
                     if pool is not None
                     else sweep(models["looped"], task, loops=loops, n_examples=args.n_examples,
                                early_exit=(False,), seed=args.seed, exit_rule=rule))
        # On the sweeps' thread count (one with the workers): a rule's decisions flip with
        # the last bits, which depend on it (and, with several threads, on the machine's load).
        work = exit_rule_work(models["looped"], task, rule, 4 * T, min(args.n_examples, 128),
                              args.seed)
    finally:
        torch.set_num_threads(threads)
    table = accuracy_pivot(rows, base_rows)
    save_rows(exit_rows, out / "sweep_exit_rule.json")
    exit_table = accuracy_pivot(exit_rows)
    met, targets = check_targets(rows, base_rows, T)
    targets += [f"also measured: {line}" for line in exit_rule_checks(exit_rows, rows, T)]
    targets += [f"also measured: {line}" for line in work]
    samples = sample_answers(models, task, sorted({1, T, 2 * T, 4 * T}), args.seed)
    (out / "demo.md").write_text(
        f"# openmythos demo\n\nExact-match accuracy ({args.n_examples} examples per split) "
        f"against loops at inference; T_train = {T} (the looped model {training_loops(args)}; "
        f"the baseline has {T} core blocks).\n\n{table}\n\n"
        f"With the exit rule {rule}:\n\n{exit_table}\n\n## Targets\n\n"
        + "\n".join(f"- {line}" for line in targets) + f"\n\n## Sample answers\n\n{samples}\n"
        + ("\n## Training\n\n" + "\n".join(f"- {line}" for line in training) + "\n"
           if training else ""))
    if training:
        print("\nTraining:")
        print("\n".join(f"  - {line}" for line in training))
    print(f"\nExact-match accuracy against loops at inference ({args.n_examples} examples per "
          f"split; T_train = {T}, the looped model {training_loops(args)}; last row: the "
          f"dense baseline of {T} core blocks):\n")
    print(table)
    print(f"\nThe same sweep with a training-free exit rule ({rule}: a position stops "
          "looping once its answer has settled):\n")
    print(exit_table)
    print("\nTargets:")
    print("\n".join(f"  - {line}" for line in targets))
    print("\nGreedy answers:\n")
    print(samples)
    print(f"\nreport: {report}   sweep: {out / 'sweep.json'}   summary: {out / 'demo.md'}")
    return met
