"""The automatic compile policy of ``generate(..., compile=None)`` (the default).

The decisions are tested with the fixed-shape step run as plain Python (``_compiled``
replaced by the uncompiled :func:`~open_mythos.inference.static.decode_step`), so these
tests do not pay a compilation; ``tests/inference/test_static.py`` compiles it for real.
"""

import warnings

import pytest
import torch

import open_mythos.inference.autocompile as autocompile
import open_mythos.inference.static as static
from open_mythos.inference import generate
from open_mythos.inference.autocompile import AutoCompile
from open_mythos.layers.recurrence import ExitRule
from tests.conftest import halting_model


@pytest.fixture
def policy(monkeypatch):
    """A fresh, enabled policy; compiled steps run the uncompiled fixed-shape function and
    are counted in ``policy.graph_calls``."""
    policy = AutoCompile(enabled=True, cost_s=0.0)
    policy.graph_calls = 0

    policy.counts = [0, 0, 0]  # (built, served, traced) as compile_counts gives them
    policy.cache_hits = False  # whether a "compilation" is served by a cache

    def fake_compiled(device_type, shape):
        def step(*args):
            if policy.graph_calls == 0 or policy.traced_for != shape:  # its first call
                policy.counts[1 if policy.cache_hits else 0] += 1
                policy.counts[2] += 1
                policy.traced_for = shape
            policy.graph_calls += 1
            return static.decode_step(*args)
        return step

    policy.traced_for = None
    monkeypatch.setattr("open_mythos.inference.generation.compile_counts",
                        lambda: tuple(policy.counts))
    monkeypatch.setattr(autocompile, "compile_unavailable", lambda device_type: None)
    monkeypatch.setattr("open_mythos.inference.generation.auto_compile", policy)
    monkeypatch.setattr(static, "_compiled", fake_compiled)
    return policy


def _key(model, ids, new, n_loops):
    return ("cpu", ids.shape[0], static.cache_length(ids.shape[1] + new, model.cfg.max_seq_len),
            n_loops, torch.float32, torch.float32, model.cfg.act_threshold)


def test_eager_until_the_compile_cost_is_spent_then_compiled(policy):
    """Ski rental: eager steps are counted per model and shape; once they add up to the
    expected compilation time the next call compiles, and later calls reuse the graph.
    The tokens never change."""
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kw = dict(do_sample=False, attention_mask=mask)
    want = generate(model, ids, 6, 4, compile=False, **kw)
    key = _key(model, ids, 6, 4)

    policy.default_cost_s = 3600.0
    assert torch.equal(generate(model, ids, 6, 4, **kw), want)
    spent = policy.eager_seconds(model, key)
    assert spent > 0 and policy.graph_calls == 0  # 5 eager decode steps counted
    # Another shape (batch 1) and another model have counts of their own.
    generate(model, ids[:1], 6, 4, do_sample=False)
    assert policy.eager_seconds(model, key) == spent
    assert policy.eager_seconds(halting_model("gqa", seed=1), key) == 0.0

    policy.default_cost_s = spent  # now repaid: the next call compiles
    assert torch.equal(generate(model, ids, 6, 4, **kw), want)
    assert policy.graph_calls == 5 and policy.has_compiled(model, key)
    assert policy.cost_s["cpu"] > 0  # the first compiled step's time, measured
    policy.default_cost_s = policy.cost_s["cpu"] = 3600.0
    assert torch.equal(generate(model, ids, 6, 4, **kw), want)  # compiled: reused at once
    assert policy.graph_calls == 10 and policy.eager_seconds(model, key) == spent


