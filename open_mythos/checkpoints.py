"""Reading a model from disk: one loader for every layout and every model kind.

Two on-disk layouts hold a model (:class:`~open_mythos.OpenMythos` or the dense baseline):

* **training** (written by :mod:`open_mythos.training.checkpoint`): a checkpoint directory
  ``RUN/checkpoints/step_XXXXXXXX`` with ``model.safetensors`` (parameter names of the
  model, the tied head stored once, a ``tied`` metadata entry) and ``config.json``
  (``cfg.to_dict()``); or a run directory ``RUN``, meaning its latest checkpoint. A
  checkpoint of an FSDP2 run is *sharded*: ``model.safetensors`` is replaced by
  ``model.dcp/``, a ``torch.distributed.checkpoint`` directory (one file per rank that wrote
  it), which :func:`read_model_state` reads whole in one process, without a process group.
* **hf** (``OpenMythosForCausalLM.save_pretrained``, :mod:`open_mythos.integrations.hf`):
  ``config.json`` with ``"model_type": "openmythos"`` (every configuration field, plus
  ``n_loops`` and the ``transformers`` keys) and ``model.safetensors`` (or shards with an
  index) whose names carry the ``model.`` prefix.

The trained depth: a training checkpoint's ``train_config.toml`` holds the run's loop
schedule, and :attr:`LoadedModel.n_loops` is the depth it trained for
(:func:`read_trained_depth`); an HF directory stores it as ``n_loops``. Every command that runs
a checkpoint (generate, serve, info, sweep, report, lm-eval, export) defaults to it.

:func:`load_model` reads both, for every kind of :mod:`open_mythos.registry`, without
``transformers``; :func:`load_checkpoint` is the same as a ``(model, cfg)`` pair.

Verification: every training checkpoint holds ``manifest.json``, the size and SHA-256 of each
of its files, written last (before the checkpoint directory is renamed into place). Reading
checks the files it needs against it (:func:`verify_checkpoint`): a truncated or altered file
is :class:`CheckpointCorrupt`. A run directory resolves to its newest *intact* checkpoint:
``latest`` is followed only if it names a ``checkpoints/step_*`` directory of that run, and a
damaged checkpoint is passed over with a warning (logger ``open_mythos.checkpoints``) naming
the file, for the next older one. Checkpoints written before manifests existed are read
without the checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import KIND_KEY, MythosConfig, check_loops
from .layers.moe import BALANCE_BUFFERS
from .layers.recurrence import ExitRule, as_exit_rule
from .model import CausalLM
from .registry import build_model, config_fields, config_from_dict, kind_of, materialize

# Training layout (see open_mythos.training.checkpoint for the files a run adds).
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.toml"
MANIFEST_FILE = "manifest.json"
MODEL_FILES = (MODEL_FILE, MODEL_CONFIG_FILE)  # what loading the model alone reads
# A sharded checkpoint's weights: a torch.distributed.checkpoint directory (its ``.metadata``
# and one ``__RANK_N.distcp`` file per writing rank); MODEL_FILE in ``files`` arguments
# stands for it in such a checkpoint.
SHARDED_MODEL_DIR = "model.dcp"
_STEP_DIR = re.compile(r"step_\d+")

# Hugging Face layout.
HF_MODEL_TYPE = "openmythos"
HF_PREFIX = "model."
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"


log = logging.getLogger(__name__)


class CheckpointCorrupt(ValueError):
    """A checkpoint file is missing, truncated, altered or unreadable; the message names it."""


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
        n_loops: the depth to run by default: the depth a training checkpoint was trained
            at (:func:`read_trained_depth`), or ``n_loops`` of an HF config; None when
            neither records one, or for a fixed-depth kind (use ``model.default_n_loops``).
        exit_rule: the training-free exit rule an HF config sets for its forwards
            (:func:`read_inference_defaults`), or None; ``openmythos generate`` and
            ``serve`` apply it by default, as the Hugging Face model does.
    """

    model: CausalLM
    cfg: MythosConfig
    path: Path
    format: CheckpointFormat
    n_loops: int | None = None
    exit_rule: ExitRule | None = None


