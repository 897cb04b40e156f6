"""Learning-rate and loop-count schedules against hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from open_mythos.training import LoopMode, LoopSchedule, LRSchedule, load_config
from open_mythos.training.config import (
    ConfigError,
    DataConfig,
    LRDecay,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)


def hand_lr(step, base, warmup, total, ratio):
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    floor = base * ratio
    return floor + (base - floor) * (1 + math.cos(math.pi * t)) / 2


def test_warmup_cosine_matches_hand_formula():
    sched = LRSchedule(base_lr=3e-4, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    for step in range(0, 140):
        assert sched(step) == pytest.approx(hand_lr(step, 3e-4, 10, 110, 0.1), rel=1e-12)
    assert sched(0) == pytest.approx(3e-5)
    assert sched(9) == pytest.approx(3e-4)  # warmup ends at the peak
    assert sched(60) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5))  # halfway: mid-point
    assert sched(110) == pytest.approx(3e-5) and sched(500) == pytest.approx(3e-5)


@pytest.mark.parametrize("decay_steps", [0, 2, 4])
def test_decay_at_or_before_warmup_end_reaches_the_floor_at_the_documented_step(decay_steps):
    # "decay_steps: 0-based step at which the cosine reaches its floor" (docs/training.md);
    # it used to run one step at the peak after warmup, then drop.
    sched = LRSchedule(1e-3, 4, decay_steps, min_lr_ratio=0.1)
    assert [sched(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert [sched(s) for s in range(4, 8)] == pytest.approx([1e-4] * 4)
    assert LRSchedule(1e-3, 0, 0)(0) == pytest.approx(1e-4)


def test_constant_and_no_warmup():
    sched = LRSchedule(1e-3, 0, 100, decay=LRDecay.CONSTANT)
    assert {sched(s) for s in range(200)} == {1e-3}
    assert LRSchedule(1e-3, 0, 100)(0) == pytest.approx(1e-3)


def test_schedule_config_defaults_decay_to_run_steps():
    cfg = load_config(None, [("schedule.warmup_steps", 5), ("run.steps", 50)])
    sched = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, cfg.run.steps)
    assert sched(50) == pytest.approx(cfg.optim.lr * cfg.schedule.min_lr_ratio)


def make_loops(mode, **kw):
    base = dict(mode=mode, n_loops=4, min_loops=1, max_loops=8, sigma=0.5,
                curriculum_steps=11, seed=0)
    return LoopSchedule(**{**base, **kw})


def test_fixed_and_curriculum():
    assert {make_loops(LoopMode.FIXED)(s) for s in range(50)} == {4}
    ramp = make_loops(LoopMode.CURRICULUM, min_loops=2, max_loops=7)
    values = [ramp(s) for s in range(20)]
    assert values[0] == 2 and values[10:] == [7] * 10
    assert values == sorted(values)
    assert values[5] == round(2 + 5 * 0.5)
    # A one-step ramp ends at its step 0 (``curriculum_steps - 1``): max_loops throughout.
    assert {make_loops(LoopMode.CURRICULUM, curriculum_steps=1)(s) for s in range(5)} == {8}
    assert [make_loops(LoopMode.CURRICULUM, curriculum_steps=2)(s) for s in range(3)] == [1, 8, 8]


def test_sampled_loops_are_deterministic_in_range_and_centered():
    sampler = make_loops(LoopMode.SAMPLED)
    draws = np.array([sampler(s) for s in range(4000)])
    again = np.array([make_loops(LoopMode.SAMPLED)(s) for s in range(4000)])
    assert (draws == again).all()  # same seed, same step -> same count (all ranks agree)
    assert draws.min() >= 1 and draws.max() <= 8
    assert set(draws.tolist()) == set(range(1, 9))
    # Clipping at 8 lowers the mean a little below n_loops = 4.
    assert 3.3 < draws.mean() < 4.1
    other = np.array([make_loops(LoopMode.SAMPLED, seed=1)(s) for s in range(4000)])
    assert (other != draws).mean() > 0.5
    # Order of evaluation does not matter: the count is a function of the step alone.
    assert [sampler(s) for s in (7, 3, 7)] == [draws[7], draws[3], draws[7]]


def test_sampled_clip_range():
    sampler = make_loops(LoopMode.SAMPLED, n_loops=3, min_loops=3, max_loops=3)
    assert {sampler(s) for s in range(100)} == {3}


@pytest.mark.parametrize("mode", list(LoopMode))
def test_a_mode_given_by_name_is_that_mode(mode):
    """LoopMode/LRDecay are str enums compared with ``is``: a name given in Python (as the
    TOML spells it) must select the same schedule as the member, not fall through to
    sampling."""
    kw = dict(n_loops=3, min_loops=2, max_loops=6, sigma=0.5, curriculum_steps=10, seed=0)
    by_name, by_member = LoopSchedule(mode.value, **kw), LoopSchedule(mode, **kw)
    assert by_name.mode is mode
    assert [by_name(s) for s in range(30)] == [by_member(s) for s in range(30)]
    assert by_name.loop_counts() == by_member.loop_counts()
    assert ScheduleConfig(loops=mode.value, n_loops=3, min_loops=2, max_loops=6).loops is mode


def test_fixed_by_name_never_samples():
    assert {LoopSchedule("fixed", 4, 1, 8, 0.5, 100, 0)(s) for s in range(50)} == {4}
    assert LRSchedule(1e-3, 0, 100, 0.1, "constant")(50) == 1e-3
    assert LRSchedule(1e-3, 0, 100, 0.1, "cosine")(50) == pytest.approx(hand_lr(50, 1e-3, 0, 100, 0.1))


@pytest.mark.parametrize("build, match", [
    (lambda: LoopSchedule("bogus", 4, 1, 8, 0.5, 100, 0), "LoopSchedule.mode='bogus'"),
    (lambda: LoopSchedule("uniform", 4, 6, 2, 0.5, 100, 0), "min_loops=6 must be <= max_loops=2"),
    (lambda: LoopSchedule("sampled", 0, 1, 8, 0.5, 100, 0), "n_loops=0"),
    (lambda: LoopSchedule("sampled", 9, 1, 8, 0.5, 100, 0), r"n_loops=9 .* \[1, 8\]"),
    (lambda: LoopSchedule("sampled", 4, 1, 8, -1.0, 100, 0), "sigma"),
    (lambda: LRSchedule(1e-3, 0, 100, 0.1, "linear"), "LRSchedule.decay='linear'"),
    (lambda: LRSchedule(1e-3, -1, 100), "warmup_steps"),
    # A fractional warmup lifted step 2 to 1.2x the peak; the others were taken as given.
    (lambda: LRSchedule(1e-3, 2.5, 100), r"warmup_steps=2.5 must be an integer >= 0"),
    (lambda: LRSchedule(1e-3, True, 100), r"warmup_steps=True must be an integer"),
    (lambda: LRSchedule(1e-3, 0, -5), r"decay_steps=-5 must be an integer >= 0"),
    (lambda: LRSchedule(float("inf"), 0, 100), r"base_lr=inf must be finite"),
    (lambda: LRSchedule("1e-3", 0, 100), r"base_lr='1e-3' must be finite"),
    (lambda: ScheduleConfig(loops="Fixed"), "schedule.loops='Fixed'"),
    (lambda: ScheduleConfig(lr_decay="bogus"), "schedule.lr_decay"),
    (lambda: RunConfig(precision="fp16"), "run.precision='fp16'"),
    (lambda: RunConfig(parallel="zero3"), "run.parallel"),
])
def test_bad_schedules_are_refused_naming_the_field(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_run_config_enums_by_name():
    run = RunConfig(precision="bf16", compile="model", parallel="none")
    from open_mythos.training.config import Compile, Parallel, Precision

    assert (run.precision, run.compile, run.parallel) == (Precision.BF16, Compile.MODEL, Parallel.NONE)
    assert run.precision is Precision.BF16 and run.compile is Compile.MODEL


def test_numpy_integers_are_loop_counts():
    sched = LoopSchedule("fixed", np.int64(4), np.int32(1), 8, 0.5, 100, 0)
    assert sched(3) == 4 and type(sched.n_loops) is int and type(sched.min_loops) is int
    lr = LRSchedule(1e-3, np.int64(4), np.int32(100))
    assert type(lr.warmup_steps) is int and lr(0) == pytest.approx(2.5e-4)


@pytest.mark.parametrize("build, match", [
    (lambda: RunConfig(steps=3.0), r"run.steps=3.0 must be an integer"),
    (lambda: RunConfig(steps=torch.tensor(3.0)), r"run.steps=tensor\(3.\) must be an integer"),
    (lambda: OptimConfig(lr="3e-3"), r"optim.lr='3e-3' must be a number"),
    (lambda: RunConfig(device=torch.device("cpu")), r"run.device=device\(type='cpu'\) must be a string"),
    (lambda: DataConfig(batch_size=True), r"data.batch_size=True must be an integer"),
])
def test_sections_built_in_python_check_their_types_as_the_toml_does(build, match):
    """A wrong type was a bare TypeError (a str lr compared with 0), or was accepted and
    failed at the first step naming another key (steps=3.0 -> curriculum_steps)."""
    with pytest.raises(ConfigError, match=match):
        build()


def test_numpy_integers_and_paths_in_sections_become_plain_values(tmp_path):
    """A NumPy integer and a Path are what the TOML would hold: the run's config.toml (which
    could not serialise np.int64) round-trips."""
    from pathlib import Path

    from open_mythos.training import TrainConfig, load_config, to_toml

    assert DataConfig(text=Path("a.txt")).text == DataConfig(text=["a.txt"]).text == ["a.txt"]
    assert DataConfig(text=[Path("a"), "b"]).text == ["a", "b"]
    run = RunConfig(out=Path(tmp_path / "run"), steps=np.int64(3), seed=np.uint8(2))
    assert (run.out, run.steps, run.seed) == (str(tmp_path / "run"), 3, 2)
    assert type(run.steps) is int and type(OptimConfig(lr=np.float32(0.5)).lr) is float
    cfg = TrainConfig(run=run, data=DataConfig(task="parity", batch_size=np.int32(2)))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
