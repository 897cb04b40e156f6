"""The task contract shared by every algorithmic task, and the byte-level vocabulary.

A task draws :class:`Example` s (an ASCII ``prompt`` and the ``answer`` that follows it) at
a *level*: the one difficulty knob of that task (number of bits, nesting depth, number of
digits, number of hops). Each split is a range of levels:

- ``"train"`` and ``"id"`` are the in-distribution range (the same distribution: draw them
  with different seeds);
- every ``"ood_*"`` split is a range that starts strictly above the in-distribution range,
  so a model that only memorised the training levels cannot solve it.

Every task also carries an independent solver (:meth:`Task.solve`) that parses the prompt
string and computes the answer by a different code path from the generator, and
:meth:`Task.level_of`, which measures the level of a prompt from its text. Tasks solved by
repeating one step also give the value after each step (:meth:`Task.trace`).

The vocabulary is the byte tokenizer's: token id = byte value of an ASCII character, then
``PAD_ID = 256``, ``BOS_ID = 257``, ``EOS_ID = 258`` (``VOCAB_SIZE = 259``). It is defined
here so that tasks never depend on a tokenizer implementation.
"""

from __future__ import annotations

import numbers
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259
IGNORE_INDEX = -100

ID_SPLITS = ("train", "id")
OOD_PREFIX = "ood_"


@dataclass(frozen=True)
class Example:
    """One problem: the model reads ``prompt`` and must continue with ``answer`` then EOS.

    Both strings are printable ASCII; ``answer`` is never empty.
    """

    prompt: str
    answer: str


def check_range(field: str, value: tuple[int, int], minimum: int = 1) -> tuple[int, int]:
    """Validate an inclusive ``(lo, hi)`` range of ints with ``minimum <= lo <= hi`` (4.7 is
    not truncated to 4, nor "4" parsed: a range of another type is an error)."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a (lo, hi) pair of ints, got {value!r}") from None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (lo, hi)):
        raise ValueError(f"{field} must be a (lo, hi) pair of ints, got {value!r}")
    lo, hi = int(lo), int(hi)
    if not minimum <= lo <= hi:
        raise ValueError(f"{field} must satisfy {minimum} <= lo <= hi, got {value!r}")
    return lo, hi


def check_flag(field: str, value: Any) -> bool:
    """A task's on/off knob: ``True`` or ``False`` only (the string ``"false"`` is truthy, so
    it is refused rather than read as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")
    return value


class Task(ABC):
    """An algorithmic task with in-distribution and out-of-distribution splits.

    Subclasses set :attr:`name` and :attr:`level_name`, pass their split ranges to
    ``__init__`` and implement :meth:`_generate`, :meth:`solve`, :meth:`level_of` and
    :meth:`max_len_at`. Generation is deterministic given the state of the
    ``random.Random`` passed in and never touches global random state.
    """

    name: ClassVar[str]
    level_name: ClassVar[str]

    def __init__(self, levels: Mapping[str, tuple[int, int]], min_level: int = 1) -> None:
        """``levels`` maps each split to its inclusive level range; it must contain
        ``"train"`` and ``"id"`` with equal ranges, and at least one ``"ood_*"`` split whose
        range starts above the in-distribution maximum."""
        self.min_level = min_level
        self.levels: dict[str, tuple[int, int]] = {
            split: check_range(f"{self.name} split {split!r} levels", bounds, min_level)
            for split, bounds in levels.items()
        }
        if self.levels.get("train") is None or self.levels.get("train") != self.levels.get("id"):
            raise ValueError(f"{self.name}: 'train' and 'id' must share one level range")
        bad = [s for s in self.levels if s not in ID_SPLITS and not s.startswith(OOD_PREFIX)]
        if bad:
            raise ValueError(f"{self.name}: split names must be 'train', 'id' or 'ood_*': {bad}")
        if not self.ood_splits:
            raise ValueError(f"{self.name}: at least one 'ood_*' split is required")
        id_hi = self.levels["id"][1]
        for split in self.ood_splits:
            if self.levels[split][0] <= id_hi:
                raise ValueError(
                    f"{self.name}: {split} levels {self.levels[split]} must start above the "
                    f"in-distribution maximum {id_hi}"
                )

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names: ``("train", "id", "ood_...", ...)``."""
        return tuple(self.levels)

    @property
    def ood_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.levels if s.startswith(OOD_PREFIX))

    def level_range(self, split: str) -> tuple[int, int]:
        """The inclusive ``(lo, hi)`` level range of ``split``; ValueError if unknown."""
        if split not in self.levels:
            raise ValueError(f"{self.name}: unknown split {split!r}; available: {self.splits}")
        return self.levels[split]

    def generate(self, rng: random.Random, split: str) -> Example:
        """One example of ``split``: a level drawn uniformly from its range, then
        :meth:`generate_at` that level."""
        lo, hi = self.level_range(split)
        return self._generate(rng, rng.randint(lo, hi))

    def generate_at(self, rng: random.Random, level: int) -> Example:
        """One example whose :meth:`level_of` is exactly ``level`` (any level >= the task's
        minimum, inside or outside the configured splits: for difficulty sweeps)."""
        if level < self.min_level:
            raise ValueError(f"{self.name}: level must be >= {self.min_level}, got {level}")
        return self._generate(rng, level)

    def max_len(self, split: str | None = None) -> int:
        """Upper bound on ``len(BOS + prompt + answer + EOS)`` over ``split`` (all splits if
        None): a safe ``seq_len`` for :func:`~open_mythos.tasks.batching.make_batch`."""
        splits = self.splits if split is None else (split,)
        return max(self.max_len_at(self.level_range(s)[1]) for s in splits)

    @abstractmethod
    def _generate(self, rng: random.Random, level: int) -> Example:
        """Draw one example at ``level`` (already validated)."""

    @abstractmethod
    def solve(self, prompt: str) -> str:
        """The answer to ``prompt``, computed from the prompt text alone by a code path
        independent of the generator. ValueError on a malformed prompt."""

    @abstractmethod
    def level_of(self, prompt: str) -> int:
        """The level of ``prompt``, measured from its text."""

    @abstractmethod
    def max_len_at(self, level: int) -> int:
        """Upper bound on ``len(BOS + prompt + answer + EOS)`` for examples at ``level``;
        non-decreasing in ``level``."""

    def trace(self, prompt: str) -> list[str] | None:
        """The intermediate answers of a task solved by repeating one step: the value
        reached after step 1, 2, ..., ``level``, so the last element is :meth:`solve`'s
        answer and the length is the level. None (the default) for tasks without such
        steps. Used for per-loop supervision of looped models: loop ``t`` (0-based) is
        trained to predict ``trace[min(t, len(trace) - 1)]`` at the position that predicts
        the first answer token. ValueError on a malformed prompt where implemented."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(levels={self.levels})"
