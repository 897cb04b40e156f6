"""Fixtures of the integration tests: tiny byte-vocabulary models and checkpoints on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from open_mythos import ByteTokenizer, MythosConfig, OpenMythos
from open_mythos.baseline import DenseBaseline, matched_baseline_config
from open_mythos.model import CausalLM
from tests.conftest import halting_model, tiny_config

BYTE_VOCAB = ByteTokenizer().vocab_size  # 259


#: What :func:`trained_model` learns: a few words in a few orders, so that its next-token
#: distributions are spread over several letters (sampling has choices to make).
CORPUS = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat on a mat. " * 8
#: Loops of :func:`trained_model` (trained and served).
TRAINED_LOOPS = 2


@pytest.fixture(scope="session")
def trained_model() -> OpenMythos:
    """A real tiny byte-level model trained for 40 steps on :data:`CORPUS` (about 2 s, fixed
    seed, the global RNG left alone): loss about 1 nat, so every position has a few
    likely bytes, all of them ASCII, for the sampling tests of textgen and the server.
    Its tied head starts with logits of std 8 (``init_logit_std``, the default until
    2026-12-04): training from there pushes the bytes the corpus never uses far down, so
    even sampling at temperature 1.5 yields ASCII text the tests can map back to bytes."""
    tok = ByteTokenizer()
    cfg = MythosConfig(
        vocab_size=tok.vocab_size, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64,
        max_loop_iters=TRAINED_LOOPS, prelude_layers=1, coda_layers=1, attn_type="gqa",
        n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=32, lora_rank=4,
        init_logit_std=8.0)
    data = torch.tensor(tok.encode(CORPUS))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = OpenMythos(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(40):
            starts = torch.randint(0, len(data) - 33, (8,)).tolist()
            window = torch.stack([data[s:s + 33] for s in starts])  # (8, 33)
            logits = model(window[:, :-1], TRAINED_LOOPS)
            loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.update_router_bias()
    return model.eval()


def sampled_ids(tokenizer: ByteTokenizer, text: str, finish_reason: str) -> list[int]:
    """The token ids a completion sampled: its bytes, and the EOS that ended it if any."""
    assert text.isascii(), f"not plain ASCII, cannot recover the bytes: {text!r}"
    return tokenizer.encode(text) + ([tokenizer.eos_token_id] if finish_reason == "stop" else [])


@torch.no_grad()
def next_token_probs(model: OpenMythos, prompt: list[int], generated: list[int], n_loops: int,
                     temperature: float) -> torch.Tensor:
    """(len(generated), V) float64: the distribution each generated token was drawn from,
    recomputed by one full forward (no cache, no early exit) of prompt + generated."""
    ids = torch.tensor([prompt + generated])
    logits = model(ids, n_loops)[0, len(prompt) - 1: -1].double()
    return (logits / temperature).softmax(-1)


def mass_above(probs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(N,) probability of the tokens strictly more likely than each chosen token: top-p
    keeps a token if and only if this is below ``top_p``."""
    chosen = probs.gather(1, torch.tensor(tokens)[:, None])
    return (probs * (probs > chosen)).sum(1)


def rank_of(probs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(N,) number of tokens strictly more likely than each chosen token (0: the argmax):
    top-k keeps a token if and only if this is below ``k``."""
    chosen = probs.gather(1, torch.tensor(tokens)[:, None])
    return (probs > chosen).sum(1)


def last_of_support(probs: torch.Tensor, tokens: list[int], option: str, value: float
                    ) -> torch.Tensor:
    """(N,) whether each chosen token is the least likely one that ``top_k = value`` or
    ``top_p = value`` keeps (rank ``k - 1``; the token whose mass reaches ``top_p``)."""
    if option == "top_k":
        return rank_of(probs, tokens) == value - 1
    chosen = probs.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    above = mass_above(probs, tokens)
    return (above > 0) & (above + chosen >= value)


def in_support(model: OpenMythos, prompt: list[int], choices: list[tuple[str, str]], option: str,
               value: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token of every ``(text, finish_reason)`` choice sampled after ``prompt``:
    whether it lies in the ``top_k = value`` set or the ``top_p = value`` nucleus of the
    distribution it was drawn from (recomputed by :func:`next_token_probs`), and whether it
    is the last token of that support (:func:`last_of_support`). Two (N,) bool tensors."""
    flags, last = [], []
    for text, reason in choices:
        ids = sampled_ids(ByteTokenizer(), text, reason)
        probs = next_token_probs(model, prompt, ids, TRAINED_LOOPS, temperature)
        if option == "top_k":
            flags.append(rank_of(probs, ids) < value)
        else:
            flags.append(mass_above(probs, ids) < value + 1e-4)
        last.append(last_of_support(probs, ids, option, value))
    return torch.cat(flags), torch.cat(last)


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
                              step: int = 3, task: str | None = None) -> Path:
    """A checkpoint in the trainer's own format (written by its own save function); with
    ``task``, of a run trained on that task (``data.task`` in its training config)."""
    from open_mythos.training.checkpoint import (
        TrainingCheckpoint,
        gather_model_state,
        save_checkpoint,
        tied_parameters,
    )

    tied = tied_parameters(model)
    ckpt = TrainingCheckpoint(
        step=step, model_state=gather_model_state(model, tied), model_config=model.cfg,
        train_config_toml=f'[data]\ntokenizer = "{tokenizer}"\n'
        + (f'task = "{task}"\n' if task else ""), optimizer_state={},
        trainer_state={})
    return save_checkpoint(run_dir, ckpt, tied)


