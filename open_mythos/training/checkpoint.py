"""Checkpoints: atomic on disk, independent of the parallelism that wrote them.

Layout of a run directory::

    DIR/config.toml                    resolved training configuration
    DIR/metrics.jsonl                  one JSON object per step
    DIR/latest                         text: relative path of the newest checkpoint
    DIR/checkpoints/step_00000100/
        model.safetensors              full (unsharded) weights; tied weights stored once
        config.json                    cfg.to_dict() (any model kind of open_mythos.registry)
        train_config.toml              the run's resolved TrainConfig
        optimizer.pt                   full optimizer state keyed by parameter name
        trainer_state.pt               step, data position, bad-step counters, RNG states
        manifest.json                  size and SHA-256 of each file above

An FSDP2 run writes a *sharded* checkpoint instead (:mod:`.sharded`): ``model.dcp/`` and
``optimizer.dcp/`` (``torch.distributed.checkpoint`` directories, one file per rank) replace
``model.safetensors`` and ``optimizer.pt``; the other files, the manifest (which lists the
shard files too), the atomic rename and ``latest`` are the same.

Atomicity: a checkpoint is written into a hidden temporary directory, its manifest last,
flushed to disk, and renamed to its final name; then ``latest`` is replaced by
``os.replace``. A process killed at any moment leaves either the previous checkpoint as
``latest`` or the new one, complete; stale temporaries are removed by the next save. Only
finite weights are written (:class:`NonFiniteWeights` otherwise), so every checkpoint on
disk holds numbers; the manifest lets readers detect a file damaged afterwards.

Model and optimizer states are gathered to full tensors with
``torch.distributed.checkpoint.state_dict`` (works for plain, DDP and FSDP2 modules), so a
checkpoint loads at any world size; older FSDP2 runs wrote this layout too, and it still
resumes under FSDP2 (rank 0 reads it and broadcasts).

Reading the model back (:func:`load_checkpoint`, :func:`latest_checkpoint`,
:func:`resolve_checkpoint_dir`...) is :mod:`open_mythos.checkpoints`, the one loader of every
layout; those names are re-exported here. This module adds writing and the optimizer and
trainer state a resumed run needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoints import (  # the reading side, shared with every other loader
    CHECKPOINT_DIR,
    LATEST,
    MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    TRAIN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    CheckpointCorrupt,
    check_state_keys,
    file_sha256,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    newest_intact_checkpoint,
    read_model_config,
    read_model_state,
    resolve_checkpoint_dir,
    save_weights,
    tied_parameters,
    verify_checkpoint,
)
from ..config import MythosConfig
from ..registry import config_dict

OPTIMIZER_FILE = "optimizer.pt"
_TMP_PREFIX = ".tmp-"

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


class NonFiniteWeights(ValueError):
    """A checkpoint was asked to store NaN or infinite weights; the message names a tensor."""


@dataclass
class TrainingCheckpoint:
    """Everything :func:`save_checkpoint` writes (full, unsharded, on CPU).

    Attributes:
        step: optimizer steps completed.
        model_state: parameter and buffer tensors by name, tied duplicates removed.
        model_config: architecture of the weights.
        train_config_toml: resolved training configuration (text).
        optimizer_state: ``get_optimizer_state_dict`` output (keyed by parameter name).
        trainer_state: step, data position, counters, RNG states (plain Python and tensors).
    """

    step: int
    model_state: dict[str, torch.Tensor]
    model_config: MythosConfig
    train_config_toml: str
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]


def gather_model_state(model: nn.Module, tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """Full CPU state dict of a plain, DDP or FSDP2 model (collective: call on every rank;
    only rank 0 receives the tensors under FSDP2), without the tied aliases."""
    state = get_model_state_dict(model, options=_GATHER)
    return {k: v.contiguous() for k, v in state.items() if k not in tied}


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full CPU optimizer state keyed by parameter name (collective, like the model state)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def restore_model_state(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str],
                        from_rank0: bool = False) -> None:
    """Load full weights into a plain, DDP or FSDP2 model (collective).

    With ``from_rank0`` only rank 0 needs ``state`` (others pass ``{}``) and it is broadcast.
    Tied aliases may be missing from ``state``: the tie itself is part of the module and is
    preserved. Any other missing or unexpected key raises ``KeyError``.
    """
    if not from_rank0 or torch.distributed.get_rank() == 0:
        check_state_keys(_unwrapped(model), state, tied)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0, strict=False)
    set_model_state_dict(model, state, options=options)


def restore_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], from_rank0: bool = False) -> None:
    """Load a full optimizer state (collective; see :func:`restore_model_state`).

    A parameter without state in ``state`` (one the saved run never updated because it
    never had a gradient: ACT's halting head with ``use_act = false``) is left without
    state, as it was in the run that saved it."""
    stateless = [name for name in parameters_by_fqn(model) if name not in state.get("state", {})]
    if from_rank0:  # only rank 0 holds the state
        box = [stateless]
        torch.distributed.broadcast_object_list(box, src=0)
        stateless = box[0]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0,
                               strict=not stateless)
    set_optimizer_state_dict(model, optimizer, state, options=options)
    forget_optimizer_states(model, optimizer, stateless)


def parameters_by_fqn(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a plain, DDP or FSDP2 model (compiled parts included) under the
    names that the state dicts of ``torch.distributed.checkpoint`` use."""
    # NOTE: _get_fqns is DCP's own naming (no DDP "module.", no "_orig_mod."); there is no
    # public equivalent.
    return {fqn: p for name, p in model.named_parameters() for fqn in _get_fqns(model, name)}


def forget_optimizer_states(model: nn.Module, optimizer: torch.optim.Optimizer,
                            names: list[str]) -> None:
    """Drop the optimizer state of the parameters ``names`` (:func:`parameters_by_fqn`'s):
    loading a state dict gives every parameter a state (placeholders where it had none),
    which a parameter that never had a gradient must not have for the run to continue as
    it would have (its first update would otherwise count a step it never took)."""
    params = parameters_by_fqn(model)
    for name in names:
        optimizer.state.pop(params[name], None)


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# Writing ------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | Path, ckpt: TrainingCheckpoint, tied: dict[str, str],
                    keep: int = 0) -> Path:
    """Write ``ckpt`` atomically as ``run_dir/checkpoints/step_XXXXXXXX`` and point
    ``run_dir/latest`` at it; keep the ``keep`` newest checkpoints (0: all).

    Returns:
        The final checkpoint directory.

    Raises:
        NonFiniteWeights: a floating tensor of ``ckpt.model_state`` holds NaN or inf
            (nothing is written).
        OSError: a file could not be written (a full disk included, which the safetensors
            and torch writers report as their own errors); the staging directory is removed
            and ``latest`` still names the previous checkpoint.
    """
    bad = non_finite_tensors(ckpt.model_state)
    if bad:
        raise NonFiniteWeights(non_finite_message(ckpt.step, bad))
    tmp = staging_dir(run_dir, ckpt.step)
    metadata = {"format": "pt", "step": str(ckpt.step), "tied": json.dumps(tied)}
    with removed_on_error(tmp):
        with write_errors(tmp / MODEL_FILE):
            save_weights(ckpt.model_state, tmp / MODEL_FILE, metadata=metadata)
        with write_errors(tmp / OPTIMIZER_FILE):
            torch.save(ckpt.optimizer_state, tmp / OPTIMIZER_FILE)
        write_run_files(tmp, ckpt.step, ckpt.model_config, ckpt.train_config_toml,
                        ckpt.trainer_state)
        return publish(run_dir, tmp, ckpt.step, keep)


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Report the safetensors and torch writers' failures to write ``path`` (a full disk:
    ``SafetensorError`` "... (os error 28)", torch's ``RuntimeError`` from its zip writer) as
    the ``OSError`` they are, naming ``path``; other errors pass unchanged."""
    try:
        yield
    except SafetensorError as err:
        if "os error" not in str(err):
            raise
        code = _os_errno(str(err))
        raise OSError(code, os.strerror(code) if code != errno.EIO else str(err),
                      str(path)) from err
    except RuntimeError as err:
        text = str(err)
        if "inline_container" not in text and "file write failed" not in text:
            raise
        try:  # torch's message never says why; a full disk is the usual reason
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = ""
        raise OSError(errno.EIO, f"the write failed ({text.splitlines()[0]}{free})",
                      str(path)) from err


def _os_errno(text: str) -> int:
    """The errno in a Rust I/O error's text ("... (os error 28)"), else EIO."""
    tail = text.rsplit("os error", 1)[-1].strip(" )")
    return int(tail) if tail.isdigit() else errno.EIO


