"""Depth sweeps and perplexity against independent per-example computations."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from open_mythos import ExitRule, OpenMythos
from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.evaluation import (
    SweepRow,
    evaluate_examples,
    greedy_answers,
    load_rows,
    perplexity,
    sample_examples,
    save_rows,
    sweep,
)
from open_mythos.evaluation.sweep import teacher_forced_matches
from open_mythos.tasks import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, collate, get_task

from .conftest import act_model, slow_greedy, small_parity, task_config


@pytest.mark.parametrize("early_exit", [False, True])
def test_batched_greedy_answers_match_slow_per_example_decoding(attn_type, early_exit):
    model = act_model(attn_type)
    examples = sample_examples(small_parity(), "ood_length", 6, seed=1)
    prompts = [ex.prompt for ex in examples]  # 4 or 5 bits: the batch is left-padded
    answers, loops_run, computed = greedy_answers(model, prompts, 5, 6, early_exit)
    assert answers == [slow_greedy(model, p, 5, early_exit, 6) for p in prompts]
    assert len(loops_run) == len(computed) >= 1
    assert all(1 <= c <= r <= 5 for r, c in zip(loops_run, computed))
    if not early_exit:
        assert set(loops_run) == {5}


def test_sweep_rows_and_accuracy_match_an_independent_check(parity_model):
    task = small_parity()
    rows = sweep(parity_model, task, loops=[1, 4], n_examples=20, seed=3, batch_size=8)
    assert [(r.split, r.n_loops, r.early_exit) for r in rows] == [
        (s, n, e) for s in ("id", "ood_length") for n in (1, 4) for e in (False, True)]
    for r in rows:
        examples = sample_examples(task, r.split, 20, seed=3)
        budget = max(len(ex.answer) for ex in examples) + 1
        correct = [slow_greedy(parity_model, ex.prompt, r.n_loops, r.early_exit, budget)
                   == task.solve(ex.prompt) for ex in examples]
        assert r.accuracy == pytest.approx(sum(correct) / len(correct))
        assert r.model == "looped" and r.task == "parity" and r.n_examples == 20
        assert 1.0 <= r.expected_loops <= r.n_loops and 1.0 <= r.halt_loop <= r.n_loops
        assert 1.0 <= r.loops_computed <= r.loops_run <= r.n_loops
        if not r.early_exit:
            assert r.loops_run == r.n_loops
    # 50 training steps learn the answer format: the check above is not comparing zeros.
    assert max(r.accuracy for r in rows) > 0.25


@pytest.mark.parametrize("rule", [None, ExitRule(argmax_streak=2, min_loops=1)])
def test_answers_read_off_the_teacher_forced_forward_are_the_greedy_ones(parity_model, rule):
    """Per example, at several depths, with and without an exit rule: the teacher-forced
    argmax says "exact" exactly where batched greedy decoding over the cache produced the
    answer."""
    task, kw = small_parity(), {} if rule is None else {"exit_rule": rule}
    seen = set()
    for split in ("id", "ood_length"):
        examples = sample_examples(task, split, 40, seed=5)
        batch = collate(examples)
        budget = max(len(ex.answer) for ex in examples) + 1
        for n in (1, 2, 4):
            with torch.no_grad():
                logits = parity_model(batch["input_ids"], n, **kw)
            matches = teacher_forced_matches(logits.argmax(-1), batch["targets"]).tolist()
            answers = greedy_answers(parity_model, [ex.prompt for ex in examples], n, budget,
                                     early_exit=False, exit_rule=rule)[0]
            assert matches == [a == ex.answer for a, ex in zip(answers, examples)]
            seen |= set(matches)
    assert seen == {True, False}  # both outcomes were compared


def test_teacher_forced_matches_ends_an_answer_at_any_special_token():
    # One row per case: "ab" then EOS as targets; the argmax at each supervised position.
    a, b = ord("a"), ord("b")
    targets = torch.tensor([[IGNORE_INDEX, a, b, EOS_ID, IGNORE_INDEX]] * 5
                           + [[IGNORE_INDEX, a, b, IGNORE_INDEX, IGNORE_INDEX]])
    predicted = torch.tensor([
        [7, a, b, EOS_ID, 7],   # exact
        [7, a, b, PAD_ID, 7],   # PAD also ends the decoded text: exact
        [7, a, b, BOS_ID, 7],   # so does BOS
        [7, a, b, ord("c"), 7],  # "abc": not exact
        [7, a, a, EOS_ID, 7],   # "aa": not exact
        [7, a, b, EOS_ID, 7],   # no EOS target: nothing says where the answer ends
    ])
    assert teacher_forced_matches(predicted, targets).tolist() == [
        True, True, True, False, False, False]
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        teacher_forced_matches(predicted[0], targets[0])


def test_decoding_is_skipped_only_where_nothing_stops_early(parity_model, monkeypatch):
    """Early exit off (with or without an exit rule): the same accuracy and loss as
    decoding, with no decoding forward. Early exit on (parity_model has ACT) and a bfloat16
    model still decode: the first for the loops computed, the second because its cached
    decoding and full forward round differently."""
    import copy
    import sys

    module = sys.modules[evaluate_examples.__module__]
    examples = sample_examples(small_parity(), "ood_length", 24, seed=2)
    rule = ExitRule(argmax_streak=2, min_loops=1)
    decoded = [evaluate_examples(parity_model, examples, 3, early_exit=False, exit_rule=r,
                                 decode=True) for r in (None, rule)]
    calls = []
    real = module._greedy_examples
    monkeypatch.setattr(module, "_greedy_examples",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    read_off = [evaluate_examples(parity_model, examples, 3, early_exit=False, exit_rule=r)
                for r in (None, rule)]
    assert calls == [] and read_off == decoded
    assert 0 < read_off[0]["accuracy"] < 1
    evaluate_examples(parity_model, examples, 3, early_exit=True)
    assert len(calls) == 1
    evaluate_examples(copy.deepcopy(parity_model).to(torch.bfloat16), examples, 3,
                      early_exit=False)
    assert len(calls) == 2


def test_sweep_loss_reads_the_answer_positions_only():
    """On a task whose prompts are long and answers short (multihop: 2 of 36 positions), the
    teacher-forced loss computes logits (and the last Coda block) at the answer tokens
    alone, and equals per-example full forwards."""
    torch.manual_seed(0)
    model = OpenMythos(task_config(max_seq_len=40)).eval()
    task = get_task("multihop", hops=(1, 3), ood_hops=(4, 6), statements=8)
    seen = []
    model.coda[-1].ffn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    (row,) = sweep(model, task, splits=["id"], loops=[2], n_examples=12, early_exit=[False])
    assert (24, 1) in seen  # the teacher-forced forward: 12 answers + 12 EOS
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in sample_examples(task, "id", 12):
            batch = collate([ex])
            logits = model(batch["input_ids"], 2, act_early_exit=False)
            total += float(F.cross_entropy(logits[0], batch["targets"][0], reduction="sum"))
            count += int((batch["targets"] != IGNORE_INDEX).sum())
    assert row.loss == pytest.approx(total / count, rel=1e-5)


def test_sweep_loss_is_answer_token_cross_entropy(parity_model):
    task = small_parity()
    (row,) = sweep(parity_model, task, splits=["id"], loops=[3], n_examples=12,
                   early_exit=[False])
    examples = sample_examples(task, "id", 12)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            batch = collate([ex])
            logits = parity_model(batch["input_ids"], 3, act_early_exit=False)
            total += float(F.cross_entropy(logits[0], batch["targets"][0], reduction="sum"))
            count += int((batch["targets"] != IGNORE_INDEX).sum())
    assert row.loss == pytest.approx(total / count, rel=1e-5)


def test_act_off_model_runs_every_loop():
    torch.manual_seed(0)
    model = OpenMythos(task_config(use_act=False)).eval()
    rows = sweep(model, small_parity(), splits=["id"], loops=[1, 3], n_examples=6)
    assert len(rows) == 4
    for r in rows:
        assert r.expected_loops == r.halt_loop == r.loops_run == r.loops_computed == r.n_loops
    off, on = rows[2], rows[3]
    assert (off.accuracy, off.loss) == (on.accuracy, on.loss)
    # One evaluation served both settings: the copied row keeps its time (it had ~1e-7 s).
    assert on.seconds == off.seconds


def test_an_exit_rule_on_an_act_off_model_is_evaluated_per_setting():
    """With an exit rule the early-exit "on" row reused the "off" row's loop counts (all
    loops computed), hiding what the rule saves; it must equal a sweep of "on" alone."""

    torch.manual_seed(0)
    model = OpenMythos(task_config(use_act=False)).eval()
    rule = ExitRule(rel_change=10.0, min_loops=1)  # fires at once: one loop per position
    kw = dict(splits=["id"], loops=[4], n_examples=6, exit_rule=rule)
    off, on = sweep(model, small_parity(), **kw)
    [alone] = sweep(model, small_parity(), early_exit=(True,), **kw)
    assert (off.early_exit, on.early_exit) == (False, True)
    assert off.loops_computed == 4 and on.loops_computed == alone.loops_computed < 4


def test_sweep_arguments_are_checked_and_repeats_collapse():
    torch.manual_seed(0)
    model = OpenMythos(task_config(use_act=False)).eval()
    rows = sweep(model, small_parity(), splits=["id", "id"], loops=[2, 2], n_examples=4,
                 early_exit=(False,))
    assert [(r.split, r.n_loops) for r in rows] == [("id", 2)]
    # One split and one loop count as plain values ("id" was read letter by letter, 2 was
    # "'int' object is not iterable").
    rows = sweep(model, small_parity(), splits="id", loops=2, n_examples=4, early_exit=(False,))
    assert [(r.split, r.n_loops) for r in rows] == [("id", 2)]
    # NumPy's and torch's integers are loop counts, saved as Python's (a NumPy count made
    # save_rows(".json") fail after the whole sweep, a tensor wrote "tensor(1)" into the
    # CSV); rows come in loop order whatever the order given.
    for loops in (np.array([3, 1]), torch.tensor([3, 1]), [3, np.int64(1)], np.int64(3)):
        rows = sweep(model, small_parity(), splits="id", loops=loops, n_examples=4,
                     early_exit=(False,))
        assert [r.n_loops for r in rows] == sorted({int(n) for n in np.atleast_1d(loops)})
        assert all(type(r.n_loops) is int for r in rows)
    for bad in ([0], [1.5], ["2"], [True]):
        with pytest.raises(ValueError, match="loop count must be a positive integer"):
            sweep(model, small_parity(), splits="id", loops=bad, n_examples=4)
    for bad in (dict(batch_size=0), dict(batch_size=-1), dict(n_examples=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sweep(model, small_parity(), splits=["id"], loops=[1], **bad)
    # The command line's words iterated into characters, each read as True: "off" ran
    # with early exit on.
    for bad in ("off", "both", False, [0, 1]):
        with pytest.raises(TypeError, match="early_exit must be a sequence of bools"):
            sweep(model, small_parity(), splits=["id"], loops=[1], early_exit=bad)


def test_an_exit_rule_that_cannot_fire_at_the_swept_depths_is_refused():
    """min_loops 9 with loops up to 4: the rule never fires, yet every row (and the report)
    said it ran with it."""
    model = OpenMythos(task_config(use_act=False)).eval()
    with pytest.raises(ValueError, match=r"min_loops=9 is above the deepest loop count "
                                         r"swept \(4\)"):
        sweep(model, small_parity(), splits="id", loops=[1, 4], n_examples=2,
              exit_rule=ExitRule(kl=0.1, min_loops=9))
    rows = sweep(model, small_parity(), splits="id", loops=[4], n_examples=2,
                 early_exit=(False,), exit_rule=ExitRule(kl=0.1, min_loops=4))
    assert len(rows) == 1


def test_an_exit_rule_for_a_baseline_is_refused():
    """It was dropped without a word (a dense forward refuses one)."""
    model = DenseBaseline(matched_baseline_config(task_config(), 3)).eval()
    with pytest.raises(ValueError, match="exit_rule needs a looped model"):
        sweep(model, small_parity(), n_examples=2, exit_rule=ExitRule(kl=0.1))


def test_baseline_gets_one_row_per_split():
    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(task_config(), 3)).eval()
    rows = sweep(model, small_parity(), loops=[1, 2, 8], n_examples=6)
    assert [(r.model, r.split, r.n_loops, r.early_exit) for r in rows] == [
        ("baseline", "id", 3, False), ("baseline", "ood_length", 3, False)]
    assert all(r.loops_run == r.expected_loops == 3 for r in rows)


def test_splits_longer_than_max_seq_len():
    model = act_model(max_seq_len=12)
    task = get_task("parity", lengths=(2, 3), ood_lengths=(6, 8))  # ood needs up to 19 tokens
    with pytest.warns(UserWarning, match="ood_length"):
        rows = sweep(model, task, loops=[1], n_examples=2, early_exit=[True])
    assert [r.split for r in rows] == ["id"]
    with pytest.raises(ValueError, match="max_seq_len"):
        sweep(model, task, splits=["ood_length"], loops=[1], n_examples=2)
    # Named after the splits that fit, it is refused before they are evaluated.
    seen = []
    with pytest.raises(ValueError, match="split 'ood_length' needs"):
        sweep(model, task, splits=["id", "ood_length"], loops=[1], n_examples=2,
              on_row=seen.append)
    assert seen == []
    # Nothing to evaluate is an error, not an empty result.
    too_long = get_task("parity", lengths=(20, 20), ood_lengths=(30, 30))
    with pytest.raises(ValueError, match="no split of 'parity' fits max_seq_len=12"):
        sweep(model, too_long, loops=[1], n_examples=2)
    with pytest.raises(ValueError, match="at least one split"):
        sweep(model, task, splits=[], loops=[1], n_examples=2)


def test_perplexity_matches_manual_cross_entropy():
    model = act_model()
    torch.manual_seed(1)
    batches = [torch.randint(0, 256, (2, 9)) for _ in range(3)]
    batches[1][0, 5:] = PAD_ID
    result = perplexity(model, batches, n_loops=3, ignore_id=PAD_ID)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            for row in ids:
                logits = model(row[None, :-1], 3, act_early_exit=False)[0]
                keep = row[1:] != PAD_ID
                total += float(F.cross_entropy(logits[keep], row[1:][keep], reduction="sum"))
                count += int(keep.sum())
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("kind", ["looped", "dense"])
def test_perplexity_of_padded_rows_is_that_of_the_rows_alone(kind):
    """Left padding (the tokenizers' default): pads were attended to, and each row's first
    token was scored as predicted from a pad; an ``attention_mask`` in a mapping was
    ignored."""
    model = act_model()
    if kind == "dense":
        torch.manual_seed(0)
        model = DenseBaseline(matched_baseline_config(model.cfg, 3)).eval()
    torch.manual_seed(2)
    rows = [torch.randint(0, 256, (n,)) for n in (9, 3, 6)]
    alone = perplexity(model, [row[None] for row in rows], n_loops=3)
    width = max(len(r) for r in rows)
    left = torch.stack([F.pad(r, (width - len(r), 0), value=PAD_ID) for r in rows])
    right = torch.stack([F.pad(r, (0, width - len(r)), value=PAD_ID) for r in rows])
    for ids in (left, right):
        padded = perplexity(model, [ids], n_loops=3, ignore_id=PAD_ID)
        assert padded.tokens == alone.tokens == sum(len(r) - 1 for r in rows)
        assert padded.loss == pytest.approx(alone.loss, rel=1e-5)
    mask = left != PAD_ID
    mapping = {"input_ids": left[:, :-1], "targets": left[:, 1:].masked_fill(~mask[:, 1:], -100),
               "attention_mask": mask[:, :-1].long()}
    from_mapping = perplexity(model, [mapping], n_loops=3)
    assert from_mapping.tokens == alone.tokens
    assert from_mapping.loss == pytest.approx(alone.loss, rel=1e-5)


def test_perplexity_accepts_task_batches():
    model = act_model()
    batch = collate(sample_examples(small_parity(), "id", 4))
    result = perplexity(model, [batch], n_loops=2)
    assert result.tokens == int((batch["targets"] != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match="no target"):
        perplexity(model, [torch.full((1, 4), PAD_ID)], ignore_id=PAD_ID)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_rows_round_trip(tmp_path, suffix):
    rows = [SweepRow("looped", "parity", "id", 2, True, 8, 0.5, 1.25, 1.5, 1.75, 2.0, 1.5, 0.1),
            SweepRow("baseline", "parity", "ood", 4, False, 8, 0.0, 2.0, 4.0, 4.0, 4.0, 4.0, 0.2)]
    assert load_rows(save_rows(rows, tmp_path / f"sweep{suffix}")) == rows
    with pytest.raises(ValueError, match=".json or .csv"):
        save_rows(rows, tmp_path / "sweep.txt")
    # Rows of the wrong types or out of range are refused, naming the field (a string
    # accuracy was reported as is; early_exit "False" in JSON dropped the row from plots).
    good = dataclasses.asdict(rows[0])
    for bad, says in (({"accuracy": "0.9"}, "accuracy"), ({"accuracy": 7.5}, "accuracy"),
                      ({"n_examples": -3}, "n_examples"), ({"early_exit": "False"}, "early_exit"),
                      ({"n_loops": 2.5}, "n_loops")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([{**good, **bad}]))
        with pytest.raises(ValueError, match=f"row 0 is not a sweep row.*{says}"):
            load_rows(path)
    path = tmp_path / "bad.csv"
    save_rows(rows, path)
    path.write_text(path.read_text().replace(",True,", ",yes,"))
    with pytest.raises(ValueError, match="row 0"):
        load_rows(path)
    # A text run's sweep (loss against loops) is named for what it is, in both formats.
    text = [{"n_loops": 1, "val_loss": 2.5, "perplexity": 12.2, "tokens": 100}]
    (tmp_path / "text.json").write_text(json.dumps(text))
    (tmp_path / "text.csv").write_text("n_loops,val_loss,perplexity,tokens\n1,2.5,12.2,100\n")
    for name in ("text.json", "text.csv"):
        with pytest.raises(ValueError, match="text run's validation loss at each loop count"):
            load_rows(tmp_path / name)


def test_a_split_may_be_one_level(parity_model):
    task = small_parity()
    lo, hi = task.level_range("ood_length")
    examples = sample_examples(task, f"{task.level_name}={hi}", 12, seed=2)
    assert {task.level_of(ex.prompt) for ex in examples} == {hi}
    assert examples == sample_examples(task, f"{task.level_name}={hi}", 12, seed=2)
    rows = sweep(parity_model, task, splits=[f"{task.level_name}={lo}"], loops=[2], n_examples=8,
                 early_exit=(False,), seed=2, batch_size=8)
    assert [(r.split, r.n_loops) for r in rows] == [(f"{task.level_name}={lo}", 2)]
    budget = max(len(ex.answer) for ex in examples) + 1
    level_examples = sample_examples(task, f"{task.level_name}={lo}", 8, seed=2)
    correct = [slow_greedy(parity_model, ex.prompt, 2, False, budget) == ex.answer
               for ex in level_examples]
    assert rows[0].accuracy == pytest.approx(sum(correct) / len(correct))
    with pytest.raises(ValueError, match="levels are"):
        sample_examples(task, "hops=3", 2)
    with pytest.raises(ValueError, match="integer"):
        sample_examples(task, f"{task.level_name}=x", 2)


def test_task_fingerprint_tells_knobs_apart():
    from open_mythos.evaluation import task_fingerprint

    base = task_fingerprint(get_task("multihop", hops=(1, 3), ood_hops=(4, 6), statements=8))
    assert base == task_fingerprint(get_task("multihop", hops=(1, 3), ood_hops=(4, 6),
                                             statements=8))
    others = [get_task("multihop", hops=(1, 3), ood_hops=(4, 6)),
              get_task("multihop", hops=(1, 1), ood_hops=(4, 6), statements=8),
              get_task("parity")]
    assert len({base, *map(task_fingerprint, others)}) == 4
    assert len(base) == 16 and int(base, 16) >= 0


def test_task_fingerprint_tells_apart_knobs_that_rarely_change_an_example():
    """The hash read a few examples per split: ``open_ends`` 0.4, 0.5, 0.6 and 0.65 of
    the demo's task, or dyck's ``pairs`` (2, 11) and (2, 12), shared one, so ``report``
    took a sweep of other knobs and a sweep resumed into a file of another task. The knobs
    are hashed too, however they are spelled; files written before keep matching."""
    from open_mythos.evaluation import task_fingerprint

    demo = {"hops": [1, 3], "ood_hops": [4, 6], "statements": 8}
    hashes = {task_fingerprint(get_task("multihop", **demo, open_ends=p))
              for p in (0.4, 0.5, 0.6, 0.65)}
    assert len(hashes) == 4
    assert task_fingerprint(get_task("dyck", pairs=(2, 11))) != \
        task_fingerprint(get_task("dyck", pairs=(2, 12)))
    # Spellings of one task: a list or a tuple, an int or a float, a knob at its default.
    assert task_fingerprint(get_task("multihop", **demo, open_ends=1)) == \
        task_fingerprint(get_task("multihop", hops=(1, 3), ood_hops=(4, 6), statements=8,
                                  open_ends=1.0))
    assert task_fingerprint(get_task("parity")) == \
        task_fingerprint(get_task("parity", lengths=[4, 12]))
    # The hash of older files: the same without the knobs.
    legacy = {task_fingerprint(get_task("multihop", **demo, open_ends=p), legacy=True)
              for p in (0.5, 0.6)}
    assert len(legacy) == 1


USER_TASK = '''
import random
from open_mythos.evaluation import task_fingerprint
from open_mythos.tasks.base import Example, Task

class Letters(Task):
    name, level_name = "letters_user", "length"

    def __init__(self):
        super().__init__({"train": (1, 3), "id": (1, 3), "ood_length": (4, 5)})
        self.alphabet = frozenset("abcdefgh")  # a set: its repr follows the hash seed
        self.rng_source = random.Random(0)  # an object: its repr holds an address
        self._drawn = 0  # state kept per draw: private

    def _generate(self, rng, level):
        self._drawn += 1
        text = "".join(rng.choice(sorted(self.alphabet)) for _ in range(level))
        return Example(text + "=", text[::-1])

    def solve(self, prompt):
        return prompt[:-1][::-1]

    def level_of(self, prompt):
        return len(prompt) - 1

    def max_len_at(self, level):
        return 2 * level + 3

task = Letters()
first = task_fingerprint(task)
print(first, task_fingerprint(task))
'''


def test_task_fingerprint_of_a_user_task_is_the_same_in_every_process(tmp_path):
    """A user task holding a set (ordered by the string hash seed), an object (its repr
    holds an address) and a counter of draws hashed differently in every process, and
    twice in one: report refused the task's own sweep, and a sweep did not resume."""
    import os
    import subprocess
    import sys

    (tmp_path / "user_task.py").write_text(USER_TASK)
    seen = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
        done = subprocess.run([sys.executable, str(tmp_path / "user_task.py")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        seen.update(done.stdout.split())
    assert len(seen) == 1
