"""The training loop: recurrence-aware steps, skipping of non-finite steps, exact resume.

One process::

    openmythos train --task parity --steps 300 --out runs/parity --seed 0
    openmythos train --task parity --steps 600 --out runs/parity --seed 0 --resume

Data parallel (per-rank batch x world = global batch)::

    torchrun --nproc_per_node 2 -m open_mythos train --task parity --parallel ddp --out runs/ddp
    torchrun --nproc_per_node 8 -m open_mythos train --config configs/small.toml --parallel fsdp

A step: pick the loop count (same on every rank, checked), run ``grad_accum`` micro-batches
(forward, loss, backward; gradients synchronised on the last one), clip, and either apply
the update (AdamW, then the MoE router-bias balancing step) or, if the loss or the gradient
norm is not finite, skip it and count it.

Honest failure: the run stops with :class:`TrainingDiverged` after ``run.max_bad_steps``
skipped steps in a row, on a non-finite validation loss, on weights that are no longer
finite (a checkpoint is never written from them), or when its last step was skipped (its
final state is then not saved). No checkpoint is written while steps are being skipped, and
the error names the newest checkpoint whose weights then gave a finite loss.

The run directory is locked, checked against the resume mode and kept append-only by
:mod:`.rundir`.

Reproducibility: model init, data, loop counts and learning rate are functions of the seed
and the step, and the checkpoint holds weights, optimizer, data position, counters and the
RNG states of every rank, so a run killed and resumed from a checkpoint produces the same
per-step losses as one that never stopped (bit-exact on CPU in fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import TRAIN_CONFIG_FILE, latest_checkpoint
from ..config import MythosConfig
from ..devices import keep_freed_memory, return_freed_memory
from ..layers.norm import RMSNorm
from ..registry import build_model, config_dict, is_looped, kind_of
from ..tasks import PAD_ID
from .checkpoint import (
    CHECKPOINT_DIR,
    NonFiniteWeights,
    TrainingCheckpoint,
    gather_model_state,
    gather_optimizer_state,
    is_sharded,
    newest_intact_checkpoint,
    point_latest,
    read_model_config,
    read_trainer_state,
    read_training_checkpoint,
    remove_interrupted_writes,
    restore_model_state,
    restore_optimizer_state,
    save_checkpoint,
    tied_parameters,
    write_text_atomic,
)
from .config import (
    SOURCE_KEYS,
    Compile,
    ConfigError,
    DataConfig,
    LoopMode,
    ModelConfig,
    Parallel,
    Precision,
    TrainConfig,
    derived_seed,
    load_config,
    to_toml,
)
from .data import (
    TRAIN,
    VAL,
    DataExhausted,
    DataSource,
    DataUnreadable,
    build_data_source,
    iter_val_batches,
    val_fingerprint,
)
from .distributed import (
    all_reduce,
    broadcast_object,
    gather_objects,
    gradient_sync,
    group_alive,
    lost_peer,
    reduced_expert_loads,
    report_lost_peer,
    setup,
    teardown,
    unwrap,
    wrap_model,
)
from .losses import (
    IGNORE_INDEX,
    LossParts,
    compute_loss,
    count_targets,
    cross_entropy_sum,
    loop_readout_ce_sum,
    loop_weights,
    readout_depths,
    supervised_rows,
)
from .rundir import (
    METRICS_FILE,
    REPLACED_METRICS_FILE,
    Resume,
    RunDirError,
    RunLock,
    os_errors,
    record_resume,
    replace_metrics_after,
)
from .runfiles import absolute_paths, changed_keys, copy_tokenizer
from .schedule import LoopSchedule, LRSchedule, progressive_split
from .sharded import load_sharded_checkpoint, save_sharded_checkpoint

CONFIG_FILE = "config.toml"

LossHook = Callable[[int, torch.Tensor], torch.Tensor]
StepHook = Callable[[int, dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """The run cannot go on honestly: too many consecutive non-finite steps, a non-finite
    validation loss, non-finite weights, or a last step that was skipped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a whole step, which was saved (under
    ``torchrun`` every rank stopped after the same step).

    Attributes:
        step: the last step completed.
        checkpoint: the checkpoint holding it (None when it could not be saved: the last
            steps were skipped as non-finite).
        signum: the signal that asked for the stop (on the rank that reports it; another
            rank may have been the one signalled).
    """

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        saved = f"saved in {checkpoint}" if checkpoint is not None else "not saved"
        super().__init__(f"{signal.Signals(signum).name} stopped the run after step {step} "
                         f"({saved})")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum

    def __reduce__(self):  # pickles (multiprocessing) with its three arguments
        return type(self), (self.step, self.checkpoint, self.signum)


#: The signals that ask a run to stop after the step in progress, saving it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def open_data(cfg: TrainConfig, world_size: int = 1) -> tuple[DataSource, MythosConfig]:
    """The data source of ``cfg`` and the model configuration built for its vocabulary: what
    :meth:`Trainer.train` checks first, before it touches the run directory.

    Raises:
        ConfigError: a ``[data]`` key its source does not read is set, the data source
            cannot be opened (see :func:`build_data_source`), the model configuration is
            invalid, or the data's sequences do not fit its context.
    """
    unread = cfg.data.unread_keys()
    if unread:
        where = {"builtin": "the built-in corpus", "task": f"task {cfg.data.task!r}"}.get(
            cfg.data.source, f"data.{cfg.data.source}")
        default = DataConfig()
        readers = {k: [s for s, keys in SOURCE_KEYS.items() if k in keys] for k in unread}
        raise ConfigError("; ".join(
            f"data.{k}={getattr(cfg.data, k)!r} is not read by {where} (only by "
            f"{' and '.join(readers[k])} data): remove it, or set it to its default "
            f"{getattr(default, k)!r}" for k in unread))
    # Every [model] check but the vocabulary's first: tokenising a corpus may take minutes.
    _check_seq_len(cfg.data.seq_len, cfg.model.build(1))
    data = build_data_source(cfg.data, cfg.run.seed, world_size,
                             with_trace=cfg.optim.loop_targets)
    model_cfg = cfg.model.build(data.vocab_size)
    if cfg.data.seq_len is None and data.seq_len > model_cfg.max_seq_len:  # not the user's
        what = (f"task {cfg.data.task!r}'s longest sequence" if cfg.data.source == "task"
                else f"the default data.seq_len for {cfg.data.source} data")
        raise ConfigError(f"{what} is {data.seq_len} tokens, above model.max_seq_len="
                          f"{model_cfg.max_seq_len}: raise model.max_seq_len, or "
                          + ("shorten the task (data.task_args)" if cfg.data.source == "task"
                             else "set data.seq_len"))
    _check_seq_len(data.seq_len, model_cfg)
    return data, model_cfg


def _check_seq_len(seq_len: int | None, model_cfg: MythosConfig) -> None:
    if seq_len is not None and seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len="
                          f"{model_cfg.max_seq_len}")


@dataclass
class TrainState:
    """Counters saved in every checkpoint.

    Attributes:
        step: optimizer steps completed (skipped steps included).
        position: global training batches consumed (one per step).
        sequences: training sequences consumed over all ranks and micro-steps: where a
            text source continues, whatever the global batch of the resumed run.
        bad_steps: steps skipped because of a non-finite loss or gradient norm, in total.
        consecutive_bad: such steps since the last good one.
    """

    step: int = 0
    position: int = 0
    sequences: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0


@dataclass(frozen=True)
class StepSums:
    """One step's loss sums over all ranks and micro-batches: the objective, ponder and aux
    are means over ranks; the cross-entropies are sums over supervised targets."""

    objective: float
    ce_sum: float
    ponder: float
    aux: float
    loop_ce_sum: float


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices only; none on embeddings (the tied
    head included), norm gains, biases or any other parameter with fewer than 2 dims.

    Build it after FSDP2 sharding: ``fully_shard`` replaces the parameters.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            exempt = isinstance(module, (nn.Embedding, RMSNorm, nn.LayerNorm)) or p.ndim < 2
            (no_decay if exempt or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def _quiet_writer_thread_errors() -> None:
    """Keep an ``OSError`` of TensorBoard's writer thread (a full disk) from printing the
    thread's traceback: the writer raises it again in the training loop at its next call,
    where it ends the run with the command's one-line error. Other threads' errors, and
    other errors, go to the hook in place before (process-wide, installed once)."""
    previous = threading.excepthook
    if getattr(previous, "_quiets_tensorboard", False):
        return

    def hook(args: Any) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread"
                and isinstance(args.exc_value, OSError)):
            previous(args)

    hook._quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _untied_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shapes of ``model``'s state dict without the aliases of tied parameters."""
    tied = tied_parameters(model)
    return {k: v.shape for k, v in model.state_dict().items() if k not in tied}


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # replaced or closed streams
        return False


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` within the block, the previous one restored."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def model_overrides(cfg: MythosConfig) -> dict[str, Any]:
    """``[model]`` keys that rebuild ``cfg``: every field, and ``kind`` where the fields do
    not tell the kind (a registered kind that adds no field of its own; without it a
    resumed run's config.toml built the plain model)."""
    fields = dataclasses.asdict(cfg)
    if kind_of(cfg) is not kind_of(cfg.to_dict()):
        fields["kind"] = kind_of(cfg).name
    return fields


def _message(err: Exception) -> str:
    """An exception's message (``str`` of a ``KeyError`` is its quoted repr)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's Python and torch RNG states (CUDA included when in use)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_random_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_random_state(s: Any) -> tuple:
    # A state that went through torch.save/load or broadcast_object may have lists for tuples.
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def _schedule_warnings(cfg: TrainConfig, looped: bool, use_act: bool) -> list[str]:
    """Settings that are valid but that this run cannot carry out as written (kept valid: a
    run may be resumed with more steps, and its schedules are functions of the step)."""
    sched, steps, out = cfg.schedule, cfg.run.steps, []
    if sched.warmup_steps > steps:
        out.append(f"schedule.warmup_steps={sched.warmup_steps} is above run.steps={steps}: "
                   f"the learning rate never reaches optim.lr={cfg.optim.lr:g} (its last step "
                   f"runs at {cfg.optim.lr * steps / max(1, sched.warmup_steps):.3g})")
    if (looped and sched.loops is LoopMode.CURRICULUM and sched.curriculum_steps is not None
            and sched.curriculum_steps > steps):
        last = LoopSchedule.from_config(sched, steps, cfg.run.seed)(steps - 1)
        if last < sched.max_loops:
            out.append(f"schedule.curriculum_steps={sched.curriculum_steps} is past "
                       f"run.steps={steps}: the curriculum ends at {last} loops, below "
                       f"max_loops={sched.max_loops}, which the run records as its trained "
                       "depth (the default depth of generate, sweep and export) and validates "
                       "at unless schedule.eval_loops says otherwise; end the curriculum "
                       "within the run")
    if not looped and sched.backprop_loops is not None:
        out.append(f"schedule.backprop_loops={sched.backprop_loops} truncates the looped "
                   "block's backward; the dense baseline has no loops and backpropagates "
                   "through every block (run.gradient_checkpointing saves its memory)")
    if looped and cfg.optim.ponder_weight and not use_act:
        out.append(f"optim.ponder_weight={cfg.optim.ponder_weight:g} with model.use_act = false: "
                   "the ponder cost is the loop count, which no weight changes; the term adds "
                   "a constant to the logged loss and trains nothing")
    return out


class _SignalCounter:
    """Counts the deliveries of a signal. Python runs a handler once for all the deliveries
    that came during one call into C (a forward or backward pass can take seconds), so the
    handler alone cannot tell one Ctrl-C from two; the C-level handler also writes one byte
    per delivery to the wakeup file descriptor (:func:`signal.set_wakeup_fd`), which this
    reads. Inside ``with``, on the main thread; where a wakeup descriptor is already set (an
    asyncio event loop's), it is left alone and every call counts one delivery. A process
    forked meanwhile (a data loader's worker) drops it: a Ctrl-C reaches the whole process
    group, and the child's handler would write its delivery into the same socket."""

    #: The counter that holds the wakeup descriptor now, for the fork hook.
    active: ClassVar[_SignalCounter | None] = None

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None

    def __enter__(self) -> _SignalCounter:
        try:
            pair = socket.socketpair()
        except OSError:
            return self
        for end in pair:
            end.setblocking(False)
        try:
            theirs = signal.set_wakeup_fd(pair[1].fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread, or a platform without it
            theirs = None
        if theirs is None or theirs != -1:
            if theirs is not None:
                signal.set_wakeup_fd(theirs)
            for end in pair:
                end.close()
            return self
        self._pair = pair
        _SignalCounter.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pair is None:
            return
        _SignalCounter.active = None
        current = signal.set_wakeup_fd(-1)
        if current != self._pair[1].fileno():  # someone set another since: theirs stays
            signal.set_wakeup_fd(current)
        for end in self._pair:
            end.close()
        self._pair = None

    @staticmethod
    def _after_fork_in_child() -> None:
        counter = _SignalCounter.active
        if counter is None or counter._pair is None:
            return
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        for end in counter._pair:
            end.close()
        counter._pair, _SignalCounter.active = None, None

    def take(self, signum: int) -> int:
        """Deliveries of ``signum`` since the last call (at least 1: the one being handled)."""
        if self._pair is None:
            return 1
        count = 0
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while data := self._pair[0].recv(4096):
                count += data.count(signum)
        return max(count, 1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SignalCounter._after_fork_in_child)


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`.

    Args:
        cfg: the configuration.
        resume: a :class:`~.rundir.Resume` mode (or its value): ``"never"`` (False) starts a
            new run, and a ``cfg.run.out`` that already holds one is an error; ``"require"``
            (True) continues from the newest intact checkpoint, and a directory without one
            is an error; ``"auto"`` continues if there is a checkpoint, else starts the run
            from step 1.
        loss_hook: ``(step, objective) -> objective`` applied to every micro-batch's loss
            before ``backward`` (``optim.grad_accum`` calls a step; with
            ``optim.progressive_weight``, to the main forward's part, not the progressive
            term's); ``step`` is numbered as in ``metrics.jsonl`` and ``on_step``, from 1.
            For fault-injection tests and debugging.
        on_step: ``(step, metrics) -> None`` called on every rank after every step
            (skipped ones included) once its row of ``metrics.jsonl`` is written, in the
            training thread: per-step work of the caller that must run there, such as
            ``torch.set_num_threads`` (OpenMP thread counts are per thread). An exception
            from it ends the run like one from training, that step unsaved.
    """

    def __init__(self, cfg: TrainConfig, resume: bool | str | Resume = False,
                 loss_hook: LossHook | None = None, on_step: StepHook | None = None):
        self.cfg = cfg
        self.resume = Resume.of(resume)
        self.loss_hook = loss_hook
        self.on_step = on_step
        # Absolute: save() after train() writes where the run is, whatever the working
        # directory has become since (a notebook's %cd).
        self.out = Path(cfg.run.out).absolute()
        self.lock: RunLock | None = None
        self._reset_run_state()
        #: True once train() has told stderr why it failed (a lost peer, under torchrun).
        self.failure_reported = False
        self._training = False  # inside train(), which holds the run directory's lock
        self._kept_freed_memory = False  # run.keep_freed_memory took effect (undone at the end)

    def _reset_run_state(self) -> None:
        """The counters and bookkeeping of one training attempt, as before any step."""
        self.state = TrainState()
        # The newest checkpoint written or restored; of those, the newest whose weights then
        # gave a finite loss ("good"), and one whose weights gave a non-finite loss at once.
        self.last_checkpoint: Path | None = None
        self.good_checkpoint: Path | None = None
        self._unproven: Path | None = None
        self._bad_checkpoint: Path | None = None
        self._val_fingerprint: str | None = None  # of the validation batches, at the first save
        # The signal that asked this rank to stop, and the one the ranks agreed on in the
        # last step's all-reduce (0: none; see _stop_on_signal).
        self._stop_signal = self._agreed_signal = 0
        self._config_changes: list[str] = []  # since the checkpoint resumed from
        self._mid_step = False  # a step has begun and not finished (its state is no step's end)

    def _require_trained(self, method: str) -> None:
        later = ("To evaluate a saved checkpoint, load it with "
                 "open_mythos.checkpoints.load_model or run `openmythos sweep`")
        if getattr(self, "core", None) is None:
            raise RuntimeError(
                f"Trainer.{method}() works on the model that train() builds: call train() "
                f"first (a finished or interrupted run keeps its model). {later}")
        if not group_alive(self.ctx):
            raise RuntimeError(
                f"Trainer.{method}() is collective, and the process group of this "
                f"run.parallel={self.cfg.run.parallel.value!r} run ended with train(): call "
                f"it during the run (from on_step), not after. {later}")

    # Setup ------------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Train up to ``cfg.run.steps`` and return the final counters. The run seeds the
        process's random generators from ``run.seed``; torch's CPU generator and Python's
        ``random`` are given back as they were afterwards (a notebook's later cells draw
        from the user's seed, not the run's).

        Raises:
            ConfigError: an invalid configuration or run directory (:class:`~.rundir.RunLocked`:
                another process writes it).
            RunDirError: an OS-level failure writing the run directory (names the path).
            TrainingDiverged: see the module docstring.
        """
        python_rng = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                return self._train()
            finally:
                random.setstate(python_rng)

    def _train(self) -> TrainState:
        self.ctx = setup(self.cfg.run.parallel, self.cfg.run.device, self.cfg.run.dist_timeout)
        clean = False
        self._training = True
        try:
            self._setup()
            try:
                with self._dynamo_settings():
                    self._loop()
            except TrainingInterrupted:
                clean = True  # every rank stopped after the same step
                raise
            except RuntimeError as err:
                # Said now, before the cleanup below: torchrun sends SIGTERM to the
                # surviving ranks once one has died, and it often landed in that cleanup.
                if lost_peer(err):
                    report_lost_peer(err, self.last_checkpoint)
                    self.failure_reported = True
                raise
            finally:
                self._close()
            clean = True
        finally:
            self._training = False
            if self._kept_freed_memory:
                self._kept_freed_memory = not return_freed_memory()
            if self.lock is not None:
                self.lock.release()
            # A DDP wrapper (its reducer holds the process group) goes first, while the
            # group is alive, so the garbage collector does not destroy it later.
            if getattr(self, "model", None) is not getattr(self, "core", None):
                self.model = None
                gc.collect()
            teardown(self.ctx, clean)
        return self.state

    def _setup(self) -> None:
        # Fields assigned since the configuration was built are checked too, and a run
        # retried on this Trainer starts from a clean slate (not the failed attempt's step
        # and data position), or from the checkpoint it resumes.
        self.cfg = self.cfg.validated()
        self.out = Path(self.cfg.run.out).absolute()
        self._reset_run_state()
        cfg, ctx = self.cfg, self.ctx
        self._check_ranks_agree()
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.data, self.model_cfg = open_data(cfg, ctx.world_size)
        # Written to DIR/config.toml: what --resume, generate and export read back from
        # anywhere, so local paths are absolute (the tokenizer is also copied in).
        self.resolved = absolute_paths(dataclasses.replace(
            cfg,
            # asdict, not to_dict: TOML has inf, which to_dict writes as "inf" for JSON.
            model=ModelConfig(cfg.model.variant, model_overrides(self.model_cfg)),
            data=dataclasses.replace(cfg.data, seq_len=self.data.seq_len),
        ))
        if cfg.optim.progressive_weight and not kind_of(self.model_cfg).looped:
            raise ConfigError("optim.progressive_weight needs a looped model: the dense "
                              "baseline has no loops to split")
        ckpt_dir = self._prepare_run_dir()

        # Same seed on every rank: FSDP2 shards each rank's own copy of the initial weights.
        torch.manual_seed(cfg.run.seed)
        # float32 weights whatever the process's default dtype (a notebook's earlier
        # set_default_dtype(float64) trained float64 under run.precision "fp32").
        with default_dtype(torch.float32):
            core = build_model(self.model_cfg)
        if cfg.run.init_from and ckpt_dir is None:  # (checked by the claim already)
            self._init_from(core, cfg.run.init_from)
        if is_looped(core):
            core.recurrent.gradient_checkpointing = cfg.run.gradient_checkpointing
        else:  # the dense baseline recomputes each core block
            core.gradient_checkpointing = cfg.run.gradient_checkpointing
        core.to(ctx.device)
        if cfg.run.keep_freed_memory and ctx.device.type == "cpu":
            self._kept_freed_memory = keep_freed_memory()  # until train() returns
        self.tied = tied_parameters(core)
        if cfg.run.compile is Compile.BLOCKS:
            compile_blocks(core)
        elif cfg.run.compile is Compile.MODEL:
            core.compile()  # in place: parameter names and checkpoints unchanged
        self.model = wrap_model(core, ctx, cfg.run.precision)
        self.core: nn.Module = unwrap(self.model)
        self.optimizer = build_optimizer(self.core, cfg.optim.lr, cfg.optim.weight_decay,
                                         (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
        self.lr_at = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, cfg.run.steps)
        self.loops_at = LoopSchedule.from_config(cfg.schedule, cfg.run.steps, cfg.run.seed)
        if cfg.run.compile is not Compile.OFF:
            self._configure_compile()
        # Dropout and any other sampling differ per rank, reproducibly.
        torch.manual_seed(derived_seed(cfg.run.seed * 1009, ctx.rank, 1))
        random.seed(derived_seed(cfg.run.seed * 1009, ctx.rank, 1))
        if ckpt_dir is not None:
            self._restore(ckpt_dir)

        self.metrics = None
        if ctx.is_main:
            with os_errors("write", self.out / METRICS_FILE):
                self.metrics = open(self.out / METRICS_FILE, "a", buffering=1)
        self.tb = self._tensorboard() if cfg.run.tensorboard and ctx.is_main else None
        # Redrawn every 0.1 s on a terminal; written to a file or pipe (a batch job's log),
        # every 30 s: each redraw is ~100 bytes, tens of MB over a day's run.
        self.bar = tqdm(total=cfg.run.steps, initial=self.state.step, unit="step", desc="train",
                        dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.1 if _isatty(sys.stderr) else 30.0,
                        disable=not (ctx.is_main and cfg.run.progress))
        n_params = sum(p.numel() for p in self.core.parameters())
        mc = self.model_cfg
        kind = (f"dense baseline, {mc.n_layers} blocks" if not is_looped(self.core)
                else f"looped, {mc.n_experts} experts top-{mc.n_experts_per_tok}")
        self._log(f"model: {n_params:,} parameters ({mc.attn_type}, dim {mc.dim}, {kind})  data: "
                  f"{self.data.describe()}  device: {ctx.device} x{ctx.world_size} "
                  f"({cfg.run.parallel.value}, {cfg.run.precision.value})  out: {self.out}")
        if is_looped(self.core) and mc.n_experts_per_tok == 1 and not cfg.optim.aux_weight:
            self._log("warning: with top-1 routing the gate renormalised over the chosen "
                      "expert is always 1, so the language-model loss gives the router no "
                      "gradient, and with optim.aux_weight = 0 its weights never train "
                      "(the router bias still balances the load); set optim.aux_weight > 0 "
                      "or model.n_experts_per_tok >= 2")
        for line in _schedule_warnings(cfg, is_looped(self.core), mc.use_act):
            self._log("warning: " + line)
        if is_looped(self.core) and mc.use_act and cfg.schedule.backprop_loops == 1:
            if not cfg.optim.progressive_weight:  # its forward differentiates k loops
                self._log("warning: schedule.backprop_loops = 1 with ACT on differentiates "
                          "only the last loop, which takes the remaining halting mass whatever "
                          "the halting head says: the head gets no gradient (the ponder "
                          "penalty included) and never trains; use backprop_loops >= 2")
            elif cfg.optim.ponder_weight:
                self._log("warning: schedule.backprop_loops = 1 with ACT on differentiates "
                          "only the last loop of the main objective, which takes the remaining "
                          "halting mass: optim.ponder_weight has no effect (the halting head "
                          "trains through the progressive term's cross-entropy only); use "
                          "backprop_loops >= 2")

    def _check_ranks_agree(self) -> None:
        """Raise ``ConfigError`` on every rank if the processes were given different
        configurations (each rank parses its own command line and files): with another
        learning rate the DDP replicas drift apart silently, with another step count or
        evaluation interval the collectives mismatch and hang or abort."""
        configs = gather_objects(self.cfg, self.ctx)
        error = None
        if configs is not None and len(configs) > 1:
            differ = [(rank, changed_keys(configs[0], other, ignore=("run.progress",)))
                      for rank, other in enumerate(configs) if rank]
            differ = [(rank, keys) for rank, keys in differ if keys]
            if differ:
                error = ConfigError(
                    "the processes were given different configurations (every rank must "
                    "run the same command with the same files): "
                    + "; ".join(f"rank {rank} (against rank 0): {', '.join(keys[:4])}"
                                + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                                for rank, keys in differ[:3]))
        error = broadcast_object(error, self.ctx)
        if error is not None:
            raise error

    def _prepare_run_dir(self) -> Path | None:
        """Claim the run directory on rank 0 (:meth:`_claim_run_dir`); returns the checkpoint
        to resume from on every rank, or raises rank 0's error on every rank."""
        error, ckpt = None, None
        if self.ctx.is_main:
            try:
                ckpt = self._claim_run_dir()
            except (ConfigError, RunDirError) as err:
                error = err
        error, ckpt = broadcast_object((error, ckpt), self.ctx)
        if error is not None:
            raise error
        return ckpt

    def _claim_run_dir(self) -> Path | None:
        """Lock the run directory, check it against the resume mode (and, to resume, that the
        model is unchanged), write the resolved config, and move any metrics rows after the
        step the run continues from to ``metrics.replaced.jsonl``. Only the directory and its
        lock file are created when a check fails."""
        out = self.out
        if self.resume is Resume.REQUIRE and not out.exists():
            raise ConfigError(f"nothing to resume: {out} does not exist")
        config_text = to_toml(self.resolved)  # raises ConfigError before anything is made
        with os_errors("create the run directory", out):
            out.mkdir(parents=True, exist_ok=True)
        with os_errors("lock the run directory", out):
            self.lock = RunLock.acquire(out)
        if self.lock.fd is None:
            self._log(f"warning: the filesystem of {out} does not support file locks; nothing "
                      "stops a second run from writing to it")
        elif self.lock.taken_over:
            self._log(f"took over the run lock of {self.lock.taken_over}: that process is gone")
        leftovers = []
        if self.lock.fd is not None:  # (without a lock a second run's writes may be live)
            with os_errors("clean up", out):
                leftovers = remove_interrupted_writes(out)
        if leftovers:
            self._log(f"removed what interrupted writes left: {', '.join(leftovers)}")
        ckpt, problems = newest_intact_checkpoint(out)
        for problem in problems:
            self._log(f"warning: damaged checkpoint: {problem}; "
                      + (f"falling back to {ckpt}" if ckpt else "no intact checkpoint left"))
        metrics = out / METRICS_FILE
        holds_run = ckpt is not None or problems or (metrics.is_file()
                                                     and metrics.stat().st_size > 0)
        if self.resume is Resume.NEVER and holds_run:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it (or "
                              "--resume auto; from Python resume=True or resume='auto') or "
                              "choose another --out (run.out)")
        if problems and ckpt is None:
            raise ConfigError(f"cannot resume {out}: every checkpoint is damaged "
                              f"({'; '.join(problems)}); move {out / CHECKPOINT_DIR} away to "
                              "start the run again")
        if self.resume is Resume.REQUIRE and ckpt is None:
            raise ConfigError(f"nothing to resume in {out}: it has no checkpoint yet; pass "
                              "--resume auto to start it from step 1 (rows already in "
                              f"{METRICS_FILE} move to {REPLACED_METRICS_FILE}) or choose "
                              "another --out")
        if ckpt is not None and read_model_config(ckpt) != self.model_cfg:
            saved_cfg = read_model_config(ckpt)
            saved, now = config_dict(saved_cfg), config_dict(self.model_cfg)
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ConfigError(f"cannot resume {ckpt}: the model configuration changed ({diff})")
        if ckpt is not None:
            self._config_changes = self._changes_since(ckpt)
        if ckpt is None and self.cfg.run.init_from:  # before anything is written
            self._precheck_init_from(self.cfg.run.init_from)
        step = 0 if ckpt is None else int(read_trainer_state(ckpt)["step"])
        if step > self.cfg.run.steps:
            # Resuming would do nothing and rewrite config.toml with the smaller count, so a
            # later plain --resume would stop there too.
            raise ConfigError(f"cannot resume {ckpt} at step {step} with run.steps="
                              f"{self.cfg.run.steps}: pass a total of at least {step} steps")
        with os_errors("write to", out):
            write_text_atomic(out / CONFIG_FILE, config_text)
            copy_tokenizer(self.resolved, out)
            moved = replace_metrics_after(out, step)
        if moved:
            self._log(f"moved {moved} rows of {METRICS_FILE} logged after step {step} "
                      f"(by a run that did not save them) to {REPLACED_METRICS_FILE}")
        return ckpt

    def _init_from_source(self, path: str) -> tuple[Any, Path, Any]:
        """``(format, directory, configuration)`` of ``run.init_from``, checked to hold a
        model of this run's kind."""
        from ..checkpoints import detect_format, read_config

        try:
            fmt, ckpt = detect_format(path)
            their_cfg = read_config(ckpt)[0]
            theirs = kind_of(their_cfg)
        except (FileNotFoundError, ValueError) as err:  # CheckpointCorrupt is a ValueError
            raise ConfigError(f"run.init_from: {err}") from None
        ours = kind_of(self.model_cfg)
        if theirs is not ours:
            raise ConfigError(f"run.init_from={path!r} holds a {theirs.name} model, this run "
                              f"trains a {ours.name} one")
        return fmt, ckpt, their_cfg

    def _check_init_from_fits(self, path: str, own: dict[str, torch.Size],
                              theirs: dict[str, torch.Size], their_cfg: Any) -> None:
        """Raise ``ConfigError`` unless tensors ``theirs`` (name -> shape) fill ``own``."""
        wrong = [f"{k} {tuple(theirs[k])} != {tuple(v)}"
                 for k, v in own.items() if k in theirs and theirs[k] != v]
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        if wrong or missing or unexpected:
            # The configuration fields that differ say why (a dim change alone mis-sizes
            # dozens of tensors); the first tensors are named as well.
            mine, other = self.model_cfg.to_dict(), their_cfg.to_dict()
            fields = [f"{k}: {other.get(k)!r} there, {mine[k]!r} here" for k in mine
                      if other.get(k) != mine[k]]
            tensors = [*wrong[:3], *(f"missing {k}" for k in missing[:3]),
                       *(f"unexpected {k}" for k in unexpected[:3])]
            raise ConfigError(f"run.init_from={path!r} does not fit this model"
                              + (f" ({'; '.join(fields)})" if fields else "")
                              + f": {', '.join(tensors)}"
                              + (" ..." if len(wrong) + len(missing) + len(unexpected) > 9
                                 else ""))

    def _precheck_init_from(self, path: str) -> None:
        """What :meth:`_init_from` checks, without reading a tensor: run by the claim before
        it writes anything, so that a refused ``run.init_from`` leaves the run directory as
        it was. A training checkpoint's files were verified against its manifest, and its
        configuration gives the shapes (models on the meta device); a Hugging Face
        directory's shapes come from its weights files' headers (which also finds them
        missing or truncated)."""
        from ..checkpoints import CheckpointFormat, read_hf_shapes

        fmt, ckpt, their_cfg = self._init_from_source(path)
        with torch.device("meta"):
            ours = build_model(self.model_cfg)
            if fmt is CheckpointFormat.TRAINING:
                theirs = _untied_shapes(build_model(their_cfg))
            else:
                try:
                    theirs = read_hf_shapes(ckpt)
                except (FileNotFoundError, ValueError, KeyError) as err:
                    raise ConfigError(f"run.init_from: {_message(err)}") from None
        self._check_init_from_fits(path, _untied_shapes(ours), theirs, their_cfg)

    def _init_from(self, core: nn.Module, path: str) -> None:
        """Load the model weights of another run or of a Hugging Face directory
        (``run.init_from``) into ``core``."""
        from ..checkpoints import read_weights

        fmt, ckpt, their_cfg = self._init_from_source(path)
        try:
            state = read_weights(fmt, ckpt)
        except (FileNotFoundError, ValueError, KeyError) as err:  # e.g. no weights there
            raise ConfigError(f"run.init_from: {_message(err)}") from None
        self._check_init_from_fits(path, _untied_shapes(core),
                                   {k: v.shape for k, v in state.items()}, their_cfg)
        core.load_state_dict(state, strict=False)
        self._log(f"initialised the model from {ckpt}")

    def _restore(self, ckpt_dir: Path) -> None:
        """Load a checkpoint of either layout (written at any world size) into the model,
        the optimizer, the counters and this rank's RNG. (_claim_run_dir has just verified
        every file against the manifest.)"""
        ctx = self.ctx
        # The checkpoint restores the optimizer's state (moments, step counts); its
        # hyper-parameters are this run's configuration, which a resume may change
        # (weight decay, betas, eps; the learning rate is set every step).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if is_sharded(ckpt_dir):
            # Every rank reads the chunks of its own shards (DCP reshards to this world size).
            load_sharded_checkpoint(self.model, self.optimizer, ckpt_dir, self.tied)
            trainer_state = broadcast_object(
                read_trainer_state(ckpt_dir) if ctx.is_main else None, ctx)
        else:
            # Rank 0 reads the files; the states are broadcast (no shared filesystem needed).
            ckpt = read_training_checkpoint(ckpt_dir, verify=False) if ctx.is_main else None
            from_rank0 = ctx.distributed
            restore_model_state(self.model, ckpt.model_state if ctx.is_main else {}, self.tied,
                                from_rank0)
            restore_optimizer_state(self.model, self.optimizer,
                                    ckpt.optimizer_state if ctx.is_main else {}, from_rank0)
            trainer_state = broadcast_object(ckpt.trainer_state if ctx.is_main else None, ctx)
        for group, configured in zip(self.optimizer.param_groups, hyper, strict=True):
            group.update(configured)
        self.state = TrainState(
            step=int(trainer_state["step"]), position=int(trainer_state["position"]),
            # (checkpoints before 2026-12-04 hold no count: their global batch is assumed)
            sequences=int(trainer_state.get("sequences",
                                            int(trainer_state["position"]) * self._global_batch)),
            bad_steps=int(trainer_state["bad_steps"]),
            consecutive_bad=int(trainer_state["consecutive_bad"]))
        rngs = trainer_state["rng"]
        reseeded = ""
        if len(rngs) == ctx.world_size:
            set_rng_state(rngs[ctx.rank], ctx.device)
        else:  # resumed on another number of processes: reseed deterministically
            torch.manual_seed(derived_seed(self.cfg.run.seed * 1009, self.state.step * 7919,
                                           ctx.rank))
            reseeded = (f"; written by {len(rngs)} process(es), resumed on {ctx.world_size}: "
                        "the random streams are reseeded, so the run is no longer the "
                        "uninterrupted one bit for bit")
        # A streamed source's own position and validation split, one per rank. Every rank
        # reads the whole stream (and keeps its shard of each batch), so on another number
        # of processes rank 0's serves: dropped, the split was rebuilt at the new size and
        # validated on windows already trained on. (From an older checkpoint: none; the
        # stream is replayed up to the batch index.)
        data = trainer_state.get("data") or []
        saved = data[ctx.rank] if len(data) == ctx.world_size else data[0] if data else {}
        if saved and not self.data.keeps_state:  # the run now reads another kind of source
            self._log(f"warning: {ckpt_dir} holds the position of a streamed data source, "
                      f"but this run reads other data ({self.data.describe()}): it "
                      "continues from the batch index alone")
        else:
            self.data.load_state_dict(saved)
        self.last_checkpoint = self._unproven = ckpt_dir
        changes = self._config_changes  # (found by rank 0, which logs)
        self._log(f"resumed from {ckpt_dir} at step {self.state.step}" + reseeded
                  + (f"; configuration changed since it was saved: {'; '.join(changes)}"
                     if changes else ""))
        data_changed = self._data_changed(trainer_state)
        if data_changed:
            self._log(f"warning: the validation batches are not those the run evaluated on "
                      f"up to step {self.state.step} (its data files changed since?): "
                      "val_loss from here on is not comparable with the rows before, and "
                      "the training batches may differ too")
        if ctx.is_main:
            with os_errors("write to", self.out):
                record_resume(self.out, {
                    "step": self.state.step, "checkpoint": ckpt_dir.name,
                    "world_size": ctx.world_size, "changes": changes,
                    "data_changed": data_changed})
        saved_batch = trainer_state.get("global_batch")
        if saved_batch is None:  # before 2026-12-05: from its configuration and rank count
            saved_batch = self._saved_global_batch(ckpt_dir, len(rngs))
        if saved_batch is not None and int(saved_batch) != self._global_batch:
            self._log(self._global_batch_changed(int(saved_batch)))

    def _data_changed(self, trainer_state: dict) -> bool:
        """Whether this run's validation batches differ from those the checkpoint's run
        evaluated on (its fingerprint, recorded since 2026-12-07), on rank 0: the data
        files changed between the two. Not checked where the data configuration, the seed
        or the number of processes changed (the batches differ by design, and the change
        is logged). A change that leaves the validation batches as they were (an edit
        inside the training part of a corpus, of the same length) goes unnoticed."""
        recorded = trainer_state.get("val_fingerprint")
        if (not self.ctx.is_main or recorded is None
                or int(trainer_state.get("world_size", 1)) != self.ctx.world_size
                or any(change.startswith(("data.", "run.seed:"))
                       for change in self._config_changes)):
            return False
        self._val_fingerprint = val_fingerprint(self.data, iter_val_batches(
            self.data, self.cfg.data.eval_batches, self.ctx.world_size))
        return self._val_fingerprint is not None and self._val_fingerprint != recorded

    def _changes_since(self, ckpt: Path) -> list[str]:
        """The keys of this run's resolved configuration whose values differ from the one
        ``ckpt`` was trained with (``["optim.lr: 0.001 -> 0.01", ...]``; the run is then no
        longer the uninterrupted one); [] when the checkpoint's cannot be read."""
        try:
            saved = load_config(ckpt / TRAIN_CONFIG_FILE)
        except (ConfigError, OSError):
            return []
        return changed_keys(saved, self.resolved, ignore=("run.out", "run.progress"))

    @staticmethod
    def _saved_global_batch(ckpt: Path, world_size: int) -> int | None:
        """The global batch a checkpoint that does not record it was trained with: its
        configuration's batch size and accumulation times its number of processes (None
        when its configuration cannot be read)."""
        try:
            saved = load_config(ckpt / TRAIN_CONFIG_FILE)
        except (ConfigError, OSError):
            return None
        return saved.data.batch_size * saved.optim.grad_accum * world_size

    def _global_batch_changed(self, saved: int) -> str:
        """The warning for a run resumed with another global batch than it saved with."""
        per_rank = self.ctx.world_size * self.cfg.optim.grad_accum
        keep = (f"--batch-size {saved // per_rank} keeps it" if saved % per_rank == 0 else
                f"no --batch-size keeps it on {self.ctx.world_size} process(es) x "
                f"{self.cfg.optim.grad_accum} accumulation step(s)")
        return (f"warning: the global batch changes from {saved} to {self._global_batch} "
                f"sequences per step (data.batch_size {self.data.batch_size} x "
                f"{self.ctx.world_size} process(es) x optim.grad_accum "
                f"{self.cfg.optim.grad_accum}); the run is no longer the one it would have "
                f"been ({keep})")

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("run.tensorboard needs the 'tensorboard' package "
                              "(pip install 'open-mythos[tensorboard]')") from None
        with os_errors("write", self.out / "tensorboard"):
            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.state.step + 1)
        _quiet_writer_thread_errors()
        return writer

    def _close(self) -> None:
        for name in ("bar", "metrics", "tb"):
            obj = getattr(self, name, None)
            if obj is not None:
                # Every metrics line is flushed as written: a close error (a full disk) has
                # already been raised, and must not replace that message.
                with contextlib.suppress(OSError):
                    obj.close()

    def _configure_compile(self) -> None:
        """Make room for this run's graphs in the process's recompilation limit, which
        dynamo counts per code object over every model that runs that code: ``run.compile
        = "model"`` compiles a graph per loop count (and per progressive split; evaluation
        adds one), "blocks" a few per block. Each run adds its graphs to the limit (a
        notebook that trains models of several shapes compiled them all; with the limit
        set to one run's count, the fifth shape fell back to eager), so that none falls
        back to eager; the cost is said when the schedule samples several counts."""
        counts = len(self.loops_at.loop_counts()) if is_looped(self.core) else 1
        if self.cfg.run.compile is Compile.MODEL:
            graphs = counts * (2 if self.cfg.optim.progressive_weight else 1) + 1
        else:  # the loop body's two graphs (three at batch 1), in training and evaluation
            graphs = 6
        if self.cfg.data.task:  # batches with and without padding (an attention_mask or None)
            graphs *= 2
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, getattr(config, name) + graphs + 2)  # + 2: a last short batch
        if counts > 2 and self.cfg.run.compile is Compile.MODEL:
            self._log(f"run.compile='model': this schedule trains at {counts} loop counts, "
                      f"each compiled as its own graph when first drawn (tens of seconds "
                      f"each); 'blocks' compiles one loop body for every count")

    @contextlib.contextmanager
    def _dynamo_settings(self) -> Iterator[None]:
        """While this run trains or evaluates with ``run.compile = "model"``: loop counts
        are the graph's structure, so integer inputs are specialised (dynamo would
        otherwise make a count that changed between calls symbolic, and guard on every
        comparison made with it). Restored afterwards: the process's other compiled code
        (a user's own) is not affected."""
        if self.cfg.run.compile is not Compile.MODEL:
            yield
            return
        with torch._dynamo.config.patch(specialize_int=True):
            yield

    def _log(self, msg: str) -> None:
        if self.ctx.is_main:
            # A broken stderr (``| tee`` killed by the same Ctrl-C) must not end the run.
            with contextlib.suppress(OSError):
                tqdm.write(msg, file=sys.stderr)

    # The loop ---------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        # Under FSDP2 the MixedPrecisionPolicy casts parameters instead of autocast.
        enabled = (self.cfg.run.precision is Precision.BF16
                   and self.cfg.run.parallel is not Parallel.FSDP)
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    @contextlib.contextmanager
    def _stop_on_signal(self) -> Iterator[None]:
        """On the main thread, the first SIGINT (Ctrl-C) or SIGTERM (what a scheduler or
        ``torchrun`` sends before a kill) asks the loop to stop after a whole step and save
        it. A second Ctrl-C acts as before (stops at once, unsaved); a repeated SIGTERM is
        ignored (a scheduler and ``torchrun`` may each send one; their SIGKILL follows
        anyway). A signal the process ignores (``SIG_IGN``: a job started with ``&``) stays
        ignored. Under ``torchrun`` the ranks agree on the step through the step's
        all-reduce (:meth:`_accumulate_gradients`): a rank that was not signalled stops with
        the others. Off the main thread signals cannot be handled and interrupt as usual.

        The handler only records the signal: it runs in the middle of whatever the step is
        doing, and a write there (to a pipe whose reader the same Ctrl-C killed) would fail
        the step."""
        self._stop_signal = self._agreed_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        handled = [sig for sig in STOP_SIGNALS if previous[sig] is not signal.SIG_IGN]
        deliveries = _SignalCounter()

        def ask(signum: int, frame: Any) -> None:
            if not self._stop_signal:
                self._stop_signal = signum
            if signum == signal.SIGINT:  # a second Ctrl-C: what it did before
                signal.signal(signum, previous[signum] or signal.default_int_handler)
                if deliveries.take(signum) > 1:
                    # Both came during one long operation (a backward pass), which runs
                    # the handler once: the second acts now.
                    signal.raise_signal(signum)

        for sig in handled:
            signal.signal(sig, ask)
        try:
            with deliveries:
                yield
        finally:
            for sig in handled:
                if signal.getsignal(sig) is ask:
                    signal.signal(sig, previous[sig] if previous[sig] is not None
                                  else signal.SIG_DFL)

    def _loop(self) -> None:
        with self._stop_on_signal():
            self._steps()

    @property
    def stop_signal(self) -> int:
        """The signal (SIGINT, SIGTERM) that asked this process to stop after a step; 0 when
        none did."""
        return self._stop_signal

    def _stop_agreed(self) -> int:
        """The signal that stops the run after this step (0: none). In a single process
        the handler's; under ``torchrun`` the one this step's all-reduce agreed on, so that
        every rank stops (and saves) after the same step."""
        if self.ctx.distributed:
            return self._agreed_signal
        return self._stop_signal

    def _steps(self) -> None:
        cfg = self.cfg
        while self.state.step < cfg.run.steps:
            self._mid_step = True
            try:
                row = self._train_step()
            except (DataExhausted, DataUnreadable) as err:
                self._mid_step = False  # its batch could not be read: nothing of it was done
                raise type(err)(f"{err}, in step {self.state.step + 1} of {cfg.run.steps}; "
                                f"{self._save_before_stopping()}") from None
            self._mid_step = False
            step = self.state.step
            self._judge_checkpoint(row["skipped"])
            if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                row.update(self.evaluate())
            self._record(row)
            if self.on_step is not None:
                self.on_step(step, row)
            self._check_health(row)
            stop = self._stop_agreed()  # read once: a signal may arrive at any bytecode
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.steps:
                if not self.state.consecutive_bad:
                    self.save()
                elif step == cfg.run.steps:
                    raise TrainingDiverged(self._diverged(
                        f"the run ended on {self.state.consecutive_bad} skipped steps (non-finite "
                        f"loss or gradient norm); its final state at step {step} was not saved"))
                else:
                    self._log(f"step {step}: no checkpoint: the last "
                              f"{self.state.consecutive_bad} steps were skipped")
            if stop and step < cfg.run.steps:  # (after the last step the run is complete)
                again = " (Ctrl-C again to stop at once, unsaved)" if stop == signal.SIGINT else ""
                self._log(f"{signal.Signals(stop).name}: stopping after step {step}{again}")
                saved = self._save_unless_saved()
                raise TrainingInterrupted(step, self.last_checkpoint if saved else None, stop)

    def _step_saved(self) -> bool:
        """Whether the newest checkpoint holds the last completed step."""
        return (self.last_checkpoint is not None
                and self.last_checkpoint.name == f"step_{self.state.step:08d}")

    def _save_unless_saved(self) -> bool:
        """Save the last completed step unless it is saved or was skipped; whether it is
        saved now."""
        if self._step_saved():
            return True
        if not self.state.step or self.state.consecutive_bad:
            return False
        self.save()
        return True

    def _save_before_stopping(self) -> str:
        """Save the last completed step unless it is saved (or was skipped); say where it is."""
        step = self.state.step
        if self._save_unless_saved():
            return f"the {step} steps done are saved in {self.last_checkpoint}"
        return (f"nothing saved since {self.last_checkpoint}" if self.last_checkpoint
                else "no step was completed")

    def _check_health(self, row: dict[str, Any]) -> None:
        """Raise :class:`TrainingDiverged` after ``run.max_bad_steps`` skipped steps in a row
        or on a non-finite validation loss."""
        step, bad = row["step"], self.state.consecutive_bad
        if bad >= self.cfg.run.max_bad_steps:
            raise TrainingDiverged(self._diverged(
                f"{bad} consecutive steps (up to step {step}) had a non-finite loss or "
                "gradient norm and were skipped; stopping"))
        if "val_loss" in row and not math.isfinite(row["val_loss"]):
            raise TrainingDiverged(self._diverged(
                f"the validation loss at step {step} is {row['val_loss']}"))

    def _judge_checkpoint(self, skipped: bool) -> None:
        """The step after a checkpoint tells whether its weights are good (a finite loss)."""
        if self._unproven is not None:
            if skipped:
                self._bad_checkpoint = self._unproven
            else:
                self.good_checkpoint = self._unproven
            self._unproven = None

    def _diverged(self, what: str) -> str:
        """``what``, the last good checkpoint, and advice; on rank 0, ``latest`` is pointed
        back at that checkpoint if a newer one holds weights that gave a non-finite loss."""
        good, bad = self.good_checkpoint, self._bad_checkpoint
        if good is not None and not good.is_dir():
            good = None  # pruned since (run.keep_checkpoints)
        note = (f"The last good checkpoint is {good}" if good is not None else
                "No checkpoint of this session is known to be good")
        if bad is not None and (good is None or bad.name > good.name):
            note += f"; {bad} holds the weights that first gave a non-finite loss"
            if good is not None and self.ctx.is_main:
                try:
                    point_latest(self.out, good)
                    note += f" (`latest` now names {good.name})"
                except OSError as err:
                    note += f" (`latest` still names it: {err.strerror or err})"
        return (f"{what}. {note}. Try a lower optim.lr, a smaller optim.grad_clip, or fp32.")

    def _train_step(self) -> dict[str, Any]:
        """One optimiser step: fetch, forward/backward every micro-batch, clip, update or skip."""
        t0 = time.perf_counter()
        step = self.state.step
        n_loops = self.loops_at(step)
        micro, n_sup, n_real = self._fetch_micro_batches()
        sums = self._accumulate_gradients(micro, step, n_loops, n_sup, n_real)
        grad_norm = self._clip_gradients()
        lr = self.lr_at(step)
        good = math.isfinite(sums.objective) and math.isfinite(grad_norm)
        balance = self._apply_update(lr) if good else self._skip_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return self._step_row(sums, n_sup, lr, grad_norm, n_loops, balance, good,
                              time.perf_counter() - t0)

    @property
    def _global_batch(self) -> int:
        """Training sequences per optimizer step over all ranks and micro-steps."""
        return self.data.batch_size * self.ctx.world_size * self.cfg.optim.grad_accum

    def _fetch_micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], float, float]:
        """This rank's micro-batches of the step (one shard of the global batch per
        (micro-step, rank)), and the numbers of supervised targets and of real (not
        padding) positions over all ranks."""
        ctx, accum = self.ctx, self.cfg.optim.grad_accum
        shards = accum * ctx.world_size
        micro = [self.data.batch(TRAIN, self.state.position, i * ctx.world_size + ctx.rank, shards,
                                 start=self.state.sequences)
                 for i in range(accum)]
        self.state.position += 1
        self.state.sequences += self._global_batch
        counts = torch.tensor([float(sum(count_targets(b["targets"]) for b in micro)),
                               float(sum(self._real_positions(b) for b in micro))],
                              dtype=torch.float64, device=ctx.device)
        n_sup, n_real = all_reduce(counts, ctx).tolist()
        return micro, n_sup, n_real

    def _real_positions(self, batch: dict[str, torch.Tensor]) -> int:
        """Positions of ``batch`` that are not padding (:meth:`_padding_mask`)."""
        ids = batch["input_ids"]
        return int((ids != PAD_ID).sum()) if self.cfg.data.task else ids.numel()

    def _accumulate_gradients(self, micro: list[dict[str, torch.Tensor]], step: int,
                              n_loops: int, n_sup: float, n_real: float) -> StepSums:
        """Forward and backward of every micro-batch; the loss sums reduced over ranks.

        Raises:
            RuntimeError: the ranks ran different loop counts.
        """
        ctx, accum = self.ctx, self.cfg.optim.grad_accum
        ce_scale, reg_scale = ctx.world_size / max(1.0, n_sup), 1.0 / accum
        # The ponder cost's mean over the real positions of the whole batch (a mean of
        # per-micro-batch means differs once their padding differs).
        ponder_scale = ctx.world_size / max(1.0, n_real)
        self.model.train()
        # objective, ce_sum, ponder, aux, loop_ce_sum; then loops and loops^2 to check that
        # the ranks agree; then the ranks that were asked to stop by SIGINT, by SIGTERM.
        sums = torch.zeros(9, dtype=torch.float64, device=ctx.device)
        for i, batch in enumerate(micro):
            sums[:5] += self._micro_step(batch, step, i, n_loops, ce_scale, reg_scale,
                                         sync=i == accum - 1, ponder_scale=ponder_scale)
        asked = self._stop_signal
        sums[5:] = torch.tensor([n_loops, n_loops**2, asked == signal.SIGINT,
                                 asked == signal.SIGTERM], dtype=torch.float64)
        all_reduce(sums, ctx)
        objective, ce, ponder, aux, loop_ce, loops_sum, loops_sq, by_int, by_term = sums.tolist()
        self._agreed_signal = (signal.SIGTERM if by_term else signal.SIGINT if by_int else 0)
        # Equal counts on all ranks <=> W * sum(x^2) == sum(x)^2 (Cauchy-Schwarz); the sums
        # are global, so every rank reaches the same verdict.
        if ctx.world_size * loops_sq != loops_sum**2:
            raise RuntimeError(f"ranks disagree on the loop count at step {step}")
        w = ctx.world_size
        return StepSums(objective / w, ce, ponder / w, aux / w, loop_ce)

    def _clip_gradients(self) -> float:
        """Clip to ``optim.grad_clip`` (0: no clipping) and return the global gradient norm."""
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.core.parameters(),
                                                   clip if clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        return float(grad_norm)

    def _apply_update(self, lr: float) -> float | None:
        """The optimiser step, then one router-bias balancing step per MoE layer from the
        loads reduced over ranks; returns the worst layer's max/mean expert load."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        loads = [moe.update_router_bias(load=load) for moe, load in
                 zip(self.core.moe_layers(), reduced_expert_loads(self.core, self.ctx))]
        self.state.consecutive_bad = 0
        return max((float(load.max() / load.mean()) for load in loads if load.sum() > 0),
                   default=None)

    def _skip_update(self) -> None:
        """Count a non-finite step; it never happened, so drop the loads its forwards
        accumulated."""
        for moe in self.core.moe_layers():
            moe.load_since_update.zero_()
        self.state.bad_steps += 1
        self.state.consecutive_bad += 1

    def _step_row(self, sums: StepSums, n_sup: float, lr: float, grad_norm: float,
                  n_loops: int, balance: float | None, good: bool,
                  elapsed: float) -> dict[str, Any]:
        """The metrics row of the step just taken."""
        opt = self.cfg.optim
        tokens = self._global_batch * self.data.seq_len
        looped = is_looped(self.core)  # a dense baseline has no loops to log: null
        return {
            "step": self.state.step,
            "loss": _finite_or_none(sums.objective),
            "ce": _finite_or_none(sums.ce_sum / max(1.0, n_sup)),
            "ponder": _finite_or_none(sums.ponder) if looped else None,
            "aux": _finite_or_none(sums.aux),
            **({"loop_ce": _finite_or_none(sums.loop_ce_sum / max(1.0, n_sup))}
               if opt.loop_loss_weight else {}),
            "lr": lr,
            "grad_norm": _finite_or_none(grad_norm),
            "loops": n_loops if looped else None,
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "expert_load_max_over_mean": balance,
            "skipped": not good,
            "bad_steps": self.state.bad_steps,
        }

    def _micro_step(self, batch: dict[str, torch.Tensor], step: int, micro: int, n_loops: int,
                    ce_scale: float, reg_scale: float, sync: bool,
                    ponder_scale: float | None = None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its float64 sums
        ``(objective, ce_sum, ponder, aux, loop_ce_sum)`` (``ponder`` and ``aux`` scaled).

        The objective is the cross-entropy of the output plus the regularisers, plus
        ``optim.loop_loss_weight`` times the per-loop readout loss; with
        ``optim.progressive_weight = alpha`` it is ``(1 - alpha)`` times that, and a second
        forward (``n`` loops without gradient, ``k`` with) adds ``alpha`` times its
        cross-entropy, backpropagated separately (each forward has its own backward, which
        DDP requires); gradients are synchronised on the last backward of the last micro-step.
        """
        ctx, alpha = self.ctx, self.cfg.optim.progressive_weight
        x = batch["input_ids"].to(ctx.device, non_blocking=True)
        y = batch["targets"].to(ctx.device, non_blocking=True)
        rows, y_at = self._scored(batch, y)
        mask = self._padding_mask(batch, ctx.device)
        with gradient_sync(self.model, ctx, enabled=sync and not alpha):
            with self._autocast():
                objective, parts, loop_ce = self._objective(batch, x, y, n_loops, ce_scale,
                                                            reg_scale, rows, y_at, mask,
                                                            ponder_scale)
                objective = (1.0 - alpha) * objective
            if self.loss_hook is not None:
                hooked = self.loss_hook(step + 1, objective)  # the step being made
                if not isinstance(hooked, torch.Tensor):
                    raise TypeError(f"loss_hook must return the objective (a tensor), got "
                                    f"{type(hooked).__name__}: does it end with 'return'?")
                objective = hooked
            objective.backward()
        total = objective.detach().double()
        if alpha:
            total = total + self._progressive_backward(x, y_at, step, n_loops, ce_scale,
                                                       sync, rows, mask)
        ponder = (parts.ponder * reg_scale if ponder_scale is None
                  else parts.ponder_sum * ponder_scale)
        return torch.stack([total, parts.ce_sum.double(), ponder.double(),
                            (parts.aux * reg_scale).double(), loop_ce]).to(ctx.device)

    def _scored(self, batch: dict[str, torch.Tensor], y: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(rows, y_at)``: the flat positions whose logits are computed (task batches, a
        few positions per sequence: :func:`~.losses.supervised_rows`, indexed from the host
        copy of the targets, so a GPU does not synchronise; None: every position) and the
        targets ``y`` (on the device) at them."""
        rows = supervised_rows(batch["targets"])
        if rows is None:
            return None, y
        rows = rows.to(y.device, non_blocking=True)
        return rows, y.flatten()[rows]

    def _padding_mask(self, batch: dict[str, torch.Tensor], device: torch.device
                      ) -> torch.Tensor | None:
        """(B, T) bool, False at a task batch's padding, for the model's ``attention_mask``
        (None when the batch holds none, and for text, which is packed). Padding then stays
        out of the MoE load and balance loss and out of the ponder cost: counted, the
        router learnt to send it to a few experts while the load looked even, and the real
        tokens' load stayed uneven. Read from the host copy of the batch (no device sync)."""
        if not self.cfg.data.task:
            return None
        real = batch["input_ids"] != PAD_ID
        if bool(real.all()):
            return None  # one attention kernel without a mask (equal-length prompts)
        return real.to(device, non_blocking=True)

    def _objective(self, batch: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   n_loops: int, ce_scale: float, reg_scale: float,
                   rows: torch.Tensor | None, y_at: torch.Tensor,
                   mask: torch.Tensor | None = None, ponder_scale: float | None = None
                   ) -> tuple[torch.Tensor, LossParts, torch.Tensor]:
        """The forward of one micro-batch: (objective, its parts, the detached per-loop
        readout cross-entropy sum, zero without ``optim.loop_loss_weight``). ``rows`` and
        ``y_at``: the positions whose logits are computed and their targets
        (:meth:`_scored`); ``y``: every position's targets, for the per-loop readouts;
        ``mask``: :meth:`_padding_mask`."""
        opt, backprop = self.cfg.optim, self.cfg.schedule.backprop_loops
        loop_ce = torch.zeros((), dtype=torch.float64, device=x.device)
        if opt.loop_loss_weight:
            depths = readout_depths(self.core.max_readout_depth(n_loops), opt.loop_loss_last)
            # The head lens reads out the supervised positions only (cheap).
            head_lens = opt.loop_readout == "head"
            out = self.model(x, n_loops=n_loops, backprop_loops=backprop, readout_depths=depths,
                             readout_lens="none" if head_lens else "coda", logits_at=rows,
                             attention_mask=mask)
            logits = out.logits
            trace = batch["trace"].to(x.device) if opt.loop_targets else None
            start = batch["answer_start"].to(x.device) if opt.loop_targets else None
            loop_sum = loop_readout_ce_sum(
                out.states if head_lens else out.depth_logits, y,
                loop_weights(depths, depths[-1], opt.loop_loss_gamma), trace, start,
                head=(lambda h: self.core.head(self.core.norm(h))) if head_lens else None,
                rows=rows, output_depth=None if head_lens else n_loops)
            loop_ce = loop_sum.detach().double()
        else:
            logits = self.model(x, n_loops=n_loops, backprop_loops=backprop, logits_at=rows,
                                attention_mask=mask)
        parts = compute_loss(logits, y_at, self._ponder_cost(), self.core.aux_loss,
                             ponder_weight=opt.ponder_weight, aux_weight=opt.aux_weight,
                             ce_scale=ce_scale, reg_scale=reg_scale, token_mask=mask,
                             ponder_scale=ponder_scale)
        objective = parts.objective
        if opt.loop_loss_weight:
            objective = objective + opt.loop_loss_weight * ce_scale * loop_sum
        return objective, parts, loop_ce

    def _progressive_backward(self, x: torch.Tensor, y_at: torch.Tensor, step: int,
                              n_loops: int, ce_scale: float, sync: bool,
                              rows: torch.Tensor | None,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
        """The progressive term (``n`` loops without gradient, ``k`` with), weighted by
        ``optim.progressive_weight`` and backpropagated; returns its detached value.
        ``rows``, ``y_at``, ``mask`` as for :meth:`_objective`."""
        n_free, k = progressive_split(self.cfg.run.seed, step, n_loops)
        with gradient_sync(self.model, self.ctx, enabled=sync), self._autocast():
            logits = self.model(x, n_loops=n_free + k, backprop_loops=k, logits_at=rows,
                                attention_mask=mask)
            progressive = (self.cfg.optim.progressive_weight * ce_scale
                           * cross_entropy_sum(logits, y_at))
            progressive.backward()
        return progressive.detach().double()

    @torch.no_grad()
    def _ponder_cost(self) -> torch.Tensor | None:
        return self.core.recurrent.last_ponder_cost if is_looped(self.core) else None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and next-token accuracy on ``data.eval_batches`` validation batches at
        ``schedule.eval_loops`` loops (all ranks take part; the result is global).

        Without autograd: with it, every batch's graph stayed alive until the pass ended
        (validation memory grew by a forward's activations per batch).

        Raises:
            RuntimeError: before :meth:`train` (the model and data are built there).
        """
        self._require_trained("evaluate")
        cfg, ctx = self.cfg, self.ctx
        # FSDP2 needs its hooks to gather parameters; DDP's wrapper adds nothing to a forward.
        model = self.model if cfg.run.parallel is Parallel.FSDP else self.core
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # ce, tokens, correct
        try:
            for i in range(cfg.data.eval_batches):
                batch = self.data.batch(VAL, i, ctx.rank, ctx.world_size)
                x = batch["input_ids"].to(ctx.device)
                rows, y = self._scored(batch, batch["targets"].to(ctx.device))
                with self._autocast(), self._dynamo_settings():
                    logits = model(x, n_loops=cfg.schedule.resolved_eval_loops, logits_at=rows)
                mask = y != IGNORE_INDEX
                sums += torch.stack([cross_entropy_sum(logits, y).double(), mask.sum().double(),
                                     ((logits.argmax(-1) == y) & mask).sum().double()])
            all_reduce(sums, ctx)
        finally:
            model.train()
        ce, n, correct = sums.tolist()
        return {"val_loss": ce / max(1.0, n), "val_acc": correct / max(1.0, n),
                "val_loops": cfg.schedule.resolved_eval_loops if is_looped(self.core) else None}

    def _record(self, row: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        line = json.dumps({k: _finite_or_none(v) if isinstance(v, float) else v
                           for k, v in row.items()})
        with os_errors("write", self.out / METRICS_FILE):
            self.metrics.write(line + "\n")
        step = row["step"]
        with contextlib.suppress(OSError):  # the bar writes to stderr: see _log
            self.bar.update(1)
        if step % self.cfg.run.log_every == 0 or "val_loss" in row or row["skipped"]:
            loss = "nan" if row["loss"] is None else f"{row['loss']:.4f}"
            with contextlib.suppress(OSError):
                loops = "" if row["loops"] is None else f"  loops {row['loops']}"
                self.bar.set_postfix_str(f"loss {loss}  tok/s {row['tokens_per_s']:,.0f}"
                                         f"{loops}  lr {row['lr']:.2e}", refresh=False)
            if self.tb is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                        self.tb.add_scalar(f"train/{key}" if not key.startswith("val_")
                                           else f"val/{key[4:]}", value, step)
        if "val_loss" in row:
            depth = "" if row["val_loops"] is None else f"  ({row['val_loops']} loops)"
            self._log(f"step {step}: val_loss {row['val_loss']:.4f}  val_acc "
                      f"{row['val_acc']:.3f}{depth}")

    def save(self) -> None:
        """Write a checkpoint of the current state (collective: every rank calls it): sharded
        under FSDP2 (:mod:`.sharded`), else gathered to rank 0.

        Raises:
            TrainingDiverged: the weights are not finite (nothing is written).
            RunDirError: the checkpoint could not be written (a full disk...).
            RuntimeError: before :meth:`train`; after a run stopped in the middle of a step
                (its data position is ahead of its weights); after :meth:`train`, when the
                run directory holds a newer checkpoint (another trainer continued the run:
                saving would prune its checkpoints and move ``latest`` back).
            RunLocked: after :meth:`train`, another process writes the run directory.
        """
        self._require_trained("save")
        if self._mid_step:
            last = (f"its last checkpoint is {self.last_checkpoint}: resume from that "
                    "(Trainer(cfg, resume=True))" if self.last_checkpoint is not None
                    else "it wrote no checkpoint: start it again")
            raise RuntimeError(
                f"Trainer.save(): the run stopped in the middle of step {self.state.step + 1}, "
                "so this state is no step's end (its data position is ahead of its "
                f"weights); {last}")
        if self._training:  # (from on_step, or the loop's own saves: the lock is held)
            self._save()
            return
        with self._run_dir_reclaimed():
            self._save()

    @contextlib.contextmanager
    def _run_dir_reclaimed(self) -> Iterator[None]:
        """The run directory locked again for a save after :meth:`train` returned (one
        process), and checked to hold no checkpoint newer than this trainer's state."""
        with os_errors("lock the run directory", self.out):
            lock = RunLock.acquire(self.out)
        try:
            newest = latest_checkpoint(self.out)
            step = int(read_trainer_state(newest)["step"]) if newest is not None else 0
            if step > self.state.step:
                raise RuntimeError(
                    f"Trainer.save(): {self.out} holds a checkpoint of step {step}, newer than "
                    f"this trainer's step {self.state.step} (another trainer continued the "
                    "run): saving would prune it and point latest back; load the newer one "
                    "instead (Trainer(cfg, resume=True))")
            yield
        finally:
            lock.release()

    def _save(self) -> None:
        ctx = self.ctx
        rngs = gather_objects(rng_state(ctx.device), ctx)
        data = gather_objects(self.data.state_dict(), ctx)
        trainer_state = None
        if ctx.is_main:
            if self._val_fingerprint is None:  # once: the validation batches do not change
                self._val_fingerprint = val_fingerprint(self.data, iter_val_batches(
                    self.data, self.cfg.data.eval_batches, ctx.world_size))
            trainer_state = {**dataclasses.asdict(self.state), "rng": rngs, "data": data,
                             "world_size": ctx.world_size, "global_batch": self._global_batch,
                             "val_fingerprint": self._val_fingerprint}
            trainer_state.pop("step")
        if ctx.parallel is Parallel.FSDP:
            self._save_sharded(trainer_state)
        else:
            self._save_gathered(trainer_state)
        self._unproven = self.last_checkpoint

    def _save_sharded(self, trainer_state: dict[str, Any] | None) -> None:
        """Every rank writes its shards; errors are raised on every rank."""
        try:
            with os_errors("write a checkpoint to", self.out / CHECKPOINT_DIR):
                self.last_checkpoint = save_sharded_checkpoint(
                    self.out, self.state.step, self.model, self.optimizer, self.tied,
                    self.model_cfg, to_toml(self.resolved), trainer_state,
                    self.cfg.run.keep_checkpoints)
        except NonFiniteWeights as err:
            what = f"the weights are no longer finite: {err}"
            raise TrainingDiverged(self._diverged(what)) from None

    def _save_gathered(self, trainer_state: dict[str, Any] | None) -> None:
        """Full states gathered to rank 0, which writes them; its outcome is broadcast."""
        ctx = self.ctx
        model_state = gather_model_state(self.model, self.tied)
        optimizer_state = gather_optimizer_state(self.model, self.optimizer)
        error: Exception | None = None
        if ctx.is_main:
            ckpt = TrainingCheckpoint(self.state.step, model_state, self.model_cfg,
                                      to_toml(self.resolved), optimizer_state, trainer_state)
            try:
                with os_errors("write a checkpoint to", self.out / CHECKPOINT_DIR):
                    self.last_checkpoint = save_checkpoint(self.out, ckpt, self.tied,
                                                           self.cfg.run.keep_checkpoints)
            except NonFiniteWeights as err:
                error = TrainingDiverged(self._diverged(f"the weights are no longer finite: {err}"))
            except Exception as err:  # noqa: BLE001 - any failure: the other ranks must hear of it
                error = err
        # Rank 0's outcome on every rank: the others must not wait for a save that failed,
        # and must know the checkpoint it wrote (a stop after a saved step is decided on
        # every rank from it: a rank that thought the step unsaved began another save while
        # the others were past it, and the job hung until dist_timeout).
        error, written = broadcast_object(
            (error, self.last_checkpoint if ctx.is_main else None), ctx)
        if error is not None:
            raise error
        self.last_checkpoint = written


def train(cfg: TrainConfig, resume: bool | str | Resume = False) -> TrainState:
    """Run :class:`Trainer` on ``cfg``."""
    return Trainer(cfg, resume=resume).train()


def _finite_or_none(x: float) -> float | None:
    # metrics.jsonl stays strict JSON: a non-finite value is written as null.
    return x if math.isfinite(x) else None


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` the model's blocks in place: every Prelude and Coda block, and the
    looped model's whole loop body (norms, loop signal, block, LoRA, injection) as one graph
    for every loop index and count (:meth:`RecurrentBlock.compile_loop`). The loop and the
    halting bookkeeping stay in Python."""
    looped = is_looped(model)
    core = [] if looped else list(model.core)
    for block in [*model.prelude, *core, *model.coda]:
        block.compile()
    if looped:
        model.recurrent.compile_loop()
