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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import (
    CHECKPOINT_DIR,
    DEPTH_METADATA,
    HF_MODEL_TYPE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    CheckpointFormat,
    LoadedModel,
    detect_format,
    load_model,
    read_config,
    read_inference_defaults,
    read_training_depth,
    readable_as_umask_allows,
    save_weights,
    tied_parameters,
    training_depth_recorded,
)
from ..registry import config_dict
from ..staging import remove_killed, staging_folder
from ..tokenizers import (
    BYTE_TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    task_tokenizer,
)
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


def _train_data_config(ckpt_dir: Path) -> dict[str, Any]:
    """``[data]`` of the ``train_config.toml`` stored with a checkpoint ({} without one)."""
    toml_path = Path(ckpt_dir) / TRAIN_CONFIG_FILE
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        import tomli as tomllib
    if not toml_path.is_file():
        return {}
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8")).get("data", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _train_config_tokenizer(ckpt_dir: Path) -> str | None:
    """``[data] tokenizer`` of the run that wrote a checkpoint, for text runs only (a task
    run's vocabulary is the task's, whatever that key says)."""
    data = _train_data_config(ckpt_dir)
    spec = data.get("tokenizer", "byte")
    return spec if isinstance(spec, str) and not data.get("task") else None


def trained_seq_len(ckpt_dir: str | Path) -> int | None:
    """The sequence length a training checkpoint's run trained on (``data.seq_len`` of its
    stored training config), or None where none is recorded (a task run, an HF directory)."""
    seq_len = _train_data_config(Path(ckpt_dir)).get("seq_len")
    ok = isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0
    return seq_len if ok else None


def is_task_checkpoint(ckpt_dir: str | Path) -> bool:
    """Whether a training checkpoint was trained on the task suite (its stored training
    config names ``data.task``): its prompts start with BOS (:func:`task_tokenizer`)."""
    return bool(_train_data_config(Path(ckpt_dir)).get("task"))


def resolve_tokenizer(loaded: LoadedModel, spec: str | Tokenizer | None = None) -> Tokenizer:
    """The tokenizer to use with a loaded model.

    ``spec`` (a name for :func:`~open_mythos.tokenizers.load_tokenizer`) wins; otherwise the
    tokenizer stored with the checkpoint (:func:`find_tokenizer_dir`), the ``byte``
    tokenizer its training config names, or the byte tokenizer when the vocabulary has
    exactly its size. For a task run, ``None`` and ``"byte"`` give
    :func:`~open_mythos.tokenizers.task_tokenizer`: its prompts start with BOS, as its
    training examples did.

    Raises:
        ValueError: no tokenizer can be found, or it has more ids than the model.
    """
    if (spec is None or (isinstance(spec, str) and spec.lower() == "byte")) \
            and is_task_checkpoint(loaded.path):
        spec = task_tokenizer()
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
    _check_tokenizer_fits(tok, loaded.cfg.vocab_size)
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
            _save_hf_byte_tokenizer(out_dir, ByteTokenizer.from_pretrained(src).add_bos_token)
        return True
    tok = load_tokenizer(tokenizer_source) if not isinstance(tokenizer_source, Tokenizer) \
        else tokenizer_source
    if not hasattr(tok, "save_pretrained"):
        raise TypeError(f"cannot save tokenizer {tok!r}")
    tok.save_pretrained(out_dir)
    if hf_files and isinstance(tok, ByteTokenizer):
        _save_hf_byte_tokenizer(out_dir, tok.add_bos_token)
    return True


def _save_hf_byte_tokenizer(out_dir: Path, add_bos_token: bool = False) -> None:
    from .hf import byte_tokenizer_for_transformers

    byte_tokenizer_for_transformers(add_bos_token=add_bos_token).save_pretrained(str(out_dir))


def _tokenizer_source(loaded: LoadedModel, given: str | Path | Tokenizer | None
                      ) -> str | Path | Tokenizer | None:
    """What an export stores as the tokenizer: ``given``, else the checkpoint's own
    (:func:`stored_tokenizer`); for a task run, ``"byte"`` (given or implied) is
    the task tokenizer, whose prompts start with BOS as its examples did."""
    if isinstance(given, str) and given.lower() == "byte" and is_task_checkpoint(loaded.path):
        return task_tokenizer()
    return given if given is not None else stored_tokenizer(loaded)


