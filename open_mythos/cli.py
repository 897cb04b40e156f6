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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status
    (130 after Ctrl-C, with one line instead of a traceback; 141, quietly, when the reader
    of the output went away, as ``openmythos info ... | head`` does)."""
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
