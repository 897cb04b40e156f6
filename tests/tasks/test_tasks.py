"""Algorithmic tasks: generators against independent solvers, split difficulty, batching."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from open_mythos.tasks import (
    BOS_ID,
    EOS_ID,
    IGNORE_INDEX,
    PAD_ID,
    TASKS,
    VOCAB_SIZE,
    Addition,
    Dyck,
    Example,
    ModSum,
    MultiHop,
    Parity,
    PHop,
    Task,
    collate,
    decode_answer,
    encode_example,
    encode_prompt,
    get_task,
    list_tasks,
    make_batch,
    register_task,
    score,
)

N_SAMPLES = 300

VARIANTS: dict[str, Task] = {
    "parity": Parity(),
    "parity_final": Parity(running=False),
    "dyck": Dyck(),
    "dyck_balanced": Dyck(target="balanced"),
    "modsum": ModSum(),
    "modsum_7": ModSum(modulus=7),
    "addition": Addition(),
    "addition_reverse": Addition(reverse=True),
    "multihop": MultiHop(),
    "multihop_no_distractors": MultiHop(distractors=(0, 0)),
    "multihop_fixed_length": MultiHop(ood_hops=(4, 6), statements=8),
    "multihop_fixed_digits": MultiHop(ood_hops=(4, 6), statements=10, digits=3),
    "multihop_no_separator": MultiHop(ood_hops=(4, 6), statements=8, separator=""),
    "multihop_open_ends": MultiHop(ood_hops=(4, 6), statements=8, open_ends=0.5),
    "multihop_decoys": MultiHop(ood_hops=(4, 6), statements=12, open_ends=0.5, decoys=True),
    "phop": PHop(),
    "phop_2": PHop(nodes=2),
}



def fixed_length(task: Task) -> bool:
    """Whether the prompt length does not grow with the level: a p-hop prompt lists the
    whole permutation at every level (only the digits of the hop count grow); a multihop
    task with ``statements`` set pads every chain with distractors to that count."""
    return task.name == "phop" or getattr(task, "statements", None) is not None


def _samples(task: Task, split: str, seed: int = 0, n: int = N_SAMPLES) -> list[Example]:
    rng = random.Random(seed)
    return [task.generate(rng, split) for _ in range(n)]


@pytest.fixture(params=sorted(VARIANTS))
def task(request) -> Task:
    return VARIANTS[request.param]


def test_every_registered_task_has_a_variant() -> None:
    assert {type(t).name for t in VARIANTS.values()} == set(TASKS)


def test_generated_answers_match_independent_solver(task: Task) -> None:
    for split in task.splits:
        lo, hi = task.level_range(split)
        for ex in _samples(task, split):
            assert ex.answer, ex
            assert task.solve(ex.prompt) == ex.answer, (split, ex)
            assert lo <= task.level_of(ex.prompt) <= hi, (split, ex)
            ids, _ = encode_example(ex)
            assert len(ids) <= task.max_len(split), (split, ex)
            assert ex.prompt.isascii() and ex.prompt.isprintable(), ex


def test_generate_at_hits_the_exact_level(task: Task) -> None:
    rng = random.Random(3)
    for level in range(task.min_level, task.level_range(task.ood_splits[-1])[1] + 3):
        for _ in range(20):
            ex = task.generate_at(rng, level)
            assert task.level_of(ex.prompt) == level
            assert task.solve(ex.prompt) == ex.answer
            assert len(encode_example(ex)[0]) <= task.max_len_at(level)
    with pytest.raises(ValueError, match="level"):
        task.generate_at(rng, task.min_level - 1)


def test_ood_splits_are_strictly_harder(task: Task) -> None:
    assert task.splits[:2] == ("train", "id") and task.ood_splits
    id_examples = _samples(task, "id")
    id_levels = [task.level_of(ex.prompt) for ex in id_examples]
    id_prompt_len = sum(len(ex.prompt) for ex in id_examples) / len(id_examples)
    for split in task.ood_splits:
        ood_examples = _samples(task, split)
        assert min(task.level_of(ex.prompt) for ex in ood_examples) > max(id_levels)
        ood_prompt_len = sum(len(ex.prompt) for ex in ood_examples) / len(ood_examples)
        if fixed_length(task):
            assert ood_prompt_len >= id_prompt_len
            assert task.max_len(split) >= task.max_len("id")
        else:
            assert ood_prompt_len > id_prompt_len
            assert task.max_len(split) > task.max_len("id")


def test_in_distribution_prompts_are_short(task: Task) -> None:
    assert task.max_len("id") <= 66
    assert max(len(ex.prompt) for ex in _samples(task, "train")) < 64


def test_split_covers_its_level_range(task: Task) -> None:
    for split in task.splits:
        lo, hi = task.level_range(split)
        levels = {task.level_of(ex.prompt) for ex in _samples(task, split)}
        assert levels == set(range(lo, hi + 1)), split


def test_generation_is_deterministic_given_the_seed(task: Task) -> None:
    for split in task.splits:
        assert _samples(task, split, seed=7, n=50) == _samples(task, split, seed=7, n=50)
        assert _samples(task, split, seed=7, n=50) != _samples(task, split, seed=8, n=50)


def test_generation_leaves_global_random_state_alone(task: Task) -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    _samples(task, "train", n=20)
    assert random.random() == expected


@pytest.mark.parametrize(
    ("task", "prompt", "answer", "level"),
    [
        (Parity(), "0110101=", "0100110", 7),
        (Parity(), "1=", "1", 1),
        (Parity(running=False), "0110101=", "0", 7),
        (Parity(running=False), "111=", "1", 3),
        (Dyck(), "([])[]=", "2", 2),
        (Dyck(), "()=", "1", 1),
        (Dyck(), "[(([]))]()=", "4", 4),
        (Dyck(target="balanced"), "([])[]=", "1", 2),
        (Dyck(target="balanced"), "([)]=", "0", 2),
        (Dyck(target="balanced"), "(]=", "0", 1),
        (Dyck(target="balanced"), "(()=", "0", 2),
        (Dyck(target="balanced"), "())(=", "0", 1),
        (ModSum(), "3141=", "3489", 4),
        (ModSum(), "99999=", "98765", 5),
        (ModSum(modulus=7), "3141=", "3412", 4),
        (Addition(), "123+4567=", "4690", 4),
        (Addition(), "999+1=", "1000", 3),
        (Addition(), "0+0=", "0", 1),
        (Addition(reverse=True), "321+7654=", "0964", 4),
        (Addition(reverse=True), "99+1=", "001", 2),
        (MultiHop(), "c=7;a=b;d=c;b=c?a", "7", 3),
        (MultiHop(), "a=7?a", "7", 1),
        (MultiHop(), "x=1;a=x;y=a;z=3?y", "1", 3),
        (MultiHop(separator=""), "c=7a=bd=cb=c?a", "7", 3),
        (MultiHop(separator=""), "a=7?a", "7", 1),
        (MultiHop(open_ends=0.5), "a=b;b=x?a", "x", 2),
        (MultiHop(open_ends=0.5), "c=7;a=b;d=c;b=c?a", "7", 3),
        (MultiHop(open_ends=1.0, separator=""), "a=b?a", "b", 1),
        (PHop(nodes=3), "a=c;b=a;c=b?a2", "b", 2),
        (PHop(nodes=3), "a=c;b=a;c=b?a3", "a", 3),
        (PHop(nodes=3), "c=b;a=c;b=a?b10", "a", 10),
        (PHop(nodes=2), "b=b;a=a?a12", "a", 12),
        (PHop(nodes=2), "a=b;b=a?a1", "b", 1),
        (PHop(), "h=a;g=h;f=g;e=f;d=e;c=d;b=c;a=b?a7", "h", 7),
    ],
)
def test_hand_written_examples(task: Task, prompt: str, answer: str, level: int) -> None:
    assert task.solve(prompt) == answer
    assert task.level_of(prompt) == level


@pytest.mark.parametrize(
    ("task", "prompt"),
    [
        (Parity(), "0120="),
        (Parity(), "0101"),
        (Parity(), "="),
        (Dyck(), "(]="),
        (Dyck(), "(x)="),
        (ModSum(), "12a="),
        (Addition(), "12+="),
        (Addition(), "12-3="),
        (MultiHop(), "a=b;b=7"),
        (MultiHop(), "a=1;a=2?a"),
        (MultiHop(), "a=b;b=a?a"),
        (MultiHop(), "a=b?a"),
        (MultiHop(), "a=%?a"),
        (MultiHop(separator=""), "c=7a=b;d=c?a"),  # a separator where there is none
        (MultiHop(separator=""), "c=7a=bd=c?"),
        (MultiHop(separator=""), "c=7a=bd=?a"),  # not 3 characters each
        (MultiHop(), "c=7a=b?a"),  # no separator where there is one
        (MultiHop(open_ends=0.5), "a=1?b"),  # an open end needs at least one hop
        (MultiHop(open_ends=0.5), "a=b;b=a?a"),
        (PHop(nodes=3), "a=c;b=a;c=b"),  # no query
        (PHop(nodes=3), "a=c;b=a;c=b?a"),  # no hop count
        (PHop(nodes=3), "a=c;b=a;c=b?2"),  # no start node
        (PHop(nodes=3), "a=c;b=a;c=b?a0"),  # hop count < 1
        (PHop(nodes=3), "a=c;b=a;c=b?a02"),  # leading zero
        (PHop(nodes=3), "a=c;b=a;c=b?a-1"),
        (PHop(nodes=3), "a=c;b=a;c=b?a2x"),
        (PHop(nodes=3), "a=c;b=a;c=b?a\u00b2"),  # a non-ASCII digit
        (PHop(nodes=3), "a=c;b=a;c=b?d2"),  # start is not a node
        (PHop(nodes=3), "a=c;b=a?a2"),  # c never assigned
        (PHop(nodes=3), "a=c;b=a;c=b;d=a?a2"),  # d is not a node
        (PHop(nodes=3), "a=c;a=b;b=a;c=b?a1"),  # a assigned twice
        (PHop(nodes=3), "a=c;b=a;c=d?a1"),  # rhs not a node
        (PHop(nodes=3), "a=c;b=c;c=b?a1"),  # not a permutation
        (PHop(nodes=3), "a=c;b=a;c=b;?a1"),
        (PHop(nodes=3), "ac;b=a;c=b?a1"),
        (PHop(nodes=3), "a=cb;b=a;c=b?a1"),
        (PHop(nodes=3), "?a1"),
    ],
)
def test_solvers_reject_malformed_prompts(task: Task, prompt: str) -> None:
    with pytest.raises(ValueError):
        task.solve(prompt)
    if isinstance(task, (MultiHop, PHop)):  # trace and level_of parse the prompt too
        with pytest.raises(ValueError):
            task.trace(prompt)
        with pytest.raises(ValueError):
            task.level_of(prompt)


def test_trace_is_the_value_after_each_step(task: Task) -> None:
    """``trace`` is None, or one value per level whose last is the answer."""
    for split in task.splits:
        for ex in _samples(task, split, n=100):
            trace = task.trace(ex.prompt)
            if trace is None:
                continue
            assert len(trace) == task.level_of(ex.prompt), ex
            assert trace[-1] == task.solve(ex.prompt) == ex.answer, ex
            assert all(isinstance(v, str) and len(v) == 1 for v in trace), ex


def test_only_step_tasks_have_a_trace() -> None:
    with_trace = {t.name for t in VARIANTS.values() if t.trace(_samples(t, "id", n=1)[0].prompt)}
    assert with_trace == {"multihop", "phop"}
    assert MultiHop().trace("c=7;a=b;d=c;b=c?a") == ["b", "c", "7"]
    assert PHop(nodes=3).trace("a=c;b=a;c=b?a4") == ["c", "b", "a", "c"]


def _counting_says_balanced(body: str) -> bool:
    """The stack-free rule: each bracket type's count matches and its prefix depth never
    goes negative."""
    depth = {"(": 0, "[": 0}
    for ch in body:
        opener = ch if ch in "([" else {")": "(", "]": "["}[ch]
        depth[opener] += 1 if ch in "([" else -1
        if depth[opener] < 0:
            return False
    return depth == {"(": 0, "[": 0}


def test_dyck_balanced_is_a_fair_coin_that_counting_cannot_solve() -> None:
    """Per-type counting solved every example while one bracket's type was swapped; the
    crossed pairs of depth >= 2 leave it at chance, and the labels stay the stack's."""
    task = Dyck(target="balanced")
    for split in ("id", "ood_depth"):
        examples = [ex for ex in _samples(task, split, n=1200) if task.level_of(ex.prompt) >= 2]
        assert len(examples) > 600
        balanced = sum(ex.answer == "1" for ex in examples) / len(examples)
        assert 0.4 < balanced < 0.6
        counted = sum((ex.answer == "1") == _counting_says_balanced(ex.prompt[:-1])
                      for ex in examples) / len(examples)
        assert 0.4 < counted < 0.6, counted  # chance: every example passes the count rule
        for ex in examples:
            body = ex.prompt[:-1]
            assert _counting_says_balanced(body)
            assert task.solve(ex.prompt) == ex.answer


