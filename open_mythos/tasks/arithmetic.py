"""Digit arithmetic: prefix sums modulo m, and multi-digit addition."""

from __future__ import annotations

import random

from .base import Example, Task, check_flag, check_range

DIGITS = "0123456789"


def _digits_before_eq(prompt: str, task: str) -> str:
    body, eq, rest = prompt.partition("=")
    if not eq or rest or not body or set(body) - set(DIGITS):
        raise ValueError(f"{task} prompt must be digits followed by '=', got {prompt!r}")
    return body


class ModSum(Task):
    """Prefix sums of a digit string modulo ``modulus``.

    Prompt: ``n`` digits (0-9) then ``=``, e.g. ``"3141="``. Answer: one digit per input
    digit, digit ``i`` = (sum of digits ``0..i``) mod ``modulus``; with the default modulus
    10: ``"3489"``.

    Level: the number of digits ``n``. Splits: ``train``/``id`` from ``lengths`` (default
    2..8), ``ood_length`` from ``ood_lengths`` (default 12..16).
    """

    name = "modsum"
    level_name = "length"

    def __init__(
        self,
        lengths: tuple[int, int] = (2, 8),
        ood_lengths: tuple[int, int] = (12, 16),
        modulus: int = 10,
    ) -> None:
        lengths = check_range("lengths", lengths)
        ood = check_range("ood_lengths", ood_lengths)
        super().__init__({"train": lengths, "id": lengths, "ood_length": ood})
        if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= 10:
            raise ValueError(f"modulus must be in 2..10 (one answer digit each), got {modulus}")
        self.modulus = int(modulus)

    def _generate(self, rng: random.Random, level: int) -> Example:
        digits = [rng.randrange(10) for _ in range(level)]
        sums = [sum(digits[: i + 1]) % self.modulus for i in range(level)]
        return Example("".join(map(str, digits)) + "=", "".join(map(str, sums)))

    def solve(self, prompt: str) -> str:
        acc, out = 0, []
        for ch in _digits_before_eq(prompt, self.name):
            acc = (acc + DIGITS.index(ch)) % self.modulus
            out.append(DIGITS[acc])
        return "".join(out)

    def level_of(self, prompt: str) -> int:
        return len(_digits_before_eq(prompt, self.name))

    def max_len_at(self, level: int) -> int:
        return 2 + (level + 1) + level


class Addition(Task):
    """Sum of two non-negative integers.

    Prompt: ``"a+b="``, e.g. ``"123+4567="``; answer the decimal sum, ``"4690"``. Numbers
    have no leading zeros. With ``reverse=True`` every number (both operands and the answer)
    is written least-significant digit first (``"321+7654="`` -> ``"0964"``), the order in
    which carries propagate.

    Level: the digit count of the longer operand; one operand has exactly ``level`` digits,
    the other 1..``level``. Splits: ``train``/``id`` from ``digits`` (default 1..5),
    ``ood_digits`` from ``ood_digits`` (default 6..8).
    """

    name = "addition"
    level_name = "digits"

    def __init__(
        self,
        digits: tuple[int, int] = (1, 5),
        ood_digits: tuple[int, int] = (6, 8),
        reverse: bool = False,
    ) -> None:
        digits = check_range("digits", digits)
        ood = check_range("ood_digits", ood_digits)
        super().__init__({"train": digits, "id": digits, "ood_digits": ood})
        self.reverse = check_flag("reverse", reverse)

    def _number(self, rng: random.Random, n_digits: int) -> int:
        low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
        return rng.randint(low, 10**n_digits - 1)

    def _write(self, value: int) -> str:
        text = str(value)
        return text[::-1] if self.reverse else text

    def _generate(self, rng: random.Random, level: int) -> Example:
        a = self._number(rng, level)
        b = self._number(rng, rng.randint(1, level))
        if rng.random() < 0.5:
            a, b = b, a
        return Example(f"{self._write(a)}+{self._write(b)}=", self._write(a + b))

    def _operands(self, prompt: str) -> tuple[str, str]:
        """Both operands as digit strings, least-significant digit first."""
        body, eq, rest = prompt.partition("=")
        left, plus, right = body.partition("+")
        if not (eq and plus) or rest or not left or not right or set(left + right) - set(DIGITS):
            raise ValueError(f"addition prompt must be 'digits+digits=', got {prompt!r}")
        return (left, right) if self.reverse else (left[::-1], right[::-1])

    def solve(self, prompt: str) -> str:
        left, right = self._operands(prompt)
        carry, out = 0, []
        for i in range(max(len(left), len(right))):
            column = carry
            column += DIGITS.index(left[i]) if i < len(left) else 0
            column += DIGITS.index(right[i]) if i < len(right) else 0
            carry, digit = divmod(column, 10)
            out.append(DIGITS[digit])
        if carry:
            out.append(DIGITS[carry])
        lsb_first = "".join(out).rstrip("0") or "0"
        return lsb_first if self.reverse else lsb_first[::-1]

    def level_of(self, prompt: str) -> int:
        return max(len(x) for x in self._operands(prompt))

    def max_len_at(self, level: int) -> int:
        return 2 + (2 * level + 2) + (level + 1)
