"""Model kinds: which configuration builds which model, decided in one place.

A *kind* pairs a configuration class with the model class it builds::

    looped  MythosConfig    -> OpenMythos      (recurrent block, variable loop count)
    dense   BaselineConfig  -> DenseBaseline   (fixed depth: core_layers unshared blocks)

Everything that handles more than one kind (building, counting parameters, FLOPs,
``openmythos info``, checkpoint loading, Hugging Face conversion, lm-eval) asks
:func:`kind_of` instead of testing classes itself, so a new kind is one :func:`register`
call and no place can forget it.

A configuration dictionary saved in a file (a checkpoint's ``config.json``, a Hugging Face
config) names its kind under :data:`~open_mythos.config.KIND_KEY` (:func:`config_dict`);
reading one whose kind this process has not registered is an error, not another model. A
dictionary without that key (``cfg.to_dict()``, files written before 2026-12-07) names its
kind by its fields: a kind whose configuration class adds fields to
:class:`~open_mythos.config.MythosConfig` (``core_layers``, ``core_ffn_dim``) is chosen when
one of them has a value other than None; otherwise the kind is ``looped``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .baseline import BaselineConfig, DenseBaseline, dense_flops_per_token, looped_flops_per_token
from .config import KIND_KEY, USER_CODE_HINT, MythosConfig, redefines
from .model import CausalLM, OpenMythos

#: ``(cfg, n_loops or None, context_len) -> forward matmul FLOPs per token``.
FlopsFn = Callable[[MythosConfig, "int | None", int], int]


@dataclass(frozen=True)
class ModelKind:
    """One kind of model.

    Attributes:
        name: short name (``"looped"``, ``"dense"``), shown by ``openmythos info``.
        config_class: its configuration (``MythosConfig`` or a subclass).
        model_class: the :class:`~open_mythos.model.CausalLM` built from that configuration.
        looped: whether the depth is a loop count chosen per call (``n_loops``); a
            fixed-depth kind validates and ignores ``n_loops``.
        flops_per_token: its forward FLOPs per token (see :func:`flops_per_token`).
    """

    name: str
    config_class: type[MythosConfig]
    model_class: type[CausalLM]
    looped: bool
    flops_per_token: FlopsFn

    @property
    def extra_fields(self) -> frozenset[str]:
        """Configuration fields this kind adds to :class:`MythosConfig`."""
        base = {f.name for f in dataclasses.fields(MythosConfig)}
        return frozenset(f.name for f in dataclasses.fields(self.config_class)) - base


#: Every registered kind by name, in registration order (the base ``looped`` kind first).
KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    """Add ``kind`` to :data:`KINDS`. A kind of the same name whose classes are defined
    again (a notebook cell run twice, ``importlib.reload``: same modules and qualified
    names) replaces the earlier one.

    Raises:
        ValueError: the name, configuration class or model class is taken already.
    """
    earlier = KINDS.get(kind.name)
    if (earlier is not None and redefines(kind.config_class, earlier.config_class)
            and redefines(kind.model_class, earlier.model_class)):
        del KINDS[kind.name]
    for other in KINDS.values():
        if kind.name == other.name or kind.config_class is other.config_class \
                or kind.model_class is other.model_class:
            raise ValueError(f"model kind {kind.name!r} clashes with registered kind {other.name!r}")
    KINDS[kind.name] = kind
    return kind


LOOPED = register(ModelKind("looped", MythosConfig, OpenMythos, True, looped_flops_per_token))
DENSE = register(ModelKind("dense", BaselineConfig, DenseBaseline, False, dense_flops_per_token))


def kind_of(obj: MythosConfig | nn.Module | Mapping[str, Any]) -> ModelKind:
    """The kind of a configuration, a model or a configuration dictionary.

    Classes are matched through their method resolution order, so a subclass of a
    registered model or configuration has its parent's kind. A module that wraps a model
    (``torch.compile``'s ``_orig_mod``, DDP's ``module``) has the wrapped model's kind.

    Raises:
        TypeError: ``obj`` is none of these, or of no registered kind.
    """
    if isinstance(obj, Mapping):
        return _kind_of_dict(obj)
    if isinstance(obj, MythosConfig):
        by_class = {k.config_class: k for k in KINDS.values()}
    elif isinstance(obj, nn.Module):
        by_class = {k.model_class: k for k in KINDS.values()}
    else:
        raise TypeError(f"expected a MythosConfig, a model or a config dict, got {type(obj).__name__}")
    for cls in type(obj).__mro__:
        if cls in by_class:
            return by_class[cls]
    inner = getattr(obj, "_orig_mod", None) or getattr(obj, "module", None)
    if isinstance(inner, nn.Module):
        return kind_of(inner)
    raise TypeError(f"{type(obj).__name__} is not a registered model kind "
                    f"({', '.join(k.model_class.__name__ for k in KINDS.values())})")


def _kind_of_dict(data: Mapping[str, Any]) -> ModelKind:
    named = data.get(KIND_KEY)
    if named is not None:
        if named not in KINDS:
            raise ValueError(f"the configuration is of model kind {named!r}, which is not "
                             f"registered in this process (registered: {', '.join(KINDS)})"
                             f"{USER_CODE_HINT}")
        return KINDS[named]
    found = [k for k in KINDS.values()
             if any(data.get(name) is not None for name in k.extra_fields)]
    if len(found) > 1:
        raise ValueError(f"config has fields of several model kinds: {[k.name for k in found]}")
    return found[0] if found else LOOPED


def config_dict(cfg: MythosConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` with its kind's name under :data:`~open_mythos.config.KIND_KEY`:
    what a file stores, so that it reloads as that kind, or not at all where that kind is
    not registered (a kind whose fields are all MythosConfig's, or whose added fields are
    None, is otherwise read back as ``looped``)."""
    return {KIND_KEY: kind_of(cfg).name, **cfg.to_dict()}


