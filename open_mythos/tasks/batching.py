"""Turning task examples into training batches, and scoring predictions.

Sequence layout of one example (byte vocabulary of :mod:`open_mythos.tasks.base`)::

    ids   = BOS  p_0 ... p_{n-1}  a_0 ... a_{m-1}  EOS
    mask  =  0    0  ...    0      1  ...    1      1      (loss on answer + EOS only)

A batch right-pads the sequences with PAD and shifts targets by one for next-token
prediction: ``targets[b, t] = ids[b, t + 1]`` where position ``t + 1`` is an answer or EOS
token, else ``IGNORE_INDEX`` (-100). So the first supervised position is the last prompt
character, whose target is the first answer character.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .base import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, Example, Task


def encode_text(text: str) -> list[int]:
    """Byte ids of an ASCII string; ValueError on any non-ASCII character."""
    try:
        return list(text.encode("ascii"))
    except UnicodeEncodeError:
        raise ValueError(f"task text must be ASCII, got {text!r}") from None


def _encode_lists(ex: Example) -> tuple[list[int], int]:
    """``(BOS + prompt + answer + EOS, index of the first answer token)``."""
    prompt = encode_text(ex.prompt)
    return [BOS_ID, *prompt, *encode_text(ex.answer), EOS_ID], 1 + len(prompt)


def encode_example(ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, loss_mask)``: ids (N,) long = BOS + prompt + answer + EOS; loss_mask (N,) bool,
    True exactly on the answer and EOS tokens."""
    ids, start = _encode_lists(ex)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[start:] = True
    return torch.tensor(ids, dtype=torch.long), mask


def encode_prompt(prompt: str) -> torch.Tensor:
    """(n + 1,) long: BOS + prompt, the input to generate an answer from."""
    return torch.tensor([BOS_ID, *encode_text(prompt)], dtype=torch.long)