class ScriptedModel(OpenMythos):
    """A tiny model whose next token is scripted: position ``p`` predicts
    ``script[p % len(script)]`` by a margin of 100 logits, whatever the input; the real
    network (cache, loops, masks) still runs underneath. ``calls`` records the ``n_loops``
    of every forward. With ``real_positions``, ``p`` counts a row's real tokens (its
    ``attention_mask``) rather than cache columns, so each row of a batch follows the
    script from its own length (how a continuously batched server sees it)."""

    def __init__(self, script: bytes | list[int], real_positions: bool = False, **overrides):
        super().__init__(byte_model("gqa", **overrides).cfg)
        self.script = torch.tensor(list(script))
        self.real_positions = real_positions
        self.calls: list[int | None] = []

    def forward(self, input_ids, n_loops=None, kv_cache=None, start_pos=0, logits_at=None,
                **kwargs):
        self.calls.append(n_loops)
        logits = super().forward(input_ids, n_loops, kv_cache, start_pos, **kwargs)
        scripted = self._scripted(logits, input_ids, start_pos, kwargs)
        if logits_at is None:
            return scripted
        # The script's logits at every position (computed above), then the selected ones.
        return self._at(scripted, self._positions(logits_at, input_ids.shape, scripted.device))

    def _scripted(self, logits, input_ids, start_pos, kwargs):
        """``logits`` (B, T, V) with the script's next token at each position raised."""
        B, T = input_ids.shape
        positions = torch.arange(start_pos, start_pos + T).expand(B, T)
        mask = kwargs.get("attention_mask")
        if self.real_positions and mask is not None:
            positions = (mask.long().cumsum(-1) - 1)[:, -T:].cpu()
        nxt = self.script[positions % len(self.script)]  # (B, T)
        bonus = torch.zeros_like(logits)
        bonus.scatter_(-1, nxt.unsqueeze(-1).to(logits.device), 100.0)
        return logits + bonus


def scripted_text(script: bytes, prompt_len: int, n_tokens: int) -> str:
    """What :class:`ScriptedModel` generates after a prompt of ``prompt_len`` tokens."""
    return bytes(script[(prompt_len - 1 + k) % len(script)] for k in range(n_tokens)).decode(
        "utf-8", errors="replace")


def hf_tokenizers() -> dict:
    """Three local Hugging Face tokenizers of the kinds generation meets: byte-level BPE
    (GPT-2), SentencePiece-style BPE with byte fallback and a decoder that strips a text's
    leading space (Llama, Mistral), and WordPiece with clean-up of spaces before
    punctuation (BERT)."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from open_mythos.tokenizers import MythosTokenizer

    corpus = ["don't stop: the model is looped, isn't it? caf\u00e9 \u4e2d\u6587 \U0001F30D"] * 20
    out = {}
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out["byte-level"] = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    # Llama's layout: specials, the 256 byte tokens <0xNN> as ordinary vocabulary, merges.
    learnt = HFTokenizer(models.BPE(unk_token="<unk>"))
    learnt.pre_tokenizer = pre_tokenizers.Metaspace()
    learnt.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"]))
    learnt_model = json.loads(learnt.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in sorted(learnt_model["vocab"], key=learnt_model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in learnt_model["merges"]]
    sp = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                unk_token="<unk>"))
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    out["sentencepiece"] = transformers.PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wp = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    out["wordpiece"] = transformers.PreTrainedTokenizerFast(
        tokenizer_object=wp, unk_token="[UNK]", eos_token="[SEP]", clean_up_tokenization_spaces=True)
    return {name: MythosTokenizer.from_tokenizer(t) for name, t in out.items()}
