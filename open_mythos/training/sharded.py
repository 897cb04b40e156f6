"""Sharded checkpoints of FSDP2 runs: every rank writes its own shard of the weights and of
the optimizer state with ``torch.distributed.checkpoint`` (DCP); nothing is gathered to one
rank.

Layout (the files beside the two DCP directories are those of every checkpoint, see
:mod:`.checkpoint`)::

    step_XXXXXXXX/
        model.dcp/.metadata        every tensor's global shape and the chunk each rank saved
        model.dcp/__R_0.distcp     rank R's shards of the weights (tied aliases left out)
        optimizer.dcp/.metadata    the same for the AdamW state, flattened by parameter name
        optimizer.dcp/__R_0.distcp
        config.json  train_config.toml  trainer_state.pt (RNG states of every rank)
        manifest.json              size and SHA-256 of every file above, the shards included

Resharding: a reader asks DCP for the chunks its own sharding needs, so a checkpoint written
by N ranks resumes on M (:func:`load_sharded_checkpoint`: FSDP2 at any world size, DDP, or
one process without a process group), and
:func:`open_mythos.checkpoints.read_sharded_model_state` reads the weights whole in one
process (what ``load_model``, and so generate, serve, export and info, use).

Writing is atomic as for a gathered checkpoint: every rank writes into the staging directory
rank 0 created, hashes the shard files it wrote, and rank 0 adds the other files, writes the
manifest and renames the directory into place. Errors are raised on every rank. Like DCP
itself, this needs a filesystem that every rank sees.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from ..checkpoints import SHARDED_MODEL_DIR, file_sha256
from ..config import MythosConfig
from .checkpoint import (
    NonFiniteWeights,
    forget_optimizer_states,
    non_finite_message,
    publish,
    removed_on_error,
    staging_dir,
    write_run_files,
)

SHARDED_OPTIMIZER_DIR = "optimizer.dcp"

# Optimizer state keyed by parameter name ("state.embed.weight.exp_avg"), not by position.
_SHARDED = StateDictOptions()
# Loading leaves out the tied aliases (the tie is part of the module); keys are checked first.
_LOAD = StateDictOptions(strict=False)

T = TypeVar("T")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, tied: dict[str, str]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model state, optimizer state)`` of this rank: DTensor shards under FSDP2, whole
    tensors otherwise; tied aliases left out. An optimizer that has not stepped yet gets
    zero states first (a step with lr 0), so the dictionaries can be loaded into."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_SHARDED)
    return {k: v for k, v in model_state.items() if k not in tied}, optim_state


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, tied: dict[str, str],
                            model_config: MythosConfig, train_config_toml: str,
                            trainer_state: dict[str, Any] | None, keep: int = 0) -> Path:
    """Write the sharded checkpoint of ``step`` as ``run_dir/checkpoints/step_XXXXXXXX`` and
    point ``run_dir/latest`` at it; keep the ``keep`` newest checkpoints (0: all).

    Collective: every rank of the default process group calls it; ``trainer_state`` is only
    needed on rank 0.

    Returns:
        The final checkpoint directory (on every rank).

    Raises:
        NonFiniteWeights: a shard of a floating weight holds NaN or inf, on any rank
            (nothing is written).
        OSError: a rank could not write (the first failure, raised on every rank).
    """
    model_state, optim_state = sharded_state(model, optimizer, tied)
    bad = sorted({name for names in _all_gather(_non_finite(model_state)) for name in names})
    if bad:
        raise NonFiniteWeights(non_finite_message(step, bad))
    tmp = _on_rank0(lambda: staging_dir(run_dir, step))
    # Every failure below is raised on every rank after the collective that met it, so rank
    # 0 may then remove the partial checkpoint (it must not hold the space a retry needs).
    with removed_on_error(tmp) if dist.get_rank() == 0 else contextlib.nullcontext():
        return _write_sharded(run_dir, tmp, step, model_state, optim_state, model_config,
                              train_config_toml, trainer_state, keep)


def _write_sharded(run_dir: str | Path, tmp: Path, step: int, model_state: dict[str, Any],
                   optim_state: dict[str, Any], model_config: MythosConfig,
                   train_config_toml: str, trainer_state: dict[str, Any] | None,
                   keep: int) -> Path:
    """The collective writes of :func:`save_sharded_checkpoint` into the staging ``tmp``."""
    for state, folder in ((model_state, SHARDED_MODEL_DIR), (optim_state, SHARDED_OPTIMIZER_DIR)):
        try:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / folder))
        except dcp.CheckpointException as err:  # raised on every rank
            raise _first_failure(err) from None
    try:
        mine: dict[str, dict[str, Any]] | OSError = _hash_own_shards(tmp)
    except OSError as err:  # reported by rank 0 below, so that no rank waits alone
        mine = err
    hashed = _gather_to_rank0(mine)

    def finish() -> Path:
        for entries in hashed:
            if isinstance(entries, OSError):
                raise entries
        write_run_files(tmp, step, model_config, train_config_toml, trainer_state)
        return publish(run_dir, tmp, step, keep,
                       hashed={k: v for entries in hashed for k, v in entries.items()})

    return _on_rank0(finish)


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer,
                            ckpt_dir: str | Path, tied: dict[str, str]) -> None:
    """Load the weights and optimizer state of a sharded checkpoint into ``model`` (plain,
    DDP or FSDP2, any world size) and ``optimizer``.

    Collective when a process group exists (every rank reads the chunks it needs); in a
    process without one, it reads everything.

    Raises:
        KeyError: the stored weights are not those of ``model`` (naming the tensors).
    """
    ckpt_dir = Path(ckpt_dir)
    model_state, optim_state = sharded_state(model, optimizer, tied)
    stored = dcp.FileSystemReader(str(ckpt_dir / SHARDED_MODEL_DIR)).read_metadata()
    missing = sorted(set(model_state) - set(stored.state_dict_metadata))
    unexpected = sorted(set(stored.state_dict_metadata) - set(model_state))
    if missing or unexpected:
        raise KeyError(f"weights in {str(ckpt_dir)!r} do not match the model: missing "
                       f"{missing}, unexpected {unexpected}")
    # Parameters the saved run never updated (never a gradient: ACT's halting head with
    # use_act = false) have no optimizer state in it, and get none here.
    saved = dcp.FileSystemReader(str(ckpt_dir / SHARDED_OPTIMIZER_DIR)).read_metadata()
    with_state = {key.removeprefix("state.").rsplit(".", 1)[0]
                  for key in saved.state_dict_metadata if key.startswith("state.")}
    stateless = [name for name in optim_state["state"] if name not in with_state]
    for name in stateless:
        del optim_state["state"][name]
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # no_dist: "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(model_state, checkpoint_id=ckpt_dir / SHARDED_MODEL_DIR, no_dist=no_dist)
        dcp.load(optim_state, checkpoint_id=ckpt_dir / SHARDED_OPTIMIZER_DIR, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=_LOAD)
    forget_optimizer_states(model, optimizer, stateless)


# Helpers ------------------------------------------------------------------------------------


def _non_finite(state: dict[str, Any]) -> list[str]:
    """Names of the floating tensors whose local shard holds a NaN or an infinity."""
    bad = []
    for name, t in state.items():
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def _hash_own_shards(tmp: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the DCP data files this rank wrote (``__RANK_*.distcp``); rank 0
    hashes whatever no rank claims (the metadata, and any file named otherwise)."""
    prefix = f"__{dist.get_rank()}_"
    entries = {}
    for folder in (SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR):
        for f in sorted((tmp / folder).glob(f"{prefix}*")):
            if f.is_file():
                entries[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size,
                                                          "sha256": file_sha256(f)}
    return entries


def _first_failure(err: dcp.CheckpointException) -> Exception:
    """The exception of the first rank that failed inside DCP (an ``OSError`` for a full
    disk or a permission error), or a ``RuntimeError`` that carries DCP's message."""
    for rank in sorted(err.failures):
        failure = err.failures[rank]
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, Exception):
            return exc
    return RuntimeError(str(err))


def _on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and return its result on every rank, or raise its exception on
    every rank (the others must not wait for a step that failed)."""
    box: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def _all_gather(obj: T) -> list[T]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather_to_rank0(obj: T) -> list[T]:
    """Every rank's ``obj`` on rank 0 (an empty list elsewhere)."""
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


__all__ = ["SHARDED_OPTIMIZER_DIR", "load_sharded_checkpoint", "save_sharded_checkpoint",
           "sharded_state"]
