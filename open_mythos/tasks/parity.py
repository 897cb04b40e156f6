"""Cumulative parity of a bit string."""

from __future__ import annotations

import random

from .base import Example, Task, check_flag, check_range


class Parity(Task):
    """Parity of every prefix (or of the whole) of a random bit string.

    Prompt: ``n`` bits then ``=``, e.g. ``"0110101="``. Answer with ``running=True`` (the
    default): one bit per input bit, bit ``i`` the parity of bits ``0..i``
    (``"0100110"``); with ``running=False``: the parity of the whole string (``"0"``).

    Level: the number of bits ``n``. Splits: ``train``/``id`` draw ``n`` from ``lengths``
    (default 4..12), ``ood_length`` from ``ood_lengths`` (default 16..24).
    """

    name = "parity"
    level_name = "length"

    def __init__(
        self,
        lengths: tuple[int, int] = (4, 12),
        ood_lengths: tuple[int, int] = (16, 24),
        running: bool = True,
    ) -> None:
        lengths = check_range("lengths", lengths)
        ood = check_range("ood_lengths", ood_lengths)
        super().__init__({"train": lengths, "id": lengths, "ood_length": ood})
        self.running = check_flag("running", running)

    def _generate(self, rng: random.Random, level: int) -> Example:
        bits = [rng.randint(0, 1) for _ in range(level)]
        parities = [sum(bits[: i + 1]) % 2 for i in range(level)]
        answer = parities if self.running else parities[-1:]
        return Example("".join(map(str, bits)) + "=", "".join(map(str, answer)))

    def _bits(self, prompt: str) -> str:
        bits, eq, rest = prompt.partition("=")
        if not eq or rest or not bits or set(bits) - {"0", "1"}:
            raise ValueError(f"parity prompt must be bits followed by '=', got {prompt!r}")
        return bits

    def solve(self, prompt: str) -> str:
        state, out = False, []
        for bit in self._bits(prompt):
            state ^= bit == "1"
            out.append("1" if state else "0")
        return "".join(out) if self.running else out[-1]

    def level_of(self, prompt: str) -> int:
        return len(self._bits(prompt))

    def max_len_at(self, level: int) -> int:
        return 2 + (level + 1) + (level if self.running else 1)