@contextlib.contextmanager
def removed_on_error(tmp: Path) -> Iterator[None]:
    """Remove the staging directory ``tmp`` when the block fails (a partial checkpoint must
    not hold the space a retry needs); the error propagates."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """A new hidden directory in ``run_dir/checkpoints`` to write the checkpoint of ``step``
    into (:func:`publish` renames it into place)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}step_{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_run_files(tmp: Path, step: int, model_config: MythosConfig, train_config_toml: str,
                    trainer_state: dict[str, Any]) -> None:
    """The files of every checkpoint layout besides the weights and optimizer state."""
    _write_text(tmp / MODEL_CONFIG_FILE, json.dumps(config_dict(model_config), indent=2) + "\n")
    _write_text(tmp / TRAIN_CONFIG_FILE, train_config_toml)
    with write_errors(tmp / TRAINER_STATE_FILE):
        torch.save({"step": step, **trainer_state}, tmp / TRAINER_STATE_FILE)


def publish(run_dir: str | Path, tmp: Path, step: int, keep: int,
            hashed: dict[str, dict[str, Any]] | None = None) -> Path:
    """Seal the staging directory ``tmp`` (every file flushed, then the manifest) and rename
    it to ``run_dir/checkpoints/step_XXXXXXXX``; point ``latest`` at it and prune.

    Args:
        hashed: manifest entries (``{"size", "sha256"}`` by path relative to ``tmp``) of
            files already flushed and hashed elsewhere (the shards other ranks wrote); every
            other file under ``tmp`` is flushed and hashed here.

    Returns:
        The final checkpoint directory.
    """
    files = dict(hashed or {})
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        name = f.relative_to(tmp).as_posix()
        if name not in files:
            _fsync(f)
            files[name] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    manifest = {"step": step, "files": dict(sorted(files.items()))}
    _write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp / MANIFEST_FILE)
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
        _fsync(d)
    _fsync(tmp)

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINT_DIR
    name = f"step_{step:08d}"
    final = root / name
    if final.exists():  # re-saving a step (a resumed run that replays it): swap atomically
        old = root / f"{_TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    point_latest(run_dir, final)
    _prune(root, keep, final)
    return final