@pytest.mark.parametrize("task", [MultiHop(), MultiHop(ood_hops=(4, 6), statements=8),
                                  MultiHop(ood_hops=(4, 6), statements=8, digits=3),
                                  MultiHop(ood_hops=(4, 6), statements=8, open_ends=0.5)])
def test_multihop_assigns_each_variable_once_and_is_acyclic(task: MultiHop) -> None:
    for split in task.splits:
        for ex in _samples(task, split):
            body, query = ex.prompt.split("?")
            lhs = [stmt.split("=")[0] for stmt in body.split(";")]
            assert len(lhs) == len(set(lhs))
            assert query in lhs
            for var in lhs:  # every variable, not just the query, resolves to a digit
                task.solve(f"{body}?{var}")  # (or, with open_ends, an unassigned variable)


def test_multihop_open_ends() -> None:
    """With ``open_ends=p`` a share ~p of the chains ends at a variable assigned nowhere
    (the answer, a letter); the prompt keeps its length and its digit count rule; with
    ``open_ends=0`` the examples are exactly those of a task without the knob."""
    task = MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=8, open_ends=0.3)
    rng = random.Random(1)
    examples = [task.generate_at(rng, level) for level in range(1, 7) for _ in range(200)]
    opened = [ex for ex in examples if ex.answer.isalpha()]
    assert 0.25 < len(opened) / len(examples) < 0.35
    for ex in examples:
        body, query = ex.prompt.split("?")
        table = dict(stmt.split("=") for stmt in body.split(";"))
        assert len(table) == 8 and len(ex.prompt) == 33
        path, current = [], query  # an independent walk
        while current in table:
            current = table[current]
            path.append(current)
        assert path[-1] == ex.answer and task.trace(ex.prompt) == path
        assert ex.answer.isdigit() or (ex.answer not in table and ex.answer != query)
    digits = MultiHop(ood_hops=(4, 6), statements=8, digits=3, open_ends=1.0)
    for ex in _samples(digits, "ood_hops"):
        assert ex.answer.isalpha() and sum(c.isdigit() for c in ex.prompt) == 2
    # open_ends=0 draws nothing more: the examples of the task before the knob existed
    # (the first, and a hash of 200, generated by that code).
    for closed in (MultiHop(ood_hops=(4, 6), statements=8, digits=3),
                   MultiHop(ood_hops=(4, 6), statements=8, digits=3, open_ends=0.0)):
        rng = random.Random(5)
        examples = [closed.generate(rng, split) for split in ["train", "ood_hops"] * 100]
        assert examples[0] == Example("a=x;x=l;w=2;q=0;l=3;o=w;u=w;i=x?i", "3")
        text = "\n".join(f"{ex.prompt}->{ex.answer}" for ex in examples)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == "50feecc6331de158"
    for bad in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="open_ends"):
            MultiHop(open_ends=bad)


