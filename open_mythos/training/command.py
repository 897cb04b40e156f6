"""``openmythos train``: the command-line front end of :class:`~.trainer.Trainer`.

Configuration precedence: dataclass defaults < ``--config FILE`` < the flags below <
``--set SECTION.KEY=VALUE`` (repeatable). Every flag is a shortcut for one dotted key.

Resume: without ``--resume`` the run is new, and an ``--out`` that already holds a run is an
error; ``--resume`` continues from the newest intact checkpoint and is an error where there
is none; ``--resume auto`` continues if there is a checkpoint, else starts from step 1 (for
jobs that a scheduler restarts). Resuming without ``--config`` starts from the run's own
``OUT/config.toml``, so ``openmythos train --out OUT --resume`` is enough; flags given with it
override its keys, and the keys they change are printed.

Exit status: 0 on success; 1 when training diverged (see :mod:`.trainer`); 2 for an invalid
configuration (a missing or unreadable ``--config`` included) or a run directory that does not
fit (in use by another process, nothing to resume, already holding a run, model changed);
3 for an OS-level failure writing the run directory (permission, a file in the way, disk
full). Errors are one line on stderr, naming the key or the path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any

# (flag, dotted key, argparse keyword arguments)
_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--variant", "model.variant", dict(help="model preset, e.g. mythos_1b")),
    ("--task", "data.task", dict(
        help="algorithmic task (parity, dyck, modsum, addition, multihop, phop)")),
    ("--text", "data.text", dict(nargs="+", action="extend", metavar="PATH",
                                 help="local text files or directories (repeatable)")),
    ("--prepared", "data.prepared", dict(
        metavar="DIR", help="token shards written by 'openmythos prepare'")),
    ("--hf-dataset", "data.hf_dataset", dict(metavar="NAME",
                                             help="stream a Hugging Face dataset (needs 'datasets')")),
    ("--text-field", "data.hf_text_field", dict(
        metavar="NAME", help="the text field of .jsonl/.parquet files and datasets (default text)")),
    ("--encoding-errors", "data.encoding_errors", dict(
        choices=["strict", "replace", "ignore"], help="what to do with bytes that are not UTF-8")),
    ("--tokenizer", "data.tokenizer", dict(metavar="DIR",
                                           help="'byte' (default) or a local tokenizer directory")),
    ("--batch-size", "data.batch_size", dict(type=int, help="sequences per process per micro-step")),
    ("--seq-len", "data.seq_len", dict(type=int, help="tokens per sequence")),
    ("--lr", "optim.lr", dict(type=float, help="peak learning rate")),
    ("--grad-accum", "optim.grad_accum", dict(type=int, help="micro-steps per optimizer step")),
    ("--warmup-steps", "schedule.warmup_steps", dict(type=int)),
    ("--loops", "schedule.loops", dict(choices=["fixed", "curriculum", "sampled", "uniform"],
                                       help="loop-count schedule")),
    ("--n-loops", "schedule.n_loops", dict(type=int, help="fixed loop count, or the sampled mean")),
    ("--min-loops", "schedule.min_loops", dict(type=int)),
    ("--max-loops", "schedule.max_loops", dict(type=int)),
    ("--backprop-loops", "schedule.backprop_loops", dict(
        type=int, metavar="K", help="truncated backprop through the last K loops")),
    ("--steps", "run.steps", dict(type=int, help="total optimizer steps")),
    ("--out", "run.out", dict(metavar="DIR", help="run directory")),
    ("--seed", "run.seed", dict(type=int)),
    ("--device", "run.device", dict(help="auto (default), cpu, cuda or cuda:N")),
    ("--precision", "run.precision", dict(choices=["fp32", "bf16"])),
    ("--parallel", "run.parallel", dict(choices=["none", "ddp", "fsdp"],
                                        help="data parallelism under torchrun")),
    ("--eval-every", "run.eval_every", dict(type=int, metavar="N")),
    ("--save-every", "run.save_every", dict(type=int, metavar="N")),
    ("--log-every", "run.log_every", dict(type=int, metavar="N")),
    ("--max-bad-steps", "run.max_bad_steps", dict(type=int, metavar="N")),
    ("--compile", "run.compile", dict(
        nargs="?", const="blocks", choices=["off", "blocks", "model"],
        help="torch.compile for training: 'blocks' (the default of a bare --compile: the "
             "blocks and the loop body) or 'model' (the whole forward, one graph per loop "
             "count: fastest, single process)")),
    ("--gradient-checkpointing", "run.gradient_checkpointing", dict(
        action="store_const", const=True, help="recompute loops in backward to save memory")),
    ("--tensorboard", "run.tensorboard", dict(action="store_const", const=True,
                                              help="also log to DIR/tensorboard")),
    ("--no-progress", "run.progress", dict(action="store_const", const=False,
                                           help="no progress bar")),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "train",
        help="train a model on a task or on text",
        description="Train an OpenMythos model. Single process: openmythos train --task parity "
                    "--steps 500 --out runs/parity. Data parallel: torchrun --nproc_per_node 2 "
                    "-m open_mythos train ... --parallel ddp (or fsdp).",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with [model] [data] [optim] "
                   "[schedule] [run] sections (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--resume", nargs="?", const="require", default="never",
                   choices=["require", "auto"], metavar="auto",
                   help="continue the run in --out from its newest intact checkpoint (an error "
                        "if it has none); '--resume auto': or start it from step 1 if it has none")
    for flag, key, kwargs in _FLAGS:
        kwargs = dict(kwargs)
        kwargs["help"] = f"{kwargs.get('help', '')} [{key}]".strip()
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", key.rpartition(".")[2].upper())
        p.add_argument(flag, dest=_dest(key), default=None, **kwargs)
    p.set_defaults(func=run)
    return p


def _dest(key: str) -> str:
    return "flag__" + key.replace(".", "__")


_SOURCES = ("data.task", "data.text", "data.prepared", "data.hf_dataset")


def config_from_args(args: argparse.Namespace, report: bool = False):
    """The :class:`~.config.TrainConfig` that ``args`` describe.

    To resume (``--resume``) without ``--config``, the base is the run's own
    ``config.toml`` (:func:`~.runfiles.resume_config`) rather than the defaults; with
    ``report``, the keys that the flags change in it are printed (stderr, rank 0).
    """
    from .config import UNSET, RunConfig, load_config, parse_override
    from .runfiles import changed_keys, resume_config

    pairs = []
    if any(getattr(args, _dest(key)) is not None for key in _SOURCES):
        # A data source on the command line replaces the file's, whichever it was, with the
        # file's task knobs (another task's arguments; --set data.task_args=... after it).
        pairs += [(key, UNSET) for key in (*_SOURCES, "data.task_args", "data.val_split")]
    pairs += [(key, getattr(args, _dest(key))) for _, key, _ in _FLAGS]
    pairs += [parse_override(text) for text in args.overrides]
    if args.resume != "never" and args.config is None:
        out = getattr(args, _dest("run.out")) or RunConfig.out
        own = resume_config(out)
        if own is not None:
            cfg = resume_config(out, pairs)
            if report:
                changed = changed_keys(own, cfg)
                _error(f"openmythos train: resuming with {out}/config.toml"
                       + (f", overridden: {'; '.join(changed)}" if changed else ""),
                       record=False)
            return cfg
    return load_config(args.config, pairs)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import CheckpointCorrupt
    from .config import ConfigError
    from .distributed import lost_peer, report_lost_peer
    from .trainer import Trainer, TrainingDiverged, TrainingInterrupted

    trainer = None
    try:
        cfg = config_from_args(args, report=True)
        trainer = Trainer(cfg, resume=args.resume)
        state = trainer.train()
    except ConfigError as err:
        _error(f"openmythos train: error: {err}")
        return 2
    except CheckpointCorrupt as err:  # one without a manifest is found damaged only here
        _error(f"openmythos train: error: {err}")
        return 2
    except TrainingDiverged as err:
        _error(f"openmythos train: training diverged: {err}")
        return 1
    except TrainingInterrupted as stop:
        saved = (f"saved in {stop.checkpoint}; continue with --resume" if stop.checkpoint
                 else "not saved (its last steps were skipped as non-finite)")
        by = "" if stop.signum == signal.SIGINT else f" by {signal.Signals(stop.signum).name}"
        _error(f"openmythos train: interrupted{by} after step {stop.step}, {saved}")
        return 128 + stop.signum  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them
    except KeyboardInterrupt:  # a second Ctrl-C, or a first one outside the training loop
        if trainer is None or not trainer.state.step and trainer.last_checkpoint is None:
            raise  # before training started: the command's one "interrupted" line
        last = trainer.last_checkpoint
        saved = (f"the newest checkpoint is {last}; continue from it with --resume" if last
                 else "nothing was saved")
        # (the trainer's handler turns a first Ctrl-C in its loop into a saved stop)
        how = ("stopped at once by a second Ctrl-C" if trainer.stop_signal == signal.SIGINT
               else "interrupted by Ctrl-C")
        _error(f"openmythos train: {how} after step {trainer.state.step}; {saved}")
        return 130
    except OSError as err:  # RunDirError names the path; a bare OSError its filename
        _error(f"openmythos train: error: {err}")
        return 3
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        # Said by whichever rank survives (a dead or stopped peer says nothing), once: by
        # the trainer as soon as its loop failed, before its cleanup (torchrun's SIGTERM to
        # the survivors often arrived during that cleanup, and the line was never printed).
        if trainer is None or not trainer.failure_reported:
            report_lost_peer(err, trainer.last_checkpoint if trainer is not None else None)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {state.step} steps ({state.bad_steps} skipped), run directory "
              f"{cfg.run.out}", file=sys.stderr)
    return 0


def _error(msg: str, record: bool = True) -> None:
    """Print ``msg`` on rank 0 (once, not once per torchrun process). Under torchrun, every
    rank also leaves it in its error file (``record``), which torchrun shows in its summary of
    a failed job: an error that only another rank met (its config file or data missing on
    its node) was otherwise said nowhere, and rank 0 said only that it lost its peers.
    Another launcher's other ranks print theirs, after ``rank N:``."""
    rank = os.environ.get("RANK", "0")
    recorded = record and _record_for_torchrun(msg)
    if rank != "0":
        if recorded or not record:
            return
        msg = f"rank {rank}: {msg}"
    with contextlib.suppress(OSError):  # stderr gone (| tee killed by the same Ctrl-C)
        print(msg, file=sys.stderr)


def _record_for_torchrun(msg: str) -> bool:
    """Write ``msg`` where torchrun reads a failed rank's error (``TORCHELASTIC_ERROR_FILE``,
    the format of its ``@record``: a message and a timestamp); True if it was written."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    import json
    import time

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": msg, "timestamp": int(time.time())}, f)
    except OSError:
        return False
    return True
