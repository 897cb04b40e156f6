"""``openmythos generate``: stream a completion of a prompt to the terminal.

::

    openmythos generate --checkpoint runs/tinystories --prompt "Once upon a time" \\
        --n-loops 8 --max-new-tokens 200 --temperature 0.8 --top-k 50
    openmythos generate --checkpoint hf_dir/ --prompt "2 + 2 =" --greedy

``--checkpoint`` is a training checkpoint, a run directory (its latest checkpoint) or a
Hugging Face directory written by ``OpenMythosForCausalLM.save_pretrained``. The prompt is
printed, then the generated text as tokens arrive; a summary goes to stderr.

Exit status: 0 on success, 2 for invalid arguments or an unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from ..inference.speculative import DRAFT_LENSES
from .argtypes import Once, loop_count, non_negative_int, positive_int
from .exit_options import add_exit_arguments, add_no_exit_rule_argument, resolve_exit_rule


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``serve``: checkpoint, tokenizer, depth, device."""
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="training checkpoint, run directory or Hugging Face directory")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="'byte' or a tokenizer directory (default: the one stored with the "
                        "checkpoint, else the byte tokenizer if the vocabulary matches)")
    p.add_argument("--n-loops", type=loop_count, metavar="N",
                   help="recurrent loops per token (default: the depth the run trained at, "
                        "else max_loop_iters); more than trained extrapolates in depth")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: as stored)")


