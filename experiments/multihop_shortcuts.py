"""How far rules that never follow a chain get on ``multihop`` splits.

    python experiments/multihop_shortcuts.py
    python experiments/multihop_shortcuts.py --task-args '{"hops": [1, 3], "ood_hops": [4, 6],
        "statements": 8, "digits": 3}' --splits id,ood_hops,hops=6
    python experiments/multihop_shortcuts.py --task-args '{"hops": [1, 3], "ood_hops": [4, 6],
        "statements": 12, "open_ends": 0.5, "decoys": true}'     # decoy chains

A split measures chain following only as far as no cheaper rule answers it. For the
evaluation examples of each split (``sample_examples``, the sweep's and the demo's own draw)
this prints the expected accuracy of two rules, ties broken uniformly:

- ``guess``: a digit of the prompt (with ``open_ends``: any value the prompt's assignments
  point to that is a digit or a variable no assignment defines);
- ``referenced``: an open end if the prompt has one; otherwise the digit whose variable is
  the query or is pointed to by some assignment. The chain's last variable always is
  (by the chain's previous step), a distractor holding a digit only when a later
  distractor happens to point to it; one look-up, whatever the chain's length. With
  ``decoys`` every chain's end is referenced alike, and the rule picks among them.

The defaults are the demo's task (``open_mythos.commands.demo.DEFAULT_TASK_ARGS``) and
512 examples per split, as the demo evaluates.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from open_mythos.commands.argtypes import positive_int
from open_mythos.commands.demo import DEFAULT_TASK_ARGS
from open_mythos.evaluation.sweep import sample_examples
from open_mythos.tasks import get_task


def assignments(task, prompt: str) -> tuple[dict[str, str], str]:
    """The prompt's ``{variable: value}`` table and its query."""
    body, _, query = prompt.partition("?")
    sep = task.separator
    stmts = body.split(sep) if sep else [body[i:i + 3] for i in range(0, len(body), 3)]
    return {s[0]: s[2] for s in stmts}, query


def guess(table: dict[str, str], query: str) -> set[str]:
    pointed = set(table.values())
    return {v for v in pointed if v.isdigit() or v not in table}


def referenced(table: dict[str, str], query: str) -> set[str]:
    pointed = set(table.values())
    open_ends = {v for v in pointed if not v.isdigit() and v not in table}
    if open_ends:
        return open_ends
    hits = {d for x, d in table.items() if d.isdigit() and (x == query or x in pointed)}
    return hits or {d for d in pointed if d.isdigit()}


RULES = {"guess": guess, "referenced": referenced}


def rule_accuracy(task, split: str, n: int, seed: int) -> dict[str, float]:
    """Expected accuracy of every rule on ``n`` examples of ``split``."""
    examples = sample_examples(task, split, n, seed=seed)
    out = {}
    for name, rule in RULES.items():
        total = 0.0
        for ex in examples:
            answers = rule(*assignments(task, ex.prompt))
            total += (ex.answer in answers) / len(answers)
        out[name] = total / len(examples)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task-args", type=json.loads, default=DEFAULT_TASK_ARGS,
                        help="multihop's knobs as JSON (default: the demo's)")
    parser.add_argument("--splits", default="id,ood_hops",
                        help="comma-separated splits, e.g. id,ood_hops,hops=6")
    parser.add_argument("--n-examples", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not isinstance(args.task_args, dict):
        parser.error("--task-args must be a JSON object")
    try:  # every split drawn once before the table starts
        task = get_task("multihop", **args.task_args)
        for split in args.splits.split(","):
            sample_examples(task, split, 1, seed=args.seed)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    print(f"multihop {json.dumps(args.task_args)}, {args.n_examples} examples per split, "
          f"seed {args.seed}")
    print("| split | " + " | ".join(RULES) + " |")
    print("|---|" + "---|" * len(RULES))
    for split in args.splits.split(","):
        acc = rule_accuracy(task, split, args.n_examples, args.seed)
        print(f"| {split} | " + " | ".join(f"{acc[r]:.3f}" for r in RULES) + " |")


if __name__ == "__main__":
    main()
