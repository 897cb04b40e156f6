"""Warnings of the library, printed the way a command prints its other messages."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parents[1]


def warnings_as_notes(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``run``: a warning that OpenMythos itself gives while it runs
    is printed at once as one line, ``openmythos COMMAND: warning: MESSAGE``, like the
    command's other messages (Python's format adds a source file, a line number and a line
    of code, which read as a crash and hid, for one, that a sweep left a split out).
    Warnings of other libraries keep Python's format."""

    def decorate(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def wrapped(*args: Any, **kwargs: Any) -> int:
            with warnings.catch_warnings():
                default = warnings.showwarning

                def show(message: Warning | str, category: type[Warning], filename: str,
                         lineno: int, file: Any = None, line: str | None = None) -> None:
                    if Path(filename).resolve().is_relative_to(_PACKAGE):
                        print(f"openmythos {command}: warning: {message}",
                              file=file or sys.stderr)
                    else:
                        default(message, category, filename, lineno, file, line)

                warnings.showwarning = show
                return run(*args, **kwargs)

        return wrapped

    return decorate
