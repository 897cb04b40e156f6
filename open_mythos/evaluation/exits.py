"""Exit rules against fixed depth: the accuracy (or loss) a rule keeps for the loops it
spends, beside what running fewer loops for every position gets (the Pareto view of
``openmythos report`` and ``benchmarks/adaptive.py``).

A rule is worth using where its point lies above the fixed-depth curve: the same quality for
fewer loops per position, or better quality for the same loops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.recurrence import ExitRule
from ..tasks import Example, score

#: The rules ``openmythos report`` evaluates: two thresholds of each family, from cautious
#: to aggressive (``benchmarks/adaptive.py`` sweeps more).
REPORT_RULES: tuple[tuple[str, ExitRule], ...] = (
    ("kl<0.01", ExitRule(kl=0.01, min_loops=2)),
    ("kl<0.3", ExitRule(kl=0.3, min_loops=2)),
    ("entropy<0.05", ExitRule(entropy=0.05)),
    ("entropy<0.5", ExitRule(entropy=0.5)),
    ("argmax x1", ExitRule(argmax_streak=1, min_loops=2)),
    ("argmax x2", ExitRule(argmax_streak=2, min_loops=2)),
)


@dataclass(frozen=True)
class ExitPoint:
    """One evaluation: a rule at ``n_loops`` loops, or a fixed depth (``rule`` "fixed k").

    Attributes:
        rule: the rule's name, or ``"fixed k"``.
        n_loops: loops requested.
        loops_per_position: mean loops each position ran before it exited.
        value: exact-match accuracy (task) or validation loss in nats/token (text).
    """

    rule: str
    n_loops: int
    loops_per_position: float
    value: float

    @property
    def fixed(self) -> bool:
        return self.rule.startswith("fixed")


@dataclass
class LoopCounter:
    """Loops per position, summed over the recurrent forwards seen by :func:`count_loops`."""

    position_loops: float = 0.0
    positions: int = 0
    computed: float = 0.0
    requested: float = 0.0

    def add(self, recurrent: nn.Module, n_loops: int, real: torch.Tensor | None = None) -> None:
        """Count one forward; ``real`` (B, T) bool marks the positions to count (None:
        all; left padding is not)."""
        loops = recurrent.last_position_loops
        if real is None:
            real = torch.ones_like(loops, dtype=torch.bool)
        self.position_loops += float(loops.masked_fill(~real, 0).sum())
        self.positions += int(real.sum())
        self.computed += recurrent.last_work_fraction * loops.shape[0] * n_loops
        self.requested += loops.shape[0] * n_loops

    @property
    def per_position(self) -> float:
        """Mean loops per position."""
        return self.position_loops / max(1, self.positions)

    @property
    def computed_fraction(self) -> float:
        """Share of the requested (sequence, loop) work that ran."""
        return self.computed / max(1.0, self.requested)


@contextlib.contextmanager
def count_loops(model: nn.Module, n_loops: int) -> Iterator[LoopCounter]:
    """Count the loops of every forward of ``model.recurrent`` inside the ``with`` block, at
    the positions of real tokens (the attention context's ``token_mask``)."""
    counter = LoopCounter()

    def hook(rec: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ctx = args[2] if len(args) > 2 else kwargs.get("ctx")
        counter.add(rec, n_loops, getattr(ctx, "token_mask", None))

    handle = model.recurrent.register_forward_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def _depths_and_rules(n_loops: int, rules: Iterable[tuple[str, ExitRule]]
                      ) -> list[tuple[str, int, ExitRule | None]]:
    """Every fixed depth up to ``n_loops``, then each rule at ``n_loops`` that can fire
    there (one whose ``min_loops`` is above it would be the fixed depth under its name)."""
    return ([(f"fixed {k}", k, None) for k in range(1, n_loops + 1)]
            + [(name, n_loops, rule) for name, rule in rules if rule.min_loops <= n_loops])


@torch.no_grad()
def task_exit_points(model: nn.Module, examples: Sequence[Example], n_loops: int,
                     rules: Iterable[tuple[str, ExitRule]] = REPORT_RULES) -> list[ExitPoint]:
    """Greedy exact-match accuracy on ``examples`` at every fixed depth 1..``n_loops`` and
    under each rule at ``n_loops`` (ACT early exit on, as generation runs). Loops per
    position count each prompt token and each answer token up to its EOS, not padding nor
    the steps a finished sequence waits for the rest of its batch."""
    from .sweep import _greedy_examples

    points = []
    for name, loops, rule in _depths_and_rules(n_loops, rules):
        decoded = _greedy_examples(model, examples, loops, True, rule)
        accuracy = sum(score(a, ex) for a, ex in zip(decoded.answers, examples)) / len(examples)
        points.append(ExitPoint(name, loops, decoded.per_position, accuracy))
    return points


@torch.no_grad()
def text_exit_points(model: nn.Module,
                     batches: Sequence[torch.Tensor | Mapping[str, torch.Tensor]],
                     n_loops: int,
                     rules: Iterable[tuple[str, ExitRule]] = REPORT_RULES) -> list[ExitPoint]:
    """Teacher-forced validation loss at every fixed depth 1..``n_loops`` and under each
    rule at ``n_loops``."""
    from .sweep import perplexity

    points = []
    for name, loops, rule in _depths_and_rules(n_loops, rules):
        with count_loops(model, loops) as counter:
            result = perplexity(model, batches, loops, early_exit=True, exit_rule=rule)
        points.append(ExitPoint(name, loops, counter.per_position, result.loss))
    return points


def plot_exit_pareto(panels: Sequence[tuple[Sequence[ExitPoint], str, str]], path: str | Path,
                     ) -> Path:
    """Quality against mean loops per position, one panel per ``(points, y label, title)``:
    fixed depths as a dashed black line, each rule family as its own line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (points, ylabel, title) in zip(axes[0], panels):
        families: dict[str, list[ExitPoint]] = {}
        for p in points:
            family = "fixed depth" if p.fixed else p.rule.split("<")[0].split(" ")[0]
            families.setdefault(family, []).append(p)
        for family, members in families.items():
            members = sorted(members, key=lambda p: p.loops_per_position)
            style: dict[str, Any] = (dict(color="black", linestyle="--", marker="o")
                                     if family == "fixed depth" else dict(marker="o"))
            ax.plot([p.loops_per_position for p in members], [p.value for p in members],
                    label=family, markersize=4, **style)
        deepest = max(p.n_loops for p in points)
        ax.set_xlabel(f"mean loops per position (rules start from {deepest})")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
