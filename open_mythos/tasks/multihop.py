"""Variable chains (p-hop pointer following) with distractor assignments."""

from __future__ import annotations

import random
import string

from .base import Example, Task, check_range

VARIABLES = string.ascii_lowercase
VALUES = string.digits


class MultiHop(Task):
    """Follow a chain of variable assignments to a digit.

    Prompt: assignments ``x=y`` (``x`` a lowercase letter, ``y`` a lowercase letter or a
    digit) joined by ``;``, then ``?`` and the queried variable, e.g. ``"c=7;a=b;d=c;b=c?a"``
    (``a -> b -> c -> 7``). Answer: the digit reached, ``"7"`` (with ``open_ends``, the
    chain may end at a variable instead: see below).

    Every variable is assigned exactly once, and each assignment points only to a digit or
    to a variable created before it, so the assignments form an acyclic forest. The query
    chain has exactly ``level`` assignments (``"a=7?a"`` is 1 hop); each of the
    ``distractors`` extra variables points, with equal probability, to a random digit or to
    a random earlier variable (possibly inside the query chain, never the reverse). The
    assignments are shuffled.

    Level: hops. Splits: ``train``/``id`` from ``hops`` (default 1..3), ``ood_hops`` from
    ``ood_hops`` (default 4..8). ``distractors`` (default 1..4) is the same for every split.

    ``statements``: when set, every prompt holds exactly this many assignments (the
    distractors fill the chain up to it, and ``distractors`` is ignored), so every split has
    the same prompt length: a longer chain is then harder only because it needs more hops,
    not because its prompt is longer than any seen in training.

    ``digits`` (with ``statements``): every prompt holds exactly this many digit-valued
    assignments, with distinct digits (the answer and ``digits - 1`` distractors; the other
    distractors point to earlier variables). Without it, a fixed-length prompt holds fewer
    digits the longer its chain (about ``1 + (statements - hops) / 2``), so a long chain
    can be answered by elimination, without following it; with it, guessing a digit from
    the prompt is right ``1 / digits`` of the time at every chain length. A chain that ends
    open (``open_ends``) has a letter for its answer and ``digits - 1`` digits in its
    prompt, so the count of digits tells an open end from a closed one (the deepest chain
    leaves no room for another digit-valued distractor); ``decoys`` hides it instead.

    ``open_ends`` (default 0): the probability that the query chain ends, instead of at a
    digit, at a variable that no assignment defines (``"a=b;b=x?a"``: the answer is
    ``"x"``). A chain of ``level`` hops then still has ``level`` assignments, so the
    prompt length does not change. With only digits at the ends, every trace names a digit
    from its last hop on, so loop ``t`` of a model trained on chains of at most ``t`` hops
    can learn to name a digit whatever the prompt says; with open ends it has to look the
    current value up to know whether the chain goes on (``docs/depth_extrapolation.md``).

    ``decoys`` (with ``statements``; default False): the distractors form decoy chains
    shaped like the query chain: as many chains of ``level`` assignments as fit, the
    remainder one shorter chain, each ending (as the query chain does) at a digit, or with
    probability ``open_ends`` at a variable assigned nowhere; digit ends are distinct while
    there are enough digits. Otherwise distractors point at random, so the query chain's
    end is the only open end and usually the only digit some assignment leads to: one
    look-up names it without following the chain (``experiments/multihop_shortcuts.py``).
    With decoys, a rule that looks at the chain ends alone picks among every chain's.

    ``separator`` (default ``";"``): the string between assignments. ``""`` writes them
    back to back (``"c=7a=bd=cb=c?a"``): every assignment is still exactly ``x=y``, so the
    ``=`` marks both sides, and a prompt of ``N`` assignments is ``N - 1`` tokens shorter.
    """

    name = "multihop"
    level_name = "hops"
    decoys = False

    def __init__(
        self,
        hops: tuple[int, int] = (1, 3),
        ood_hops: tuple[int, int] = (4, 8),
        distractors: tuple[int, int] = (1, 4),
        statements: int | None = None,
        digits: int | None = None,
        separator: str = ";",
        open_ends: float = 0.0,
        decoys: bool = False,
    ) -> None:
        hops = check_range("hops", hops)
        ood = check_range("ood_hops", ood_hops)
        super().__init__({"train": hops, "id": hops, "ood_hops": ood})
        self.distractors = check_range("distractors", distractors, minimum=0)
        if (isinstance(open_ends, bool) or not isinstance(open_ends, (int, float))
                or not 0.0 <= open_ends <= 1.0):
            raise ValueError(f"open_ends must be a probability in [0, 1], got {open_ends!r}")
        self.open_ends = float(open_ends)
        self.statements = statements
        if statements is not None:
            if isinstance(statements, bool) or not isinstance(statements, int):
                raise ValueError(f"statements must be an integer, got {statements!r}")
            deepest = max(hops[1], ood[1])
            # An open end takes a variable of its own besides the statements' (with random
            # distractors instead, an example at the limit draws one distractor fewer).
            room = len(VARIABLES) - (self.open_ends > 0)
            why = " (one is kept for the open end of open_ends > 0)" if self.open_ends else ""
            if not deepest <= statements <= room:
                raise ValueError(f"statements must be in [{deepest}, {room}] (the longest "
                                 f"chain to the number of variables{why}), got {statements}")
        elif ood[1] + max(self.distractors[1], self.open_ends > 0) > len(VARIABLES):
            # (At the limit an open end takes a distractor's variable: with none, its own.)
            raise ValueError(
                f"ood_hops[1] + distractors[1] must be <= {len(VARIABLES)} variables, "
                f"got {ood[1]} + {self.distractors[1]}"
                + (" (an open end of open_ends > 0 needs one: distractors[1] counts as 1)"
                   if self.open_ends > 0 and not self.distractors[1] else ""))
        if not isinstance(decoys, bool):
            raise ValueError(f"decoys must be true or false, got {decoys!r}")
        if decoys:
            if statements is None:
                raise ValueError("decoys needs statements (a fixed number of assignments)")
            if digits is not None:
                raise ValueError("decoys and digits do not combine: the decoy chains' ends "
                                 "decide the prompt's digits")
            # Set only when on (a class default otherwise): a task's attributes are its
            # fingerprint (sweep files), which existing tasks keep.
            self.decoys = True
        if not isinstance(separator, str) or separator not in ("", ";"):
            raise ValueError(f"separator must be ';' or '' (no separator), got {separator!r}")
        self.separator = separator
        self.digits = digits
        if digits is not None:
            if statements is None:
                raise ValueError("digits needs statements (a fixed number of assignments)")
            if isinstance(digits, bool) or not isinstance(digits, int):
                raise ValueError(f"digits must be an integer, got {digits!r}")
            most = min(len(VALUES), statements - max(hops[1], ood[1]) + 1)
            if not 1 <= digits <= most:
                raise ValueError(f"digits must be in [1, {most}] (distinct digits, one per "
                                 f"distractor of the longest chain plus the answer), got {digits}")

    def _generate(self, rng: random.Random, level: int) -> Example:
        if self.statements is not None and level > self.statements:
            raise ValueError(f"level {level} needs more than statements={self.statements} assignments")
        if self.decoys:
            return self._generate_decoys(rng, level)
        n_extra = (rng.randint(*self.distractors) if self.statements is None
                   else self.statements - level)
        # Drawn only when asked for: the examples of open_ends=0 are those of before.
        n_open = int(self.open_ends > 0 and rng.random() < self.open_ends)  # 1: open end
        if self.statements is None:  # at the limit, the open end's variable is a distractor's
            n_extra = max(0, min(n_extra, len(VARIABLES) - level - n_open))
        if level + n_extra + n_open > len(VARIABLES):
            raise ValueError(f"level {level} needs more than {len(VARIABLES)} variables"
                             + (" (one is the open end)" if n_open else ""))
        if self.digits is not None and n_extra < self.digits - 1:
            raise ValueError(f"level {level} leaves {n_extra} distractors for the "
                             f"{self.digits - 1} digit-valued ones of digits={self.digits}")
        names = rng.sample(VARIABLES, level + n_extra + n_open)
        chain, extra = names[:level], names[level + n_open:]
        if self.digits is None:
            answer, others, digit_vars = rng.choice(VALUES), [], None
        else:
            answer, *others = rng.sample(VALUES, self.digits)
            digit_vars = set(rng.sample(extra, self.digits - 1))
        if n_open:
            answer = names[level]  # assigned nowhere
        statements = [f"{chain[-1]}={answer}"]
        statements += [f"{chain[i]}={chain[i + 1]}" for i in range(level - 1)]
        created = list(chain)
        for var in extra:
            if digit_vars is None:
                target = rng.choice(created) if rng.random() < 0.5 else rng.choice(VALUES)
            else:
                target = others.pop() if var in digit_vars else rng.choice(created)
            statements.append(f"{var}={target}")
            created.append(var)
        rng.shuffle(statements)
        return Example(self.separator.join(statements) + "?" + chain[0], answer)

    def _generate_decoys(self, rng: random.Random, level: int) -> Example:
        """The query chain of ``level`` assignments and decoy chains like it (``decoys``)."""
        lengths = [level]
        left = self.statements - level
        while left:
            lengths.append(min(level, left))
            left -= lengths[-1]
        # Which chains end open: each with probability open_ends; where fewer variables are
        # left than such ends, the ones kept are drawn uniformly (the query chain is not
        # favoured).
        room = len(VARIABLES) - self.statements
        open_end = [self.open_ends > 0 and rng.random() < self.open_ends for _ in lengths]
        if sum(open_end) > room:
            kept = set(rng.sample([i for i, o in enumerate(open_end) if o], room))
            open_end = [i in kept for i in range(len(lengths))]
        names = rng.sample(VARIABLES, self.statements + sum(open_end))
        n_digit = len(lengths) - sum(open_end)
        digits = rng.sample(VALUES, min(n_digit, len(VALUES)))
        if n_digit > len(VALUES):  # repeats, placed at random (not on the first chains)
            digits += [rng.choice(VALUES) for _ in range(n_digit - len(digits))]
            rng.shuffle(digits)
        statements, query, answer = [], "", ""
        for i, (length, is_open) in enumerate(zip(lengths, open_end)):
            chain, names = names[:length], names[length:]
            if is_open:
                end, names = names[0], names[1:]
            else:
                end = digits.pop()
            statements.append(f"{chain[-1]}={end}")
            statements += [f"{chain[j]}={chain[j + 1]}" for j in range(length - 1)]
            if i == 0:
                query, answer = chain[0], end
        rng.shuffle(statements)
        return Example(self.separator.join(statements) + "?" + query, answer)

    def trace(self, prompt: str) -> list[str]:
        """The values visited from the query to a digit, one per hop, e.g. ``["b", "c",
        "7"]`` for ``a -> b -> c -> 7``: the last is the answer, the length is the level.
        With ``open_ends`` a chain may also end at a variable that is never assigned (not
        the query itself); without, that is an error."""
        body, mark, query = prompt.partition("?")
        if not mark or len(query) != 1 or query not in VARIABLES:
            raise ValueError(f"multihop prompt must end with '?<variable>', got {prompt!r}")
        table: dict[str, str] = {}
        if self.separator:
            stmts = body.split(self.separator)
        else:  # back to back: every assignment is 3 characters
            if len(body) % 3:
                raise ValueError(f"assignments without a separator must be 3 characters each, "
                                 f"got {prompt!r}")
            stmts = [body[i:i + 3] for i in range(0, len(body), 3)]
        for stmt in stmts:
            lhs, eq, rhs = stmt.partition("=")
            if (
                not eq
                or len(lhs) != 1
                or lhs not in VARIABLES
                or len(rhs) != 1
                or rhs not in VARIABLES + VALUES
            ):
                raise ValueError(f"bad assignment {stmt!r} in {prompt!r}")
            if lhs in table:
                raise ValueError(f"variable {lhs!r} assigned twice in {prompt!r}")
            table[lhs] = rhs
        path, current = [], query
        while current not in VALUES:
            if current not in table:
                if path and self.open_ends > 0:
                    break  # an open end: the chain stops at a variable nobody assigns
                raise ValueError(f"variable {current!r} is never assigned in {prompt!r}")
            if len(path) > len(table):
                raise ValueError(f"cyclic assignments in {prompt!r}")
            current = table[current]
            path.append(current)
        return path

    def solve(self, prompt: str) -> str:
        return self.trace(prompt)[-1]

    def level_of(self, prompt: str) -> int:
        return len(self.trace(prompt))

    def max_len_at(self, level: int) -> int:
        statements = level + self.distractors[1] if self.statements is None else self.statements
        return 2 + ((3 + len(self.separator)) * statements - len(self.separator) + 2) + 1
