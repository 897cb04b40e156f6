import math

import pytest
import torch

from open_mythos.inference import generate, stream
from tests.conftest import halting_model


def test_greedy_and_top_k_1_equal_argmax_of_full_forwards(attn_type):
    model = halting_model(attn_type)
    ids = torch.randint(0, 97, (2, 7))
    seq = ids
    for _ in range(6):
        nxt = model(seq, n_loops=5, act_early_exit=False)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(model.generate(ids, max_new_tokens=6, n_loops=5, top_k=1), seq)
    seen = []  # the prefill reads the last position only: the Coda's last FFN runs there
    model.coda[-1].ffn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    assert torch.equal(generate(model, ids, 6, 5, do_sample=False), seq)
    assert seen[0] == (2, 1) and len(seen) == 6


def test_sampling_is_reproducible_with_a_generator():
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (3, 4))
    a = generate(model, ids, 8, 3, generator=torch.Generator().manual_seed(5), top_p=0.9)
    b = generate(model, ids, 8, 3, generator=torch.Generator().manual_seed(5), top_p=0.9)
    assert torch.equal(a, b) and a.shape == (3, 12)


def test_sampling_filters_against_a_float64_softmax_and_survive_extreme_values():
    """Temperature and top-p against a float64 computation; a temperature of 1e-37 (which
    overflowed float32 to NaN probabilities, a 500 for every request in the server's
    batch) samples the argmax, and a top_p that float32 rounds to 0 keeps the top token."""
    from open_mythos.inference.sampling import SamplingParams, filter_logits, select_next

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    probs = filter_logits(logits, SamplingParams(temperature=0.7)).softmax(-1)
    torch.testing.assert_close(probs.double(), (logits.double() / 0.7).softmax(-1),
                               rtol=1e-5, atol=1e-7)
    # top_p: the smallest set of most likely tokens whose float64 mass reaches 0.8.
    p64 = logits.double().softmax(-1)
    kept = filter_logits(logits, SamplingParams(top_p=0.8)).isfinite()
    for row, keep in zip(p64, kept):
        order = row.argsort(descending=True)
        n = int((row[order].cumsum(0) < 0.8).sum()) + 1
        assert keep.sum() == n and keep[order[:n]].all()
    for params in (SamplingParams(temperature=1e-37), SamplingParams(top_p=1e-46),
                   SamplingParams(temperature=1e-300, top_p=1e-46, top_k=2**70)):
        filtered = filter_logits(logits, params)
        assert not filtered.isnan().any()
        tokens = select_next(logits, params, torch.Generator().manual_seed(1))
        assert torch.equal(tokens, logits.argmax(-1))
    # A huge temperature (float32 rounds it to inf) samples uniformly over the ids kept,
    # never one filtered out (their -inf divided by inf was NaN); inf itself is refused.
    huge = SamplingParams(temperature=1e39, vocab_limit=30)
    filtered = filter_logits(logits, huge)
    assert not filtered.isnan().any() and filtered[:, 30:].eq(float("-inf")).all()
    torch.testing.assert_close(filtered[:, :30].softmax(-1), torch.full((4, 30), 1 / 30))
    assert (select_next(logits, huge, torch.Generator().manual_seed(1)) < 30).all()
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be"):
            SamplingParams(temperature=bad)
        SamplingParams(do_sample=False, temperature=bad)  # greedy ignores it


def test_top_k_keeps_exactly_k_tokens_when_the_kth_is_tied():
    """A threshold at the k-th value kept every token tied with it: top_k=2 sampled among
    four tokens, and top_k=1 was not greedy where the best logits tie (bfloat16 often)."""
    from open_mythos.inference.sampling import SamplingParams, filter_logits, select_next

    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [0.5, 3.0, 3.0, -1.0, 3.0]])
    for k in (1, 2, 3):
        kept = filter_logits(logits, SamplingParams(top_k=k)).isfinite()
        assert kept.sum(-1).tolist() == [k, k]
        # The kept ones are k of the most likely (a float64 sort, ties in any order).
        for row, keep in zip(logits.double(), kept):
            assert row[keep].min() >= row.sort(descending=True).values[k - 1]
    draws = torch.stack([select_next(logits, SamplingParams(top_k=1), torch.Generator()
                                     .manual_seed(s)) for s in range(20)])
    assert (draws == logits.argmax(-1)).all()  # top_k=1 is greedy, ties to the lowest id
    ties = torch.randint(0, 3, (200, 50)).float()  # many rows with tied maxima
    assert torch.equal(select_next(ties, SamplingParams(top_k=1), torch.Generator()),
                       ties.argmax(-1))