# Locating -----------------------------------------------------------------------------------


def _umask() -> int:
    """This process's umask, read without changing it where the OS says it (Linux), so no
    other thread creates a file under a cleared mask meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_weights(state: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with the file's permissions those of any file this
    process creates: safetensors writes its files 0600, so weights in a shared run
    directory or an export handed to someone were unreadable to everyone else."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    readable_as_umask_allows(path)


def readable_as_umask_allows(path: str | Path) -> None:
    """Give ``path`` the mode a newly created file gets (``0o666 & ~umask``)."""
    os.chmod(path, 0o666 & ~_umask())


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_sharded(ckpt_dir: str | Path) -> bool:
    """Whether a training checkpoint directory holds sharded weights (``model.dcp/``)."""
    return (Path(ckpt_dir) / SHARDED_MODEL_DIR).is_dir()


def verify_checkpoint(ckpt_dir: str | Path, files: Iterable[str] | None = None) -> None:
    """Check a training checkpoint's files against its manifest.

    Args:
        ckpt_dir: the checkpoint directory.
        files: the files to check (they must be listed and match); None: every listed file.
            A name may be a folder (every listed file under it); ``model.safetensors``
            stands for ``model.dcp/`` in a sharded checkpoint. A checkpoint without a
            manifest (older than manifests) only needs the files.

    Raises:
        CheckpointCorrupt: naming the first file that is missing, of the wrong size or
            checksum, or an unreadable manifest.
    """
    ckpt_dir = Path(ckpt_dir)
    weights = SHARDED_MODEL_DIR if is_sharded(ckpt_dir) else MODEL_FILE
    if files is not None:
        files = [weights if name == MODEL_FILE else name for name in files]
    manifest_path = ckpt_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        for name in files if files is not None else (TRAINER_STATE_FILE, MODEL_CONFIG_FILE,
                                                      weights):
            if not (ckpt_dir / name).exists():
                raise CheckpointCorrupt(f"{ckpt_dir / name} is missing")
        return
    try:
        listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not (isinstance(listed, dict) and all(
                isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) for entry in listed.values())):
            raise TypeError("'files' is not a mapping of names to their size and sha256")
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointCorrupt(f"{manifest_path} is unreadable: {err}") from None
    if files is not None:  # a folder stands for the listed files under it
        files = [n for name in files
                 for n in ([name] if name in listed else
                           [f for f in listed if f.startswith(f"{name}/")] or [name])]
    for name in listed if files is None else files:
        path = ckpt_dir / name
        if name not in listed:
            raise CheckpointCorrupt(f"{path} is not listed in {manifest_path}")
        if not path.is_file():
            raise CheckpointCorrupt(f"{path} is missing")
        size, want = path.stat().st_size, listed[name]
        if size != want["size"]:
            raise CheckpointCorrupt(f"{path} has {size} bytes, the manifest says {want['size']}")
        if file_sha256(path) != want["sha256"]:
            raise CheckpointCorrupt(f"{path} does not match its SHA-256 in the manifest "
                                    "(the file was altered or damaged)")


def _candidates(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run, ``latest``'s target first, then newest first;
    a ``latest`` that leads outside ``run_dir/checkpoints`` is ignored with a warning."""
    root = run_dir / CHECKPOINT_DIR
    found = sorted((p for p in root.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)
                    and p.resolve().parent == root.resolve()), reverse=True)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return found
    text = pointer.read_text(encoding="utf-8", errors="replace").strip()
    target = run_dir / text
    try:
        inside = target.resolve().parent == root.resolve()
    except (OSError, ValueError):  # not a path: a NUL byte (a zero-filled file), too long
        inside = False
    if not inside or not _STEP_DIR.fullmatch(target.name):
        log.warning("%s points to %r, not a checkpoint inside %s; ignoring it", pointer,
                    text, root)
        return found
    target = root / target.name
    return [target] + [p for p in found if p != target] if target.is_dir() else found


