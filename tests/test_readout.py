"""Per-depth readout (``forward(..., readout_depths=...)``) against separate forwards."""

from __future__ import annotations

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.baseline import DenseBaseline, matched_baseline_config

from .conftest import equality_tolerance, halting_model, tiny_config


def _ids(cfg, B=2, T=10, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _with_lora(model):
    # A non-zero LoRA, so that every loop index computes something different.
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.1)
    return model


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_readout_equals_a_forward_stopped_at_each_depth(attn, device_dtype):
    device, dtype = device_dtype
    torch.manual_seed(0)
    model = _with_lora(OpenMythos(tiny_config(attn, use_act=False))).eval()
    model = model.to(device=device, dtype=dtype)
    ids = _ids(model.cfg).to(device)
    with torch.no_grad():
        out = model(ids, n_loops=5, readout_depths=range(1, 6))
        separate = {d: model(ids, n_loops=d) for d in range(1, 6)}
    assert out.logits.device == device and out.logits.dtype == dtype
    torch.testing.assert_close(out.logits, separate[5], **equality_tolerance(dtype, separate[5]))
    for d in range(1, 6):
        tol = equality_tolerance(dtype, separate[d])
        torch.testing.assert_close(out.depth_logits[d], separate[d], **tol, msg=f"depth {d}")
        if d > 1:  # the band tells neighbouring depths apart
            assert (separate[d] - separate[d - 1]).float().abs().max() > 2 * tol["atol"]
    # The last loop's state is the output's: its logits are not computed twice.
    assert out.depth_logits[5] is out.logits
    assert set(out.states) == set(range(1, 6)) and out.states[2].shape == (2, 10, 64)


def test_readout_with_act_reads_the_loop_state_not_the_mixture():
    """With ACT on and a threshold never reached, the state after d loops is the state of an
    ACT-off model with the same weights after d loops; the output stays the ACT mixture."""
    torch.manual_seed(1)
    act = _with_lora(OpenMythos(tiny_config(act_threshold=float("inf")))).eval()
    plain = OpenMythos(tiny_config(use_act=False)).eval()
    plain.load_state_dict(act.state_dict())
    ids = _ids(act.cfg)
    with torch.no_grad():
        out = act(ids, n_loops=4, readout_depths=[1, 3])
        assert torch.allclose(out.logits, act(ids, n_loops=4, act_early_exit=False), atol=1e-5)
        for d in (1, 3):
            assert torch.allclose(out.depth_logits[d], plain(ids, n_loops=d), atol=1e-5)
    assert set(out.depth_logits) == {1, 3}


def test_baseline_readout_after_each_core_block():
    torch.manual_seed(2)
    model = DenseBaseline(matched_baseline_config(tiny_config(), 3)).eval()
    ids = _ids(model.cfg)
    with torch.no_grad():
        out = model(ids, readout_depths=[1, 2, 3])
        ctx = model._context(ids, 0, None, None)
        x = model.encode(ids, ctx)
        for d, block in enumerate(model.core, start=1):
            x = block(x, ctx, f"core_{d - 1}")
            by_hand = model.head(model.decode(x, ctx))
            assert torch.allclose(out.depth_logits[d], by_hand, atol=1e-6)
        assert torch.allclose(out.logits, model(ids), atol=1e-6)


def test_readout_gradients_reach_the_embedding_through_an_early_depth():
    torch.manual_seed(3)
    model = OpenMythos(tiny_config(use_act=False))
    out = model(_ids(model.cfg), n_loops=3, readout_depths=[1])
    out.depth_logits[1].square().mean().backward()
    assert model.embed.weight.grad.abs().sum() > 0


def test_readout_rejects_bad_depths_and_caches():
    model = OpenMythos(tiny_config(use_act=False)).eval()
    ids = _ids(model.cfg)
    for bad in ([0], [4], [1.5], [True], torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="readout depths"):
            model(ids, n_loops=3, readout_depths=bad)
    with pytest.raises(ValueError, match="without kv_cache"):
        model(ids, n_loops=3, kv_cache={}, readout_depths=[1])
    baseline = DenseBaseline(matched_baseline_config(tiny_config(), 2))
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        baseline(ids, readout_depths=[3])


