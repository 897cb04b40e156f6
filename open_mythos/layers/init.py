"""The one initialisation of every model kind: which distribution each tensor starts from.

:func:`init_module` initialises the tensors a module owns itself (not its submodules');
:func:`init_tree` applies it to a whole model so that a module with an initialisation of
its own (LoRA, the injection, the halting head) overrides the generic one given to its
child ``nn.Linear``. The looped model, the dense baseline and the
Hugging Face wrapper (whose ``_init_weights`` hook ``transformers`` calls children first on
the tensors a checkpoint did not provide) all call these, so they cannot disagree.

The rules, with the reasons in ``docs/initialization.md``:

- ``nn.Embedding`` (the tied embedding): N(0, ``cfg.embed_std``);
- ``nn.Linear``: N(0, ``cfg.weight_std``), biases zero; a head tied to the embedding is left
  to the embedding;
- ``RMSNorm``: gain 1, the final norm ``cfg.final_norm_gain``;
- ``MoEFFN``: experts N(0, ``cfg.weight_std``), router bias and load accumulator zero;
- ``LoRAAdapter``, ``LTIInjection``, ``ACTHalting``, ``TokenConv``: their own
  ``reset_parameters``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MythosConfig
from .conv import TokenConv
from .moe import MoEFFN
from .norm import RMSNorm
from .recurrence import ACTHalting, LoRAAdapter, LTIInjection

#: Modules that initialise their own tensors (after their children).
SELF_INITIALISED = (LoRAAdapter, LTIInjection, ACTHalting, TokenConv)


@torch.no_grad()
def init_module(
    module: nn.Module,
    cfg: MythosConfig,
    *,
    final_norm: nn.Module | None = None,
    tied_head: nn.Module | None = None,
) -> None:
    """Initialise the tensors ``module`` owns itself (see the module docstring).

    Args:
        module: any module of a model.
        cfg: the model's configuration (``weight_std``, ``embed_std``, ``final_norm_gain``).
        final_norm: the model's final norm, which starts at ``cfg.final_norm_gain``.
        tied_head: the output head when it shares the embedding's weight (not touched).
    """
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=cfg.embed_std)
    elif isinstance(module, nn.Linear):
        if module is not tied_head:
            nn.init.normal_(module.weight, std=cfg.weight_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.constant_(module.weight, cfg.final_norm_gain if module is final_norm else 1.0)
    elif isinstance(module, MoEFFN):
        module.reset_parameters(cfg.weight_std)
    elif isinstance(module, SELF_INITIALISED):
        module.reset_parameters()


def init_tree(model: nn.Module, cfg: MythosConfig) -> None:
    """Initialise every tensor of ``model``: the generic rules over all modules in
    definition order, then the modules with an initialisation of their own (which
    overrides the generic one their child ``nn.Linear`` got). ``model.norm`` is the final
    norm and ``model.head`` the tied head, when the model has them."""
    final_norm, head = getattr(model, "norm", None), getattr(model, "head", None)
    embed = getattr(model, "embed", None)
    tied = head if head is not None and embed is not None and head.weight is embed.weight else None
    modules = list(model.modules())
    for module in modules:
        if not isinstance(module, SELF_INITIALISED):
            init_module(module, cfg, final_norm=final_norm, tied_head=tied)
    for module in modules:
        if isinstance(module, SELF_INITIALISED):
            module.reset_parameters()
