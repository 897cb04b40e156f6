"""Golden loss curve: ``configs/tiny.toml`` trained for the first steps on CPU, seed 0,
compared step by step with ``tests/golden/tiny_losses.json``.

Any change to the model, its initialisation, the data, the loss or the optimiser step
moves these losses; so does nothing else. After a deliberate change, regenerate the file
and review the diff in the same commit::

    .venv/bin/python -m tests.training.test_golden_loss
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from open_mythos.training import Trainer

from .conftest import REPO, read_metrics, tiny_config

GOLDEN = REPO / "tests" / "golden" / "tiny_losses.json"
CONFIG = "configs/tiny.toml"
STEPS, SEED = 30, 0
REGENERATE = "python -m tests.training.test_golden_loss"


def tiny_losses(out: Path) -> list[float]:
    """Per-step training losses of :data:`CONFIG` for :data:`STEPS` steps (fp32, CPU, one
    thread), from the run's ``metrics.jsonl``."""
    cfg = tiny_config(out, run__steps=STEPS, run__seed=SEED, run__device="cpu",
                      run__save_every=0)
    Trainer(cfg).train()
    return [row["loss"] for row in read_metrics(out)]


def _release(version: str) -> str:
    # "2.13.0+cpu" and "2.13.0+cu128" run the same CPU kernels: compare the release only.
    return version.split("+")[0]


def test_tiny_config_reproduces_its_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if _release(golden["torch"]) != _release(torch.__version__):
        pytest.skip(f"{GOLDEN.name} was recorded with torch {golden['torch']} and this is "
                    f"torch {torch.__version__}, whose float32 kernels may round differently; "
                    f"regenerate it with `{REGENERATE}` and review the diff")
    assert (golden["config"], golden["steps"], golden["seed"]) == (CONFIG, STEPS, SEED)
    losses = tiny_losses(tmp_path / "run")
    # Bit-exact where it was recorded; 1e-5 relative allows last-bit differences of other
    # CPUs' kernels (perturbing every weight by one float32 ulp moves these losses by at
    # most 7e-7 relative), far below what any change to the training step does.
    assert losses == pytest.approx(golden["losses"], rel=1e-5, abs=0)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        losses = tiny_losses(Path(tmp) / "run")
    record = {"config": CONFIG, "steps": STEPS, "seed": SEED, "device": "cpu",
              "precision": "fp32", "torch": torch.__version__, "command": REGENERATE,
              "losses": losses}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN.relative_to(REPO)}: {STEPS} losses, {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} (torch {torch.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
