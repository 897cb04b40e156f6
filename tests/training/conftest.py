"""Helpers for the training tests: a tiny run configuration and subprocess launchers.

Every run uses ``configs/tiny.toml`` (dim 32, 1 prelude, 1 coda, 4 experts top-2), so a
step takes milliseconds. Tests run with one intra-op thread: on a shared 2-core machine
several OpenMP threads per process oversubscribe the cores and make tiny ops 100x slower.
They train on the CPU on every machine (``run.device=cpu``; subprocesses see no GPU): their
references are CPU tensors, and torchrun starts two ranks where a machine may have one GPU.
Training on CUDA is checked by ``tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from open_mythos.training import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.toml"


def tiny_config(out: Path, **overrides) -> TrainConfig:
    """``configs/tiny.toml`` writing to ``out``, quiet, with dotted-key overrides given as
    keyword arguments with ``__`` for the dot (``optim__lr=1e-3``)."""
    pairs = [("run.out", str(out)), ("run.progress", False), ("run.eval_every", 0),
             ("run.device", "cpu")]
    pairs += [(k.replace("__", "."), v) for k, v in overrides.items()]
    return load_config(TINY, pairs)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m open_mythos train --config configs/tiny.toml ARGS``."""
    return [sys.executable, "-m", "open_mythos", "train", "--config", str(TINY), "--no-progress",
            *args]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    from open_mythos.training.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "open_mythos", "train", "--config", str(TINY), "--no-progress", *args]


def run_checked(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """The ``datasets`` package, offline, with its cache in ``tmp_path`` (skips without it)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.utils.logging, "get_verbosity", lambda: 40, raising=False)
    datasets.disable_progress_bars()
    return datasets
