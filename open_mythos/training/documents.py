"""Documents read from local text, JSON lines, Parquet or a Hugging Face dataset, streamed.

A document is an iterator of text *pieces* (a large text file is never read whole); its
token ids are the concatenation of the pieces' ids. :func:`split_pieces` cuts a document
into pieces at line ends, as a function of the text alone (never of how the file was
read), so every path that tokenises a document (in-memory ``data.text``, ``openmythos
prepare``) gets the same ids.

Bytes that are not UTF-8 follow ``errors`` (``data.encoding_errors``): ``"strict"`` raises
:class:`~.config.ConfigError` naming the file and the byte offset; ``"replace"`` and
``"ignore"`` are Python's codec handlers.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .config import ConfigError, as_member, error_line

PIECE_CHARS = 1 << 20
"""A piece ends at the first line end after this many characters (see :func:`split_pieces`)."""
READ_BYTES = 1 << 22
"""Bytes read from a text file at a time."""
BOM = "\ufeff"
"""A UTF-8 byte-order mark: dropped at the start of a text or JSON lines file."""


class InputFormat(str, Enum):
    """How ``openmythos prepare`` reads an input path."""

    AUTO = "auto"  # by suffix: .jsonl/.json, .parquet, a save_to_disk directory; else text
    TEXT = "text"  # each file one document
    JSONL = "jsonl"  # one JSON object per line, text in a field
    PARQUET = "parquet"  # text in a column
    HF = "hf"  # a save_to_disk directory, or a dataset for datasets.load_dataset


@dataclass(frozen=True)
class Input:
    """One resolved input: a file (text, JSONL, Parquet) or a dataset (``HF``)."""

    path: str
    format: InputFormat


def resolve_inputs(paths: Iterable[str], fmt: InputFormat = InputFormat.AUTO) -> list[Input]:
    """Directories expanded to their files (recursively, sorted), each file's format decided.

    A directory written by ``Dataset.save_to_disk`` is one ``HF`` input; with ``fmt=HF`` a
    path that does not exist is a dataset name for ``datasets.load_dataset``.

    Raises:
        ConfigError: a path that does not exist, or no input file at all.
    """
    fmt = as_member(InputFormat, fmt, "format")
    out: list[Input] = []
    for path in map(Path, paths):
        if not path.exists() and path.expanduser().exists():
            path = path.expanduser()  # "~/corpus" quoted past the shell
        what = _not_text_dir(path)
        if what == PREPARED:
            raise ConfigError(f"{str(path)!r} is {PREPARED}: train on it with --prepared "
                              "(data.prepared), not as text")
        if what is not None:
            raise ConfigError(f"{str(path)!r} is {what}, not text")
        if fmt in (InputFormat.AUTO, InputFormat.HF) and _is_saved_dataset(path):
            out.append(Input(str(path), InputFormat.HF))
        elif fmt is InputFormat.HF:
            out.append(Input(str(path), InputFormat.HF))
        elif path.is_dir():
            # Hidden files and directories (.git, .cache, ...) are not the corpus.
            files = sorted(f for f in path.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            nested = sorted((f.parent, what) for f in files if f.name == "manifest.json"
                            and (what := _not_text_dir(f.parent)) is not None)
            if nested:
                raise ConfigError(
                    f"{str(nested[0][0])!r} inside the input {str(path)!r} is {nested[0][1]}, "
                    "not text: move it out of the corpus or name the inputs one by one")
            out += [Input(str(f), _format_of(f) if fmt is InputFormat.AUTO else fmt) for f in files]
        elif path.is_file():
            out.append(Input(str(path), _format_of(path) if fmt is InputFormat.AUTO else fmt))
        else:
            raise ConfigError(f"{str(path)!r} is neither a file nor a directory")
    if not out:
        raise ConfigError(f"no input files found in {[str(p) for p in paths]}")
    return out


def iter_documents(inp: Input, errors: str = "strict", text_field: str = "text",
                   hf_config: str | None = None, hf_split: str = "train") -> Iterator[Iterator[str]]:
    """The documents of ``inp``, each an iterator of text pieces.

    Raises:
        ConfigError: bytes that are not UTF-8 (``errors="strict"``), a malformed JSON line, a
            missing or non-text ``text_field``, a dataset that cannot be opened.
    """
    if inp.format is InputFormat.TEXT:
        yield read_text_file(inp.path, errors)
    elif inp.format is InputFormat.JSONL:
        yield from (iter((t,)) for t in _jsonl_texts(inp.path, errors, text_field))
    elif inp.format is InputFormat.PARQUET:
        yield from (iter((t,)) for t in _parquet_texts(inp.path, errors, text_field))
    elif inp.format is InputFormat.HF:
        yield from (iter((t,)) for t in _dataset_texts(inp.path, text_field, hf_config, hf_split))
    else:
        raise ValueError(f"unresolved input format {inp.format!r}")


def read_text_file(path: str | Path, errors: str = "strict") -> Iterator[str]:
    """The decoded text of a file, :data:`READ_BYTES` at a time (never the whole file),
    without a UTF-8 byte-order mark at its start (Windows tools write one; it is not text)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0  # bytes of the file handed to the decoder so far
    start = True  # no text yielded yet
    with _open(path) as fh:
        while True:
            chunk = fh.read(READ_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a split character held back
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset - pending + err.start, err) from None
            offset += len(chunk)
            if start and text:
                text, start = text.removeprefix(BOM), False
            if text:
                yield text
            if not chunk:
                return


