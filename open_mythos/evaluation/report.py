"""The depth-extrapolation report: PNG figures and a ``report.md`` that embeds them.

:func:`write_report` writes into ``out_dir``:

- ``training_curves.png``: loss, validation, loop count, ponder cost and expert balance from
  the run's ``metrics.jsonl`` (whichever are logged);
- ``depth_sweep.png``: accuracy and answer loss against loops, one colour per split, the
  training depth as a vertical line and the dense baseline as horizontal lines;
- ``act_halting.png``: ACT halting weights over loop x position for one example;
- ``ponder_hist.png``: expected loops per token, one histogram per split;
- ``expert_load.png``: share of routed token slots per expert at each loop depth;
- ``report.md``: the figures and the sweep tables.

:func:`write_text_report` does the same for a language run: training curves, and
``loss_vs_loops.png`` (validation loss against loops, training depth marked) with its table
and the language-depth checks.

Figures that need data the run does not have (no metrics, ACT off, no model to probe) are
left out and ``report.md`` says why. Figures are drawn on ``matplotlib.figure.Figure``
objects with the Agg canvas, so no global pyplot state or display is involved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import flops_per_token, is_looped
from ..tasks import BOS_ID, EOS_ID, Task, encode_example
from .exits import ExitPoint, plot_exit_pareto
from .sweep import (
    Perplexity,
    SweepRow,
    depth_checks,
    eval_mode,
    eval_splits,
    sample_examples,
    split_level,
)

METRICS_FILE = "metrics.jsonl"
#: Every file a report may write into its directory (a rerun removes the old ones first,
#: so that no figure of an earlier report is left beside the new ``report.md``).
REPORT_FILES = ("report.md", "sweep.json", "training_curves.png", "depth_sweep.png",
                "act_halting.png", "ponder_hist.png", "expert_load.png", "exit_pareto.png",
                "loss_vs_loops.png", "loss_vs_loops.json")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _integer_ticks(axis: Any) -> None:
    """Ticks at whole numbers only (loop counts, experts)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _name(fig: Any, what: str, run_name: str | None) -> None:
    fig.suptitle(f"{what}: {run_name}" if run_name else what, fontsize=11)


def run_name(run_dir: str | Path | None) -> str | None:
    """How figures name a run: its directory's name."""
    return None if run_dir is None else Path(run_dir).resolve().name