#: Tokens ``generate`` produces when --max-new-tokens is not given (fewer where the
#: model's context ends first).
DEFAULT_NEW_TOKENS = 128


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``openmythos`` command."""
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint, streamed to the terminal",
        description="Complete a prompt with a trained model, printing tokens as they come.")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, action=Once,
                   help="text to complete (one: run the command again for another)")
    p.add_argument("--max-new-tokens", type=non_negative_int, metavar="N",
                   help=f"most tokens to generate (default {DEFAULT_NEW_TOKENS}, or what "
                        "the model's context holds after the prompt if that is less)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=non_negative_int, default=50, metavar="K",
                   help="sample among the K most likely tokens; 0: no limit (default 50)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable; not printed)")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="--compile: decode through one torch.compile'd graph per step, much "
                        "faster per token after a one-off compilation on the first call "
                        "(measured: 19 s on one CPU thread for the 128-dim default training "
                        "model; more for larger models, up to minutes); runs every loop (no "
                        "ACT early exit). --no-compile: eager steps. Default: eager until this "
                        "run has spent as long in eager steps as compiling costs (only long "
                        "generations get there), then compiled")
    p.add_argument("--depth-sharing", default="per_depth", metavar="MODE",
                   help="KV cache entries per loop depth: per_depth (default, exact), last, "
                        "first or every:M (smaller caches; see docs/adaptive_inference.md)")
    p.add_argument("--draft-tokens", type=non_negative_int, default=0, metavar="K",
                   help="decode self-speculatively: draft K tokens per cycle with "
                        "--draft-loops loops, verified at full depth (greedy output is "
                        "unchanged in float32; in bfloat16 near-ties can round the other "
                        "way); 0: off (default)")
    p.add_argument("--draft-loops", type=positive_int, metavar="N",
                   help="loops of a draft forward (default 1; with --draft-tokens)")
    p.add_argument("--draft-lens", choices=DRAFT_LENSES,
                   help="how a draft reads its state out (with --draft-tokens): coda "
                        "(default: the rest of the network) or head (norm and head only: cheaper; for models trained "
                        "with optim.loop_readout = \"head\")")
    add_exit_arguments(p)
    add_no_exit_rule_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Load the model, stream the completion to ``out`` (default stdout)."""
    from ..integrations.textgen import (
        GenerationOptions,
        encode_prompts,
        lossy_readback,
        stream_text,
        validate,
    )

    out = out or sys.stdout
    try:
        if args.temperature <= 0 and not args.greedy:
            raise ValueError(f"--temperature must be > 0 to sample, got {args.temperature}; "
                             "pass --greedy for greedy decoding")
        if not args.draft_tokens and (args.draft_loops or args.draft_lens):
            raise ValueError("--draft-loops and --draft-lens shape self-speculative "
                             "decoding: give --draft-tokens K too")
        loaded, tokenizer = load_for_inference(args)
        exit_rule, configured = resolve_exit_rule(args, loaded)
        if configured:
            needs_all = [flag for flag, on in (("--compile", args.compile),
                                               ("--draft-tokens", args.draft_tokens)) if on]
            if needs_all:
                raise ValueError(f"{loaded.path}'s config sets exit_rule={exit_rule}, and "
                                 f"{needs_all[0]} runs every loop: pass --no-exit-rule")
        prompts = encode_prompts(tokenizer, [args.prompt])
        max_new_tokens = args.max_new_tokens
        if max_new_tokens is None:  # the default fits the context; a number given is checked
            room = loaded.cfg.max_seq_len - len(prompts[0])
            # Nothing fits: the default stays, and validate says the context is full.
            max_new_tokens = min(DEFAULT_NEW_TOKENS, room) if room > 0 else DEFAULT_NEW_TOKENS
        options = GenerationOptions(
            max_new_tokens=max_new_tokens,
            n_loops=args.n_loops or loaded.n_loops,
            do_sample=not args.greedy, temperature=args.temperature,
            top_k=args.top_k or None, top_p=args.top_p, stop=tuple(args.stop), seed=args.seed,
            compile=args.compile, exit_rule=exit_rule,
            depth_sharing=args.depth_sharing, draft_tokens=args.draft_tokens,
            draft_loops=args.draft_loops or 1, draft_lens=args.draft_lens or "coda")
        validate(loaded.model, prompts, options)  # before the prompt is echoed
        readback = lossy_readback(tokenizer, args.prompt, prompts[0])
        if readback is not None:
            print(f"openmythos generate: warning: the tokenizer reads the prompt as "
                  f"{readback!r} (characters it has no token for are lost)", file=sys.stderr)
        deltas = stream_text(loaded.model, tokenizer, prompts, options)
        start = time.perf_counter()
        if not args.no_echo:
            out.write(args.prompt)
            out.flush()
        n_tokens, reason = 0, ""
        for delta in deltas:
            out.write(delta.text)
            out.flush()
            if delta.finish_reason is not None:
                n_tokens, reason = delta.n_tokens, delta.finish_reason
        out.write("\n")
        out.flush()
    except BrokenPipeError:  # the reader went away (| head): the CLI ends quietly
        raise
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        if err is getattr(sys.stdout, "error", None):
            raise  # standard output's: openmythos' main names it
        print(f"openmythos generate: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    from ..registry import is_looped

    depth = (f"{options.n_loops or loaded.cfg.max_loop_iters} loops" if is_looped(loaded.model)
             else f"{loaded.cfg.core_layers} core blocks")  # a dense baseline has no loops
    if configured:
        depth += f", the config's {exit_rule}"
    print(f"[{n_tokens} tokens in {elapsed:.2f}s ({n_tokens / max(elapsed, 1e-9):.1f} tok/s), "
          f"{depth}, finish: {reason}]", file=sys.stderr)
    return 0


def load_for_inference(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(LoadedModel, tokenizer)`` from the options of :func:`add_model_arguments`."""

    from ..checkpoints import load_model
    from ..devices import resolve_device
    from ..integrations.convert import resolve_tokenizer
    from ..registry import is_looped

    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device=device, dtype=args.dtype)
    if args.n_loops is not None and not is_looped(loaded.model):
        raise ValueError(f"{loaded.path} holds a fixed-depth model ({type(loaded.model).__name__}): "
                         "--n-loops applies to looped models only")
    return loaded, resolve_tokenizer(loaded, args.tokenizer)

