"""Compatibility module for code written against upstream ``open_mythos.tokenizer``:
the tokenizers live in :mod:`open_mythos.tokenizers`."""

from .tokenizers import DEFAULT_MODEL_ID, MythosTokenizer

__all__ = ["DEFAULT_MODEL_ID", "MythosTokenizer"]
