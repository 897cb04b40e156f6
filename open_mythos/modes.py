"""Eval mode for inference code, shared by the threads that use one model at once."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

# model -> [users, the modes the first user found: (module, training) of every module]
_USERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` and every submodule in eval mode for the block, each module's previous
    mode restored afterwards (a submodule a user left in train mode included).

    Counted per model: while several threads run inference on one model, the first to
    enter switches it to eval mode and the last to leave restores the modes the first found.
    Each switching on its own (``was = model.training; model.eval(); ...;
    model.train(was)``) let a thread that finished first put a shared train-mode model back
    in train mode under another thread's forward (dropout on, the expert load counted).
    """
    with _LOCK:
        entry = _USERS.get(model)
        if entry is None:
            modes = [(m, m.training) for m in model.modules()]
            entry = _USERS[model] = [0, modes]
            if any(training for _, training in modes):
                model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _USERS[model]
                for module, training in entry[1]:
                    module.training = training
