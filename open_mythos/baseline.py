"""A plain (non-looped) transformer matched in per-token compute to a looped model.

Depth-extrapolation experiments ask whether a looped model trained with ``T`` loops beats a
transformer of the same per-token compute that does not share weights across depth. The
baseline is built from the same layers (:class:`~open_mythos.layers.TransformerBlock`,
RMSNorm, RoPE, GQA or MLA attention, tied head)::

    ids -> embed -> prelude_layers dense blocks      (exactly the looped model's)
        -> core_layers = T dense blocks             (one per looped iteration, unshared)
        -> coda_layers dense blocks -> RMSNorm -> head (tied to embed) -> logits

FLOPs-matching rule. Each core block stands for one loop of the recurrent block. Both
run the same attention, so the core block's dense SwiGLU width ``core_ffn_dim`` is chosen
so that its FFN FLOPs, ``6 * dim * core_ffn_dim`` (three ``dim x width`` matmuls, 2 FLOPs
per multiply-add), equal everything else one loop computes per token: the ``top-k``
routed experts and the shared experts a token actually visits, the router, the depth-wise
LoRA and the ACT halting head (:func:`loop_extra_flops`). Rounding to the nearest integer
leaves a difference below ``3 * dim`` FLOPs per core layer, so
``flops_per_token(baseline_cfg) == flops_per_token(cfg, n_loops=T)`` up to that rounding
(:func:`open_mythos.registry.flops_per_token` picks :func:`dense_flops_per_token` or
:func:`looped_flops_per_token` by the config's kind). Elementwise work (norms, RoPE, the LTI
update, the loop-index signal) is not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import AttnType, MythosConfig, check_loops, whole_number
from .layers.attention import AttnContext
from .layers.block import TransformerBlock
from .layers.conv import TokenConv
from .layers.init import init_tree
from .layers.norm import RMSNorm
from .layers.recurrence import ExitRule
from .model import CausalLM


def swiglu_flops(dim: int, hidden: int) -> int:
    """Matmul FLOPs per token of a SwiGLU ``down(silu(gate(x)) * up(x))``."""
    return 6 * dim * hidden


def attention_flops(cfg: MythosConfig, context_len: int = 0) -> int:
    """Matmul FLOPs per token of one attention layer.

    Projections, plus ``context_len`` keys of scores and value mixing (0 leaves the
    context-dependent part out, which is what ``torch.utils.flop_counter`` measures on CPU).
    MLA is counted in its plain order (latent expanded through ``kv_up`` once per token).
    """
    context_len = whole_number(context_len, "context_len")
    d, h = cfg.dim, cfg.n_heads
    if AttnType(cfg.attn_type) is AttnType.GQA:
        hd, hkv = cfg.head_dim, cfg.n_kv_heads
        proj = 2 * d * (2 * h * hd + 2 * hkv * hd)
        qk_dim, v_dim = hd, hd
    else:
        r, rope, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        proj = 2 * (d * cfg.q_lora_rank + cfg.q_lora_rank * h * (nope + rope)
                    + d * (r + rope) + r * h * (nope + v) + h * v * d)
        qk_dim, v_dim = nope + rope, v
    return proj + 2 * context_len * h * (qk_dim + v_dim)


def loop_extra_flops(cfg: MythosConfig) -> int:
    """Per-token matmul FLOPs of one recurrent loop besides attention.

    Routed experts (``n_experts_per_tok`` of width ``expert_dim``), shared experts (one
    SwiGLU ``n_shared_experts * expert_dim * n_experts_per_tok`` wide), router
    (``dim x n_experts``), depth-wise LoRA (``dim x rank`` twice) and the ACT halting head.
    """
    d, k = cfg.dim, cfg.n_experts_per_tok
    experts = swiglu_flops(d, cfg.expert_dim * k * (1 + cfg.n_shared_experts))
    router = 2 * d * cfg.n_experts
    lora = 4 * d * cfg.lora_rank
    act = 2 * d if cfg.use_act else 0
    return experts + router + lora + act


def matched_ffn_dim(cfg: MythosConfig) -> int:
    """Dense SwiGLU width whose FLOPs equal :func:`loop_extra_flops` (rounded, >= 1)."""
    return max(1, round(loop_extra_flops(cfg) / swiglu_flops(cfg.dim, 1)))


@dataclass
class BaselineConfig(MythosConfig):
    """A :class:`MythosConfig` plus the depth and width of the unrolled core.

    Every inherited field keeps its meaning for the embedding, attention, Prelude and Coda;
    the MoE and recurrence fields describe the looped model this baseline is matched to.

    Added fields:
        core_layers: dense blocks between Prelude and Coda, one per loop of the looped
            model's training depth; ``None`` means ``max_loop_iters``.
        core_ffn_dim: SwiGLU width of those blocks; ``None`` means :func:`matched_ffn_dim`.
    """

    core_layers: int | None = None
    core_ffn_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.core_layers is None:
            self.core_layers = self.max_loop_iters
        if self.core_ffn_dim is None:
            self.core_ffn_dim = matched_ffn_dim(self)
        for name in ("core_layers", "core_ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"BaselineConfig.{name}={value!r} is invalid: must be a positive integer or None"
                )

    @property
    def n_layers(self) -> int:
        """Total transformer blocks: prelude + core + coda."""
        return self.prelude_layers + self.core_layers + self.coda_layers


def matched_baseline_config(cfg: MythosConfig, train_loops: int) -> BaselineConfig:
    """The baseline of ``cfg`` trained at ``train_loops`` loops: same fields, ``train_loops``
    core blocks of width :func:`matched_ffn_dim`."""
    train_loops = check_loops(train_loops, "train_loops")
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("core_layers", "core_ffn_dim")}
    return BaselineConfig.from_dict(
        {**fields, "core_layers": train_loops, "core_ffn_dim": matched_ffn_dim(cfg)})


def _trunk_flops(cfg: MythosConfig, attn: int) -> int:
    """LM head plus the Prelude and Coda blocks, which both kinds share."""
    return 2 * cfg.dim * cfg.vocab_size + (cfg.prelude_layers + cfg.coda_layers) * (
        attn + swiglu_flops(cfg.dim, cfg.ffn_dim))


def looped_flops_per_token(cfg: MythosConfig, n_loops: int | None = None,
                           context_len: int = 0) -> int:
    """Forward matmul FLOPs per token of :class:`~open_mythos.OpenMythos` at ``n_loops``
    loops (default ``max_loop_iters``); see :func:`open_mythos.registry.flops_per_token`."""
    n_loops = check_loops(n_loops, allow_none=True)
    attn = attention_flops(cfg, context_len)
    loops = cfg.max_loop_iters if n_loops is None else n_loops
    return _trunk_flops(cfg, attn) + loops * (attn + loop_extra_flops(cfg))


def dense_flops_per_token(cfg: BaselineConfig, n_loops: int | None = None,
                          context_len: int = 0) -> int:
    """Forward matmul FLOPs per token of :class:`DenseBaseline` (``n_loops`` is ignored:
    the depth is fixed, but must be a loop count); see
    :func:`open_mythos.registry.flops_per_token`."""
    check_loops(n_loops, allow_none=True)
    attn = attention_flops(cfg, context_len)
    return _trunk_flops(cfg, attn) + cfg.core_layers * (attn + swiglu_flops(cfg.dim, cfg.core_ffn_dim))


class DenseBaseline(CausalLM):
    """Fixed-depth transformer with the interface of :class:`~open_mythos.OpenMythos`.

    ``forward``/``generate`` (inherited from :class:`~open_mythos.model.CausalLM`) take
    the same arguments (so
    :func:`open_mythos.inference.generate` and the evaluation code accept it), with the
    recurrence options ``n_loops``, ``act_early_exit`` and ``backprop_loops`` validated and
    ignored: the depth is always ``cfg.n_layers``. The KV cache holds one entry per block,
    under ``prelude_{i}``, ``core_{i}`` and ``coda_{i}``.

    ``gradient_checkpointing`` (off by default; ``run.gradient_checkpointing`` and the
    Hugging Face wrapper's ``gradient_checkpointing_enable()`` set it) recomputes each core
    block in the backward pass, as the looped model recomputes each loop.
    """

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        if not isinstance(cfg, BaselineConfig):
            raise TypeError(
                "DenseBaseline needs a BaselineConfig (see matched_baseline_config), "
                f"got {type(cfg).__name__}"
            )
        cfg.validate()  # fields edited after the config was made are checked here too
        self.cfg = cfg
        core_cfg = cfg.replace(dense_ffn_dim=cfg.core_ffn_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.token_conv = TokenConv(cfg.dim, cfg.token_conv) if cfg.token_conv else None
        self.prelude = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.prelude_layers))
        self.core = nn.ModuleList(TransformerBlock(core_cfg) for _ in range(cfg.core_layers))
        self.coda = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_dim = type(self.core[0].attn).rope_dim(cfg)
        self.gradient_checkpointing = False
        self._replaying = False  # inside a checkpoint's recomputation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every tensor as the looped model does (:mod:`open_mythos.layers.init`);
        re-ties the head, so a model built on the meta device can be materialised."""
        self.tie_weights()
        init_tree(self, self.cfg)

    def moe_layers(self) -> list[nn.Module]:
        """No mixture-of-experts layers (an empty list, for code written for both models)."""
        return []

    @property
    def aux_loss(self) -> None:
        """No MoE balance loss."""
        return None

    def update_router_bias(self) -> None:
        """Nothing to balance."""

    def _layers(self) -> list[tuple[str, TransformerBlock]]:
        return ([(f"prelude_{i}", b) for i, b in enumerate(self.prelude)]
                + [(f"core_{i}", b) for i, b in enumerate(self.core)]
                + [(f"coda_{i}", b) for i, b in enumerate(self.coda)])

    @property
    def default_n_loops(self) -> int:
        """One pass through the core blocks (``n_loops`` is validated, then ignored)."""
        return 1

    def cache_keys(self, n_loops: int = 1) -> list[str]:
        """The cache keys of every block, in order (``n_loops`` is ignored)."""
        return self._input_cache_keys() + [key for key, _ in self._layers()]

    def core_states(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        n_loops: int = 1,
        early_exit: bool = False,
        backprop_loops: int | None = None,
        keep: Collection[int] = (),
        exit_rule: ExitRule | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The core blocks (the loop arguments are ignored); depth ``d`` is the output of
        core block ``d``.

        Raises:
            ValueError: an ``exit_rule`` (a fixed stack of blocks has no loops to exit).
        """
        if exit_rule is not None:
            raise ValueError("exit rules stop loops; the dense baseline has none")
        states = {}
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.core):
            x = (self._checkpointed(layer, x, ctx, f"core_{i}") if recompute
                 else layer(x, ctx, f"core_{i}"))
            if i + 1 in keep:
                states[i + 1] = x
        return x, states

    def max_readout_depth(self, n_loops: int) -> int:
        return self.cfg.core_layers

    def _checkpointed(self, layer: TransformerBlock, x: torch.Tensor, ctx: AttnContext,
                      key: str) -> torch.Tensor:
        """``layer(x, ctx, key)`` recomputed in the backward pass (non-reentrant activation
        checkpointing). The recomputation reads a KV cache as the forward left it without
        writing it again (:attr:`AttnContext.replay`): later chunks may have written since.
        (The flag is set by the recomputation's context, a function of the module: dynamo
        refuses a closure there.)"""

        def run(x: torch.Tensor) -> torch.Tensor:
            replay = self._replaying and ctx.cache is not None
            return layer(x, dataclasses.replace(ctx, replay=True) if replay else ctx, key)

        if torch.compiler.is_compiling():
            # Traced into the graph (``--compile model``): the backward's recomputation is
            # the graph's own, which replays no cache write, and a context_fn there must
            # make TorchDispatchModes.
            return checkpoint(run, x, use_reentrant=False)
        return checkpoint(run, x, use_reentrant=False,
                          context_fn=functools.partial(_checkpoint_contexts, self))

    @contextlib.contextmanager
    def _recomputing(self) -> Iterator[None]:
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False


def _checkpoint_contexts(model: DenseBaseline) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), model._recomputing()


# NOTE: these lived here before the registry of model kinds; the registry imports this
# module, so they are looked up lazily (PEP 562) rather than imported at the top.
_MOVED_TO_REGISTRY = ("build_model", "config_from_dict", "flops_per_token", "is_looped")


def __getattr__(name: str) -> Any:
    """``flops_per_token``, ``config_from_dict``, ``build_model`` and ``is_looped`` from
    :mod:`open_mythos.registry`, under their old import path."""
    if name in _MOVED_TO_REGISTRY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
