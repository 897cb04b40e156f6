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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status
    (130 after Ctrl-C, with one line instead of a traceback; 141, quietly, when the reader
    of the output went away, as ``openmythos info ... | head`` does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import_user_modules(parser, args.imports)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal
            print(f"openmythos {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output still buffered would fail again when Python flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process killed by SIGPIPE


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