def smoothing_span(n_points: int) -> int:
    """The EMA span the training curves use for a series of ``n_points``: a tenth of it,
    between 1 (no smoothing) and 100 (sampled loop counts need that much to show a trend)."""
    return max(1, min(100, n_points // 10))


def ema(values: Sequence[float], span: int) -> list[float]:
    """Debiased exponential moving average: point ``t`` is the mean of ``values[:t + 1]``
    weighted ``(1 - a) ** (t - k)``, ``a = 2 / (span + 1)`` (so the first points are not
    pulled towards zero, as TensorBoard's smoothing); ``span`` 1 returns the values."""
    a = 2.0 / (span + 1)
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = (1 - a) * acc + v
        norm = (1 - a) * norm + 1
        out.append(acc / norm)
    return out


def metrics_source(run_dir: str | Path) -> tuple[Path, int | None]:
    """``(metrics file, last step or None)`` that :func:`read_metrics` reads for a run
    directory or one of its checkpoint directories (``RUN/checkpoints/step_N``: the run's
    file, up to step ``N``)."""
    path, last = Path(run_dir), None
    match = re.fullmatch(r"step_(\d+)", path.name)
    if not (path / METRICS_FILE).is_file() and match and path.parent.name == "checkpoints":
        path, last = path.parent.parent, int(match.group(1))
    return path / METRICS_FILE, last


def read_metrics(run_dir: str | Path | None) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl`` (empty if there is none); a torn last line is
    skipped. A checkpoint directory of a run (``RUN/checkpoints/step_N``) reads the run's
    rows up to step ``N``."""
    if run_dir is None:
        return []
    path, last = metrics_source(run_dir)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if last is not None:
        rows = [r for r in rows if not isinstance(r.get("step"), (int, float))
                or r["step"] <= last]
    return rows


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
             and isinstance(r.get("step"), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# (title, y-axis label, keys): one panel per group, the keys that are logged.
_PANELS = (
    ("loss", "nats per token", ("loss", "ce", "val_loss")),
    ("loops", "loops", ("loops", "ponder", "val_loops")),
    ("validation next-token accuracy", "accuracy", ("val_acc",)),
    ("expert load", "max / mean routed tokens per expert", ("expert_load_max_over_mean",)),
)
_DASHES = ("-", "--", "-.", ":")


def training_curves_figure(records: Sequence[dict[str, Any]], name: str | None = None
                           ) -> Any | None:
    """The figure of :func:`plot_training_curves`, or None if nothing is logged.

    Per-step series are drawn faint as logged and bold as their :func:`ema` (span
    :func:`smoothing_span`); validation series (``val_*``) as points joined by a dotted
    line. Series of one panel differ in colour and dash; the loops panel has whole-number
    ticks.
    """
    panels = [(title, ylabel, [(k, *_series(records, k)) for k in keys])
              for title, ylabel, keys in _PANELS]
    panels = [(t, y, [s for s in series if s[1]]) for t, y, series in panels]
    panels = [(t, y, series) for t, y, series in panels if series]
    if not panels:
        return None
    fig, axes = _figure(4.4 * len(panels), 3.6, len(panels))
    for ax, (title, ylabel, series) in zip(axes, panels):
        for i, ((key, steps, values), color) in enumerate(zip(series, _colors(len(series)))):
            if key.startswith("val_"):
                ax.plot(steps, values, ":", marker="o", markersize=4, color=color,
                        linewidth=1.0, label=key, zorder=3)
                continue
            span = smoothing_span(len(values))
            if span > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.6)
            ax.plot(steps, ema(values, span), _DASHES[i % len(_DASHES)], color=color,
                    linewidth=1.6, label=f"{key} (EMA over {span} steps)" if span > 1 else key)
        if title == "loss" and all(v > 0 for _, _, vals in series for v in vals):
            ax.set_yscale("log")
        if title == "loops":  # whole loop counts, at least two of them in view
            lo = math.floor(min(v for _, _, vals in series for v in vals))
            hi = math.ceil(max(v for _, _, vals in series for v in vals))
            ax.set_ylim(lo - 0.25, max(hi, lo + 1) + 0.25)
            _integer_ticks(ax.yaxis)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _name(fig, "training curves", name)
    return fig


def plot_training_curves(records: Sequence[dict[str, Any]], path: Path,
                         name: str | None = None) -> Path | None:
    """One panel per logged quantity group (see ``_PANELS``, :func:`training_curves_figure`),
    titled with the run's ``name``; None if nothing is logged."""
    fig = training_curves_figure(records, name)
    return None if fig is None else _save(fig, path)


# Early exit off / on: the "on" line is drawn over the "off" one (they often coincide), with
# hollow squares and dashes, so that both stay visible.
_EXIT_STYLE = {
    False: dict(linestyle="-", marker="o", markersize=4, linewidth=2.0, zorder=2),
    True: dict(linestyle="--", marker="s", markersize=6, markerfacecolor="none",
               linewidth=1.2, zorder=3),
}


def depth_sweep_figure(rows: Sequence[SweepRow], baseline_rows: Sequence[SweepRow],
                       train_loops: int | None, name: str | None = None) -> Any:
    """The figure of :func:`plot_depth_sweep`."""
    splits = list(dict.fromkeys([r.split for r in rows] + [r.split for r in baseline_rows]))
    colors = dict(zip(splits, _colors(len(splits))))
    fig, axes = _figure(11, 4.2, 2)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split in splits:
            for exit_early in (False, True):
                pts = sorted((r.n_loops, getattr(r, metric)) for r in rows
                             if r.split == split and r.early_exit == exit_early)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[split],
                            label=f"{split}{' (early exit)' if exit_early else ''}",
                            **_EXIT_STYLE[exit_early])
            for r in baseline_rows:
                if r.split == split:
                    ax.axhline(getattr(r, metric), color=colors[split], linestyle=":",
                               label=f"{split} baseline ({r.n_loops} core blocks)")
        if train_loops is not None:
            ax.axvline(train_loops, color="black", linewidth=1.0, alpha=0.6,
                       label=f"training depth ({train_loops})")
        ax.set_xlabel("loops at inference")
        ax.set_ylabel("exact-match accuracy" if metric == "accuracy" else "answer loss (nats)")
        ax.set_title("accuracy" if metric == "accuracy" else "answer loss")
        _integer_ticks(ax.xaxis)
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _name(fig, "accuracy and loss against loops", name)
    return fig


def plot_depth_sweep(
    rows: Sequence[SweepRow],
    baseline_rows: Sequence[SweepRow],
    train_loops: int | None,
    path: Path,
    name: str | None = None,
) -> Path:
    """Accuracy and loss against loops per split (one colour per split; early exit off:
    solid with dots, on: dashed with hollow squares drawn on top; the dense baseline dotted;
    the training depth a vertical line), titled with the run's ``name``."""
    return _save(depth_sweep_figure(rows, baseline_rows, train_loops, name), path)


def plot_loss_vs_loops(losses: Mapping[int, Perplexity], train_loops: int | None,
                       path: Path, name: str | None = None) -> Path:
    """Validation loss against loops at inference: the training depth as a vertical line,
    the best loss dotted and 1% above it dashed (the no-overthinking band); titled with the
    run's ``name``."""
    loops = sorted(losses)
    values = [losses[n].loss for n in loops]
    fig, (ax,) = _figure(6, 4)
    ax.plot(loops, values, marker="o", markersize=3, label="validation loss")
    best = min(values)
    ax.axhline(best, color="gray", linestyle=":", label=f"best ({best:.4f})")
    ax.axhline(1.01 * best, color="gray", linestyle="--", linewidth=0.8, label="best + 1%")
    if train_loops is not None:
        ax.axvline(train_loops, color="black", linewidth=1.0, alpha=0.6,
                   label=f"training depth ({train_loops})")
    ax.set_xlabel("loops at inference")
    ax.set_ylabel("validation loss (nats per token)")
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _name(fig, "validation loss against loops", name)
    return _save(fig, path)


def loss_table(losses: Mapping[int, Perplexity]) -> str:
    """A Markdown table of validation loss and perplexity per loop count, with the gap to
    the best loss."""
    best = min(r.loss for r in losses.values())
    return markdown_table(
        ["loops", "val loss", "perplexity", "above best"],
        [[n, f"{r.loss:.4f}", f"{r.perplexity:.3f}", f"{100 * (r.loss - best) / best:.2f}%"]
         for n, r in sorted(losses.items())])


def _training_section(run_dir: str | Path | None, out: Path) -> list[str]:
    """The report's "Training" section: the curves of the run's ``metrics.jsonl``."""
    md = ["## Training", ""]
    records = read_metrics(run_dir)
    curves = (plot_training_curves(records, out / "training_curves.png", run_name(run_dir))
              if records else None)
    if curves is None:
        return md + ["No training metrics (`metrics.jsonl`) were found for this run.", ""]
    source, last = metrics_source(run_dir)
    upto = "" if last is None else f", up to the checkpoint's step {last}"
    return md + [f"![training curves]({curves.name})", "",
                 f"{len(records)} logged steps from `{source}`{upto}.", ""]


def write_text_report(
    run_dir: str | Path | None,
    out_dir: str | Path,
    losses: Mapping[int, Perplexity],
    *,
    model: nn.Module | None = None,
    train_loops: int | None = None,
    exit_points: Sequence[ExitPoint] = (),
) -> Path:
    """Write the report of a language run into ``out_dir``: training curves,
    ``loss_vs_loops.png``, and ``report.md`` with the loss table and the language-depth
    checks (:func:`~open_mythos.evaluation.sweep.depth_checks`), and with ``exit_points``
    the exit rules' Pareto plot ``exit_pareto.png`` and table.

    Args:
        run_dir: training run directory holding ``metrics.jsonl``, or None.
        out_dir: where the PNGs and ``report.md`` go (created if needed).
        losses: loop count -> validation :class:`~open_mythos.evaluation.Perplexity`
            (:func:`~open_mythos.evaluation.sweep.loss_vs_loops`); not empty.
        model: the model, for the summary only.
        train_loops: the training depth, marked on the figure and used by the checks.
        exit_points: validation loss under exit rules and at fixed depths
            (:func:`~open_mythos.evaluation.exits.text_exit_points`).

    Returns:
        Path of ``report.md``.
    """
    if not losses:
        raise ValueError("write_text_report needs the loss at one loop count at least")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Depth report of a language run", ""]
    md += _model_summary(model, None, train_loops) + [""]
    md += _training_section(run_dir, out)
    fig = plot_loss_vs_loops(losses, train_loops, out / "loss_vs_loops.png", run_name(run_dir))
    n_tokens = next(iter(losses.values())).tokens
    md += ["## Validation loss against inference depth", "",
           f"![validation loss against loops]({fig.name})", "",
           f"Teacher-forced loss over the run's validation batches ({n_tokens:,} predicted "
           "tokens), the same tokens at every loop count; no early exit.", "",
           loss_table(losses), ""]
    if train_loops is not None:
        md += [f"- {line}" for line in depth_checks(
            {n: r.loss for n, r in losses.items()}, train_loops)] + [""]
    md += _exit_section(out, exit_points, "validation loss (nats/token)", "loss",
                        run_name(run_dir), "Teacher-forced validation loss, ACT early exit on")
    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


@dataclass
class Probe:
    """What one looped model does on a few examples, run without early exit.

    Attributes:
        n_loops: loops run.
        tokens: display labels of the heatmap example's tokens.
        act_weights: (n_loops, T) float ACT weights of that example, or None (ACT off).
        ponder: split -> (N,) expected loops of every real token of its examples.
        expert_load: (n_loops, n_experts) routed token slots summed over the examples.
    """

    n_loops: int
    tokens: list[str]
    act_weights: torch.Tensor | None
    ponder: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_load: torch.Tensor | None = None


def _token_label(i: int) -> str:
    return {BOS_ID: "<s>", EOS_ID: "</s>"}.get(i, chr(i) if 32 <= i < 127 else f"<{i}>")


def probe_model(
    model: nn.Module,
    task: Task,
    n_loops: int,
    splits: Sequence[str] | None = None,
    n_examples: int = 16,
    seed: int = 0,
) -> Probe:
    """Run ``model`` on ``n_examples`` teacher-forced examples of each split that fits its
    ``max_seq_len`` (one forward per example, so padding never counts) and collect ACT
    weights, ponder costs and expert loads. The heatmap example is the first of the first
    split."""
    if not is_looped(model):
        raise ValueError("probe_model needs a looped model (one with a recurrent block)")
    splits = eval_splits(task) if splits is None else list(splits)
    device = next(model.parameters()).device
    probe = Probe(n_loops=n_loops, tokens=[], act_weights=None)
    load = None
    with eval_mode(model):
        for split in splits:
            level = split_level(task, split)
            longest = task.max_len(split) if level is None else task.max_len_at(level)
            if longest > model.cfg.max_seq_len:
                continue
            ponders = []
            for ex in sample_examples(task, split, n_examples, seed):
                ids, _ = encode_example(ex)
                model(ids.unsqueeze(0).to(device), n_loops, act_early_exit=False)
                rec = model.recurrent
                ponders.append(rec.last_ponder_cost[0].float().cpu())
                step_load = rec.last_expert_load.float().cpu()
                load = step_load if load is None else load + step_load
                if not probe.tokens:
                    probe.tokens = [_token_label(int(i)) for i in ids]
                    if rec.last_act_weights is not None:
                        probe.act_weights = rec.last_act_weights[:, 0].float().cpu()
            probe.ponder[split] = torch.cat(ponders)
    probe.expert_load = load
    return probe


def plot_act_heatmap(probe: Probe, train_loops: int | None, path: Path,
                     name: str | None = None) -> Path:
    """Loop x position image of the example's ACT weights (whole-number loop ticks)."""
    weights = probe.act_weights.numpy()
    fig, (ax,) = _figure(max(5.0, 0.28 * weights.shape[1] + 2), 0.25 * weights.shape[0] + 2)
    im = ax.imshow(weights, aspect="auto", cmap="viridis", origin="lower",
                   extent=(-0.5, weights.shape[1] - 0.5, 0.5, weights.shape[0] + 0.5))
    ax.set_xticks(range(len(probe.tokens)), probe.tokens, fontsize=7)
    ax.set_xlabel("position (token)")
    ax.set_ylabel("loop")
    _integer_ticks(ax.yaxis)
    if train_loops is not None and train_loops < weights.shape[0]:
        ax.axhline(train_loops + 0.5, color="white", linestyle="--", linewidth=1.0)
    ax.set_title("per loop and position, one example", fontsize=9)
    fig.colorbar(im, ax=ax, label="halting weight")
    _name(fig, "ACT halting weights", name)
    return _save(fig, path)


def plot_ponder_hist(probe: Probe, path: Path, name: str | None = None) -> Path:
    """Histogram of expected loops per token, one per split (step outlines over faint fills,
    so overlapping splits stay visible)."""
    fig, (ax,) = _figure(6, 3.6)
    bins = torch.linspace(0.5, probe.n_loops + 0.5, min(4 * probe.n_loops, 80) + 1).tolist()
    for (split, values), color in zip(probe.ponder.items(), _colors(len(probe.ponder))):
        ax.hist(values.numpy(), bins=bins, alpha=0.3, color=color)
        ax.hist(values.numpy(), bins=bins, histtype="step", linewidth=1.5, color=color,
                label=f"{split} (mean {values.mean():.2f})")
    ax.set_xlabel(f"expected loops per token (of {probe.n_loops})")
    ax.set_ylabel("tokens")
    _integer_ticks(ax.xaxis)
    ax.legend(fontsize=8)
    _name(fig, "ponder cost", name)
    return _save(fig, path)


def plot_expert_load(probe: Probe, train_loops: int | None, path: Path,
                     name: str | None = None) -> Path:
    """Loop x expert image of each loop's share of routed token slots (whole-number ticks)."""
    load = probe.expert_load
    share = (load / load.sum(-1, keepdim=True).clamp(min=1)).numpy()
    fig, (ax,) = _figure(max(4.5, 0.35 * share.shape[1] + 2), 0.22 * share.shape[0] + 2.2)
    im = ax.imshow(share, aspect="auto", cmap="magma", origin="lower",
                   extent=(-0.5, share.shape[1] - 0.5, 0.5, share.shape[0] + 0.5))
    ax.set_xlabel("expert")
    ax.set_ylabel("loop")
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    if train_loops is not None and train_loops < share.shape[0]:
        ax.axhline(train_loops + 0.5, color="cyan", linestyle="--", linewidth=1.0)
    ax.set_title(f"share of routed token slots (uniform = {1 / share.shape[1]:.3f})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="share of token slots")
    _name(fig, "expert load per loop depth", name)
    return _save(fig, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats with 3 decimals, ``None`` (not measured)
    as a dash."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def exit_table(points: Sequence[ExitPoint], value_name: str) -> str:
    """Rule, loops requested, loops per position, the share of the deepest depth's
    loop-steps saved, and the value of each point."""
    deepest = max(p.n_loops for p in points)
    return markdown_table(
        ["rule", "loops", "loops/position", f"saved vs {deepest}", value_name],
        [[p.rule, p.n_loops, f"{p.loops_per_position:.2f}",
          f"{100 * (1 - p.loops_per_position / deepest):.0f}%", f"{p.value:.4f}"]
         for p in points])


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy measured on ``n`` examples:
    unlike the normal interval it stays inside [0, 1] and is not empty at 0 or 1.

    Raises:
        ValueError: ``n < 1`` or an accuracy outside [0, 1].
    """
    if n < 1:
        raise ValueError(f"an interval needs at least one example, got n={n}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    z2 = z * z
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(p: float, n: int, q: float, m: int) -> tuple[float, float]:
    """The 95% interval of ``p - q``, two accuracies measured on ``n`` and ``m`` independent
    examples: Newcombe's hybrid score interval (method 10 of Newcombe 1998), built from the
    two Wilson intervals (:func:`wilson_interval`), so that it does not collapse at 0 or 1 as the normal
    interval does.

    Raises:
        ValueError: as :func:`wilson_interval`.
    """
    lo_p, hi_p = wilson_interval(p, n)
    lo_q, hi_q = wilson_interval(q, m)
    d = p - q
    return (d - math.sqrt((p - lo_p) ** 2 + (hi_q - q) ** 2),
            d + math.sqrt((hi_p - p) ** 2 + (q - lo_q) ** 2))


def sweep_table(rows: Sequence[SweepRow]) -> str:
    """Every row: split, loops, early exit, accuracy with its 95% Wilson interval over the
    row's examples (two accuracies whose intervals overlap may not differ), loss and the
    loop statistics."""
    headers = ["model", "split", "loops", "early exit", "accuracy", "95% interval",
               "answer loss", "expected loops", "halt loop", "loops run", "loops computed", "n"]
    table = []
    for r in rows:
        lo, hi = wilson_interval(r.accuracy, r.n_examples)
        table.append([r.model, r.split, r.n_loops, "on" if r.early_exit else "off", r.accuracy,
                      f"{lo:.3f}-{hi:.3f}", r.loss, r.expected_loops, r.halt_loop, r.loops_run,
                      r.loops_computed, r.n_examples])
    return markdown_table(headers, table)


def accuracy_pivot(rows: Sequence[SweepRow], baseline_rows: Sequence[SweepRow] = ()) -> str:
    """Accuracy with loops down and splits across (early exit off, or on where only that
    was swept), and the baseline as a last row; a cell not swept shows a dash."""
    exit_setting = False if any(not r.early_exit for r in rows) else True
    chosen = [r for r in rows if r.early_exit == exit_setting]
    splits = list(dict.fromkeys(r.split for r in chosen))
    acc = {(r.split, r.n_loops): r.accuracy for r in chosen}
    body: list[list[Any]] = [
        [n, *(acc.get((s, n)) for s in splits)]  # None: that cell was not swept
        for n in sorted({r.n_loops for r in chosen})
    ]
    base = {r.split: r for r in baseline_rows}
    if base:
        depth = next(iter(base.values())).n_loops
        body.append([f"baseline ({depth} core blocks)",
                     *(base[s].accuracy if s in base else None for s in splits)])
    return markdown_table(["loops", *splits], body)


def _model_summary(model: nn.Module | None, baseline: nn.Module | None,
                   train_loops: int | None) -> list[str]:
    lines = [_describe(m, train_loops) for m in (model, baseline) if m is not None]
    if train_loops is not None:
        lines.append(f"- training depth: {train_loops} loops")
    return lines


def _describe(model: nn.Module, train_loops: int | None) -> str:
    """One line on ``model``'s size, architecture and FLOPs per token (at the training depth
    for a looped model)."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    if not is_looped(model):
        return (f"- dense baseline: {n_params:,} parameters, {cfg.n_layers} layers "
                f"({cfg.core_layers} core blocks of FFN width {cfg.core_ffn_dim}); "
                f"{flops_per_token(cfg):,} FLOPs/token")
    depth = train_loops or cfg.max_loop_iters
    return (f"- looped model: {n_params:,} parameters, dim {cfg.dim}, {cfg.prelude_layers} prelude "
            f"+ recurrent MoE block ({cfg.n_experts} experts, top-{cfg.n_experts_per_tok}) + "
            f"{cfg.coda_layers} coda, {cfg.attn_type} attention, ACT "
            f"{'on' if cfg.use_act else 'off'}; {flops_per_token(cfg, depth):,} FLOPs/token "
            f"at {depth} loops")


def write_report(
    run_dir: str | Path | None,
    out_dir: str | Path,
    sweep_rows: Sequence[SweepRow],
    baseline_rows: Sequence[SweepRow] = (),
    *,
    model: nn.Module | None = None,
    baseline: nn.Module | None = None,
    task: Task | None = None,
    train_loops: int | None = None,
    probe_loops: int | None = None,
    probe_examples: int = 16,
    seed: int = 0,
    exit_points: Sequence[ExitPoint] = (),
    exit_examples: int | None = None,
) -> Path:
    """Write the figures and ``report.md`` into ``out_dir`` (created if needed).

    Args:
        run_dir: training run directory holding ``metrics.jsonl``, or None.
        out_dir: where the PNGs and ``report.md`` go.
        sweep_rows: the looped model's :func:`~open_mythos.evaluation.sweep` rows. Baseline
            rows among them (``model == "baseline"``, as a file of ``openmythos sweep
            --baseline`` holds both) are taken as ``baseline_rows``.
        baseline_rows: the dense baseline's rows (one per split), drawn as horizontal lines.
        model: the looped model, probed for the ACT and expert-load figures (skipped if None).
        baseline: the baseline model, for the summary only.
        task: the task to probe with (needed with ``model``).
        train_loops: the training depth, marked on the figures.
        probe_loops: loops of the probe (default: the deepest swept loop count, else the
            training depth, else ``max_loop_iters``).
        probe_examples: examples per split in the probe.
        seed: probe example seed.
        exit_points: in-distribution accuracy under exit rules and at fixed depths
            (:func:`~open_mythos.evaluation.exits.task_exit_points`): ``exit_pareto.png``
            and a table.
        exit_examples: how many examples ``exit_points`` were measured on (stated).

    Returns:
        Path of ``report.md``.
    """
    mixed = [r for r in sweep_rows if r.model == "baseline"]
    if mixed:  # the baseline's accuracy was shown as the looped model's at its depth
        if baseline_rows:
            raise ValueError("baseline rows given both among sweep_rows and as baseline_rows")
        sweep_rows = [r for r in sweep_rows if r.model != "baseline"]
        baseline_rows = mixed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Depth-extrapolation report", ""]
    md += _model_summary(model, baseline, train_loops) + [""]

    md += _training_section(run_dir, out)

    md += ["## Accuracy against inference depth", ""]
    if sweep_rows or baseline_rows:
        fig = plot_depth_sweep(sweep_rows, baseline_rows, train_loops, out / "depth_sweep.png",
                               run_name(run_dir))
        md += [f"![accuracy and loss against loops]({fig.name})", "",
               "Solid lines with dots: early exit off; dashed with hollow squares (drawn on "
               "top): ACT early exit on; "
               + ("dotted: the dense baseline given (its core blocks in the legend); "
                  if baseline_rows else "")
               + "vertical line: training depth.", ""]
        rules = sorted({r.exit_rule for r in sweep_rows} - {""})
        if rules:
            md += [f"The looped model ran with the exit rule {', '.join(rules)}.", ""]
        if sweep_rows:
            md += ["Exact-match accuracy:", "", accuracy_pivot(sweep_rows, baseline_rows), ""]
        md += ["All rows:", "", sweep_table([*sweep_rows, *baseline_rows]), ""]
    else:
        md += ["No sweep results were given.", ""]

    md += _exit_section(out, exit_points, "exact-match accuracy (id)", "accuracy",
                        run_name(run_dir), "Greedy answers to "
                        + (f"{exit_examples} " if exit_examples else "")
                        + "in-distribution examples, ACT early exit on")
    md += _probe_sections(run_dir, out, model, task, train_loops, probe_loops, sweep_rows,
                          probe_examples, seed)
    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def _exit_section(out: Path, points: Sequence[ExitPoint], ylabel: str, value_name: str,
                  name: str | None, what: str) -> list[str]:
    if not points:
        return []
    deepest = max(p.n_loops for p in points)
    title = f"exit rules against fixed depth{': ' + name if name else ''}"
    fig = plot_exit_pareto([(points, ylabel, title)], out / "exit_pareto.png")
    return ["## Exit rules against fixed depth", "",
            f"![exit rules against fixed depth]({fig.name})", "",
            f"{what}: every fixed depth from 1 to {deepest} loops (dashed), and each "
            f"training-free exit rule starting from {deepest} loops. A rule pays where its "
            f"point lies {'below' if value_name == 'loss' else 'above'} the dashed line "
            f"({'lower loss' if value_name == 'loss' else 'higher accuracy'} for as many "
            "loops per position), or left of it: the same quality for fewer loops.", "",
            exit_table(points, value_name), ""]


def _probe_sections(
    run_dir: str | Path | None,
    out: Path,
    model: nn.Module | None,
    task: Task | None,
    train_loops: int | None,
    probe_loops: int | None,
    sweep_rows: Sequence[SweepRow],
    probe_examples: int,
    seed: int,
) -> list[str]:
    md = ["## ACT halting", ""]
    if model is not None and not is_looped(model):
        return md + ["The model is a fixed-depth transformer: it has no halting or experts "
                     "to probe.", ""]
    if model is None or task is None:
        return md + ["No looped model and task were given to probe: ACT and expert-load "
                     "figures are skipped.", ""]
    if probe_loops is None:
        deepest = max((r.n_loops for r in sweep_rows), default=None)
        probe_loops = deepest or train_loops or model.cfg.max_loop_iters
    # The splits the sweep evaluated (a report of --splits hops=4 probes hops=4).
    swept = list(dict.fromkeys(r.split for r in sweep_rows)) or None
    probe = probe_model(model, task, probe_loops, splits=swept, n_examples=probe_examples,
                        seed=seed)
    if probe.expert_load is None:
        return md + ["No split of the task fits the model's max_seq_len: nothing was probed.", ""]
    if probe.act_weights is None:
        md += ["ACT is off for this model (`use_act=False`): every position runs every loop "
               "and there are no halting weights, so the halting heatmap and the ponder "
               "histogram are skipped.", ""]
    else:
        heat = plot_act_heatmap(probe, train_loops, out / "act_halting.png", run_name(run_dir))
        hist = plot_ponder_hist(probe, out / "ponder_hist.png", run_name(run_dir))
        means = ", ".join(f"{s} {v.mean():.2f}" for s, v in probe.ponder.items())
        md += [f"Probe at {probe_loops} loops without early exit (dashed line: training depth).",
               "", f"![ACT halting weights]({heat.name})", "",
               f"![ponder cost histogram]({hist.name})", "",
               f"Mean expected loops per token: {means}.", ""]
    md += ["## Expert load per loop depth", ""]
    fig = plot_expert_load(probe, train_loops, out / "expert_load.png", run_name(run_dir))
    load = probe.expert_load
    ratio = (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).tolist()
    md += [f"![expert load]({fig.name})", "",
           markdown_table(["loop", "max/mean load"], [[t + 1, r] for t, r in enumerate(ratio)]),
           ""]
    return md