@pytest.mark.parametrize("open_ends", [0.0, 0.5, 1.0])
def test_multihop_decoys_are_chains_shaped_like_the_query_chain(open_ends: float) -> None:
    """With ``decoys`` every prompt is chains of the query chain's length (the remainder
    one shorter chain), read off the prompt independently: every chain ends at a distinct
    digit or at a variable assigned nowhere, so the chain ends alone do not say which one
    the query reaches."""
    task = MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=12, open_ends=open_ends,
                    decoys=True)
    rng = random.Random(3)
    for level in range(1, 7):
        for _ in range(50):
            ex = task.generate_at(rng, level)
            body, query = ex.prompt.split("?")
            table = dict(stmt.split("=") for stmt in body.split(";"))
            assert len(table) == 12 and len(body.split(";")) == 12
            heads = set(table) - set(table.values())
            lengths, ends = {}, []
            for head in heads:  # walk each chain
                n, current = 0, head
                while current in table:
                    current, n = table[current], n + 1
                lengths[head] = n
                ends.append(current)
            assert sorted(lengths.values(), reverse=True) == \
                [level] * (12 // level) + ([12 % level] if 12 % level else [])
            assert query in heads and lengths[query] == level
            digit_ends = [e for e in ends if e.isdigit()]  # distinct while digits last
            assert len(set(digit_ends)) == min(len(digit_ends), 10) and ex.answer in ends
            assert len(set(ends)) - len(set(digit_ends)) == len(ends) - len(digit_ends)
            opened = [e for e in ends if e.isalpha()]
            assert all(e not in table for e in opened)
            if open_ends == 0.0:
                assert not opened
            elif open_ends == 1.0:
                assert len(opened) == len(ends)
    assert "decoys" not in vars(MultiHop(statements=8))  # older tasks keep their fingerprint


def test_multihop_decoys_give_the_query_chain_no_special_end() -> None:
    """Where digits repeat (more digit-ended chains than digits) or variables run short for
    open ends, the query chain's end is drawn like every other chain's: the repeated digit
    went to the query chain first (a "most frequent digit" rule scored 1.000), and the open
    ends to the first chains drawn (an "open end" rule scored 0.51 among 13 chains)."""
    repeated = MultiHop(hops=(2, 2), ood_hops=(4, 6), statements=22, decoys=True)  # 11 chains
    crowded = MultiHop(hops=(2, 2), ood_hops=(4, 6), statements=25, open_ends=0.5,
                       decoys=True)  # 13 chains, 1 variable left for an open end
    n = 1500
    hits = {"repeated": 0, "open": 0}
    for i in range(n):
        ex = repeated.generate_at(random.Random(i), 2)
        values = [stmt[2] for stmt in ex.prompt.split("?")[0].split(";") if stmt[2].isdigit()]
        hits["repeated"] += values.count(ex.answer) > 1
        hits["open"] += crowded.generate_at(random.Random(i), 2).answer.isalpha()
    # 2 of the 11 chains hold the repeated digit; 1 of 13 chains (at most) ends open.
    assert abs(hits["repeated"] / n - 2 / 11) < 0.04
    assert hits["open"] / n < 1.5 / 13
    with pytest.raises(ValueError, match="needs statements"):
        MultiHop(decoys=True)
    with pytest.raises(ValueError, match="do not combine"):
        MultiHop(ood_hops=(4, 6), statements=8, digits=3, decoys=True)
    with pytest.raises(ValueError, match="true or false"):
        MultiHop(ood_hops=(4, 6), statements=8, decoys="yes")


def test_multihop_without_a_separator_writes_the_same_chains_shorter() -> None:
    """``separator=""`` makes the same examples (same seed) with the ``;`` removed: every
    prompt of 8 assignments is 7 characters shorter, and the levels and answers agree."""
    plain = MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=8)
    packed = MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=8, separator="")
    for split in plain.splits:
        for a, b in zip(_samples(plain, split), _samples(packed, split), strict=True):
            assert b.prompt == a.prompt.replace(";", "") and b.answer == a.answer
            assert packed.trace(b.prompt) == plain.trace(a.prompt)
            assert len(b.prompt) == 26 and packed.level_of(b.prompt) == plain.level_of(a.prompt)
    assert packed.max_len("ood_hops") == plain.max_len("ood_hops") - 7 == 29
    for bad in (",", None, 1):
        with pytest.raises(ValueError, match="separator"):
            MultiHop(separator=bad)


