"""Algorithmic tasks with out-of-distribution splits, for training looped models and
measuring depth extrapolation.

Every task (see :class:`~open_mythos.tasks.base.Task`) has ``train``/``id`` splits and one
``ood_*`` split whose difficulty level starts above the in-distribution range::

    from open_mythos.tasks import get_task, make_batch
    task = get_task("multihop", hops=(1, 3))
    batch = make_batch(task, random.Random(0), "train", batch_size=32)

| name       | prompt -> answer                  | level      | id    | ood              |
|------------|-----------------------------------|------------|-------|------------------|
| parity     | ``0110=`` -> ``0100``             | bits       | 4-12  | ood_length 16-24 |
| dyck       | ``([])[]=`` -> ``2``              | depth      | 1-4   | ood_depth 5-8    |
| modsum     | ``3141=`` -> ``3489``             | digits     | 2-8   | ood_length 12-16 |
| addition   | ``123+4567=`` -> ``4690``         | digits     | 1-5   | ood_digits 6-8   |
| multihop   | ``c=7;a=b;b=c?a`` -> ``7``        | hops       | 1-3   | ood_hops 4-8     |
| phop       | ``a=c;b=a;c=b?a2`` -> ``b``       | hops       | 1-4   | ood_hops 5-8     |
"""

from __future__ import annotations

import inspect
from typing import Any

from ..config import USER_CODE_HINT, redefines
from .arithmetic import Addition, ModSum
from .base import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, VOCAB_SIZE, Example, Task
from .batching import collate, decode_answer, encode_example, encode_prompt, make_batch, score
from .dyck import Dyck, DyckTarget
from .multihop import MultiHop
from .parity import Parity
from .phop import PHop

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Parity, Dyck, ModSum, Addition, MultiHop, PHop)
}


def register_task(cls: type[Task]) -> type[Task]:
    """Add a :class:`Task` subclass to :data:`TASKS` under ``cls.name`` (usable as a
    decorator); ValueError if the name is taken by another class. A class defined again
    (a notebook cell run twice, ``importlib.reload``: the same module and qualified name)
    replaces its earlier definition."""
    for attr in ("name", "level_name"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise TypeError(f"{cls.__qualname__} needs the class attribute {attr!r} (a "
                            "non-empty str): the task's name in the registry and on the command "
                            "line, and what one level counts (\"hops\", \"length\")")
    existing = TASKS.get(cls.name)
    if existing is not None and existing is not cls and not redefines(cls, existing):
        raise ValueError(f"task name {cls.name!r} is already registered to "
                         f"{existing.__module__}.{existing.__qualname__}")
    TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Construct the task registered as ``name`` with its difficulty knobs ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(list_tasks())}"
                         f"{USER_CODE_HINT}")
    known = inspect.signature(TASKS[name]).parameters
    unknown = sorted(set(kwargs) - set(known))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in known.values()):
        raise ValueError(f"task {name!r} takes no argument {', '.join(unknown)}; its "
                         f"arguments: {', '.join(known)}")
    return TASKS[name](**kwargs)


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "IGNORE_INDEX",
    "PAD_ID",
    "TASKS",
    "VOCAB_SIZE",
    "Addition",
    "Dyck",
    "DyckTarget",
    "Example",
    "ModSum",
    "MultiHop",
    "PHop",
    "Parity",
    "Task",
    "collate",
    "decode_answer",
    "encode_example",
    "encode_prompt",
    "get_task",
    "list_tasks",
    "make_batch",
    "register_task",
    "score",
]
