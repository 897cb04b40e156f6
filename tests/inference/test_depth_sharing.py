"""Shared-depth KV caches: each mode's cached decoding equals a per-depth cache whose entries
are overwritten with the shared depth's keys (an independent reference), and holds the bytes
it promises."""

from __future__ import annotations

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.inference import generate
from open_mythos.inference.cache import KVCache
from open_mythos.inference.static import CompiledDecoder
from tests.conftest import tiny_config

N_LOOPS = 4
MODES = {"last": lambda t: N_LOOPS - 1, "first": lambda t: 0, "every:2": lambda t: t - t % 2,
         "every:3": lambda t: t - t % 3}


def model_of(attn_type: str) -> OpenMythos:
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type, use_act=False, max_loop_iters=N_LOOPS))
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.3)  # depths with different keys
    return model.double().eval()


def share_like(ref: KVCache, source, length: int) -> None:
    """Overwrite every recurrent depth's first ``length`` positions with those of the depth
    ``source(t)``: what a shared cache holds for the tokens before the next one."""
    bufs = ref.buffers()
    kept = {t: {n: b[..., :length, :].clone() for n, b in bufs[f"recurrent_loop_{t}"].items()}
            for t in range(N_LOOPS)}
    for t in range(N_LOOPS):
        for n, b in bufs[f"recurrent_loop_{t}"].items():
            b[..., :length, :] = kept[source(t)][n]


@pytest.mark.parametrize("mode", list(MODES))
def test_shared_cache_decoding_equals_overwritten_per_depth_cache(attn_type, mode):
    model = model_of(attn_type)
    ids = torch.randint(0, 97, (2, 12))
    prefill = 5
    shared, ref = KVCache(12, depth_sharing=mode), KVCache(12)
    with torch.no_grad():
        got = [model(ids[:, :prefill], N_LOOPS, shared, 0)[:, -1]]
        want = [model(ids[:, :prefill], N_LOOPS, ref, 0)[:, -1]]
        for pos in range(prefill, ids.shape[1]):
            share_like(ref, MODES[mode], pos)
            got.append(model(ids[:, pos:pos + 1], N_LOOPS, shared, pos)[:, -1])
            want.append(model(ids[:, pos:pos + 1], N_LOOPS, ref, pos)[:, -1])
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-10, atol=1e-10)
    # The modes do change the output: a later token reads another depth's keys.
    with torch.no_grad():
        exact = model(ids, N_LOOPS)[:, prefill - 1:]
    assert not torch.allclose(torch.stack(got, 1), exact, atol=1e-6)


@pytest.mark.parametrize("mode,slots", [("per_depth", N_LOOPS), ("last", 1), ("first", 1),
                                        ("every:2", 2), ("every:3", 2)])
def test_bytes_per_token(attn_type, mode, slots):
    model = model_of(attn_type).float()
    cache = KVCache(16, dtype=torch.bfloat16, depth_sharing=mode)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 10)), N_LOOPS, cache, 0)
    cfg = model.cfg
    values = (2 * cfg.n_kv_heads * cfg.head_dim if attn_type == "gqa"
              else cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    layers = cfg.prelude_layers + slots + cfg.coda_layers
    assert cache.nbytes() == 10 * layers * values * 2  # bf16: 2 bytes a value
    assert len(list(cache.keys())) == layers


def test_generate_takes_a_sharing_mode_and_per_depth_is_exact(attn_type):
    model = model_of(attn_type)
    ids = torch.randint(0, 97, (2, 6))
    plain = generate(model, ids, 6, N_LOOPS, do_sample=False)
    assert torch.equal(generate(model, ids, 6, N_LOOPS, do_sample=False,
                                depth_sharing="per_depth"), plain)
    shared = generate(model, ids, 6, N_LOOPS, do_sample=False, depth_sharing="last")
    assert shared.shape == plain.shape


def test_invalid_modes_and_compiled_decoding_are_refused():
    for bad in ("every", "every:0", "every:x", "shared", 3):
        with pytest.raises(ValueError, match="depth_sharing"):
            KVCache(8, depth_sharing=bad)
    model = model_of("gqa")
    cache = KVCache(8, depth_sharing="last")
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 3)), N_LOOPS, cache, 0)
    with pytest.raises(ValueError, match="per-depth"):
        CompiledDecoder(model, cache, N_LOOPS, 3, compile=False)


def test_every_m_fills_a_kept_depth_from_the_kept_depth_a_stopped_position_read():
    """A forward that stops at a depth in between (here 2 of 4 loops, depths 0 and 1, with
    every:2) stores nothing for depth 1; a later, deeper forward fills depth 2 from the
    depth 1 stands for, the kept depth 0 (docs/adaptive_inference.md). Reference: a
    per-depth cache whose depth 1 is overwritten by depth 0 before the deeper forward."""
    model = model_of("gqa")
    ids = torch.randint(0, 97, (2, 7))
    shared, ref = KVCache(7, depth_sharing="every:2"), KVCache(7)
    with torch.no_grad():
        model(ids[:, :5], 2, shared, 0)
        model(ids[:, :5], 2, ref, 0)
        bufs = ref.buffers()
        for n, b in bufs["recurrent_loop_1"].items():
            b[..., :5, :] = bufs["recurrent_loop_0"][n][..., :5, :]
        got = model(ids[:, 5:], N_LOOPS, shared, 5)
        want = model(ids[:, 5:], N_LOOPS, ref, 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(shared["recurrent_loop_2"]["k"][..., :5, :],
                               shared["recurrent_loop_0"]["k"][..., :5, :])


@pytest.mark.parametrize("mode", ["every:2", "every:3"])
@pytest.mark.parametrize("stopping", ["act", "exit_rule"])
def test_every_m_gives_each_row_what_it_gets_alone(attn_type, mode, stopping):
    """Rows of a batch stop at different depths: a row that stopped at a depth in between
    while others kept looping stored its deepest loop's keys in the next kept depth (never
    stored, docs/adaptive_inference.md); alone, the same row got the kept depth below, and
    its later tokens differed by up to 0.9 in the logits. Reference: each row decoded
    alone, whose stopped positions reach the kept depths through fill_missing (tested above
    against an overwritten per-depth cache)."""
    from open_mythos import ExitRule
    from tests.conftest import halting_model

    if stopping == "act":
        model, rule = halting_model(attn_type).double().eval(), None
    else:
        model, rule = model_of(attn_type), ExitRule(kl=3e-4, min_loops=1)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 12))
    prefill, n_loops = 4, 7

    def decode(rows: torch.Tensor) -> torch.Tensor:
        cache = KVCache(rows.shape[1], depth_sharing=mode)
        out = [model(rows[:, :prefill], n_loops, cache, 0, exit_rule=rule)[:, -1]]
        for pos in range(prefill, rows.shape[1]):
            out.append(model(rows[:, pos:pos + 1], n_loops, cache, pos, exit_rule=rule)[:, -1])
        return torch.stack(out, 1)

    with torch.no_grad():
        batched = decode(ids)
        alone = torch.cat([decode(ids[i:i + 1]) for i in range(ids.shape[0])])
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-10)