def config_from_dict(data: Mapping[str, Any]) -> MythosConfig:
    """The configuration of the kind ``data`` describes (inverse of :func:`config_dict` and
    of ``cfg.to_dict()`` for every kind). Fields of other kinds may be present with the
    value None (a Hugging Face config carries them all); any other unknown key raises
    ``ValueError``, as does a kind named but not registered."""
    kind = _kind_of_dict(data)
    others = set().union(*(k.extra_fields for k in KINDS.values())) - kind.extra_fields
    fields = {k: v for k, v in data.items()
              if k != KIND_KEY and not (k in others and v is None)}
    return kind.config_class.from_dict(fields)


def config_fields() -> dict[str, Any]:
    """``{name: default}`` of every configuration field of every kind registered now (the
    base fields first). Defaults are plain values: None for the fields a kind adds (its
    own default would name that kind in a dictionary of another)."""
    fields = {f.name: f.default for f in dataclasses.fields(MythosConfig)}
    for kind in KINDS.values():
        for f in dataclasses.fields(kind.config_class):
            fields.setdefault(f.name, None)
    return fields


def build_model(cfg: MythosConfig, device: str | torch.device | None = None) -> CausalLM:
    """The model of ``cfg``'s kind, initialised.

    Args:
        cfg: any registered configuration.
        device: None builds it as its constructor does, on the current default device
            (a ``with torch.device(...)`` block applies); ``"meta"`` builds shapes only,
            with no memory; any other device builds on the meta device and materialises
            there (:func:`materialize`), so the weights are never allocated elsewhere first.
    """
    kind = kind_of(cfg)
    if device is None:
        return kind.model_class(cfg)
    with torch.device("meta"):
        model = kind.model_class(cfg)
    return model if torch.device(device).type == "meta" else materialize(model, device)


def materialize(model: CausalLM, device: str | torch.device) -> CausalLM:
    """Give a meta-device model real, initialised storage on ``device``: ``to_empty``
    then ``reset_parameters``, which sets every parameter and buffer and re-ties the head.
    Draws from the global RNG as a normal build does (not the same stream, since a normal
    build also runs the ``nn`` constructors' own initialisation first)."""
    model.to_empty(device=device)
    model.reset_parameters()
    return model


def is_looped(obj: MythosConfig | nn.Module | Mapping[str, Any]) -> bool:
    """Whether ``obj`` (configuration, model or config dictionary) has a variable loop count."""
    return kind_of(obj).looped


def flops_per_token(cfg: MythosConfig, n_loops: int | None = None, context_len: int = 0) -> int:
    """Forward matmul FLOPs per token of ``cfg``'s kind, embedding lookup excluded, LM head
    included.

    Args:
        cfg: any registered configuration.
        n_loops: loops every position runs (looped kind; default ``max_loop_iters``).
            Ignored by a fixed-depth kind.
        context_len: keys each query attends to (0: projections only; see
            :func:`open_mythos.baseline.attention_flops`).
    """
    return kind_of(cfg).flops_per_token(cfg, n_loops, context_len)


__all__ = [
    "DENSE", "KINDS", "LOOPED", "ModelKind", "build_model", "config_dict", "config_fields",
    "config_from_dict", "flops_per_token", "is_looped", "kind_of", "materialize", "register",
]
