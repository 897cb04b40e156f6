"""Prepared data: a corpus tokenised once into memory-mapped token shards with a manifest.

``openmythos prepare`` (:func:`prepare`) writes a directory::

    manifest.json          what the shards hold (below); written last
    tokens-00000.bin       raw token ids, little-endian, dtype of the manifest
    tokens-00001.bin       ...

The token stream is the one in-memory packing builds (:func:`.data.tokenize_documents`):
every document's ids followed by EOS (when the tokenizer has one), documents in input
order. Shards are consecutive slices of that stream (a document may continue in the next
shard). ``manifest.json``::

    {"format": "openmythos-tokens", "version": 1,
     "dtype": "uint16",                      # uint16 when vocab_size <= 65536, else uint32
     "tokens": 123456, "documents": 42,
     "tokenizer": {"spec": "byte", "class": "ByteTokenizer", "vocab_size": 259,
                   "eos_token_id": 258, "fingerprint": "<sha256>",
                   "pipeline": "<sha256>"},     # Hugging Face tokenizers only
     "shards": [{"file": "tokens-00000.bin", "tokens": 123456,
                 "sha256": "<sha256 of the file>"}],
     "inputs": [...], "text_field": "text", "encoding_errors": "strict"}

Training (``data.prepared``) opens it with :func:`open_prepared`: the manifest is read and
each shard memory-mapped, its size checked, never read whole (start-up costs milliseconds
whatever the corpus size; :func:`verify_prepared` checks the checksums). A tokenizer whose
fingerprint (vocabulary and special ids) or pipeline (how text becomes ids: normaliser,
pre-tokeniser, merges, added tokens) differs from the manifest's is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ENCODING_ERRORS, ConfigError
from .documents import InputFormat, iter_documents, resolve_inputs, split_pieces

MANIFEST = "manifest.json"
FORMAT, VERSION = "openmythos-tokens", 1
SHARD_TOKENS = 1 << 28
"""Default tokens per shard file (512 MB of uint16)."""
_WRITE_TOKENS = 1 << 22  # tokens buffered before a write


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_document(pieces: Iterable[str], tokenizer: Any, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The ids of one document, piece by piece (:func:`.documents.split_pieces`), then EOS
    when the tokenizer has one: the unit both in-memory packing and :func:`prepare` use."""
    encode = getattr(tokenizer, "encode_literal", tokenizer.encode)  # special strings as text
    for piece in split_pieces(pieces):
        yield np.asarray(encode(piece), dtype=dtype)
    if tokenizer.eos_token_id is not None:
        yield np.asarray([tokenizer.eos_token_id], dtype=dtype)


def load_data_tokenizer(spec: str) -> Any:
    """The tokenizer ``data.tokenizer`` names: ``"byte"`` or a local directory.

    Raises:
        ConfigError: anything else (training never downloads), or files that do not load.
    """
    from ..tokenizers import load_tokenizer

    if spec.lower() != "byte" and not Path(spec).expanduser().is_dir():
        raise ConfigError(
            f"data.tokenizer={spec!r} must be 'byte' or a local tokenizer directory "
            "(training never downloads)")
    try:
        tokenizer = load_tokenizer(spec)
    except (ImportError, OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={spec!r} could not be loaded: "
                          f"{_one_line(err)}") from None
    if tokenizer.eos_token_id is None:
        warnings.warn(
            f"data.tokenizer={spec!r} has no EOS token, so packed documents run together "
            "with nothing between them; add one (for a Hugging Face tokenizer: "
            "tok.add_special_tokens({'eos_token': '</s>'}); tok.save_pretrained(DIR)) or "
            "use the byte tokenizer", stacklevel=3)
    return tokenizer


def _one_line(err: Exception, limit: int = 300) -> str:
    """The loader's own error (not the wrapper's advice on downloading, which training never
    does) on one line, cut at ``limit`` characters."""
    cause = err.__cause__ if isinstance(err.__cause__, Exception) else err
    text = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, KeyError):  # its text is the key alone ('added_tokens')
        text = f"no {text} entry (KeyError)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def tokenizer_identity(tokenizer: Any, spec: str) -> dict[str, Any]:
    """What a manifest records of the tokenizer: its ``spec`` (``data.tokenizer``) and a
    fingerprint of its vocabulary and special ids, which is what must match at training."""
    vocab = tokenizer.tokenizer.get_vocab() if hasattr(tokenizer, "tokenizer") else None
    payload = {
        "class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "vocab": sorted(vocab.items()) if vocab is not None else None,
    }
    digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()
    identity = {"spec": spec, "class": payload["class"], "vocab_size": tokenizer.vocab_size,
                "eos_token_id": tokenizer.eos_token_id, "fingerprint": digest}
    pipeline = _pipeline_digest(tokenizer)
    if pipeline is not None:
        identity["pipeline"] = pipeline
    return identity


