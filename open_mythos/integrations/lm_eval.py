"""lm-evaluation-harness model ``"openmythos"``: log-likelihoods and generation of our model.

Importing this module registers :class:`OpenMythosLM` with the harness, beside (not instead
of) the harness's own models (``get_model("hf")`` keeps working)::

    import lm_eval
    import open_mythos.integrations.lm_eval  # noqa: F401  registers "openmythos"

    results = lm_eval.simple_evaluate(
        model="openmythos", model_args="pretrained=runs/my_run,n_loops=8,batch_size=8",
        tasks=["lambada_openai"])

or with a model in memory: ``OpenMythosLM(pretrained=model, tokenizer=tok, n_loops=8)``.
From the shell, ``python -m open_mythos.integrations.lm_eval`` is the ``lm_eval`` command with
this model registered (lm-eval 0.4 discovers no plugins, so plain ``lm_eval`` cannot know it)::

    python -m open_mythos.integrations.lm_eval run --model openmythos \
        --model_args pretrained=runs/my_run --tasks lambada_openai

A run's default depth is the one it trained at (:attr:`~open_mythos.checkpoints.LoadedModel.
n_loops`). The same run exported with ``openmythos export --format hf`` scores the same with
the harness's stock ``--model hf`` (``trust_remote_code=True``; needs ``accelerate``).

It runs our model directly (no ``transformers`` and no ``accelerate`` needed); ``pretrained``
may be a training checkpoint or run directory, a Hugging Face directory written by
:mod:`open_mythos.integrations.hf` (read by :func:`open_mythos.checkpoints.load_model`), a
model of any kind (:class:`~open_mythos.model.OpenMythos`,
:class:`~open_mythos.baseline.DenseBaseline`) or an ``OpenMythosForCausalLM``. ``n_loops``
sets the recurrent depth of every request, so a depth sweep is one model per loop count over
the same weights; the dense baseline's depth is fixed and it ignores ``n_loops``.

Scoring follows the harness's ``HFLM``: a request's tokens are ``context + continuation``
truncated on the left to ``max_length + 1``, the continuation is scored by the log-softmax
(float32) of the logits that predict it, and ``is_greedy`` says whether each of its tokens is
the argmax. Batches are right-padded, which cannot change a causal model's scores.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (registers the harness's own models first: see below)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..config import check_flag, check_loops
from ..layers.recurrence import ExitRule, as_exit_rule
from ..model import CausalLM
from ..registry import is_looped
from ..tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, pad_rows
from .textgen import (
    PLAIN_CHAT_ROLES,
    GenerationOptions,
    chat_prompt,
    chat_template_of,
    complete,
    vocab_bound,
)

DEFAULT_BATCH_SIZE = 8

log = logging.getLogger(__name__)

# NOTE: lm-eval fills its model registry with its own models only when the registry is empty
# on the first lookup; registering ours into an empty registry would hide them all
# ("no model for this name found! Supported model names: openmythos"). Importing
# ``lm_eval.models`` above fills it first.

@register_model("openmythos")
class OpenMythosLM(TemplateLM):
    """The harness's view of an OpenMythos model.

    Args:
        pretrained: checkpoint/run/Hugging Face directory, or a model object
            (``OpenMythos``, ``DenseBaseline`` or ``OpenMythosForCausalLM``).
        tokenizer: tokenizer object or name for :func:`~open_mythos.tokenizers.load_tokenizer`;
            default: the one stored with the checkpoint, else the byte tokenizer when the
            vocabulary matches it.
        n_loops: recurrent loops of every forward (default: the checkpoint's ``n_loops``,
            else ``cfg.max_loop_iters``); validated and ignored by the dense baseline.
        act_early_exit: ACT early exit (default: a Hugging Face export's configured
            default, else on, as in eval mode).
        batch_size: sequences per forward (``"auto"`` means :data:`DEFAULT_BATCH_SIZE`).
        max_batch_size: the cap on ``"auto"`` (the harness passes it with every model).
        max_length: context length, 1 to ``cfg.max_seq_len`` (default: the sequence length
            the run trained on where its checkpoint records it, else ``cfg.max_seq_len``).
        max_gen_toks: default cap on generated tokens for ``generate_until``.
        device, dtype: where and in which dtype to load a checkpoint (``"bfloat16"``...);
            ``"auto"`` (default) is CUDA when available; CUDA asked for where there is none
            falls back to the CPU with a warning, as the harness's ``hf`` model does (its
            command line passes ``cuda`` by default). A model object stays where it is, in
            its dtype (as the harness's ``hf`` model keeps one), with a warning when these
            ask for another place or dtype: move it with ``.to()`` first.
        add_bos_token: prefix every encoded text with BOS; None (default): as the
            tokenizer does by default (``Tokenizer.add_bos_token``: yes for a task run,
            whose training examples start with BOS; no for text runs).
        exit_rule: a training-free exit rule for every forward: an ``ExitRule``, a dict of
            its fields, or in ``model_args`` ``field:value`` pairs joined by ``;``
            (``exit_rule=kl:0.1;min_loops:2``); None (``exit_rule=none`` in ``model_args``,
            which lm-eval reads as None) for none; ``"default"``: a Hugging Face export's
            configured ``exit_rule`` (what the harness's ``hf`` model applies), else none.
    """

    def __init__(
        self,
        pretrained: str | Path | Any,
        tokenizer: str | Tokenizer | None = None,
        n_loops: int | None = None,
        act_early_exit: bool | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = None,
        add_bos_token: bool | None = None,
        exit_rule: ExitRule | dict[str, Any] | str | None = "default",
    ):
        super().__init__()
        self.model, self.tokenizer, stored_loops, trained_len = _load(
            pretrained, tokenizer, _pick_device(device), dtype,
            n_loops_given=n_loops is not None)
        stored_exit, stored_rule = _inference_defaults(pretrained)
        if not isinstance(pretrained, (str, Path)):
            _warn_if_moved(self.model, device, dtype)
        self.model.eval()
        self.n_loops = n_loops if n_loops is not None else (stored_loops or self.model.cfg.max_loop_iters)
        self.n_loops = check_loops(self.n_loops)
        if act_early_exit is None:
            act_early_exit = True if stored_exit is None else stored_exit
        self.act_early_exit = check_flag(act_early_exit, "act_early_exit")
        self.exit_rule = _exit_rule_arg(stored_rule if exit_rule == "default" else exit_rule)
        if self.exit_rule is not None and not is_looped(self.model):
            raise ValueError("exit_rule: the model is a fixed-depth baseline, which has no "
                             "loops to exit")
        if str(batch_size).startswith("auto"):
            self.batch_size_per_call = DEFAULT_BATCH_SIZE
            if max_batch_size is not None:
                self.batch_size_per_call = min(self.batch_size_per_call, int(max_batch_size))
        else:
            self.batch_size_per_call = int(batch_size)
        if self.batch_size_per_call < 1:
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size!r} "
                             f"(max_batch_size {max_batch_size!r})")
        # The length the run trained on, where it records one: positions past it were never
        # trained, and scoring windows that long reads them (max_length= to choose).
        limit = self.model.cfg.max_seq_len
        valid = (isinstance(max_length, int) and not isinstance(max_length, bool)
                 and 1 <= max_length <= limit)
        if max_length is not None and not valid:
            raise ValueError(f"max_length must be an integer from 1 to the model's "
                             f"max_seq_len {limit}, got {max_length!r}")
        self._max_length = max_length or min(trained_len or limit, limit)
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = (self.tokenizer.add_bos_token if add_bos_token is None
                              else add_bos_token)
        self._device = next(self.model.parameters()).device

    # Tokens ------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # BOS, as the harness's own hf model takes it, so that both score an export alike
        # (a text run's documents started after EOS; the first token's score differs).
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        add_bos = self.add_bos_token and add_special_tokens is not False
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # Chat (--apply_chat_template) -------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, for the harness's request-cache keys."""
        inner = getattr(self.tokenizer, "tokenizer", None)
        name = getattr(inner, "name_or_path", None) or type(self.tokenizer).__name__
        return str(name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template ``apply_chat_template`` uses (None when ``chat_template`` is off):
        the tokenizer's own, else a description of the plain ``Role: content`` template."""
        if not chat_template:
            return None
        own = chat_template_of(self.tokenizer)
        if own is not None:
            return own
        return "plain: " + "; ".join(f"{k} -> {v}:" for k, v in PLAIN_CHAT_ROLES.items())

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt of a few-shot conversation: the tokenizer's chat template, else one
        ``Role: content`` line per message and ``Assistant:`` (as the server renders chats)."""
        return chat_prompt(self.tokenizer, chat_history, add_generation_prompt)[0]

    # Scoring -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _logits(self, rows: list[list[int]], at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, width, V) of right-padded ``rows``, on the model's device; with ``at``
        (flat positions into B * width) only there, (N, V): the head (and, for a few
        positions per row, the last Coda block) then skips the rest."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, _ = pad_rows(rows, pad, side="right")
        rule = {} if self.exit_rule is None else {"exit_rule": self.exit_rule}
        return self.model(ids.to(self.device), n_loops=self.n_loops,
                          act_early_exit=self.act_early_exit, logits_at=at, **rule)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation tokens), all greedy)`` for each ``(key, ctx, cont)``."""
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            if not ctx and not cont:
                raise ValueError("a request has neither context nor continuation tokens")
            if not cont:  # scored 0.0 and greedy, an option that always won
                raise ValueError(
                    "a request's continuation encodes to no tokens of its own (the "
                    "tokenizer merges it into the context's last token); the harness's hf "
                    f"model refuses it too (context tokens {ctx[-8:]})")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first, so padding is small and a too-long batch fails early.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bs = override_bs or self.batch_size_per_call
        for start in tqdm(range(0, len(order), bs), disable=disable_tqdm or len(order) <= bs,
                          desc="openmythos loglikelihood"):
            chunk = order[start: start + bs]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            # Logits only where a continuation token is predicted: (sum of len(cont), V).
            width, index = max(len(inp) for inp in inputs), []
            for row, (i, inp) in enumerate(zip(chunk, inputs)):
                first = len(inp) - len(requests[i][2])
                if first < 0:
                    raise ValueError("a continuation needs at least one context token before it "
                                     "(the harness gives an empty context the prefix token)")
                index.extend(range(row * width + first, row * width + len(inp)))
            # Over the ids generate_until may produce (a padded embedding's extra rows are
            # no token), so that its greedy text scores as greedy here.
            logits = self._logits(inputs, torch.tensor(index, dtype=torch.long))[
                :, :vocab_bound(self.model, self.tokenizer)]
            offset = 0
            for i in chunk:
                key, _, cont = requests[i]
                target = torch.tensor(cont, dtype=torch.long, device=logits.device)
                # The continuation's rows, in float32: (len(cont), V).
                lp = torch.log_softmax(logits[offset: offset + len(cont)].float(), -1)
                offset += len(cont)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of ``max_length`` tokens with
        as much context as fits (the harness's rolling scheme)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm,
                            desc="openmythos rolling"):
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    # The prefix token (BOS) starts the first window: the text itself
                    # without one, or a BOS-adding tokenizer would score BOS after BOS.
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)
            ]
            total = sum(s for s, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # Generation --------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless ``do_sample``) continuations, cut at the first ``until`` string."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc="openmythos generate"):
            kwargs = generation_settings(gen_kwargs, self.max_gen_toks)
            max_new = kwargs["max_gen_toks"]
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for the context in max_length="
                    f"{self.max_length}: pass a smaller max_gen_toks (model_args or the "
                    "task's generation_kwargs)")
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            do_sample, temperature = kwargs["do_sample"], kwargs["temperature"]
            options = GenerationOptions(
                max_new_tokens=max_new, n_loops=self.n_loops, do_sample=do_sample,
                temperature=temperature if do_sample else 1.0, top_k=kwargs["top_k"],
                top_p=kwargs["top_p"], stop=tuple(kwargs["until"]), seed=kwargs["seed"],
                act_early_exit=self.act_early_exit, exit_rule=self.exit_rule)
            text = complete(self.model, self.tokenizer, [ids], options)[0].text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


#: Aliases of ``max_gen_toks`` in a task's ``generation_kwargs``, by priority (the harness's
#: own order: HF's name, then the API backends').
MAX_TOKEN_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
#: Settings ``generate_until`` reads; others are ignored with a warning.
GENERATION_KEYS = {"until", "do_sample", "temperature", "top_k", "top_p", "seed",
                   *MAX_TOKEN_ALIASES}


def generation_settings(gen_kwargs: dict[str, Any] | None, default_max_gen_toks: int
                        ) -> dict[str, Any]:
    """A task's ``generation_kwargs`` read as the harness reads them for its ``hf`` model
    (``lm_eval.models.utils.normalize_gen_kwargs``): ``until`` as a list; ``max_gen_toks``
    from the first of :data:`MAX_TOKEN_ALIASES` given, else the default; ``do_sample``
    unset means sampling exactly when ``temperature`` > 0, and ``do_sample=False`` means
    greedy whatever the temperature. Returns ``until``, ``max_gen_toks``, ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``seed``. Settings this model does not
    implement are logged as ignored."""
    kwargs = dict(gen_kwargs or {})
    ignored = sorted(set(kwargs) - GENERATION_KEYS)
    if ignored:
        log.warning("openmythos generate_until ignores the generation settings %s", ignored)
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    given = [kwargs[k] for k in MAX_TOKEN_ALIASES if kwargs.get(k) is not None]
    max_gen_toks = int(given[0]) if given else int(default_max_gen_toks)
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = kwargs.get("do_sample")
    do_sample = temperature > 0 if do_sample is None else bool(do_sample)
    if not do_sample:
        temperature = 0.0
    elif temperature <= 0:
        temperature = 1.0  # do_sample=True without a temperature: plain sampling
    return {"until": until, "max_gen_toks": max_gen_toks, "do_sample": do_sample,
            "temperature": temperature, "top_k": kwargs.get("top_k"),
            "top_p": kwargs.get("top_p"), "seed": kwargs.get("seed")}


def _pick_device(spec: str | torch.device | None) -> torch.device:
    from ..devices import resolve_device

    if spec is None:
        spec = "auto"
    if str(spec).startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA is not available: the openmythos model runs on the CPU")
        return torch.device("cpu")
    return resolve_device(spec)


def _load(pretrained: Any, tokenizer: str | Tokenizer | None, device: torch.device,
          dtype: str | torch.dtype | None, n_loops_given: bool | None = None
          ) -> tuple[CausalLM, Tokenizer, int | None, int | None]:
    """``(model, tokenizer, stored default n_loops, trained sequence length)`` from any
    accepted ``pretrained`` (the last two None where nothing records them)."""
    from ..checkpoints import floating_dtype

    dtype = None if dtype == "auto" else floating_dtype(dtype)
    if isinstance(pretrained, (str, Path)):
        from ..checkpoints import load_model
        from .convert import resolve_tokenizer, trained_seq_len

        loaded = load_model(pretrained, device=device, dtype=dtype)
        return (loaded.model, resolve_tokenizer(loaded, tokenizer), loaded.n_loops,
                trained_seq_len(loaded.path))
    stored = None
    if not isinstance(pretrained, CausalLM):  # every model kind is a CausalLM
        # An OpenMythosForCausalLM, this package's or the copy trust_remote_code loads
        # (whose inner model is the copy's class): known by its wrapped model's interface.
        hf_model = getattr(pretrained, "model", None)
        if not (isinstance(hf_model, CausalLM) or _looks_like_mythos(hf_model)):
            raise TypeError(f"pretrained must be a path, an OpenMythos model (looped or dense "
                            f"baseline) or an OpenMythosForCausalLM, got "
                            f"{type(pretrained).__module__}.{type(pretrained).__name__}")
        stored = getattr(pretrained.config, "n_loops", None)
        source = getattr(pretrained.config, "name_or_path", None)
        pretrained = hf_model
        if tokenizer is None and source and Path(source).is_dir():
            # The directory it was loaded from: its tokenizer, a task run's with BOS (the
            # byte tokenizer's default leaves BOS out, and a task model then answers wrongly).
            from ..checkpoints import CheckpointFormat, LoadedModel
            from .convert import resolve_tokenizer

            local = LoadedModel(pretrained, pretrained.cfg, Path(source), CheckpointFormat.HF)
            try:
                return pretrained, resolve_tokenizer(local, None), stored, None
            except (OSError, ValueError):  # no readable tokenizer there: as for an object
                pass
    elif tokenizer is None or n_loops_given is False:
        warnings.warn(
            "pretrained is a model object, which records neither its tokenizer nor the depth "
            "it was trained at: scoring with "
            + ("the byte tokenizer (no BOS: pass tokenizer=task_tokenizer() for a task run's "
               "model) " if tokenizer is None else "the tokenizer given ")
            + ("and n_loops=cfg.max_loop_iters" if n_loops_given is False
               else "at the n_loops given")
            + "; pass the run or export directory to have both read from it", stacklevel=3)
    if tokenizer is None:
        if pretrained.cfg.vocab_size != ByteTokenizer().vocab_size:
            raise ValueError("pass tokenizer= for a model whose vocabulary is not the byte tokenizer's")
        tokenizer = "byte"
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    return pretrained, tok, stored, None


def _inference_defaults(pretrained: Any) -> tuple[bool | None, Any]:
    """``(act_early_exit, exit_rule)`` a Hugging Face export (a directory or an
    ``OpenMythosForCausalLM``) sets by default; ``(None, None)`` for anything else."""
    if isinstance(pretrained, (str, Path)):
        from ..checkpoints import read_inference_defaults

        return read_inference_defaults(pretrained)
    config = getattr(pretrained, "config", None)
    if config is None or isinstance(pretrained, CausalLM):
        return None, None
    return getattr(config, "act_early_exit", None), getattr(config, "exit_rule", None)


def _exit_rule_arg(value: Any) -> ExitRule | None:
    """An ``exit_rule`` argument as a rule: an ``ExitRule``, a dict of its fields, or the
    ``model_args`` form ``"kl:0.1;min_loops:2"`` (``"none"``: no rule)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none"):
            return None
        fields: dict[str, Any] = {}
        for item in text.split(";"):
            name, sep, number = item.partition(":")
            if not sep:
                raise ValueError(f"exit_rule={value!r}: write field:value pairs joined by ';' "
                                 "(kl:0.1;min_loops:2)")
            name = name.strip()
            if name in fields:
                raise ValueError(f"exit_rule={value!r}: {name} is given twice")
            whole = name in ("argmax_streak", "min_loops")
            try:
                fields[name] = int(number) if whole else float(number)
            except ValueError:
                raise ValueError(f"exit_rule={value!r}: {name} takes "
                                 f"{'an integer' if whole else 'a number'}, got "
                                 f"{number.strip()!r}") from None
        value = fields
    return as_exit_rule(value)


def _looks_like_mythos(model: object) -> bool:
    """Whether ``model`` is a CausalLM of an exported copy of this package (the class
    differs, the interface does not)."""
    return (isinstance(model, torch.nn.Module) and hasattr(model, "cfg")
            and all(callable(getattr(model, name, None))
                    for name in ("cache_keys", "core_states", "hidden_states")))


def _warn_if_moved(model: CausalLM, device: str | torch.device | None,
                   dtype: str | torch.dtype | None) -> None:
    """Warn when ``device``/``dtype`` ask an in-memory model to be elsewhere or another dtype."""
    from ..checkpoints import floating_dtype

    param = next(model.parameters())
    ignored = []
    if device not in (None, "auto") and _pick_device(device) != param.device:
        ignored.append(f"device={device}")
    if dtype not in (None, "auto") and floating_dtype(dtype) != param.dtype:
        ignored.append(f"dtype={dtype}")
    if ignored:
        warnings.warn(f"pretrained is a model in memory: it stays on {param.device} in "
                      f"{param.dtype}; {' and '.join(ignored)} ignored (move it with .to() "
                      "first)", stacklevel=3)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lm_eval`` command line, with ``--model openmythos`` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
