"""CUDA: the paths that only a GPU takes, checked against independent references.

Skipped without a GPU (CI has none). On a GPU they cover what the CPU suite cannot: the
native grouped expert matmul (bf16, Hopper or newer), CUDA attention kernels, training
steps, cached and batched generation, self-speculative decoding and the compiled paths, each
against a float64 computation or against the same work done on the CPU. Run them with
``pytest tests/test_cuda.py`` on a machine with CUDA.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from open_mythos import OpenMythos
from open_mythos.inference import generate
from open_mythos.inference.speculative import speculative_generate
from open_mythos.layers.moe import MoEFFN, grouped_mm_supported
from open_mythos.training.trainer import compile_blocks
from tests.conftest import halting_model, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

CUDA = torch.device("cuda:0")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm())


# Bands for a whole tensor against float64: fp32 arithmetic lands far under 1e-4 (no TF32:
# PyTorch's default for matmuls), bf16 operands between 1e-3 and 1e-2.
BAND = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def naive_moe(moe: MoEFFN, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """The layer's function in float64 on the CPU, one token and one chosen expert at a
    time, for the given expert choice (a bf16 router may break near-ties differently)."""
    d = {n: p.detach().double().cpu().requires_grad_() for n, p in moe.named_parameters()}
    x = x.detach().double().cpu().requires_grad_()
    logits = x @ d["router.weight"].t()
    H = moe.expert_dim
    rows = []
    for n in range(x.shape[0]):
        idx = topk_idx[n].cpu()
        gates = logits[n, idx].softmax(-1)
        out = 0
        for j, e in enumerate(idx.tolist()):
            gu = x[n] @ d["w_gate_up"][e]
            out = out + gates[j] * ((F.silu(gu[:H]) * gu[H:]) @ d["w_down"][e])
        rows.append(out)
    y = torch.stack(rows)
    y = y + F.linear(F.silu(F.linear(x, d["shared.gate.weight"])) * F.linear(x, d["shared.up.weight"]),
                     d["shared.down.weight"])
    return y, x, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_forward_and_gradients_match_float64(dtype):
    torch.manual_seed(0)
    cfg = tiny_config(n_experts=8, n_experts_per_tok=2, expert_dim=32)
    moe = MoEFFN(cfg).to(CUDA).train()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(96, cfg.dim, device=CUDA)
    if dtype == torch.bfloat16:
        # What training under autocast does: bf16 matmuls on the fp32 master weights.
        assert grouped_mm_supported(x.bfloat16(), moe.w_gate_up.bfloat16()) == (
            torch.cuda.get_device_capability()[0] >= 9)
    xin = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        topk_idx, _, _ = moe.route(xin.detach())
        out = moe(xin)
    g = torch.randn_like(out, dtype=torch.float32)
    (out.float() * g).sum().backward()

    ref, x64, params = naive_moe(moe, x, topk_idx)
    (ref * g.double().cpu()).sum().backward()
    band = BAND[dtype]
    assert rel_err(out, ref) < band
    assert rel_err(xin.grad, x64.grad) < band
    for name, p in moe.named_parameters():
        assert rel_err(p.grad, params[name].grad) < band, name


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_model_on_cuda_matches_the_cpu(attn_type):
    """fp32 on CUDA equals fp32 on the CPU (ACT halting positions at different loops);
    bf16 on CUDA is within bf16's band of float64 (ACT off: bf16 rounding may move a
    position's halting loop, which is not an error of the kernels)."""
    model = halting_model(attn_type)
    plain = halting_model(attn_type, use_act=False)
    ids = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(ids, n_loops=5)
        cuda = copy.deepcopy(model).to(CUDA)(ids.to(CUDA), n_loops=5)
        ref = copy.deepcopy(plain).double()(ids, n_loops=5)
        bf16 = copy.deepcopy(plain).to(CUDA, torch.bfloat16)(ids.to(CUDA), n_loops=5)
    assert cuda.device.type == "cuda" and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)
    assert rel_err(bf16, ref) < BAND[torch.bfloat16]