def test_head_lens_and_states_only():
    torch.manual_seed(4)
    model = OpenMythos(tiny_config(use_act=False)).eval()
    ids = _ids(model.cfg)
    with torch.no_grad():
        head = model(ids, n_loops=3, readout_depths=[2], readout_lens="head")
        assert torch.allclose(head.depth_logits[2], model.head(model.norm(head.states[2])))
        none = model(ids, n_loops=3, readout_depths=[2], readout_lens="none")
    assert none.depth_logits == {} and torch.allclose(none.states[2], head.states[2])
    with pytest.raises(ValueError, match="lens"):
        model(ids, n_loops=3, readout_depths=[2], readout_lens="coda2")


@pytest.mark.parametrize("kind", ["looped", "baseline"])
def test_logits_at_selects_the_positions_of_the_full_logits(kind):
    """``logits_at`` (a mask or flat indices) gives the full forward's logits at those
    positions, for a plain forward and for every readout lens."""
    torch.manual_seed(5)
    if kind == "looped":
        model = _with_lora(OpenMythos(tiny_config(use_act=False))).eval()
    else:
        model = DenseBaseline(matched_baseline_config(tiny_config(use_act=False), 3)).eval()
    ids = _ids(model.cfg, B=3, T=9)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 2], mask[1, 5:], mask[2, 8] = True, True, True
    index = mask.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        full = model(ids, n_loops=3)
        for at in (mask, index):
            torch.testing.assert_close(model(ids, n_loops=3, logits_at=at), full[mask],
                                       rtol=1e-6, atol=1e-6)
        for lens in ("coda", "head"):
            whole = model(ids, n_loops=3, readout_depths=[1, 2, 3], readout_lens=lens)
            part = model(ids, n_loops=3, readout_depths=[1, 2, 3], readout_lens=lens,
                         logits_at=index)
            torch.testing.assert_close(part.logits, whole.logits[mask], rtol=1e-6, atol=1e-6)
            for d in (1, 2, 3):
                torch.testing.assert_close(part.depth_logits[d], whole.depth_logits[d][mask],
                                           rtol=1e-6, atol=1e-6)
                assert part.states[d].shape == whole.states[d].shape  # states stay whole