def test_multihop_statements_fixes_the_prompt_length() -> None:
    task = MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=8)
    rng = random.Random(0)
    for level in range(1, 9):
        for _ in range(20):
            ex = task.generate_at(rng, level)
            assert len(ex.prompt.split("?")[0].split(";")) == 8 and len(ex.prompt) == 33
            assert task.level_of(ex.prompt) == level
    assert task.max_len("id") == task.max_len("ood_hops")
    with pytest.raises(ValueError, match="level 9"):
        task.generate_at(rng, 9)
    with pytest.raises(ValueError, match="statements"):
        MultiHop(ood_hops=(4, 9), statements=8)  # a 9-hop chain needs 9 assignments
    with pytest.raises(ValueError, match="statements"):
        MultiHop(statements=27)
    with pytest.raises(ValueError, match="integer"):
        MultiHop(statements=8.0)


PHOP_PROMPT = re.compile(r"((?:[a-z]=[a-z];)*[a-z]=[a-z])\?([a-z])([1-9][0-9]*)")


def _phop_parts(prompt: str) -> tuple[list[str], dict[str, str], str, int]:
    """``(statements, f, start, k)`` parsed by a regex, independently of ``PHop``."""
    match = PHOP_PROMPT.fullmatch(prompt)
    assert match, prompt
    statements = match[1].split(";")
    return statements, dict(stmt.split("=") for stmt in statements), match[2], int(match[3])


