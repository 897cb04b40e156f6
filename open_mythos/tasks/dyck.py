"""Dyck language over two bracket types: nesting depth and balance."""

from __future__ import annotations

import random
from enum import Enum

from .base import Example, Task, check_range

OPEN_TO_CLOSE = {"(": ")", "[": "]"}
CLOSE_TO_OPEN = {")": "(", "]": "["}
SWAP_TYPE = {"(": "[", "[": "(", ")": "]", "]": ")"}


class DyckTarget(str, Enum):
    """What a :class:`Dyck` answer reports."""

    DEPTH = "depth"
    BALANCED = "balanced"


class Dyck(Task):
    """Bracket strings over ``()[]``.

    Prompt: brackets then ``=``, e.g. ``"([])[]="``. The bracket *directions* always form a
    Dyck word of exactly ``level`` maximum nesting depth (a random walk of ``pairs`` pairs
    capped at the level, with one nest inserted that reaches it), so the level is also
    readable from the prompt as the maximum over prefixes of ``#open - #close``.

    - ``target="depth"`` (default): the string is balanced; the answer is its maximum
      nesting depth in decimal (``"2"``). The answers of ``ood_depth`` (5..8 by default)
      are digits training never targets, so no model names them, at any loop count: the
      split measures length-and-answer extrapolation, not depth alone; ``"balanced"``
      keeps the same two answers at every depth.
    - ``target="balanced"``: with probability 1/2 the word is unbalanced without changing
      its directions; the answer is ``"1"`` if balanced else ``"0"``. From depth 2 on, two
      nested pairs are crossed (``([])`` -> ``([)]``, the inner pair retyped first if it
      has the outer's type), which keeps every type's count and non-negative prefix
      depths: counting brackets, per type or per direction, cannot tell the two classes
      apart, and matching each closer to the last open bracket (a stack) can. (A crossed
      pair with nothing inside leaves a local tell, an opener followed by the other type's
      closer, as at ``([)]``.) At depth 1 there is no nesting to cross and one bracket's
      type is swapped, which per-type counts reveal.

    Level: maximum nesting depth. Splits: ``train``/``id`` from ``depths`` (default 1..4),
    ``ood_depth`` from ``ood_depths`` (default 5..8). The walk length ``pairs`` (default
    2..10) is the same for every split; the inserted nest adds at most ``level`` pairs.
    """

    name = "dyck"
    level_name = "depth"

    def __init__(
        self,
        depths: tuple[int, int] = (1, 4),
        ood_depths: tuple[int, int] = (5, 8),
        pairs: tuple[int, int] = (2, 10),
        target: DyckTarget | str = DyckTarget.DEPTH,
    ) -> None:
        depths = check_range("depths", depths)
        ood = check_range("ood_depths", ood_depths)
        super().__init__({"train": depths, "id": depths, "ood_depth": ood})
        self.pairs = check_range("pairs", pairs)
        try:
            self.target = DyckTarget(target)
        except ValueError:
            allowed = [t.value for t in DyckTarget]
            raise ValueError(f"target must be one of {allowed}, got {target!r}") from None

    def _directions(self, rng: random.Random, depth: int) -> list[bool]:
        """A Dyck word (True = open) of maximum depth exactly ``depth``."""
        steps = 2 * rng.randint(*self.pairs)
        word, height = [], 0
        for i in range(steps):
            remaining = steps - i - 1
            moves = []
            if height < depth and height + 1 <= remaining:
                moves.append(True)
            if height > 0:
                moves.append(False)
            up = rng.choice(moves)
            word.append(up)
            height += 1 if up else -1
        cut = rng.randint(0, steps)
        base = sum(1 if up else -1 for up in word[:cut])
        nest = depth - base
        return word[:cut] + [True] * nest + [False] * nest + word[cut:]

    def _generate(self, rng: random.Random, level: int) -> Example:
        chars: list[str] = []
        stack: list[int] = []  # positions of the brackets still open
        # (outer open, outer close, inner open, inner close) of every pair directly inside
        # another, filled in as the outer pair closes.
        nested: list[tuple[int, int, int, int]] = []
        children: dict[int, list[tuple[int, int]]] = {}
        for up in self._directions(rng, level):
            if up:
                stack.append(len(chars))
                chars.append(rng.choice("(["))
            else:
                opened, closed = stack.pop(), len(chars)
                chars.append(OPEN_TO_CLOSE[chars[opened]])
                nested += [(opened, closed, *child) for child in children.pop(opened, [])]
                if stack:
                    children.setdefault(stack[-1], []).append((opened, closed))
        if self.target is DyckTarget.DEPTH:
            return Example("".join(chars) + "=", str(level))
        balanced = rng.random() < 0.5
        if not balanced:
            self._corrupt(rng, chars, nested)
        return Example("".join(chars) + "=", "1" if balanced else "0")

    @staticmethod
    def _corrupt(rng: random.Random, chars: list[str],
                 nested: list[tuple[int, int, int, int]]) -> None:
        """Unbalance a balanced word in place without changing its directions: cross a
        pair nested in another (retyped first if it has the outer's type), or at depth 1
        swap one bracket's type (see the class docstring)."""
        if not nested:
            i = rng.randrange(len(chars))
            chars[i] = SWAP_TYPE[chars[i]]
            return
        outer_open, outer_close, inner_open, inner_close = rng.choice(nested)
        if chars[inner_open] == chars[outer_open]:
            chars[inner_open] = SWAP_TYPE[chars[inner_open]]
            chars[inner_close] = SWAP_TYPE[chars[inner_close]]
        chars[inner_close], chars[outer_close] = chars[outer_close], chars[inner_close]

    def _brackets(self, prompt: str) -> str:
        body, eq, rest = prompt.partition("=")
        if not eq or rest or not body or set(body) - set(SWAP_TYPE):
            raise ValueError(f"dyck prompt must be brackets '()[]' then '=', got {prompt!r}")
        return body

    def solve(self, prompt: str) -> str:
        stack: list[str] = []
        deepest, ok = 0, True
        for ch in self._brackets(prompt):
            if ch in OPEN_TO_CLOSE:
                stack.append(ch)
                deepest = max(deepest, len(stack))
            elif stack and stack[-1] == CLOSE_TO_OPEN[ch]:
                stack.pop()
            else:
                ok = False
                break
        ok = ok and not stack
        if self.target is DyckTarget.DEPTH:
            if not ok:
                raise ValueError(f"depth target needs a balanced prompt, got {prompt!r}")
            return str(deepest)
        return "1" if ok else "0"

    def level_of(self, prompt: str) -> int:
        height = deepest = 0
        for ch in self._brackets(prompt):
            height += 1 if ch in OPEN_TO_CLOSE else -1
            deepest = max(deepest, height)
        return deepest

    def max_len_at(self, level: int) -> int:
        answer = len(str(level)) if self.target is DyckTarget.DEPTH else 1
        return 2 + 2 * (self.pairs[1] + level) + 1 + answer
