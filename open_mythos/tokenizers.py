"""Tokenizers: :class:`ByteTokenizer` (no download, the default) and :class:`MythosTokenizer`
over any Hugging Face tokenizer.

Both expose the same interface (:class:`Tokenizer`): ``encode``/``decode`` on single texts,
``batch_encode`` (or calling the tokenizer) for left-padded batches, and the ids of the
special tokens. ``vocab_size`` always counts the special tokens, so it is the number of
embedding rows a model needs (``MythosConfig(vocab_size=tok.vocab_size)``).
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_ID = "openai/gpt-oss-20b"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int,
             side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id sequences to one width: ``(input_ids (B, L), attention_mask (B, L))``, both
    int64, the mask 1 on real tokens, ``L`` the longest row.

    ``side="left"`` is the layout batched generation needs (the last column holds every
    row's last real token); ``"right"`` keeps each row at its own positions (scoring).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is invalid: use 'left' or 'right'")
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        input_ids[i, cols] = torch.as_tensor(r, dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask


class Tokenizer(ABC):
    """Common interface of the OpenMythos tokenizers.

    Subclasses implement :meth:`encode`, :meth:`decode` and the special-token properties;
    batching and padding live here.

    Attributes:
        add_bos_token: whether ``encode`` starts a text with BOS when the caller does not
            say (``add_bos=None``): what the model saw in training. False for text runs
            (documents are separated by EOS alone); a task run's byte tokenizer sets it,
            since every training example began with BOS.
    """

    add_bos_token: bool = False

    @abstractmethod
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by BOS / EOS (``add_bos=None``:
        :attr:`add_bos_token`)."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D sequence of ids."""

    def decode_piece(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as a piece of a longer text (special tokens dropped), for
        incremental decoding: without any clean-up that depends on the text around it.
        The default is :meth:`decode`."""
        return self.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for inside a text (a special token: its name): what
        logprobs show, so that tokens that are parts of one character differ. The default
        is the UTF-8 of the token decoded alone with its special name."""
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text of :meth:`decode_piece`: its
        :meth:`token_bytes`, and none for a special token, which ``decode_piece`` drops.
        The default takes BOS, EOS and the pad token for the special ones."""
        if token_id in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            return b""
        return self.token_bytes(token_id)

    def special_token_id(self, name: str) -> int | None:
        """The id of the special token spelt ``name`` exactly (``"<eos>"``), or None. The
        default knows BOS, EOS and the pad token."""
        for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            if i is not None and name == self.decode([i], skip_special_tokens=False):
                return i
        return None

    @property
    def decodes_bytes(self) -> bool:
        """Whether :meth:`decode_piece` is exactly the UTF-8 decoding of its tokens'
        :meth:`piece_bytes` joined, each invalid or unfinished sequence one U+FFFD
        (Python's ``errors="replace"``, Rust's ``from_utf8_lossy``): a byte tokenizer or a
        byte-level (GPT-2) decoder. Streamed text then follows the bytes exactly."""
        return False

    @property
    def replaces_each_byte(self) -> bool:
        """Whether :meth:`decode` shows each byte of an unfinished (or invalid) character as a
        U+FFFD of its own (a byte-fallback decoder), rather than one U+FFFD for the
        unfinished tail (Python's and Rust's UTF-8 decoding)."""
        return False

    def is_fallback_byte(self, token_id: int) -> bool:
        """Whether a token is one byte of a byte-fallback decoder (SentencePiece's
        ``<0xNN>``). Such a decoder decodes a run of them (special tokens between them
        dropped first) as one piece, all U+FFFDs when the run is not valid UTF-8: no text of
        a run is final before a token of another kind ends it."""
        return False

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids, special tokens included."""

    @property
    @abstractmethod
    def pad_token_id(self) -> int | None:
        """Id used to pad batches."""

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the tokenizer has none."""

    @property
    @abstractmethod
    def eos_token_id(self) -> int | None:
        """End-of-sequence id, or None if the tokenizer has none."""

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def start_token_id(self) -> int | None:
        """The token a text starts after, as in training: BOS when this tokenizer adds it
        (a task run's examples begin with it), else EOS (packed documents are separated by
        EOS alone, so a document starts after one), else BOS; None without either. The
        context of an empty prompt, and of a rolling log-likelihood's first window."""
        if self.add_bos_token and self.bos_token_id is not None:
            return self.bos_token_id
        return self.eos_token_id if self.eos_token_id is not None else self.bos_token_id

    def batch_encode(
        self,
        texts: str | Iterable[str],
        add_bos: bool | None = None,
        add_eos: bool = False,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """Encode and pad a batch of texts.

        Args:
            texts: one text or several.
            add_bos, add_eos: frame every text with BOS / EOS (``add_bos=None``:
                :attr:`add_bos_token`).
            padding_side: ``"left"`` (default; what batched generation needs: the last column
                holds every row's last real token) or ``"right"``.

        Returns:
            ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}`` where ``L`` is the
            longest encoding, padding ids are :attr:`pad_token_id` and the mask is 1 on real
            tokens, 0 on padding.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} is invalid: use 'left' or 'right'")
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        width = max((len(r) for r in rows), default=0)
        pad = self.pad_token_id
        if pad is None and any(len(r) < width for r in rows):
            raise ValueError("the tokenizer has no pad token (nor EOS) to pad the batch with")
        input_ids, attention_mask = pad_rows(rows, pad if pad is not None else 0, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, texts: str | Iterable[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Same as :meth:`batch_encode`."""
        return self.batch_encode(texts, **kwargs)


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then ``<pad>`` 256, ``<bos>`` 257,
    ``<eos>`` 258; ``vocab_size`` is 259.

    Needs no files and no download. Any text round-trips exactly. Special tokens are only
    produced by ``add_bos``/``add_eos`` (the text ``"<eos>"`` encodes as its five bytes), and
    BOS by default with ``add_bos_token=True`` (the tokenizer of a task run, whose examples
    all start with BOS: :func:`task_tokenizer`).
    """

    SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
    N_BYTES = 256

    def __init__(self, add_bos_token: bool = False):
        if not isinstance(add_bos_token, bool):
            raise TypeError(f"add_bos_token must be True or False, got {add_bos_token!r}")
        self.add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self.N_BYTES + len(self.SPECIAL_TOKENS)

    @property
    def pad_token_id(self) -> int:
        return self.N_BYTES

    @property
    def bos_token_id(self) -> int:
        return self.N_BYTES + 1

    @property
    def eos_token_id(self) -> int:
        return self.N_BYTES + 2

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text``; ``add_bos``/``add_eos`` frame them with 257 / 258
        (``add_bos=None``: :attr:`add_bos_token`)."""
        ids = list(_text(text).encode("utf-8"))
        if self.add_bos_token if add_bos is None else add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD.

        Special tokens are dropped, or written as ``<pad>``/``<bos>``/``<eos>`` when
        ``skip_special_tokens`` is False. Ids outside ``[0, vocab_size)`` raise ``ValueError``.
        """
        parts: list[str] = []
        buf = bytearray()
        for i in _as_id_list(ids):
            if 0 <= i < self.N_BYTES:
                buf.append(i)
            elif self.N_BYTES <= i < self.vocab_size:
                if not skip_special_tokens:
                    parts.append(buf.decode("utf-8", errors="replace"))
                    parts.append(self.SPECIAL_TOKENS[i - self.N_BYTES])
                    buf.clear()
            else:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_bytes(self, token_id: int) -> bytes:
        """The byte of a byte token; a special token's name."""
        if 0 <= token_id < self.N_BYTES:
            return bytes([token_id])
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def piece_bytes(self, token_id: int) -> bytes:
        """The byte of a byte token; nothing for a special token."""
        if 0 <= token_id < self.N_BYTES:
            return bytes([token_id])
        self.decode([token_id])  # the range check
        return b""

    @property
    def decodes_bytes(self) -> bool:
        return True

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``byte_tokenizer.json`` into ``directory`` (created if needed), return its path."""
        path = Path(directory) / BYTE_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        special = {t: self.N_BYTES + i for i, t in enumerate(self.SPECIAL_TOKENS)}
        path.write_text(json.dumps({"tokenizer_class": type(self).__name__,
                                    "vocab_size": self.vocab_size,
                                    "special_tokens": special,
                                    "add_bos_token": self.add_bos_token}, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ByteTokenizer:
        """Load what :meth:`save_pretrained` wrote; a mismatching file raises ``ValueError``."""
        path = Path(directory) / BYTE_TOKENIZER_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds no JSON object (the file was altered or damaged)")
        add_bos = data.get("add_bos_token", False)  # absent in files before 2026-12-06
        if not isinstance(add_bos, bool):
            raise ValueError(f"{path}: add_bos_token must be true or false, got {add_bos!r}")
        tok = cls(add_bos_token=add_bos)
        expected = {t: tok.N_BYTES + i for i, t in enumerate(tok.SPECIAL_TOKENS)}
        if data.get("vocab_size") != tok.vocab_size or data.get("special_tokens") != expected:
            raise ValueError(f"{path} does not describe this ByteTokenizer "
                             f"(vocab_size {tok.vocab_size}, special tokens {expected})")
        return tok

    def __repr__(self) -> str:
        bos = ", add_bos_token=True" if self.add_bos_token else ""
        return f"ByteTokenizer(vocab_size={self.vocab_size}{bos})"


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a byte-level
    BPE vocabulary (printable Latin-1 bytes as themselves, the rest from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


#: GPT-2's byte-level alphabet, character -> byte (byte-level BPE vocabularies spell bytes so).
BYTE_LEVEL_CHARS = _gpt2_byte_chars()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def task_tokenizer() -> ByteTokenizer:
    """The tokenizer of a model trained on the task suite (:mod:`open_mythos.tasks`): bytes
    with the tasks' special ids, every prompt starting with BOS as every training example
    did (``BOS prompt answer EOS``). Without that BOS a trained task model answers
    wrongly."""
    return ByteTokenizer(add_bos_token=True)


def _text(text: Any) -> str:
    """``text`` when it is a ``str`` of valid Unicode; TypeError for another type (bytes are
    decoded by the caller), ValueError for a lone UTF-16 surrogate (``"\\ud800"``, which
    JSON can carry), which no UTF-8 tokenizer can encode."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}"
                        + (" (decode bytes first: data.decode('utf-8'))"
                           if isinstance(text, (bytes, bytearray)) else ""))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text holds a lone surrogate (\\u{ord(text[err.start]):04x}) at "
                             f"character {err.start}: not valid Unicode, cannot be encoded") from None
    return text