@pytest.mark.parametrize("nodes", [2, 3, 8, 26])
def test_phop_answer_is_the_permutation_applied_k_times(nodes: int) -> None:
    task, letters = PHop(nodes=nodes), [chr(ord("a") + i) for i in range(nodes)]
    for seed in range(30):
        rng = random.Random(seed)
        for level in range(1, 20):
            ex = task.generate_at(rng, level)
            statements, f, start, k = _phop_parts(ex.prompt)
            assert k == level == task.level_of(ex.prompt)
            assert len(statements) == nodes and sorted(f) == sorted(f.values()) == letters
            node, visited = start, []
            for _ in range(k):
                node = f[node]
                visited.append(node)
            assert ex.answer == node == task.solve(ex.prompt)
            assert task.trace(ex.prompt) == visited
            assert visited[0] == f[start]
            assert all(b == f[a] for a, b in itertools.pairwise(visited))
            assert len(ex.prompt) == 4 * nodes + 1 + len(str(k))
            assert len(encode_example(ex)[0]) == task.max_len_at(level)


def test_phop_permutation_start_and_order_are_uniform() -> None:
    task, n = PHop(nodes=3), 1800
    perms, starts, firsts = {}, {}, {}
    for ex in _samples(task, "train", n=n):
        statements, f, start, _ = _phop_parts(ex.prompt)
        key = (f["a"], f["b"], f["c"])
        perms[key] = perms.get(key, 0) + 1
        starts[start] = starts.get(start, 0) + 1
        firsts[statements[0][0]] = firsts.get(statements[0][0], 0) + 1
    assert len(perms) == 6 and all(220 < c < 380 for c in perms.values()), perms
    assert len(starts) == 3 and all(500 < c < 700 for c in starts.values()), starts
    assert len(firsts) == 3 and all(500 < c < 700 for c in firsts.values()), firsts