def newest_intact_checkpoint(run_dir: str | Path, files: Iterable[str] | None = None
                             ) -> tuple[Path | None, list[str]]:
    """``(checkpoint, problems)``: the first of ``latest``'s target and the
    ``checkpoints/step_*`` directories (newest first) whose ``files`` pass
    :func:`verify_checkpoint` (None if none does), and why each one before it failed."""
    files = None if files is None else tuple(files)
    problems: list[str] = []
    for ckpt in _candidates(Path(run_dir)):
        try:
            verify_checkpoint(ckpt, files)
        except CheckpointCorrupt as err:
            problems.append(str(err))
            continue
        return ckpt, problems
    return None, problems


def latest_checkpoint(run_dir: str | Path, files: Iterable[str] | None = None) -> Path | None:
    """The newest intact checkpoint of a run directory, or None.

    Follows ``latest`` if it names a checkpoint of this run; a damaged checkpoint (see
    :func:`verify_checkpoint`; ``files`` as there) is passed over with a warning that names
    the file, for the next older one.
    """
    return _newest_with_warnings(Path(run_dir), files)[0]


def _newest_with_warnings(run_dir: Path, files: Iterable[str] | None
                          ) -> tuple[Path | None, list[str]]:
    found, problems = newest_intact_checkpoint(run_dir, files)
    for problem in problems:
        log.warning("damaged checkpoint: %s; %s", problem,
                    f"falling back to {found}" if found else "no intact checkpoint left")
    return found, problems


def resolve_checkpoint_dir(path: str | Path, files: Iterable[str] = MODEL_FILES) -> Path:
    """A training checkpoint directory from either itself or a run directory (its newest
    intact one), with ``files`` verified.

    Raises:
        FileNotFoundError: no checkpoint there, or none intact (the message says why).
        CheckpointCorrupt: ``path`` is a checkpoint directory and one of ``files`` is damaged.
    """
    path = Path(path)
    if (path / MODEL_FILE).is_file() or is_sharded(path):
        verify_checkpoint(path, files)
        return path
    found, problems = _newest_with_warnings(path, files)
    if found is None:
        raise FileNotFoundError(_no_checkpoint(path, problems))
    return found


def _no_checkpoint(path: Path, problems: list[str]) -> str:
    """Why ``path`` gives no checkpoint, in the terms of the mistake that is likely."""
    where = repr(str(path))
    if problems:
        return f"no checkpoint in {where}: every checkpoint is damaged ({'; '.join(problems)})"
    if not path.exists():
        return f"no checkpoint at {where}: the path does not exist"
    if path.is_file():
        return (f"no checkpoint at {where}: it is a file; give the directory that holds it"
                if path.name.endswith(".safetensors") else
                f"no checkpoint at {where}: it is a file, not a checkpoint or run directory")
    if path.name == CHECKPOINT_DIR and any(path.glob("step_*")):
        return (f"no checkpoint at {where}: it is a run's {CHECKPOINT_DIR}/ folder; give the "
                f"run directory ({str(path.parent)!r}) or one checkpoint in it")
    if (path / "config.toml").is_file() or (path / "metrics.jsonl").is_file():  # a run
        return (f"no checkpoint in the run {where} yet: the first is written at "
                "run.save_every steps, or at the end")
    return (f"no checkpoint in {where} (expected {MODEL_FILE}, {SHARDED_MODEL_DIR}/ or a run "
            f"directory with {CHECKPOINT_DIR}/step_*)")


def detect_format(path: str | Path, files: Iterable[str] = MODEL_FILES
                  ) -> tuple[CheckpointFormat, Path]:
    """``(format, directory holding the weights)`` of a checkpoint, HF or run directory;
    a training checkpoint's ``files`` are verified (:func:`resolve_checkpoint_dir`).

    Raises:
        FileNotFoundError: nothing loadable there.
        ValueError: ``config.json`` describes another model type; :class:`CheckpointCorrupt`
            (a ``ValueError``): a damaged checkpoint directory, or a ``config.json`` that is
            no JSON object.
    """
    path = Path(path).expanduser()
    config = path / MODEL_CONFIG_FILE
    if config.is_file():
        try:
            data = read_json_object(config)
        except CheckpointCorrupt:
            if (path / MANIFEST_FILE).is_file():  # a training checkpoint: name the damage
                verify_checkpoint(path, (MODEL_CONFIG_FILE,))
            raise
        if data.get("model_type") == HF_MODEL_TYPE:
            return CheckpointFormat.HF, path
        if "model_type" in data:
            raise ValueError(f"{config} describes a {data['model_type']!r} model, not OpenMythos")
    return CheckpointFormat.TRAINING, resolve_checkpoint_dir(path, files)


