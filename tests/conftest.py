"""Shared fixtures: tiny configurations that run in milliseconds on 2 CPU cores."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from open_mythos import MythosConfig, OpenMythos
from open_mythos.inference.autocompile import auto_compile

# Tiny models gain nothing from a second thread, and OpenMP spin-waits hurt on a busy machine.
torch.set_num_threads(1)

# Whether a test's generation compiles must not depend on how long earlier tests decoded:
# the automatic compile policy is off here (and in the commands tests start), except in
# the tests of that policy (tests/inference/test_autocompile.py).
os.environ["OPENMYTHOS_AUTO_COMPILE"] = "0"
auto_compile.enabled = False


REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def load_script(path: Path, name: str, monkeypatch) -> object:
    """Import the script at ``path`` as module ``name``, registered in ``sys.modules`` (where
    its dataclasses look their module up) for the test's duration."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def folder_locked_by_another_process(folder: Path) -> Iterator[None]:
    """``folder`` held with ``flock`` by a live process of its own, as a command still
    writing into it holds it (:mod:`open_mythos.staging`), while the block runs."""
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", holder, str(folder)], stdout=subprocess.PIPE,
                          text=True) as writer:
        try:
            assert writer.stdout.readline().strip() == "locked"
            yield
        finally:
            writer.kill()


def load_benchmark(name: str, monkeypatch) -> object:
    """Import ``benchmarks/<name>.py`` (with ``benchmarks/`` on the path for its ``common``
    import): :func:`load_script`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return load_script(BENCHMARKS / f"{name}.py", f"{name}_bench", monkeypatch)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, and one that changes it (the demo) does not leak."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def tiny_config(attn_type: str = "gqa", **overrides) -> MythosConfig:
    """A small model of every kind of layer: 1 prelude, 1 coda, 4 experts top-2.

    Upstream's N(0, 0.02) init: the mechanism tests compare paths (cached vs full, bf16 vs
    fp32) with tolerances sized for its small logits; the default init has its own tests.
    """
    base = dict(init_std=0.02, embed_init_std=0.02,
        vocab_size=97, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64, max_loop_iters=4,
        prelude_layers=1, coda_layers=1, attn_type=attn_type, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_experts=4,
        n_shared_experts=1, n_experts_per_tok=2, expert_dim=16, lora_rank=4,
    )
    base.update(overrides)
    return MythosConfig(**base)


def halting_model(attn_type: str, seed: int = 0, **overrides) -> OpenMythos:
    """A tiny model whose ACT really halts positions at different loops."""
    torch.manual_seed(seed)
    # Biases chosen so that positions halt anywhere between loop 1 and 8 for both kinds.
    bias = {"gqa": 0.0, "mla": -1.0}[attn_type]
    cfg = tiny_config(attn_type, **{"act_threshold": 0.7, "act_halt_bias_init": bias, **overrides})
    model = OpenMythos(cfg)
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.3)
    # A non-zero LoRA so that every loop index matters.
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.05)
    return model.eval()


@pytest.fixture(params=["gqa", "mla"])
def attn_type(request) -> str:
    return request.param


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(params=[
    pytest.param(("cpu", torch.float32), id="cpu-fp32"),
    pytest.param(("cpu", torch.bfloat16), id="cpu-bf16"),
    pytest.param(("cuda:0", torch.float32), id="cuda-fp32", marks=_NO_CUDA),
    pytest.param(("cuda:0", torch.bfloat16), id="cuda-bf16", marks=_NO_CUDA),
])
def device_dtype(request) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model-equality test: CPU and CUDA (skipped without a GPU), each
    in float32 and bfloat16 (the weights cast; the tests compare two paths in that dtype)."""
    device, dtype = request.param
    return torch.device(device), dtype


def equality_tolerance(dtype: torch.dtype, ref: torch.Tensor) -> dict[str, float]:
    """``assert_close`` tolerances for two computations of the same logits ``ref`` in
    ``dtype`` that differ only in how the work is split (cache vs full, readout vs a
    shorter forward).

    float32: 1e-5, rounding-order noise. bfloat16: both paths round the same values to 8
    bits, but kernels may round a row differently by shape: two bf16 ulps at the largest
    logit (measured on CPU: at most one, while one loop more or fewer moves the logits by
    four or more). The CUDA cases use the same bands; this session had no GPU to measure
    them.
    """
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    largest = ref.detach().abs().max().float().item()
    ulp = 2.0 ** (math.floor(math.log2(max(largest, 2.0**-126))) - 7)  # bf16: 8-bit mantissa
    return {"rtol": 0.0, "atol": 2 * ulp}
