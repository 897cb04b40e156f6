"""Argument types and up-front checks shared by the commands.

The checks run before any model is loaded, so that a bad argument costs a second rather than
a finished sweep whose results cannot be written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: The most loops a command accepts per forward: far past any depth a model extrapolates
#: to, and small enough that a typo (``1-100000``) fails at once instead of running out of
#: memory.
MAX_LOOPS = 1024


class Once(argparse.Action):
    """An option that may be given once: argparse keeps the last of repeated values, which
    for ``--prompt`` silently dropped every prompt but the last."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} takes one value and was given twice "
                         f"({getattr(namespace, self.dest)!r}, then {values!r})")
        setattr(namespace, self.dest, values)


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (argparse type; 0 lets the system pick a free one)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, got {text}")
    return value


def positive_int(text: str) -> int:
    """An ``int >= 1`` (argparse type)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An ``int >= 0`` (argparse type)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite ``float > 0`` (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def loop_count(text: str) -> int:
    """A loop count in ``1..MAX_LOOPS`` (argparse type)."""
    value = positive_int(text)
    if value > MAX_LOOPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LOOPS} loops, got {text}")
    return value


def loop_count_or_zero(text: str) -> int:
    """``0`` (off) or a loop count in ``1..MAX_LOOPS`` (argparse type)."""
    return 0 if non_negative_int(text) == 0 else loop_count(text)


def loop_counts(text: str) -> list[int]:
    """``"1,2,4,8"``, a range ``"1-16"`` or a mix -> sorted distinct counts in
    ``1..MAX_LOOPS`` (argparse type)."""
    loops: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_text, dash, hi_text = part.partition("-")
        try:
            if dash and not hi_text.strip():  # "2-" was read as 2
                raise ValueError
            lo, hi = int(lo_text), int(hi_text or lo_text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"loops must look like 1,2,4,8 or 1-16, got {text!r}") from None
        if min(lo, hi) < 1:
            raise argparse.ArgumentTypeError(f"loops must be positive integers, got {text!r}")
        if hi < lo:
            raise argparse.ArgumentTypeError(f"the range {part!r} is empty; write {hi}-{lo}")
        if hi > MAX_LOOPS:
            raise argparse.ArgumentTypeError(f"at most {MAX_LOOPS} loops, got {part!r}")
        loops.update(range(lo, hi + 1))
    if not loops:
        raise argparse.ArgumentTypeError(f"no loop count in {text!r}")
    return sorted(loops)


def name_list(text: str) -> list[str]:
    """A comma-separated list with at least one name (argparse type)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no name in {text!r}")
    return names


def check_output_file(path: str | Path, suffixes: Iterable[str] = ()) -> Path:
    """``path`` as a file this process can create (its missing parents included).

    Raises:
        ValueError: a suffix outside ``suffixes`` (when given), an existing directory, or a
            parent that cannot be created or written.
    """
    path = Path(path)
    suffixes = tuple(suffixes)
    if suffixes and path.suffix not in suffixes:
        raise ValueError(f"{str(path)!r} should end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name")
    _check_creatable(path.parent)
    return path


def output_file(text: str) -> Path:
    """An argparse type: :func:`check_output_file` of ``text`` (its error as a usage error)."""
    try:
        return check_output_file(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_output_dir(path: str | Path) -> Path:
    """``path`` as a directory this process can create or write into.

    Raises:
        ValueError: ``path`` is an existing file, or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    _check_creatable(path)
    return path


def _check_creatable(path: Path) -> None:
    """``path`` is a directory, or can be made one, with write access."""
    base = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not base.is_dir():
        raise ValueError(f"cannot create {path}: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {base}: permission denied")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