def split_pieces(chunks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cut a document's text into pieces: each ends after the first ``"\\n"`` at or past
    ``size`` characters from its start, or at ``4 * size`` characters if there is none.

    The cuts depend on the text only, not on the chunks it arrives in. A subword tokenizer
    sees each piece separately, so its ids may differ from encoding the whole text by a
    token or two at each cut (one cut per ``size`` characters or more): a pre-tokenizer
    may group the whitespace around a line end differently (GPT-2's splits
    ``"  \n"`` in two inside a text, not at its end), a Metaspace (SentencePiece style)
    one prepends ``"▁"`` to every string it encodes, and a hard cut (inside a line of
    ``4 * size`` characters) may split a word. Byte encodings are unaffected by any cut.
    """
    limit = 4 * size
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) > size:
            end = buf.find("\n", size, limit)
            if end >= 0:
                cut = end + 1
            elif len(buf) >= limit:
                cut = limit
            else:
                break
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _jsonl_texts(path: str, errors: str, field: str) -> Iterator[str]:
    offset = 0
    with _open(path) as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start, err, f"line {number}") from None
            offset += len(raw)
            if number == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: line {number} is not JSON: {err}") from None
            yield _field(row, field, path, f"line {number}", errors)


def _parquet_texts(path: str, errors: str, field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet input needs the 'pyarrow' package (pip install pyarrow, or "
                          "pip install datasets, which brings it)") from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{path}: not a readable Parquet file: {err}") from None
    names = parquet.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{path}: no column {field!r} (columns: {', '.join(names)}); "
                          "choose the text column with --text-field")
    kind = parquet.schema_arrow.field(field).type
    dictionary = pa.types.is_dictionary(kind)  # e.g. a pandas categorical column
    if not _is_text_type(pa, kind.value_type if dictionary else kind):
        raise ConfigError(f"{path}: column {field!r} holds {kind}, not text")
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        column = batch.column(0).dictionary_decode() if dictionary else batch.column(0)
        # As bytes: Parquet does not guarantee that a string column is valid UTF-8.
        for value in column.cast(pa.large_binary()).to_pylist():
            row += 1
            if value is None:
                raise ConfigError(f"{path}: row {row} has no text in column {field!r}")
            try:
                yield value.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err.start, err, f"row {row} of column {field!r}") from None


def _is_text_type(pa: Any, kind: Any) -> bool:
    """String or binary Arrow types, plain, large or view (views: pyarrow >= 16)."""
    names = ("is_string", "is_large_string", "is_string_view",
             "is_binary", "is_large_binary", "is_binary_view")
    return any(getattr(pa.types, name, lambda _: False)(kind) for name in names)


def open_dataset(name: str, config: str | None = None, split: str = "train") -> Any:
    """A dataset to iterate over: a ``save_to_disk`` directory (its ``split`` if it holds
    several), a local ``.jsonl``/``.json``, ``.parquet``, ``.csv`` or ``.txt`` file (read by the
    ``datasets`` builder of that format, streamed), or else a name or local directory for
    ``datasets.load_dataset`` (streamed).

    Raises:
        ConfigError: the dataset cannot be opened (a missing split or config, no network...).
    """
    datasets = import_datasets()
    path = Path(name).expanduser()
    builder = _LOCAL_BUILDERS.get(path.suffix.lower()) if path.is_file() else None
    if config is not None and (builder is not None or _is_saved_dataset(path)):
        raise ConfigError(f"a dataset configuration ({config!r}) names a part of a dataset "
                          f"loaded by name; {name!r} is a local file or saved dataset, which "
                          "has none")
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KeyError(f"no split {split!r} (splits: {', '.join(ds)}; choose "
                                   "one with openmythos prepare --hf-split, or stream it with "
                                   "--hf-dataset and data.hf_split)")
                ds = ds[split]
            return ds
        if builder is not None:
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                         streaming=True)
        if path.is_file():
            raise ValueError(f"a local file must end in {', '.join(sorted(_LOCAL_BUILDERS))}")
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # a missing split or config, no network: all user-fixable
        raise ConfigError(f"dataset {name!r} could not be opened: {type(err).__name__}: {err}"
                          ) from None


#: The ``datasets`` builders that read a local file, by suffix.
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                   ".txt": "text"}


def _dataset_texts(name: str, field: str, config: str | None, split: str) -> Iterator[str]:
    ds = open_dataset(name, config, split)
    columns = ds.column_names
    if columns is not None and field not in columns:
        raise ConfigError(f"dataset {name!r} has no column {field!r} (columns: "
                          f"{', '.join(columns)}); choose the text column with --text-field")
    rows = iter(ds)
    row = 0
    while True:
        try:
            example = next(rows)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - the datasets library's readers raise anything
            raise ConfigError(f"dataset {name!r} could not be read after {row} rows: "
                              f"{error_line(err)}") from err
        row += 1
        yield _field(example, field, name, f"row {row}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _field(row: Any, field: str, where: str, position: str, errors: str = "strict") -> str:
    """``row[field]``, or an error that says which record and which fields there are.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), which is not text any
    tokenizer can encode: an error under ``errors="strict"``; replaced by U+FFFD or dropped
    under ``"replace"`` / ``"ignore"``."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: {position} is a JSON {type(row).__name__}, not an object")
    if field not in row:
        raise ConfigError(f"{where}: {position} has no field {field!r} (fields: "
                          f"{', '.join(map(str, row))}); choose the text field with "
                          "--text-field (data.hf_text_field)")
    text = row[field]
    if not isinstance(text, str):
        raise ConfigError(f"{where}: {position}: field {field!r} is a "
                          f"{type(text).__name__}, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        if errors == "strict":
            raise ConfigError(
                f"{where}: {position}: field {field!r} holds a lone surrogate "
                f"(\\u{ord(text[err.start]):04x}), not text; set data.encoding_errors="
                "'replace' or 'ignore' (--encoding-errors) to read it anyway") from None
        text = _SURROGATE.sub("\ufffd" if errors == "replace" else "", text)
    return text


def _not_utf8(path: str | Path, offset: int, err: UnicodeDecodeError,
              where: str = "") -> ConfigError:
    bad = err.object[err.start:err.end][:4].hex(" ")
    at = f"{where}, byte {offset}" if where else f"byte offset {offset}"
    return ConfigError(f"{path}: not UTF-8 at {at} (bytes {bad}: {err.reason}); set "
                       "data.encoding_errors='replace' or 'ignore' (--encoding-errors) to "
                       "read it anyway")


def _open(path: str | Path):
    try:
        return open(path, "rb")
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None


def _format_of(path: Path) -> InputFormat:
    suffix = path.suffix.lower()  # DATA.JSONL is JSON lines too
    if suffix in (".jsonl", ".json"):
        return InputFormat.JSONL
    if suffix == ".parquet":
        return InputFormat.PARQUET
    return InputFormat.TEXT


PREPARED = "a directory of prepared token shards (`openmythos prepare` output)"


def _not_text_dir(path: Path) -> str | None:
    """What ``path`` is if it is a directory this library wrote that holds no text: the
    output of ``openmythos prepare`` (or its start), or a training checkpoint."""
    if not path.is_dir():
        return None
    if any(path.glob("tokens-*.bin")):
        return PREPARED
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if str(manifest.get("format", "")).startswith("openmythos-tokens"):
        return PREPARED
    if "step" in manifest and "files" in manifest:
        return "a training checkpoint (`openmythos train` output)"
    return None


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset(Dict).save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def import_datasets() -> Any:
    """The ``datasets`` module, or a :class:`ConfigError` that says how to get it."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.hf_dataset needs the Hugging Face 'datasets' package, which is not installed "
            "(pip install datasets); or train on --task NAME or --text PATH instead") from None
    return datasets
