"""``openmythos demo`` (what ``make demo`` runs): the depth-extrapolation lab in one command.

On 2 CPU cores in a few minutes it

1. trains a small looped model on an algorithmic task at ``T_train`` loops,
2. trains the FLOPs-matched plain transformer (:mod:`open_mythos.baseline`) on the same data
   for the same number of steps,
3. sweeps the looped model over 1 ... 4 x ``T_train`` loops on the in-distribution and the
   harder out-of-distribution split (the baseline has one depth),
4. writes the report (plots + ``report.md``) and prints the accuracy table,
5. answers a few prompts at a shallow and a deep loop count.

The recipe follows what users of the reference found at scale (ACT off, loop counts sampled
around ``T_train`` during training); see ``docs/depth_extrapolation.md`` for what is known to
work on small CPU budgets and what is not. Every knob is a flag.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

DEMO_MODEL: dict[str, Any] = dict(
    dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64, prelude_layers=1, coda_layers=1,
    attn_type="gqa", n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=32,
    lora_rank=4, use_act=False,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "demo", help="train a looped model and its baseline, sweep depth, write a report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory")
    p.add_argument("--task", default="multihop", help="task name (see openmythos train --help)")
    p.add_argument("--task-args", default="{}", metavar="JSON", help="task knobs, e.g. '{\"hops\": [1, 3]}'")
    p.add_argument("--train-loops", type=int, default=4, metavar="T", help="training depth T_train")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps for each model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-examples", type=int, default=128, help="examples per split in the sweep")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) to check the pipeline")
    p.set_defaults(func=run)
    return p


def _train_config(args: argparse.Namespace, out: Path, baseline: bool):
    from ..training import load_config

    T = args.train_loops
    pairs: list[tuple[str, Any]] = [(f"model.{k}", v) for k, v in DEMO_MODEL.items()]
    pairs += [
        ("model.max_loop_iters", T),
        ("data.task", args.task), ("data.task_args", json.loads(args.task_args)),
        ("data.batch_size", args.batch_size), ("data.eval_batches", 2),
        ("optim.lr", args.lr), ("optim.aux_weight", 0.01),
        ("schedule.warmup_steps", max(1, args.steps // 20)),
        # Loop counts sampled around T_train (mean T, within [1, 2T]): the model must work
        # at any depth, which is what lets it run deeper than it was trained.
        ("schedule.loops", "fixed" if baseline else "sampled"), ("schedule.n_loops", T),
        ("schedule.min_loops", 1), ("schedule.max_loops", 2 * T),
        ("run.out", str(out)), ("run.steps", args.steps), ("run.seed", args.seed),
        ("run.device", "cpu"), ("run.eval_every", 0), ("run.save_every", args.steps),
        ("run.log_every", max(1, args.steps // 50)),
    ]
    if baseline:
        pairs.append(("model.core_layers", T))
    return load_config(None, pairs)


def _train(args: argparse.Namespace, out: Path, baseline: bool):
    import shutil

    from ..training import Trainer, load_checkpoint

    if out.exists():
        shutil.rmtree(out)  # a demo always starts fresh
    Trainer(_train_config(args, out, baseline)).train()
    model, _ = load_checkpoint(out)
    return model


def _table(rows, base_rows, loops: list[int], train_loops: int) -> str:
    splits = sorted({r.split for r in rows}, key=lambda s: (s != "id", s))
    head = "| split | " + " | ".join(
        f"{n}{'*' if n == train_loops else ''}" for n in loops) + " | baseline |"
    lines = [head, "|" + "---|" * (len(loops) + 2)]
    for split in splits:
        acc = {r.n_loops: r.accuracy for r in rows if r.split == split and not r.early_exit}
        base = next((r.accuracy for r in base_rows if r.split == split), float("nan"))
        cells = " | ".join(f"{100 * acc[n]:.1f}" for n in loops)
        lines.append(f"| {split} | {cells} | {100 * base:.1f} |")
    return "\n".join(lines)


def _answers(model, task, loops: tuple[int, int], seed: int) -> list[str]:
    from ..evaluation import greedy_answers, sample_examples

    examples = sample_examples(task, task.splits[-1], 4, seed + 7)
    prompts = [e.prompt for e in examples]
    budget = max(len(e.answer) for e in examples) + 2
    shallow = greedy_answers(model, prompts, loops[0], budget)[0]
    deep = greedy_answers(model, prompts, loops[1], budget)[0]
    return [f"  {e.prompt!r:40} truth {e.answer!r:6} {loops[0]} loops -> {a!r:6} "
            f"{loops[1]} loops -> {b!r}" for e, a, b in zip(examples, shallow, deep)]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation import save_rows, sweep, write_report
    from ..tasks import get_task

    if args.quick:
        args.steps, args.n_examples, args.batch_size = 20, 16, 16
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    out = Path(args.out)
    T = args.train_loops
    task = get_task(args.task, **json.loads(args.task_args))
    print(f"== OpenMythos demo: task {args.task!r}, T_train={T}, {args.steps} steps per model ==")
    print("-- training the looped model (ACT off, loop counts sampled around T_train)")
    looped = _train(args, out / "looped", baseline=False)
    print("-- training the FLOPs-matched plain transformer (same data, same steps)")
    base = _train(args, out / "baseline", baseline=True)

    loops = sorted({1, 2, T // 2 or 1, T, T + T // 2, 2 * T, 3 * T, 4 * T})
    print(f"-- sweeping loops {loops}")
    random.seed(args.seed)
    rows = sweep(looped, task, loops=loops, n_examples=args.n_examples, early_exit=(False,),
                 seed=args.seed)
    base_rows = sweep(base, task, n_examples=args.n_examples, early_exit=(False,), seed=args.seed)
    save_rows([*rows, *base_rows], out / "sweep.json")
    report = write_report(out / "looped", out / "report", rows, base_rows, model=looped,
                          baseline=base, task=task, train_loops=T, seed=args.seed)

    print(f"\nAccuracy (%) by loops at inference; * = T_train; baseline: {T + 2}-layer plain "
          "transformer of equal FLOPs\n")
    print(_table(rows, base_rows, loops, T))
    print(f"\nAnswers on the {task.splits[-1]} split, shallow vs deep:")
    print("\n".join(_answers(looped, task, (1, 4 * T), args.seed)))
    print(f"\nreport: {report}   sweep: {out / 'sweep.json'}   "
          f"total {time.perf_counter() - start:.0f} s")
    return 0
