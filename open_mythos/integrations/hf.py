"""Hugging Face ``transformers`` integration: config, causal-LM wrapper, Auto* registration.

Importing this module registers the ``"openmythos"`` model type, so that, offline::

    import open_mythos.integrations.hf  # noqa: F401  (or any module that imports it)
    from transformers import AutoModelForCausalLM

    hf = OpenMythosForCausalLM.from_mythos(model)          # wrap a trained model (any kind)
    hf.save_pretrained("out/")                             # config.json + model.safetensors
    hf = AutoModelForCausalLM.from_pretrained("out/", n_loops=8, act_early_exit=False)
    logits = hf(input_ids, n_loops=16).logits              # per-call depth
    ids = hf.generate(input_ids, max_new_tokens=32, do_sample=False, n_loops=16)

Design:
    * :class:`OpenMythosHFConfig` holds every configuration field of every model kind
      (:mod:`open_mythos.registry`) under its own name: the
      :class:`~open_mythos.config.MythosConfig` fields, and the dense baseline's
      ``core_layers`` and ``core_ffn_dim`` (None for the looped model; set, they make the
      config a :class:`~open_mythos.baseline.BaselineConfig`). Plus ``n_loops`` (default
      loop count, ``None``: ``max_loop_iters``; ignored by the fixed-depth baseline) and
      ``act_early_exit`` (``None``: on in eval mode). Both can be given to
      ``from_pretrained`` and overridden per call in ``forward`` and ``generate``.
    * :class:`OpenMythosForCausalLM` holds the plain model of the config's kind
      (:class:`~open_mythos.model.OpenMythos` or
      :class:`~open_mythos.baseline.DenseBaseline`) as ``self.model`` (parameter names
      ``model.<name>``); the LM head stays tied to the embedding and is stored once in
      ``model.safetensors``.
    * Generation uses the model's own key/value cache (:class:`MythosCache`, one entry per
      layer *and loop depth*), not a ``transformers`` cache class: ``generate`` creates it
      on the first forward and passes it back, so each decode step runs one token. Greedy
      ``generate`` gives the same tokens as :func:`open_mythos.inference.generate`. The
      cache grows by concatenation (``DictCache``), which costs a copy per step; for long
      generations prefer :func:`open_mythos.inference.generate`, whose cache is preallocated.

Tested with ``transformers`` 5.23; the code
follows the APIs shared by 4.56+ and 5.x (dict ``_tied_weights_keys``, classic config
``__init__``, ``_supports_default_dynamic_cache``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    TrainerCallback,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import (
    FLOAT_FIELDS,
    KIND_KEY,
    MythosConfig,
    check_flag,
    check_loops,
    json_floats,
    parse_json_float,
)
from ..inference.cache import DictCache
from ..inference.generation import check_no_padding_rows, last_positions
from ..layers.init import init_module
from ..layers.recurrence import ExitRule, as_exit_rule
from ..model import CausalLM
from ..registry import build_model, config_dict, config_fields, config_from_dict

# The same as open_mythos.checkpoints.HF_MODEL_TYPE (tested); not imported from there, so that
# the modeling code an export ships (:mod:`.remote_code`) stays free of the checkpoint reader.
MODEL_TYPE = "openmythos"

# NOTE: transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
# ``cache``, and the old name logs a deprecation warning on use. Both names are accepted
# here; generation and outputs use the installed version's.
CACHE_NAME = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
              else "past_key_values")

class OpenMythosHFConfig(PretrainedConfig):
    """``transformers`` configuration of an OpenMythos model of any kind.

    Keys: every configuration field of every model kind registered (same names and
    defaults: the :class:`~open_mythos.config.MythosConfig` fields, and
    ``core_layers``/``core_ffn_dim``, None unless the model is the dense baseline), plus:

    Args:
        n_loops: default recurrent loops of ``forward``/``generate``; ``None`` means
            ``max_loop_iters``. Ignored by the dense baseline.
        act_early_exit: default ACT early exit; ``None`` means on in eval mode, off in
            training mode (the model's own rule).
        exit_rule: default training-free exit rule, the fields of an
            :class:`~open_mythos.layers.recurrence.ExitRule` as a dict (``{"kl": 0.01}``);
            ``None``: none.
        model_kind: the registered model kind's name (:func:`open_mythos.registry.kind_of`),
            written by :meth:`from_mythos_config`; loading a kind this process has not
            registered is an error. ``None`` (configs written before 2026-12-07): the kind
            is told by the fields.
        trained_depth: the loop count the model was trained at, written by
            ``openmythos export`` (whose ``--n-loops`` may set another default ``n_loops``);
            informational: ``openmythos info`` prints it, ``openmythos report`` marks it,
            ``hf_to_training`` keeps it as the checkpoint's depth. ``None``: not recorded.
        tie_word_embeddings: must stay True: the LM head is the embedding matrix.
        **kwargs: configuration fields and the usual ``PretrainedConfig`` keys
            (``bos_token_id``, ``eos_token_id``, ``pad_token_id``...).
    """

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "dim",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        n_loops: int | None = None,
        act_early_exit: bool | None = None,
        exit_rule: dict[str, Any] | ExitRule | None = None,
        tie_word_embeddings: bool = True,
        trained_depth: int | None = None,
        model_kind: str | None = None,
        **kwargs: Any,
    ):
        # (Read at every construction: a kind registered after this module was imported
        # has its fields here too.)
        for name, default in config_fields().items():
            value = kwargs.pop(name, default)
            if name in FLOAT_FIELDS:  # to_dict writes a non-finite float as "inf"
                value = parse_json_float(value)
            setattr(self, name, str(value) if name == "attn_type" else value)
        if not tie_word_embeddings:
            raise ValueError("OpenMythos ties the LM head to the embedding; "
                             "tie_word_embeddings=False is not supported")
        self.n_loops = n_loops
        self.act_early_exit = act_early_exit
        self.exit_rule = exit_rule
        self.trained_depth = trained_depth
        self.model_kind = model_kind
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # The inference options are checked on every assignment: ``from_pretrained(...,
        # n_loops=N)`` sets them after __init__. n_loops becomes a Python int (the config is
        # printed, which a NumPy integer would not serialise) and exit_rule the dict of a
        # valid ExitRule (JSON).
        if name in ("n_loops", "trained_depth"):
            value = check_loops(value, allow_none=True, name=name)
        elif name == "act_early_exit":
            value = check_flag(value, "act_early_exit")
        elif name == "exit_rule" and value is not None:
            value = dataclasses.asdict(as_exit_rule(value))
        elif name == "tie_word_embeddings" and value is not True:
            # from_pretrained(..., tie_word_embeddings=False) sets it after __init__: an
            # untied head would be left uninitialised (every logit NaN).
            raise ValueError("OpenMythos ties its LM head to the token embedding: "
                             f"tie_word_embeddings={value!r} is not supported")
        super().__setattr__(name, value)

    def to_dict(self) -> dict[str, Any]:
        # config.json stays strict JSON: act_threshold=inf is written "inf", as
        # MythosConfig.to_dict writes it.
        return json_floats(super().to_dict())

    def to_mythos_config(self) -> MythosConfig:
        """The configuration these keys describe, of its kind (``model_kind``; without one,
        a :class:`~open_mythos.baseline.BaselineConfig` when ``core_layers`` or
        ``core_ffn_dim`` is set; validated)."""
        fields = {name: getattr(self, name) for name in config_fields() if hasattr(self, name)}
        return config_from_dict({KIND_KEY: self.model_kind, **fields})

    @classmethod
    def from_mythos_config(cls, cfg: MythosConfig, **kwargs: Any) -> OpenMythosHFConfig:
        """Config for ``cfg`` (any kind); ``kwargs`` adds ``n_loops``, token ids and other
        HF keys."""
        return cls(**config_dict(cfg), **kwargs)


#: Keyword arguments transformers' Trainer, pipelines and tokenizers pass to a model's
#: ``forward`` that it may take without using: ``num_items_in_batch`` (read for the loss),
#: ``cache_position`` (positions come from the cache), ``token_type_ids`` (``model(**tok(...))``
#: with a tokenizer that returns them), ``output_attentions`` (refused when true).
_PASSED_BY_TRANSFORMERS = frozenset({"num_items_in_batch", "cache_position", "token_type_ids",
                                     "output_attentions",
                                     # generate(stop_strings=..., tokenizer=tok) leaves the
                                     # tokenizers among the model kwargs
                                     "tokenizer", "assistant_tokenizer"})


class MythosCache:
    """OpenMythos key/value cache carried through ``transformers.generate``.

    Wraps a :class:`~open_mythos.inference.cache.DictCache` (entries per layer and loop
    depth, grown by concatenation) and the number of cached positions. Implements the
    small part of the ``transformers`` cache interface that generation strategies use:
    ``get_seq_length``, ``crop`` and ``reorder_cache`` (beam search), and the past-recording
    calls of the deferred stop check (``generate`` on Apple MPS), which a cache of keys and
    values, cropped by position, does not need.
    """

    is_compileable = False
    is_croppable = True
    layers: tuple = ()  # no per-layer objects (the deferred stop check iterates them)

    def __init__(self) -> None:
        # The model's own layout: nobody reads this cache in upstream's.
        self.store = DictCache({}, upstream_layout=False)
        self.seq_len = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers 5's convention: 0
        removes nothing); a positive value keeps that many (the absolute length, as
        transformers 4 meant it)."""
        keep = self.seq_len + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        self.seq_len = max(0, min(self.seq_len, keep))
        self.store.truncate(self.seq_len)

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Nothing to record: keys and values are cropped by position."""

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows ``beam_idx`` (beam search)."""
        for key, entry in self.store.store.items():
            self.store.store[key] = {
                n: t.index_select(0, beam_idx.to(t.device)) for n, t in entry.items()
            }

    def nbytes(self) -> int:
        return self.store.nbytes()

    def __repr__(self) -> str:
        return f"MythosCache(seq_len={self.seq_len}, nbytes={self.nbytes()})"


class OpenMythosForCausalLM(PreTrainedModel, GenerationMixin):
    """An OpenMythos model (the looped :class:`~open_mythos.model.OpenMythos` or the
    :class:`~open_mythos.baseline.DenseBaseline`, as the config says) as a
    ``transformers`` causal language model.

    ``forward`` returns a ``CausalLMOutputWithPast``; with ``labels`` its ``loss`` is the
    mean next-token cross entropy (labels equal to -100 ignored; MoE and ponder losses are
    not included; under ``transformers.Trainer`` add :class:`RouterBiasCallback` so that
    the experts stay balanced). Positions come from ``attention_mask`` (left padding), so
    ``position_ids`` and ``inputs_embeds`` are not accepted.
    """

    config_class = OpenMythosHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock", "RecurrentBlock"]
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    # Not written (the tied head is the embedding). transformers.Trainer, resuming, re-ties a
    # checkpoint that lacks exactly these keys instead of warning that they are missing.
    _keys_to_ignore_on_save = ["model.head.weight"]
    # gradient_checkpointing_enable() sets RecurrentBlock.gradient_checkpointing (each loop
    # is recomputed in the backward pass) or DenseBaseline.gradient_checkpointing (each core
    # block): the models' own checkpointing, not transformers'.
    supports_gradient_checkpointing = True

    def __init__(self, config: OpenMythosHFConfig):
        super().__init__(config)  # config.n_loops was checked when set (__setattr__)
        self.model = build_model(config.to_mythos_config())
        self.post_init()

    @classmethod
    def from_mythos(cls, model: CausalLM, **config_kwargs: Any) -> OpenMythosForCausalLM:
        """Wrap an existing model (shared, not copied); ``config_kwargs`` as for the config.

        The wrapper is built on the meta device, so no weights are allocated twice.
        """
        config = OpenMythosHFConfig.from_mythos_config(model.cfg, **config_kwargs)
        with torch.device("meta"):
            hf = cls(config)
        hf.model = model
        hf.train(model.training)
        return hf

    # Weights -------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The initialisation of the native model (:func:`open_mythos.layers.init.init_module`),
        one module at a time.

        ``transformers`` calls it children first, on modules whose tensors were not loaded
        from a checkpoint; it uses ``nn.init`` functions only, which ``transformers``
        guards so that loaded tensors are never overwritten.
        """
        model = self.model
        init_module(module, model.cfg, final_norm=model.norm, tied_head=model.head)
        act = getattr(getattr(model, "recurrent", None), "act", None)
        if act is not None and module is act.halt:
            # NOTE: transformers skips modules without parameters of their own, such as
            # ACTHalting, so its halting-bias init is applied from its Linear.
            act.reset_parameters()

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained``; a config with an ``auto_map`` (an export for
        ``trust_remote_code``) also gets the modeling code beside it when this class is the
        installed package's, so the saved directory loads where the package is not installed
        (a model loaded through remote code gets its files copied by ``transformers``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self.config, "auto_map", None) and __name__ == "open_mythos.integrations.hf":
            import importlib  # not a relative import: the exported copy must not bundle it

            remote_code = importlib.import_module("open_mythos.integrations.remote_code")
            if kwargs.get("is_main_process", True):
                remote_code.write_modeling_code(save_directory)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        raise NotImplementedError(
            "OpenMythos cannot resize its vocabulary in place; build a model with a larger "
            "MythosConfig.vocab_size and copy the weights")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the model (the tied head counted once); ``exclude_embeddings``
        leaves out the token embedding only. (``transformers`` would leave out every
        ``nn.Embedding``, including the per-loop LoRA scales, which are weights of the
        recurrent block.)"""
        skip = {id(self.get_input_embeddings().weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    @property
    def mythos_config(self) -> MythosConfig:
        return self.model.cfg

    # Forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MythosCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache: MythosCache | None = None,
        n_loops: int | None = None,
        act_early_exit: bool | None = None,
        exit_rule: ExitRule | dict[str, Any] | bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for ``input_ids`` (B, T).

        Args:
            input_ids: (B, T) token ids; with a cache, only the positions not yet cached.
            attention_mask: (B, cached + T) 1 for tokens, 0 for (left) padding.
            past_key_values: a :class:`MythosCache` from an earlier call, or None (``cache``
                is the same argument under transformers 5.24's name).
            labels: (B, T) targets for the loss (shifted inside); -100 is ignored.
            use_cache: start and return a :class:`MythosCache` when none is passed
                (default False outside ``generate``); a cache passed in is always returned.
            n_loops: recurrent loops for this call (default ``config.n_loops``).
            act_early_exit: ACT early exit for this call (default ``config.act_early_exit``).
            exit_rule: training-free exit rule for this call (an ``ExitRule`` or a dict of
                its fields; default ``config.exit_rule``; False: none, whatever the config
                sets).
            logits_to_keep: compute logits for the last ``k`` positions only (0: all), or
                for the positions in an index tensor.
            output_hidden_states: also return the final normalised hidden states, as a
                one-element tuple.
        """
        unknown = sorted(set(kwargs) - _PASSED_BY_TRANSFORMERS)
        if unknown:  # a misspelled option (n_loop=) would otherwise run at the default
            raise TypeError(f"OpenMythosForCausalLM.forward() got unexpected keyword "
                            f"argument(s) {', '.join(unknown)}")
        if kwargs.get("output_attentions"):
            raise ValueError("OpenMythosForCausalLM does not return attention weights "
                             "(output_attentions)")
        if inputs_embeds is not None:
            raise ValueError("OpenMythosForCausalLM takes input_ids, not inputs_embeds")
        if position_ids is not None:
            raise ValueError("OpenMythosForCausalLM derives positions from attention_mask; "
                             "position_ids is not supported")
        if input_ids is None:
            raise ValueError("input_ids is required")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        n_loops = self.config.n_loops if n_loops is None else n_loops
        if act_early_exit is None:
            act_early_exit = self.config.act_early_exit
        # False: none for this call, whatever the config sets (None means the config's).
        exit_rule = None if exit_rule is False else as_exit_rule(
            self.config.exit_rule if exit_rule is None else exit_rule)

        passed = cache if cache is not None else past_key_values
        cache = _as_mythos_cache(passed)
        # A cache passed in is returned, updated, whatever use_cache says (as transformers'
        # own models do): code that keeps the returned cache must not lose its context. An
        # empty foreign cache (``past_key_values=DynamicCache()``) becomes ours.
        returned = passed is not None or bool(use_cache)
        if cache is None and returned:
            cache = MythosCache()
        start = cache.seq_len if cache is not None else 0
        T = input_ids.shape[1]
        mask = attention_mask
        if mask is not None:
            if mask.shape != (input_ids.shape[0], start + T):
                raise ValueError(
                    f"attention_mask must have shape (batch, cached + new) = "
                    f"{(input_ids.shape[0], start + T)}, got {tuple(mask.shape)}")
            if bool(mask.all()):
                mask = None  # no padding: the plain causal path (same as inference.generate)

        # The last k positions' logits only (generate's prefill asks for 1): the last Coda
        # block then runs there alone. Hidden states and the loss need every position.
        B = input_ids.shape[0]
        last_k = (isinstance(logits_to_keep, int) and 0 < logits_to_keep < T
                  and labels is None and not output_hidden_states)
        at = last_positions(input_ids, logits_to_keep) if last_k else None
        hidden = self.model.hidden_states(
            input_ids, n_loops, cache.store if cache is not None else None, start,
            attention_mask=mask, act_early_exit=act_early_exit,
            exit_rule=exit_rule, logits_at=at)  # (B, T, dim), or (B * k, dim) with at
        if last_k:
            hidden = hidden.view(B, logits_to_keep, -1)
        if cache is not None:
            cache.seq_len = start + T

        loss = None
        if labels is not None:
            logits = self.model.head(hidden)
            # With num_items_in_batch (transformers' Trainer passes it under gradient
            # accumulation, because forward takes **kwargs) the loss is the sum over this
            # micro-batch divided by the labelled tokens of the whole accumulated batch.
            items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100,
                                   reduction="mean" if items is None else "sum")
            if items is not None:
                loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
        else:  # (with last_k, hidden holds the last k positions already)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.model.head(hidden[:, keep])

        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=(hidden,) if output_hidden_states else None,
            **{CACHE_NAME: cache if returned else None},
        )
        return out if return_dict else out.to_tuple()

    # Generation ----------------------------------------------------------------------------

    def _validate_generated_length(self, generation_config: Any, input_ids_length: int,
                                   *args: Any, **kwargs: Any) -> None:
        """transformers' checks, and the model's: a generation longer than ``max_seq_len``
        is refused before the first token (as :func:`open_mythos.inference.generate` does),
        not after decoding up to the limit."""
        super()._validate_generated_length(generation_config, input_ids_length, *args, **kwargs)
        limit = self.model.cfg.max_seq_len
        if input_ids_length >= limit and generation_config.max_length is not None \
                and generation_config.max_length > input_ids_length:
            raise ValueError(
                f"the prompt ({input_ids_length} tokens) leaves no room for a new token in "
                f"max_seq_len={limit}: shorten it to at most {limit - 1} tokens")
        if generation_config.max_length is not None and generation_config.max_length > limit:
            raise ValueError(
                f"prompt ({input_ids_length} tokens) + new tokens = "
                f"{generation_config.max_length} exceeds max_seq_len={limit}; ask for at most "
                f"{limit - input_ids_length} new tokens")

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None,
                 **kwargs: Any) -> Any:
        """``transformers``' ``generate``; the decoding modes it cannot run with this
        model's cache (one entry per layer and loop depth) are refused by name, where
        ``transformers`` reported a missing cache."""
        config = generation_config if generation_config is not None else self.generation_config
        for name, mode in _UNSUPPORTED_GENERATION.items():
            value = kwargs.get(name, getattr(config, name, None))
            if value is not None:
                raise ValueError(
                    f"OpenMythosForCausalLM.generate does not support {mode} (the {name} "
                    "option); for speculative decoding of a looped model use "
                    "open_mythos.inference.speculative_generate (it drafts with fewer loops)")
        return super().generate(inputs, generation_config, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # NOTE: our cache has one entry per layer *and loop depth*; transformers must not
        # create its own cache, the first forward returns a MythosCache instead.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: MythosCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MythosCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The uncached tail of ``input_ids`` plus the cache, mask and OpenMythos options."""
        if inputs_embeds is not None:
            raise ValueError("OpenMythosForCausalLM.generate takes input_ids, not inputs_embeds")
        cache = _as_mythos_cache(cache if cache is not None else past_key_values)
        start = cache.seq_len if cache is not None else 0
        if start > input_ids.shape[1]:
            raise ValueError(
                f"the cache holds {start} positions but input_ids only {input_ids.shape[1]}: "
                "pass the cache of a prefix of input_ids (generate grows a cache in place; "
                "copy.deepcopy a prompt's cache before reusing it)")
        if not start and attention_mask is not None:
            # A row of padding alone was decoded from no context (as one prompt,
            # transformers refuses it).
            check_no_padding_rows(attention_mask)
        if start and start == input_ids.shape[1]:  # the whole prompt is cached: the next
            cache.crop(-1)  # token's logits need its last position run again
            start -= 1
        inputs: dict[str, Any] = {
            "input_ids": input_ids[:, start:].contiguous(),
            CACHE_NAME: cache,
            "attention_mask": attention_mask,
        }
        # Generation bookkeeping that forward does not take (positions come from the mask).
        skip = {"next_sequence_length", "is_first_iteration", "cache_position", "position_ids"}
        inputs.update({k: v for k, v in kwargs.items() if k not in skip})
        return inputs


#: ``generate`` options of decoding modes that need a cache ``transformers`` manages itself.
_UNSUPPORTED_GENERATION = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "assistant_early_exit": "early-exit assisted decoding",
    "prefill_chunk_size": "chunked prefill",
}


def _as_mythos_cache(past_key_values: Any) -> MythosCache | None:
    """Our cache, or None for an absent or empty foreign cache (some transformers versions
    pass an empty ``DynamicCache``); a non-empty foreign cache is an error."""
    if past_key_values is None or isinstance(past_key_values, MythosCache):
        return past_key_values
    length = getattr(past_key_values, "get_seq_length", lambda: None)()
    if length == 0:
        return None
    raise TypeError(
        f"past_key_values must be a MythosCache from an earlier OpenMythos call, got "
        f"{type(past_key_values).__name__}")


# Byte-level tokenizer for transformers --------------------------------------------------------


def byte_tokenizer_for_transformers(add_bos_token: bool = False, **kwargs: Any) -> Any:
    """A ``transformers`` fast tokenizer with exactly the ids of
    :class:`~open_mythos.tokenizers.ByteTokenizer` (bytes 0..255, ``<pad>`` 256,
    ``<bos>`` 257, ``<eos>`` 258), built locally, for ``AutoTokenizer`` users.

    It adds no special tokens when encoding (like ``ByteTokenizer``), or with
    ``add_bos_token`` starts every text with ``<bos>`` (a task run's tokenizer,
    :func:`~open_mythos.tokenizers.task_tokenizer`; ``add_special_tokens=False`` leaves it
    out), and pads on the left, as batched generation with a decoder-only model needs
    (``ByteTokenizer`` and exported tokenizers do too); ``kwargs`` are further tokenizer
    settings (``padding_side``, ``model_max_length``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..tokenizers import BYTE_LEVEL_CHARS, ByteTokenizer

    vocab = dict(BYTE_LEVEL_CHARS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = list(ByteTokenizer.SPECIAL_TOKENS)  # ids 256, 257, 258 in this order
    tok.add_special_tokens(special)
    if add_bos_token:
        bos = ("<bos>", ByteTokenizer().bos_token_id)
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[bos])
    # split_special_tokens: the text "<eos>" is five bytes, as with ByteTokenizer.
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", clean_up_tokenization_spaces=False,
                                   split_special_tokens=True,
                                   **{"padding_side": "left", **kwargs})


def register() -> None:
    """Register the ``"openmythos"`` type with ``AutoConfig`` and ``AutoModelForCausalLM``
    (idempotent; done when this module is imported)."""
    AutoConfig.register(MODEL_TYPE, OpenMythosHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(OpenMythosHFConfig, OpenMythosForCausalLM, exist_ok=True)


# NOTE: only as this package's own module: the copy an exported directory ships for
# trust_remote_code (:mod:`.remote_code`) must not take over the "openmythos" type.
if __name__ == "open_mythos.integrations.hf":
    register()

class RouterBiasCallback(TrainerCallback):
    """The MoE layers' aux-loss-free balancing under ``transformers.Trainer``: one
    router-bias step per optimiser step (what ``openmythos train`` does), from the expert
    load of every forward since the previous step, summed over ranks when
    ``torch.distributed`` is initialised so that every rank keeps the same bias. Without it
    nothing calls ``update_router_bias()`` and the router bias never moves::

        Trainer(model=hf, args=args, train_dataset=data, callbacks=[RouterBiasCallback()])
    """

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        core = getattr(model, "model", model)
        layers = core.moe_layers() if hasattr(core, "moe_layers") else []
        if not layers:
            return
        loads = torch.stack([moe.load_since_update for moe in layers])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads)
        for moe, load in zip(layers, loads.unbind(0)):
            moe.update_router_bias(load=load)


__all__ = [
    "CACHE_NAME", "MODEL_TYPE", "MythosCache", "OpenMythosForCausalLM", "OpenMythosHFConfig",
    "RouterBiasCallback", "byte_tokenizer_for_transformers", "register",
]
