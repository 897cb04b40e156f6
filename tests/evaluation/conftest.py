"""Tiny task-sized models for the evaluation tests, and an independent greedy decoder.

Tests run with one intra-op thread: on a shared 2-core machine several threads per process
oversubscribe the cores and make these tiny ops far slower.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from open_mythos import OpenMythos
from open_mythos.tasks import (
    EOS_ID,
    VOCAB_SIZE,
    Task,
    decode_answer,
    encode_prompt,
    get_task,
    make_batch,
)
from tests.conftest import tiny_config


def task_config(attn_type: str = "gqa", **overrides):
    """A model config over the task vocabulary, small enough for many sweeps."""
    base = dict(vocab_size=VOCAB_SIZE, dim=32, n_heads=2, n_kv_heads=1, max_seq_len=24)
    return tiny_config(attn_type, **{**base, **overrides})


def act_model(attn_type: str = "gqa", seed: int = 0, **overrides) -> OpenMythos:
    """Random model whose ACT halts positions at different loops (about 1 to 6)."""
    torch.manual_seed(seed)
    cfg = task_config(attn_type, act_threshold=0.9, act_halt_bias_init=-1.5, **overrides)
    model = OpenMythos(cfg)
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.3)
    torch.nn.init.normal_(model.recurrent.lora.B, std=0.05)
    return model.eval()


def small_parity() -> Task:
    """Whole-string parity of 1-3 bits (OOD: 4-5): learnable in a few dozen steps."""
    return get_task("parity", lengths=(1, 3), ood_lengths=(4, 5), running=False)


def train_briefly(model: torch.nn.Module, task: Task, steps: int = 50, n_loops: int = 2,
                  seed: int = 0) -> torch.nn.Module:
    """``steps`` AdamW steps of answer-token cross-entropy; returns the model in eval mode."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = make_batch(task, rng, "train", 32)
        logits = model(batch["input_ids"], n_loops)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def slow_greedy(model: torch.nn.Module, prompt: str, n_loops: int, early_exit: bool,
                max_new_tokens: int) -> str:
    """One example at a time, the whole sequence re-run every step, no cache, no padding."""
    ids = encode_prompt(prompt).unsqueeze(0)
    out = []
    for _ in range(max_new_tokens):
        tok = int(model(ids, n_loops, act_early_exit=early_exit)[0, -1].argmax())
        out.append(tok)
        if tok == EOS_ID:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return decode_answer(out)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="package")
def parity_model() -> OpenMythos:
    """A looped model trained for 50 steps on :func:`small_parity` (ACT on, 2 loops)."""
    with threads(1):
        torch.manual_seed(0)
        return train_briefly(OpenMythos(task_config(max_seq_len=16)), small_parity())
