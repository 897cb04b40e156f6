"""Checkpoint formats: load either, convert both ways.

Two on-disk layouts hold an OpenMythos model:

* **training** (:mod:`open_mythos.training.checkpoint`): a checkpoint directory with
  ``model.safetensors`` (parameter names of :class:`~open_mythos.model.OpenMythos`, the
  tied head stored once) and ``config.json`` (``MythosConfig.to_dict()``), plus optimizer
  and trainer state; or a run directory, meaning its latest checkpoint.
* **hf** (``OpenMythosForCausalLM.save_pretrained``): ``config.json`` with
  ``"model_type": "openmythos"`` and ``model.safetensors`` (or shards with an index) whose
  names carry the ``model.`` prefix.

:func:`load_model` reads both without ``transformers``. :func:`training_to_hf` writes the
Hugging Face layout (needs ``transformers``); :func:`hf_to_training` writes a weights-only
training checkpoint directory (``model.safetensors`` + ``config.json``), which
:func:`open_mythos.training.checkpoint.load_checkpoint` reads. Tokenizer files are copied
when found (see :func:`find_tokenizer_dir`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import MythosConfig
from ..model import OpenMythos
from ..tokenizers import BYTE_TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer
from ..training import checkpoint as tckpt

HF_MODEL_TYPE = "openmythos"
HF_PREFIX = "model."
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"

# Files that make up a tokenizer (ours or a Hugging Face one); copied as a group.
TOKENIZER_FILES = (
    BYTE_TOKENIZER_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja",
)


class CheckpointFormat(str, Enum):
    TRAINING = "training"
    HF = "hf"


@dataclass
class LoadedModel:
    """A model read from disk.

    Attributes:
        model: the model, in eval mode.
        cfg: its configuration.
        path: the directory the weights came from (a run directory resolves to a checkpoint).
        format: the layout that was read.
        n_loops: default loop count stored with the weights (``n_loops`` of an HF config),
            or None (use ``cfg.max_loop_iters``).
    """

    model: OpenMythos
    cfg: MythosConfig
    path: Path
    format: CheckpointFormat
    n_loops: int | None = None


def detect_format(path: str | Path) -> tuple[CheckpointFormat, Path]:
    """``(format, directory holding the weights)`` of a checkpoint, HF or run directory.

    Raises:
        FileNotFoundError: nothing loadable there.
    """
    path = Path(path).expanduser()
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{config} is not valid JSON: {err}") from None
        if data.get("model_type") == HF_MODEL_TYPE:
            return CheckpointFormat.HF, path
        if "model_type" in data:
            raise ValueError(f"{config} describes a {data['model_type']!r} model, not OpenMythos")
    return CheckpointFormat.TRAINING, tckpt.resolve_checkpoint_dir(path)


def read_config(path: str | Path) -> tuple[MythosConfig, int | None]:
    """``(MythosConfig, default n_loops or None)`` of a checkpoint, without the weights."""
    fmt, ckpt_dir = detect_format(path)
    if fmt is CheckpointFormat.TRAINING:
        return tckpt.read_model_config(ckpt_dir), None
    data = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    fields = MythosConfig.__dataclass_fields__
    return MythosConfig.from_dict({k: v for k, v in data.items() if k in fields}), data.get("n_loops")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a training checkpoint (or run directory) or a Hugging Face directory.

    Does not need ``transformers``.
    """
    fmt, ckpt_dir = detect_format(path)
    if fmt is CheckpointFormat.TRAINING:
        model, cfg = tckpt.load_checkpoint(ckpt_dir, device=device, dtype=dtype)
        return LoadedModel(model, cfg, ckpt_dir, fmt)
    cfg, n_loops = read_config(ckpt_dir)
    state = _read_hf_state(ckpt_dir)
    with torch.device("meta"):
        model = OpenMythos(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty leaves the head and the embedding as separate tensors
    _load_state(model, state, tckpt.tied_parameters(model), ckpt_dir)
    model.to(device=device, dtype=dtype)
    return LoadedModel(model.eval(), cfg, ckpt_dir, fmt, n_loops)


def _read_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / HF_WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (hf_dir / HF_WEIGHTS).is_file():
        shards = [HF_WEIGHTS]
    else:
        raise FileNotFoundError(f"no {HF_WEIGHTS} (or {HF_WEIGHTS_INDEX}) in {str(hf_dir)!r}; "
                                "only safetensors weights are supported")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(hf_dir / shard), framework="pt") as fh:
            for key in fh.keys():
                if not key.startswith(HF_PREFIX):
                    raise KeyError(f"unexpected tensor {key!r} in {hf_dir / shard}")
                state[key[len(HF_PREFIX):]] = fh.get_tensor(key)
    return state


def _load_state(model: OpenMythos, state: dict[str, torch.Tensor], tied: dict[str, str],
                source: Path) -> None:
    expected = set(model.state_dict())
    missing = expected - set(state) - set(tied)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise KeyError(f"weights in {str(source)!r} do not match the config: missing "
                       f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    for alias, owner in tied.items():  # a file that stored both copies: they must agree
        if alias in state and not torch.equal(state[alias], state[owner]):
            raise ValueError(f"{alias} differs from {owner} in {str(source)!r}, but they are tied")
    model.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False)
    # Buffers that are not saved (MoE load accumulators) start at zero.
    saved = set(model.state_dict())
    for name, buf in model.named_buffers():
        if name not in saved:
            buf.zero_()


# Tokenizers ----------------------------------------------------------------------------------


def find_tokenizer_dir(ckpt_dir: str | Path) -> Path | None:
    """Where the tokenizer of a checkpoint lives: the checkpoint directory itself, else its
    run directory (``RUN/checkpoints/step_N`` -> ``RUN``), else the local directory named
    by ``[data] tokenizer`` in its ``train_config.toml``. None if there is none of these."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir]
    if ckpt_dir.parent.name == tckpt.CHECKPOINT_DIR:
        candidates.append(ckpt_dir.parent.parent)
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
    toml_path = ckpt_dir / tckpt.TRAIN_CONFIG_FILE
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
    tied = tckpt.tied_parameters(loaded.model)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items() if k not in tied}
    save_file(state, str(out_dir / tckpt.MODEL_FILE),
              metadata={"format": "pt", "step": "0", "tied": json.dumps(tied)})
    (out_dir / tckpt.MODEL_CONFIG_FILE).write_text(
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
