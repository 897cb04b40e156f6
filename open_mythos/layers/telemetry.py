"""Modules that keep tensors of their last forward (``last_aux_loss``, ``last_states``...)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def _detached(value: Any) -> Any:
    """``value`` with every tensor that has a ``grad_fn`` detached (in dicts, lists, tuples).

    A container holding no such tensor is returned as it is, and one that does is rebuilt
    as its own type (PyTorch's hook tables are ``OrderedDict``s that hooks hold weak
    references to; a plain ``dict`` in their place broke every later ``register_*_hook``)."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.grad_fn is not None else value
    if isinstance(value, dict):
        items = {k: _detached(v) for k, v in value.items()}
        if all(items[k] is v for k, v in value.items()):
            return value
        new = copy.copy(value)  # keeps the mapping's type (OrderedDict, defaultdict...)
        new.update(items)
        return new
    if isinstance(value, (list, tuple)):
        items = [_detached(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return type(value)(*items)
        return type(value)(items)
    return value


class CopiesDetached:
    """Mixin for a module that stores its last forward's tensors as attributes.

    After a forward with autograd those are graph outputs (differentiable on purpose: a
    training loop adds ``last_aux_loss`` to its loss), and ``copy.deepcopy`` refuses
    tensors that are not graph leaves. Frameworks deepcopy a model in mid-training (EMA and
    SWA averages, best-model snapshots), so a copy holds those tensors detached.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: _detached(v) for k, v in self.__getstate__().items()}
        new.__setstate__(copy.deepcopy(state, memo))
        return new
