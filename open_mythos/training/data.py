"""Training data behind one interface: algorithmic tasks, local text, or a streamed dataset.

A :class:`DataSource` serves *global* batches by index, cut into shards. Global batch ``i``
of a split is a fixed function of ``(seed, split, i)`` with ``S * B`` rows, and shard ``s``
of ``S`` is rows ``[s * B, (s + 1) * B)``. The trainer uses one shard per (accumulation
micro-step, rank) pair: ``S = grad_accum * world_size``. Hence:

- the data position of a run is a single integer (global batches consumed), stored in the
  checkpoint, and a resumed run continues the exact stream;
- ``W`` ranks x ``A`` micro-steps of ``B`` rows see exactly the batch that one process
  with batch ``W * A * B`` sees, which is what makes DDP/FSDP and gradient accumulation
  comparable with a single process.

Every batch is ``{"input_ids": (B, L) long, "targets": (B, L) long}`` where ``targets`` is
``-100`` at positions without loss. Task batches also carry ``answer_start`` (B,), and with
per-loop targets ``trace`` (B, K) (:func:`open_mythos.tasks.batching.trace_targets`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, DataConfig

TRAIN, VAL = "train", "val"
DEFAULT_TEXT_SEQ_LEN = 128


class DataSource(ABC):
    """Indexed stream of global micro-batches (see the module docstring).

    Attributes:
        vocab_size: ids are in ``[0, vocab_size)``.
        seq_len: length ``L`` of every sequence.
        batch_size: rows per shard ``B``.
    """

    vocab_size: int
    seq_len: int
    batch_size: int

    @abstractmethod
    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1) -> dict[str, torch.Tensor]:
        """Shard ``shard`` of ``n_shards`` (``batch_size`` rows) of global batch ``index`` of
        ``split`` (``"train"`` or ``"val"``)."""

    def describe(self) -> str:
        """One line for the run log."""
        return type(self).__name__


def _rows(batch: dict[str, torch.Tensor], shard: int, rows: int) -> dict[str, torch.Tensor]:
    lo = shard * rows
    keys = ("input_ids", "targets", "answer_start", "trace")
    return {k: batch[k][lo:lo + rows] for k in keys if k in batch}


class TaskSource(DataSource):
    """Fresh examples of an algorithmic task (an infinite stream; never repeats in practice).

    Global batch ``i`` of a split is ``make_batch(task, random.Random(f"{seed}/{split}/{i}"),
    ...)``: string seeds are hashed with SHA-512 by ``random``, so the stream is identical in
    every process and Python version.
    """

    def __init__(self, name: str, task_args: dict[str, Any], val_split: str, batch_size: int,
                 seq_len: int | None, seed: int, with_trace: bool = False):
        from ..tasks import VOCAB_SIZE, get_task, list_tasks, make_batch

        if name not in list_tasks():
            raise ConfigError(f"data.task={name!r} is unknown; available: {', '.join(list_tasks())}")
        try:
            self.task = get_task(name, **task_args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.task_args for task {name!r}: {err}") from None
        self._splits = {TRAIN: "train", VAL: val_split}
        if val_split not in self.task.splits:
            raise ConfigError(
                f"data.val_split={val_split!r} is not a split of task {name!r}; "
                f"available: {', '.join(self.task.splits)}")
        longest = max(self.task.max_len(s) for s in self._splits.values())
        if seq_len is not None and seq_len < longest:
            raise ConfigError(
                f"data.seq_len={seq_len} is shorter than the longest {name!r} example "
                f"({longest} tokens); raise it or leave it unset")
        if with_trace and self.task.trace(self.task.generate(random.Random(0), "train").prompt) is None:
            raise ConfigError(f"optim.loop_targets: task {name!r} defines no per-step targets "
                              "(Task.trace); multihop and phop do")
        self._make_batch = make_batch
        self.with_trace = with_trace
        self.name, self.seed = name, seed
        self.vocab_size = VOCAB_SIZE
        self.seq_len = seq_len if seq_len is not None else longest
        self.batch_size = batch_size

    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}/{split}/{index}")
        full = self._make_batch(self.task, rng, self._splits[split],
                                self.batch_size * n_shards, self.seq_len, self.with_trace)
        return _rows(full, shard, self.batch_size)

    def describe(self) -> str:
        return f"task {self.name!r} ({self.task!r}), seq_len {self.seq_len}"


class PackedTextSource(DataSource):
    """A token stream cut into fixed-length windows (packing: documents are concatenated,
    separated by EOS, and windows cross document boundaries).

    The tail ``val_fraction`` of the stream is the validation split. Training windows are
    visited in a fresh random order each epoch (permutation seeded by ``(seed, epoch)``);
    validation windows in order. A window has ``seq_len + 1`` tokens: inputs are the first
    ``seq_len`` and targets the last ``seq_len``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 val_fraction: float, vocab_size: int, label: str):
        n_val = int(len(tokens) * val_fraction)
        self._streams = {TRAIN: tokens[: len(tokens) - n_val], VAL: tokens[len(tokens) - n_val:]}
        for split, stream in self._streams.items():
            if (len(stream) - 1) // seq_len < 1:
                raise ConfigError(
                    f"the {split} part of {label} has {len(stream)} tokens, fewer than one "
                    f"sequence of data.seq_len={seq_len} + 1; use more text or a shorter seq_len")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.label = seed, label
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def n_windows(self, split: str) -> int:
        return (len(self._streams[split]) - 1) // self.seq_len

    def _window_ids(self, split: str, first: int, count: int) -> np.ndarray:
        n = self.n_windows(split)
        seq = np.arange(first, first + count)
        if split == VAL:
            return seq % n
        # The permutations of the epochs a batch spans (usually one).
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(seq // n):
            if epoch != self._perm_epoch:
                self._perm_epoch = int(epoch)
                self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            sel = seq // n == epoch
            out[sel] = self._perm[seq[sel] % n]
        return out

    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1) -> dict[str, torch.Tensor]:
        first = (index * n_shards + shard) * self.batch_size
        windows = self._window_ids(split, first, self.batch_size)
        stream = self._streams[split]
        offsets = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(stream[offsets].astype(np.int64))
        return {"input_ids": chunk[:, :-1].contiguous(), "targets": chunk[:, 1:].contiguous()}

    def describe(self) -> str:
        return (f"{self.label}: {len(self._streams[TRAIN]):,} train / {len(self._streams[VAL]):,} "
                f"val tokens, seq_len {self.seq_len}")