# Configuration ------------------------------------------------------------------------------


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object (a dict) in the file ``path``.

    Raises:
        CheckpointCorrupt: naming the file, when it is not UTF-8, not JSON, or JSON of
            another kind (``null``, a list, a string).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointCorrupt(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(data), "a number")
        raise CheckpointCorrupt(f"{path} holds {kind}, not a JSON object "
                                "(the file was altered or damaged)")
    return data


def read_model_config(ckpt_dir: str | Path) -> MythosConfig:
    """The configuration (of its kind) stored in a training checkpoint directory.

    Raises:
        CheckpointCorrupt: ``config.json`` is not JSON or not a configuration.
    """
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    data = read_json_object(path)
    try:
        return config_from_dict(data)
    except TypeError as err:
        raise CheckpointCorrupt(f"{path} is unreadable: {err}") from None
    except ValueError as err:  # a field's value: say which file holds it
        raise ValueError(f"{path}: {err}") from None


#: ``model.safetensors`` metadata key of the default depth, for checkpoints written without
#: a training configuration (:func:`open_mythos.integrations.convert.hf_to_training`).
DEPTH_METADATA = "n_loops"


def read_trained_depth(ckpt_dir: str | Path, cfg: MythosConfig | None = None) -> int | None:
    """The loop count a training checkpoint was trained for
    (:attr:`~open_mythos.training.config.ScheduleConfig.trained_depth` of the ``[schedule]``
    in its ``train_config.toml``; without that file, the ``n_loops`` metadata of its
    ``model.safetensors``); None when neither records one, or when ``cfg`` is of a
    fixed-depth kind."""
    if cfg is not None and not kind_of(cfg).looped:
        return None
    path = Path(ckpt_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return _depth_metadata(Path(ckpt_dir) / MODEL_FILE)
    # NOTE: imported here: reading a checkpoint must not need the training package unless
    # the checkpoint was written by it (the config module itself imports nothing heavy).
    from .training.config import ConfigError, TrainConfig, tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        if "schedule" not in raw:  # not written by the trainer, which writes every section
            return None
        return TrainConfig.from_dict({"schedule": raw["schedule"]}).schedule.trained_depth
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ConfigError) as err:
        raise CheckpointCorrupt(f"{path} is unreadable: {err}") from None


def _depth_metadata(weights: Path) -> int | None:
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as fh:
            value = (fh.metadata() or {}).get(DEPTH_METADATA)
    except (SafetensorError, OSError) as err:
        raise CheckpointCorrupt(f"{weights} is unreadable: {err}") from None
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise CheckpointCorrupt(f"{weights}: metadata {DEPTH_METADATA}={value!r} is not a "
                                "positive loop count")
    return int(value)


def read_config(path: str | Path) -> tuple[MythosConfig, int | None]:
    """``(configuration, default n_loops or None)`` of a checkpoint, run or HF directory,
    without reading the weights (the default depth as :attr:`LoadedModel.n_loops`)."""
    fmt, ckpt_dir = detect_format(path, files=(MODEL_CONFIG_FILE,))
    if fmt is CheckpointFormat.TRAINING:
        cfg = read_model_config(ckpt_dir)
        return cfg, read_trained_depth(ckpt_dir, cfg)
    data = read_json_object(ckpt_dir / MODEL_CONFIG_FILE)
    fields = {*config_fields(), KIND_KEY}
    try:
        cfg = config_from_dict({k: v for k, v in data.items() if k in fields})
        n_loops = check_loops(data.get("n_loops"), allow_none=True)
    except ValueError as err:
        raise ValueError(f"{ckpt_dir / MODEL_CONFIG_FILE}: {err}") from None
    return cfg, n_loops


