"""The run directory's own safety: one writer at a time, explicit resume modes
(:class:`Resume`), an append-only metrics log, and OS errors reported as one line that
names the path (:class:`RunDirError`).

Lock: ``DIR/run.lock`` is held with ``flock(2)`` (exclusive, non-blocking) by the process
that writes the run (rank 0), from before its first check of the directory until it exits.
The kernel drops the lock when that process dies, however it dies, so a lock left by a
killed run is free: the next run takes it over (and says so). The file holds the holder's
PID, host and start time, which a refused second writer prints. The file itself is never
removed (removing it would let a third process lock a fresh inode beside a live holder).

NOTE: ``flock`` is per open file, so a second :class:`RunLock` in the same process is
refused too; the descriptor is closed in forked children, which therefore never keep the
lock alive after the holder exits. On Linux NFS clients ``flock`` is carried out as an NFS
byte-range lock (NLM for NFSv3, part of the protocol for v4), so writers on different
machines exclude each other; a mount with ``nolock`` or ``local_lock=flock`` keeps locks
local to one machine. A filesystem that refuses locks altogether (Lustre without
``-o flock``) gets a warning and an unlocked run.

Metrics: ``DIR/metrics.jsonl`` is only ever appended to. A resumed run keeps every row up
to the step it resumes from; rows a killed run logged after its last checkpoint (steps the
resumed run does again) are moved, byte for byte, to ``DIR/metrics.replaced.jsonl`` before
the new rows are appended, so no logged row is ever lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .config import ConfigError

try:
    import fcntl
except ImportError:  # not a POSIX system: runs go unlocked (with a warning)
    fcntl = None

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"
REPLACED_METRICS_FILE = "metrics.replaced.jsonl"
RESUMES_FILE = "resumes.jsonl"

# flock errors that mean "this filesystem does not do locks", not "someone holds it".
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirError(OSError):
    """An OS-level failure on the run directory (permission, not a directory, disk full);
    the message names the path."""


class RunLocked(ConfigError):
    """Another live process writes this run directory; the message names its PID and host."""


class Resume(str, Enum):
    """What a run does with a run directory that may already hold a run."""

    NEVER = "never"  # a new run: a directory that holds one is an error
    REQUIRE = "require"  # continue it: a directory without an intact checkpoint is an error
    AUTO = "auto"  # continue it if it has a checkpoint, else start it from step 1

    @classmethod
    def of(cls, value: bool | str | Resume) -> Resume:
        """``False`` -> NEVER, ``True`` -> REQUIRE, else the member of that value."""
        if isinstance(value, bool):
            return cls.REQUIRE if value else cls.NEVER
        return cls(value)


@contextlib.contextmanager
def os_errors(action: str, path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into :class:`RunDirError` ``"cannot ACTION PATH:
    REASON"`` (``PATH`` is the file the error names, if any, else ``path``)."""
    try:
        yield
    except RunDirError:
        raise
    except OSError as err:
        where = err.filename if err.filename is not None else path
        reason = err.strerror or str(err)
        if err.filename2 is not None and err.errno in (errno.EISDIR, errno.ENOTEMPTY,
                                                       errno.EEXIST):
            where = err.filename2  # a rename onto something in the way: name that
        if isinstance(err, FileExistsError) or err.errno == errno.ENOTDIR:
            reason = f"{reason} (a file is in the way of a directory)"
        elif err.errno == errno.EISDIR:
            reason = f"{reason} (a directory is in the way of a file)"
        raise RunDirError(f"cannot {action} {where}: {reason}") from None


@dataclass
class RunLock:
    """An exclusive lock on a run directory (see the module docstring).

    Attributes:
        path: the lock file.
        fd: its descriptor (closing it releases the lock); None when the filesystem has no
            locks.
        taken_over: the holder recorded by a process that died holding the lock, or None.
    """

    path: Path
    fd: int | None
    taken_over: str | None = None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock ``run_dir`` (which must exist) without waiting.

        Raises:
            RunLocked: another live process holds it.
            OSError: the lock file cannot be created or opened.
        """
        path = Path(run_dir) / LOCK_FILE
        if fcntl is None:
            return cls(path, None)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in _NO_LOCKS:
                return cls(path, None)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = holder or "another process (that has not yet recorded its PID)"
                raise RunLocked(f"{run_dir} is in use by {who}; wait for it to finish or stop "
                                "it, or choose another --out") from None
            raise
        # A holder that exits cleanly empties the file: what is left is a dead process's.
        stale = _read_holder(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        os.fsync(fd)
        lock = cls(path, fd, stale)
        os.register_at_fork(after_in_child=lock._forget)
        return lock

    def release(self) -> None:
        """Empty the holder record and release the lock (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock is released below all the same
        finally:
            os.close(fd)

    def _forget(self) -> None:
        # In a forked child: drop the inherited descriptor so that the child never keeps
        # the lock alive (closing a duplicate does not unlock the parent's).
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str | None:
    """``"PID 123 on host h (since ...)"`` from a lock file's record, or None if empty."""
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if not raw:
            return None
        rec = json.loads(raw)
        return f"PID {rec['pid']} on host {rec['host']} (since {rec['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (unreadable lock record)"


def replace_metrics_after(run_dir: str | Path, step: int) -> int:
    """Prepare ``run_dir/metrics.jsonl`` for a run that continues after ``step``: rows of
    later steps (and a torn last line) are appended to ``metrics.replaced.jsonl``, then cut
    from the end of the log; rows up to ``step`` are not touched.

    Returns:
        The number of rows moved.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    data = path.read_bytes()
    cut, offset = len(data), 0
    for line in data.splitlines(keepends=True):
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None  # a torn line: only ever the last one
        if row_step is None or row_step > step or not line.endswith(b"\n"):
            cut = offset
            break
        offset += len(line)
    tail = data[cut:]
    if not tail:
        return 0
    block = tail if tail.endswith(b"\n") else tail + b"\n"
    replaced = Path(run_dir) / REPLACED_METRICS_FILE
    # A process killed between the append and the cut leaves the rows in both files; the
    # next start finds the block already at the end of metrics.replaced.jsonl and only
    # cuts (rows carry their measured tokens_per_s: two runs' rows are never the same bytes).
    if not _ends_with(replaced, block):
        with open(replaced, "ab") as fh:
            fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
    with open(path, "r+b") as fh:
        fh.truncate(cut)
        os.fsync(fh.fileno())
    return len(tail.splitlines())


def _ends_with(path: Path, block: bytes) -> bool:
    """Whether the file at ``path`` exists and its last bytes are ``block``."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size < len(block):
                return False
            fh.seek(size - len(block))
            return fh.read() == block
    except FileNotFoundError:
        return False


def record_resume(run_dir: str | Path, record: dict) -> None:
    """Append ``record`` (the step and checkpoint a run resumed from, what changed since)
    as one JSON line to ``run_dir/resumes.jsonl``: ``config.toml`` holds only the newest
    configuration and old checkpoints are pruned, so this is what keeps the history of a
    run continued with other settings or other data."""
    with open(Path(run_dir) / RESUMES_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