def stored_tokenizer(loaded: LoadedModel) -> str | Path | Tokenizer | None:
    """The tokenizer that belongs to a checkpoint: a task run's
    (:func:`~open_mythos.tokenizers.task_tokenizer`), else the directory stored with it
    (:func:`find_tokenizer_dir`), else ``"byte"`` when its training config names the byte
    tokenizer or its vocabulary has exactly the byte tokenizer's size; None if unknown."""
    if is_task_checkpoint(loaded.path):
        return task_tokenizer()
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
                   dtype: torch.dtype | None = None, remote_code: bool = True,
                   **config_kwargs: Any) -> Path:
    """Write a training checkpoint (or run directory) as a Hugging Face directory.

    Args:
        checkpoint: checkpoint or run directory.
        out_dir: new or empty (a conversion never writes over files), created if needed;
            receives ``config.json``, ``generation_config.json``,
            ``model.safetensors``, the tokenizer and (with ``remote_code``) the modeling code.
        tokenizer: tokenizer to store (default: the one found with the checkpoint, see
            :func:`find_tokenizer_dir`, or ``byte`` if the training config names it). Its
            ``tokenizer_config.json`` pads on the left (batched generation) and has
            ``model_max_length = max_seq_len``.
        dtype: optional dtype for the saved weights.
        remote_code: ship the modeling code and an ``auto_map``
            (:mod:`.remote_code`), so the directory loads with ``trust_remote_code=True``
            where this package is not installed.
        **config_kwargs: extra ``OpenMythosHFConfig`` keys. ``n_loops`` defaults to the
            depth the run trained at (:attr:`LoadedModel.n_loops`); special token ids to the
            tokenizer's.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``checkpoint`` is not a training checkpoint, or no tokenizer is known
            for it (pass ``tokenizer``).
    """
    from .hf import OpenMythosForCausalLM
    from .remote_code import AUTO_MAP, write_modeling_code

    fmt, ckpt_dir = detect_format(checkpoint)
    if fmt is not CheckpointFormat.TRAINING:
        raise ValueError(f"{str(checkpoint)!r} is already a Hugging Face directory")
    loaded = load_model(ckpt_dir, dtype=dtype)
    source = _tokenizer_source(loaded, tokenizer)
    if source is None:
        raise ValueError(f"no tokenizer is stored with {str(ckpt_dir)!r} and its vocabulary "
                         f"({loaded.cfg.vocab_size}) is not the byte tokenizer's; pass a "
                         "tokenizer directory")
    tok = _tokenizer_or_none(source)
    _check_tokenizer_fits(tok, loaded.cfg.vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config_kwargs.setdefault(key, getattr(tok, key))
    config_kwargs.setdefault("n_loops", loaded.n_loops)
    config_kwargs.setdefault("trained_depth", loaded.n_loops)  # kept apart from n_loops
    hf = OpenMythosForCausalLM.from_mythos(loaded.model, **config_kwargs)
    if remote_code:
        hf.config.auto_map = dict(AUTO_MAP)

    def write(dest: Path) -> None:
        if remote_code:
            write_modeling_code(dest)
        hf.save_pretrained(str(dest), safe_serialization=True)
        save_tokenizer(source, dest, hf_files=True)
        set_tokenizer_defaults(dest, model_max_length=loaded.cfg.max_seq_len,
                               pad_token=_eos_as_pad(tok))
        if tok is not None and not isinstance(tok, ByteTokenizer):
            encode_as_trained(dest)

    return _convert_into(out_dir, (checkpoint, ckpt_dir), write)


# Post-processors that add special tokens around every encoded text (Llama's BOS, BERT's
# [CLS]/[SEP]); ByteLevel's only trims offsets and stays.
_FRAMING_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def encode_as_trained(hf_dir: str | Path) -> None:
    """Make the Hugging Face tokenizer in ``hf_dir`` encode text as a text run's training
    did (:meth:`~open_mythos.tokenizers.MythosTokenizer.encode_literal`): no special tokens
    added around a text (a Llama-style template's BOS: the packed documents never held
    one) and a special token's name inside text read as characters. Edits
    ``tokenizer.json``'s post-processor and ``tokenizer_config.json``."""
    hf_dir = Path(hf_dir)
    fast = hf_dir / "tokenizer.json"
    if fast.is_file():
        data = json.loads(fast.read_text(encoding="utf-8"))
        post = data.get("post_processor")
        if isinstance(post, dict) and post.get("type") in _FRAMING_PROCESSORS:
            data["post_processor"] = None
        elif isinstance(post, dict) and post.get("type") == "Sequence":
            kept = [p for p in post.get("processors", [])
                    if p.get("type") not in _FRAMING_PROCESSORS]
            data["post_processor"] = dict(post, processors=kept) if kept else None
        fast.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = hf_dir / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    # Llama's fast tokenizer rebuilds its template from these two on loading.
    settings.update(add_bos_token=False, add_eos_token=False, split_special_tokens=True)
    config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n",
                      encoding="utf-8")


