"""The fixed-shape (compilable) decode step against the eager model."""

import logging

import pytest
import torch

from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.inference import KVCache, generate, stream
from open_mythos.inference.static import CompiledDecoder, cache_length
from tests.conftest import halting_model, tiny_config


def _eager_logits(model, ids, tokens, n_loops, mask=None):
    """Next-token logits after the prompt and after each of ``tokens`` (eager, no early exit)."""
    B, T0 = ids.shape
    cache = KVCache(T0 + len(tokens))
    full = None if mask is None else torch.cat([mask, torch.ones(B, len(tokens), dtype=mask.dtype)], 1)
    out = [model(ids, n_loops, cache, 0, attention_mask=None if mask is None else mask,
                 act_early_exit=False)[:, -1]]
    for i, tok in enumerate(tokens[:-1]):
        pos = T0 + i
        out.append(model(tok.view(B, 1), n_loops, cache, pos,
                         attention_mask=None if full is None else full[:, : pos + 1],
                         act_early_exit=False)[:, -1])
    return out


@torch.no_grad()
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16])
def test_fixed_shape_step_equals_eager_decode(attn_type, cache_dtype):
    """ACT halting positions at different loops, left padding, a longer (bucketed) buffer.

    With a bf16 cache ACT does not halt early: a rounded key can tip a position over the
    halting threshold a loop earlier, a discrete change that no band separates from a bug.
    """
    if cache_dtype is None:
        model = halting_model(attn_type)
    else:
        model = halting_model(attn_type, act_threshold=float("inf"))
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.tensor([[1] * 9, [0, 0, 0, 0, 1, 1, 1, 1, 1]])
    tokens = [torch.randint(0, 97, (2,)) for _ in range(6)]
    ref = _eager_logits(model, ids, tokens, 6, mask)

    cache = KVCache(40, dtype=cache_dtype)  # longer than needed: the tail must stay masked
    first = model(ids, 6, cache, 0, attention_mask=mask, act_early_exit=True)[:, -1]
    dec = CompiledDecoder(model, cache, 6, 9, mask, compile=False)
    got = [first] + [dec.step(t) for t in tokens[:-1]]
    # bf16: each cached key and value rounded once (2^-9 relative) against the fp32 cache of
    # the eager reference: measured at most 5e-4 over 16 random models; one loop more or
    # fewer moves these logits by 0.04 or more (the old band of 0.05 accepted it for most).
    tol = 1e-5 if cache_dtype is None else 3e-3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    assert all(cache.length(k) == 9 + 5 for k in dec.keys)


@torch.no_grad()
def test_fixed_shape_step_with_the_sorted_moe_dispatch(monkeypatch):
    """Large experts sort even for a decode step (GATHER_MAX_ELEMENTS): the fixed-shape
    step through the sorted dispatch equals eager decoding through it."""
    import open_mythos.layers.moe as moe_module

    monkeypatch.setattr(moe_module, "GATHER_MAX_ELEMENTS", 0)
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 6))
    tokens = [torch.randint(0, 97, (2,)) for _ in range(4)]
    ref = _eager_logits(model, ids, tokens, 4)
    cache = KVCache(16)
    first = model(ids, 4, cache, 0, act_early_exit=True)[:, -1]
    dec = CompiledDecoder(model, cache, 4, 6, compile=False)
    for a, b in zip([first] + [dec.step(t) for t in tokens[:-1]], ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prepare_fills_depths_the_prefill_did_not_reach():
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 5))
    cache = KVCache(16)
    model(ids, 2, cache, 0)  # only two recurrent depths cached
    dec = CompiledDecoder(model, cache, 5, 5, compile=False)
    assert all(cache.length(f"recurrent_loop_{t}") == 5 for t in range(5))
    torch.testing.assert_close(cache["recurrent_loop_4"]["k"], cache["recurrent_loop_1"]["k"])
    assert dec.step(torch.tensor([3])).shape == (1, 97)


