"""The OpenMythos language model: Prelude -> looped recurrent block -> Coda -> LM head."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Collection
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .config import MythosConfig, check_flag, check_loops, whole_number
from .inference.cache import CacheStore, KVCache, as_cache_store
from .layers.attention import AttnContext
from .layers.conv import TokenConv
from .layers.init import init_tree
from .layers.moe import MoEFFN
from .layers.norm import RMSNorm
from .layers.recurrence import ExitRule, as_exit_rule
from .layers.rope import rope_cos_sin, table_dtype
from .upstream import RecurrentBlock as UpstreamRecurrentBlock
from .upstream import TransformerBlock as UpstreamBlock


@dataclass
class DepthReadout:
    """What ``forward(..., readout_depths=...)`` returns: the output and a logit lens per depth.

    Depth ``d`` is the state after ``d`` loops of :class:`OpenMythos` (after ``d`` core blocks
    of the dense baseline). Its readout takes that state through the rest of the network
    (Coda, final norm, head), exactly as if the model had stopped there; nothing before the
    Coda is run twice, and a depth whose state is the output's (the last loop with ACT off)
    reuses the output's logits.

    Attributes:
        logits: (B, T, vocab) the model's output, as a plain forward returns it ((N, vocab)
            at the ``logits_at`` positions when given).
        depth_logits: ``{d: (B, T, vocab)}`` the readout of each requested depth (also
            (N, vocab) with ``logits_at``).
        states: ``{d: (B, T, dim)}`` the states those readouts start from (every position).
    """

    logits: torch.Tensor
    depth_logits: dict[int, torch.Tensor]
    states: dict[int, torch.Tensor]


READOUT_LENSES = ("coda", "head", "none")

# Upstream's complex RoPE tables of each model (OpenMythos.freqs_cis), built on first access
# and kept outside the module, so that pickling or deep-copying a model does not carry them.
_UPSTREAM_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _depth_index(d: object) -> object:
    """A readout depth as a Python ``int`` when it is an integer of any kind (NumPy's, a
    0-d integer tensor, as iterating ``np.arange``/``torch.arange`` gives); anything else
    unchanged, for the caller to refuse."""
    if isinstance(d, bool) or (isinstance(d, torch.Tensor) and d.dtype == torch.bool):
        return d
    try:
        return operator.index(d)
    except TypeError:
        return d


def _tie_after_load(model: CausalLM, incompatible_keys: object) -> None:
    """``load_state_dict(..., assign=True)`` (loading onto a model built on the meta
    device) gives the embedding and the head a parameter each: tie them again, or they
    would train apart and count twice."""
    if model.head.weight is not model.embed.weight:
        model.tie_weights()


class CausalLM(nn.Module):
    """What every OpenMythos language model shares: input validation, the attention
    context (RoPE tables, causal and padding masks), cache bookkeeping, the logits head and
    generation. Subclasses set ``cfg``, ``embed``, ``token_conv``, ``head`` and ``rope_dim``
    and implement :meth:`core_states`, :meth:`cache_keys` and :attr:`default_n_loops`.
    """

    cfg: MythosConfig
    rope_dim: int
    #: The causal convolution over the embeddings (``cfg.token_conv``), or None.
    token_conv: TokenConv | None

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(_tie_after_load)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (``to_empty`` unties them)."""
        self.head.weight = self.embed.weight

    @staticmethod
    def _positions(logits_at: torch.Tensor | None, shape: torch.Size,
                   device: torch.device) -> torch.Tensor | None:
        """``logits_at`` as (N,) long flat indices into the ``B * T`` positions of an input
        of ``shape`` (B, T), on ``device``; None for None.

        ``logits_at``: a (B, T) bool mask, or (N,) long indices into the B * T positions in
        row-major order (indices made on the host cost a GPU no synchronisation; a mask
        does, to count its positions).
        """
        if logits_at is None:
            return None
        if not isinstance(logits_at, torch.Tensor):
            raise ValueError(f"logits_at must be a tensor (a bool mask or position indices), "
                             f"got {type(logits_at).__name__}")
        if logits_at.dtype == torch.bool:
            if logits_at.shape != shape:
                raise ValueError(f"a logits_at mask must have the input's shape "
                                 f"{tuple(shape)}, got {tuple(logits_at.shape)}")
            return logits_at.to(device).flatten().nonzero().squeeze(1)
        if logits_at.dim() != 1 or logits_at.dtype.is_floating_point:
            raise ValueError("logits_at must be a (batch, seq) bool mask or a 1-D tensor of "
                             f"integer position indices, got {logits_at.dtype} "
                             f"{tuple(logits_at.shape)}")
        n = shape[0] * shape[1]
        # Indices on the host are checked (free); on a GPU that would cost a synchronisation.
        if logits_at.numel() and logits_at.device.type == "cpu" \
                and not torch.compiler.is_compiling():
            lo, hi = int(logits_at.min()), int(logits_at.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"logits_at indices must be in [0, {n}) (batch * seq "
                                 f"positions, row-major), got min {lo}, max {hi}")
        return logits_at.to(device=device, dtype=torch.long)

    @staticmethod
    def _at(x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, T, dim) at the flat positions ``at`` (:meth:`_positions`), (N, dim);
        all of it for None."""
        return x if at is None else x.flatten(0, 1).index_select(0, at)

    def _validate(self, input_ids: torch.Tensor, start_pos: int) -> int:
        """Check the input ids and positions (the loop count is checked by the caller);
        return ``start_pos`` as a Python ``int``."""
        if not torch.compiler.is_compiling():  # there it may be a symbolic int
            start_pos = whole_number(start_pos, "start_pos (the number of cached positions)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, int64 (or int32), got "
                             f"{input_ids.dtype}" + ("" if input_ids.dtype.is_floating_point
                                                     or input_ids.dtype == torch.bool
                                                     else "; convert with input_ids.long()"))
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has an empty batch (shape[0] == 0)")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty along the sequence dimension")
        end = start_pos + input_ids.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{end - 1} exceed max_seq_len={self.cfg.max_seq_len} "
                "(shorten the input or build the model with a larger max_seq_len)"
            )
        if torch.compiler.is_compiling() or input_ids.is_meta or is_fake(input_ids):
            return start_pos  # (no values: shapes only, as in FLOP and memory estimates)
        if input_ids.device.type != "cuda":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.cfg.vocab_size}); got min {lo}, max {hi}"
                )
        else:
            # Reading the range on the host would synchronise with the device on every
            # forward (a training step could not queue its kernels ahead of the GPU); the
            # check runs on the device and fails the next synchronising call instead.
            torch._assert_async(((input_ids >= 0) & (input_ids < self.cfg.vocab_size)).all(),
                                f"token ids must be in [0, {self.cfg.vocab_size})")
        return start_pos

    def _context(
        self,
        input_ids: torch.Tensor,
        start_pos: int,
        cache: CacheStore | None,
        attention_mask: torch.Tensor | None,
    ) -> AttnContext:
        B, T = input_ids.shape
        device = input_ids.device
        S = start_pos + T if cache is not None else T
        if attention_mask is None:
            positions = torch.arange(start_pos, start_pos + T, device=device)
            cos, sin = rope_cos_sin(positions, self.rope_dim, self.cfg.rope_theta,
                                    table_dtype(self.embed.weight.dtype))
            if cache is None or start_pos == 0 or T == 1:
                return AttnContext(cos, sin, start_pos, None, cache is None or start_pos == 0, cache)
            q_pos = positions.view(T, 1)
            mask = (torch.arange(S, device=device).view(1, S) <= q_pos).view(1, 1, T, S)
            return AttnContext(cos, sin, start_pos, mask, False, cache)

        # Padding: attention_mask (B, start_pos + T) marks real tokens (1) and padding (0).
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a tensor of 1s and 0s, got "
                             f"{type(attention_mask).__name__}")
        if attention_mask.shape != (B, start_pos + T):
            raise ValueError(
                f"attention_mask must have shape (batch, start_pos + seq) = {(B, start_pos + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if not torch.compiler.is_compiling():
            check_mask_values(attention_mask)
        valid = attention_mask.to(torch.bool)
        if (cache is None and start_pos == 0 and valid.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and bool((valid[:, 1:] <= valid[:, :-1]).all())):
            # Right padding (a trainer's task batch), read on the host at no cost on the
            # CPU: causal attention already keeps every real token from the padding after
            # it, and the real tokens' positions are 0, 1, ...; the context without a mask
            # (the plain causal kernel: an explicit mask cost ~5% of a training step)
            # serves, the mask kept to leave the padding out of the MoE load and ACT's
            # early exit.
            return replace(self._context(input_ids, 0, None, None),
                           token_mask=valid)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:]  # (B, T)
        cos, sin = rope_cos_sin(positions, self.rope_dim, self.cfg.rope_theta,
                                    table_dtype(self.embed.weight.dtype))
        keys = valid[:, -S:]  # keys visible in this call: cached + new, or just new
        key_idx = torch.arange(S, device=device).view(1, 1, S)
        q_idx = torch.arange(S - T, S, device=device).view(1, T, 1)
        mask = (key_idx <= q_idx) & keys.view(B, 1, S)
        # A padding query would see no key at all (NaN softmax): let it see itself.
        mask = mask | (key_idx == q_idx)
        return AttnContext(cos, sin, start_pos, mask.unsqueeze(1), False, cache,
                           token_mask=valid[:, start_pos:])

    def _prepare_cache(self, cache: CacheStore | None, first_key: str, start_pos: int) -> None:
        """Check ``start_pos`` against the cached length; a smaller value rewinds the cache."""
        if cache is None:
            return
        cached = cache.length(first_key)
        if start_pos > cached:
            raise ValueError(
                f"kv_cache holds {cached} positions; start_pos={start_pos} would leave a gap"
            )
        if start_pos < cached:
            cache.truncate(start_pos)

    def cache_keys(self, n_loops: int) -> list[str]:
        """The cache keys a forward with ``n_loops`` loops writes, in layer order."""
        raise NotImplementedError

    def _input_cache_keys(self) -> list[str]:
        """The cache keys written before the first block: the token convolution's input."""
        return [] if self.token_conv is None else [TokenConv.cache_key]

    @property
    def default_n_loops(self) -> int:
        """Loops when a call passes ``n_loops=None``."""
        raise NotImplementedError

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        n_loops: int | None = None,
        kv_cache: dict | KVCache | None = None,
        start_pos: int = 0,
        *,
        attention_mask: torch.Tensor | None = None,
        act_early_exit: bool | None = None,
        backprop_loops: int | None = None,
        exit_rule: ExitRule | None = None,
        lens: str = "coda",
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, dim); see :meth:`forward` for arguments.

        ``lens="head"`` skips the Coda: the recurrent block's output normalised, what the
        head lens reads (``forward(..., readout_lens="head")``): with ACT the halting-weighted
        mixture of the loops' states, which the Coda would read (not the last loop's own
        state, which ``readout(..., lens="head")`` reads per depth), without ACT the last
        loop's state. ``logits_at``: the states
        at those positions only, (N, dim); the last Coda block runs only there.
        """
        if lens not in ("coda", "head"):
            raise ValueError(f"lens must be 'coda' or 'head', got {lens!r}")
        n_loops = self.default_n_loops if n_loops is None else check_loops(n_loops)
        start_pos = self._validate(input_ids, start_pos)
        backprop_loops = check_loops(backprop_loops, name="backprop_loops", allow_none=True)
        act_early_exit = check_flag(act_early_exit, "act_early_exit")
        exit_rule = as_exit_rule(exit_rule)
        cache = as_cache_store(kv_cache)
        self._prepare_cache(cache, self.cache_keys(1)[0], start_pos)
        if act_early_exit is None:
            act_early_exit = not self.training
        ctx = self._context(input_ids, start_pos, cache, attention_mask)
        at = self._positions(logits_at, input_ids.shape, ctx.cos.device)
        if lens == "head":
            x, _ = self.core_states(self.encode(input_ids, ctx), ctx, n_loops, act_early_exit,
                                    backprop_loops, exit_rule=exit_rule)
            return self.norm(self._at(x, at))
        return self.trunk(input_ids, ctx, n_loops, act_early_exit, backprop_loops, exit_rule, at)

    def trunk(
        self,
        input_ids: torch.Tensor,
        ctx: AttnContext,
        n_loops: int,
        early_exit: bool = False,
        backprop_loops: int | None = None,
        exit_rule: ExitRule | None = None,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedding to final norm for a prepared attention context, without validation
        (``at``: see :meth:`decode`).

        :meth:`hidden_states` validates its arguments and builds ``ctx``; the compiled decode
        step (:mod:`open_mythos.inference.static`) builds a fixed-shape ``ctx`` itself.
        """
        x = self.encode(input_ids, ctx)
        x, _ = self.core_states(x, ctx, n_loops, early_exit, backprop_loops,
                                exit_rule=exit_rule)
        return self.decode(x, ctx, at)

    def encode(self, input_ids: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Embedding, token convolution and Prelude: (B, T) ids -> (B, T, dim)."""
        x = self.embed(input_ids)
        if self.token_conv is not None:
            x = self.token_conv(x, ctx)
        for i, layer in enumerate(self.prelude):
            x = layer(x, ctx, f"prelude_{i}")
        return x

    def core_states(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        n_loops: int,
        early_exit: bool = False,
        backprop_loops: int | None = None,
        keep: Collection[int] = (),
        exit_rule: ExitRule | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The deep part between Prelude and Coda: ``(output, {d: state after depth d})``
        for the depths in ``keep``; ``exit_rule`` freezes each position once it fires."""
        raise NotImplementedError

    def max_readout_depth(self, n_loops: int) -> int:
        """The deepest depth a forward with ``n_loops`` loops can read out."""
        return n_loops

    def decode(self, x: torch.Tensor, ctx: AttnContext, at: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Coda and final norm: (B, T, dim) -> normalised (B, T, dim); with ``at`` (N,) flat
        positions (:meth:`_positions`), (N, dim) at those positions only: for a few positions
        per row (on average at most 8, and a quarter of the row) the last Coda block runs its
        queries and FFN there alone (its keys and values, and every other block, still cover every
        position)."""
        B, T = x.shape[:2]
        # Each selected position attends over a copy of its row's keys (N * S of them), so
        # the trimmed block pays only for a few positions per row (measured on CPU, the
        # block alone: 2.5x faster at 2 of 32 positions per row, even at 8 of 32, 1.6x
        # slower at 16 of 32; 2.7x faster at 8 of 256, 4x slower at 64 of 256).
        trim = at is not None and at.numel() <= B * min(8, max(1, T // 4))
        last = len(self.coda) - 1
        for i, layer in enumerate(self.coda):
            x = layer(x, ctx, f"coda_{i}", query_at=at if trim and i == last else None)
        if at is not None:
            x = x.squeeze(1) if trim and self.coda else self._at(x, at)
        return self.norm(x)

    def readout(
        self,
        input_ids: torch.Tensor,
        n_loops: int | None = None,
        depths: Collection[int] | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        backprop_loops: int | None = None,
        lens: str = "coda",
        logits_at: torch.Tensor | None = None,
    ) -> DepthReadout:
        """The output and the readout of every depth in ``depths`` (default: all) in one
        forward without a cache; see :class:`DepthReadout`. Every loop runs (no early exit).

        ``lens`` chooses the readout: ``"coda"`` (the rest of the network, as an exit at that
        depth would compute), ``"head"`` (final norm and head only: the classic logit lens,
        cheaper, and what trains the state itself to name the answer) or ``"none"`` (states
        only, ``depth_logits`` empty: for callers that read out a few positions themselves).
        ``logits_at`` (see :meth:`forward`) limits the output's and the readouts' logits to
        those positions; ``states`` keep every position.

        Raises:
            ValueError: a depth outside ``1..n_loops`` (``1..core_layers`` for the baseline).
        """
        n_loops = self.cfg.max_loop_iters if n_loops is None else check_loops(n_loops)
        self._validate(input_ids, 0)
        backprop_loops = check_loops(backprop_loops, name="backprop_loops", allow_none=True)
        deepest = self.max_readout_depth(n_loops)
        depths = range(1, deepest + 1) if depths is None else depths
        if isinstance(depths, (int, str)) or not isinstance(depths, Collection):
            raise TypeError(f"readout depths must be a collection of loop counts (such as "
                            f"[2, 4]), got {depths!r}")
        depths = [_depth_index(d) for d in depths]
        bad = [d for d in depths
               if not (type(d) is int and 1 <= d <= deepest)]  # bool is no depth
        if bad:
            raise ValueError(f"readout depths must be integers in [1, {deepest}], got {bad}")
        if lens not in READOUT_LENSES:
            raise ValueError(f"lens={lens!r} is not one of {', '.join(READOUT_LENSES)}")
        ctx = self._context(input_ids, 0, None, attention_mask)
        at = self._positions(logits_at, input_ids.shape, ctx.cos.device)
        x = self.encode(input_ids, ctx)
        out, states = self.core_states(x, ctx, n_loops, False, backprop_loops, keep=set(depths))
        logits = self.head(self.decode(out, ctx, at))
        if lens == "coda":
            depth_logits = {d: logits if states[d] is out
                            else self.head(self.decode(states[d], ctx, at))
                            for d in sorted(states)}
        elif lens == "head":
            depth_logits = {d: self.head(self.norm(self._at(states[d], at)))
                            for d in sorted(states)}
        else:
            depth_logits = {}
        return DepthReadout(logits, depth_logits, states)

    def forward(
        self,
        input_ids: torch.Tensor,
        n_loops: int | None = None,
        kv_cache: dict | KVCache | None = None,
        start_pos: int = 0,
        *,
        attention_mask: torch.Tensor | None = None,
        act_early_exit: bool | None = None,
        backprop_loops: int | None = None,
        readout_depths: Collection[int] | None = None,
        readout_lens: str = "coda",
        exit_rule: ExitRule | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor | DepthReadout:
        """Logits for every position.

        Args:
            input_ids: (B, T) token ids in ``[0, vocab_size)``.
            n_loops: recurrent loops (>= 1); default ``cfg.max_loop_iters``. More loops than
                were trained extrapolate in depth.
            kv_cache: ``None``, a plain ``dict`` (upstream API: pass ``{}`` first and reuse it)
                or a :class:`~open_mythos.inference.cache.KVCache`.
            start_pos: position of ``input_ids[:, 0]``; must equal the number of cached
                positions (a smaller value rewinds the cache).
            attention_mask: optional (B, start_pos + T) 1/0 mask of real tokens vs padding
                (left padding for batched prompts); positions count real tokens only.
            act_early_exit: stop looping when every position has halted; default: in eval
                mode only.
            backprop_loops: truncated backpropagation through the last ``k`` loops only.
            readout_depths: also read out the state after each of these depths (loops):
                returns a :class:`DepthReadout` (see :meth:`readout`; no cache, no early
                exit). Through ``forward``, so DDP and FSDP wrappers see the call.
            readout_lens: ``"coda"``, ``"head"`` or ``"none"`` (see :meth:`readout`).
                Without ``readout_depths``, ``"head"`` reads the output itself through the
                head lens: the Coda is skipped (and its cache entries are not written). It
                is cheaper and approximate, meant for models trained to name the next token
                at every loop (``optim.loop_readout = "head"``), e.g. as the drafts of
                self-speculative decoding.
            exit_rule: an :class:`~open_mythos.layers.recurrence.ExitRule`: each position
                stops looping once it fires (training-free early exit; looped models only).
            logits_at: compute logits only at these positions: a (B, T) bool mask, or (N,)
                long indices into the ``B * T`` positions in row-major order. The head is
                the largest matmul of a small model, and task batches supervise a few
                positions of each sequence; the trainer passes the supervised ones.

        Returns:
            (B, T, vocab_size) logits in the activation dtype ((N, vocab_size) with
            ``logits_at``), or a :class:`DepthReadout`.
        """
        if readout_depths is not None:
            if exit_rule is not None:
                raise ValueError("readout_depths reads out every loop: not with exit_rule")
            if kv_cache is not None or start_pos:
                raise ValueError("readout_depths works on a full forward without kv_cache")
            return self.readout(input_ids, n_loops, readout_depths, attention_mask=attention_mask,
                                backprop_loops=backprop_loops, lens=readout_lens,
                                logits_at=logits_at)
        if readout_lens == "none":
            raise ValueError("readout_lens='none' returns states only: it needs readout_depths")
        h = self.hidden_states(input_ids, n_loops, kv_cache, start_pos,
                               attention_mask=attention_mask, act_early_exit=act_early_exit,
                               backprop_loops=backprop_loops, exit_rule=exit_rule,
                               lens=readout_lens, logits_at=logits_at)
        return self.head(h)

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        n_loops: int | None = 8,
        temperature: float = 1.0,
        top_k: int | None = 50,
        **kwargs,
    ) -> torch.Tensor:
        """Autoregressive generation with a preallocated KV cache.

        Same positional arguments as upstream; see
        :func:`open_mythos.inference.generation.generate` for the keyword options
        (``do_sample``, ``top_p``, ``eos_token_id``, ``attention_mask``, ``generator``...).

        Returns:
            (B, T + new) token ids.
        """
        from .inference.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, n_loops=n_loops,
                        temperature=temperature, top_k=top_k, **kwargs)


class OpenMythos(CausalLM):
    """Recurrent-Depth Transformer language model.

    ::

        ids -> embed -> Prelude (prelude_layers dense blocks)        -> e
            -> RecurrentBlock (one MoE block, n_loops times, LTI injection of e, ACT)
            -> Coda (coda_layers dense blocks) -> RMSNorm -> head (tied to embed) -> logits

    Build on the meta device for sizing (``with torch.device("meta"): OpenMythos(cfg)``).
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        if not isinstance(cfg, MythosConfig):
            raise TypeError(f"OpenMythos needs a MythosConfig, got {type(cfg).__name__}")
        cfg.validate()  # fields edited after the config was made are checked here too
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.token_conv = TokenConv(cfg.dim, cfg.token_conv) if cfg.token_conv else None
        # The layer classes that also take upstream's calls (open_mythos.upstream): code
        # written for upstream finds open_mythos.main's classes inside the model (an FSDP
        # wrap policy by class, hooks, a hand-written forward through the layers).
        self.prelude = nn.ModuleList(UpstreamBlock(cfg) for _ in range(cfg.prelude_layers))
        self.recurrent = UpstreamRecurrentBlock(cfg)
        self.coda = nn.ModuleList(UpstreamBlock(cfg) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_dim = type(self.recurrent.block.attn).rope_dim(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every tensor by the one rule set of :mod:`open_mythos.layers.init`:
        N(0, ``cfg.weight_std``) for weight matrices, N(0, ``cfg.embed_std``) for the tied
        embedding, ones for norms but the final one (``cfg.final_norm_gain``), the
        recurrence's own inits, zero router bias and load.

        Also re-ties the head, so ``model.to_empty(device=...); model.reset_parameters()``
        materialises a model built on the meta device.
        """
        self.tie_weights()
        init_tree(self, self.cfg)

    # Upstream's attributes, for code that runs the layers by hand ----------------------
    @property
    def freqs_cis(self) -> torch.Tensor:
        """Upstream's complex RoPE table for GQA, (max_seq_len, dim // n_heads // 2).
        Not a buffer (``model.to(dtype)`` cannot damage it) and not what ``forward`` uses:
        built on first access per device and kept, as upstream's buffer was."""
        return self._upstream_freqs(self.cfg.dim // self.cfg.n_heads)

    @freqs_cis.setter
    def freqs_cis(self, value: torch.Tensor) -> None:
        raise AttributeError(
            "freqs_cis is derived from cfg.max_seq_len and cfg.rope_theta and forward does "
            "not read it; for another context length or base, build the model from a config "
            "with that max_seq_len / rope_theta (the weights load unchanged)")

    @property
    def freqs_cis_mla(self) -> torch.Tensor:
        """Upstream's complex RoPE table for MLA, (max_seq_len, qk_rope_head_dim // 2)."""
        return self._upstream_freqs(self.cfg.qk_rope_head_dim)

    def _upstream_freqs(self, width: int) -> torch.Tensor:
        from .upstream import precompute_rope_freqs

        device = self.embed.weight.device
        stamp = (self.cfg.max_seq_len, self.cfg.rope_theta, device)
        held = _UPSTREAM_TABLES.get(self)
        if held is None or held[0] != stamp:  # first access, or the model moved
            held = _UPSTREAM_TABLES[self] = (stamp, {})
        tables = held[1]
        if width not in tables:
            tables[width] = precompute_rope_freqs(
                width, self.cfg.max_seq_len, self.cfg.rope_theta).to(device)
        return tables[width]

    @staticmethod
    def _causal_mask(seq_len: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
        """Upstream's additive causal mask, (1, 1, seq_len, seq_len): 0 on and below the
        diagonal, ``-inf`` above; in ``dtype`` (default float32) so that it can match the
        activations it is added to."""
        return torch.full((1, 1, seq_len, seq_len), float("-inf"), device=device,
                          dtype=dtype).triu(1)

    def _init_weights(self) -> None:
        """Upstream's name for :meth:`reset_parameters` (called after ``to_empty``)."""
        self.reset_parameters()

    # ------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoEFFN]:
        """Every mixture-of-experts FFN (one, in the recurrent block)."""
        return [m for m in self.modules() if isinstance(m, MoEFFN)]

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """MoE balance loss of the latest forward (mean over loops)."""
        return self.recurrent.last_aux_loss

    def update_router_bias(self) -> None:
        """One aux-loss-free balancing step on every MoE layer (call once per optimiser step)."""
        for moe in self.moe_layers():
            moe.update_router_bias()

    @property
    def default_n_loops(self) -> int:
        """Loops when a call passes ``n_loops=None``: ``cfg.max_loop_iters``."""
        return self.cfg.max_loop_iters

    def logit_lens(self, h: torch.Tensor) -> torch.Tensor:
        """The logit lens of a loop state: ``head(norm(h))``, (..., dim) -> (..., V)."""
        return self.head(self.norm(h))

    def core_states(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        n_loops: int,
        early_exit: bool = False,
        backprop_loops: int | None = None,
        keep: Collection[int] = (),
        exit_rule: ExitRule | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        kept: dict[int, torch.Tensor] = {}  # this call's own (last_states is the module's)
        out = self.recurrent(x, x, ctx, n_loops, early_exit=early_exit,
                             backprop_loops=backprop_loops, keep_states=keep,
                             exit_rule=exit_rule, lens=self.logit_lens, states_out=kept)
        return out, kept

    def cache_keys(self, n_loops: int) -> list[str]:
        return (self._input_cache_keys() + [f"prelude_{i}" for i in range(len(self.prelude))]
                + [self.recurrent.cache_key(t) for t in range(n_loops)]
                + [f"coda_{i}" for i in range(len(self.coda))])


def check_mask_values(attention_mask: torch.Tensor) -> None:
    """Refuse an ``attention_mask`` holding anything but 1 (real token) and 0 (padding)
    (reads the mask on the host).

    Raises:
        ValueError: fractions, counts or NaN.
    """
    if attention_mask.dtype != torch.bool and bool(
            ((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 1 (real token) and 0 (padding); "
                         "got other values (NaN, fractions or counts are not a mask)")