def _require_special(token_id: int | None, name: str) -> int:
    if token_id is None:
        raise ValueError(f"the tokenizer defines no {name} token")
    return token_id


def _offline_env() -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value now."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


# Files AutoTokenizer builds a tokenizer from; a directory with none of them is not one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                    "tiktoken.model")


def _looks_like_local_path(spec: str) -> bool:
    """Whether ``spec`` names a filesystem path rather than a hub repo id ("org/name")."""
    return (os.path.isabs(spec) or spec.startswith(("./", "../", "~", ".\\", "..\\"))
            or os.path.exists(spec))


class MythosTokenizer(Tokenizer):
    """Wrapper over a Hugging Face tokenizer with the :class:`Tokenizer` interface.

    ``vocab_size`` is ``len(tokenizer)``, which counts added special tokens (the upstream
    wrapper used ``tokenizer.vocab_size``, which does not, leaving EOS outside the embedding).
    When the tokenizer has no pad token, EOS pads.

    Args:
        model_id: hub repo id or local directory of tokenizer files (upstream name and default).
        **kwargs: passed to ``transformers.AutoTokenizer.from_pretrained`` (e.g.
            ``local_files_only=True``, ``revision``, ``trust_remote_code``).

    Raises:
        ImportError: ``transformers`` is not installed (``pip install 'open-mythos[hf]'``).
        FileNotFoundError: ``model_id`` is a local path that is not an existing directory.
        OSError: the tokenizer could not be loaded (offline, unknown repo, missing files).
    """

    def __init__(self, model_id: str | os.PathLike = DEFAULT_MODEL_ID, **kwargs: Any):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "MythosTokenizer needs Hugging Face transformers: pip install 'open-mythos[hf]' "
                "(or use ByteTokenizer, which needs nothing)"
            ) from e
        spec = os.fspath(model_id)
        if _looks_like_local_path(spec):
            spec = os.path.expanduser(spec)
            if not os.path.isdir(spec):
                what = "is not a directory" if os.path.exists(spec) else "does not exist"
                raise FileNotFoundError(
                    f"tokenizer path {spec!r} {what}: pass a directory of tokenizer files "
                    "(tokenizer.json, tokenizer_config.json) or a Hugging Face repo id")
            if not any(os.path.isfile(os.path.join(spec, name)) for name in _TOKENIZER_FILES):
                raise FileNotFoundError(
                    f"tokenizer directory {spec!r} holds none of the files a tokenizer is "
                    f"loaded from ({', '.join(_TOKENIZER_FILES)})")
        if _offline_env():
            # NOTE: huggingface_hub reads HF_HUB_OFFLINE once, at import; honour a later
            # setting too, instead of retrying the network for most of a minute.
            kwargs.setdefault("local_files_only", True)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
        except ImportError:
            raise  # a library the tokenizer needs (sentencepiece...): its own message
        except Exception as e:  # noqa: BLE001
            # A tokenizer.json of another layout fails deep in the loaders, as a KeyError
            # of transformers or a bare Exception of the tokenizers library.
            raise OSError(
                f"could not load tokenizer {spec!r}: {e}\nFor offline use pass a local directory "
                "holding tokenizer files (e.g. written by save_pretrained) or a repo already in "
                "the Hugging Face cache, and set HF_HUB_OFFLINE=1 so nothing is fetched."
            ) from e

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> MythosTokenizer:
        """Wrap an already-built ``transformers.PreTrainedTokenizerBase``."""
        obj = cls.__new__(cls)
        obj.tokenizer = tokenizer
        return obj

    @property
    def vocab_size(self) -> int:
        """One past the largest id (``len(tokenizer)``, unless an id lies beyond it: a
        tokenizer whose added tokens leave a gap), so that every id it gives is in range."""
        n = len(self.tokenizer)
        cached = getattr(self, "_vocab_size", None)  # get_vocab() builds a dict: once per size
        if cached is None or cached[0] != n:
            cached = self._vocab_size = (
                n, max(n, max(self.tokenizer.get_vocab().values(), default=-1) + 1))
        return cached[1]

    @property
    def pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Ids of ``text`` without the tokenizer's automatic special tokens (as upstream),
        a special token's name inside it encoded as its characters, as training data is
        (:meth:`encode_literal`): a prompt reads as the model's training text did.
        ``add_bos``/``add_eos`` add BOS / EOS explicitly and raise ``ValueError`` if the
        tokenizer has none (``add_bos=None``: :attr:`add_bos_token`, False)."""
        ids = self.encode_literal(_text(text))
        if self.add_bos_token if add_bos is None else add_bos:
            ids.insert(0, _require_special(self.bos_token_id, "BOS"))
        if add_eos:
            ids.append(_require_special(self.eos_token_id, "EOS"))
        return ids

    def encode_literal(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text: a special token's string in it (``</s>`` in a web
        page) is encoded as characters, not as that token, as the byte tokenizer does with
        ``"<eos>"``. Training data is encoded this way, so a document never holds an EOS
        (a document boundary) that its text only spelled out."""
        return list(self.tokenizer.encode(text, add_special_tokens=False,
                                          split_special_tokens=True))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped by default, as upstream). Ids outside
        ``[0, vocab_size)`` raise ``ValueError`` (a Hugging Face tokenizer drops them)."""
        return self.tokenizer.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)

    def decode_piece(self, ids: Sequence[int]) -> str:
        """:meth:`decode` without ``clean_up_tokenization_spaces`` (which joins ``" n't"``
        and the like, and so changes text already streamed when the next token comes)."""
        return self.tokenizer.decode(self._checked(ids), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token inside a text, from its vocabulary entry through the
        decoder's own rules: a byte-level (GPT-2) token's bytes, a byte-fallback token
        ``<0xNN>`` its byte, SentencePiece's ``▁`` a space, a WordPiece token without its
        ``##`` or, starting a word, with the space before it. A special token is its name;
        under a decoder of another kind, the token is decoded alone."""
        (token_id,) = self._checked([token_id])
        hf = self.tokenizer
        piece = hf.convert_ids_to_tokens(token_id)
        if token_id in self._special_ids() or not isinstance(piece, str):
            return self.decode([token_id], skip_special_tokens=False).encode("utf-8")
        raw: bytes | None = None
        for step in self._decoder_steps():
            kind = step.get("type")
            if kind == "ByteLevel" and all(c in BYTE_LEVEL_CHARS for c in piece):
                raw = bytes(BYTE_LEVEL_CHARS[c] for c in piece)
            elif kind == "ByteFallback" and (m := _BYTE_FALLBACK.fullmatch(piece)):
                raw = bytes([int(m.group(1), 16)])
            elif kind == "Replace" and "String" in step.get("pattern", {}):
                piece = piece.replace(step["pattern"]["String"], step.get("content", ""))
            elif kind == "Metaspace":
                piece = piece.replace(step.get("replacement", "\u2581"), " ")
            elif kind == "WordPiece":
                prefix = step.get("prefix", "##")
                piece = piece[len(prefix):] if piece.startswith(prefix) else " " + piece
            elif kind not in ("Fuse", "Strip", "ByteLevel", "ByteFallback"):
                return self.decode([token_id], skip_special_tokens=False).encode("utf-8")
        return raw if raw is not None else piece.encode("utf-8")

    def piece_bytes(self, token_id: int) -> bytes:
        """:meth:`token_bytes`; nothing for a special token."""
        (token_id,) = self._checked([token_id])
        return b"" if token_id in self._special_ids() else self.token_bytes(token_id)

    @property
    def decodes_bytes(self) -> bool:
        """True for a byte-level (GPT-2) decoder alone, whose decode joins the tokens'
        bytes and decodes them with ``from_utf8_lossy``."""
        return [step.get("type") for step in self._decoder_steps()] == ["ByteLevel"]

    @property
    def replaces_each_byte(self) -> bool:
        return any(step.get("type") == "ByteFallback" for step in self._decoder_steps())

    def is_fallback_byte(self, token_id: int) -> bool:
        if not self.replaces_each_byte or token_id in self._special_ids():
            return False
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return isinstance(piece, str) and _BYTE_FALLBACK.fullmatch(piece) is not None

    def special_token_id(self, name: str) -> int | None:
        """The id of the special token spelt ``name`` exactly: any that the tokenizer's
        decode drops (the special-tokens map and added tokens marked special, such as
        ``<|endoftext|>``, ``<unk>`` or Llama 3's ``<|eot_id|>``)."""
        i = self.tokenizer.convert_tokens_to_ids(name)  # <unk>'s id for any unknown name
        if (isinstance(i, int) and i in self._special_ids()
                and self.tokenizer.convert_ids_to_tokens(i) == name):
            return i
        return super().special_token_id(name)

    def _special_ids(self) -> frozenset[int]:
        """The ids ``decode(skip_special_tokens=True)`` drops: ``all_special_ids`` and every
        added token marked special (Llama 3's ``<|eot_id|>`` and reserved tokens are only
        that), kept while the vocabulary keeps its size (transformers builds these at every
        call, and this runs per generated token)."""
        n = len(self.tokenizer)
        cached = getattr(self, "_specials", None)
        if cached is None or cached[0] != n:
            added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
            marked = {i for i, token in added.items() if getattr(token, "special", False)}
            cached = self._specials = (n, frozenset(self.tokenizer.all_special_ids) | marked)
        return cached[1]

    def _decoder_steps(self) -> list[dict[str, Any]]:
        """The backend decoder's steps in order (a ``Sequence`` flattened); ``[{"type":
        None}]`` (decode alone) without a ``tokenizers`` backend or decoder."""
        steps = getattr(self, "_steps", None)
        if steps is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
            steps = [{"type": None}] if decoder is None else (
                decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder])
            self._steps = steps
        return steps

    def _checked(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids = _as_id_list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside [0, {self.vocab_size})")
        return ids

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the wrapped tokenizer's files so ``MythosTokenizer(directory)`` loads them."""
        self.tokenizer.save_pretrained(os.fspath(directory))

    def __repr__(self) -> str:
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        return f"MythosTokenizer({name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | os.PathLike | Tokenizer | None = None) -> Tokenizer:
    """The tokenizer a name refers to.

    ``None`` or ``"byte"``: :class:`ByteTokenizer`; a :class:`Tokenizer`: itself; a directory
    holding ``byte_tokenizer.json``: that ByteTokenizer; anything else: ``MythosTokenizer(spec)``
    (a local directory or a Hugging Face repo id).
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "byte"):
        return ByteTokenizer()
    if isinstance(spec, Tokenizer):
        return spec
    if (Path(spec).expanduser() / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.from_pretrained(Path(spec).expanduser())
    return MythosTokenizer(spec)