def test_logits_at_rejects_a_wrong_mask_or_float_indices():
    model = OpenMythos(tiny_config(use_act=False)).eval()
    ids = _ids(model.cfg, B=2, T=6)
    with pytest.raises(ValueError, match="shape"):
        model(ids, n_loops=2, logits_at=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer position indices"):
        model(ids, n_loops=2, logits_at=torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="integer position indices"):
        model(ids, n_loops=2, logits_at=torch.zeros(2, 6, dtype=torch.long))


def _float64(model):
    return model.double()


@pytest.mark.parametrize("attn, absorb", [("gqa", None), ("mla", True), ("mla", False)])
@pytest.mark.parametrize("coda_layers", [0, 1, 2])
def test_the_last_coda_block_runs_only_at_the_logits_at_positions(attn, absorb, coda_layers):
    """With ``logits_at`` the last Coda block computes queries and FFN at those positions
    only: logits and gradients equal the full forward's at those positions (float64; the
    norms compute in float32, so the gradients' sums over positions agree to ~1e-7), with
    left padding and for a prompt chunk after a cached one (keys of both chunks), and its FFN
    sees N positions, not B * T."""
    from open_mythos.inference import KVCache

    torch.manual_seed(3)
    cfg = tiny_config(attn, use_act=False, coda_layers=coda_layers, n_kv_heads=2)
    model = _float64(_with_lora(OpenMythos(cfg)))
    for module in model.modules():
        if hasattr(module, "absorb"):
            module.absorb = absorb
    ids = _ids(cfg, B=3, T=9)
    pad = torch.ones(3, 9, dtype=torch.long)
    pad[1, :3] = 0  # left padding of the second sequence
    index = torch.tensor([2, 13, 14, 17, 26])  # rows 0, 1, 1, 1, 2
    seen = []
    if coda_layers:
        model.coda[-1].ffn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    for mask in (None, pad):
        model.zero_grad()
        full = model(ids, n_loops=3, attention_mask=mask).flatten(0, 1)[index]
        full.square().sum().backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        part = model(ids, n_loops=3, attention_mask=mask, logits_at=index)
        part.square().sum().backward()
        torch.testing.assert_close(part, full, rtol=1e-10, atol=1e-10)
        for name, grad in want.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad,
                                       rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    if coda_layers:
        assert seen[-1][:2] == (len(index), 1) and seen[0][:2] == (3, 9)
    model.eval()
    with torch.no_grad():  # a second prompt chunk attends over the cached first one too
        whole = model(ids, n_loops=2)[:, 5:].flatten(0, 1)
        cache = KVCache(9)
        model(ids[:, :5], n_loops=2, kv_cache=cache)
        at = torch.tensor([0, 3, 6, 11])  # of the (3, 4) second chunk
        torch.testing.assert_close(
            model(ids[:, 5:], n_loops=2, kv_cache=cache, start_pos=5, logits_at=at),
            whole[at], rtol=1e-10, atol=1e-10)


def test_logits_at_with_no_or_many_positions():
    """No position selected gives (0, vocab) (GQA's grouped one-query path included); more
    than a few positions per row run the last Coda block whole (cheaper then: each query
    would copy its row's keys), with the same logits."""
    torch.manual_seed(4)
    model = OpenMythos(tiny_config("gqa", use_act=False, n_kv_heads=2)).eval()
    ids = _ids(model.cfg, B=2, T=16)
    seen = []
    model.coda[-1].ffn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    with torch.no_grad():
        full = model(ids, n_loops=2)
        assert model(ids, n_loops=2, logits_at=torch.zeros(0, dtype=torch.long)).shape == (0, 97)
        many = torch.arange(0, 32, 2)  # 8 of 16 positions per row: more than a quarter
        torch.testing.assert_close(model(ids, n_loops=2, logits_at=many),
                                   full.flatten(0, 1)[many], rtol=1e-6, atol=1e-6)
    assert seen[-1] == (2, 16) and seen[-2] == (0, 1)


def test_readout_depths_of_any_integer_kind():
    """np.arange / torch.arange depths are loop counts like Python ints (as n_loops)."""
    import numpy as np

    model = OpenMythos(tiny_config(use_act=False)).eval()
    ids = _ids(model.cfg)
    with torch.no_grad():
        want = model(ids, n_loops=3, readout_depths=[1, 2, 3])
        for depths in (np.arange(1, 4), torch.arange(1, 4), [np.int64(1), 2, 3]):
            got = model(ids, n_loops=3, readout_depths=depths)
            assert sorted(got.depth_logits) == [1, 2, 3]
            assert all(type(d) is int for d in got.depth_logits)
            for d in (1, 2, 3):
                assert torch.equal(got.depth_logits[d], want.depth_logits[d])


def test_a_readout_returns_its_own_states_when_another_call_runs_in_between():
    """The kept loop states travel with the call, not through ``recurrent.last_states``
    (the module's, which a call from another thread replaced between the loops and the
    readout: depths went missing, or came from the other call's input)."""
    torch.manual_seed(0)
    model = halting_model("gqa").eval()
    a, b = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        want = model(a, n_loops=4, readout_depths=[1, 2, 3, 4])
    busy: list[int] = []

    def another_call(module, args, out):  # what another thread's forward does meanwhile
        if not busy:
            busy.append(1)
            model(b, n_loops=2)
            busy.pop()

    model.recurrent.register_forward_hook(another_call)
    with torch.no_grad():
        got = model(a, n_loops=4, readout_depths=[1, 2, 3, 4])
    assert sorted(got.depth_logits) == [1, 2, 3, 4]
    for d in (1, 2, 3, 4):
        torch.testing.assert_close(got.states[d], want.states[d], rtol=0, atol=0)
        torch.testing.assert_close(got.depth_logits[d], want.depth_logits[d], rtol=0, atol=0)