def non_finite_message(step: int, bad: list[str]) -> str:
    """The :class:`NonFiniteWeights` message for the tensors ``bad`` at ``step``."""
    return (f"refusing to write a checkpoint of step {step}: {len(bad)} tensors hold NaN or "
            f"inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, t in state.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def point_latest(run_dir: str | Path, ckpt_dir: str | Path) -> None:
    """Make ``run_dir/latest`` name ``ckpt_dir`` (a checkpoint of that run), atomically."""
    _write_text_atomic(Path(run_dir) / LATEST, f"{CHECKPOINT_DIR}/{Path(ckpt_dir).name}\n")


def _prune(root: Path, keep: int, current: Path) -> None:
    """Remove staging leftovers, checkpoints of later steps than ``current`` (a resumed run
    that saves step ``s`` has replaced the history after ``s``: such a checkpoint, e.g. the
    one that held diverged weights, must not become the fallback of a damaged ``latest``),
    and all but the ``keep`` newest of the rest (0: keep them all)."""
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for later in (p for p in done if p.name > current.name):
        shutil.rmtree(later, ignore_errors=True)
    done = [p for p in done if p.name <= current.name]
    if keep <= 0:
        return
    for old in done[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


_ATOMIC_TMP = re.compile(r".+\.[0-9a-f]{8}\.tmp")


def remove_interrupted_writes(run_dir: str | Path) -> list[str]:
    """Remove what writes killed midway left in ``run_dir`` (call it holding the run's
    lock): the temporary files of :func:`write_text_atomic` (``latest``, ``config.toml``)
    and the checkpoints' staging directories. Returns their paths relative to ``run_dir``.

    A staging directory was never published, so no ``latest`` names it. A checkpoint that
    was being swapped for a re-save of its step (moved to ``.tmp-old-step_X-...``, the new
    copy not yet renamed into place) is moved back to ``step_X`` first: it is sealed and
    ``latest`` may name it.
    """
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / CHECKPOINT_DIR
    for old in sorted(root.glob(f"{_TMP_PREFIX}old-step_*")):
        final = root / old.name.removeprefix(f"{_TMP_PREFIX}old-").rsplit("-", 1)[0]
        if old.is_dir() and not final.exists():
            os.replace(old, final)
            removed.append(f"{CHECKPOINT_DIR}/{old.name} (moved back to {final.name})")
    for f in run_dir.glob("*.tmp"):
        if _ATOMIC_TMP.fullmatch(f.name) and f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f.name)
    for d in root.glob(f"{_TMP_PREFIX}step_*"):
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"{CHECKPOINT_DIR}/{d.name}")
    return sorted(removed)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, unencodable text: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, whole."""
    _write_text_atomic(Path(path), text)


def _fsync(path: Path) -> None:
    # Directories are fsynced too, so that the renames themselves survive a power loss.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Reading ------------------------------------------------------------------------------------


def read_training_checkpoint(ckpt_dir: str | Path, verify: bool = True) -> TrainingCheckpoint:
    """Everything a resumed run needs, from a gathered (not sharded) checkpoint directory.

    Args:
        ckpt_dir: the checkpoint directory.
        verify: check every file against the manifest first (skip it only for a checkpoint
            that :func:`latest_checkpoint` has just verified).

    Raises:
        CheckpointCorrupt: a file is damaged or unreadable (the message names it).
        ValueError: the checkpoint is sharded (:func:`.sharded.load_sharded_checkpoint`
            loads it into a model and optimizer).
    """
    ckpt_dir = Path(ckpt_dir)
    if is_sharded(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is a sharded checkpoint: load it with "
                         "open_mythos.training.sharded.load_sharded_checkpoint")
    if verify:
        verify_checkpoint(ckpt_dir)
    state, _ = read_model_state(ckpt_dir)
    trainer_state = read_trainer_state(ckpt_dir)
    path = ckpt_dir / OPTIMIZER_FILE
    try:
        optimizer_state = torch.load(path, weights_only=True)
        path = ckpt_dir / TRAIN_CONFIG_FILE
        train_config_toml = path.read_text(encoding="utf-8")
    except (RuntimeError, EOFError, UnicodeDecodeError, ValueError,
            pickle.UnpicklingError) as err:
        raise CheckpointCorrupt(f"{path} is unreadable: {err}") from None
    return TrainingCheckpoint(
        step=int(trainer_state["step"]),
        model_state=state,
        model_config=read_model_config(ckpt_dir),
        train_config_toml=train_config_toml,
        optimizer_state=optimizer_state,
        trainer_state=trainer_state,
    )


def read_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint: step, data position, counters, RNG states.

    Raises:
        CheckpointCorrupt: the file is unreadable.
    """
    path = Path(ckpt_dir) / TRAINER_STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointCorrupt(f"{path} is unreadable: {err}") from None


__all__ = [
    "CHECKPOINT_DIR", "LATEST", "MANIFEST_FILE", "MODEL_CONFIG_FILE", "MODEL_FILE",
    "OPTIMIZER_FILE", "TRAINER_STATE_FILE", "TRAIN_CONFIG_FILE", "CheckpointCorrupt",
    "NonFiniteWeights", "TrainingCheckpoint", "gather_model_state", "gather_optimizer_state",
    "is_sharded", "latest_checkpoint", "load_checkpoint", "newest_intact_checkpoint",
    "non_finite_message", "non_finite_tensors", "point_latest", "publish",
    "read_model_config", "read_model_state", "read_trainer_state", "read_training_checkpoint",
    "resolve_checkpoint_dir", "restore_model_state", "restore_optimizer_state",
    "save_checkpoint", "staging_dir", "tied_parameters", "verify_checkpoint",
    "write_run_files", "write_text_atomic",
]