class StreamingTextSource(DataSource):
    """Packed windows of a Hugging Face dataset read with ``streaming=True``.

    The stream is consumed in order: window ``g`` of the packed stream is global sequence
    ``g``. The first ``n_val_windows`` windows are the validation split and training starts
    after them. Resuming re-reads the stream up to the stored position (no random access).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, n_val_windows: int):
        self._cfg, self._tok = cfg, tokenizer
        self.vocab_size, self.seq_len, self.batch_size = tokenizer.vocab_size, seq_len, cfg.batch_size
        self._n_val = n_val_windows
        self._val = self._take(self._windows(), n_val_windows)
        self._iter, self._next = self._windows(), 0
        self._take(self._iter, n_val_windows)

    def _windows(self):
        datasets = _import_datasets()
        try:
            ds = datasets.load_dataset(self._cfg.hf_dataset, self._cfg.hf_config,
                                       split=self._cfg.hf_split, streaming=True)
        except Exception as err:  # network, missing config or split: all user-fixable
            raise ConfigError(f"data.hf_dataset={self._cfg.hf_dataset!r} could not be opened: "
                              f"{type(err).__name__}: {err}") from None
        eos = self._tok.eos_token_id
        buf: list[int] = []
        for row in ds:
            buf.extend(self._tok.encode(row[self._cfg.hf_text_field]))
            if eos is not None:
                buf.append(eos)
            while len(buf) >= self.seq_len + 1:
                yield np.asarray(buf[: self.seq_len + 1], dtype=np.int64)
                del buf[: self.seq_len]  # the last target is the next window's first input

    def _take(self, it, n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                raise ConfigError(
                    f"data.hf_dataset={self._cfg.hf_dataset!r} ran out after "
                    f"{len(out)} sequences of data.seq_len={self.seq_len}") from None
        return out

    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1) -> dict[str, torch.Tensor]:
        per_batch = self.batch_size * n_shards
        if split == VAL:
            rows = [self._val[(index * per_batch + j) % self._n_val] for j in range(per_batch)]
        else:
            if index * per_batch < self._next:  # an earlier position: restart the stream
                self._iter, self._next = self._windows(), 0
                self._take(self._iter, self._n_val)
            self._take(self._iter, index * per_batch - self._next)
            rows = self._take(self._iter, per_batch)
            self._next = (index + 1) * per_batch
        chunk = torch.from_numpy(np.stack(rows))
        full = {"input_ids": chunk[:, :-1].contiguous(), "targets": chunk[:, 1:].contiguous()}
        return _rows(full, shard, self.batch_size)

    def describe(self) -> str:
        return f"hf dataset {self._cfg.hf_dataset!r} (streamed), seq_len {self.seq_len}"


def build_data_source(cfg: DataConfig, seed: int, world_size: int = 1,
                      with_trace: bool = False) -> DataSource:
    """The source ``cfg`` describes: a task, local text, a streamed dataset, or (none set)
    the built-in corpus of Python documentation topics. ``with_trace`` adds the per-step
    targets of a task (``optim.loop_targets``).

    Raises:
        ConfigError: unknown task, unreadable files, missing optional packages, too little
            text, or per-step targets asked of data that has none.
    """
    if cfg.task:
        return TaskSource(cfg.task, cfg.task_args, cfg.val_split, cfg.batch_size, cfg.seq_len,
                          seed, with_trace)
    if with_trace:
        raise ConfigError("optim.loop_targets needs a task with per-step targets "
                          "(data.task = 'multihop' or 'phop'), not text")
    tokenizer = _load_tokenizer(cfg.tokenizer)
    seq_len = cfg.seq_len or DEFAULT_TEXT_SEQ_LEN
    if cfg.hf_dataset:
        n_val = cfg.eval_batches * cfg.batch_size * world_size
        return StreamingTextSource(cfg, tokenizer, seq_len, n_val)
    if cfg.text:
        docs, label = _read_text_files(cfg.text), f"text ({len(cfg.text)} path(s))"
    else:
        docs, label = builtin_corpus(), "built-in corpus (pydoc topics)"
    tokens = tokenize_documents(docs, tokenizer)
    return PackedTextSource(tokens, cfg.batch_size, seq_len, seed, cfg.val_fraction,
                            tokenizer.vocab_size, label)


def builtin_corpus() -> list[str]:
    """The Python documentation topics shipped with the standard library (about 0.5 MB of
    English prose and code), in a fixed order: a corpus that needs no download."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def tokenize_documents(docs: list[str], tokenizer: Any) -> np.ndarray:
    """All documents' ids, each followed by EOS (when the tokenizer has one), as int32."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        if eos is not None:
            ids.append(eos)
    dtype = np.int32 if tokenizer.vocab_size > np.iinfo(np.uint16).max else np.uint16
    return np.asarray(ids, dtype=dtype)


def _read_text_files(paths: list[str]) -> list[str]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"data.text: {str(p)!r} is neither a file nor a directory")
    if not files:
        raise ConfigError(f"data.text: no files found in {paths}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _load_tokenizer(spec: str) -> Any:
    from ..tokenizers import load_tokenizer

    if spec.lower() != "byte" and not Path(spec).expanduser().is_dir():
        raise ConfigError(
            f"data.tokenizer={spec!r} must be 'byte' or a local tokenizer directory "
            "(training never downloads)")
    try:
        return load_tokenizer(spec)
    except (ImportError, OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={spec!r} could not be loaded: {err}") from None


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.hf_dataset needs the Hugging Face 'datasets' package, which is not installed "
            "(pip install datasets); or train on --task NAME or --text PATH instead") from None
    return datasets