def test_a_compilation_served_by_a_cache_leaves_the_estimate(policy):
    """A graph from inductor's on-disk cache (a script run again) compiles in a fraction of
    a new shape's time: taken as the estimate, the policy compiled the next new shape after
    that fraction of eager decoding and paused ~4x longer than it had decoded."""
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 6))
    policy.cost_s["cpu"] = 3600.0
    policy.cache_hits = True
    generate(model, ids, 4, 2, do_sample=False, compile=True)
    assert policy.has_compiled(model, _key(model, ids, 4, 2))
    assert policy.cost_s["cpu"] == 3600.0
    policy.cache_hits = False  # a new shape, built from scratch: measured
    generate(model, ids, 4, 3, do_sample=False, compile=True)
    assert policy.cost_s["cpu"] < 3600.0
    # Independently of the fake: the real counters' rule.
    assert autocompile.built_from_scratch((0, 0, 0), (1, 0, 1))
    assert not autocompile.built_from_scratch((0, 0, 0), (0, 1, 1))  # a cache hit
    assert not autocompile.built_from_scratch((0, 0, 0), (0, 0, 0))  # reused in memory
    assert autocompile.built_from_scratch((2, 3, 4), (2, 3, 5))  # caches turned off


@pytest.mark.parametrize("options", [
    dict(compile=False),
    dict(act_early_exit=True),
    dict(exit_rule=ExitRule(argmax_streak=1)),
    dict(depth_sharing="last"),
])
def test_calls_a_compiled_step_cannot_serve_stay_eager_and_uncounted(policy, options):
    model = halting_model("mla")
    ids = torch.randint(0, 97, (1, 5))
    generate(model, ids, 4, 3, do_sample=False, **options)
    assert policy.graph_calls == 0
    assert policy.eager_seconds(model, _key(model, ids, 4, 3)) == 0.0


def test_disabled_or_without_a_compiler_the_policy_stays_eager(policy, monkeypatch):
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 5))
    key = _key(model, ids, 4, 2)
    policy.enabled = False
    generate(model, ids, 4, 2, do_sample=False)
    assert policy.graph_calls == 0 and not policy.should_compile(model, key)
    policy.enabled = True
    monkeypatch.setattr(autocompile, "compile_unavailable", lambda device_type: "no compiler")
    generate(model, ids, 4, 2, do_sample=False)
    assert policy.graph_calls == 0 and not policy.should_compile(model, key)


@pytest.mark.parametrize("how", ["hook", "pre_hook", "forward", "global"])
def test_an_instrumented_model_stays_eager_so_hooks_see_every_call(policy, how):
    """SPEC §2: hooks on ``recurrent.act`` / ``block.ffn`` and replaced ``forward``s see
    every call. A compiled step would run them once at trace time, so the policy leaves an
    instrumented model eager, even at a shape it has compiled already."""
    model = halting_model("gqa", act_threshold=float("inf"))
    ids = torch.randint(0, 97, (1, 5))
    key = _key(model, ids, 4, 3)
    generate(model, ids, 4, 3, do_sample=False)  # cost 0: compiled at once
    assert policy.graph_calls == 3 and policy.has_compiled(model, key)

    calls = []
    act = model.recurrent.act
    if how == "hook":
        handle = act.register_forward_hook(lambda *a: calls.append(1))
    elif how == "pre_hook":
        handle = act.register_forward_pre_hook(lambda *a: calls.append(1))
    elif how == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, *a: calls.append(1) if mod is act else None)
    else:
        original = act.forward

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        act.forward = counting
    try:
        assert autocompile.instrumented(model)
        generate(model, ids, 4, 3, do_sample=False)
    finally:
        if how == "forward":
            del act.forward
        else:
            handle.remove()
    assert policy.graph_calls == 3  # no compiled step ran
    assert len(calls) == 4 * 3  # prefill and 3 decode steps, 3 loops each
    assert not autocompile.instrumented(model)
    generate(model, ids, 4, 3, do_sample=False)
    assert policy.graph_calls == 6  # the hook gone, the compiled step again


