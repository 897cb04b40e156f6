"""Every rank runs the same number of loops when ACT early exit is on (SPEC §3.7)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from open_mythos.training.distributed import agree_across_ranks, transformer_blocks
from tests.conftest import halting_model
from tests.inference.test_early_exit import force_halting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, halt_at: list[int], results, agree: bool | str = True,
            attn_type: str = "gqa") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = halting_model(attn_type, act_threshold=0.99)
        k = halt_at[rank]
        force_halting(model, [k, k])
        if agree == "fsdp":  # a user's own FSDP2 wrapping, as torchtitan users write it
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (2,))
            for block in transformer_blocks(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        elif agree:
            agree_across_ranks(model)
        ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(rank))
        out = model(ids, n_loops=12)
        # A local all-reduce after the loop proves the ranks are still in step.
        total = torch.tensor([float(model.recurrent.last_loops_run)])
        dist.all_reduce(total)
        results[rank] = (model.recurrent.last_loops_run, float(total), bool(torch.isfinite(out).all()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_ranks_agree_on_the_number_of_loops(attn_type):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), [2, 5], results, True, attn_type), nprocs=2,
             join=True)
    # Rank 0 halted after 2 loops but keeps stepping (on an empty sub-batch) until rank 1
    # has halted too, so collectives inside the loop (FSDP all-gathers) stay matched.
    assert results[0] == (5, 10.0, True) and results[1] == (5, 10.0, True)


@pytest.mark.distributed
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_a_model_sharded_by_the_user_agrees_by_itself(attn_type):
    """fully_shard on every block (no agree_across_ranks): each loop all-gathers, so a
    rank that stopped at its own depth left its peer's all-gathers unmatched (gloo:
    collective mismatch; NCCL: a hang). The sharded block takes the agreed test itself."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), [2, 5], results, "fsdp", attn_type), nprocs=2,
             join=True)
    assert results[0] == (5, 10.0, True) and results[1] == (5, 10.0, True)


@pytest.mark.distributed
def test_the_layer_itself_runs_no_collective():
    # Without agree_across_ranks each rank stops at its own depth: the decision is local.
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), [2, 5], results, False), nprocs=2, join=True)
    assert results[0] == (2, 7.0, True) and results[1] == (5, 7.0, True)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_a_rank_whose_rows_all_halted_steps_on_an_empty_batch(attn_type):
    """What a rank does while a peer still loops: every block runs on 0 rows (its FSDP
    all-gathers must match the peer's). MLA's plain order could not reshape 0 rows."""
    model = halting_model(attn_type, act_threshold=0.99).eval()
    force_halting(model, [2, 2])
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = model(ids, n_loops=6)
        assert model.recurrent.last_loops_run == 2
        model.recurrent.any_alive = lambda alive: True  # "another rank is still running"
        stepped = model(ids, n_loops=6)
    assert model.recurrent.last_loops_run == 6
    torch.testing.assert_close(stepped, alone, rtol=0, atol=0)
