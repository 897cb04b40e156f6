"""What a training run left on disk, read back for evaluation: the model (looped or dense
baseline), the task it was trained on and its training depth.

Paths may be a checkpoint directory or a run directory (its latest checkpoint is used), as
laid out by :mod:`open_mythos.training.checkpoint`. :func:`load_model` is
:func:`open_mythos.checkpoints.load_checkpoint`: ``(model, cfg)`` of any layout and kind.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import load_checkpoint as load_model  # (model, cfg) of any layout and kind
from ..tasks import Task, get_task

RUN_CONFIG_FILE = "config.toml"


def read_train_config(path: str | Path) -> Any | None:
    """The :class:`~open_mythos.training.config.TrainConfig` of a checkpoint or run
    directory, or None when neither holds one; a tokenizer directory that has gone is
    replaced by the run's own copy (:func:`~open_mythos.training.runfiles.with_own_tokenizer`)."""
    from ..training.checkpoint import CHECKPOINT_DIR, TRAIN_CONFIG_FILE
    from ..training.config import load_config
    from ..training.runfiles import with_own_tokenizer

    path = Path(path).expanduser()
    ckpt = _checkpoint_of(path)
    run_dir = ckpt.parent.parent if ckpt and ckpt.parent.name == CHECKPOINT_DIR else path
    for candidate in (ckpt / TRAIN_CONFIG_FILE if ckpt else None, path / RUN_CONFIG_FILE):
        if candidate is not None and candidate.is_file():
            return with_own_tokenizer(load_config(candidate), run_dir)
    return None


def _checkpoint_of(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else its run's newest one whose model files are
    intact (or None): the one the model is loaded from (``resolve_checkpoint_dir``), whatever
    the state of its optimizer and trainer files, which evaluation does not read."""
    from ..checkpoints import MODEL_FILES
    from ..training.checkpoint import TRAIN_CONFIG_FILE, latest_checkpoint

    return (path if (path / TRAIN_CONFIG_FILE).is_file()
            else latest_checkpoint(path, MODEL_FILES))


def run_task(path: str | Path) -> Task | None:
    """The task a run trained on (name and difficulty knobs), or None for text runs or
    runs without a stored configuration."""
    cfg = read_train_config(path)
    if cfg is None or cfg.data.task is None:
        return None
    return get_task(cfg.data.task, **cfg.data.task_args)


def run_train_loops(path: str | Path) -> int | None:
    """The depth a run trained at
    (:attr:`~open_mythos.training.config.ScheduleConfig.trained_depth`: ``max_loops`` for a
    curriculum or uniform counts, else ``n_loops``); without a stored training
    configuration, the depth the checkpoint records
    (:func:`~open_mythos.checkpoints.read_training_depth`: a Hugging Face export's
    ``trained_depth``, else its default ``n_loops``), else None."""
    cfg = read_train_config(path)
    if cfg is not None:
        return cfg.schedule.trained_depth
    from ..checkpoints import read_training_depth

    return read_training_depth(path)


def run_val_batches(path: str | Path, n_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The validation batches of a run: its data source rebuilt from its stored
    configuration (same data, tokenizer, ``seq_len`` and seed), ``n_batches`` batches
    (default ``data.eval_batches``) of the validation split, as the trainer evaluated them:
    for a run of ``W`` processes (its checkpoint records ``W``), every process's rows, each
    global batch as its ``W`` shards (:func:`~open_mythos.training.data.val_batches`).

    Raises:
        ValueError: ``path`` holds no training configuration.
    """
    from ..checkpoints import CheckpointCorrupt
    from ..training.checkpoint import TRAINER_STATE_FILE, read_trainer_state
    from ..training.data import VAL, build_data_source, val_batches, val_fingerprint

    ckpt = _checkpoint_of(Path(path))  # resolved (and verified) once
    cfg = read_train_config(path if ckpt is None else ckpt)
    if cfg is None:
        raise ValueError(f"{path} holds no training configuration ({RUN_CONFIG_FILE})")
    # The trainer state records the number of processes and (checkpoints of 2026-12-07 on)
    # the fingerprint of the batches the trainer evaluated on.
    state_file = None if ckpt is None else ckpt / TRAINER_STATE_FILE
    state: dict[str, Any] = {}
    if state_file is not None and state_file.is_file():
        try:  # evaluation needs only the weights: a damaged trainer state skips the check
            state = read_trainer_state(ckpt)
        except CheckpointCorrupt as err:
            warnings.warn(f"cannot check that the validation data of {path} is what the "
                          f"trainer evaluated on: {err}", stacklevel=2)
    world = int(state.get("world_size", 1))
    data = build_data_source(cfg.data, cfg.run.seed, world)
    saved = state.get("data") or []
    if saved:  # a streamed source's split as the run kept it (a resume may change the sizes)
        data.load_state_dict(saved[0])
    evaluated = cfg.data.eval_batches
    batches = val_batches(data, max(n_batches or 0, evaluated), world)
    recorded = state.get("val_fingerprint")
    if (recorded is not None and recorded != val_fingerprint(data, batches[:evaluated * world])
            # Multi-process checkpoints of 2026-12-07 before 104fffb hashed one process's
            # rows of each batch.
            and (world == 1 or recorded != val_fingerprint(data, [
                data.batch(VAL, i) for i in range(evaluated)]))):
        warnings.warn(f"the validation data of {path} is not what the trainer evaluated on "
                      "(its files changed since the checkpoint was written?): these losses "
                      "are not comparable with the run's logged val_loss", stacklevel=2)
    return batches[:(n_batches or evaluated) * world]


def is_text_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run trained on text (a stored configuration without a task)."""
    cfg = read_train_config(path)
    return cfg is not None and cfg.data.task is None


def run_loss_vs_loops(
    path: str | Path, device: str | torch.device = "cpu", loops: list[int] | None = None,
    on_loss: Any = None, batches: list[dict[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, dict[int, Any]]:
    """``(model, losses)``: the run's latest model on ``device`` and its validation
    :class:`~open_mythos.evaluation.Perplexity` at each of ``loops`` (default 1 to 4x
    ``max_loop_iters``) on the run's own validation batches (:func:`run_val_batches`).
    ``on_loss``: called as each loop count is done (:func:`~.sweep.loss_vs_loops`).
    ``batches``: the run's validation batches when the caller has built them already.

    Raises:
        ValueError: the run holds a fixed-depth model (one depth: nothing to sweep).
    """
    from ..registry import is_looped
    from .sweep import default_loops, loss_vs_loops

    model, _ = load_model(path, device)
    if not is_looped(model):
        raise ValueError(f"{path} holds a fixed-depth model ({model.cfg.core_layers} core "
                         "blocks): its validation loss has one depth, with no loops to sweep "
                         "(the training log has it: val_loss in metrics.jsonl)")
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in (run_val_batches(path) if batches is None else batches)]
    return model, loss_vs_loops(model, batches, loops or default_loops(model), on_loss)


def parse_task_args(text: str | None) -> dict[str, Any]:
    """Task keyword arguments from a JSON object string (``'{"lengths": [4, 12]}'``)."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"task arguments must be a JSON object, got {text!r}")
    return value
