"""Training configuration: one validated dataclass per TOML section.

A run is described by a TOML file with the sections ``[model]``, ``[data]``, ``[optim]``,
``[schedule]`` and ``[run]``; every key is optional and falls back to the dataclass default.
Command-line overrides are dotted keys (``optim.lr=1e-3``) applied on top of the file.
Unknown sections or keys and ill-typed values raise :class:`ConfigError` naming the key.

``[model]`` holds ``variant`` (a preset of :mod:`open_mythos.variants`, optional) and any
:class:`~open_mythos.config.MythosConfig` field, which overrides the preset. Without a
variant the fields override :data:`DEFAULT_MODEL`, a small model that trains on a CPU. A
``vocab_size`` that is not given is taken from the data (tokenizer or task vocabulary).

The resolved configuration is written beside the run (``DIR/config.toml``) by
:func:`to_toml`, which :func:`load_config` reads back to an equal object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import numbers
import operator
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from ..config import KIND_KEY, USER_CODE_HINT, MythosConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib


E = TypeVar("E", bound=Enum)


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range; the message names it."""


def error_line(err: BaseException) -> str:
    """An exception from a library underneath (a file reader's, a rendezvous') as one line:
    its type and the first line of its message."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


_FLOAT32_MAX = 3.4028234663852886e38


class LoopMode(str, Enum):
    """How the number of recurrent loops is chosen for each training step."""

    FIXED = "fixed"  # always schedule.n_loops
    CURRICULUM = "curriculum"  # linear ramp from min_loops to max_loops
    SAMPLED = "sampled"  # Poisson-lognormal around n_loops, clipped to [min_loops, max_loops]
    UNIFORM = "uniform"  # uniform on [min_loops, max_loops]


class LRDecay(str, Enum):
    """Learning-rate shape after warmup."""

    COSINE = "cosine"
    CONSTANT = "constant"


class Precision(str, Enum):
    """Compute precision. Master weights and optimizer state stay float32 in both."""

    FP32 = "fp32"
    BF16 = "bf16"


class Compile(str, Enum):
    """What ``torch.compile`` compiles for training (``run.compile``)."""

    OFF = "off"
    #: Every Prelude/Coda block and the loop body, one graph for every loop index and
    #: count; the loop and the halting bookkeeping stay in Python. Works with DDP and FSDP2.
    BLOCKS = "blocks"
    #: The model's whole forward (and so its backward) as one graph per loop count and
    #: input shape: the fastest step (no Python between loops; on a GPU, far fewer
    #: kernel launches), a compilation for every loop count a schedule samples.
    MODEL = "model"


class Parallel(str, Enum):
    """Data parallelism across ``torchrun`` processes."""

    NONE = "none"
    DDP = "ddp"
    FSDP = "fsdp"  # FSDP2 ``fully_shard`` per transformer block, then the root


# A model that trains at a few hundred steps per minute on two CPU cores. ``vocab_size`` is
# deliberately absent: it comes from the data.
DEFAULT_MODEL: dict[str, Any] = dict(
    dim=128, n_heads=4, n_kv_heads=2, max_seq_len=256, max_loop_iters=8, prelude_layers=1,
    coda_layers=1, attn_type="gqa", n_experts=8, n_shared_experts=1, n_experts_per_tok=2,
    expert_dim=64, lora_rank=8,
)


@dataclass
class ModelConfig:
    """``[model]``: the architecture.

    Attributes:
        variant: name of a preset in ``open_mythos.variants.VARIANTS`` (``"mythos_1b"``),
            or None for :data:`DEFAULT_MODEL`.
        overrides: ``MythosConfig`` fields set in the file or on the command line; they
            win over the preset. Written flat in TOML (``[model] dim = 64``). ``kind``
            names a registered model kind (:mod:`open_mythos.registry`); without it the
            kind is told by the fields (``core_layers`` set: the dense baseline).
    """

    variant: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, data_vocab_size: int) -> MythosConfig:
        """The model configuration for data whose ids are below ``data_vocab_size``.

        Raises:
            ConfigError: unknown variant, invalid field, or a vocabulary too small for the data.
        """
        if self.variant is not None:
            base = _variant_config(self.variant).to_dict()
        else:
            base = {**DEFAULT_MODEL, "vocab_size": data_vocab_size}
        merged = {**base, **self.overrides}
        kind = merged.pop("kind", None)  # (None: --set model.kind= clears it)
        if kind is not None:
            merged[KIND_KEY] = kind
        from ..registry import config_from_dict  # core_layers / core_ffn_dim: the dense baseline

        try:
            cfg = config_from_dict(merged)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[model] {err}") from None
        if cfg.vocab_size < data_vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the data vocabulary "
                f"({data_vocab_size} ids); raise it or leave it unset"
            )
        return cfg


ENCODING_ERRORS = ("strict", "replace", "ignore")
"""Values of ``data.encoding_errors``: Python's codec error handlers that keep text text."""

