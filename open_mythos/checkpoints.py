"""Reading a model from disk: one loader for every layout and every model kind.

Two on-disk layouts hold a model (:class:`~open_mythos.OpenMythos` or the dense baseline):

* **training** (written by :mod:`open_mythos.training.checkpoint`): a checkpoint directory
  ``RUN/checkpoints/step_XXXXXXXX`` with ``model.safetensors`` (parameter names of the
  model, the tied head stored once, a ``tied`` metadata entry) and ``config.json``
  (``cfg.to_dict()``); or a run directory ``RUN``, meaning its latest checkpoint.
* **hf** (``OpenMythosForCausalLM.save_pretrained``, :mod:`open_mythos.integrations.hf`):
  ``config.json`` with ``"model_type": "openmythos"`` (every configuration field, plus
  ``n_loops`` and the ``transformers`` keys) and ``model.safetensors`` (or shards with an
  index) whose names carry the ``model.`` prefix.

:func:`load_model` reads both, for every kind of :mod:`open_mythos.registry`, without
``transformers``; :func:`load_checkpoint` is the same as a ``(model, cfg)`` pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import MythosConfig
from .model import CausalLM
from .registry import build_model, config_fields, config_from_dict, materialize

# Training layout (see open_mythos.training.checkpoint for the files a run adds).
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"

# Hugging Face layout.
HF_MODEL_TYPE = "openmythos"
HF_PREFIX = "model."
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"


class CheckpointFormat(str, Enum):
    TRAINING = "training"
    HF = "hf"


@dataclass
class LoadedModel:
    """A model read from disk.

    Attributes:
        model: the model (any registered kind), in eval mode, head tied to the embedding.
        cfg: its configuration (the kind's configuration class).
        path: the directory the weights came from (a run directory resolves to a checkpoint).
        format: the layout that was read.
        n_loops: default loop count stored with the weights (``n_loops`` of an HF config),
            or None (use ``cfg.max_loop_iters``).
    """

    model: CausalLM
    cfg: MythosConfig
    path: Path
    format: CheckpointFormat
    n_loops: int | None = None


# Locating -----------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None.

    Follows ``latest``; if it is missing or dangling, falls back to the highest
    ``checkpoints/step_*`` directory (which exist only complete, by construction).
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text(encoding="utf-8").strip()
        if (target / TRAINER_STATE_FILE).is_file():
            return target
    done = sorted(p for p in (run_dir / CHECKPOINT_DIR).glob("step_*") if p.is_dir())
    return done[-1] if done else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A training checkpoint directory from either itself or a run directory (its latest one).

    Raises:
        FileNotFoundError: no checkpoint there.
    """
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {str(path)!r} (expected {MODEL_FILE} or a run "
                                f"directory with {CHECKPOINT_DIR}/step_*)")
    return found


def detect_format(path: str | Path) -> tuple[CheckpointFormat, Path]:
    """``(format, directory holding the weights)`` of a checkpoint, HF or run directory.

    Raises:
        FileNotFoundError: nothing loadable there.
        ValueError: ``config.json`` is not JSON, or describes another model type.
    """
    path = Path(path).expanduser()
    config = path / MODEL_CONFIG_FILE
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{config} is not valid JSON: {err}") from None
        if data.get("model_type") == HF_MODEL_TYPE:
            return CheckpointFormat.HF, path
        if "model_type" in data:
            raise ValueError(f"{config} describes a {data['model_type']!r} model, not OpenMythos")
    return CheckpointFormat.TRAINING, resolve_checkpoint_dir(path)


# Configuration ------------------------------------------------------------------------------


def read_model_config(ckpt_dir: str | Path) -> MythosConfig:
    """The configuration (of its kind) stored in a training checkpoint directory."""
    text = (Path(ckpt_dir) / MODEL_CONFIG_FILE).read_text(encoding="utf-8")
    return config_from_dict(json.loads(text))


def read_config(path: str | Path) -> tuple[MythosConfig, int | None]:
    """``(configuration, default n_loops or None)`` of a checkpoint, run or HF directory,
    without reading the weights."""
    fmt, ckpt_dir = detect_format(path)
    if fmt is CheckpointFormat.TRAINING:
        return read_model_config(ckpt_dir), None
    data = json.loads((ckpt_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    fields = config_fields()
    return config_from_dict({k: v for k, v in data.items() if k in fields}), data.get("n_loops")


# Weights ------------------------------------------------------------------------------------


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{alias: owner}`` for parameters registered under several names (the LM head tied
    to the embedding: ``{"head.weight": "embed.weight"}``)."""
    owner: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner:
            aliases[name] = owner[id(p)]
        else:
            owner[id(p)] = name
    return aliases


def read_model_state(ckpt_dir: str | Path, device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, tied aliases)`` of a training checkpoint's ``model.safetensors``."""
    path = str(Path(ckpt_dir) / MODEL_FILE)
    with safe_open(path, framework="pt", device=str(device)) as fh:
        tied = json.loads((fh.metadata() or {}).get("tied", "{}"))
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    return state, tied


def read_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory (one file or shards), ``model.`` prefix removed.

    Raises:
        FileNotFoundError: no safetensors weights there.
        KeyError: a tensor name without the prefix.
    """
    hf_dir = Path(hf_dir)
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


def check_state_keys(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str],
                     source: str | Path = "the checkpoint") -> None:
    """Raise ``KeyError`` naming the missing and unexpected tensors unless ``state`` holds
    exactly the tensors of ``model``'s state dict (the tied aliases may be absent)."""
    expected = set(model.state_dict()) - set(tied)
    missing, unexpected = expected - set(state), set(state) - expected - set(tied)
    if missing or unexpected:
        raise KeyError(f"weights in {str(source)!r} do not match the model: missing "
                       f"{sorted(missing)}, unexpected {sorted(unexpected)}")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str],
               source: str | Path = "the checkpoint") -> None:
    """Copy ``state`` into ``model`` after :func:`check_state_keys`; a file that stores a
    tied alias as well must store the same tensor (the tie itself is kept).

    Raises:
        KeyError: missing or unexpected tensors.
        ValueError: a stored alias differs from its owner.
    """
    check_state_keys(model, state, tied, source)
    for alias, owner in tied.items():
        if alias in state and not torch.equal(state[alias], state[owner]):
            raise ValueError(f"{alias} differs from {owner} in {str(source)!r}, but they are tied")
    model.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False)


