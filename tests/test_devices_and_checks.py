"""The one device resolver and the one loop-count check, used by every entry point."""

from __future__ import annotations

import pytest
import torch

from open_mythos.config import check_loops
from open_mythos.devices import resolve_device


def test_resolve_device():
    auto = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(auto)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda:0")
    # A device this machine lacks, or one that holds no data: one line, not a traceback
    # from the first tensor put there.
    with pytest.raises(ValueError, match="holds no data"):
        resolve_device("meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(ValueError, match="'xpu' is not available"):
            resolve_device("xpu")


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun with two processes on a one-GPU machine: rank 1 would take cuda:1 and fail
    with "invalid device ordinal" at its first allocation (seen on an H200 machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda:0")
    for spec in ("auto", "cuda"):
        with pytest.raises(ValueError, match="1 CUDA device.*--nproc_per_node.*run.device=cpu"):
            resolve_device(spec, local_rank=1)
    with pytest.raises(ValueError, match="numbered 0..0"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3", None])
def test_check_loops_rejects(value):
    with pytest.raises(ValueError, match="n_loops must be a positive integer"):
        check_loops(value)


def test_check_loops_accepts():
    check_loops(1)
    check_loops(None, allow_none=True)
    with pytest.raises(ValueError, match="max_loops must be a positive integer or None"):
        check_loops(False, name="max_loops", allow_none=True)


@pytest.mark.parametrize("bad", [0, True, 1.5])
def test_every_entry_point_shares_the_check(bad):
    """The model, text generation and the HF config reject the same loop counts."""
    from open_mythos import OpenMythos
    from open_mythos.integrations.textgen import GenerationOptions, complete
    from open_mythos.tokenizers import ByteTokenizer
    from tests.conftest import tiny_config

    model = OpenMythos(tiny_config(vocab_size=259)).eval()
    with pytest.raises(ValueError, match="n_loops must be a positive integer"):
        model(torch.zeros(1, 3, dtype=torch.long), n_loops=bad)
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="n_loops must be a positive integer"):
        complete(model, tokenizer, [tokenizer.encode("ab")],
                 GenerationOptions(max_new_tokens=1, n_loops=bad))
