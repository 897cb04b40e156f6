"""Model configuration: :class:`MythosConfig` and its validation.

Field names and defaults match the upstream OpenMythos ``MythosConfig`` so that existing
scripts keep working; the fields added here come last and default to the recommended
behaviour. Every field is documented on the class.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any


class AttnType(str, Enum):
    """Attention flavour of every block. A ``str`` enum, so ``cfg.attn_type == "mla"`` works."""

    GQA = "gqa"
    MLA = "mla"

    def __str__(self) -> str:
        return self.value


@dataclass
class MythosConfig:
    """Hyper-parameters of an OpenMythos model.

    Core:
        vocab_size: size of the token vocabulary (embedding rows; must include special tokens).
        dim: width of the residual stream.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads for GQA; must divide ``n_heads``. Ignored by MLA.
        max_seq_len: longest sequence (prompt + generated tokens) the model accepts.
        max_loop_iters: default number of recurrent loops, and the number of per-loop LoRA
            scales that are trained. More loops may be requested at inference.
        prelude_layers: dense blocks run once before the recurrent block.
        coda_layers: dense blocks run once after the recurrent block.

    Attention:
        attn_type: ``"gqa"`` (grouped-query, RoPE on the whole head) or ``"mla"`` (multi-latent,
            DeepSeek-V2 style, decoupled RoPE on ``qk_rope_head_dim`` channels).
        kv_lora_rank: [MLA] width of the compressed key/value latent, which is what is cached.
        q_lora_rank: [MLA] width of the compressed query latent.
        qk_rope_head_dim: [MLA] per-head query/key channels that carry RoPE (even).
        qk_nope_head_dim: [MLA] per-head query/key channels without position encoding.
        v_head_dim: [MLA] per-head value width.

    Mixture of experts (recurrent block only):
        n_experts: routed SwiGLU experts.
        n_shared_experts: always-on experts (each ``expert_dim * n_experts_per_tok`` wide).
        n_experts_per_tok: routed experts chosen per token (top-k).
        expert_dim: hidden width of one routed expert.

    Recurrence:
        act_threshold: cumulative halting mass at which a position stops looping. Any positive
            number; a value the mass cannot reach (above 1, or ``inf``) makes every position
            run all requested loops.
        lora_rank: rank of the depth-wise LoRA applied to the block output (0 disables it).

    Other:
        rope_theta: RoPE base frequency.
        max_output_tokens: upstream's field, kept so that its configs load and save; nothing
            reads it (upstream's neither): ``generate``'s ``max_new_tokens``, the CLI's
            ``--max-new-tokens`` and the server's ``--max-tokens`` set how many tokens are
            generated.
        dropout: dropout on attention probabilities and residual branches.

    Added by this implementation:
        use_act: if False, ACT is off: every position runs every loop and the output is the
            last hidden state (the recipe that extrapolates in depth, see
            ``docs/depth_extrapolation.md``).
        clamp_loop_index: if True, every loop from ``max_loop_iters`` on gets the
            loop-index embedding of loop ``max_loop_iters`` (as the per-loop LoRA scales do),
            so the block is one and the same map at every deeper loop: a state that has
            reached a fixed point stays there when more loops are run. False (upstream's
            behaviour) gives every loop a new signal. Measured in
            ``docs/depth_extrapolation.md``.
        act_halt_bias_init: initial bias of the halting head. The default -3 gives a halting
            probability of about 0.05 per loop, so at initialisation no position halts before
            loop 16 and every loop contributes to the output.
        dense_ffn_dim: hidden width of the Prelude/Coda SwiGLU; ``None`` means ``4 * dim // 3``
            as upstream.
        router_bias_update_rate: step of the aux-loss-free balancing update of the router
            bias (``MoEFFN.update_router_bias``), in logits per optimiser step. The default
            1e-3 undoes a one-logit preference in about 1,000 steps, on its own too slow
            for runs of a few hundred steps (``openmythos train`` adds a balance loss,
            ``aux_weight`` 0.01, which balances within those); 1e-2 balances a collapsed
            router within 300 (``tests/layers/test_moe_balance.py``).
        norm_eps: epsilon of every RMSNorm.
        init_std: standard deviation of every weight matrix at initialisation (attention,
            router, experts, dense FFNs); ``None`` (the default) means ``dim ** -0.5``, which
            keeps activations at unit scale at every width: 0.125 at dim 64, 0.0221 at dim
            2048 (where upstream's fixed 0.02 comes from). Set 0.02 for upstream's init.
        embed_init_std: standard deviation of the (tied) embedding; ``None`` (the default)
            means 1.0, the unit variance of ``nn.Embedding``, on a par with the block outputs
            in the residual stream. Set 0.02 for upstream's. The tied head's initial logits
            would then have std ``embed_std * sqrt(dim)``; the final norm's gain keeps them
            at ``init_logit_std`` at most.
            The norms, LTI injection, halting head and LoRA keep their own initialisations.
            Measurements behind these defaults: ``docs/initialization.md``.
        init_logit_std: largest standard deviation of the tied head's logits at
            initialisation: the final norm's gain starts at
            ``min(1, init_logit_std / (embed_std * sqrt(dim)))``, 0.125 at dim 64 and 0.022
            at dim 2048 by default (1, upstream's gain, with upstream's 0.02 embedding). At 1
            the first loss starts within a few nats of ``log(vocab)``; with 8 (the default
            until 2026-12-04) it starts 5-10x above, which cost the short parity recipe 13
            points (docs/initialization.md).
        token_conv: width ``K`` of a causal depthwise convolution over the token embeddings,
            added to them before the Prelude: each channel of position ``t`` gains a learned
            mix of the same channel at positions ``t-K+1 .. t``, so the first attention layer
            already sees which tokens precede each token (a "previous-token head" for free).
            0 (the default) turns it off, as upstream. On in-context lookups it shortens the
            plateau before the model learns to retrieve, and with it the demo's training
            (``docs/depth_extrapolation.md``). Cached decoding keeps the convolution's input
            under the cache key ``token_conv`` (``dim`` values per token).
    """

    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    max_seq_len: int = 4096
    max_loop_iters: int = 16
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: str = "mla"
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    max_output_tokens: int = 4096
    dropout: float = 0.0
    # Added fields (not in upstream).
    use_act: bool = True
    act_halt_bias_init: float = -3.0
    dense_ffn_dim: int | None = None
    router_bias_update_rate: float = 1e-3
    norm_eps: float = 1e-6
    init_std: float | None = None
    embed_init_std: float | None = None
    init_logit_std: float = 1.0
    clamp_loop_index: bool = False
    token_conv: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NumPy numbers (a sweep over np.arange) -> Python's
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and _is_int(value) and type(value) is not int:
                setattr(self, f.name, int(value))
            elif f.name in FLOAT_FIELDS:  # to_dict writes inf as "inf" (JSON has none)
                value = parse_json_float(value)
                if (isinstance(value, numbers.Real) and not isinstance(value, bool)
                        and type(value) is not float and _numpy_scalar(value)):
                    value = float(value)
                setattr(self, f.name, value)
            elif f.type == "bool" and _numpy_scalar(value) and str(value.dtype) == "bool":
                setattr(self, f.name, bool(value))
        try:
            # Stored as the plain string, as upstream's field: a config's asdict() then
            # saves with torch.save and loads with weights_only, dumps to YAML, and reprs
            # as upstream's. Compare with == ("mla" == AttnType.MLA holds).
            self.attn_type = AttnType(str(self.attn_type).lower()).value
        except ValueError:
            allowed = ", ".join(repr(a.value) for a in AttnType)
            raise ValueError(
                f"MythosConfig.attn_type={self.attn_type!r} is not supported; use one of {allowed}"
            ) from None
        for name in ("vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters",
                     "max_output_tokens", "n_experts", "n_experts_per_tok", "expert_dim"):
            _require(name, getattr(self, name), _is_positive_int(getattr(self, name)),
                     "a positive integer")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts", "lora_rank",
                     "token_conv"):
            _require(name, getattr(self, name), _is_int(getattr(self, name))
                     and getattr(self, name) >= 0, "a non-negative integer")
        _require("n_experts_per_tok", self.n_experts_per_tok,
                 self.n_experts_per_tok <= self.n_experts,
                 f"at most n_experts={self.n_experts}")
        if self.attn_type == AttnType.GQA:
            _require("dim", self.dim, self.dim % self.n_heads == 0,
                     f"divisible by n_heads={self.n_heads}")
            _require("n_kv_heads", self.n_kv_heads, _is_positive_int(self.n_kv_heads)
                     and self.n_heads % self.n_kv_heads == 0,
                     f"a positive divisor of n_heads={self.n_heads}")
            _require("dim", self.dim, (self.dim // self.n_heads) % 2 == 0,
                     "such that the head dim dim // n_heads is even (RoPE rotates pairs)")
        else:
            for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                _require(name, getattr(self, name), _is_positive_int(getattr(self, name)),
                         "a positive integer")
            _require("qk_nope_head_dim", self.qk_nope_head_dim,
                     _is_int(self.qk_nope_head_dim) and self.qk_nope_head_dim >= 0,
                     "a non-negative integer")
            _require("qk_rope_head_dim", self.qk_rope_head_dim, self.qk_rope_head_dim % 2 == 0,
                     "even (RoPE rotates pairs of channels)")
        _require("act_threshold", self.act_threshold,
                 isinstance(self.act_threshold, (int, float))
                 and not isinstance(self.act_threshold, bool) and self.act_threshold > 0
                 and not math.isnan(self.act_threshold),
                 "a positive number (inf means: never halt early)")
        _require("rope_theta", self.rope_theta, _is_finite(self.rope_theta)
                 and self.rope_theta > 1, "finite and > 1")
        _require("dropout", self.dropout, _is_finite(self.dropout) and 0.0 <= self.dropout < 1.0,
                 "a number in [0, 1)")
        for name in ("use_act", "clamp_loop_index"):
            _require(name, getattr(self, name), isinstance(getattr(self, name), bool), "a boolean")
        # Initialisation scales and numerical constants: a NaN or an infinity here makes
        # every weight or activation non-finite from the first step.
        _require("norm_eps", self.norm_eps, _is_finite(self.norm_eps) and self.norm_eps > 0,
                 "finite and > 0")
        _require("router_bias_update_rate", self.router_bias_update_rate,
                 _is_finite(self.router_bias_update_rate) and self.router_bias_update_rate >= 0,
                 "finite and >= 0")
        _require("act_halt_bias_init", self.act_halt_bias_init,
                 _is_finite(self.act_halt_bias_init), "a finite number")
        _require("init_logit_std", self.init_logit_std,
                 _is_finite(self.init_logit_std) and self.init_logit_std > 0, "finite and > 0")
        for name in ("init_std", "embed_init_std"):
            value = getattr(self, name)
            if value is not None:
                _require(name, value, _is_finite(value) and value > 0, "finite and > 0, or None")
        if self.dense_ffn_dim is not None:
            _require("dense_ffn_dim", self.dense_ffn_dim, _is_positive_int(self.dense_ffn_dim),
                     "a positive integer or None")

    def validate(self) -> None:
        """Check every field again, as construction does: a config edited in place
        (``cfg.n_kv_heads = 3``) is checked when a model is built from it.

        Raises:
            ValueError: the first field out of range, named with what it must be.
        """
        self.__post_init__()

    # Derived sizes -------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Per-head width of GQA attention."""
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the dense SwiGLU in Prelude and Coda blocks."""
        return self.dense_ffn_dim if self.dense_ffn_dim is not None else 4 * self.dim // 3

    @property
    def weight_std(self) -> float:
        """Initial standard deviation of the weight matrices (``init_std`` resolved)."""
        return self.dim ** -0.5 if self.init_std is None else float(self.init_std)

    @property
    def embed_std(self) -> float:
        """Initial standard deviation of the tied embedding (``embed_init_std`` resolved)."""
        return 1.0 if self.embed_init_std is None else float(self.embed_init_std)

    @property
    def final_norm_gain(self) -> float:
        """Initial gain of the final RMSNorm: the tied head's initial logits have std
        ``embed_std * sqrt(dim) * gain``, capped at ``init_logit_std``."""
        return min(1.0, self.init_logit_std / (self.embed_std * self.dim ** 0.5))

    @property
    def loop_dim(self) -> int:
        """Leading residual channels that receive the loop-index embedding."""
        return max(2, (self.dim // 8) // 2 * 2)

    # Serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field (``attn_type`` as its string value, and a
        float that JSON cannot hold, such as ``act_threshold=inf``, as ``"inf"``)."""
        d = dataclasses.asdict(self)
        d["attn_type"] = str(self.attn_type)
        return json_floats(d)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MythosConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them. The
        kind a saved file names (:data:`KIND_KEY`) is read by
        :func:`open_mythos.registry.config_from_dict`, which builds the right class; here
        it is skipped."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k != KIND_KEY}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MythosConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> MythosConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#: The key under which a saved configuration dictionary names its model kind
#: (:mod:`open_mythos.registry`; files written before 2026-12-07 have none).
KIND_KEY = "model_kind"

#: Said where a name is unknown that the user's own code may register (a task, a model kind).
USER_CODE_HINT = ("; what your own code registers exists only in a process that imported it "
                  "(openmythos --import MODULE COMMAND ..., or import it before calling the API)")


def redefines(new: type, old: type) -> bool:
    """Whether class ``new`` is ``old`` defined again (same module and qualified name: a
    notebook cell run twice, ``importlib.reload``), which a registry then replaces."""
    return new.__module__ == old.__module__ and new.__qualname__ == old.__qualname__


# How to_dict writes the floats JSON has no literal for (str(float("inf")) and so on).
_NON_FINITE = ("inf", "-inf", "nan", "infinity", "-infinity")


def parse_json_float(value: Any) -> Any:
    """The float a non-finite string of :func:`json_floats` stands for (``"inf"`` ->
    ``inf``); any other value unchanged."""
    if isinstance(value, str) and value.lower() in _NON_FINITE:
        return float(value)
    return value


def json_floats(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with each non-finite float value as its string (``"inf"``): ``json.dumps``
    would write ``Infinity``, which strict JSON parsers refuse. A float field of
    :class:`MythosConfig` reads the string back."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in d.items()}


def whole_number(value: Any, name: str, minimum: int = 0, allow_none: bool = False
                 ) -> int | None:
    """``value`` as a Python ``int`` after checking that it is an integer ``>= minimum``:
    Python's or NumPy's (``numbers.Integral``; ``bool`` is not one), a 0-d integer tensor
    (what ``range`` and slicing take, so code written for upstream passes them), or None
    when ``allow_none``. NumPy integers and tensors are converted: kept, they would turn the
    comparisons and arithmetic they reach into NumPy scalars or tensors.

    Raises:
        ValueError: naming ``name`` and the value given.
    """
    if value is None and allow_none:
        return None
    torch = sys.modules.get("torch")  # a tensor exists only where torch was imported
    if (torch is not None and isinstance(value, torch.Tensor) and value.dim() == 0
            and not value.is_floating_point() and not value.is_complex()
            and value.dtype != torch.bool and value.device.type != "meta"):
        value = int(value)
    if not _is_int(value) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def check_loops(n_loops: Any, name: str = "n_loops", allow_none: bool = False) -> int | None:
    """A loop count checked and returned as a Python ``int`` (NumPy's integers accepted;
    ``bool`` is not one), or None when ``allow_none``: the one check of a loop count,
    wherever one is passed.

    Raises:
        ValueError: unless a positive integer (or None when allowed).
    """
    return whole_number(n_loops, name, 1, allow_none)


def check_flag(value: Any, name: str) -> bool | None:
    """``value`` when it is True, False or None (a string such as ``"no"`` is truthy, so it
    is refused rather than read as True).

    Raises:
        TypeError: anything else.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


def _numpy_scalar(v: Any) -> bool:
    """A NumPy scalar (``np.float32(0.1)``, ``np.bool_(True)``): what sweeps over NumPy
    arrays pass, converted to Python's numbers so that the config pickles with
    ``weights_only`` and passes the checks of Python's types."""
    return type(v).__module__ == "numpy" and getattr(v, "shape", None) == ()


def _is_int(v: Any) -> bool:
    """An integer, ``bool`` excluded; NumPy's integers count (``numbers.Integral``)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _require(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"MythosConfig.{name}={value!r} is invalid: must be {allowed}")


#: The float fields of :class:`MythosConfig` (written as strings when not finite).
FLOAT_FIELDS = frozenset(f.name for f in dataclasses.fields(MythosConfig)
                         if f.type in ("float", "float | None"))
