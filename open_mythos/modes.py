"""Eval mode for inference code, shared by the threads that use one model at once."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

# model -> [users, the mode the first user found]
_USERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, its previous mode restored afterwards.

    Counted per model: while several threads run inference on one model, the first to
    enter switches it to eval mode and the last to leave restores the mode the first found.
    Each switching on its own (``was = model.training; model.eval(); ...;
    model.train(was)``) let a thread that finished first put a shared train-mode model back
    in train mode under another thread's forward (dropout on, the expert load counted).
    """
    with _LOCK:
        entry = _USERS.get(model)
        if entry is None:
            entry = _USERS[model] = [0, model.training]
            if model.training:
                model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _USERS[model]
                if entry[1]:
                    model.train()