def _readable(out_dir: Path) -> None:
    """Every file of an export with the mode a new file of this process gets: safetensors
    writes weights 0600 (``save_pretrained`` too), and copies keep their source's mode."""
    for path in out_dir.rglob("*"):
        if path.is_file():
            readable_as_umask_allows(path)


def _eos_as_pad(tok: Tokenizer | None) -> str | None:
    """The EOS token's text when a Hugging Face tokenizer has no pad token (GPT-2 style):
    the pad our tokenizer wrapper and the exported config use, which ``AutoTokenizer``
    would otherwise not know, so that ``tok(..., padding=True)`` fails."""
    inner = getattr(tok, "tokenizer", None)
    if inner is None or getattr(inner, "pad_token", None) is not None:
        return None
    return getattr(inner, "eos_token", None)


def set_tokenizer_defaults(hf_dir: str | Path, model_max_length: int,
                           padding_side: str = "left", pad_token: str | None = None) -> None:
    """Set ``padding_side`` and ``model_max_length`` (and ``pad_token`` when given) in
    ``hf_dir/tokenizer_config.json`` (what ``AutoTokenizer`` reads), keeping its other keys."""
    path = Path(hf_dir) / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(padding_side=padding_side, model_max_length=model_max_length)
    if pad_token is not None:
        data["pad_token"] = pad_token
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def training_to_safetensors(checkpoint: str | Path, out_dir: str | Path, *,
                            tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Write the model of a training checkpoint (or run directory) as a weights-only training
    checkpoint directory: ``model.safetensors`` and ``config.json`` as the trainer wrote them,
    ``train_config.toml`` (so the trained depth stays the default) and the tokenizer, without
    the optimizer and trainer state. :func:`~open_mythos.checkpoints.load_model` and every
    command read it.

    Returns:
        ``out_dir``.
    """
    fmt, ckpt_dir = detect_format(checkpoint)
    if fmt is not CheckpointFormat.TRAINING:
        raise ValueError(f"{str(checkpoint)!r} is a Hugging Face directory, not a training "
                         "checkpoint: it is already an export (open_mythos.integrations.convert."
                         "hf_to_training turns it back into a training checkpoint)")
    loaded = load_model(ckpt_dir)  # the weights are checked before anything is written
    source = _tokenizer_source(loaded, tokenizer)
    if source is not None:
        _check_tokenizer_fits(_tokenizer_or_none(source), loaded.cfg.vocab_size)

    def write(dest: Path) -> None:
        for name in (MODEL_FILE, MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE):
            if (ckpt_dir / name).is_file():
                shutil.copy2(ckpt_dir / name, dest / name)
        if not (ckpt_dir / MODEL_FILE).is_file():  # sharded weights (model.dcp/): gathered
            tied = tied_parameters(loaded.model)
            save_weights({k: v.contiguous() for k, v in loaded.model.state_dict().items()
                          if k not in tied},
                         dest / MODEL_FILE, metadata={"format": "pt", "tied": json.dumps(tied)})
        save_tokenizer(source, dest, hf_files=False)

    return _convert_into(out_dir, (checkpoint, ckpt_dir), write)


#: The hidden folder inside ``out_dir`` that a conversion writes to before its files move
#: into ``out_dir`` (:mod:`open_mythos.staging`: locked while written, a killed
#: conversion's removed by the next).
PARTIAL_PREFIX = ".openmythos-export.partial-"


def check_out_dir(out_dir: str | Path, *sources: str | Path) -> Path:
    """``out_dir`` (``~`` expanded) after checking that a conversion may write there: new
    or empty (a killed conversion's hidden folder aside, which is removed), and neither a
    source nor a directory above one (a run's top level: ``load_model`` of the run would
    then read the export, not its checkpoints). The conversions never write over files.

    Raises:
        ValueError: ``out_dir`` is a source, holds one, or is a file or a non-empty
            directory.
    """
    out_dir = Path(out_dir).expanduser()
    target = out_dir.resolve()
    for source in sources:
        path = Path(source).expanduser().resolve()
        if target == path or target in path.parents:
            what = "the source" if target == path else "a directory holding the source"
            raise ValueError(f"out_dir {str(out_dir)!r} is {what} {str(source)!r}: write "
                             "the conversion to a directory of its own")
    live = remove_killed(out_dir, PARTIAL_PREFIX) if out_dir.is_dir() else []
    if live:
        raise ValueError(f"out_dir {str(out_dir)!r} is being written by another conversion "
                         f"(its folder {live[0].name} is locked)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir {str(out_dir)!r} already exists and is not an empty "
                         "directory (a conversion does not write over files)")
    return out_dir


def _convert_into(out_dir: str | Path, sources: tuple[str | Path, ...],
                  write: Callable[[Path], None]) -> Path:
    """Run ``write`` into a hidden folder inside ``out_dir`` (:func:`check_out_dir`;
    created if needed), then move its files up: renames within one directory, so
    ``out_dir`` may be ``.``, a symlink or a mount point. On any error or interrupt
    ``out_dir`` is left as it was (removed if this call made it): no half-written
    conversion that loads as a model and fails as a tokenizer, or blocks a retry.

    Returns:
        ``out_dir``.
    """
    out_dir = check_out_dir(out_dir, *sources)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    try:
        with staging_folder(out_dir, PARTIAL_PREFIX) as partial:
            write(partial)
            _readable(partial)
            for child in sorted(partial.iterdir()):
                child.rename(out_dir / child.name)
                moved.append(out_dir / child.name)
    except BaseException:
        for path in moved:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def _check_tokenizer_fits(tok: Tokenizer | None, vocab_size: int) -> None:
    """ValueError when ``tok`` has ids the model has no embedding row for."""
    if tok is not None and tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                         f"{vocab_size} embedding rows")


def hf_to_training(hf_dir: str | Path, out_dir: str | Path, *,
                   tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Write a Hugging Face directory as a weights-only training checkpoint directory.

    ``out_dir`` receives ``model.safetensors`` (tied head stored once, with the ``tied``
    metadata the trainer writes, and the depth the model was trained at as ``n_loops``
    metadata, which :func:`~open_mythos.checkpoints.read_trained_depth` reads where no
    training configuration records one: the HF config's ``trained_depth``, else its
    default ``n_loops``) and ``config.json``; ``load_checkpoint(out_dir)``
    and the ``generate``/``serve`` commands read it. It has no optimizer or trainer state,
    so it starts a run rather than resuming one. The tokenizer files of ``hf_dir`` (or
    ``tokenizer``) are copied.

    Returns:
        ``out_dir``.
    """
    fmt, src = detect_format(hf_dir)
    if fmt is not CheckpointFormat.HF:
        raise ValueError(f"{str(hf_dir)!r} is not a Hugging Face OpenMythos directory")
    loaded = load_model(src)
    # The tokenizer is read and checked before anything is written.
    source = tokenizer if tokenizer is not None else find_tokenizer_dir(src)
    _check_tokenizer_fits(_tokenizer_or_none(source), loaded.cfg.vocab_size)
    tied = tied_parameters(loaded.model)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items() if k not in tied}
    metadata = {"format": "pt", "step": "0", "tied": json.dumps(tied)}
    # (An export's default n_loops may be another depth than it was trained at.)
    trained = read_training_depth(src)
    if trained is not None:
        metadata[DEPTH_METADATA] = str(trained)
        if not training_depth_recorded(src):
            warnings.warn(
                f"{src} records no trained_depth (exported before 2026-12-07): its default "
                f"n_loops ({trained}) is recorded as the depth it was trained at; if it was "
                "exported with another --n-loops, evaluation and later exports of the copy "
                "take the wrong depth", stacklevel=2)
    act_early_exit, exit_rule = read_inference_defaults(src)
    dropped = [f"{name}={value!r}" for name, value in (("exit_rule", exit_rule),
                                                        ("act_early_exit", act_early_exit))
               if value is not None]
    if dropped:  # a training checkpoint records no inference defaults
        warnings.warn(f"{src} configures {' and '.join(dropped)} for its forwards, which a "
                      "training checkpoint does not record: give them again where the copy "
                      "is used or exported (training_to_hf(..., exit_rule=...), the "
                      "commands' --exit-* options)", stacklevel=2)

    def write(dest: Path) -> None:
        save_weights(state, dest / MODEL_FILE, metadata=metadata)
        (dest / MODEL_CONFIG_FILE).write_text(
            json.dumps(config_dict(loaded.cfg), indent=2) + "\n", encoding="utf-8")
        save_tokenizer(source, dest, hf_files=False)

    return _convert_into(out_dir, (hf_dir, src), write)


def _tokenizer_or_none(source: str | Path | Tokenizer | None) -> Tokenizer | None:
    if source is None:
        return None
    if isinstance(source, Tokenizer):
        return source
    return load_tokenizer(str(source))


__all__ = [
    "HF_MODEL_TYPE", "TOKENIZER_FILES", "CheckpointFormat", "LoadedModel", "detect_format",
    "encode_as_trained", "find_tokenizer_dir", "hf_to_training", "is_task_checkpoint",
    "load_model", "read_config",
    "resolve_tokenizer", "save_tokenizer", "set_tokenizer_defaults", "stored_tokenizer",
    "trained_seq_len", "training_to_hf", "training_to_safetensors",
]
