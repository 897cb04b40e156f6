"""Evaluation: depth sweeps, perplexity, and the depth-extrapolation report.

::

    from open_mythos.evaluation import sweep, save_rows, write_report
    rows = sweep(model, get_task("parity"), loops=[1, 2, 4, 8, 16], n_examples=128)
    save_rows(rows, "sweep.csv")
    write_report("runs/parity", "report/", rows, model=model, task=task, train_loops=4)

The report needs ``matplotlib`` (the ``plot`` extra); it is imported only when a figure is
drawn.
"""

from .report import Probe, probe_model, write_report
from .sweep import (
    Decoded,
    Perplexity,
    SweepRow,
    evaluate_examples,
    greedy_answers,
    greedy_decode,
    load_rows,
    loss_vs_loops,
    model_fingerprint,
    perplexity,
    sample_examples,
    save_rows,
    sweep,
    task_fingerprint,
)

__all__ = [
    "Decoded", "Perplexity", "Probe", "SweepRow", "evaluate_examples", "greedy_answers",
    "greedy_decode", "load_rows",
    "loss_vs_loops", "model_fingerprint", "perplexity", "probe_model", "sample_examples",
    "save_rows", "sweep", "task_fingerprint", "write_report",
]
