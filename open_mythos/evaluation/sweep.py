"""Depth sweeps and perplexity: what a looped model computes at each loop count.

:func:`sweep` evaluates one model on fixed sets of task examples (the same examples at every
loop count, drawn once per split from ``seed``) and returns one :class:`SweepRow` per
``(split, n_loops, early_exit)``:

- ``loss``: cross-entropy of the answer and EOS tokens, teacher-forced, one forward per batch;
- ``accuracy``: exact match of the greedy answer (the text before the first EOS). With
  early exit on a model that can stop computing (ACT, an exit rule), and for a bfloat16 or
  float16 model, it is decoded in batches over a preallocated KV cache with left-padded
  prompts, stopping at EOS. Otherwise it is read off the teacher-forced forward, which
  gives the same answers for a third of the forwards: greedy decoding reproduces the target
  exactly when each target token is the argmax given the targets before it, and a cached
  decoding step computes the logits of the full forward (:func:`teacher_forced_matches`).
  The two round differently (float32: logits apart by ~1e-5; half precision: far more), so
  an argmax tie within that band can go either way, as it can between batch sizes;
- ``expected_loops``, ``halt_loop``: mean ACT ponder cost and mean halting loop per real
  token of the teacher-forced forward;
- ``loops_run``, ``loops_computed``: loops the model actually executed per forward while
  decoding, for the batch and per sequence (below ``n_loops`` only with early exit; where
  nothing is decoded, both are ``n_loops``).

A fixed-depth model (:class:`~open_mythos.baseline.DenseBaseline`) gets one row per split,
with its core depth in every loop column.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import whole_number
from ..inference.generation import stream
from ..layers.recurrence import ExitRule
from ..modes import evaluating
from ..registry import is_looped
from ..tasks import (
    EOS_ID,
    IGNORE_INDEX,
    PAD_ID,
    Example,
    Task,
    collate,
    decode_answer,
    encode_prompt,
    score,
)
from ..tokenizers import pad_rows


@dataclass
class SweepRow:
    """Metrics of one model on one split at one loop count.

    Attributes:
        model: ``"looped"`` or ``"baseline"``.
        task: task name.
        split: task split.
        n_loops: loops requested (a baseline: its fixed core depth).
        early_exit: whether ACT early exit was allowed.
        n_examples: examples evaluated.
        accuracy: fraction of exactly matching greedy answers, in [0, 1].
        loss: mean cross-entropy (nats) per answer token, EOS included, teacher-forced.
        expected_loops: mean ACT expected loops ``sum_t (t + 1) w_t`` per real token
            (``n_loops`` with ACT off).
        halt_loop: mean loop at which real tokens halted (the number of loops with a
            positive ACT weight; ``n_loops`` with ACT off).
        loops_run: mean loops the recurrent block executed per forward during greedy
            decoding (the deepest sequence of the batch sets it).
        loops_computed: mean loops computed per sequence per decoding forward (below
            ``loops_run`` when ACT early exit stopped some sequences before others).
        seconds: wall time of this row's evaluation.
        exit_rule: the training-free exit rule every forward ran with, as
            ``ExitRule(...)`` text; empty for none.
        task_id: :func:`task_fingerprint` of the task evaluated (its knobs, not only its
            name); empty in files written before it was recorded.
        model_id: :func:`model_fingerprint` of the model evaluated; empty in files written
            before it was recorded.
    """

    model: str
    task: str
    split: str
    n_loops: int
    early_exit: bool
    n_examples: int
    accuracy: float
    loss: float
    expected_loops: float
    halt_loop: float
    loops_run: float
    loops_computed: float
    seconds: float
    exit_rule: str = ""
    task_id: str = ""
    model_id: str = ""


@dataclass
class Perplexity:
    """Next-token loss over a token stream: ``loss`` (mean nats per predicted token),
    ``perplexity = exp(loss)`` and ``tokens`` (predicted tokens counted)."""

    loss: float
    perplexity: float
    tokens: int


def loss_vs_loops(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], loops: Sequence[int],
    on_loss: Callable[[int, Perplexity, float], None] | None = None,
) -> dict[int, Perplexity]:
    """Validation loss of a language model at each loop count, on the same ``batches``
    (mappings with ``input_ids`` and shifted ``targets``) every time; no early exit.
    ``on_loss(n_loops, result, seconds)`` is called as each loop count is done (progress)."""
    losses = {}
    for n in loops:
        start = time.perf_counter()
        losses[n] = perplexity(model, batches, n)
        if on_loss is not None:
            on_loss(n, losses[n], time.perf_counter() - start)
    return losses


def loss_rows(losses: Mapping[int, Perplexity]) -> list[dict[str, float]]:
    """:func:`loss_vs_loops` results as rows (``n_loops``, ``val_loss``, ``perplexity``,
    ``tokens``) for a JSON or CSV file."""
    return [{"n_loops": n, "val_loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}
            for n, r in sorted(losses.items())]


def depth_checks(losses: Mapping[int, float], train_loops: int) -> list[str]:
    """The language-depth checks, one line each: loss non-increasing up to ``train_loops``,
    and the loss at ``4 x train_loops`` against the best of the other depths. A check
    without the loop counts it needs (fewer than two measured at or below ``train_loops``;
    ``4 x train_loops`` measured alone) says ``n/a`` rather than passing."""
    upto = [losses[n] for n in sorted(losses) if n <= train_loops]
    head = f"non-increasing up to T_train={train_loops}: "
    if len(upto) < 2:
        lines = [head + f"n/a ({len(upto)} loop count{'' if len(upto) == 1 else 's'} "
                 f"measured at or below {train_loops})"]
    else:
        lines = [head + ("yes" if all(b <= a for a, b in zip(upto, upto[1:])) else "no")]
    deep = 4 * train_loops
    if deep in losses:
        head = f"at 4x T_train ({deep} loops): "
        if len(losses) < 2:
            lines.append(head + "n/a (no other depth measured to compare with)")
        else:
            best = min(losses.values())
            gap = 100 * (losses[deep] - best) / best
            lines.append(head + f"{gap:.2f}% above the best loss "
                         f"(target within 1%: {'yes' if gap <= 1.0 else 'no'})")
    return lines


def default_loops(model: nn.Module) -> list[int]:
    """``1 .. 4 * max_loop_iters``: the training depth and well beyond it."""
    return list(range(1, 4 * model.cfg.max_loop_iters + 1))


def eval_splits(task: Task, max_seq_len: int | None = None) -> list[str]:
    """Held-out splits worth sweeping: ``id`` and every ``ood_*`` split (``train`` draws
    from the same distribution as ``id``), without those whose longest example exceeds
    ``max_seq_len`` when it is given."""
    splits = [s for s in task.splits if s != "train"]
    if max_seq_len is None:
        return splits
    return [s for s in splits if task.max_len(s) <= max_seq_len]


def fitting_splits(task: Task, max_seq_len: int, stacklevel: int = 2) -> list[str]:
    """The :func:`eval_splits` of ``task`` that fit ``max_seq_len``, what :func:`sweep`
    evaluates by default; a warning names the splits left out.

    Raises:
        ValueError: no split fits.
    """
    splits = eval_splits(task, max_seq_len)
    if not splits:
        raise ValueError(f"no split of {task.name!r} fits max_seq_len={max_seq_len}: "
                         "nothing to evaluate")
    skipped = sorted(set(eval_splits(task)) - set(splits))
    if skipped:
        warnings.warn(f"sweep: split(s) {', '.join(skipped)} of {task.name!r} exceed "
                      f"max_seq_len={max_seq_len} and are left out", stacklevel=stacklevel)
    return splits


def split_level(task: Task, split: str) -> int | None:
    """The level of a one-level split ``"<level_name>=<k>"`` (e.g. ``"hops=4"`` for
    ``multihop``), None for a named split such as ``"id"``.

    Raises:
        ValueError: the split names another task's level, or its level is not an integer.
    """
    name, eq, value = split.partition("=")
    if not eq:
        return None
    if name != task.level_name:
        raise ValueError(f"split {split!r}: {task.name!r} levels are {task.level_name!r}, "
                         f"e.g. {task.level_name}={task.min_level}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"split {split!r}: the level must be an integer") from None


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's configuration and weights (each tensor's name, shape, sum
    and first values), so that a sweep file can be matched to the checkpoint it describes.
    Not a checksum: it tells models apart, it does not prove a file intact."""
    import hashlib

    digest = hashlib.sha256(json.dumps(model.cfg.to_dict() if hasattr(model.cfg, "to_dict")
                                       else dataclasses.asdict(model.cfg), sort_keys=True,
                                       default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            flat = t.detach().reshape(-1)
            head = flat[:8].double().cpu().tolist()
            digest.update(f"{name}{tuple(t.shape)}{float(flat.double().sum()):.6e}"
                          f"{[f'{v:.6e}' for v in head]}".encode())
    return digest.hexdigest()[:16]


def task_fingerprint(task: Task, legacy: bool = False) -> str:
    """A short hash of what ``task`` asks: its name, its knobs (the task object's
    attributes, written alike however they were spelled: ``[1, 3]`` as ``(1, 3)``, ``1``
    as ``1.0``), its splits' level ranges and a few examples of each split from a fixed
    seed. Two tasks of one name with other knobs (``statements``, ``open_ends``...)
    differ, so a sweep file can be matched to the task of the run it describes.

    ``legacy``: the hash of files written before 2026-12-07, without the knobs (knobs that
    rarely change an example, ``open_ends`` 0.5 and 0.6, shared one)."""
    import hashlib

    parts = [task.name]
    if not legacy:  # public attributes: a task's state kept per draw is private (``_n``)
        parts.append(repr(sorted((k, _knob(v)) for k, v in vars(task).items()
                                 if not k.startswith("_"))))
    for split in task.splits:
        rng = random.Random(f"fingerprint/{split}")
        parts += [split, repr(task.level_range(split))]
        parts += [f"{ex.prompt}->{ex.answer}" for ex in (task.generate(rng, split)
                                                          for _ in range(4))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _knob(value: Any) -> Any:
    """A task attribute written one way whatever its spelling, and alike in every process
    (a set in sorted order, not its hash order; an object without a value of its own, whose
    ``repr`` holds its address, by its type)."""
    if isinstance(value, enum.Enum):
        return _knob(value.value)
    if isinstance(value, (list, tuple)):
        return tuple(_knob(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return ("set", *sorted((_knob(v) for v in value), key=repr))
    if isinstance(value, dict):
        return tuple(sorted((str(k), _knob(v)) for k, v in value.items()))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


def sample_examples(task: Task, split: str, n_examples: int, seed: int = 0) -> list[Example]:
    """``n_examples`` examples of ``split``, a fixed function of ``(seed, split)`` and
    distinct from the training stream's seeds. ``split`` is a task split (``"id"``,
    ``"ood_hops"``...) or one level, ``"<level_name>=<k>"`` (:func:`split_level`)."""
    rng = random.Random(f"eval/{seed}/{split}")
    level = split_level(task, split)
    if level is not None:
        return [task.generate_at(rng, level) for _ in range(n_examples)]
    return [task.generate(rng, split) for _ in range(n_examples)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients; the previous mode is restored (by the last of the
    threads using ``model`` at once, :func:`open_mythos.modes.evaluating`)."""
    with evaluating(model), torch.no_grad():
        yield


def check_splits_fit(model: nn.Module, task: Task, splits: Sequence[str], n_examples: int,
                     seed: int = 0) -> dict[str, list[Example]]:
    """The examples :func:`sweep` evaluates for each of ``splits``, once checked to fit
    ``model``'s ``max_seq_len``.

    Raises:
        ValueError: naming the first split whose examples do not fit.
    """
    drawn = {split: sample_examples(task, split, n_examples, seed) for split in splits}
    for split, examples in drawn.items():
        _check_fits(model, collate(examples)["input_ids"].shape[1], f"split {split!r}")
    return drawn


def _check_fits(model: nn.Module, length: int, what: str) -> None:
    limit = model.cfg.max_seq_len
    if length > limit:
        raise ValueError(
            f"{what} needs {length} positions but the model's max_seq_len is {limit}; "
            "leave the split out or use a model with a larger max_seq_len"
        )


def left_pad(seqs: Sequence[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors to ``(ids (B, L), attention_mask (B, L))``, mask 1 on real
    tokens: the layout :func:`~open_mythos.inference.generate` expects for batched prompts."""
    return pad_rows(seqs, pad_id, side="left")


@dataclass
class Decoded:
    """What one batch of greedy decoding produced, beside the answers.

    Attributes:
        answers: the decoded text of each prompt (up to its first EOS).
        loops_run: for a looped model, the loops executed by each forward (prefill first).
        loops_computed: the mean loops each sequence computed in each forward.
        position_loops: loops run, summed over the positions that carried an answer: the
            prompt's real tokens, and each token a sequence decoded up to and including its
            EOS (left padding, and the forwards a finished sequence keeps receiving while
            the others decode, are not counted).
        positions: how many positions ``position_loops`` sums over.
    """

    answers: list[str]
    loops_run: list[int] = dataclasses.field(default_factory=list)
    loops_computed: list[float] = dataclasses.field(default_factory=list)
    position_loops: float = 0.0
    positions: int = 0

    @property
    def per_position(self) -> float:
        """Mean loops per counted position (``nan`` for a fixed-depth model)."""
        return self.position_loops / self.positions if self.positions else math.nan

    def __add__(self, other: Decoded) -> Decoded:
        return Decoded(self.answers + other.answers, self.loops_run + other.loops_run,
                       self.loops_computed + other.loops_computed,
                       self.position_loops + other.position_loops,
                       self.positions + other.positions)


def greedy_answers(
    model: nn.Module,
    prompts: Sequence[str],
    n_loops: int,
    max_new_tokens: int,
    early_exit: bool = True,
    exit_rule: ExitRule | None = None,
) -> tuple[list[str], list[int], list[float]]:
    """Greedy answers to ``prompts`` decoded in one batch (with ``exit_rule`` in every
    forward, if given).

    Each prompt is encoded as BOS + prompt, the batch is left-padded, and tokens are chosen by
    argmax over a KV cache until every sequence has produced EOS or ``max_new_tokens`` tokens.

    Returns:
        ``(answers, loops_run, loops_computed)``: the decoded text of each prompt (up to its
        first EOS); for a looped model, the loops executed by each forward (prefill first)
        and the mean loops each sequence computed in it. Both lists are empty for a
        fixed-depth model. :func:`greedy_decode` also gives the loops per position.
    """
    out = greedy_decode(model, prompts, n_loops, max_new_tokens, early_exit, exit_rule)
    return out.answers, out.loops_run, out.loops_computed


def greedy_decode(
    model: nn.Module,
    prompts: Sequence[str],
    n_loops: int,
    max_new_tokens: int,
    early_exit: bool = True,
    exit_rule: ExitRule | None = None,
) -> Decoded:
    """:func:`greedy_answers` with the loops each answer position ran (:class:`Decoded`)."""
    ids, mask = left_pad([encode_prompt(p) for p in prompts])
    _check_fits(model, ids.shape[1] + max_new_tokens, "greedy decoding")
    device = _device(model)
    rec = model.recurrent if is_looped(model) else None
    tokens: list[torch.Tensor] = []
    out = Decoded(answers=[])
    # Positions whose loops count: the prompts' real tokens in the prefill, then every
    # sequence not finished before the step (the step that emits EOS counts).
    counted = mask.to(device=device, dtype=torch.bool)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loops, positions
    for tok in stream(model, ids.to(device), max_new_tokens, n_loops, do_sample=False,
                      eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                      attention_mask=mask.to(device), act_early_exit=early_exit,
                      **({} if exit_rule is None else {"exit_rule": exit_rule})):
        tokens.append(tok)
        if rec is not None:
            out.loops_run.append(rec.last_loops_run)
            out.loops_computed.append(rec.last_work_fraction * n_loops)
            loops = rec.last_position_loops.masked_fill(~counted, 0)
            sums += torch.stack([loops.sum(), counted.sum()]).double()
        finished = finished | (tok == EOS_ID)
        counted = ~finished.unsqueeze(1)
    if rec is not None:
        out.position_loops, positions = sums.tolist()
        out.positions = int(positions)
    if not tokens:
        out.answers = [""] * len(prompts)
        return out
    generated = torch.stack(tokens, dim=1).cpu()  # (B, steps)
    out.answers = [decode_answer(row) for row in generated]
    return out


def teacher_forced_matches(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether greedy decoding would reproduce each row's answer, from a teacher-forced
    forward: ``predicted`` (B, L), the argmax token at every supervised position, and
    ``targets`` (B, L), the answer's tokens and then EOS where supervised, ``IGNORE_INDEX``
    elsewhere (:func:`~open_mythos.tasks.collate`). Returns (B,) bool; a row without an
    EOS target does not match.

    Greedy decoding from the prompt emits the answer's tokens exactly when each is the
    argmax given the answer tokens before it, which is what the teacher-forced forward
    computed at that position; the answer then ends where the next token is not a byte
    (:func:`~open_mythos.tasks.decode_answer` stops at EOS, PAD or any other special id).
    So a row matches when every answer token is its position's argmax and the position
    after the answer (the EOS target) predicts a non-byte id (task text is ASCII, one
    byte per character, so the decoded text is then the answer).
    """
    if predicted.shape != targets.shape or predicted.dim() != 2:
        raise ValueError(f"predicted and targets must both be (B, L), got "
                         f"{tuple(predicted.shape)} and {tuple(targets.shape)}")
    supervised = targets != IGNORE_INDEX
    ends = (predicted < 0) | (predicted >= 256)  # the EOS target: any non-byte id ends the text
    ok = torch.where(targets == EOS_ID, ends, predicted == targets)
    return (ok | ~supervised).all(1) & (targets == EOS_ID).any(1)


@dataclass
class _TeacherForced:
    """Sums over a batch: CE and count of answer tokens; ponder, halting loop and count of
    real tokens; per example, whether its greedy answer is the target (None when not read
    off this forward: :func:`teacher_forced_matches`)."""

    ce: float
    answer_tokens: int
    expected_loops: float
    halt_loop: float
    real_tokens: int
    matches: list[bool] | None = None


def _teacher_forced(
    model: nn.Module, batch: Mapping[str, torch.Tensor], n_loops: int, early_exit: bool,
    exit_rule: ExitRule | None = None, with_matches: bool = False,
) -> _TeacherForced:
    from ..training.losses import supervised_rows  # the package imports training lazily

    device = _device(model)
    # Logits at the answer tokens only (the head and the last Coda block skip the prompt).
    rows = supervised_rows(batch["targets"])
    ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
    logits = model(ids, n_loops, act_early_exit=early_exit, logits_at=rows,
                   **({} if exit_rule is None else {"exit_rule": exit_rule}))  # (B, L, V) or (N, V)
    scored = targets.flatten() if rows is None else targets.flatten()[rows.to(device)]
    ce = F.cross_entropy(_wide(logits).reshape(-1, logits.shape[-1]), scored,
                         ignore_index=IGNORE_INDEX, reduction="sum")
    matches = None
    if with_matches:
        if rows is None:
            predicted = logits.argmax(-1)
        else:  # the argmax at the scored positions; the others are never read
            predicted = torch.full(targets.shape, -1, dtype=torch.long, device=device)
            predicted.view(-1)[rows.to(device)] = logits.argmax(-1)
        matches = teacher_forced_matches(predicted, targets).tolist()
    real = ids != PAD_ID  # (B, L)
    ponder = halt = torch.full(ids.shape, float(n_loops), device=device)
    if is_looped(model):
        rec = model.recurrent
        ponder = rec.last_ponder_cost.float()
        if rec.last_act_weights is not None:
            halt = (rec.last_act_weights > 0).sum(0).float()  # (B, L)
    return _TeacherForced(
        ce=float(ce),
        answer_tokens=int((targets != IGNORE_INDEX).sum()),
        expected_loops=float(ponder[real].sum()),
        halt_loop=float(halt[real].sum()),
        real_tokens=int(real.sum()),
        matches=matches,
    )


def _greedy_examples(
    model: nn.Module, examples: Sequence[Example], n_loops: int, early_exit: bool,
    exit_rule: ExitRule | None = None,
) -> Decoded:
    """:func:`greedy_decode` with room for the longest answer and EOS; a batch whose
    longest prompt plus longest answer would not fit ``max_seq_len`` is halved."""
    budget = max(len(ex.answer) for ex in examples) + 1
    prompt_len = 1 + max(len(ex.prompt) for ex in examples)
    if len(examples) > 1 and prompt_len + budget > model.cfg.max_seq_len:
        half = len(examples) // 2
        return (_greedy_examples(model, examples[:half], n_loops, early_exit, exit_rule)
                + _greedy_examples(model, examples[half:], n_loops, early_exit, exit_rule))
    return greedy_decode(model, [ex.prompt for ex in examples], n_loops, budget, early_exit,
                         exit_rule)


def evaluate_examples(
    model: nn.Module,
    examples: Sequence[Example],
    n_loops: int,
    early_exit: bool = True,
    batch_size: int = 64,
    exit_rule: ExitRule | None = None,
    decode: bool | None = None,
) -> dict[str, float]:
    """Loss, accuracy and loop statistics of ``model`` on ``examples`` at ``n_loops`` (every
    forward with ``exit_rule``, if given).

    Args:
        decode: whether the greedy answers are decoded over a KV cache (True) or read off
            the teacher-forced forward that gives the loss (False:
            :func:`teacher_forced_matches`; the same answers in float32 and float64 but
            at argmax ties within rounding (~1e-5 in float32), and no decoding forwards,
            so about a third of the work). None (the default):
            decode where ``early_exit`` can stop sequences (a looped model with ACT or
            ``exit_rule``), whose decoding forwards give ``loops_run`` and
            ``loops_computed``, and for a bfloat16 or float16 model, whose cached decoding
            and full forward round differently (a near-tie can go either way: decoding
            keeps every row of such a sweep on one path).

    Returns:
        ``accuracy``, ``loss``, ``expected_loops``, ``halt_loop``, ``loops_run`` and
        ``loops_computed`` as described on :class:`SweepRow` (for a fixed-depth model, and
        when nothing is decoded, the loop entries equal ``n_loops``).
    """
    if not examples:
        raise ValueError("evaluate_examples needs at least one example")
    batch_size = whole_number(batch_size, "batch_size", minimum=1)
    if decode is None:
        stops = is_looped(model) and bool(early_exit) and (exit_rule is not None
                                                           or model.cfg.use_act)
        decode = stops or any(p.dtype in _HALF for p in model.parameters())
    correct, tf_sums, loops_run, loops_computed = 0, [], [], []
    with eval_mode(model):
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo:lo + batch_size]
            batch = collate(chunk)
            _check_fits(model, batch["input_ids"].shape[1], "a teacher-forced batch")
            sums = _teacher_forced(model, batch, n_loops, early_exit, exit_rule,
                                   with_matches=not decode)
            tf_sums.append(sums)
            if sums.matches is not None:
                correct += sum(sums.matches)
                continue
            decoded = _greedy_examples(model, chunk, n_loops, early_exit, exit_rule)
            correct += sum(score(a, ex) for a, ex in zip(decoded.answers, chunk))
            loops_run.extend(decoded.loops_run)
            loops_computed.extend(decoded.loops_computed)
    real = sum(s.real_tokens for s in tf_sums)
    return {
        "accuracy": correct / len(examples),
        "loss": sum(s.ce for s in tf_sums) / max(1, sum(s.answer_tokens for s in tf_sums)),
        "expected_loops": sum(s.expected_loops for s in tf_sums) / real,
        "halt_loop": sum(s.halt_loop for s in tf_sums) / real,
        "loops_run": _mean(loops_run, default=n_loops),
        "loops_computed": _mean(loops_computed, default=n_loops),
    }


#: Parameter dtypes whose models :func:`evaluate_examples` decodes by default.
_HALF = (torch.bfloat16, torch.float16)


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _mean(values: Sequence[float], default: float) -> float:
    return sum(values) / len(values) if values else float(default)


def sweep(
    model: nn.Module,
    task: Task,
    splits: Sequence[str] | None = None,
    loops: Sequence[int] | None = None,
    n_examples: int = 128,
    early_exit: Sequence[bool] = (False, True),
    seed: int = 0,
    batch_size: int = 64,
    exit_rule: ExitRule | None = None,
    *,
    resume: Sequence[SweepRow] = (),
    on_row: Callable[[SweepRow], None] | None = None,
) -> list[SweepRow]:
    """Evaluate ``model`` on ``task`` at every loop count in ``loops``.

    Args:
        model: an :class:`~open_mythos.OpenMythos` or a fixed-depth
            :class:`~open_mythos.baseline.DenseBaseline`.
        task: the task to draw examples from.
        splits: task splits (default: :func:`eval_splits` that fit the model's
            ``max_seq_len``; a warning names any left out), or single levels such as
            ``"hops=4"`` (accuracy by difficulty, :func:`split_level`).
        loops: loop counts (default :func:`default_loops`); ignored for a fixed-depth model.
        n_examples: examples per split, the same at every loop count.
        early_exit: early-exit settings to evaluate. With ACT off and no exit rule nothing
            stops a sequence early, so each loop count is evaluated once and reported under
            every setting.
        seed: example seed.
        batch_size: examples per forward.
        exit_rule: a training-free exit rule for every forward of a looped model (each
            position stops once it fires, so loops past the point it fires cost nothing and
            change nothing); recorded in the rows.
        resume: rows of an interrupted call with the same arguments (the ``seed`` and
            ``batch_size`` too: rows do not record them). A row of the same model, task,
            exit rule and number of examples stands in for its (split, loop count, early
            exit) evaluation, which is not run again.
        on_row: called with each row as soon as it is made (or taken from ``resume``), in
            the order returned: to save progress or report it.

    Returns:
        Rows ordered by split, then loop count, then early exit; a fixed-depth model gives
        one row per split (``n_loops`` = its core depth, ``early_exit`` False).
    """
    if splits is None:
        splits = fitting_splits(task, model.cfg.max_seq_len, stacklevel=3)
    elif isinstance(splits, str):  # one split by name ("id" was read letter by letter)
        splits = [splits]
    elif not splits:
        raise ValueError("sweep needs at least one split")
    splits = list(dict.fromkeys(splits))  # a split named twice is evaluated once
    n_examples = whole_number(n_examples, "n_examples", minimum=1)  # batch_size: per call
    # A string ("off", the command line's word) iterated into characters, each read as True.
    if isinstance(early_exit, (str, bytes)) or not isinstance(early_exit, Sequence) \
            or not all(isinstance(e, bool) for e in early_exit):
        raise TypeError(f"early_exit must be a sequence of bools such as (False, True), "
                        f"got {early_exit!r}")
    looped = is_looped(model)
    if exit_rule is not None and not looped:
        raise ValueError("exit_rule needs a looped model: a fixed-depth baseline runs every "
                         "block")
    if looped:
        if loops is not None and (not isinstance(loops, Iterable) or (
                isinstance(loops, torch.Tensor) and loops.dim() == 0)):
            loops = [loops]  # one loop count (whole_number below refuses anything else)
        if loops is None:
            loops = default_loops(model)
        else:  # Python ints in order (NumPy's and 0-d tensors' too: rows are saved as JSON)
            loops = sorted({whole_number(n, "loop count", minimum=1) for n in loops})
        settings = list(dict.fromkeys(bool(e) for e in early_exit))
        if exit_rule is not None and loops and getattr(exit_rule, "min_loops", 1) > max(loops):
            raise ValueError(f"the exit rule's min_loops={exit_rule.min_loops} is above the "
                             f"deepest loop count swept ({max(loops)}): it would never fire, "
                             "and every row would be labelled with it")
    else:
        loops, settings = [model.cfg.core_layers], [False]
    if not loops or not settings:
        raise ValueError("sweep needs at least one loop count and one early-exit setting")
    # Early exit changes the result where something can stop a sequence: ACT or an exit
    # rule. Otherwise one evaluation serves every setting (its time copied with it).
    stops = looped and (model.cfg.use_act or exit_rule is not None)
    task_id, model_id = task_fingerprint(task), model_fingerprint(model)
    kind = "looped" if looped else "baseline"
    rule_text = repr(exit_rule) if looped and exit_rule is not None else ""
    done = {(r.split, r.n_loops, r.early_exit): r for r in resume
            if (r.model, r.model_id, r.task_id, r.exit_rule, r.n_examples)
            == (kind, model_id, task_id, rule_text, n_examples)}
    # Every split still to evaluate is drawn and checked against max_seq_len first: a
    # split that cannot fit fails here, not after the splits before it ran.
    drawn = check_splits_fit(model, task, [
        split for split in splits
        if any((split, n, e) not in done for n in loops for e in settings)], n_examples, seed)
    rows = []
    for split in splits:
        examples = drawn.get(split)
        for n in loops:
            computed: dict[str, float] | None = None
            took = 0.0
            for exit_early in settings:
                row = done.get((split, n, exit_early))
                if row is None:
                    if computed is None or stops:
                        start = time.perf_counter()
                        computed = evaluate_examples(model, examples, n, exit_early,
                                                     batch_size, exit_rule if looped else None)
                        took = time.perf_counter() - start
                    row = SweepRow(
                        model=kind, task=task.name, split=split, n_loops=n,
                        early_exit=exit_early, n_examples=n_examples, seconds=took,
                        **computed, exit_rule=rule_text, task_id=task_id, model_id=model_id,
                    )
                elif not stops:  # the other early-exit setting copies this evaluation
                    computed = {k: getattr(row, k) for k in _METRICS}
                    took = row.seconds
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def perplexity(
    model: nn.Module,
    token_batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    n_loops: int | None = None,
    *,
    ignore_id: int | None = None,
    early_exit: bool = False,
    exit_rule: ExitRule | None = None,
) -> Perplexity:
    """Teacher-forced next-token loss over ``token_batches``.

    Args:
        model: looped or fixed-depth model (``n_loops`` is ignored by the latter).
        token_batches: (B, L) id tensors, each predicting ``ids[:, 1:]`` from ``ids[:, :-1]``;
            or mappings with ``input_ids`` and already shifted ``targets`` (-100 ignored), as
            made by the task batching and the training data sources, and optionally an
            ``attention_mask`` (B, L) of the inputs (0 at padding), as a tokenizer's
            ``batch_encode`` gives it.
        n_loops: loops per forward (default: the model's ``max_loop_iters``).
        ignore_id: a token id (for example padding) that is never a target; in id tensors,
            also padding in the inputs: attended by no position, and a token after it (the
            first of a left-padded row) is not scored, as it would not be in the row
            alone.

    Padded rows count as they would alone: a position attends to no padding and predicts
    nothing from it (the first real token of a left-padded row is no target).
        early_exit: allow ACT early exit.
        exit_rule: a training-free exit rule applied in every forward.
    """
    n_loops = model.cfg.max_loop_iters if n_loops is None else n_loops
    device = _device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in token_batches:
            if isinstance(batch, Mapping):
                ids, targets = batch["input_ids"], batch["targets"]
                mask = batch.get("attention_mask")
            else:
                ids, targets = batch[:, :-1], batch[:, 1:]
                mask = None if ignore_id is None else ids != ignore_id
            ids, targets = ids.to(device), targets.to(device)
            if ignore_id is not None:
                targets = targets.masked_fill(targets == ignore_id, IGNORE_INDEX)
            kwargs: dict[str, Any] = {} if exit_rule is None else {"exit_rule": exit_rule}
            if mask is not None:
                mask = mask.to(device=device, dtype=torch.bool)
                targets = targets.masked_fill(~mask, IGNORE_INDEX)  # predicted from padding
                if not bool(mask.all()):
                    kwargs["attention_mask"] = mask
            logits = model(ids, n_loops, act_early_exit=early_exit, **kwargs)
            total += float(F.cross_entropy(_wide(logits).flatten(0, 1), targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("perplexity: no target tokens in token_batches")
    loss = total / count
    return Perplexity(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count)


_FIELDS = [f.name for f in dataclasses.fields(SweepRow)]
#: The evaluated quantities of a row (what :func:`evaluate_examples` returns).
_METRICS = ("accuracy", "loss", "expected_loops", "halt_loop", "loops_run", "loops_computed")


def save_rows(rows: Sequence[SweepRow], path: str | Path) -> Path:
    """Write rows as JSON (a list of objects) or CSV, chosen by the ``.json``/``.csv`` suffix."""
    path = Path(path)
    if path.suffix not in (".json", ".csv"):
        raise ValueError(f"sweep results go to a .json or .csv file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed: a process killed while writing leaves the old file whole.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == ".json":
            tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
        else:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=_FIELDS)
                writer.writeheader()
                writer.writerows(dataclasses.asdict(r) for r in rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_rows(path: str | Path) -> list[SweepRow]:
    """Inverse of :func:`save_rows`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: another suffix, or a file that does not hold sweep rows (the message
            names the first bad row).
    """
    path = Path(path)
    if path.suffix not in (".json", ".csv"):
        raise ValueError(f"sweep results are read from a .json or .csv file, got {str(path)!r}")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a JSON file of sweep rows: {err}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} holds a JSON {type(records).__name__}, not a list of "
                             "sweep rows")
    else:
        with open(path, newline="") as fh:
            records = list(csv.DictReader(fh))
    return rows_from_records(records, str(path), from_text=path.suffix == ".csv")


def rows_from_records(records: Sequence[Any], source: str, from_text: bool = False
                      ) -> list[SweepRow]:
    """Sweep rows from their dictionaries (``from_text``: every value a string, as CSV
    gives them); ValueError naming ``source`` and the first record that is not a row."""
    types = {f.name: f.type for f in dataclasses.fields(SweepRow)}
    parse = {"int": int, "float": float, "str": str, "bool": {"True": True, "False": False}.__getitem__}
    text_fields = {"n_loops", "val_loss", "perplexity", "tokens"}
    if records and isinstance(records[0], Mapping) and set(records[0]) == text_fields:
        raise ValueError(f"{source} holds a text run's validation loss at each loop count "
                         "(n_loops, val_loss, perplexity, tokens), not a task sweep's rows: "
                         "a text run's report measures its loss itself (report --run RUN "
                         "without --sweep)")
    rows = []
    for i, record in enumerate(records):
        try:
            if from_text:
                record = {k: parse[types[k]](v) for k, v in record.items()}
            row = SweepRow(**record)
            _check_row(row, types)
            rows.append(row)
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            raise ValueError(f"{source}: row {i} is not a sweep row ({type(err).__name__}: "
                             f"{err})") from None
    return rows


def _check_row(row: SweepRow, types: Mapping[str, str]) -> None:
    """TypeError/ValueError unless every field of ``row`` has its type (an int where a
    float is due is fine) and the counts and the accuracy their range."""
    for name, kind in types.items():
        value = getattr(row, name)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str), "bool": isinstance(value, bool)}[kind]
        if not ok:
            raise TypeError(f"{name}={value!r} is not a {kind}")
    if row.n_loops < 1 or row.n_examples < 1:
        raise ValueError(f"n_loops={row.n_loops} and n_examples={row.n_examples} must be >= 1")
    if not 0.0 <= row.accuracy <= 1.0:
        raise ValueError(f"accuracy={row.accuracy} is not in [0, 1]")