def decode_answer(ids: Sequence[int] | torch.Tensor) -> str:
    """Text of generated ids up to (not including) the first EOS, PAD or other special id."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    chars = []
    for i in values:
        if not 0 <= i < 256:
            break
        chars.append(chr(i))
    return "".join(chars)


def collate(examples: Sequence[Example], seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch of ``examples``.

    Returns a dict of tensors (B = len(examples), L = ``seq_len`` or the longest sequence):

    - ``input_ids`` (B, L) long: BOS + prompt + answer + EOS, then PAD;
    - ``targets`` (B, L) long: ``input_ids[:, t + 1]`` where that token is an answer or EOS
      token, else -100;
    - ``answer_start`` (B,) long: index in ``input_ids`` of the first answer token
      (= number of BOS + prompt tokens, the prompt length to generate from);
    - ``lengths`` (B,) long: number of non-PAD tokens.

    ValueError if an example does not fit in ``seq_len`` (never truncates silently).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    encoded = [_encode_lists(ex) for ex in examples]
    longest = max(len(ids) for ids, _ in encoded)
    length = longest if seq_len is None else seq_len
    if longest > length:
        raise ValueError(f"an example has {longest} tokens, more than seq_len={seq_len}")
    input_ids, targets = [], []
    for ids, start in encoded:
        pad = length - len(ids)
        input_ids.append(ids + [PAD_ID] * pad)
        # Position t predicts ids[t + 1]; supervised for t + 1 in [start, len(ids)).
        targets.append([IGNORE_INDEX] * (start - 1) + ids[start:] + [IGNORE_INDEX] * (pad + 1))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "answer_start": torch.tensor([start for _, start in encoded], dtype=torch.long),
        "lengths": torch.tensor([len(ids) for ids, _ in encoded], dtype=torch.long),
    }


def check_task(task: Task, splits: Sequence[str] | None = None, with_trace: bool = False,
               n_examples: int = 8) -> None:
    """Draw ``n_examples`` examples of each split (all by default) from a fixed seed and
    check what the library relies on, so that a user task's mistake is named before any
    training: :meth:`Task.generate` returns :class:`Example`\\ s of ASCII strings with an
    answer, each fits :meth:`Task.max_len` (its :meth:`Task.max_len_at`), and with
    ``with_trace`` each has a :meth:`Task.trace` (see :func:`trace_targets`).

    Raises:
        ValueError: naming the task's class and the method at fault.
    """
    where = f"task {task.name!r} ({type(task).__module__}.{type(task).__qualname__})"
    for split in task.splits if splits is None else splits:
        rng = random.Random(f"check/{split}")
        for _ in range(n_examples):
            ex = task.generate(rng, split)
            if not isinstance(ex, Example):
                raise ValueError(f"{where}: _generate returned a {type(ex).__name__}, not an "
                                 "Example(prompt, answer)")
            for field in ("prompt", "answer"):
                text = getattr(ex, field)
                if not isinstance(text, str) or not text.isascii():
                    raise ValueError(f"{where}: _generate gave {field}={text!r}; prompt and "
                                     "answer are ASCII strings")
            if not ex.answer:
                raise ValueError(f"{where}: _generate gave an empty answer for "
                                 f"{ex.prompt!r}: the model would be trained to stop at once")
            length = len(_encode_lists(ex)[0])
            if length > task.max_len(split):
                raise ValueError(
                    f"{where}: an example of split {split!r} has {length} tokens (BOS, prompt, "
                    f"answer, EOS: {ex.prompt!r} -> {ex.answer!r}), more than max_len_at "
                    f"allows ({task.max_len(split)})")
            if with_trace:
                trace_targets(task, [ex])


def trace_targets(task: Task, examples: Sequence[Example]) -> torch.Tensor:
    """(B, K) long: token ``[i, t]`` is the first token of step ``t + 1`` of example ``i``'s
    :meth:`Task.trace` (K = the longest trace; a shorter trace repeats its last step, the
    answer, so column ``min(t, K) - 1`` is what loop ``t`` should name at the position
    before the answer: one token per step, the step's first).

    ValueError if the task defines no trace, or one that is empty, has an empty step, or
    does not end at the example's answer (its first token).
    """
    traces = [task.trace(ex.prompt) for ex in examples]
    if any(t is None for t in traces):
        raise ValueError(f"task {task.name!r} defines no per-step trace (Task.trace)")
    for ex, trace in zip(examples, traces):
        # One target per loop, at the position before the answer: each step's first token.
        if (not isinstance(trace, (list, tuple)) or not trace
                or not all(isinstance(step, str) and step for step in trace)):
            raise ValueError(f"task {task.name!r}: trace({ex.prompt!r}) gave {trace!r}; a "
                             "trace is a non-empty list of non-empty strings")
        if trace[-1][0] != ex.answer[0]:
            raise ValueError(f"task {task.name!r}: trace({ex.prompt!r}) ends at {trace[-1]!r}, "
                             f"not at the answer {ex.answer!r}")
    longest = max(len(t) for t in traces)
    rows = [[encode_text(step)[0] for step in t] for t in traces]
    return torch.tensor([r + r[-1:] * (longest - len(r)) for r in rows], dtype=torch.long)


def make_batch(
    task: Task,
    rng: random.Random,
    split: str,
    batch_size: int,
    seq_len: int | None = None,
    with_trace: bool = False,
) -> dict[str, torch.Tensor]:
    """``batch_size`` fresh examples of ``task``'s ``split``, collated by :func:`collate`;
    with ``with_trace`` also ``"trace"``, the per-step targets of :func:`trace_targets`.

    ``seq_len`` defaults to ``task.max_len(split)``, so every batch of a split has one shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = [task.generate(rng, split) for _ in range(batch_size)]
    batch = collate(examples, task.max_len(split) if seq_len is None else seq_len)
    if with_trace:
        batch["trace"] = trace_targets(task, examples)
    return batch


def score(predicted_answer: str, example: Example) -> bool:
    """Exact match of a predicted answer (text before EOS) against ``example.answer``."""
    return predicted_answer == example.answer