#: ``run.seed`` is below this (the range of ``torch.manual_seed``); the seeds derived from
#: it are reduced modulo it (:func:`derived_seed`).
SEED_LIMIT = 1 << 64


def derived_seed(*parts: int) -> int:
    """``sum(parts)`` as a seed ``torch.manual_seed`` takes: the derived per-rank and
    per-step seeds (``seed * 1009 + rank + 1``) of a 64-bit run seed overflowed it."""
    return sum(parts) % SEED_LIMIT


@dataclass
class DataConfig:
    """``[data]``: where batches come from. At most one of ``task``, ``text``, ``hf_dataset``,
    ``prepared``; none means the built-in corpus (the Python documentation topics, no download).

    Attributes:
        task: name of an algorithmic task (``open_mythos.tasks.list_tasks()``).
        task_args: keyword arguments of the task's constructor (difficulty knobs).
        val_split: task split used for validation.
        text: local text files or directories of them.
        hf_dataset: Hugging Face dataset name, streamed (needs the ``datasets`` package).
        hf_config: dataset configuration name.
        hf_split: dataset split to stream.
        hf_text_field: column holding the text.
        prepared: directory written by ``openmythos prepare`` (memory-mapped token shards
            and their manifest); its tokenizer must be ``tokenizer``.
        encoding_errors: what a byte sequence that is not UTF-8 in a ``text`` file does:
            ``"strict"`` (an error naming the file and byte offset), ``"replace"`` (U+FFFD)
            or ``"ignore"`` (dropped).
        tokenizer: ``"byte"`` or a local Hugging Face tokenizer directory (text data only).
        batch_size: sequences per process per micro-step; the global batch is
            ``batch_size * world_size * optim.grad_accum``.
        seq_len: tokens per sequence; None means the task's longest example, or 128 for text.
        val_fraction: share of the text corpus (its tail) held out for validation.
        eval_batches: batches of ``batch_size * world_size`` rows in each validation pass
            (``grad_accum`` does not change the validation rows).
    """

    task: str | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    val_split: str = "id"
    text: list[str] = field(default_factory=list)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    prepared: str | None = None
    encoding_errors: str = "strict"
    tokenizer: str = "byte"
    batch_size: int = 8
    seq_len: int | None = None
    val_fraction: float = 0.05
    eval_batches: int = 4

    def __post_init__(self) -> None:
        _typed_fields(self, "data")
        # An empty name clears a source (the way to leave a config's task from the command
        # line: --set data.task=): stored as None, which every reader of a run takes as "no
        # task" (an empty string trained on text and then named an unknown task '').
        for name in ("task", "hf_dataset", "prepared"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        # Local paths: "~/corpus" is the home directory's, as in a shell (not "./~/corpus").
        self.text = [os.path.expanduser(p) for p in self.text]
        if self.prepared is not None:
            self.prepared = os.path.expanduser(self.prepared)
        if self.tokenizer.startswith("~"):
            self.tokenizer = os.path.expanduser(self.tokenizer)
        sources = [n for n in ("task", "text", "hf_dataset", "prepared") if getattr(self, n)]
        if len(sources) > 1:
            raise ConfigError(f"data: choose one source, got {' and '.join(sources)}")
        if self.encoding_errors not in ENCODING_ERRORS:
            raise ConfigError(f"data.encoding_errors={self.encoding_errors!r} is invalid: use "
                              f"{', '.join(map(repr, ENCODING_ERRORS))}")
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batches", self.eval_batches)
        if self.seq_len is not None:
            _positive("data.seq_len", self.seq_len)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")

    @property
    def source(self) -> str:
        """``"task"``, ``"text"``, ``"hf_dataset"``, ``"prepared"`` or ``"builtin"``."""
        return next((n for n in ("task", "text", "hf_dataset", "prepared") if getattr(self, n)),
                    "builtin")

    def unread_keys(self) -> list[str]:
        """The keys set away from their defaults that this source does not read (a
        ``task_args`` with text data, an ``hf_split`` without ``hf_dataset``)."""
        defaults = {f.name: (f.default_factory() if f.default is MISSING else f.default)
                    for f in fields(self) if f.name in SOURCE_ONLY_KEYS}
        read = SOURCE_KEYS[self.source]
        return [k for k in SOURCE_ONLY_KEYS if k not in read and getattr(self, k) != defaults[k]]


#: The ``[data]`` keys that only some sources read (batch_size, seq_len and eval_batches
#: are everyone's), and which source reads which.
SOURCE_ONLY_KEYS = ("task_args", "val_split", "tokenizer", "val_fraction", "encoding_errors",
                    "hf_config", "hf_split", "hf_text_field")
SOURCE_KEYS: dict[str, frozenset[str]] = {
    "task": frozenset({"task_args", "val_split"}),
    "text": frozenset({"tokenizer", "val_fraction", "encoding_errors", "hf_text_field"}),
    "hf_dataset": frozenset({"tokenizer", "hf_config", "hf_split", "hf_text_field"}),
    "prepared": frozenset({"tokenizer", "val_fraction"}),
    "builtin": frozenset({"tokenizer", "val_fraction"}),
}


@dataclass
class OptimConfig:
    """``[optim]``: objective and AdamW.

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled decay, applied to matrices only (not to norms, biases,
            embeddings or any 1-D parameter).
        beta1, beta2, eps: AdamW moments.
        grad_clip: maximum global gradient norm; 0 disables clipping.
        grad_accum: micro-steps accumulated per optimizer step.
        ponder_weight: weight of the mean ACT ponder cost (expected loops) in the loss.
        aux_weight: weight of the MoE auxiliary balance loss. It is computed per process,
            so it is the one term that data parallelism does not reproduce exactly (a
            product of batch means); the router-bias balancing runs on global loads.

    Loop-supervised training (``docs/training.md``, "Training the loops"):
        loop_loss_weight: weight of the per-loop readout loss: the state after loop ``t``,
            taken through the Coda and the head, is trained on the targets too (the dense
            baseline: after each core block). Teaches every depth to hold a usable answer,
            which is what lets inference run more loops than training (or stop early).
            0 disables it.
        loop_loss_last: read out only the last ``k`` loops of each step (None: every loop).
        loop_readout: how a loop's state is read out: ``"coda"`` (through the Coda, final
            norm and head: exactly what stopping there would output) or ``"head"`` (final
            norm and head only, at the supervised positions: cheaper, and it trains the
            state itself to name the answer, which is what the loop after it reads).
        loop_loss_gamma: loop ``t`` of ``n`` weighs ``gamma ** (n - t)``, normalised to sum
            1 (1: every read-out loop equally; below 1: later loops more).
        loop_targets: for tasks that define per-step answers (``Task.trace``: ``multihop``,
            ``phop``), the readout of loop ``t`` predicts the value reached after ``t``
            steps (then the answer, once the chain ends) at the first answer position,
            instead of the final answer: one step per loop. Needs ``loop_loss_weight > 0``.
        progressive_weight: DeepThinking's progressive loss (Bansal et al. 2022) with this
            weight ``alpha``: each micro-batch also runs ``n`` loops without gradient and
            ``k`` more with it (``n`` uniform in ``[0, m - 1]``, ``k`` in ``[1, m - n]``,
            ``m`` the step's loop count), and the objective is ``(1 - alpha)`` times the
            usual one plus ``alpha`` times the cross-entropy of that forward. Trains the
            block to improve on any state it is handed, against "overthinking" at depths
            beyond training. 0 disables it.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    ponder_weight: float = 0.0
    aux_weight: float = 0.01
    loop_loss_weight: float = 0.0
    loop_loss_last: int | None = None
    loop_readout: str = "coda"
    loop_loss_gamma: float = 1.0
    loop_targets: bool = False
    progressive_weight: float = 0.0

    def __post_init__(self) -> None:
        _typed_fields(self, "optim")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("lr", "eps"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be finite and > 0")
        # AdamW's first update moves a weight by up to lr / (1 - beta1), in float32.
        if self.lr / (1.0 - self.beta1) >= _FLOAT32_MAX:
            raise ConfigError(f"optim.lr={self.lr} is too large: AdamW's first step "
                              f"lr / (1 - beta1) overflows float32 ({_FLOAT32_MAX:.3g})")
        for name in ("weight_decay", "grad_clip", "ponder_weight", "aux_weight",
                     "loop_loss_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be finite and >= 0")
        if self.loop_loss_last is not None:
            _positive("optim.loop_loss_last", self.loop_loss_last)
        if self.loop_readout not in ("coda", "head"):
            raise ConfigError(f"optim.loop_readout={self.loop_readout!r} is invalid: use 'coda' "
                              "or 'head'")
        if not (0.0 < self.loop_loss_gamma and math.isfinite(self.loop_loss_gamma)):
            raise ConfigError(f"optim.loop_loss_gamma={self.loop_loss_gamma} must be finite and > 0")
        if self.loop_targets and not self.loop_loss_weight > 0:
            raise ConfigError("optim.loop_targets supervises the per-loop readouts: it needs "
                              "optim.loop_loss_weight > 0")
        if not 0.0 <= self.progressive_weight < 1.0:
            raise ConfigError(
                f"optim.progressive_weight={self.progressive_weight} must be in [0, 1)")
        _positive("optim.grad_accum", self.grad_accum)


@dataclass
class ScheduleConfig:
    """``[schedule]``: learning-rate and loop-count schedules.

    Attributes:
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``.
        lr_decay: shape after warmup.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        decay_steps: 0-based step at which the cosine reaches its floor; None means
            ``run.steps`` (the step after a run's last, as in Hugging Face's and
            PyTorch's cosine schedules: the last update runs one step above the floor).
        loops: how each step's loop count is chosen (:class:`LoopMode`).
        n_loops: the fixed count, or the mean of the sampled counts.
        min_loops, max_loops: range of the curriculum and of uniform counts, clip range of
            sampled counts.
        loop_sigma: standard deviation of the log-normal rate of sampled counts.
        curriculum_steps: length of the curriculum ramp; None means ``run.steps``.
        eval_loops: loops used for validation; None means :attr:`trained_depth` (``max_loops``
            for a curriculum and for uniform counts, else ``n_loops``).
        backprop_loops: truncated backpropagation through the last ``k`` loops only
            (the earlier ones run without autograd); None differentiates every loop.
            Huginn trains with ``k = 8`` of a mean depth of 32: memory and time stay bounded
            however deep a sampled step is.
    """

    warmup_steps: int = 100
    lr_decay: LRDecay = LRDecay.COSINE
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    loops: LoopMode = LoopMode.FIXED
    n_loops: int = 4
    min_loops: int = 1
    max_loops: int = 8
    loop_sigma: float = 0.5
    curriculum_steps: int | None = None
    eval_loops: int | None = None
    backprop_loops: int | None = None

    def __post_init__(self) -> None:
        _typed_fields(self, "schedule")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        for name in ("n_loops", "min_loops", "max_loops", "decay_steps", "curriculum_steps",
                     "eval_loops", "backprop_loops"):
            if getattr(self, name) is not None:
                _positive(f"schedule.{name}", getattr(self, name))
        if self.min_loops > self.max_loops:
            raise ConfigError(
                f"schedule.min_loops={self.min_loops} must be <= max_loops={self.max_loops}")
        if self.loops is LoopMode.SAMPLED and not self.min_loops <= self.n_loops <= self.max_loops:
            raise ConfigError(
                f"schedule.n_loops={self.n_loops} (the mean of sampled loops) must lie in "
                f"[min_loops, max_loops] = [{self.min_loops}, {self.max_loops}]")
        if not (self.loop_sigma >= 0 and math.isfinite(self.loop_sigma)):
            raise ConfigError(f"schedule.loop_sigma={self.loop_sigma} must be finite and >= 0")

    @property
    def trained_depth(self) -> int:
        """The loop count the run is trained for, the default depth of everything that later
        runs its checkpoints: ``n_loops`` (the fixed count, or the mean of sampled counts);
        ``max_loops`` for a curriculum (where it ends) and for uniform counts (the deepest
        trained)."""
        if self.loops in (LoopMode.CURRICULUM, LoopMode.UNIFORM):
            return self.max_loops
        return self.n_loops

    @property
    def resolved_eval_loops(self) -> int:
        """``eval_loops``, else :attr:`trained_depth`: validation runs at the depth the
        checkpoints are later run at by default (for uniform counts ``n_loops`` plays no
        part in training, and could lie outside the range trained)."""
        return self.eval_loops if self.eval_loops is not None else self.trained_depth


@dataclass
class RunConfig:
    """``[run]``: length, hardware and bookkeeping.

    Attributes:
        out: run directory (metrics, checkpoints, resolved config).
        steps: optimizer steps in total (a resumed run continues up to this number).
        seed: seeds model init, data order, loop sampling and dropout.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: :class:`Precision` (bf16 autocast, or FSDP2 bf16 parameters).
        compile: :class:`Compile`: ``"off"``, ``"blocks"`` (the Prelude/Coda blocks and
            the loop body; ``true`` means this) or ``"model"`` (the whole forward, one graph
            per loop count; single process only).
        keep_freed_memory: on the CPU (glibc), keep freed memory in the process rather
            than returning it to the OS and page-faulting it back every step
            (:func:`open_mythos.devices.keep_freed_memory`; 12-30% faster steps measured).
        parallel: :class:`Parallel` mode under ``torchrun``.
        dist_timeout: seconds a collective may wait for the other ranks before it fails
            (a rank that hangs rather than dies); 0: torch's default (30 minutes on gloo,
            10 on NCCL). Leave room for the longest thing one rank does while the others
            wait: a checkpoint save, verifying the checkpoint's hashes on resume, the
            first compilation.
        gradient_checkpointing: recompute each loop in the backward pass (less memory; a
            dense baseline recomputes each core block).
        log_every: steps between progress-bar and TensorBoard updates (metrics.jsonl gets
            every step).
        eval_every: steps between validation passes; 0 disables them.
        save_every: steps between checkpoints; 0 saves only at the end.
        keep_checkpoints: most recent checkpoints kept; 0 keeps all.
        tensorboard: also log to ``DIR/tensorboard`` (needs the ``tensorboard`` package).
        progress: show a tqdm progress bar.
        max_bad_steps: consecutive non-finite steps (skipped) after which the run stops.
        init_from: start from the model weights of this checkpoint or run directory (same
            architecture; optimizer, counters and data start fresh): the second stage of a
            two-stage recipe. A resumed run restores its own checkpoint instead.
    """

    out: str = "runs/openmythos"
    steps: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: Precision = Precision.FP32
    compile: bool | Compile = Compile.OFF
    keep_freed_memory: bool = True
    parallel: Parallel = Parallel.NONE
    dist_timeout: float = 0.0
    gradient_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 3
    tensorboard: bool = False
    progress: bool = True
    max_bad_steps: int = 10
    init_from: str | None = None

    def __post_init__(self) -> None:
        _typed_fields(self, "run")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError(f"run.out={self.out!r} is invalid: name the run directory")
        self.out = os.path.expanduser(self.out)  # "~/runs/x" as in a shell
        if self.init_from is not None:
            self.init_from = os.path.expanduser(self.init_from)
        _positive("run.steps", self.steps)
        _positive("run.log_every", self.log_every)
        _positive("run.max_bad_steps", self.max_bad_steps)
        for name in ("eval_every", "save_every", "keep_checkpoints", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name}={getattr(self, name)} must be >= 0")
        if self.seed >= SEED_LIMIT:  # torch.manual_seed's range
            raise ConfigError(f"run.seed={self.seed} must be below 2**64")
        if not (isinstance(self.dist_timeout, (int, float))
                and not isinstance(self.dist_timeout, bool)
                and 0 <= self.dist_timeout < math.inf):
            raise ConfigError(f"run.dist_timeout={self.dist_timeout!r} must be a number of "
                              "seconds >= 0 (0: torch's default)")
        if isinstance(self.compile, bool):
            self.compile = Compile.BLOCKS if self.compile else Compile.OFF
        if self.compile is Compile.MODEL and self.parallel is not Parallel.NONE:
            raise ConfigError(f"run.compile='model' is for a single process; with "
                              f"run.parallel={self.parallel.value!r} use 'blocks'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"run.device={self.device!r} is invalid: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class TrainConfig:
    """The whole run: one attribute per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = typing.get_type_hints(type(self))[f.name]
            value = getattr(self, f.name)
            if not isinstance(value, kind):
                raise ConfigError(
                    f"TrainConfig.{f.name} must be a {kind.__name__}, got "
                    f"{type(value).__name__}" + (" (build from nested dicts with "
                                                  "TrainConfig.from_dict)"
                                                  if isinstance(value, Mapping) else ""))

    def validated(self) -> TrainConfig:
        """This configuration built again from its own values: assignments made since it
        was built are checked as a file's values are (``cfg.run.compile = "blocks"``, a
        string where a member is meant; an out-of-range count). A valid configuration
        comes back equal (values are taken as they are, None and tuples included)."""
        sections: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, ModelConfig):
                sections[f.name] = _build_model_section(
                    {"variant": section.variant, **section.overrides})
            else:
                values = {sf.name: getattr(section, sf.name)
                          for sf in dataclasses.fields(section)}
                sections[f.name] = _build_section(type(section), f.name, values)
        return type(self)(**sections)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build from nested plain data (a parsed TOML document).

        Raises:
            ConfigError: unknown section or key, ill-typed or out-of-range value.
        """
        sections = {f.name: f for f in dataclasses.fields(cls)}
        _reject_unknown("section", raw, sections, prefix="")
        built: dict[str, Any] = {}
        for name, value in raw.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{name}] must be a table of keys, got {value!r}")
            if name == "model":
                built[name] = _build_model_section(value)
            else:
                section_cls = typing.get_type_hints(cls)[name]
                built[name] = _build_section(section_cls, name, value)
        return cls(**built)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain data (enums as strings, None values dropped): the inverse of
        :meth:`from_dict`."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, ModelConfig):
                flat = {"variant": section.variant, **section.overrides}
            else:
                flat = {sf.name: getattr(section, sf.name) for sf in dataclasses.fields(section)}
            out[f.name] = {k: _plain(v) for k, v in flat.items() if v is not None}
        return out


UNSET: Any = object()
"""Override value that removes a key, restoring its default (``("data.task", UNSET)``)."""


def load_config(
    path: str | Path | None = None, overrides: Iterable[tuple[str, Any]] = ()
) -> TrainConfig:
    """Read a TOML file (or start from defaults) and apply dotted-key overrides.

    Args:
        path: TOML file, or None for the defaults.
        overrides: ``("optim.lr", 1e-3)`` pairs applied in order after the file; a value of
            None is ignored (a command-line flag that was not given), :data:`UNSET` removes
            the key.

    Raises:
        ConfigError: a missing or malformed file, or any error of :meth:`TrainConfig.from_dict`.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {str(path)!r} is a directory, not a TOML file"
                              ) from None
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read: "
                              f"{err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    for key, value in overrides:
        if value is not None:
            _set_dotted(raw, key, value)
    return TrainConfig.from_dict(raw)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``.

    The value is read as a TOML value (numbers, booleans, ``[lists]``, ``"strings"``); if
    that fails it is taken as a bare string, so ``model.attn_type=mla`` works unquoted.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {text!r} must look like SECTION.KEY=VALUE (e.g. optim.lr=1e-3)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError as err:
        parsed = value.strip()
        if parsed.startswith(("[", "{", '"', "'")):  # meant as TOML, not a bare word
            raise ConfigError(f"override {text!r}: {parsed!r} is not a valid TOML value "
                              f"({err})") from None
    return key, parsed