def test_stop_tokens_end_each_sequence_alone():
    model = halting_model("mla")
    ids = torch.randint(0, 97, (2, 5))
    greedy = generate(model, ids, 10, 3, do_sample=False)
    stop_tok = int(greedy[0, 7])  # the third generated token of row 0
    out = generate(model, ids, 10, 3, do_sample=False, eos_token_id=stop_tok, pad_token_id=0)
    row0 = out[0, 5:].tolist()
    first = row0.index(stop_tok)
    assert all(t == 0 for t in row0[first + 1:])
    assert torch.equal(out[0, : 5 + first + 1], greedy[0, : 5 + first + 1])


def test_left_padded_batch_matches_individual_prompts(attn_type):
    model = halting_model(attn_type)
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = generate(model, batch, 5, 4, do_sample=False, attention_mask=mask)
    ra, rb = (generate(model, p, 5, 4, do_sample=False) for p in (a, b))
    assert torch.equal(out[0, 6:], ra[0, 6:]) and torch.equal(out[1, 6:], rb[0, 3:])


def test_streaming_yields_tokens_as_produced():
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 4))
    toks = [t.clone() for t in stream(model, ids, 5, 2, do_sample=False)]
    assert len(toks) == 5 and all(t.shape == (1,) for t in toks)
    assert torch.equal(torch.stack(toks, 1), generate(model, ids, 5, 2, do_sample=False)[:, 4:])


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be > 0 when sampling"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be"),
    (dict(max_new_tokens=100), "exceeds max_seq_len=64"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "pad prompts on the left"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), r"prompt\(s\) \[0\] are all padding"),
    # Cast to integers first, 0.5 became padding without a word (and 2 read as right padding).
    (dict(attention_mask=torch.tensor([[1.0, 0.5, 1.0]])), "must hold only 1 .* and 0"),
    (dict(attention_mask=torch.tensor([[2, 2, 2]])), "must hold only 1 .* and 0"),
    (dict(pad_token_id=-1, eos_token_id=2), r"pad_token_id=-1 is outside the vocabulary"),
    (dict(eos_token_id=[2, 97]), r"eos_token_id=97 is outside the vocabulary \[0, 97\)"),
    (dict(cache_dtype=torch.int8), "cache dtype must be a floating dtype"),
    (dict(depth_sharing="bogus", max_new_tokens=0), "depth_sharing='bogus' is invalid"),
])
def test_bad_arguments(kwargs, match):
    model = halting_model("gqa")
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_ids_that_are_not_a_tensor_and_a_cache_length_that_is_not_an_integer_are_named():
    from open_mythos.inference import KVCache

    with pytest.raises(TypeError, match="input_ids must be .* tensor .* got list"):
        generate(halting_model("gqa"), [[1, 2, 3]], 2)
    for bad in (8.0, "8", 0, True):  # 8.0 failed in the first forward's allocation
        with pytest.raises(ValueError, match="KVCache max_len must be a positive integer"):
            KVCache(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature="0.7"), "temperature must be a number"),
    (dict(top_p="0.9"), "top_p must be a number"),
    (dict(do_sample="no"), "do_sample must be True or False"),
    (dict(act_early_exit="no"), "act_early_exit must be True, False or None"),
    (dict(attention_mask=[[1, 1, 1]]), "attention_mask must be a tensor"),
    (dict(generator=123), "generator must be a torch.Generator"),
    (dict(cache_dtype="float16"), "cache dtype must be a torch.dtype"),
    (dict(exit_rule=[0.1]), "exit_rule must be an ExitRule or a dict"),
    # A misspelt keyword named stream(), which the caller never called.
    (dict(do_smaple=False), r"generate\(\) got an unexpected keyword argument 'do_smaple'; "
                            r"did you mean 'do_sample'\?"),
    (dict(max_length=9), r"generate\(\) got an unexpected keyword argument 'max_length'; it "
                         r"takes act_early_exit, attention_mask, .*, top_p, vocab_limit$"),
])
def test_arguments_of_the_wrong_type_are_named(kwargs, match):
    """A mistyped argument is a TypeError naming it, before any work (not an error from
    deep inside, or a truthy string read as True)."""
    model = halting_model("gqa")
    with pytest.raises(TypeError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4, **kwargs)


def test_an_exit_rule_may_be_a_dict_of_its_fields():
    from open_mythos import ExitRule

    model = halting_model("gqa").eval()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    rule = dict(kl=0.05, min_loops=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, n_loops=4, exit_rule=rule),
                                   model(ids, n_loops=4, exit_rule=ExitRule(**rule)), rtol=0, atol=0)
    assert torch.equal(generate(model, ids, 4, n_loops=4, do_sample=False, exit_rule=rule),
                       generate(model, ids, 4, n_loops=4, do_sample=False,
                                exit_rule=ExitRule(**rule)))


def test_top_k_larger_than_vocab_and_restores_training_mode():
    model = halting_model("gqa").train()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=3, top_k=10_000)
    assert out.shape == (1, 6) and model.training


