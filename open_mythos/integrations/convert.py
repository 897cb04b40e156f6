"""Checkpoint formats: convert both ways; the tokenizer stored with a model.

The two layouts (training checkpoint or run directory; Hugging Face directory) are
described in :mod:`open_mythos.checkpoints`, whose one loader reads both for every model
kind without ``transformers``; :func:`load_model`, :func:`read_config`,
:func:`detect_format`, :class:`LoadedModel` and :class:`CheckpointFormat` are re-exported
here. :func:`training_to_hf` writes the Hugging Face layout (needs ``transformers``);
:func:`hf_to_training` writes a weights-only training checkpoint directory
(``model.safetensors`` + ``config.json``). Both keep the model's kind: a dense baseline's
Hugging Face ``config.json`` carries ``core_layers`` and ``core_ffn_dim``. Tokenizer files
are copied when found (see :func:`find_tokenizer_dir`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoints import (
    CHECKPOINT_DIR,
    HF_MODEL_TYPE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    CheckpointFormat,
    LoadedModel,
    detect_format,
    load_model,
    read_config,
    tied_parameters,
)
from ..tokenizers import BYTE_TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer
from ..training.checkpoint import TRAIN_CONFIG_FILE
from ..training.runfiles import RUN_TOKENIZER_DIR

# Files that make up a tokenizer (ours or a Hugging Face one); copied as a group.
TOKENIZER_FILES = (
    BYTE_TOKENIZER_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja",
)


# Tokenizers ----------------------------------------------------------------------------------


def find_tokenizer_dir(ckpt_dir: str | Path) -> Path | None:
    """Where the tokenizer of a checkpoint lives: the checkpoint directory itself, else its
    run directory's copy (``RUN/checkpoints/step_N`` -> ``RUN/tokenizer``, written by the
    trainer) or the run directory itself, else the local directory named by ``[data]
    tokenizer`` in its ``train_config.toml``. None if there is none of these."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir]
    if ckpt_dir.parent.name == CHECKPOINT_DIR:
        run_dir = ckpt_dir.parent.parent
        candidates += [run_dir / RUN_TOKENIZER_DIR, run_dir]
    spec = _train_config_tokenizer(ckpt_dir)
    if spec is not None and spec.lower() != "byte":
        candidates.append(Path(spec).expanduser())
    for d in candidates:
        if d.is_dir() and any((d / f).is_file() for f in TOKENIZER_FILES):
            return d
    return None


def _train_config_tokenizer(ckpt_dir: Path) -> str | None:
    """``[data] tokenizer`` of the run that wrote a checkpoint, for text runs only (a task
    run's vocabulary is the task's, whatever that key says)."""
    toml_path = ckpt_dir / TRAIN_CONFIG_FILE
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        return None
    if not toml_path.is_file():
        return None
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8")).get("data", {})
    except tomllib.TOMLDecodeError:
        return None
    spec = data.get("tokenizer", "byte")
    return spec if isinstance(spec, str) and not data.get("task") else None


def resolve_tokenizer(loaded: LoadedModel, spec: str | Tokenizer | None = None) -> Tokenizer:
    """The tokenizer to use with a loaded model.

    ``spec`` (a name for :func:`~open_mythos.tokenizers.load_tokenizer`) wins; otherwise the
    tokenizer stored with the checkpoint (:func:`find_tokenizer_dir`), the ``byte``
    tokenizer its training config names, or the byte tokenizer when the vocabulary has
    exactly its size.

    Raises:
        ValueError: no tokenizer can be found, or it has more ids than the model.
    """
    if spec is None:
        found = find_tokenizer_dir(loaded.path)
        if found is not None:
            spec = str(found)
        elif (_train_config_tokenizer(loaded.path) or "").lower() == "byte" \
                or loaded.cfg.vocab_size == ByteTokenizer().vocab_size:
            spec = "byte"
        else:
            raise ValueError(
                f"no tokenizer stored with {str(loaded.path)!r} and the vocabulary "
                f"({loaded.cfg.vocab_size}) is not the byte tokenizer's; pass --tokenizer "
                "(a tokenizer directory, or 'byte')")
    tok = load_tokenizer(spec)
    if tok.vocab_size > loaded.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                         f"{loaded.cfg.vocab_size} embedding rows")
    return tok