def _train(model: OpenMythos, ids: torch.Tensor, steps: int, bf16: bool = False) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1], n_loops=3)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + 0.01 * model.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_training_steps_on_cuda_match_the_cpu(attn_type):
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type)).train()
    ids = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(2))
    cpu = _train(copy.deepcopy(model), ids, 4)
    cuda = _train(copy.deepcopy(model).to(CUDA), ids.to(CUDA), 4)
    assert cuda == pytest.approx(cpu, rel=1e-4)
    bf16 = _train(copy.deepcopy(model).to(CUDA), ids.to(CUDA), 30, bf16=True)
    assert all(map(torch.isfinite, torch.tensor(bf16))) and bf16[-1] < 0.8 * bf16[0]


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_bf16_training_step_never_waits_for_the_gpu(attn_type):
    """Forward, loss, backward, fused AdamW and the router-bias update queue their kernels
    without one host synchronisation (which would stall the CPU behind the GPU each step)."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn_type)).train().to(CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 97, (4, 33), device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1], n_loops=3)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        (loss + 0.01 * model.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias()

    step()  # first-call set-up (allocator, cuBLAS handles) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_token_ids_out_of_range_fail_on_the_device():
    """CUDA ids are range-checked on the device (no host read): the process fails with
    the check's message. A device-side assert poisons its CUDA context: a subprocess."""
    code = ("import torch\n"
            "from open_mythos import OpenMythos\n"
            "from tests.conftest import tiny_config\n"
            "model = OpenMythos(tiny_config('gqa')).cuda()\n"
            "ids = torch.full((1, 4), 97, device='cuda')\n"
            "model(ids)\n"
            "torch.cuda.synchronize()\n")
    root = Path(__file__).resolve().parents[1]
    # Launches made synchronous, so that the error is raised by the check's own call (the
    # embedding's index assert would fail the process too, from another frame).
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert "token ids must be in [0, 97)" in done.stderr or \
        "in _validate" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_whole_step_cuda_graphs_match_eager():
    """Forward and loss compiled as one graph and replayed as CUDA graphs (``mode=
    "reduce-overhead"``, ``benchmarks/train.py --compile cudagraphs``): the same losses and
    router biases as eager steps."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config("gqa")).train().to(CUDA)
    ids = torch.randint(0, 97, (4, 33), device=CUDA)

    def run(m, compile_mode):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

        def loss_of(ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = m(ids[:, :-1], n_loops=3)
            return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

        if compile_mode:
            torch._dynamo.reset()
            # A graph that CUDA graphs cannot replay is an error here, not a quiet fallback.
            torch._inductor.config.triton.cudagraph_or_error = True
            loss_of = torch.compile(loss_of, fullgraph=True, mode=compile_mode)
        losses = []
        for _ in range(5):
            torch.compiler.cudagraph_mark_step_begin()
            loss = loss_of(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.update_router_bias()
            losses.append(loss.item())
        return losses, m.recurrent.block.ffn.router_bias.clone()

    eager, bias = run(copy.deepcopy(model), None)
    try:
        graphs, graph_bias = run(copy.deepcopy(model), "reduce-overhead")
    finally:
        torch._inductor.config.triton.cudagraph_or_error = False
    assert graphs == pytest.approx(eager, rel=2e-2)
    # Five bias steps of +-rate: the graphs accumulated the expert loads (a lost update
    # would leave the bias at zero); a near-tie routed differently moves it by 2 * rate.
    rate = model.recurrent.block.ffn.bias_update_rate
    assert bias.abs().max() >= 3 * rate - 1e-6
    assert (graph_bias - bias).abs().max() <= 2 * rate + 1e-6


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_batched_generation_on_cuda_equals_the_cpu(attn_type):
    """Left-padded batch, ACT halting with early exit: the same greedy tokens."""
    model = halting_model(attn_type)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    kw = dict(do_sample=False, attention_mask=mask)
    cpu = generate(model, ids, 12, 5, **kw)
    cuda = generate(copy.deepcopy(model).to(CUDA), ids.to(CUDA), 12, 5,
                    **{**kw, "attention_mask": mask.to(CUDA)})
    assert torch.equal(cuda.cpu(), cpu)


def test_speculative_greedy_on_cuda_equals_plain_greedy():
    torch.manual_seed(0)
    model = OpenMythos(tiny_config("gqa", max_loop_iters=6, use_act=False))
    torch.nn.init.normal_(model.recurrent.lora.B, std=1.0)
    model = model.to(CUDA).eval()
    ids = torch.randint(0, 97, (2, 7), device=CUDA)
    want = generate(model, ids, 16, 6, do_sample=False)
    for lens in ("coda", "head"):
        got = speculative_generate(model, ids, 16, 6, draft_loops=1, draft_tokens=3,
                                   draft_lens=lens)
        assert torch.equal(got, want)


@pytest.mark.slow
def test_compiled_generation_on_cuda_equals_eager():
    model = halting_model("gqa").to(CUDA)
    ids = torch.randint(0, 97, (2, 7), device=CUDA)
    kw = dict(do_sample=False, act_early_exit=False)
    assert torch.equal(generate(model, ids, 8, 4, compile=True, **kw),
                       generate(model, ids, 8, 4, compile=False, **kw))


@pytest.mark.slow
def test_compiled_training_on_cuda_matches_eager():
    """``openmythos train --compile`` on CUDA (inductor, Triton kernels): the same losses."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config("gqa")).train().to(CUDA)
    ids = torch.randint(0, 97, (4, 33), device=CUDA)
    eager = _train(copy.deepcopy(model), ids, 3)
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    assert _train(compiled, ids, 3) == pytest.approx(eager, rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_on_cuda_trains_saves_and_resumes(tmp_path, precision):
    """``openmythos train`` on the GPU: the loss falls, the checkpoint loads on the CPU with
    the trained model's outputs, and a resumed run continues from the saved step."""
    from open_mythos.checkpoints import load_checkpoint
    from open_mythos.training import Trainer
    from tests.training.conftest import read_metrics
    from tests.training.conftest import tiny_config as run_config

    def config(steps: int, **extra):
        return run_config(tmp_path / "run", run__device="cuda", run__precision=precision,
                          run__steps=steps, run__save_every=10, optim__lr=3e-3, **extra)

    trainer = Trainer(config(20))
    trainer.train()
    assert next(trainer.core.parameters()).device.type == "cuda"
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    model, cfg = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    trainer.core.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, n_loops=2), trainer.core(x.to(CUDA), n_loops=2).cpu(),
                                   rtol=1e-4, atol=1e-4)
    Trainer(config(25), resume=True).train()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 26))


@pytest.mark.slow
def test_trainer_compiled_model_on_cuda_matches_eager(tmp_path):
    """``openmythos train --compile model`` on the GPU in bf16 (inductor, Triton kernels):
    the losses of the eager run, and a checkpoint with the model's own parameter names."""
    from open_mythos.checkpoints import load_checkpoint
    from open_mythos.training import Trainer
    from tests.training.conftest import read_metrics
    from tests.training.conftest import tiny_config as run_config

    def run(name: str, compile: str) -> list[float]:
        torch._dynamo.reset()
        Trainer(run_config(tmp_path / name, run__device="cuda", run__precision="bf16",
                           run__steps=6, optim__lr=3e-3, run__compile=compile)).train()
        return [r["loss"] for r in read_metrics(tmp_path / name)]

    eager = run("eager", "off")
    assert run("model", "model") == pytest.approx(eager, rel=2e-2)
    model, _ = load_checkpoint(tmp_path / "model")
    assert isinstance(model, OpenMythos)