def read_inference_defaults(path: str | Path) -> tuple[bool | None, dict[str, Any] | None]:
    """``(act_early_exit, exit_rule)``: the defaults a Hugging Face directory's config sets
    for its forwards (``OpenMythosHFConfig``; the exit rule as the dict of its fields), None
    where it sets none; a training checkpoint sets neither."""
    fmt, ckpt_dir = detect_format(path, files=(MODEL_CONFIG_FILE,))
    if fmt is CheckpointFormat.TRAINING:
        return None, None
    data = read_json_object(ckpt_dir / MODEL_CONFIG_FILE)
    return data.get("act_early_exit"), data.get("exit_rule")


def _configured_exit_rule(ckpt_dir: Path) -> ExitRule | None:
    """The exit rule of :func:`read_inference_defaults`, validated: a bad one is a
    ``ValueError`` that names the file (the Hugging Face model refuses it at load too)."""
    try:
        return as_exit_rule(read_inference_defaults(ckpt_dir)[1])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{ckpt_dir / MODEL_CONFIG_FILE}: {err}") from None


def training_depth_recorded(path: str | Path) -> bool:
    """Whether the model at ``path`` records the depth it was trained at: a training
    checkpoint does; a Hugging Face directory when it has ``trained_depth`` (exports since
    2026-12-07), not when :func:`read_training_depth` falls back to its default ``n_loops``."""
    fmt, ckpt_dir = detect_format(path, files=(MODEL_CONFIG_FILE,))
    if fmt is CheckpointFormat.TRAINING:
        return True
    data = read_json_object(ckpt_dir / MODEL_CONFIG_FILE)
    return data.get("trained_depth") is not None


def read_training_depth(path: str | Path) -> int | None:
    """The loop count the model at ``path`` (a checkpoint, run or HF directory) was trained
    at: a training checkpoint's :func:`read_trained_depth`; an HF directory's
    ``trained_depth`` (written by ``openmythos export`` since 2026-12-07), else its default
    ``n_loops`` (which an export's ``--n-loops`` may have moved off the trained depth)."""
    fmt, ckpt_dir = detect_format(path, files=(MODEL_CONFIG_FILE,))
    cfg, n_loops = read_config(ckpt_dir)
    if fmt is CheckpointFormat.TRAINING or not kind_of(cfg).looped:
        return n_loops
    data = read_json_object(ckpt_dir / MODEL_CONFIG_FILE)
    try:
        trained = check_loops(data.get("trained_depth"), name="trained_depth", allow_none=True)
    except ValueError as err:
        raise ValueError(f"{ckpt_dir / MODEL_CONFIG_FILE}: {err}") from None
    return n_loops if trained is None else trained


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
    """``(tensors, tied aliases)`` of a training checkpoint's ``model.safetensors``, or of
    its ``model.dcp/`` (:func:`read_sharded_model_state`).

    Raises:
        CheckpointCorrupt: the file is not a readable safetensors file, or a shard is
            unreadable.
    """
    if is_sharded(ckpt_dir):
        state = read_sharded_model_state(Path(ckpt_dir) / SHARDED_MODEL_DIR)
        model = build_model(read_model_config(ckpt_dir), device="meta")
        return {k: v.to(device) for k, v in state.items()}, tied_parameters(model)
    path = str(Path(ckpt_dir) / MODEL_FILE)
    try:
        with safe_open(path, framework="pt", device=str(device)) as fh:
            tied = json.loads((fh.metadata() or {}).get("tied", "{}"))
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, json.JSONDecodeError) as err:
        raise CheckpointCorrupt(f"{path} is unreadable: {err}") from None
    return state, tied