def test_phop_hop_counts_above_nine() -> None:
    task = PHop()
    assert task.max_len_at(9) < task.max_len_at(10) < task.max_len_at(100)
    rng = random.Random(0)
    for level in (10, 99, 100, 1234):
        ex = task.generate_at(rng, level)
        assert ex.prompt.endswith(str(level)) and task.level_of(ex.prompt) == level
        assert len(task.trace(ex.prompt)) == level
        assert len(encode_example(ex)[0]) <= task.max_len_at(level)
    wide = PHop(hops=(2, 12), ood_hops=(13, 20))
    assert wide.max_len("ood_hops") == wide.max_len_at(20)
    assert {wide.level_of(ex.prompt) for ex in _samples(wide, "id")} == set(range(2, 13))


def test_encode_example_masks_answer_and_eos() -> None:
    ids, mask = encode_example(Example("12+3=", "15"))
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [BOS_ID, *b"12+3=", *b"15", EOS_ID]
    assert mask.tolist() == [False] * 6 + [True] * 3
    assert encode_prompt("12+3=").tolist() == [BOS_ID, *b"12+3="]
    with pytest.raises(ValueError, match="ASCII"):
        encode_example(Example("é=", "1"))


def test_make_batch_layout(task: Task) -> None:
    seq_len = task.max_len() + 3
    batch = make_batch(task, random.Random(5), "id", batch_size=16, seq_len=seq_len)
    examples = _samples(task, "id", seed=5, n=16)  # the same draws as make_batch
    input_ids, targets = batch["input_ids"], batch["targets"]
    assert input_ids.shape == targets.shape == (16, seq_len)
    assert input_ids.dtype == targets.dtype == torch.long
    assert batch["answer_start"].shape == batch["lengths"].shape == (16,)
    assert int(input_ids.max()) < VOCAB_SIZE
    for b, ex in enumerate(examples):
        n, start = int(batch["lengths"][b]), int(batch["answer_start"][b])
        assert n == len(ex.prompt) + len(ex.answer) + 2 and start == len(ex.prompt) + 1
        row = input_ids[b]
        assert int(row[0]) == BOS_ID and int(row[n - 1]) == EOS_ID
        assert (row[n:] == PAD_ID).all()
        assert decode_answer(row[1:start]) == ex.prompt
        assert decode_answer(row[start:]) == ex.answer
        supervised = (targets[b] != IGNORE_INDEX).nonzero().flatten()
        assert supervised.tolist() == list(range(start - 1, n - 1))
        assert torch.equal(targets[b, start - 1 : n - 1], row[start:n])
        assert decode_answer(targets[b, supervised]) == ex.answer
        assert int(targets[b, n - 2]) == EOS_ID


def test_make_batch_default_seq_len_is_the_split_bound() -> None:
    task = Addition()
    for split in task.splits:
        batch = make_batch(task, random.Random(0), split, batch_size=4)
        assert batch["input_ids"].shape == (4, task.max_len(split))


def test_collate_pads_to_longest_and_refuses_to_truncate() -> None:
    examples = [Example("0=", "0"), Example("0110=", "0100")]
    batch = collate(examples)
    assert batch["input_ids"].shape == (2, 11)
    assert batch["input_ids"][0, 5:].eq(PAD_ID).all()
    with pytest.raises(ValueError, match="seq_len"):
        collate(examples, seq_len=10)
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(ValueError, match="batch_size"):
        make_batch(Parity(), random.Random(0), "id", batch_size=0)


def test_decode_answer_stops_at_special_tokens() -> None:
    assert decode_answer([ord("4"), ord("2"), EOS_ID, ord("9")]) == "42"
    assert decode_answer(torch.tensor([ord("7"), PAD_ID])) == "7"
    assert decode_answer([]) == ""


def test_score_is_exact_match() -> None:
    ex = Example("12+3=", "15")
    assert score("15", ex)
    assert not score("15 ", ex) and not score("1", ex) and not score("150", ex)


def test_registry() -> None:
    assert list_tasks() == sorted(["parity", "dyck", "modsum", "addition", "multihop", "phop"])
    for name in list_tasks():
        assert isinstance(get_task(name), TASKS[name]) and get_task(name).name == name
    task = get_task("multihop", hops=(2, 2), ood_hops=(5, 6))
    assert task.level_range("train") == (2, 2) and task.level_range("ood_hops") == (5, 6)
    with pytest.raises(
        ValueError, match="available: addition, dyck, modsum, multihop, parity, phop"
    ):
        get_task("sorting")
    with pytest.raises(ValueError, match="already registered"):
        register_task(type("Other", (Parity,), {"name": "parity"}))


