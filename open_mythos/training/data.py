"""Training data behind one interface: algorithmic tasks, local text, or a streamed dataset.

A :class:`DataSource` serves *global* batches by index, cut into shards. Global batch ``i``
of a split is a fixed function of ``(seed, split, i)`` with ``S * B`` rows, and shard ``s``
of ``S`` is rows ``[s * B, (s + 1) * B)``. The trainer uses one shard per (accumulation
micro-step, rank) pair: ``S = grad_accum * world_size``. Hence:

- the data position of a run is global batches consumed and, for text, the sequences
  consumed (``start``), stored in the checkpoint: a resumed run continues the exact stream,
  and a text run resumed with another global batch (another number of processes or
  accumulation steps) continues at the next unread sequence;
- ``W`` ranks x ``A`` micro-steps of ``B`` rows see exactly the batch that one process
  with batch ``W * A * B`` sees, which is what makes DDP/FSDP and gradient accumulation
  comparable with a single process.

Every batch is ``{"input_ids": (B, L) long, "targets": (B, L) long}`` where ``targets`` is
``-100`` at positions without loss. Task batches also carry ``answer_start`` (B,), and with
per-loop targets ``trace`` (B, K) (:func:`open_mythos.tasks.batching.trace_targets`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..config import USER_CODE_HINT
from .config import ConfigError, DataConfig, error_line
from .documents import InputFormat, iter_documents, open_dataset, resolve_inputs
from .losses import IGNORE_INDEX
from .prepare import (
    ShardedTokens,
    encode_document,
    load_data_tokenizer,
    open_prepared,
    token_dtype,
)

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
    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1, *,
              start: int | None = None) -> dict[str, torch.Tensor]:
        """Shard ``shard`` of ``n_shards`` (``batch_size`` rows) of global batch ``index`` of
        ``split`` (``"train"`` or ``"val"``).

        ``start``: for sources that read a fixed sequence of examples (text), the global
        sequence this batch starts at (default ``index * n_shards * batch_size``). The
        trainer passes the sequences consumed so far, so that a run resumed with another
        global batch (another number of processes) continues where it stopped; sources that
        make their examples from ``index`` (tasks) ignore it."""

    def describe(self) -> str:
        """One line for the run log."""
        return type(self).__name__

    #: Whether :meth:`state_dict` holds anything (a stream's position and validation split).
    keeps_state = False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold, besides the batch index, to resume this source
        without replaying it (empty: the batch index is enough)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before asking for the batch it was taken at)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state besides the batch index")


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
        from ..tasks.batching import check_task

        if name not in list_tasks():
            raise ConfigError(f"data.task={name!r} is unknown; available: "
                              f"{', '.join(list_tasks())}{USER_CODE_HINT}")
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
        try:  # a user task's mistakes, named before any training
            check_task(self.task, list(dict.fromkeys(self._splits.values())), with_trace)
        except (TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"data.task: {err}") from None
        self._make_batch = make_batch
        self._last: tuple[tuple[str, int, int], dict[str, torch.Tensor]] | None = None
        self.with_trace = with_trace
        self.name, self.seed = name, seed
        self.task_args = dict(task_args)
        self.vocab_size = VOCAB_SIZE
        self.seq_len = seq_len if seq_len is not None else longest
        self.batch_size = batch_size

    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1, *,
              start: int | None = None) -> dict[str, torch.Tensor]:
        key = (split, index, n_shards)
        if self._last is None or self._last[0] != key:  # the other shards reuse it
            rng = random.Random(f"{self.seed}/{split}/{index}")
            self._last = (key, self._make_batch(self.task, rng, self._splits[split],
                                                self.batch_size * n_shards, self.seq_len,
                                                self.with_trace))
        return _rows(self._last[1], shard, self.batch_size)

    def describe(self) -> str:
        """One line for the run's header: the task, the knobs it was given (a task's repr
        shows its levels, not ``statements`` or ``open_ends``) and the context length."""
        knobs = f" {json.dumps(self.task_args, default=str)}" if self.task_args else ""
        return f"task {self.name!r}{knobs} ({self.task!r}), seq_len {self.seq_len}"


class PackedTextSource(DataSource):
    """A token stream cut into fixed-length windows (packing: documents are concatenated,
    separated by EOS, and windows cross document boundaries).

    The tail ``val_fraction`` of the stream is the validation split. Training windows are
    visited in a fresh random order each epoch (permutation seeded by ``(seed, epoch)``);
    validation windows in order. A window has ``seq_len + 1`` tokens: inputs are the first
    ``seq_len`` and targets the last ``seq_len``. ``tokens`` may be memory-mapped shards
    (:class:`~.prepare.ShardedTokens`): a batch reads only its windows.
    """

    def __init__(self, tokens: np.ndarray | ShardedTokens, batch_size: int, seq_len: int,
                 seed: int, val_fraction: float, vocab_size: int, label: str):
        self._tokens = tokens if isinstance(tokens, ShardedTokens) else ShardedTokens([tokens])
        total = len(self._tokens)
        n_val = int(total * val_fraction)
        self._spans = {TRAIN: (0, total - n_val), VAL: (total - n_val, n_val)}  # (start, length)
        for split, (_, length) in self._spans.items():
            if (length - 1) // seq_len < 1:
                raise ConfigError(
                    f"the {split} part of {label} has {length} tokens, fewer than one "
                    f"sequence of data.seq_len={seq_len} + 1; use more text or a shorter seq_len")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.label = seed, label
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def n_windows(self, split: str) -> int:
        return (self._spans[split][1] - 1) // self.seq_len

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

    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1, *,
              start: int | None = None) -> dict[str, torch.Tensor]:
        if start is None:
            start = index * n_shards * self.batch_size
        first = start + shard * self.batch_size
        windows = self._window_ids(split, first, self.batch_size)
        start = self._spans[split][0]
        offsets = start + windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(self._tokens.take(offsets).astype(np.int64))
        if chunk.numel() and int(chunk.max()) >= self.vocab_size:  # damaged shards
            bad = int(offsets.reshape(-1)[int(chunk.reshape(-1).argmax())])
            raise DataUnreadable(
                f"{self.label}: token {bad:,} of the stream is id {int(chunk.max())}, outside "
                f"the tokenizer's [0, {self.vocab_size}): a damaged shard (openmythos prepare "
                "--verify DIR checks them)")
        batch = {"input_ids": chunk[:, :-1].contiguous(), "targets": chunk[:, 1:].contiguous()}
        if split == VAL:
            _score_once(batch["targets"], first, self.n_windows(VAL))
        return batch

    def describe(self) -> str:
        return (f"{self.label}: {self._spans[TRAIN][1]:,} train / {self._spans[VAL][1]:,} "
                f"val tokens, seq_len {self.seq_len}")


def _score_once(targets: torch.Tensor, first: int, n_windows: int) -> None:
    """Validation asks for more rows than the held-out text has windows: the rows from
    global row ``n_windows`` on go round the windows again and are not scored (targets
    :data:`~.losses.IGNORE_INDEX`, in place), so ``val_loss`` is the mean over the
    windows, each counted once (scored again, some counted more than others)."""
    again = max(0, first + targets.shape[0] - max(first, n_windows))
    if again:
        targets[targets.shape[0] - again:] = IGNORE_INDEX


class DataExhausted(ConfigError):
    """A streamed dataset (read once, in order) has no more sequences."""


class DataUnreadable(ConfigError):
    """A streamed dataset's next rows could not be read (a malformed line in a local file,
    a value that is not text): the run stops there, as when the data runs out."""


class StreamingTextSource(DataSource):
    """Packed windows of a Hugging Face dataset read with ``streaming=True``.

    The stream is consumed in order: window ``g`` of the packed stream is global sequence
    ``g``. The first ``n_val_windows`` windows are the validation split and training starts
    after them. A fresh source replays the stream up to the batch it is asked for;
    :meth:`load_state_dict` instead continues from where :meth:`state_dict` was taken (the
    dataset's own position, via ``IterableDataset.state_dict``, and the tokens left over),
    which is the same stream without re-reading it.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, n_val_windows: int):
        self._cfg, self._tok = cfg, tokenizer
        self.vocab_size, self.seq_len, self.batch_size = tokenizer.vocab_size, seq_len, cfg.batch_size
        self._n_val = n_val_windows
        self._last: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        # Where the stream stood before a batch that could not be read whole: the state to
        # save, so that a resume continues from there rather than replaying the stream.
        self._before_failed: dict[str, Any] | None = None
        self._val = self._take(self._windows(), n_val_windows)
        self._iter = self._windows()
        self._take(self._iter, n_val_windows)

    @property
    def _next(self) -> int:
        """Training windows consumed by ``_iter``."""
        return self._iter.count - self._n_val

    def _windows(self, state: dict[str, Any] | None = None) -> _PackedWindows:
        return _PackedWindows(self._cfg, self._tok, self.seq_len, state)

    def _take(self, it: _PackedWindows, n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                raise DataExhausted(
                    f"data.hf_dataset={self._cfg.hf_dataset!r} ran out after "
                    f"{it.count} sequences of data.seq_len={self.seq_len} (a streamed "
                    "dataset is read once)") from None
        return out

    def batch(self, split: str, index: int, shard: int = 0, n_shards: int = 1, *,
              start: int | None = None) -> dict[str, torch.Tensor]:
        per_batch = self.batch_size * n_shards
        if split == VAL:
            rows = [self._val[(index * per_batch + j) % self._n_val] for j in range(per_batch)]
        else:
            first = index * per_batch if start is None else start
            if self._last is not None and self._last[0] == (first, per_batch):
                # Another shard of the global batch just read (the next accumulation
                # micro-step): the stream has moved past it, so serve it from memory.
                return _rows(self._last[1], shard, self.batch_size)
            if first < self._next:  # an earlier position: restart the stream
                self._iter = self._windows()
                self._take(self._iter, self._n_val)
            before = self._iter.state_dict()
            try:
                self._take(self._iter, first - self._next)
                rows = self._take(self._iter, per_batch)
            except (DataUnreadable, DataExhausted):
                self._before_failed = before  # the batch's windows read so far are lost
                raise
            self._before_failed = None
        chunk = torch.from_numpy(np.stack(rows))
        full = {"input_ids": chunk[:, :-1].contiguous(), "targets": chunk[:, 1:].contiguous()}
        if split == VAL:
            _score_once(full["targets"], index * per_batch, self._n_val)
        else:
            self._last = ((first, per_batch), full)
        return _rows(full, shard, self.batch_size)

    keeps_state = True

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream stands: after the last batch read whole (a batch that
        failed midway is read again from its first window)."""
        stream = (self._before_failed if self._before_failed is not None
                  else self._iter.state_dict())
        return {"n_val": self._n_val, **stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the training stream from ``state``.

        The split stays the one the state was taken with: its first ``n_val`` windows
        validate, also when this run asks for another number (another batch size, world
        size or ``data.eval_batches``; its validation batches then use part of those
        windows, or go round them again), and training continues at the first unread
        window. Rebuilding the split at the new size would move the start of training,
        skipping windows or training on former validation windows.
        """
        if not state:
            return
        n_val = int(state.get("n_val", self._n_val))
        if n_val != self._n_val:
            self._n_val = n_val
            self._val = self._take(self._windows(), n_val)
        self._iter = self._windows(state)
        self._last = self._before_failed = None

    def describe(self) -> str:
        return f"hf dataset {self._cfg.hf_dataset!r} (streamed), seq_len {self.seq_len}"


class _PackedWindows:
    """Windows of ``seq_len + 1`` tokens of a streamed dataset's packed documents, in order.

    ``count`` windows have been yielded; :meth:`state_dict` is where the stream stands:
    the dataset's position after the last row read and the tokens not yet yielded.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int,
                 state: dict[str, Any] | None = None):
        try:
            ds = open_dataset(cfg.hf_dataset, cfg.hf_config, cfg.hf_split)
        except ConfigError as err:  # "dataset 'x' could not be opened: ..."
            raise ConfigError(f"data.hf_dataset={str(err).removeprefix('dataset ')}") from None
        # A saved (map-style) dataset streams too, with a resumable position.
        self._ds = ds.to_iterable_dataset() if hasattr(ds, "to_iterable_dataset") else ds
        self._name, self._field = cfg.hf_dataset, cfg.hf_text_field
        self._tok, self._len = tokenizer, seq_len + 1
        self._dataset_state = None  # the loaded state, until a row is read
        self._buf: list[int] = []
        self.count = 0
        if state is not None:
            self._ds.load_state_dict(copy.deepcopy(state["dataset"]))
            self._dataset_state = state["dataset"]
            self._buf, self.count = list(state["buffer"]), int(state["windows"])
        self._rows: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> _PackedWindows:
        return self

    def __next__(self) -> np.ndarray:
        if self._rows is None:
            self._rows = iter(self._ds)
        while len(self._buf) < self._len:
            try:
                row = next(self._rows)  # StopIteration: the dataset ran out
                text = _text_of(row, self._field, self._name)
            except StopIteration:
                raise
            except Exception as err:  # noqa: BLE001 - the datasets library's readers raise anything
                cause = (str(err) if isinstance(err, ConfigError) else
                         f"data.hf_dataset={self._name!r} could not be read: {error_line(err)}")
                raise DataUnreadable(f"{cause} (reading sequence {self.count + 1} of the "
                                     "stream)") from err
            self._dataset_state = None
            self._buf.extend(self._tok.encode(text))
            if self._tok.eos_token_id is not None:
                self._buf.append(self._tok.eos_token_id)
        window = np.asarray(self._buf[: self._len], dtype=np.int64)
        del self._buf[: self._len - 1]  # the last target is the next window's first input
        self.count += 1
        return window

    def state_dict(self) -> dict[str, Any]:
        dataset = self._dataset_state if self._dataset_state is not None else self._ds.state_dict()
        return {"windows": self.count, "dataset": copy.deepcopy(dataset),
                "buffer": list(self._buf)}


def _text_of(row: dict[str, Any], field: str, name: str) -> str:
    if field not in row:
        raise ConfigError(f"data.hf_text_field={field!r}: dataset {name!r} has no such column "
                          f"(columns: {', '.join(map(str, row))})")
    text = row[field]
    if not isinstance(text, str):
        raise ConfigError(f"data.hf_text_field={field!r}: dataset {name!r} holds a "
                          f"{type(text).__name__} value there, not text (an empty CSV cell "
                          "reads as None)")
    return text


def val_batches(data: DataSource, n_batches: int, world_size: int = 1
                ) -> list[dict[str, torch.Tensor]]:
    """Every row of the first ``n_batches`` validation batches of ``data`` as
    ``world_size`` processes evaluate them together: what the trainer's validation scored.
    Each global batch's shards (one per process, ``batch_size`` rows each) come one after
    the other, ``n_batches * world_size`` batches in all: one process evaluating them holds
    no more rows at once than each of the trainer's did."""
    return list(iter_val_batches(data, n_batches, world_size))


def iter_val_batches(data: DataSource, n_batches: int, world_size: int = 1
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`val_batches` one at a time (made only as they are read)."""
    return (data.batch(VAL, i, shard, world_size)
            for i in range(n_batches) for shard in range(world_size))


def val_fingerprint(data: DataSource, batches: Iterable[dict[str, torch.Tensor]]
                    ) -> str | None:
    """A hash of ``batches``, the first validation batches of ``data`` as the trainer
    evaluated them (:func:`val_batches`), what
    :func:`~open_mythos.evaluation.runs.run_val_batches` rebuilds from a run's
    configuration: a checkpoint records it so that an evaluation on files changed since
    training is told so. A streamed dataset's held-out rows (the first windows of the
    stream: a local file's, or a hub dataset's revision) are hashed too; they depend on the
    number of processes, which callers compare first."""
    digest = hashlib.sha256()
    seen: dict[bytes, torch.Tensor] = {}
    for batch in batches:
        ids, targets = batch["input_ids"].to(torch.int64), batch["targets"].to(torch.int64)
        # A row left unscored as a window already scored (_score_once) is hashed with that
        # window's targets: the files decide the hash, and runs saved before rows were
        # left unscored keep theirs (a resume or sweep called their unchanged data changed).
        targets = targets.clone()
        for r in range(ids.shape[0]):
            key = ids[r].numpy().tobytes()
            if bool(targets[r].eq(IGNORE_INDEX).all()) and key in seen:
                targets[r] = seen[key]
            seen.setdefault(key, targets[r])
        digest.update(ids.contiguous().numpy().tobytes())
        digest.update(targets.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_data_source(cfg: DataConfig, seed: int, world_size: int = 1,
                      with_trace: bool = False) -> DataSource:
    """The source ``cfg`` describes: a task, local text, a streamed dataset, a prepared
    directory, or (none set) the built-in corpus of Python documentation topics.
    ``with_trace`` adds the per-step targets of a task (``optim.loop_targets``).

    Raises:
        ConfigError: unknown task, unreadable files, text that is not UTF-8 (unless
            ``data.encoding_errors`` allows it), missing optional packages, too little
            text, a prepared directory of another tokenizer, or per-step targets asked of
            data that has none.
    """
    if cfg.task:
        return TaskSource(cfg.task, cfg.task_args, cfg.val_split, cfg.batch_size, cfg.seq_len,
                          seed, with_trace)
    if with_trace:
        raise ConfigError("optim.loop_targets needs a task with per-step targets "
                          "(data.task = 'multihop' or 'phop'), not text")
    tokenizer = load_data_tokenizer(cfg.tokenizer)  # warns when it has no EOS
    seq_len = cfg.seq_len or DEFAULT_TEXT_SEQ_LEN
    if cfg.hf_dataset:
        n_val = cfg.eval_batches * cfg.batch_size * world_size
        return StreamingTextSource(cfg, tokenizer, seq_len, n_val)
    if cfg.prepared:
        prepared = open_prepared(cfg.prepared)
        prepared.check_tokenizer(tokenizer, cfg.tokenizer)
        return PackedTextSource(prepared.tokens, cfg.batch_size, seq_len, seed, cfg.val_fraction,
                                tokenizer.vocab_size, f"prepared {cfg.prepared}")
    if cfg.text:
        docs = _read_text_files(cfg.text, cfg.encoding_errors, cfg.hf_text_field)
        label = f"text ({len(cfg.text)} path(s))"
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


def tokenize_documents(docs: Iterable[str | Iterable[str]], tokenizer: Any) -> np.ndarray:
    """All documents' ids, each followed by EOS (when the tokenizer has one), as uint16
    (uint32 for vocabularies over 65536 ids). A document is a string or an iterable of
    pieces of one (:func:`~.prepare.encode_document`: what ``openmythos prepare`` writes)."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts = [ids for doc in docs
             for ids in encode_document((doc,) if isinstance(doc, str) else doc, tokenizer, dtype)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _read_text_files(paths: list[str], errors: str = "strict",
                     text_field: str = "text") -> Iterator[Iterable[str]]:
    """The documents of local files, as ``openmythos prepare`` reads them: a text file is
    one document, a ``.jsonl``/``.json`` or ``.parquet`` file or a ``save_to_disk``
    directory one per row (``text_field``); directories are read recursively. Each document
    is read when iterated."""
    try:
        inputs = resolve_inputs(paths, InputFormat.AUTO)
    except ConfigError as err:
        raise ConfigError(f"data.text: {err}") from None
    for inp in inputs:
        yield from iter_documents(inp, errors, text_field)