def to_toml(cfg: TrainConfig) -> str:
    """The configuration as a TOML document that :func:`load_config` reads back equal.

    Raises:
        ConfigError: a value is not valid Unicode (a file name with bytes that are not
            UTF-8 arrives in Python as lone surrogates), so no UTF-8 file can hold it.
    """
    text = tomli_w.dumps(cfg.to_dict())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        around = text[max(0, err.start - 40):err.end + 40].encode("utf-8", "backslashreplace")
        raise ConfigError("the configuration holds text that is not valid UTF-8 (a file name "
                          "with undecodable bytes?), near: "
                          f"{' '.join(around.decode('ascii', 'backslashreplace').split())}; "
                          "rename it") from None
    return text


# Building and type checking ----------------------------------------------------------------


def _build_model_section(raw: Mapping[str, Any]) -> ModelConfig:
    from ..registry import KINDS

    hints: dict[str, Any] = {}
    for kind in KINDS.values():
        hints.update(typing.get_type_hints(kind.config_class))
    _reject_unknown("key", raw, dict.fromkeys(_model_keys()), prefix="model.")
    overrides = {}
    variant = None
    for key, value in raw.items():
        if key == "variant":
            # An empty name clears a config file's preset (--set model.variant=), as an empty
            # data.task clears its task.
            variant = _coerce("model.variant", value, str | None) or None
        elif key == "kind":
            overrides[key] = _coerce("model.kind", value, str | None) or None
        else:
            overrides[key] = _coerce(f"model.{key}", value, hints[key])
    return ModelConfig(variant=variant, overrides=overrides)