def test_register_task_adds_a_new_task() -> None:
    cls = type("Parity2", (Parity,), {"name": "parity2"})
    try:
        assert register_task(cls) is cls
        assert "parity2" in list_tasks() and isinstance(get_task("parity2"), cls)
        # Defined again (a notebook cell run twice): replaces it; another class does not.
        again = type("Parity2", (Parity,), {"name": "parity2"})
        assert register_task(again) is again and TASKS["parity2"] is again
        with pytest.raises(ValueError, match="already registered"):
            register_task(type("Other", (Parity,), {"name": "parity2"}))
    finally:
        TASKS.pop("parity2", None)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Parity(lengths=(5, 3)), "lengths"),
        (lambda: Parity(lengths=(0, 3)), "lengths"),
        (lambda: Parity(ood_lengths=(10, 20)), "ood_length"),
        (lambda: Parity(lengths="abc"), "lengths"),
        (lambda: Dyck(target="width"), "target"),
        (lambda: Dyck(pairs=(0, 3)), "pairs"),
        (lambda: ModSum(modulus=11), "modulus"),
        (lambda: Addition(ood_digits=(3, 9)), "ood_digits"),
        (lambda: MultiHop(ood_hops=(4, 30)), "ood_hops"),
        (lambda: MultiHop(distractors=(-1, 2)), "distractors"),
        (lambda: PHop(hops=(0, 2)), "hops"),
        (lambda: PHop(ood_hops=(3, 9)), "ood_hops"),
        (lambda: PHop(ood_hops=(8, 5)), "ood_hops"),
        (lambda: PHop(nodes=1), "nodes"),
        (lambda: PHop(nodes=27), "nodes"),
        (lambda: PHop(nodes="8"), "nodes"),
        (lambda: get_task("parity", width=3), "width"),
    ],
)
def test_bad_knobs_name_the_field(factory, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_unknown_split_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="ood_hops"):
        MultiHop().generate(random.Random(0), "test")


def test_multihop_digits_fixes_the_digits_in_every_prompt() -> None:
    """Without ``digits`` a longer chain in a fixed-length prompt leaves fewer digits (one
    at 8 hops of 8: answerable by elimination); with it every prompt holds ``digits``
    distinct digits, the answer among them, at every chain length."""
    rng = random.Random(0)
    plain = MultiHop(hops=(1, 3), ood_hops=(4, 8), statements=8)
    assert all(sum(c.isdigit() for c in plain.generate_at(rng, 8).prompt) == 1 for _ in range(20))
    task = MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=8, digits=3)
    for level in range(1, 7):
        for _ in range(30):
            ex = task.generate_at(rng, level)
            digits = [c for c in ex.prompt if c.isdigit()]
            assert len(digits) == len(set(digits)) == 3 and ex.answer in digits
            assert task.level_of(ex.prompt) == level and task.solve(ex.prompt) == ex.answer
    with pytest.raises(ValueError, match="distractors"):
        task.generate_at(rng, 7)  # one distractor cannot hold the two other digits
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        MultiHop(hops=(1, 3), ood_hops=(4, 6), statements=8, digits=4)
    with pytest.raises(ValueError, match="needs statements"):
        MultiHop(digits=2)
    with pytest.raises(ValueError, match="integer"):
        MultiHop(ood_hops=(4, 6), statements=8, digits=True)


def test_get_task_names_an_unknown_task_or_argument():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="task 'parity' takes no argument hops, x; its "
                                         "arguments: lengths, ood_lengths, running"):
        get_task("parity", hops=[1, 2], x=1, lengths=[2, 3])
    assert get_task("parity", lengths=[2, 3]).levels["id"] == (2, 3)


def test_multihop_open_ends_keep_a_variable_for_the_open_end() -> None:
    """An open end takes a 27th variable where all 26 are in use. With a fixed number of
    statements that can never fit: refused when the task is made (it crashed the first
    training batch); with random distractors an example at the limit draws one fewer
    (knobs that trained before still load, and never fail a draw)."""
    MultiHop(statements=26)  # fine without open ends
    with pytest.raises(ValueError, match="kept for the open end"):
        MultiHop(statements=26, open_ends=0.5)
    rng = random.Random(0)
    for task in (MultiHop(statements=25, open_ends=1.0),
                 MultiHop(ood_hops=(4, 22), distractors=(4, 4), open_ends=1.0),
                 MultiHop(hops=(1, 4), ood_hops=(5, 8), distractors=(0, 18), open_ends=0.2)):
        deepest = task.level_range("ood_hops")[1]
        for _ in range(100):
            ex = task.generate_at(rng, deepest)
            assert task.solve(ex.prompt) == ex.answer
            assert len(ex.prompt.split("?")[0].split(";")) <= 26