def test_suspended_streams_leave_grad_mode_and_model_mode_alone():
    """Between tokens (a generator suspended at ``yield``) the caller keeps gradients and
    the model its training mode, also with two streams consumed in turn."""
    model = halting_model("gqa").train()
    ids = torch.randint(0, 97, (1, 5))
    first = stream(model, ids, 3, 2, do_sample=False)
    second = stream(model, ids, 3, 2, do_sample=False)
    for s in (first, second, first, second):
        next(s)
        assert torch.is_grad_enabled() and model.training
    first.close()
    second.close()
    assert torch.is_grad_enabled() and model.training


def test_vocab_limit_bounds_greedy_and_sampled_choices():
    from open_mythos.inference.sampling import SamplingParams, filter_logits, select_next

    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0], [3.0, 0.0, 0.0, 8.0]])
    greedy = SamplingParams(do_sample=False, vocab_limit=3)
    assert select_next(logits, greedy).tolist() == [2, 0]
    sampled = SamplingParams(do_sample=True, temperature=10.0, vocab_limit=2)
    probs = filter_logits(logits, sampled).softmax(-1)
    assert (probs[:, 2:] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    g = torch.Generator().manual_seed(0)
    assert all(select_next(logits, sampled, g).max() < 2 for _ in range(50))
    assert select_next(logits, SamplingParams(do_sample=False, vocab_limit=9)).tolist() == [3, 3]
    with pytest.raises(ValueError, match="vocab_limit"):
        SamplingParams(vocab_limit=0)


def test_threads_sharing_one_model_get_what_they_would_alone():
    """docs/inference.md, "One model, several threads": generation, streaming, readouts and
    perplexity from four threads at once on one eval model equal single-threaded results."""
    from concurrent.futures import ThreadPoolExecutor

    from open_mythos.evaluation.sweep import perplexity

    model = halting_model("mla").eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (1 + i % 2, 3 + i), generator=gen) for i in range(4)]
    padded = torch.randint(0, 97, (2, 5), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])

    def work(i: int) -> tuple:
        p = prompts[i]
        with torch.no_grad():
            readout = model(p, n_loops=3, readout_depths=[1, 2, 3])
        return (generate(model, p, 5, 2 + i, do_sample=False, compile=False),
                torch.cat(list(stream(model, padded, 4, 3, do_sample=False, compile=False,
                                      attention_mask=mask))),
                readout.depth_logits, perplexity(model, [p[:1].repeat(1, 3)], n_loops=2))

    alone = [work(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(work, [i for _ in range(5) for i in range(4)]))
    for k, got in enumerate(together):
        want = alone[k % 4]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert sorted(got[2]) == [1, 2, 3]
        for d in (1, 2, 3):
            torch.testing.assert_close(got[2][d], want[2][d], rtol=0, atol=0)
        assert got[3] == want[3]


def test_the_last_of_several_threads_restores_a_shared_models_mode():
    """Thread A enters inference on a train-mode model, thread B enters, A leaves first:
    B's forwards must still run in eval mode (each thread switching on its own put the
    model back in train mode under B: dropout on, the expert load counted)."""
    import threading

    from open_mythos.inference.generation import _inference as evaluating

    model = halting_model("gqa").train()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def a():
        with evaluating(model):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with evaluating(model):
            b_in.set()
            a_out.wait(5)
            seen.append(model.training)
        seen.append(model.training)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [False, True]
    assert all(m.training for m in model.modules())
    # A model set to train mode inside an evaluation block: eval again for the next call,
    # and put back in train mode when the block ends.
    model.eval()
    with evaluating(model):
        model.train()
        with evaluating(model):
            assert not any(m.training for m in model.modules())
        assert not model.training
    assert all(m.training for m in model.modules())


def test_eager_decoding_runs_modules_compiled_in_place_eagerly():
    """A model whose blocks were compiled in place (a training run's `--compile`, or the
    user's own) decoded with compile=False: every prompt length, position and cache key
    compiled the loop body anew (11 graphs, ~17 s for 8 tokens on a tiny model) and filled
    the recompile limit. Reference: the same weights in an uncompiled model."""
    from torch._dynamo.utils import counters

    from open_mythos import OpenMythos
    from open_mythos.inference.speculative import speculative_generate
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    compiled = OpenMythos(tiny_config("gqa", use_act=False, max_loop_iters=3)).eval()
    plain = OpenMythos(compiled.cfg).eval()
    plain.load_state_dict(compiled.state_dict())
    compiled.recurrent.compile_loop()
    for block in compiled.prelude:
        block.compile()
    ids = torch.randint(0, 97, (1, 5))
    want = generate(plain, ids, 8, 3, do_sample=False, compile=False)
    counters.clear()
    assert torch.equal(generate(compiled, ids, 8, 3, do_sample=False, compile=False), want)
    assert torch.equal(speculative_generate(compiled, ids, 8, 3, draft_loops=1, draft_tokens=2,
                                            do_sample=False), want)
    assert not counters["stats"]["unique_graphs"]
