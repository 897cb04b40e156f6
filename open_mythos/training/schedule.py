"""Per-step schedules: the learning rate and the number of recurrent loops.

Both are pure functions of the step index (and the seed), so they need no state of their
own in a checkpoint, every ``torchrun`` rank computes the same value without
communication, and a resumed run continues them exactly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .config import ConfigError, LoopMode, LRDecay, ScheduleConfig, as_member

# Mixed into the seed of the loop sampler so that its stream is independent of the data
# order and model init drawn from the same run seed.
_LOOP_STREAM = 0x100B5
_PROGRESSIVE_STREAM = 0xD71


def _set_count(schedule: object, name: str, minimum: int) -> None:
    """Check the frozen dataclass field ``name`` is an integer ``>= minimum`` (NumPy's
    integers are; ``bool`` is not) and store it as a Python ``int``."""
    value = getattr(schedule, name)
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= minimum):
        raise ConfigError(
            f"{type(schedule).__name__}.{name}={value!r} must be an integer >= {minimum}")
    object.__setattr__(schedule, name, int(value))


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup then cosine (or constant) decay.

    ``lr(step)`` is the rate of the optimizer update of step ``step`` (0-based)::

        step < warmup:  base * (step + 1) / warmup
        step < decay:   floor + (base - floor) * (1 + cos(pi * p)) / 2,
                        p = (step - warmup) / (decay_steps - warmup)
        otherwise:      floor = base * min_lr_ratio          (cosine)
                        base                                 (constant, after warmup)

    A ``decay_steps`` at or before the end of warmup means no cosine: the rate goes from
    the end of warmup straight to the floor at step ``max(warmup, decay_steps)``.
    """

    base_lr: float
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float = 0.1
    decay: LRDecay = LRDecay.COSINE

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", as_member(LRDecay, self.decay, "LRSchedule.decay"))
        if not (isinstance(self.base_lr, numbers.Real) and 0 <= self.base_lr < math.inf):
            raise ConfigError(f"LRSchedule.base_lr={self.base_lr!r} must be finite and >= 0")
        _set_count(self, "warmup_steps", 0)  # 2.5 would lift step 2 above the peak
        _set_count(self, "decay_steps", 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"LRSchedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, base_lr: float, total_steps: int) -> LRSchedule:
        decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps
        return cls(base_lr, cfg.warmup_steps, decay_steps, cfg.min_lr_ratio, cfg.lr_decay)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.decay is LRDecay.CONSTANT:
            return self.base_lr
        floor = self.base_lr * self.min_lr_ratio
        if step >= self.decay_steps:  # also where decay_steps <= warmup: no cosine at all
            return floor
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LoopSchedule:
    """The number of recurrent loops of each training step.

    - ``fixed``: always ``n_loops``.
    - ``curriculum``: ``round`` of a linear ramp from ``min_loops`` (step 0) to ``max_loops``
      (step ``curriculum_steps - 1`` and after).
    - ``sampled``: Poisson-lognormal (as in Geiping et al. 2025, "Scaling up test-time
      compute with latent reasoning"): ``rate = exp(tau)``, ``tau ~ N(log(n_loops) -
      sigma^2 / 2, sigma)``, so ``E[rate] = n_loops``; ``loops ~ Poisson(rate)``, clipped to
      ``[min_loops, max_loops]``. Drawn from a generator seeded by ``(seed, step)``.
    - ``uniform``: uniform on ``[min_loops, max_loops]``, from the same generator.
    """

    mode: LoopMode
    n_loops: int
    min_loops: int
    max_loops: int
    sigma: float
    curriculum_steps: int
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", as_member(LoopMode, self.mode, "LoopSchedule.mode"))
        for name in ("n_loops", "min_loops", "max_loops", "curriculum_steps"):
            _set_count(self, name, 1)
        if self.min_loops > self.max_loops:
            raise ConfigError(f"LoopSchedule.min_loops={self.min_loops} must be <= "
                              f"max_loops={self.max_loops}")
        if self.mode is LoopMode.SAMPLED and not self.min_loops <= self.n_loops <= self.max_loops:
            raise ConfigError(
                f"LoopSchedule.n_loops={self.n_loops} (the mean of sampled loops) must lie in "
                f"[min_loops, max_loops] = [{self.min_loops}, {self.max_loops}]")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ConfigError(f"LoopSchedule.sigma={self.sigma!r} must be finite and >= 0")

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, total_steps: int, seed: int) -> LoopSchedule:
        ramp = cfg.curriculum_steps if cfg.curriculum_steps is not None else total_steps
        return cls(cfg.loops, cfg.n_loops, cfg.min_loops, cfg.max_loops, cfg.loop_sigma, ramp, seed)

    def loop_counts(self) -> range:
        """Every loop count this schedule can give a step."""
        if self.mode is LoopMode.FIXED:
            return range(self.n_loops, self.n_loops + 1)
        return range(self.min_loops, self.max_loops + 1)

    def __call__(self, step: int) -> int:
        if self.mode is LoopMode.FIXED:
            return self.n_loops
        if self.mode is LoopMode.CURRICULUM:
            # A ramp of one step is at max_loops from step 0 (its step curriculum_steps - 1).
            frac = min(1.0, step / (self.curriculum_steps - 1)) if self.curriculum_steps > 1 else 1.0
            return int(round(self.min_loops + (self.max_loops - self.min_loops) * frac))
        rng = np.random.default_rng([self.seed, step, _LOOP_STREAM])
        if self.mode is LoopMode.UNIFORM:
            return int(rng.integers(self.min_loops, self.max_loops + 1))
        tau = rng.normal(math.log(self.n_loops) - 0.5 * self.sigma**2, self.sigma)
        loops = int(rng.poisson(math.exp(tau)))
        return min(self.max_loops, max(self.min_loops, loops))


def progressive_split(seed: int, step: int, n_loops: int) -> tuple[int, int]:
    """DeepThinking's progressive-loss split of ``n_loops`` for one optimiser step:
    ``(n, k)`` with ``n`` uniform in ``[0, n_loops - 1]`` (loops run without gradient) and
    ``k`` uniform in ``[1, n_loops - n]`` (loops trained). A function of ``(seed, step)``:
    every rank and every micro-batch of the step draws the same split (so accumulation and
    data parallelism give one big batch's gradient), and a resumed run repeats it.
    """
    rng = np.random.default_rng([seed, step, _PROGRESSIVE_STREAM])
    n = int(rng.integers(0, n_loops))
    return n, int(rng.integers(1, n_loops - n + 1))