def test_a_failed_compilation_warns_and_the_generation_continues_eagerly(policy, monkeypatch):
    """The policy's own compilation failing is not the caller's error: a warning, the same
    tokens from eager steps on the same cache (left padding included), and that shape
    stays eager. ``compile=True`` raises the error instead."""
    def broken(device_type, shape):
        def step(*args):
            raise RuntimeError("inductor says no")
        return step

    monkeypatch.setattr(static, "_compiled", broken)
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    kw = dict(do_sample=False, attention_mask=mask)
    want = generate(model, ids, 7, 4, compile=False, **kw)
    with pytest.warns(RuntimeWarning, match="inductor says no"):
        got = generate(model, ids, 7, 4, **kw)
    assert torch.equal(got, want)
    key = _key(model, ids, 7, 4)
    assert not policy.should_compile(model, key) and not policy.has_compiled(model, key)
    assert torch.equal(generate(model, ids, 7, 4, **kw), want)  # eager, no second warning
    with pytest.raises(RuntimeError, match="inductor says no"):
        generate(model, ids, 7, 4, compile=True, act_early_exit=False, **kw)


def test_compile_must_be_a_bool_or_none():
    model = halting_model("gqa")
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, 2, compile="yes")


@pytest.mark.slow
def test_compile_counts_reads_live_counters(tmp_path, monkeypatch):
    """The counter names :func:`compile_counts` reads are the ones this torch increments: a
    graph compiled into an empty inductor cache counts as built, the same graph compiled
    again (dynamo reset) as served. A renamed counter would read 0 for ever, and every
    compilation would look served from the cache (or built), without a failure elsewhere."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()

    def f(x):
        return torch.sin(x) * 3 + x.cumsum(0)

    x = torch.randn(16)
    before = autocompile.compile_counts()
    torch.compile(f)(x)
    built = autocompile.compile_counts()
    assert built[0] > before[0] and built[1] == before[1] and built[2] > before[2]
    assert autocompile.built_from_scratch(before, built)
    torch._dynamo.reset()  # forget the in-memory graph; the on-disk cache stays
    torch.compile(f)(x)
    served = autocompile.compile_counts()
    assert served[1] > built[1] and served[0] == built[0]
    assert not autocompile.built_from_scratch(built, served)
    torch._dynamo.reset()


def test_threads_decoding_a_compiled_shape_leave_the_compiler_stance_as_it_was(policy):
    """A generation's first step on a shape the policy has compiled runs under dynamo's
    "fail_on_recompile" stance, one value for the whole process. Threads entering and
    leaving that window concurrently each restored what they had found, and left the
    process in "fail_on_recompile" for good: every later compilation refused. Worker
    threads now set no stance (it would refuse other threads' compilations too)."""
    from concurrent.futures import ThreadPoolExecutor

    from torch._dynamo import eval_frame

    model = halting_model("gqa")
    prompts = [torch.randint(0, 97, (1, 3 + i)) for i in range(4)]
    want = [generate(model, p, 3, 2, do_sample=False, compile=False) for p in prompts]
    generate(model, prompts[0], 3, 2, do_sample=False, compile=True)  # the shape: compiled

    def work(k: int) -> bool:
        return all(torch.equal(generate(model, prompts[(k + r) % 4], 3, 2, do_sample=False),
                               want[(k + r) % 4]) for r in range(40))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))
    assert eval_frame._stance.stance == "default"
    assert policy.graph_calls > 4 * 40  # the threads' steps ran the compiled path


def test_without_set_stance_a_compiled_shape_is_still_reused(policy, monkeypatch):
    """torch 2.5 (pyproject allows it) has no ``torch.compiler.set_stance``: the check for
    a changed model is skipped, not taken for a failed compilation (which turned the
    shape eager for good)."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    model = halting_model("gqa")
    ids = torch.randint(0, 97, (1, 5))
    want = generate(model, ids, 4, 2, do_sample=False, compile=False)
    assert torch.equal(generate(model, ids, 4, 2, do_sample=False, compile=True), want)
    calls = policy.graph_calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generate(model, ids, 4, 2, do_sample=False), want)
    assert policy.graph_calls == calls + 3 and policy.has_compiled(model, _key(model, ids, 4, 2))