#: The parts of ``tokenizer.json`` that turn a text into ids as training encodes it (no
#: special tokens added around a text, so the post-processor's template does not count,
#: nor the decoder, which turns ids back into text).
_PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "model", "added_tokens")


def _pipeline(tokenizer: Any, legacy: bool = False) -> str | None:
    """How a Hugging Face fast tokenizer turns text into ids, as text: its normaliser,
    pre-tokeniser, model (merges) and added tokens (``tokenizer.json``). ``legacy``: the
    whole ``tokenizer.json`` less its truncation and padding, as manifests written before
    2026-12-08 hash it (an export's tokenizer, whose BOS template ``openmythos export``
    removes, was refused for data prepared with the run's own). None for the byte
    tokenizer and tokenizers without a serialisable pipeline."""
    backend = getattr(getattr(tokenizer, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    if legacy:
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {key: spec.get(key) for key in _PIPELINE_PARTS}
    return json.dumps(spec, sort_keys=True, ensure_ascii=False)


def _pipeline_digest(tokenizer: Any, legacy: bool = False) -> str | None:
    pipeline = _pipeline(tokenizer, legacy)
    return None if pipeline is None else hashlib.sha256(pipeline.encode()).hexdigest()


@dataclass
class PrepareStats:
    """What :func:`prepare` wrote."""

    tokens: int
    documents: int
    shards: int
    chars: int  # characters of text read


def _check_options_read(resolved: list[Any], text_field: str, hf_config: str | None,
                        hf_split: str) -> None:
    """ConfigError for an option set away from its default that no input reads (a
    misspelt ``--text-field`` went unnoticed until a JSON file came along), as ``openmythos
    train`` refuses ``[data]`` keys its source does not read."""
    kinds = {inp.format for inp in resolved}
    unread = []
    if text_field != "text" and not kinds & {InputFormat.JSONL, InputFormat.PARQUET,
                                             InputFormat.HF}:
        unread.append(f"--text-field {text_field!r} (read from JSONL, Parquet and datasets)")
    for flag, value, default in (("--hf-config", hf_config, None), ("--hf-split", hf_split,
                                                                    "train")):
        if value != default and InputFormat.HF not in kinds:
            unread.append(f"{flag} {value!r} (read from datasets only)")
    if unread:
        raise ConfigError(f"no input reads {' or '.join(unread)}: these inputs are "
                          f"{', '.join(sorted(k.value for k in kinds))}; remove the option")


def prepare(inputs: Iterable[str], out: str | Path, tokenizer_spec: str = "byte", *,
            fmt: InputFormat = InputFormat.AUTO, text_field: str = "text",
            encoding_errors: str = "strict", hf_config: str | None = None,
            hf_split: str = "train", shard_tokens: int = SHARD_TOKENS,
            progress: Callable[[int], None] | None = None) -> PrepareStats:
    """Tokenise ``inputs`` into ``out`` (see the module docstring).

    Memory stays bounded by a few pieces and one write buffer, whatever the corpus size.
    The manifest is written last (through a temporary file and a rename), so a directory
    without one is an interrupted run, never a silently short corpus.

    Args:
        inputs: files or directories (:func:`.documents.resolve_inputs`).
        out: output directory; must not exist or be empty.
        tokenizer_spec: ``"byte"`` or a local tokenizer directory.
        fmt: input format (:class:`.documents.InputFormat`); ``AUTO`` goes by suffix.
        text_field: JSON field, Parquet column or dataset column holding the text.
        encoding_errors: ``"strict"``, ``"replace"`` or ``"ignore"`` for bytes that are not UTF-8.
        hf_config, hf_split: for datasets (``load_dataset`` or a saved ``DatasetDict``).
        shard_tokens: tokens per shard file.
        progress: called with the number of characters of text read so far.

    Raises:
        ConfigError: unreadable or malformed input, an unknown tokenizer, a non-empty ``out``.
        OSError: writing ``out`` failed (a full disk...); the shards written are removed.
    """
    if shard_tokens <= 0:
        raise ConfigError(f"shard_tokens={shard_tokens} must be > 0")
    if encoding_errors not in ENCODING_ERRORS:
        raise ConfigError(f"encoding_errors={encoding_errors!r} is invalid: use "
                          f"{', '.join(map(repr, ENCODING_ERRORS))}")
    resolved = resolve_inputs(inputs, fmt)
    _check_options_read(resolved, text_field, hf_config, hf_split)
    tokenizer = load_data_tokenizer(tokenizer_spec)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        leftover = out.is_dir() and not (out / MANIFEST).exists() \
            and any(out.glob("tokens-*.bin"))
        raise ConfigError(
            f"--out {str(out)!r} already exists and is not an empty directory"
            + (" (it holds shards but no manifest: an interrupted prepare; delete it and "
               "run again)" if leftover else ""))
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {str(out)!r} cannot be created: {err.strerror or err}") from None
    dtype = token_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(out, dtype, shard_tokens)
    reader = _Counter(progress)
    n_docs = 0
    try:
        for inp in resolved:
            for doc in iter_documents(inp, encoding_errors, text_field, hf_config, hf_split):
                for ids in encode_document(reader.count(doc), tokenizer, dtype):
                    writer.write(ids)
                n_docs += 1
        shards = writer.close()
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name,
            "tokens": sum(s["tokens"] for s in shards), "documents": n_docs,
            "tokenizer": tokenizer_identity(tokenizer, tokenizer_spec),
            "shards": shards,
            "inputs": [{"path": i.path, "format": i.format.value} for i in resolved],
            "text_field": text_field, "encoding_errors": encoding_errors,
        }
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out / MANIFEST)  # the last step: from here the corpus is whole
    except BaseException:
        # No half-written corpus is left behind to be mistaken for one, whenever it stops
        # (an interrupt while the manifest was built left shards without one).
        writer.discard()
        with contextlib.suppress(OSError):
            (out / (MANIFEST + ".tmp")).unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return PrepareStats(manifest["tokens"], n_docs, len(shards), reader.chars)


