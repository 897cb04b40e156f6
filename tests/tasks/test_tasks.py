"""Algorithmic tasks: generators against independent solvers, split difficulty, batching."""

from __future__ import annotations

import random

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
}


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
        assert sum(len(ex.prompt) for ex in ood_examples) / len(ood_examples) > id_prompt_len
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
    ],
)
def test_solvers_reject_malformed_prompts(task: Task, prompt: str) -> None:
    with pytest.raises(ValueError):
        task.solve(prompt)


def test_dyck_balanced_is_a_fair_coin_that_counting_cannot_solve() -> None:
    task = Dyck(target="balanced")
    examples = _samples(task, "id", n=400)
    balanced = sum(ex.answer == "1" for ex in examples)
    assert 150 < balanced < 250
    for ex in examples:
        body = ex.prompt[:-1]
        assert body.count("(") + body.count("[") == body.count(")") + body.count("]")


def test_multihop_assigns_each_variable_once_and_is_acyclic() -> None:
    task = MultiHop()
    for split in task.splits:
        for ex in _samples(task, split):
            body, query = ex.prompt.split("?")
            lhs = [stmt.split("=")[0] for stmt in body.split(";")]
            assert len(lhs) == len(set(lhs))
            assert query in lhs
            for var in lhs:  # every variable, not just the query, resolves to a digit
                task.solve(f"{body}?{var}")


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
    assert list_tasks() == sorted(["parity", "dyck", "modsum", "addition", "multihop"])
    for name in list_tasks():
        assert isinstance(get_task(name), TASKS[name]) and get_task(name).name == name
    task = get_task("multihop", hops=(2, 2), ood_hops=(5, 6))
    assert task.level_range("train") == (2, 2) and task.level_range("ood_hops") == (5, 6)
    with pytest.raises(ValueError, match="available: addition, dyck, modsum, multihop, parity"):
        get_task("sorting")
    with pytest.raises(ValueError, match="already registered"):
        register_task(type("Other", (Parity,), {"name": "parity"}))


def test_register_task_adds_a_new_task() -> None:
    cls = type("Parity2", (Parity,), {"name": "parity2"})
    try:
        assert register_task(cls) is cls
        assert "parity2" in list_tasks() and isinstance(get_task("parity2"), cls)
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
        (lambda: get_task("parity", width=3), "width"),
    ],
)
def test_bad_knobs_name_the_field(factory, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_unknown_split_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="ood_hops"):
        MultiHop().generate(random.Random(0), "test")
