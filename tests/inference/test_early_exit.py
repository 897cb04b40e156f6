"""ACT early exit at inference really skips work, and changes nothing else."""



import pytest
import torch

from open_mythos.inference import generate
from tests.conftest import halting_model


def force_halting(model, halt_loop_per_row: list[int]) -> list[int]:
    """Make row b halt at loop ``halt_loop_per_row[b]`` (1-based); returns the rows seen per call.

    Only still-looping rows reach the halting head, so the replacement can tell which rows a
    call holds; it records the sub-batch sizes to prove halted rows stop computing.
    """
    seen, state = [], {"t": 0}
    model.recurrent.register_forward_pre_hook(lambda *a: state.update(t=0))

    def act(h):
        t = state["t"]
        alive = [k for k in halt_loop_per_row if k > t]
        assert h.shape[0] == len(alive), "a halted sequence was computed again"
        seen.append(h.shape[0])
        state["t"] = t + 1
        p = torch.tensor([1.0 if k == t + 1 else 0.0 for k in alive])
        return p.view(-1, 1).expand(h.shape[0], h.shape[1])

    model.recurrent.act.forward = act
    return seen


def test_forced_halting_at_k_equals_running_k_loops(attn_type):
    model = halting_model(attn_type, act_threshold=0.99)
    ids = torch.randint(0, 97, (2, 9))
    reference = halting_model(attn_type, use_act=False)  # output = last loop state
    reference.load_state_dict(model.state_dict())
    want = reference(ids, n_loops=3)
    force_halting(model, [3, 3])
    got = model(ids, n_loops=16)
    assert model.recurrent.last_loops_run == 3
    assert model.recurrent.last_work_fraction == pytest.approx(3 / 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_generation_with_per_sequence_halting(attn_type):
    """Row 0 halts after 2 loops, row 1 after 5: each matches its own n_loops run."""
    model = halting_model(attn_type, act_threshold=0.99)
    reference = halting_model(attn_type, use_act=False)  # output = last loop state
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 6))
    seen = force_halting(model, [2, 5])
    out = generate(model, ids, 6, n_loops=12, do_sample=False)
    for row, k in enumerate((2, 5)):
        solo = generate(reference, ids[row:row + 1], 6, n_loops=k, do_sample=False)
        assert torch.equal(out[row], solo[0])
    # Per forward: loops 1-2 see both rows, loops 3-5 only row 1, nothing after loop 5.
    assert seen == [2, 2, 1, 1, 1] * 6
    assert model.recurrent.last_work_fraction == pytest.approx((2 + 5) / (2 * 12))


def test_padding_does_not_keep_a_row_looping(attn_type):
    """A row stops once its real tokens have halted: left padding, whose state nothing reads,
    used to keep every padded row looping to ``n_loops`` (20-28% more work in a batched
    prefill of task prompts, and loop counts that depended on the batch)."""
    model = halting_model(attn_type, act_threshold=0.99)
    reference = halting_model(attn_type, use_act=False)  # output = last loop state
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    real = mask.bool()
    state = {"t": 0}
    model.recurrent.register_forward_pre_hook(lambda *a: state.update(t=0))

    def act(h):  # real tokens halt at the second loop; padding never does
        state["t"] += 1
        halt = real if state["t"] == 2 else torch.zeros_like(real)
        return halt[:h.shape[0]].to(h.dtype)

    model.recurrent.act.forward = act
    got = model(ids, n_loops=16, attention_mask=mask)
    assert model.recurrent.last_loops_run == 2
    assert model.recurrent.last_work_fraction == pytest.approx(2 / 16)
    want = reference(ids, n_loops=2, attention_mask=mask)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
