"""DecodeBatch and Prefill against an independent reference: one full forward (no cache,
no early exit) of each whole sequence."""

from __future__ import annotations

import pytest
import torch

from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.serving import batch as batch_module
from open_mythos.serving.batch import DecodeBatch, Prefill, fill_depths, prefill_together
from tests.conftest import halting_model, tiny_config

N_LOOPS = 3


def schedule_logits(model, seqs, prompt_lens, joins, ends, chunk):
    """Run ``seqs`` through one DecodeBatch: sequence ``i`` is prefilled (``chunk`` tokens
    per call) and joins at step ``joins[i]``, then is fed its own tokens one per step
    until position ``ends[i]``, leaving then. Returns, per sequence, the logits
    predicted at positions ``prompt_len - 1 .. ends - 1`` (the last prefill position,
    then each decode step)."""
    batch = DecodeBatch(model, N_LOOPS)
    capacities = []
    rows: list[int] = []  # sequence of each batch row
    pos: dict[int, int] = {}
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(seqs))}
    widths = []
    for t in range(100):
        for i, seq in enumerate(seqs):
            if t == joins[i]:
                pf = Prefill(model, seq[: prompt_lens[i]], N_LOOPS)
                while not pf.finished:
                    pf.run(chunk)
                out[i].append(pf.last)
                batch.add(pf)
                rows.append(i)
                pos[i] = prompt_lens[i]
        keep = [r for r, i in enumerate(rows) if pos[i] < ends[i]]
        batch.keep(keep)
        rows = [rows[r] for r in keep]
        if not rows and t > max(joins):
            break
        if not rows:
            continue
        logits = batch.step(torch.tensor([seqs[i][pos[i]] for i in rows]))
        widths.append(batch.width)
        capacities.append(batch.capacity)
        for r, i in enumerate(rows):
            out[i].append(logits[r])
            pos[i] += 1
    assert len(batch) == 0 and batch.cache is None  # everything left, nothing held
    return {i: torch.stack(v) for i, v in out.items()}, widths, capacities


@pytest.mark.parametrize("kind, min_capacity", [("gqa", 64), ("mla", 64), ("dense", 64),
                                                ("gqa", 8)])
def test_rows_joining_and_leaving_match_full_forwards(kind, min_capacity, monkeypatch):
    """With ``min_capacity`` 8 the cache also grows (to 16, then 32) while rows decode."""
    monkeypatch.setattr(batch_module, "MIN_CAPACITY", min_capacity)
    if kind == "dense":
        torch.manual_seed(0)
        model = DenseBaseline(matched_baseline_config(tiny_config("gqa"), 3)).eval()
    else:
        model = halting_model(kind)  # ACT halts positions at various loops: early exit runs
    g = torch.Generator().manual_seed(1)
    vocab = model.cfg.vocab_size
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (20, 16, 10, 9)]
    # Row 1 is longer than the batch when it joins and leaves first; row 3 is done at once.
    prompt_lens, joins, ends = [7, 14, 2, 9], [0, 2, 4, 5], [20, 16, 10, 9]
    with torch.no_grad():
        got, widths, capacities = schedule_logits(model, seqs, prompt_lens, joins, ends, chunk=5)
        for i, seq in enumerate(seqs):
            ref = model(torch.tensor([seq]), N_LOOPS)[0, prompt_lens[i] - 1: ends[i]]
            torch.testing.assert_close(got[i], ref, atol=2e-5, rtol=1e-4)
    # The batch widened for the longer prompt and narrowed when that row left.
    assert widths == [8, 9, 15, 16, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    if min_capacity == 8:
        assert capacities == [8, 16, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32]
    else:
        assert set(capacities) == {64}


def test_a_long_prompt_is_prefilled_in_chunks():
    model = halting_model("gqa")
    pf = Prefill(model, list(range(3, 40)), N_LOOPS, keep_logits=True)
    with torch.no_grad():
        ran = [pf.run(16) for _ in range(3)]
        ref = model(pf.ids, N_LOOPS)[0]
    assert ran == [16, 16, 5] and pf.finished
    torch.testing.assert_close(pf.all_logits(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_prompts_prefilled_together_match_prefilled_alone(kind):
    """One left-padded forward for several prompts leaves each with the cache and logits
    it gets alone (ACT halts positions at different loops, so deeper entries are filled)."""
    model = halting_model(kind)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist()
               for n in (3, 9, 6)]
    with torch.no_grad():
        together = [Prefill(model, p, N_LOOPS, keep_logits=True) for p in prompts]
        prefill_together(model, together)
        for p, pf in zip(prompts, together):
            alone = Prefill(model, p, N_LOOPS, keep_logits=True)
            alone.run(len(p))
            assert pf.finished
            torch.testing.assert_close(pf.all_logits(), alone.all_logits(), atol=2e-5, rtol=1e-4)
            fill_depths(alone.cache, model.cache_keys(N_LOOPS), len(p))
            for key in model.cache_keys(N_LOOPS):
                assert pf.cache.length(key) == len(p)
                for name, t in alone.cache[key].items():
                    torch.testing.assert_close(pf.cache[key][name], t, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unstarted"):
        prefill_together(model, together)