def save_tokenizer(tokenizer_source: str | Path | Tokenizer | None, out_dir: Path,
                   hf_files: bool) -> bool:
    """Write a tokenizer into ``out_dir``; True if one was written.

    A directory is copied file by file (:data:`TOKENIZER_FILES`); a :class:`ByteTokenizer`
    (or ``"byte"``) writes ``byte_tokenizer.json`` and, with ``hf_files``, an equivalent
    ``transformers`` fast tokenizer so ``AutoTokenizer.from_pretrained(out_dir)`` works.
    """
    if tokenizer_source is None:
        return False
    if isinstance(tokenizer_source, (str, Path)) and str(tokenizer_source).lower() != "byte":
        src = Path(tokenizer_source).expanduser()
        copied = False
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out_dir / name)
                copied = True
        if not copied:
            raise FileNotFoundError(f"no tokenizer files in {str(src)!r}")
        if hf_files and (src / BYTE_TOKENIZER_FILE).is_file() and not (src / "tokenizer.json").is_file():
            _save_hf_byte_tokenizer(out_dir)
        return True
    tok = load_tokenizer(tokenizer_source) if not isinstance(tokenizer_source, Tokenizer) \
        else tokenizer_source
    if not hasattr(tok, "save_pretrained"):
        raise TypeError(f"cannot save tokenizer {tok!r}")
    tok.save_pretrained(out_dir)
    if hf_files and isinstance(tok, ByteTokenizer):
        _save_hf_byte_tokenizer(out_dir)
    return True


def _save_hf_byte_tokenizer(out_dir: Path) -> None:
    from .hf import byte_tokenizer_for_transformers

    byte_tokenizer_for_transformers().save_pretrained(str(out_dir))


def _default_tokenizer_source(loaded: LoadedModel) -> str | Path | None:
    found = find_tokenizer_dir(loaded.path)
    if found is not None:
        return found
    if (_train_config_tokenizer(loaded.path) or "").lower() == "byte" \
            or loaded.cfg.vocab_size == ByteTokenizer().vocab_size:
        return "byte"
    return None


# Conversion ----------------------------------------------------------------------------------


def training_to_hf(checkpoint: str | Path, out_dir: str | Path, *,
                   tokenizer: str | Path | Tokenizer | None = None,
                   dtype: torch.dtype | None = None, **config_kwargs: Any) -> Path:
    """Write a training checkpoint (or run directory) as a Hugging Face directory.

    Args:
        checkpoint: checkpoint or run directory.
        out_dir: created if needed; receives ``config.json``, ``generation_config.json``,
            ``model.safetensors`` and the tokenizer.
        tokenizer: tokenizer to store (default: the one found with the checkpoint, see
            :func:`find_tokenizer_dir`, or ``byte`` if the training config names it).
        dtype: optional dtype for the saved weights.
        **config_kwargs: extra ``OpenMythosHFConfig`` keys (``n_loops=8``...). Special token
            ids default to the tokenizer's.

    Returns:
        ``out_dir``.
    """
    from .hf import OpenMythosForCausalLM

    fmt, ckpt_dir = detect_format(checkpoint)
    if fmt is not CheckpointFormat.TRAINING:
        raise ValueError(f"{str(checkpoint)!r} is already a Hugging Face directory")
    loaded = load_model(ckpt_dir, dtype=dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = tokenizer if tokenizer is not None else _default_tokenizer_source(loaded)
    tok = _tokenizer_or_none(source)
    if tok is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config_kwargs.setdefault(key, getattr(tok, key))
    hf = OpenMythosForCausalLM.from_mythos(loaded.model, **config_kwargs)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(source, out_dir, hf_files=True)
    return out_dir


def hf_to_training(hf_dir: str | Path, out_dir: str | Path, *,
                   tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Write a Hugging Face directory as a weights-only training checkpoint directory.

    ``out_dir`` receives ``model.safetensors`` (tied head stored once, with the ``tied``
    metadata the trainer writes) and ``config.json``; ``load_checkpoint(out_dir)`` and the
    ``generate``/``serve`` commands read it. It has no optimizer or trainer state, so it
    starts a run rather than resuming one. The tokenizer files of ``hf_dir`` (or
    ``tokenizer``) are copied.

    Returns:
        ``out_dir``.
    """
    fmt, src = detect_format(hf_dir)
    if fmt is not CheckpointFormat.HF:
        raise ValueError(f"{str(hf_dir)!r} is not a Hugging Face OpenMythos directory")
    loaded = load_model(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = tied_parameters(loaded.model)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items() if k not in tied}
    save_file(state, str(out_dir / MODEL_FILE),
              metadata={"format": "pt", "step": "0", "tied": json.dumps(tied)})
    (out_dir / MODEL_CONFIG_FILE).write_text(
        json.dumps(loaded.cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    source = tokenizer if tokenizer is not None else find_tokenizer_dir(src)
    save_tokenizer(source, out_dir, hf_files=False)
    return out_dir


def _tokenizer_or_none(source: str | Path | Tokenizer | None) -> Tokenizer | None:
    if source is None:
        return None
    if isinstance(source, Tokenizer):
        return source
    return load_tokenizer(str(source))


__all__ = [
    "HF_MODEL_TYPE", "TOKENIZER_FILES", "CheckpointFormat", "LoadedModel", "detect_format",
    "find_tokenizer_dir", "hf_to_training", "load_model", "read_config", "resolve_tokenizer",
    "save_tokenizer", "training_to_hf",
]