@torch.no_grad()
def test_fixed_shape_step_for_the_dense_baseline():
    torch.manual_seed(0)
    model = DenseBaseline(matched_baseline_config(tiny_config(), 3)).eval()
    ids = torch.randint(0, 97, (2, 4))
    tokens = [torch.randint(0, 97, (2,)) for _ in range(3)]
    ref = _eager_logits(model, ids, tokens, 1)
    cache = KVCache(8)
    first = model(ids, kv_cache=cache)[:, -1]
    dec = CompiledDecoder(model, cache, 1, 4, compile=False)
    for a, b in zip([first] + [dec.step(t) for t in tokens[:-1]], ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cache_length_buckets():
    assert cache_length(10, 2048) == 64
    assert cache_length(96, 2048) == 128
    assert cache_length(300, 2048) == 512
    assert cache_length(544, 2048) == 768
    assert cache_length(600, 700) == 700
    assert cache_length(1000, 1000) == 1000


def test_compile_refuses_act_early_exit():
    model = halting_model("gqa")
    with pytest.raises(ValueError, match="act_early_exit=False"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, 2, compile=True,
                 act_early_exit=True)


@pytest.mark.slow
def test_compiled_generate_equals_eager(attn_type, monkeypatch, caplog):
    """torch.compile of the whole step (fullgraph): same greedy tokens as the eager path;
    the default (``compile=None``) then reuses the graph, with the same tokens."""
    from open_mythos.inference.autocompile import AutoCompile, built_from_scratch, compile_counts

    policy = AutoCompile(cost_s=3600.0)  # never repaid here: reuse alone compiles
    monkeypatch.setattr("open_mythos.inference.generation.auto_compile", policy)
    model = halting_model(attn_type)
    ids = torch.randint(0, 97, (2, 7))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    kw = dict(do_sample=False, attention_mask=mask, act_early_exit=False)
    eager = generate(model, ids, 8, 4, compile=False, **kw)
    counts = compile_counts()
    compiled = generate(model, ids, 8, 4, compile=True, **kw)
    assert torch.equal(eager, compiled)
    key = ("cpu", 2, cache_length(15, model.cfg.max_seq_len), 4, torch.float32, torch.float32,
           model.cfg.act_threshold)
    assert policy.has_compiled(model, key)
    # The compilation time becomes the estimate only when the graph was built (not served
    # by inductor's on-disk cache from an earlier run, nor traced earlier in this process).
    assert compile_counts()[2] > 0  # dynamo's counters are live under these names
    if built_from_scratch(counts, compile_counts()):
        assert policy.cost_s["cpu"] > 0
    else:
        assert "cpu" not in policy.cost_s
    kw.pop("act_early_exit")  # the default's own choice: off, since it compiles
    assert torch.equal(generate(model, ids, 8, 4, **kw), eager)
    assert policy.eager_seconds(model, key) == 0.0
    # A model changed in a way the graph holds: the default never recompiles unannounced.
    # A new halting threshold is another shape (eager, counted); a flag the graph guards
    # on (gradient checkpointing) makes the compiled shape count again from zero.
    traced = compile_counts()[2]
    model.cfg.act_threshold = 0.9
    assert torch.equal(generate(model, ids, 8, 4, **kw), generate(model, ids, 8, 4, compile=False,
                                                                   **kw))
    assert policy.eager_seconds(model, (*key[:-1], 0.9)) > 0
    model.cfg.act_threshold = key[-1]
    model.recurrent.gradient_checkpointing = True
    with caplog.at_level(logging.INFO, logger="open_mythos.inference"):
        assert torch.equal(generate(model, ids, 8, 4, **kw), eager)
    assert "does not fit the model any more" in caplog.text
    assert not policy.has_compiled(model, key) and policy.eager_seconds(model, key) > 0
    assert compile_counts()[2] == traced  # nothing was traced
    model.recurrent.gradient_checkpointing = False
    # New weights, updated in place as training does, reach the compiled graph.
    model.load_state_dict(halting_model(attn_type, seed=1).state_dict())
    assert torch.equal(generate(model, ids, 8, 4, compile=True, **kw),
                       generate(model, ids, 8, 4, compile=False, **kw))


@pytest.mark.slow
def test_interleaved_compiled_streams_pick_their_own_graphs(monkeypatch):
    """After its first step a generation evaluates only the guards that tell cached graphs
    apart; two generations of different depth and batch size consumed step by step in turn
    must each keep running their own graph."""
    skipped = []
    set_stance = torch.compiler.set_stance

    def counting(*args, **kwargs):
        skipped.append(kwargs.get("skip_guard_eval_unsafe", False))
        return set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", counting)
    model = halting_model("gqa")
    kw = dict(do_sample=False, act_early_exit=False)
    runs = [(torch.randint(0, 97, (2, 7)), 4), (torch.randint(0, 97, (1, 5)), 2)]
    expected = [generate(model, ids, 6, n, **kw)[:, ids.shape[1]:] for ids, n in runs]
    streams = [stream(model, ids, 6, n, compile=True, **kw) for ids, n in runs]
    got = [[], []]
    for _ in range(6):
        for i, s in enumerate(streams):
            got[i].append(next(s))
    for tokens, want in zip(got, expected):
        assert torch.equal(torch.stack(tokens, 1), want)
    assert sum(skipped) == 2 * 4  # 5 decode steps per stream, the first with every guard


@pytest.mark.slow
def test_more_decode_shapes_than_dynamo_keeps_per_function():
    """Every (batch, cache bucket, loops) shape compiles its own graph; Dynamo's limit of
    graphs per code object (8 by default, 1 here) must not turn the next shape into an error."""
    import torch._dynamo

    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 5))
    kw = dict(do_sample=False, act_early_exit=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for n_loops in (1, 2):
            assert torch.equal(generate(model, ids, 3, n_loops, compile=True, **kw),
                               generate(model, ids, 3, n_loops, compile=False, **kw))


@pytest.mark.slow
def test_more_models_of_one_shape_than_dynamo_keeps_per_function():
    """Models that differ in a constant the graph holds (here ACT's threshold; also the
    structure or the dtype) add graphs to one shape's compiled function: past Dynamo's
    limit (8, here 1) the ninth model of a sweep failed for good with
    FailOnRecompileLimitHit. It now compiles in a further copy of the function."""
    import torch._dynamo

    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 5))
    kw = dict(do_sample=False, act_early_exit=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for threshold in (0.9, 0.3, 0.9):  # the third reuses the first copy's graph
            model.cfg.act_threshold = threshold
            assert torch.equal(generate(model, ids, 3, 2, compile=True, **kw),
                               generate(model, ids, 3, 2, compile=False, **kw))


@pytest.mark.parametrize("name", ["FailOnRecompileLimitHit", "FailOnCacheLimitHit"])
def test_a_full_compiled_copy_moves_on_to_the_next(monkeypatch, name):
    """The first step retries in the next compiled copy when Dynamo refuses another graph,
    under the exception's name in torch >= 2.7 and the one before (torch >= 2.5 is
    supported: importing the new name alone broke every compiled decode there)."""
    from torch._dynamo import exc

    import open_mythos.inference.static as static

    class Full(Exception):
        pass

    for old in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
        monkeypatch.delattr(exc, old, raising=False)
    monkeypatch.setattr(exc, name, Full, raising=False)
    tried = []

    def copy(device_type, shape, n):
        def step(*args):
            tried.append(n)
            if n < 2:
                raise Full()
            return "logits"
        return step

    monkeypatch.setattr(static, "_compiled", copy)
    decoder = static.CompiledDecoder.__new__(static.CompiledDecoder)
    decoder._device_type, decoder._shape, decoder._copy = "cpu", (1, 64, 2), 0
    decoder._step = copy("cpu", (1, 64, 2), 0)
    assert decoder._first_step(()) == "logits"
    assert tried == [0, 1, 2] and decoder._copy == 2


def test_user_compiler_stance_is_kept(monkeypatch):
    """Under a stance the user set (here force_eager) no step switches to another stance."""
    calls = []
    set_stance = torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance",
                        lambda *a, **k: calls.append((a, k)) or set_stance(*a, **k))
    model = halting_model("mla")
    ids = torch.randint(0, 97, (1, 6))
    kw = dict(do_sample=False, act_early_exit=False)
    with set_stance("force_eager"):
        out = generate(model, ids, 5, 3, compile=True, **kw)
    assert calls == []
    assert torch.equal(out, generate(model, ids, 5, 3, compile=False, **kw))
