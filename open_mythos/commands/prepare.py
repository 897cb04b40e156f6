"""``openmythos prepare``: tokenise a corpus once into memory-mapped token shards.

::

    openmythos prepare corpus/ --out data/corpus-byte
    openmythos prepare train.jsonl --text-field body --tokenizer tok/ --out data/corpus-bpe
    openmythos prepare saved_dataset/ --out data/ds          # a Dataset.save_to_disk dir
    openmythos prepare --format hf my/dataset --hf-split train --out data/ds
    openmythos train --config configs/small_text.toml --set data.prepared=data/corpus-byte
    openmythos prepare --verify data/corpus-byte              # re-hash every shard

Inputs: text files (each one document), JSON lines (``.jsonl``/``.json``), Parquet
(``.parquet``), directories of those (recursively), a ``save_to_disk`` dataset directory,
or (``--format hf``) a dataset name for ``datasets.load_dataset``, streamed. The format of
the output directory: :mod:`open_mythos.training.prepare` and ``docs/training.md``.

Exit status: 0 on success; 1 when ``--verify`` finds a damaged shard; 2 for invalid
arguments or input (text that is not UTF-8 names the file and byte offset); 3 when writing
``--out`` fails (permission, a full disk).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prepare`` on the ``openmythos`` command."""
    from ..training.config import ENCODING_ERRORS
    from ..training.documents import InputFormat

    p = subparsers.add_parser(
        "prepare", help="tokenise text, JSONL, Parquet or a dataset into token shards",
        description="Tokenise a corpus into memory-mapped token shards with a manifest; train "
                    "on them with --set data.prepared=DIR (no tokenisation at start-up).")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, directories, a save_to_disk dataset, or (--format hf) a "
                        "dataset name")
    p.add_argument("--out", metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--format", default=InputFormat.AUTO.value,
                   choices=[f.value for f in InputFormat],
                   help="input format (default: by file suffix)")
    p.add_argument("--tokenizer", default="byte", metavar="DIR",
                   help="'byte' (default) or a local tokenizer directory [data.tokenizer]")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / column holding the text (default 'text')")
    p.add_argument("--encoding-errors", default="strict", choices=list(ENCODING_ERRORS),
                   help="bytes that are not UTF-8: an error (default), U+FFFD, or dropped "
                        "[data.encoding_errors]")
    p.add_argument("--hf-config", metavar="NAME", help="dataset configuration name")
    p.add_argument("--hf-split", default="train", metavar="NAME",
                   help="dataset split (default 'train')")
    p.add_argument("--shard-tokens", type=int, metavar="N",
                   help="tokens per shard file (default 2^28)")
    p.add_argument("--verify", metavar="DIR",
                   help="check the shards of a prepared directory against its manifest")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError
    from ..training.documents import InputFormat
    from ..training.prepare import SHARD_TOKENS, prepare, verify_prepared

    try:
        if args.verify:
            if args.inputs or args.out:
                raise ConfigError("--verify DIR takes no inputs and no --out")
            problems = verify_prepared(args.verify)
            for problem in problems:
                print(f"openmythos prepare: {args.verify}: {problem}", file=sys.stderr)
            print(f"{args.verify}: {'damaged' if problems else 'intact'}", file=sys.stderr)
            return 1 if problems else 0
        if not args.inputs or not args.out:
            raise ConfigError("give the inputs and --out DIR (or --verify DIR)")
        t0 = time.perf_counter()
        with _terminate_as_interrupt(), _progress_bar(args.progress) as report:
            stats = prepare(args.inputs, args.out, args.tokenizer, fmt=InputFormat(args.format),
                            text_field=args.text_field, encoding_errors=args.encoding_errors,
                            hf_config=args.hf_config, hf_split=args.hf_split,
                            shard_tokens=SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
                            progress=report)
    except ConfigError as err:
        print(f"openmythos prepare: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing --out: permission, a full disk (the message names the file)
        print(f"openmythos prepare: error: {err}", file=sys.stderr)
        return 3
    seconds = time.perf_counter() - t0
    print(f"wrote {args.out}: {stats.tokens:,} tokens in {stats.shards} shard(s) from "
          f"{stats.documents:,} documents ({stats.chars / 1e6:.1f}M characters, "
          f"{seconds:.1f} s, {stats.chars / 1e6 / max(seconds, 1e-9):.1f}M characters/s)",
          file=sys.stderr)
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what a scheduler or ``kill`` sends) stops a prepare as Ctrl-C does: the
    shards written so far are removed and the command exits 130."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _progress_bar:
    """A tqdm bar of characters read, as a ``progress(chars)`` callback (or none). The bar
    appears with the first characters read: inputs refused up front print no empty bar
    before their error."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        return self._update if self.enabled else None

    def _update(self, chars: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(unit="char", unit_scale=True, desc="prepare", file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)
        self._bar.update(chars - self._bar.n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