def test_commands_import_user_tasks(tmp_path, monkeypatch, capsys) -> None:
    """A task registered by the user's module runs through the CLI with ``--import``; without
    it the error says how (it said "unknown task" and nothing else)."""
    from open_mythos.cli import main

    (tmp_path / "my_tasks.py").write_text(
        "from open_mythos.tasks import Parity, register_task\n"
        "register_task(type('MyParity', (Parity,), {'name': 'my_parity'}))\n")
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('oops')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr("open_mythos.tasks.TASKS", dict(TASKS))
    monkeypatch.delitem(sys.modules, "my_tasks", raising=False)
    args = ["train", "--config", str(Path(__file__).parents[2] / "configs" / "tiny.toml"),
            "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress",
            "--set", "data.task=my_parity"]
    assert main(args) == 2
    assert "openmythos --import MODULE" in capsys.readouterr().err
    assert main(["--import", "my_tasks", *args]) == 0
    assert "my_parity" in list_tasks() and (tmp_path / "run" / "latest").is_file()
    for module, says in (("no_such_module", "No module named 'no_such_module'"),
                         ("broken_tasks", "raised RuntimeError: oops")):
        with pytest.raises(SystemExit) as exit_:
            main(["--import", module, "info", str(tmp_path / "run")])
        assert exit_.value.code == 2 and says in capsys.readouterr().err


def _broken(name: str, **methods) -> type:
    """A Parity whose methods are replaced: a user task with one mistake."""
    return type(name, (Parity,), {"name": name, **methods})


@pytest.mark.parametrize(("methods", "match"), [
    ({"_generate": lambda self, rng, level: Example("01=", 1)},
     r"_generate gave answer=1; prompt and answer are ASCII strings"),
    ({"_generate": lambda self, rng, level: ("01=", "1")}, "returned a tuple, not an Example"),
    ({"_generate": lambda self, rng, level: Example("01=", "8\u00b0")}, "answer='8\u00b0'"),
    ({"_generate": lambda self, rng, level: Example("01=", "")}, "an empty answer"),
    ({"max_len_at": lambda self, level: 3}, "more than max_len_at allows"),
    ({"trace": lambda self, prompt: []}, r"trace\('.*'\) gave \[\]"),
    ({"trace": lambda self, prompt: ["0", ""]}, "non-empty list of non-empty strings"),
    ({"trace": lambda self, prompt: ["x"]}, "not at the answer"),
])
def test_a_user_tasks_mistake_is_named_before_training(tmp_path, methods, match):
    """Each of these ran into a raw traceback deep in training or the sweep (an int answer:
    "'int' object has no attribute 'encode'"; an empty trace: an IndexError in the loss) or
    trained silently (an empty answer); now a one-line ConfigError names the task and the
    method, for training (TaskSource) as for the sweep (check_task)."""
    from open_mythos.tasks.batching import check_task
    from open_mythos.training.config import ConfigError, DataConfig
    from open_mythos.training.data import build_data_source

    name = "broken_parity"
    cls = register_task(_broken(name, **methods))
    try:
        with_trace = "trace" in methods
        with pytest.raises(ValueError, match=match):
            check_task(cls(), with_trace=with_trace)
        with pytest.raises(ConfigError, match=f"data.task: task '{name}'.*{match}"):
            build_data_source(DataConfig(task=name), seed=0, with_trace=with_trace)
    finally:
        TASKS.pop(name, None)


def test_register_task_names_a_missing_class_attribute():
    with pytest.raises(TypeError, match="NoName needs the class attribute 'name'"):
        register_task(type("NoName", (Parity,), {"name": None}))
    with pytest.raises(TypeError, match="needs the class attribute 'level_name'"):
        register_task(type("NoLevel", (Parity,), {"name": "nolevel", "level_name": ""}))
    assert "nolevel" not in TASKS


def test_multihop_past_its_variables_is_a_clear_error():
    """A chain needing more than 26 variables (a sweep's hops=27; 26 hops with an open end)
    raised a bare IndexError, and a task whose ood split reached 26 hops with open ends and
    no distractors was accepted, then failed at random inside its own split."""
    task = MultiHop()
    rng = random.Random(0)
    assert task.level_of(task.generate_at(rng, 26).prompt) == 26
    for level in (27, 30):
        with pytest.raises(ValueError, match=f"level {level} needs more than 26 variables"):
            task.generate_at(rng, level)
    opened = MultiHop(open_ends=1.0)
    assert opened.level_of(opened.generate_at(rng, 25).prompt) == 25
    with pytest.raises(ValueError, match=r"26 variables \(one is the open end\)"):
        opened.generate_at(rng, 26)
    with pytest.raises(ValueError, match="an open end of open_ends > 0 needs one"):
        MultiHop(ood_hops=(4, 26), distractors=(0, 0), open_ends=0.5)
    fits = MultiHop(ood_hops=(4, 25), distractors=(0, 0), open_ends=0.5)
    for _ in range(200):
        fits.generate(rng, "ood_hops")
