"""Where a looped model leaves the chain: the first loop whose readout misses its step.

    python experiments/trace_errors.py --checkpoint demo_out/looped/chain
    python experiments/trace_errors.py --checkpoint RUN --levels 3-6 --loops 8 --lens coda

For a task solved by repeating one step (``Task.trace``: ``multihop``, ``phop``), a model
trained with per-loop targets (``optim.loop_targets``) should name the value reached after
``t`` steps at loop ``t``. For each level (hop count) this reads every loop's state at the
position that predicts the answer (the head lens by default, what ``optim.loop_readout =
"head"`` trains) and prints:

- the accuracy of the answer read at each loop count from the level to ``--loops``;
- how many examples follow the trace exactly through the level (loop ``t`` names step ``t``
  for every ``t`` up to the level);
- for the others, the first loop that names something else, and what it names:

  ``stall``  the previous step again (the query itself at loop 1);
  ``ahead``  a later intermediate step of the same chain: steps skipped;
  ``answer`` the chain's answer, steps early;
  ``prompt`` some other value that occurs in the prompt;
  ``other``  anything else.

Examples of one level are generated from ``--seed`` (the task's own generator, so the
splits' ranges do not limit ``--levels``) and read out in batches of equal prompt length.
``--out FILE`` writes the counts as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from open_mythos.commands.argtypes import loop_count, loop_counts, output_file, positive_int
from open_mythos.registry import is_looped
from open_mythos.tasks import get_task
from open_mythos.tasks.batching import encode_prompt

KINDS = ("stall", "ahead", "answer", "prompt", "other")


@dataclass
class LevelErrors:
    """The counts of one level over ``n`` examples (see the module docstring)."""

    level: int
    n: int
    accuracy: dict[int, float]  # loops -> answer accuracy read at that loop
    exact: int  # examples whose loops 1..level name steps 1..level
    first_wrong: dict[int, int] = field(default_factory=dict)  # loop -> examples
    kinds: dict[str, int] = field(default_factory=dict)  # KINDS -> examples


def classify(query: str, trace: Sequence[str], named: Sequence[str], prompt: str
             ) -> tuple[int, str] | None:
    """The first loop (1-based) whose readout ``named[t - 1]`` is not ``trace[t - 1]``, and
    what it names (one of :data:`KINDS`); None when loops 1..len(trace) all match.

    ``query``: the value the chain starts from (what "the previous step" is at loop 1).
    """
    for t, (want, got) in enumerate(zip(trace, named), start=1):
        if got == want:
            continue
        previous = query if t == 1 else trace[t - 2]
        if got == previous:
            return t, "stall"
        if got == trace[-1]:
            return t, "answer"
        if got in trace[t:]:
            return t, "ahead"
        if got in prompt:
            return t, "prompt"
        return t, "other"
    if len(named) < len(trace):
        raise ValueError(f"{len(named)} readouts cannot check a trace of {len(trace)} steps")
    return None


def _query(prompt: str) -> str:
    """The value a chain starts from: the first character after ``?`` (multihop, phop)."""
    return prompt.rpartition("?")[2][:1]


def named_per_loop(model: torch.nn.Module, prompts: Sequence[str], n_loops: int,
                   lens: str = "head", batch_size: int = 256) -> list[list[str]]:
    """What each loop ``1..n_loops`` names at the position after each prompt (the argmax of
    its readout, as a character; U+FFFD for a special token), from one forward per batch
    of prompts of equal length."""
    named: list[list[str]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = collections.defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_len[len(prompt)].append(i)
    with torch.no_grad():
        for rows in by_len.values():
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                ids = torch.stack([encode_prompt(prompts[i]) for i in part])
                out = model.readout(ids, n_loops=n_loops, lens=lens)
                for d in range(1, n_loops + 1):
                    top = out.depth_logits[d][:, -1].argmax(-1).tolist()
                    for i, token in zip(part, top):
                        named[i].append(chr(token) if token < 128 else "\ufffd")
    return named


def level_errors(model: torch.nn.Module, task: Any, level: int, n_loops: int, n_examples: int,
                 seed: int, lens: str = "head", batch_size: int = 256) -> LevelErrors:
    """Generate ``n_examples`` chains of ``level`` steps and count where each leaves its
    trace over ``max(level, n_loops)`` loops (see the module docstring)."""
    rng = random.Random(f"{seed}:{level}")
    examples = [task.generate_at(rng, level) for _ in range(n_examples)]
    loops = max(level, n_loops)
    named = named_per_loop(model, [ex.prompt for ex in examples], loops, lens, batch_size)
    result = LevelErrors(level, n_examples,
                         {d: sum(named[i][d - 1] == ex.answer for i, ex in enumerate(examples))
                          / n_examples for d in range(level, loops + 1)}, exact=0)
    first: collections.Counter[int] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    for ex, names in zip(examples, named):
        trace = task.trace(ex.prompt)
        miss = classify(_query(ex.prompt), trace, names, ex.prompt)
        if miss is None:
            result.exact += 1
        else:
            first[miss[0]] += 1
            kinds[miss[1]] += 1
    result.first_wrong = dict(sorted(first.items()))
    result.kinds = {k: kinds[k] for k in KINDS}
    return result


def table(results: Sequence[LevelErrors], n_loops: int) -> str:
    """The printed table: one row per level."""
    first_loops = range(1, max([n_loops, *(r.level for r in results)]) + 1)
    # A level above --loops runs as many loops as its hops: its row reads the answer there.
    head = (["level", "answer at level", f"answer at max(level, {n_loops})", "exact"]
            + [f"first wrong at {t}" for t in first_loops] + list(KINDS))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r.level), f"{r.accuracy[r.level]:.3f}",
                 f"{r.accuracy[max(r.level, n_loops)]:.3f}", f"{r.exact}/{r.n}"]
        cells += [str(r.first_wrong.get(t, 0)) for t in first_loops]
        cells += [str(r.kinds[k]) for k in KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoint")
    p.add_argument("--task-args", default=None, metavar="JSON",
                   help="task knobs replacing the run's own (data.task_args), e.g. "
                        "'{\"statements\": 12}'")
    p.add_argument("--levels", type=loop_counts, default=[3, 4, 5, 6],
                   help="levels (hops) to read, e.g. 3-6 (default 3,4,5,6)")
    p.add_argument("--loops", type=loop_count, default=8,
                   help="loops to run (a level above it runs as many as its hops; "
                        "default 8)")
    p.add_argument("--n-examples", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lens", choices=("head", "coda"), default="head",
                   help="how a loop's state is read (default head: the logit lens)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", type=output_file, default=None, help="write the counts as JSON")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, for a task your own code registers (as "
                        "openmythos --import); the loop-1 'stall' reads the query after '?'")
    args = p.parse_args(argv)
    from open_mythos.cli import import_user_modules

    import_user_modules(p, args.imports)

    from open_mythos.checkpoints import detect_format, load_checkpoint
    from open_mythos.evaluation.runs import parse_task_args, read_train_config

    torch.set_num_threads(args.threads)
    try:
        detect_format(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"trace_errors: {err}", file=sys.stderr)
        return 2
    train_cfg = read_train_config(args.checkpoint)
    if train_cfg is None or train_cfg.data.task is None:
        print(f"trace_errors: {args.checkpoint} records no task", file=sys.stderr)
        return 2
    try:
        knobs = {**dict(train_cfg.data.task_args), **parse_task_args(args.task_args)}
        task = get_task(train_cfg.data.task, **knobs)
    except (TypeError, ValueError) as err:  # bad JSON, a knob the task does not take
        where = f"--task-args {args.task_args}: " if args.task_args else ""
        print(f"trace_errors: {where}{err} (a task of your own: --import MODULE)",
              file=sys.stderr)
        return 2
    if task.trace(task.generate(random.Random(0), "train").prompt) is None:
        print(f"trace_errors: task {task.name!r} defines no trace", file=sys.stderr)
        return 2
    model = load_checkpoint(args.checkpoint)[0].eval()
    if not is_looped(model):
        print(f"trace_errors: {args.checkpoint} holds a fixed-depth model "
              f"({type(model).__name__}): this reads the loops of a looped one", file=sys.stderr)
        return 2
    try:
        results = [level_errors(model, task, level, args.loops, args.n_examples, args.seed,
                                args.lens) for level in args.levels]
    except ValueError as err:  # a level the task cannot generate, a prompt too long
        print(f"trace_errors: {err}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {task.name} {json.dumps(knobs)}, {args.n_examples} examples "
          f"per level, {args.lens} lens, {args.loops} loops\n")
    print(table(results, args.loops))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint),
                                              "results": [asdict(r) for r in results]},
                                             indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
