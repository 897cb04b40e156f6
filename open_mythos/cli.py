"""The ``openmythos`` command (also ``python -m open_mythos``).

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``: it
registers its parser and sets ``func`` (``args -> exit status``) as a default. Adding a
command is one line in :data:`COMMANDS`. Command modules import their optional extras
(``datasets``, ``transformers``, ``fastapi``...) inside ``func``, so that a missing extra
breaks only the command that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

COMMANDS: tuple[str, ...] = (
    "open_mythos.commands.demo",
    "open_mythos.training.command",
    "open_mythos.commands.prepare",
    "open_mythos.commands.generate",
    "open_mythos.commands.inspect",
    "open_mythos.commands.info",
    "open_mythos.commands.sweep",
    "open_mythos.commands.report",
    "open_mythos.commands.export",
    "open_mythos.commands.serve",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of :data:`COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="openmythos", description="OpenMythos: train and use Recurrent-Depth Transformers.")
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE (from the current directory or the Python path) before the "
             "command runs, for what your own code registers: tasks (register_task), model "
             "kinds (registry.register). Repeatable; put it before the command: "
             "openmythos --import my_tasks train ...")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


#: The options (argparse destinations) of the commands whose value is a path. (``train``'s
#: flags set configuration keys, whose paths the training configuration expands itself.)
PATH_OPTIONS = ("out", "checkpoint", "run", "baseline", "sweep", "config", "verify",
                "tokenizer")


def expand_home(args: argparse.Namespace) -> None:
    """``~`` at the start of a path option's value is the home directory, for every command
    alike: a quoted path (``--out "~/runs/x"``) or ``--out=~/x`` reaches the program with the
    ``~`` the shell did not expand; some commands expanded it and others created a folder
    named ``~`` in the working directory, or read nothing and said so in a report."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status
    (130 after Ctrl-C, with one line instead of a traceback, also while the commands load;
    141, quietly, when the reader of the output went away, as ``openmythos info ... |
    head`` does; 2, with one line, when standard output cannot be written: a full disk,
    ``>/dev/full``, or closed)."""
    command = ""
    stdout = sys.stdout
    watched = sys.stdout = _Watched(stdout) if stdout is not None else None
    try:
        parser = build_parser()  # imports every command: seconds, where Ctrl-C may come
        args = parser.parse_args(argv)
        expand_home(args)
        command = f" {args.command}"
        import_user_modules(parser, args.imports)
        if watched is None and args.command in WRITES_RESULTS:
            print(f"openmythos{command}: error: standard output is closed (>&-): its "
                  "results would be lost", file=sys.stderr)
            return 2
        status = int(args.func(args) or 0)
        if watched is not None:
            watched.flush()  # here, where a failure is reported, not at exit
        return status
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal
            print(f"openmythos{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _discard_stdout(stdout)  # buffered output would fail again at exit
        return 128 + 13  # as a process killed by SIGPIPE
    except OSError as err:
        if watched is None or watched.error is not err:
            raise  # not standard output's: the command's own error
        print(f"openmythos{command}: error: cannot write to standard output: "
              f"{err.strerror or err}", file=sys.stderr)
        _discard_stdout(stdout)
        return 2
    finally:
        if sys.stdout is watched:
            sys.stdout = stdout


#: The commands whose results go to standard output only (the others log to stderr or
#: write their results to files: export, sweep, report, train, prepare).
WRITES_RESULTS = frozenset({"generate", "info"})


class _Watched:
    """Standard output, remembering the ``OSError`` a write or flush of it raised (which
    :func:`main` reports as standard output's, and no other)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _discard_stdout(stdout: Any) -> None:
    """Point file descriptor 1 at the null device: output still buffered would fail again
    when Python flushes it at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())


def import_user_modules(parser: argparse.ArgumentParser, modules: Sequence[str]) -> None:
    """Import each of ``modules`` (``--import``), the current directory first on the path as
    ``python -m`` has it; a module that fails to import ends the command (exit status 2)."""
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            parser.error(f"--import {name}: {err}")
        except Exception as err:  # noqa: BLE001 - the user's module failed while importing
            parser.error(f"--import {name}: importing it raised {type(err).__name__}: {err}")


if __name__ == "__main__":
    raise SystemExit(main())
