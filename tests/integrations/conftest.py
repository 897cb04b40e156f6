"""Fixtures of the integration tests: tiny byte-vocabulary models and checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from open_mythos import ByteTokenizer, OpenMythos
from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.model import CausalLM
from tests.conftest import halting_model, tiny_config

BYTE_VOCAB = ByteTokenizer().vocab_size  # 259


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread, and do not suffer from busy neighbours.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def byte_model(attn_type: str = "gqa", seed: int = 0, **overrides) -> OpenMythos:
    """A tiny eval-mode model over the byte vocabulary whose ACT halts at various loops.

    Tensors that start constant (router bias, injection, LoRA scales, norms) are perturbed,
    so a conversion that re-initialised any of them would be caught.
    """
    model = halting_model(attn_type, seed=seed, **{"vocab_size": BYTE_VOCAB, **overrides})
    return _perturbed(model)


def byte_baseline(attn_type: str = "gqa", seed: int = 0, core_layers: int = 3) -> DenseBaseline:
    """A tiny eval-mode dense baseline over the byte vocabulary (norms perturbed, as in
    :func:`byte_model`), FLOPs-matched to the looped model of the same attention."""
    torch.manual_seed(seed)
    cfg = matched_baseline_config(tiny_config(attn_type, vocab_size=BYTE_VOCAB), core_layers)
    return _perturbed(DenseBaseline(cfg).eval())


#: Every model kind with both attention types: ``(kind, attn_type)``.
KIND_PARAMS = [("looped", "gqa"), ("looped", "mla"), ("dense", "gqa"), ("dense", "mla")]


def byte_model_of(kind: str, attn_type: str) -> CausalLM:
    """:func:`byte_model` (``"looped"``) or :func:`byte_baseline` (``"dense"``)."""
    return byte_model(attn_type) if kind == "looped" else byte_baseline(attn_type)


def _perturbed(model: CausalLM) -> CausalLM:
    perturbed = ("router_bias", "injection.log_A", "injection.log_dt", "injection.B",
                 "lora.scale.weight", "norm.weight")
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(perturbed):
                t.add_(0.1 * torch.randn_like(t))
    return model


def write_training_checkpoint(run_dir: Path, model: CausalLM, tokenizer: str = "byte",
                              step: int = 3) -> Path:
    """A checkpoint in the trainer's own format (written by its own save function)."""
    from open_mythos.training.checkpoint import (
        TrainingCheckpoint,
        gather_model_state,
        save_checkpoint,
        tied_parameters,
    )

    tied = tied_parameters(model)
    ckpt = TrainingCheckpoint(
        step=step, model_state=gather_model_state(model, tied), model_config=model.cfg,
        train_config_toml=f'[data]\ntokenizer = "{tokenizer}"\n', optimizer_state={},
        trainer_state={})
    return save_checkpoint(run_dir, ckpt, tied)


class ScriptedModel(OpenMythos):
    """A tiny model whose next token is scripted: position ``p`` predicts
    ``script[p % len(script)]`` by a margin of 100 logits, whatever the input; the real
    network (cache, loops, masks) still runs underneath. ``calls`` records the ``n_loops``
    of every forward."""

    def __init__(self, script: bytes | list[int], **overrides):
        super().__init__(byte_model("gqa", **overrides).cfg)
        self.script = torch.tensor(list(script))
        self.calls: list[int | None] = []

    def forward(self, input_ids, n_loops=None, kv_cache=None, start_pos=0, **kwargs):
        self.calls.append(n_loops)
        logits = super().forward(input_ids, n_loops, kv_cache, start_pos, **kwargs)
        T = input_ids.shape[1]
        nxt = self.script[torch.arange(start_pos, start_pos + T) % len(self.script)]
        bonus = torch.zeros_like(logits)
        bonus[:, torch.arange(T), nxt] = 100.0
        return logits + bonus


def scripted_text(script: bytes, prompt_len: int, n_tokens: int) -> str:
    """What :class:`ScriptedModel` generates after a prompt of ``prompt_len`` tokens."""
    return bytes(script[(prompt_len - 1 + k) % len(script)] for k in range(n_tokens)).decode(
        "utf-8", errors="replace")
