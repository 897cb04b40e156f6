"""In-context pointer chasing (p-hop): apply a random permutation ``k`` times."""

from __future__ import annotations

import random
import string

from .base import Example, Task, check_range

LETTERS = string.ascii_lowercase
DIGITS = string.digits


class PHop(Task):
    """Follow a random permutation of ``nodes`` letters for ``k`` hops.

    Prompt: one assignment ``x=y`` per node (meaning ``f(x) = y``), in shuffled order,
    joined by ``;``, then ``?``, the start node ``s`` and the hop count ``k`` in decimal
    (no leading zeros, may exceed 9), e.g. ``"a=c;b=a;c=b?a2"``. Answer: the node
    ``f^k(s)``, one letter (``f(f(a)) = f(c) = "b"``).

    The nodes are the first ``nodes`` lowercase letters and ``f`` is a uniformly random
    permutation of them (it may have short cycles, fixed points included); the start node
    is uniform. Every prompt of a task has the same assignments, so its length depends on
    ``k`` only through the digits of ``k``: depth, not length, is what gets harder. But
    the hop counts of ``ood_hops`` (5..8 by default) are digits no training prompt holds:
    their embeddings never train, so a model has to read a count it has never seen. And
    chance is not ``1 / nodes``: ``f^k(s) = s`` whenever the cycle through ``s`` has a
    length dividing ``k``, which a uniform permutation gives with probability
    ``#{d <= nodes : d divides k} / nodes`` (0.125 at ``k`` = 1, 0.5 at ``k`` = 6 with 8
    nodes), so "answer the start node" scores more on longer hops.

    Level: hops ``k``. Splits: ``train``/``id`` from ``hops`` (default 1..4), ``ood_hops``
    from ``ood_hops`` (default 5..8). ``nodes`` (default 8, 2..26) is the same for every
    split. :meth:`trace` gives ``[f(s), f^2(s), ..., f^k(s)]``.
    """

    name = "phop"
    level_name = "hops"

    def __init__(
        self,
        hops: tuple[int, int] = (1, 4),
        ood_hops: tuple[int, int] = (5, 8),
        nodes: int = 8,
    ) -> None:
        hops = check_range("hops", hops)
        ood = check_range("ood_hops", ood_hops)
        super().__init__({"train": hops, "id": hops, "ood_hops": ood})
        if isinstance(nodes, bool) or not isinstance(nodes, int):
            raise ValueError(f"nodes must be an int, got {nodes!r}")
        if not 2 <= nodes <= len(LETTERS):  # one lowercase letter per node
            raise ValueError(f"nodes must satisfy 2 <= nodes <= {len(LETTERS)}, got {nodes}")
        self.nodes = nodes
        self.letters = LETTERS[:nodes]

    def _generate(self, rng: random.Random, level: int) -> Example:
        images = list(self.letters)
        rng.shuffle(images)
        f = dict(zip(self.letters, images))
        statements = [f"{x}={f[x]}" for x in self.letters]
        rng.shuffle(statements)
        start = rng.choice(self.letters)
        # The answer by cycle arithmetic (the solver iterates f instead): the cycle through
        # ``start`` in visiting order, indexed by k modulo its length.
        cycle, node = [start], f[start]
        while node != start:
            cycle.append(node)
            node = f[node]
        answer = cycle[level % len(cycle)]
        return Example(";".join(statements) + "?" + start + str(level), answer)

    def _parse(self, prompt: str) -> tuple[dict[str, str], str, int]:
        """``(f, start, k)`` from a prompt; ValueError unless ``f`` assigns every node
        exactly once to a node, as a permutation, and the query is a node and ``k >= 1``."""
        body, mark, query = prompt.partition("?")
        count = query[1:]
        if (
            not mark
            or len(query) < 2
            or query[0] not in self.letters
            or set(count) - set(DIGITS)
            or count[0] == "0"
        ):
            raise ValueError(
                f"phop prompt must end with '?<node><hops>' (a node of {self.letters!r}, "
                f"then an integer >= 1 without leading zeros), got {prompt!r}"
            )
        f: dict[str, str] = {}
        for stmt in body.split(";"):
            lhs, eq, rhs = stmt.partition("=")
            if (
                not eq
                or len(lhs) != 1
                or lhs not in self.letters
                or len(rhs) != 1
                or rhs not in self.letters
            ):
                raise ValueError(
                    f"bad assignment {stmt!r} in {prompt!r}: expected 'x=y' with x, y nodes "
                    f"of {self.letters!r}"
                )
            if lhs in f:
                raise ValueError(f"node {lhs!r} assigned twice in {prompt!r}")
            f[lhs] = rhs
        missing = [x for x in self.letters if x not in f]
        if missing:
            raise ValueError(f"nodes {missing} are never assigned in {prompt!r}")
        if len(set(f.values())) != len(f):
            raise ValueError(f"assignments in {prompt!r} are not a permutation of the nodes")
        return f, query[0], int(count)

    def trace(self, prompt: str) -> list[str]:
        """The node after each hop, ``[f(s), f^2(s), ..., f^k(s)]``, e.g. ``["c", "b"]``
        for ``"a=c;b=a;c=b?a2"``: the last is the answer, the length is ``k``."""
        f, node, k = self._parse(prompt)
        path = []
        for _ in range(k):
            node = f[node]
            path.append(node)
        return path

    def solve(self, prompt: str) -> str:
        return self.trace(prompt)[-1]

    def level_of(self, prompt: str) -> int:
        return self._parse(prompt)[2]

    def max_len_at(self, level: int) -> int:
        prompt = (4 * self.nodes - 1) + 2 + len(str(level))
        return 2 + prompt + 1