def _build_section(cls: type, name: str, raw: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown("key", raw, fields, prefix=f"{name}.")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in raw.items()}
    return cls(**values)


def _model_keys() -> set[str]:
    from ..registry import KINDS  # a kind's extra keys (core_layers...) select that kind

    return {"variant", "kind", *(f.name for k in KINDS.values()
                                 for f in dataclasses.fields(k.config_class))}


def _sections_holding(key: str) -> list[str]:
    """The ``[section]`` names that have the key ``key``."""
    out = []
    for section in dataclasses.fields(TrainConfig):
        keys = (_model_keys() if section.name == "model"
                else {f.name for f in dataclasses.fields(section.default_factory)})
        if key in keys:
            out.append(section.name)
    return out


def _reject_unknown(kind: str, raw: Mapping[str, Any], known: Mapping[str, Any], prefix: str) -> None:
    for key in raw:
        if key not in known and kind == "section" and not isinstance(raw[key], Mapping):
            # A key written before any [section] header of the file.
            home = _sections_holding(key)
            hint = f"; did you mean '{home[0]}.{key}' (under [{home[0]}])?" if home else ""
            raise ConfigError(f"config key '{key}' is outside any [section]{hint} "
                              f"(sections: {', '.join(sorted(known))})")
        if key not in known:
            # A real key in another section is the likelier slip than a near-miss here.
            home = _sections_holding(key) if kind == "key" else []
            close = ([f"{home[0]}.{key}"] if home
                     else [prefix + m for m in difflib.get_close_matches(key, list(known), n=1,
                                                                          cutoff=0.5)])
            hint = f"; did you mean '{close[0]}'?" if close else ""
            choices = ", ".join(sorted(known))
            if prefix == "model.":  # perhaps a field of a kind that user code registers
                choices += USER_CODE_HINT
            raise ConfigError(f"unknown config {kind} '{prefix}{key}'{hint} (known: {choices})")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type annotation ``hint``; ints widen to floats, strings
    become enum members, ``"none"`` becomes None for optional non-string fields."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (
            isinstance(value, str) and value.lower() == "none" and str not in args
        ):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        if not errors:
            raise ConfigError(f"{key}={value!r} has the wrong type")
        raise ConfigError(errors[0] + "".join(
            f"; or {err.removeprefix(f'{key}={value!r} ')}" for err in errors[1:]))
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise ConfigError(f"{key}={value!r} is invalid: use one of {allowed}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be a boolean (true or false)")
    if hint is int:  # NumPy's and torch's integers are integers (index, not int())
        if not isinstance(value, bool):
            with contextlib.suppress(TypeError):
                return operator.index(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        quoted = (" (a number or a boolean is read as one: quote it, as TOML writes a "
                  f"string; on the command line keep the quotes from the shell: --set "
                  f"'{key}=\"...\"')" if isinstance(value, (int, float)) else "")
        raise ConfigError(f"{key}={value!r} must be a string{quoted}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, os.PathLike)):  # one path given where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a table")
        return dict(value)
    raise ConfigError(f"{key}: unsupported annotation {hint!r}")


def as_member(enum: type[E], value: Any, key: str) -> E:
    """``value`` as a member of ``enum``: a member, or its value (``"fixed"`` for
    ``LoopMode.FIXED``, as TOML and the command line give it).

    Raises:
        ConfigError: anything else, naming ``key`` and the allowed values.
    """
    return value if isinstance(value, enum) else _coerce(key, value, enum)


def _typed_fields(section: Any, name: str) -> None:
    """Every field of a section's dataclass checked against its annotation as the TOML's
    values are (:func:`_coerce`), also when the section is built in Python: a string
    becomes its enum member (``ScheduleConfig(loops="fixed")``; the code compares members
    with ``is``), a NumPy integer an ``int`` and a ``Path`` a ``str`` (both were written
    to the run's TOML, which could not serialise the first), and a wrong type is a
    :class:`ConfigError` naming the key (``OptimConfig(lr="3e-3")`` was a bare TypeError,
    ``RunConfig(steps=3.0)`` an error about another key at the first step)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        setattr(section, f.name, _coerce(f"{name}.{f.name}", getattr(section, f.name),
                                         hints[f.name]))


def _positive(key: str, value: int) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be > 0")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must look like SECTION.KEY")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a table")
        node = child
    if value is UNSET:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _plain(value: Any) -> Any:
    """Plain TOML data: enums as their values, tuples as lists, None dropped from tables
    (TOML has no null; a missing key reads back as None)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def _variant_config(name: str) -> MythosConfig:
    # Imported here: the variants module is optional for training a custom model.
    try:
        from ..variants import get_variant
    except ImportError as err:
        raise ConfigError(f"model.variant={name!r} needs open_mythos.variants: {err}") from None
    try:
        return get_variant(name)
    except ValueError as err:
        raise ConfigError(f"model.variant: {err}") from None
