"""Training: configuration, data, schedules, losses, checkpoints, distributed, the loop.

    from open_mythos.training import load_config, Trainer, load_checkpoint
    cfg = load_config("configs/tiny.toml", [("run.steps", 200)])
    Trainer(cfg).train()
    model, model_cfg = load_checkpoint(cfg.run.out)
"""

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import (
    Compile,
    ConfigError,
    DataConfig,
    LoopMode,
    ModelConfig,
    OptimConfig,
    Parallel,
    Precision,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    load_config,
    parse_override,
    to_toml,
)
from .schedule import LoopSchedule, LRSchedule
from .trainer import Trainer, TrainingDiverged, TrainingInterrupted, TrainState, train

__all__ = [
    "Compile",
    "ConfigError",
    "DataConfig",
    "LRSchedule",
    "LoopMode",
    "LoopSchedule",
    "ModelConfig",
    "OptimConfig",
    "Parallel",
    "Precision",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "parse_override",
    "to_toml",
    "train",
]
