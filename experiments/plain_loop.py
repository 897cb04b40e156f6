"""Plain-loop benchmark: does a looped model use its loops when trained the way users train?

    python experiments/plain_loop.py                   # all tasks, about 15 minutes on 1 thread
    python experiments/plain_loop.py --quick           # seconds: checks the pipeline
    python experiments/plain_loop.py --tasks phop --model init_std=0.02   # upstream init

Both models are trained by the same loop a user would write: AdamW at a constant learning
rate, cross-entropy on the final logits at the supervised positions, and for ours a fixed
number of loops ``T_train``. No per-loop loss, no loop sampling, no schedule.

- **ours**: :class:`~open_mythos.OpenMythos` built from a :class:`~open_mythos.MythosConfig`
  given only sizes (every other field at its default); ``--model KEY=VALUE`` changes a field.
- **plain**: a causal ``nn.TransformerEncoder`` (PyTorch's default initialisation,
  post-norm, dropout 0 as ours) with learned positions, ``prelude + T_train + coda`` layers:
  the same depth as ours at ``T_train`` loops.

Tasks:

- ``parity``: the seeds' cumulative-parity tutorial recipe: 24 random bits, every position
  predicts the parity of the bits so far (a 2-token vocabulary), dim 64, ``T_train`` 3,
  600 steps at lr 3e-4; accuracy per position.
- ``multihop``: :class:`~open_mythos.tasks.MultiHop` chains, 1-3 hops in distribution, 4-6
  out of distribution, ``T_train`` 3.
- ``phop``: :class:`~open_mythos.tasks.PHop` pointer chasing in a random permutation given
  in the prompt, 1-4 hops in distribution, 5-8 out, ``T_train`` 4.

For ``multihop`` and ``phop`` an example counts as correct when every answer token (and the
end token) is the argmax under teacher forcing: exactly what greedy decoding returns.

Prints one table: per task and split, the plain transformer and ours at every loop count
from 1 to 16 (``T_train`` marked), as trained and with the training-free exit rule
:data:`EXIT_RULE`. ``--out FILE`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from open_mythos import ExitRule, MythosConfig, OpenMythos
from open_mythos.commands.argtypes import (  # noqa: E402
    loop_count,
    name_list,
    output_file,
    positive_int,
)
from open_mythos.tasks import IGNORE_INDEX, VOCAB_SIZE, get_task, make_batch
from open_mythos.training.config import parse_override


@dataclass
class Recipe:
    """One task of the benchmark and how both models are trained on it."""

    name: str
    train_loops: int
    steps: int
    lr: float
    batch_size: int
    dim: int = 64
    n_heads: int = 4
    task_args: dict[str, Any] = field(default_factory=dict)
    quick_steps: int = 8


RECIPES: dict[str, Recipe] = {
    "parity": Recipe("parity", train_loops=3, steps=600, lr=3e-4, batch_size=32),
    "multihop": Recipe("multihop", train_loops=3, steps=1500, lr=1e-3, batch_size=64,
                       task_args={"hops": [1, 3], "ood_hops": [4, 6]}),
    "phop": Recipe("phop", train_loops=4, steps=1500, lr=1e-3, batch_size=64,
                   task_args={"hops": [1, 4], "ood_hops": [5, 8]}),
}
PARITY_LEN = 24


class PlainTransformer(nn.Module):
    """A causal transformer as a user would assemble it from PyTorch's own modules."""

    def __init__(self, vocab_size: int, dim: int, n_heads: int, n_layers: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, n_heads, 4 * dim, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, ids: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        return self.head(self.layers(x, mask=mask, is_causal=True))  # (B, T, V)


# Data: every task yields (input_ids, targets) batches with IGNORE_INDEX holes ---------------


def parity_batch(rng: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    bits = torch.randint(0, 2, (batch_size, PARITY_LEN), generator=rng)
    return {"input_ids": bits, "targets": bits.cumsum(1) % 2}


def task_sampler(recipe: Recipe) -> tuple[Callable[[Any, str, int], dict], list[str], int, int]:
    """``(batch(rng, split, n), eval splits, vocab size, longest sequence)`` of a recipe."""
    if recipe.name == "parity":
        return (lambda rng, split, n: parity_batch(rng, n)), ["id"], 2, PARITY_LEN
    task = get_task(recipe.name, **recipe.task_args)
    seq_len = task.max_len()

    def batch(rng: random.Random, split: str, n: int) -> dict:
        return make_batch(task, rng, split, n, seq_len=seq_len)

    return batch, ["id", *task.ood_splits], VOCAB_SIZE, seq_len


def make_rng(recipe: Recipe, seed: int) -> Any:
    return torch.Generator().manual_seed(seed) if recipe.name == "parity" else random.Random(seed)


# Models ------------------------------------------------------------------------------------


def ours_config(recipe: Recipe, vocab_size: int, max_len: int,
                fields: dict[str, Any]) -> MythosConfig:
    """The configuration of ours: sizes only (plus the ``--model`` fields)."""
    sizes = dict(vocab_size=vocab_size, dim=recipe.dim, n_heads=recipe.n_heads,
                 n_kv_heads=recipe.n_heads, max_seq_len=max_len,
                 max_loop_iters=recipe.train_loops, prelude_layers=1, coda_layers=1,
                 attn_type="gqa", n_experts=4, n_shared_experts=1, n_experts_per_tok=2,
                 expert_dim=recipe.dim, lora_rank=8)
    return MythosConfig(**{**sizes, **fields})


def ours(recipe: Recipe, vocab_size: int, max_len: int, fields: dict[str, Any]) -> OpenMythos:
    """Our model from sizes only (plus the ``--model`` fields)."""
    return OpenMythos(ours_config(recipe, vocab_size, max_len, fields))


def plain(recipe: Recipe, vocab_size: int, max_len: int) -> PlainTransformer:
    return PlainTransformer(vocab_size, recipe.dim, recipe.n_heads, recipe.train_loops + 2, max_len)


# The plain loop ------------------------------------------------------------------------------


def train(model: nn.Module, recipe: Recipe, steps: int, batch: Callable, seed: int) -> float:
    """The loop a user writes; returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    rng = make_rng(recipe, seed)
    model.train()
    tail = []
    for step in range(steps):
        b = batch(rng, "train", recipe.batch_size)
        logits = model(b["input_ids"], n_loops=recipe.train_loops)
        loss = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(),
                               ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    return sum(tail) / len(tail)


#: The training-free exit rule of the "ours + exit rule" rows: a position stops looping once
#: its most likely next token has stayed the same for two loops.
EXIT_RULE = ExitRule(argmax_streak=2, min_loops=2)


@torch.no_grad()
def accuracy(model: nn.Module, b: dict[str, torch.Tensor], n_loops: int, per_token: bool,
             exit_rule: ExitRule | None = None) -> float:
    """Per-position accuracy (parity) or exact match of every answer token (tasks)."""
    model.eval()
    options = {} if exit_rule is None else {"exit_rule": exit_rule}
    logits = model(b["input_ids"], n_loops=n_loops, **options)
    sup = b["targets"] != IGNORE_INDEX
    right = (logits.argmax(-1) == b["targets"]) | ~sup
    if per_token:
        return right[sup].float().mean().item() if sup.all() else float(right.float().mean())
    return right.all(dim=1).float().mean().item()


def run_recipe(recipe: Recipe, steps: int, loops: Sequence[int], n_eval: int, seed: int,
               fields: dict[str, Any], kinds: Sequence[str] = ("plain", "ours")) -> dict[str, Any]:
    """Train both models on one task and evaluate them; returns the task's results."""
    batch, splits, vocab, max_len = task_sampler(recipe)
    per_token = recipe.name == "parity"
    results: dict[str, Any] = {"train_loops": recipe.train_loops, "steps": steps, "splits": {}}
    eval_batches = {s: batch(make_rng(recipe, 10_000 + seed), s, n_eval) for s in splits}
    for kind in kinds:
        torch.manual_seed(seed)
        model = plain(recipe, vocab, max_len) if kind == "plain" else ours(recipe, vocab, max_len, fields)
        t0 = time.perf_counter()
        results[f"{kind}_final_loss"] = train(model, recipe, steps, batch, seed)
        results[f"{kind}_seconds"] = time.perf_counter() - t0
        for split, b in eval_batches.items():
            row = results["splits"].setdefault(split, {})
            if kind == "plain":
                row["plain"] = accuracy(model, b, recipe.train_loops, per_token)
            else:
                row["ours"] = {n: accuracy(model, b, n, per_token) for n in loops}
                row["ours_exit"] = {n: accuracy(model, b, n, per_token, EXIT_RULE)
                                    for n in loops}
        print(f"  {recipe.name}: {kind} trained in {results[f'{kind}_seconds']:.0f} s, "
              f"final loss {results[f'{kind}_final_loss']:.4f}", file=sys.stderr, flush=True)
    return results


def format_table(all_results: dict[str, dict[str, Any]], loops: Sequence[int]) -> str:
    """Markdown table: one row per task and split; ``T_train`` column in bold."""
    head = ["task", "split", "plain", *(f"{n}" for n in loops)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, res in all_results.items():
        T = res["train_loops"]
        for split, row in res["splits"].items():
            plain_acc = f"{row['plain']:.3f}" if "plain" in row else "-"
            for key, label in (("ours", split), ("ours_exit", f"{split}, exit rule")):
                if key not in row:
                    continue
                cells = [f"**{row[key][n]:.3f}**" if n == T else f"{row[key][n]:.3f}"
                         for n in loops]
                lines.append(f"| {task} | {label} | {plain_acc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(all_results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's plain-loop targets per task, each ending MET / NOT MET."""
    lines = []
    for task, res in all_results.items():
        T, row = res["train_loops"], res["splits"]["id"]
        at_t = row["ours"][T]
        if "plain" in row:
            ok = at_t >= row["plain"]
            lines.append(f"{task}: ours {at_t:.3f} at T_train={T} vs plain {row['plain']:.3f} "
                         f"{'MET' if ok else 'NOT MET'}")
        for key, how in (("ours", ""), ("ours_exit", " with the exit rule")):
            deeper = {n: row[key][n] for n in (4, 6, 8) if n in row.get(key, {}) and n > T}
            if deeper:
                worst = min(deeper.values())
                lines.append(f"{task}: no collapse at {', '.join(map(str, deeper))} loops{how} "
                             f"(min {worst:.3f}, target >= {at_t - 0.02:.3f}) "
                             f"{'MET' if worst >= at_t - 0.02 else 'NOT MET'}")
    return lines


#: Evaluation examples per split, without and with ``--quick``.
EVAL_EXAMPLES, QUICK_EVAL_EXAMPLES = 512, 32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked here: a bad one fails before minutes of training.

    Adds ``fields`` (the ``--model`` fields as a dict) and fills in ``eval_examples`` when
    not given; ``steps`` stays None then (each task's own count).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=name_list, default=",".join(RECIPES),
                   help=f"comma-separated subset of {', '.join(RECIPES)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"a few steps each and {QUICK_EVAL_EXAMPLES} evaluation examples "
                        "(pipeline check); --steps and --eval-examples, when given, still win")
    p.add_argument("--steps", type=positive_int,
                   help="every task's step count (default: the task's own: "
                        f"{', '.join(f'{r.name} {r.steps}' for r in RECIPES.values())}; "
                        f"{'/'.join(sorted({str(r.quick_steps) for r in RECIPES.values()}))}"
                        " with --quick)")
    p.add_argument("--max-loops", type=loop_count, default=16,
                   help="sweep ours over 1..N loops (default 16); at least the largest T_train "
                        "of the tasks, which the targets compare against the plain transformer "
                        "(the no-collapse targets check those of 4, 6 and 8 loops swept)")
    p.add_argument("--eval-examples", type=positive_int,
                   help=f"evaluation examples per split (default {EVAL_EXAMPLES}, "
                        f"{QUICK_EVAL_EXAMPLES} with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a MythosConfig field of ours (repeatable), e.g. init_std=0.02")
    p.add_argument("--skip-plain", action="store_true",
                   help="train only ours (for comparing settings of ours)")
    p.add_argument("--out", type=output_file, help="write the results as JSON (missing folders are made)")
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in RECIPES]
    if unknown:
        p.error(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    args.tasks = list(dict.fromkeys(args.tasks))  # each task once, in the order given
    deepest = max((RECIPES[t] for t in args.tasks), key=lambda r: r.train_loops)
    if args.max_loops < deepest.train_loops:
        p.error(f"--max-loops must be at least {deepest.train_loops}, got {args.max_loops}: the "
                f"targets compare ours at T_train={deepest.train_loops} loops ({deepest.name}) "
                "with the plain transformer")
    bad = [kv for kv in args.model if "=" not in kv]
    if bad:
        p.error(f"--model {bad[0]!r}: must look like FIELD=VALUE (e.g. init_std=0.02)")
    try:
        fields = dict(parse_override(f"model.{kv}") for kv in args.model)
        args.fields = {k.split(".", 1)[1]: v for k, v in fields.items()}
        for name in args.tasks:  # ours of every task, built as run_recipe builds it
            _, _, vocab, max_len = task_sampler(RECIPES[name])
            cfg = ours_config(RECIPES[name], vocab, max_len, args.fields)
            if cfg.max_seq_len < max_len or cfg.vocab_size < vocab:
                raise ValueError(
                    f"{name} needs max_seq_len >= {max_len} and vocab_size >= {vocab}, got "
                    f"{cfg.max_seq_len} and {cfg.vocab_size}")
    except (TypeError, ValueError) as err:
        p.error(f"--model: {err}")
    if args.eval_examples is None:
        args.eval_examples = QUICK_EVAL_EXAMPLES if args.quick else EVAL_EXAMPLES
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fields = args.fields
    torch.set_num_threads(args.threads)
    loops = list(range(1, args.max_loops + 1))
    all_results = {}
    start = time.perf_counter()
    for name in args.tasks:
        recipe = RECIPES[name]
        steps = args.steps or (recipe.quick_steps if args.quick else recipe.steps)
        kinds = ("ours",) if args.skip_plain else ("plain", "ours")
        all_results[name] = run_recipe(recipe, steps, loops, args.eval_examples, args.seed,
                                       fields, kinds)
    print(f"\nAccuracy after the plain training loop (ours against loops at inference, "
          f"T_train in bold; model fields: {fields or 'defaults'}; seed {args.seed}):\n")
    print(format_table(all_results, loops))
    print("\nTargets:")
    print("\n".join(f"  - {line}" for line in check_targets(all_results)))
    print(f"\nwall clock {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"fields": fields, "seed": args.seed,
                                        "results": all_results}, indent=1, default=str))
    return 0 if all(math.isfinite(r["ours_final_loss"]) for r in all_results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
