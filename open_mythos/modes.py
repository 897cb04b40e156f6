"""Eval mode for inference code, shared by the threads that use one model at once."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

# model -> [users, the modules a user found in train mode (to be put back by the last)]
_USERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block; the modules that were in train mode are put
    back in it afterwards.

    Counted per model: while several threads run inference on one model, the first to
    find it in train mode switches it to eval mode and the last to leave puts back the
    modules it found training. Each call switching on its own (``was = model.training;
    model.eval(); ...; model.train(was)``) let a thread that finished first put a shared
    train-mode model back in train mode under another thread's forward (dropout on, the
    expert load counted). A model already in eval mode costs a dictionary lookup (decoding
    enters this once per token); a submodule a user set to train mode under an eval-mode
    model is left as it is.
    """
    with _LOCK:
        entry = _USERS.get(model)
        if entry is None:
            entry = _USERS[model] = [0, []]
        if model.training:
            entry[1].extend(m for m in model.modules() if m.training)
            model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _USERS[model]
                for module in entry[1]:
                    module.training = True