def read_sharded_model_state(dcp_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``torch.distributed.checkpoint`` directory, whole, on the CPU.

    Read in this process alone (no process group, whatever the number of ranks that wrote
    it): the tensors are allocated from the directory's metadata and DCP copies each saved
    shard into its slice.

    Raises:
        CheckpointCorrupt: the metadata or a shard file is unreadable.
    """
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(dcp_dir))
        entries = reader.read_metadata().state_dict_metadata
        state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
                 if isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (dcp.CheckpointException, OSError, RuntimeError, EOFError, ValueError,
            pickle.UnpicklingError) as err:
        raise CheckpointCorrupt(f"{dcp_dir} is unreadable: {_first_line(err)}") from None
    return state


def _first_line(err: BaseException) -> str:
    # A CheckpointException's text is a traceback per rank: keep the exception's own line.
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def read_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory (one file or shards), ``model.`` prefix removed.

    Raises:
        FileNotFoundError: no safetensors weights there.
        KeyError: a tensor name without the prefix.
        CheckpointCorrupt: a weights file or the shard index is truncated or unreadable.
    """
    return _read_hf_tensors(Path(hf_dir), lambda fh, key: fh.get_tensor(key))


def read_hf_shapes(hf_dir: str | Path) -> dict[str, torch.Size]:
    """The shapes of :func:`read_hf_state`'s tensors, from the files' headers alone (no
    tensor is read); raises as it does. ``safetensors`` refuses a file its header does not
    cover, so a truncated file is found here too."""
    return _read_hf_tensors(Path(hf_dir), lambda fh, key: torch.Size(fh.get_slice(key).get_shape()))


def _read_hf_tensors(hf_dir: Path, read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """``read(file, name)`` of every tensor of a Hugging Face directory, by name without
    the ``model.`` prefix (:func:`read_hf_state`)."""
    index = hf_dir / HF_WEIGHTS_INDEX
    # One file first, as transformers reads them: a save over an earlier sharded one
    # deletes the old shards but can leave their index behind.
    if (hf_dir / HF_WEIGHTS).is_file():
        shards = [HF_WEIGHTS]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            bad = next((s for s in shards if not isinstance(s, str) or not s
                        or Path(s).name != s), None)
            if bad is not None:  # a shard is a file name beside the index
                raise ValueError(f"shard {bad!r} is not a file name")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointCorrupt(f"{index} is not a shard index ({err!r})") from None
    else:
        raise FileNotFoundError(f"no {HF_WEIGHTS} (or {HF_WEIGHTS_INDEX}) in {str(hf_dir)!r}; "
                                "only safetensors weights are supported")
    out: dict[str, Any] = {}
    for shard in shards:
        try:
            with safe_open(str(hf_dir / shard), framework="pt") as fh:
                for key in fh.keys():
                    if not key.startswith(HF_PREFIX):
                        raise KeyError(f"unexpected tensor {key!r} in {hf_dir / shard}")
                    out[key[len(HF_PREFIX):]] = read(fh, key)
        except (SafetensorError, OSError) as err:  # truncated (an interrupted copy), damaged
            raise CheckpointCorrupt(f"{hf_dir / shard} is unreadable: {err}") from None
    return out


def read_weights(fmt: CheckpointFormat, ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a directory :func:`detect_format` found, of either layout."""
    if fmt is CheckpointFormat.TRAINING:
        return read_model_state(ckpt_dir)[0]
    return read_hf_state(ckpt_dir)


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
        ValueError: a tensor's shape differs from the model's, or a stored alias differs
            from its owner.
    """
    check_state_keys(model, state, tied, source)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"weights in {str(source)!r} do not match the model's configuration: "
                         f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
    for alias, owner in tied.items():
        if alias in state and not torch.equal(state[alias], state[owner]):
            raise ValueError(f"{alias} differs from {owner} in {str(source)!r}, but they are tied")
    model.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False)


# The loader ---------------------------------------------------------------------------------


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None) -> LoadedModel:
    """The model stored at ``path``, whatever its layout and kind.

    Args:
        path: a training checkpoint directory, a run directory (its latest checkpoint) or
            a Hugging Face directory.
        device: where to put the model.
        dtype: floating dtype to cast the weights to: a ``torch.dtype`` or its name
            (``"bfloat16"``, ``"float16"``, ``"float32"``...). Default: the dtype the
            weights are stored in (a bfloat16 export loads as bfloat16, as
            ``transformers`` 5 loads it), float32 where they mix dtypes.

    Raises:
        FileNotFoundError: no (intact) checkpoint at ``path``.
        ValueError: ``config.json`` describes another model type;
            :class:`CheckpointCorrupt`: the checkpoint named by ``path`` is damaged.
        KeyError: the weights do not match the stored configuration (missing or unexpected
            tensors; ValueError for a tensor of another shape).
    """
    dtype = floating_dtype(dtype)
    fmt, ckpt_dir, cfg, n_loops, state = _read_newest(path)
    # NOTE: materialised on ``device`` and initialised before loading, so that tensors a
    # checkpoint does not hold (non-persistent buffers such as the MoE load accumulator)
    # start from their defined initial values, as in a freshly built model. The random
    # draws of that initialisation must not move the caller's RNG (a seeded sampling run
    # would change with the loading code).
    device = torch.device(device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        model = materialize(build_model(cfg, device="meta"), device)
    # In the stored dtype before loading: copied into float32 parameters, float64 weights
    # would be rounded (bfloat16 and float16 ones pass through float32 exactly).
    model.to(dtype=stored_dtype(state))
    load_state(model, state, tied_parameters(model), ckpt_dir)
    model.to(dtype=dtype)
    exit_rule = _configured_exit_rule(ckpt_dir) if kind_of(cfg).looped else None
    return LoadedModel(model.eval(), cfg, ckpt_dir, fmt, n_loops, exit_rule)


def _read_newest(path: str | Path, attempts: int = 3
                 ) -> tuple[CheckpointFormat, Path, MythosConfig, int | None, dict[str, torch.Tensor]]:
    """``(format, directory, config, trained loops, weights)`` of :func:`load_model`.

    A run directory whose run is still training: the checkpoint found may be pruned before
    it is read (``run.keep_checkpoints``); the newest one is then found and read again.
    """
    for attempt in range(attempts):
        fmt, ckpt_dir = detect_format(path)
        try:
            cfg, n_loops = read_config(ckpt_dir)
            return fmt, ckpt_dir, cfg, n_loops, read_weights(fmt, ckpt_dir)
        except (OSError, RuntimeError, CheckpointCorrupt):
            if attempt + 1 == attempts or detect_format(path)[1] == ckpt_dir:
                raise  # not a newer checkpoint since: the error is this one's


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype every floating tensor of ``state`` has; None when they differ
    (or there are none). The MoE layers' balancing state, float32 in a model of any narrower dtype
    (:data:`~open_mythos.layers.moe.BALANCE_BUFFERS`), is left out."""
    dtypes = {t.dtype for key, t in state.items()
              if t.is_floating_point() and key.rpartition(".")[2] not in BALANCE_BUFFERS}
    return dtypes.pop() if len(dtypes) == 1 else None


def floating_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype``, or the floating ``torch.dtype`` its name (``"bfloat16"``) names."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or its name (such as "
                         f"'bfloat16'), got {dtype!r}")
    return dtype


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[CausalLM, MythosConfig]:
    """``(model, cfg)`` of :func:`load_model` (same arguments, same errors)."""
    loaded = load_model(path, device=device, dtype=dtype)
    return loaded.model, loaded.cfg


__all__ = [
    "CHECKPOINT_DIR", "DEPTH_METADATA", "HF_MODEL_TYPE", "LATEST", "MANIFEST_FILE", "MODEL_CONFIG_FILE",
    "MODEL_FILE", "MODEL_FILES", "TRAIN_CONFIG_FILE", "CheckpointCorrupt", "CheckpointFormat", "LoadedModel",
    "SHARDED_MODEL_DIR", "check_state_keys", "detect_format", "file_sha256", "is_sharded",
    "floating_dtype", "latest_checkpoint", "load_checkpoint", "load_model", "load_state",
    "newest_intact_checkpoint", "read_config", "read_hf_state", "read_model_config",
    "read_model_state", "read_sharded_model_state", "read_trained_depth",
    "read_training_depth",
    "resolve_checkpoint_dir", "stored_dtype", "tied_parameters", "verify_checkpoint",
]