# The loader ---------------------------------------------------------------------------------


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """The model stored at ``path``, whatever its layout and kind.

    Args:
        path: a training checkpoint directory, a run directory (its latest checkpoint) or
            a Hugging Face directory.
        device: where to put the model.
        dtype: optional floating dtype to cast the weights to.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: ``config.json`` describes another model type.
        KeyError: the weights do not match the stored configuration.
    """
    fmt, ckpt_dir = detect_format(path)
    if fmt is CheckpointFormat.TRAINING:
        cfg, n_loops = read_model_config(ckpt_dir), None
        state, _ = read_model_state(ckpt_dir)
    else:
        cfg, n_loops = read_config(ckpt_dir)
        state = read_hf_state(ckpt_dir)
    # NOTE: materialised on ``device`` and initialised before loading, so that tensors a
    # checkpoint does not hold (non-persistent buffers such as the MoE load accumulator)
    # start from their defined initial values, as in a freshly built model. The random
    # draws of that initialisation must not move the caller's RNG (a seeded sampling run
    # would change with the loading code).
    device = torch.device(device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        model = materialize(build_model(cfg, device="meta"), device)
    load_state(model, state, tied_parameters(model), ckpt_dir)
    model.to(dtype=dtype)
    return LoadedModel(model.eval(), cfg, ckpt_dir, fmt, n_loops)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[CausalLM, MythosConfig]:
    """``(model, cfg)`` of :func:`load_model` (same arguments, same errors)."""
    loaded = load_model(path, device=device, dtype=dtype)
    return loaded.model, loaded.cfg


__all__ = [
    "CHECKPOINT_DIR", "HF_MODEL_TYPE", "LATEST", "MODEL_CONFIG_FILE", "MODEL_FILE",
    "CheckpointFormat", "LoadedModel", "check_state_keys", "detect_format", "latest_checkpoint",
    "load_checkpoint", "load_model", "load_state", "read_config", "read_hf_state",
    "read_model_config", "read_model_state", "resolve_checkpoint_dir", "tied_parameters",
]
