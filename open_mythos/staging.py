"""Hidden folders that a command writes its output into before moving it into place.

A command that writes several files into a directory (a conversion, a report) writes them
into a hidden folder inside it first, so that an error or a kill never leaves a mix of old
and new files, or a half-written result that loads. The writer holds an exclusive
``flock(2)`` on its folder while it writes: a folder that nobody holds is a killed
writer's and is removed by the next one, while a live writer's is left alone. A process ID
in the name could not tell the two apart: in a container every run gets the same few PIDs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: folders cannot be locked
    fcntl = None


def lock_folder(folder: str | Path) -> int | None:
    """An exclusive ``flock`` on ``folder``, taken without waiting: its descriptor (close it
    to release), -1 where the system or filesystem has no locks (nothing tells a live
    writer apart then), None when another process holds it."""
    if fcntl is None:
        return -1
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        return -1
    return fd


def _release(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def remove_killed(out: str | Path, prefix: str) -> list[Path]:
    """Remove the folders named ``prefix*`` in ``out`` that no live writer holds (a killed
    writer's); returns those a live writer holds."""
    live = []
    for folder in sorted(Path(out).glob(f"{prefix}*")):
        if not folder.is_dir():
            continue
        fd = lock_folder(folder)
        if fd is None:
            live.append(folder)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            _release(fd)
    return live


@contextlib.contextmanager
def staging_folder(out: str | Path, prefix: str) -> Iterator[Path]:
    """A new folder ``out/prefix<pid>``, locked while the ``with`` block runs and removed
    after it (whatever it still holds: move what it should keep out of it first).

    Raises:
        FileExistsError: a folder of that name exists (:func:`remove_killed` first).
    """
    folder = Path(out) / f"{prefix}{os.getpid()}"
    folder.mkdir()
    fd = None
    try:
        fd = lock_folder(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _release(fd)


__all__ = ["lock_folder", "remove_killed", "staging_folder"]