class _Counter:
    """Counts the characters of the pieces passing through, for progress reports."""

    def __init__(self, progress: Callable[[int], None] | None):
        self.chars, self._progress = 0, progress

    def count(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            self.chars += len(piece)
            if self._progress is not None:
                self._progress(self.chars)
            yield piece


class _ShardWriter:
    """Appends id arrays to ``tokens-NNNNN.bin`` files of ``shard_tokens`` ids each,
    hashing the bytes as they are written (no second read)."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype.newbyteorder("<"), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._fh: Any = None
        self._hash = hashlib.sha256()
        self._in_shard = 0  # tokens written to the open shard

    def write(self, ids: np.ndarray) -> None:
        self._buf.append(ids)
        self._buffered += len(ids)
        if self._buffered >= _WRITE_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        data = np.concatenate(self._buf).astype(self.dtype, copy=False)
        self._buf, self._buffered = [], 0
        while len(data):
            if self._fh is None:
                name = f"tokens-{len(self.shards):05d}.bin"
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})  # then made:
                self._fh = open(self.out / name, "wb")  # discard() always knows the file
            take = min(len(data), self.shard_tokens - self._in_shard)
            raw = data[:take].tobytes()
            self._fh.write(raw)
            self._hash.update(raw)
            self._in_shard += take
            data = data[take:]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._fh.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._fh, self._hash, self._in_shard = None, hashlib.sha256(), 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        if self._fh is not None:
            self._close_shard()
        return self.shards

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        for shard in self.shards:
            (self.out / shard["file"]).unlink(missing_ok=True)


class ShardedTokens:
    """Token arrays (memory maps, or in-memory arrays) seen as one 1-D stream.

    :meth:`take` gathers ids at arbitrary positions; only the pages holding them are read.
    """

    def __init__(self, shards: list[np.ndarray]):
        shards = [s for s in shards if len(s)]
        self._shards = shards
        self._ends = np.cumsum([len(s) for s in shards], dtype=np.int64)
        self._starts = self._ends - np.asarray([len(s) for s in shards], dtype=np.int64)
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The ids at ``positions`` (any shape, values in ``[0, len)``), same shape."""
        if len(self._shards) == 1:
            return np.asarray(self._shards[0][positions])
        flat = positions.ravel()
        which = np.searchsorted(self._ends, flat, side="right")
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._shards[s][flat[sel] - self._starts[s]]
        return out.reshape(positions.shape)


@dataclass
class PreparedData:
    """An opened prepared directory: its manifest and its token stream (memory-mapped)."""

    path: Path
    manifest: dict[str, Any]
    tokens: ShardedTokens

    def check_tokenizer(self, tokenizer: Any, spec: str) -> None:
        """Refuse a tokenizer other than the one the shards were written with.

        Raises:
            ConfigError: the fingerprints (vocabulary and special ids) differ, or, where
                the manifest records it (prepared since 2026-12-06), the text-to-ids
                pipeline (normaliser, pre-tokeniser, merges, added tokens).
        """
        want = self.manifest["tokenizer"]
        have = tokenizer_identity(tokenizer, spec)
        if ("pipeline" in want and have["fingerprint"] == want["fingerprint"]
                and want["pipeline"] not in (have.get("pipeline"),
                                             _pipeline_digest(tokenizer, legacy=True))):
            raise ConfigError(
                f"data.prepared={str(self.path)!r} was tokenised with {want['spec']!r}, and "
                f"data.tokenizer={spec!r} has the same vocabulary but turns text into ids "
                "another way (its normaliser, pre-tokeniser, merges or added tokens "
                f"differ); set data.tokenizer={want['spec']!r} or prepare the data again "
                "with this tokenizer")
        if have["fingerprint"] != want["fingerprint"]:
            raise ConfigError(
                f"data.prepared={str(self.path)!r} was tokenised with {want['spec']!r} "
                f"({want['class']}, vocab {want['vocab_size']}), but data.tokenizer={spec!r} "
                f"is {have['class']} with vocab {have['vocab_size']} (a different vocabulary "
                f"or special ids); set data.tokenizer={want['spec']!r} or prepare the data "
                "again with this tokenizer")


def open_prepared(path: str | Path) -> PreparedData:
    """Read ``path/manifest.json`` and memory-map its shards (no data is read).

    Raises:
        ConfigError: no manifest (not prepared, or an interrupted prepare), another format
            or version, a shard missing or of the wrong size.
    """
    path = Path(path).expanduser()
    manifest = _read_manifest(path)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards = []
    for shard in manifest["shards"]:
        file = path / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        try:
            size = file.stat().st_size
        except OSError as err:
            raise ConfigError(f"data.prepared: shard {str(file)!r} cannot be read: "
                              f"{err.strerror or err}") from None
        if size != expected:
            raise ConfigError(f"data.prepared: shard {str(file)!r} has {size} bytes, the "
                              f"manifest says {expected}: the directory is damaged; prepare "
                              "the data again")
        if shard["tokens"]:
            shards.append(np.memmap(file, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return PreparedData(path, manifest, ShardedTokens(shards))


def verify_prepared(path: str | Path) -> list[str]:
    """The problems of a prepared directory: each shard read in full and its sha256
    compared with the manifest's (empty list: intact)."""
    path = Path(path).expanduser()
    problems = []
    for shard in _read_manifest(path)["shards"]:
        digest = hashlib.sha256()
        try:
            with open(path / shard["file"], "rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
        except OSError as err:
            problems.append(f"{shard['file']}: {err.strerror or err}")
            continue
        if digest.hexdigest() != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest's")
    return problems


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"data.prepared={str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"data.prepared={str(path)!r} is a file; it takes the directory "
                          "`openmythos prepare` wrote")
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.prepared={str(path)!r} has no {MANIFEST}: not a directory "
                          "written by `openmythos prepare` (or the prepare was interrupted)"
                          ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.prepared: {str(file)!r} cannot be read: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"data.prepared: {str(file)!r} is not a {FORMAT} manifest of "
                          f"version {VERSION}")
    for shard in manifest.get("shards", []):
        name = shard.get("file") if isinstance(shard, dict) else None
        # Shards live in the directory itself: a path elsewhere is a damaged or forged manifest.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ConfigError(f"data.prepared: {str(file)!r} names a shard outside its "
                              f"directory: {name!r}")
    return manifest
