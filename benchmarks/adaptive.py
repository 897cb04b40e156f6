"""Adaptive inference on trained models: exit rules and self-speculative decoding.

Exit rules: for a task run (the demo's looped model) greedy answers to held-out examples
at ``--loops`` loops under each rule; for a text run, the validation loss of full forwards
and the speed of cached greedy decoding. Every rule is compared with no rule and with fixed
smaller depths, in the same run.

Self-speculative decoding (text run): greedy decoding at ``--loops`` loops, plain against
drafts of 1 or 2 loops read out through the Coda or the head lens, verified at full depth,
tokens/s in the same run, the acceptance rate, and whether the tokens are identical::

    python benchmarks/adaptive.py --task-run demo_out/looped/chain --text-run runs/text_depth \\
        --loops 8 --plot docs/figures/exits.png

Columns:
    loops/pos: mean loops per position (the depth each position stopped at).
    saved: share of (position, loop) steps the rule skipped: the work a token-sparse kernel
        saves. In cached decoding a step has one position per sequence, so there it is also
        the work actually skipped.
    computed: share of the requested (sequence, loop) work that ran: a sequence stops
        computing once all its positions have exited.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from open_mythos import ExitRule  # noqa: E402
from open_mythos.checkpoints import load_model  # noqa: E402
from open_mythos.commands.argtypes import positive_int  # noqa: E402
from open_mythos.evaluation.exits import ExitPoint, count_loops, plot_exit_pareto  # noqa: E402
from open_mythos.evaluation.runs import run_task, run_val_batches  # noqa: E402
from open_mythos.evaluation.sweep import (  # noqa: E402
    _greedy_examples,
    perplexity,
    sample_examples,
)
from open_mythos.inference import (  # noqa: E402
    KVCache,
    SpeculativeStats,
    generate,
    speculative_generate,
)
from open_mythos.tasks import score  # noqa: E402

RULES: list[tuple[str, ExitRule | None]] = [
    ("none", None),
    *[(f"kl<{v:g}", ExitRule(kl=v, min_loops=2)) for v in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)],
    *[(f"entropy<{v:g}", ExitRule(entropy=v)) for v in (0.01, 0.05, 0.2, 0.5)],
    *[(f"rel_change<{v:g}", ExitRule(rel_change=v, min_loops=2))
      for v in (0.02, 0.05, 0.1, 0.2, 0.4)],
    *[(f"argmax x{m}", ExitRule(argmax_streak=m, min_loops=2)) for m in (1, 2, 3)],
]


def measured(model, n_loops, fn, *args, **kwargs):
    """``(result, seconds, loops/position, saved, computed)`` of ``fn(*args, **kwargs)``."""
    with count_loops(model, n_loops) as counter:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    per_pos = counter.per_position
    return result, seconds, per_pos, 1 - per_pos / n_loops, counter.computed_fraction


def task_table(run: str, n_loops: int, n_examples: int, split: str, seed: int) -> list[dict]:
    model = load_model(run).model.eval()
    task = run_task(run)
    if task is None:
        raise SystemExit(f"{run} is not a task run")
    try:
        examples = sample_examples(task, split, n_examples, seed)
    except ValueError as err:  # an unknown split, named with the task's own
        raise SystemExit(f"--split: {err}") from None
    with torch.no_grad():  # warm-up: the first forwards of a process are slower
        _greedy_examples(model, examples[:16], n_loops, True)
    rows = []
    configs = [(name, rule, n_loops) for name, rule in RULES]
    configs += [(f"fixed {k} loops", None, k) for k in range(1, n_loops)]
    for name, rule, loops in configs:
        with torch.no_grad():
            decoded, sec, _, _, computed = measured(
                model, loops, _greedy_examples, model, examples, loops, True, rule)
        # Loops per answer position: padding and finished sequences' steps left out.
        per_pos = decoded.per_position
        acc = sum(score(a, ex) for a, ex in zip(decoded.answers, examples)) / len(examples)
        # Fixed depths count against --loops, the depth the rules start from.
        rows.append(dict(rule=name, accuracy=acc, loops=per_pos, saved=1 - per_pos / n_loops,
                         computed=computed * loops / n_loops, seconds=sec))
    return rows


def validation_prompts(batches: list[dict], prompt_len: int,
                       n_prompts: int | None = None) -> torch.Tensor:
    """The first ``n_prompts`` validation sequences (all with ``None``), cut to
    ``prompt_len`` tokens; a run whose validation text is too short or too small for that
    is an error, not fewer or shorter prompts."""
    ids = torch.cat([b["input_ids"] for b in batches])
    if ids.shape[1] < prompt_len:
        raise SystemExit(f"--prompt-len {prompt_len}: the run's validation sequences hold "
                         f"{ids.shape[1]} tokens")
    if n_prompts is not None and len(ids) < n_prompts:
        raise SystemExit(f"--prompts {n_prompts}: the run's validation text gives "
                         f"{len(ids)} sequences")
    return ids[:n_prompts, :prompt_len]


def text_table(run: str, n_loops: int, n_prompts: int, prompt_len: int,
               new_tokens: int) -> list[dict]:
    model = load_model(run).model.eval()
    batches = run_val_batches(run)
    prompts = validation_prompts(batches, prompt_len, n_prompts)
    with torch.no_grad():  # also the warm-up
        reference = generate(model, prompts, new_tokens, n_loops, do_sample=False)[:, prompt_len:]
    rows = []
    configs = [(name, rule, n_loops) for name, rule in RULES]
    configs += [(f"fixed {k} loops", None, k) for k in range(1, n_loops)]
    for name, rule, loops in configs:
        with torch.no_grad():
            ppl, _, per_pos, _, _ = measured(
                model, loops, perplexity, model, batches, loops, early_exit=True, exit_rule=rule)
            out, sec, dec_pos, _, computed = measured(
                model, loops, generate, model, prompts, new_tokens, loops, do_sample=False,
                exit_rule=rule)
        same = float((out[:, prompt_len:] == reference).float().mean())
        rows.append(dict(rule=name, loss=ppl.loss, loops=per_pos, saved=1 - per_pos / n_loops,
                         decode_loops=dec_pos, computed=computed * loops / n_loops,
                         same_tokens=same, seconds=sec))
    return rows


#: The speculative table's drafts: (loops, tokens per cycle, lens).
DRAFTS = [(loops, tokens, lens) for lens in ("coda", "head")
          for loops, tokens in ((1, 2), (1, 4), (1, 6), (2, 4))]


def draft_name(draft: tuple[int, int, str]) -> str:
    return f"draft {draft[0]} loop(s) x {draft[1]}, {draft[2]} lens"


def speculative_table(run: str, n_loops: int, batch_sizes: list[int], prompt_len: int,
                      new_tokens: int, n_prompts: int = 8, repeats: int = 7) -> list[dict]:
    """Plain greedy decoding against self-speculative greedy decoding on prompts from the
    run's validation text: median wall time of ``repeats`` rounds, each round running every
    method once in turn (so that drift in the machine's speed falls on all of them alike).

    At batch size ``b`` a method decodes ``max(b, n_prompts)`` prompts in batches of ``b``
    (at batch 1 the acceptance of a single prompt says little about a model), and its
    time is the sum over those batches; acceptance and tokens per verification are pooled.
    """
    model = load_model(run).model.eval()
    prompts_all = validation_prompts(run_val_batches(run), prompt_len)
    if prompt_len + new_tokens > model.cfg.max_seq_len:
        raise SystemExit(f"--prompt-len {prompt_len} + --speculative-tokens {new_tokens} "
                         f"exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    # A draft as deep as the verifier saves nothing: those rows are left out.
    drafts = [d for d in DRAFTS if d[0] < n_loops]
    rows = []
    for batch in batch_sizes:
        n_groups = max(1, n_prompts // batch)
        if n_groups * batch > len(prompts_all):
            raise SystemExit(f"the run's validation text gives {len(prompts_all)} prompts; "
                             f"batch {batch} x {n_groups} needs more")
        groups = [prompts_all[i * batch:(i + 1) * batch] for i in range(n_groups)]
        with torch.no_grad():
            reference = [generate(model, g, new_tokens, n_loops, do_sample=False)
                         for g in groups]
        methods = {"plain greedy": partial(_plain_round, model, groups, new_tokens, n_loops)}
        stats: dict[tuple, list[SpeculativeStats]] = {}
        outputs: dict[tuple, list[torch.Tensor]] = {}
        for d in drafts:
            methods[draft_name(d)] = partial(_speculative_round, model, groups, new_tokens,
                                             n_loops, d, stats, outputs)
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(1 + repeats):  # the first round warms up and is not counted
            for name, fn in methods.items():
                seconds[name].append(_timed(fn))
        median = {name: statistics.median(ts[1:]) for name, ts in seconds.items()}
        plain = median["plain greedy"]
        rows.append(dict(batch=batch, prompts=n_groups * batch, method="plain greedy",
                         seconds=plain, ratio=1.0, acceptance=None, per_cycle=1.0, same=1.0))
        for d in drafts:
            name = draft_name(d)
            pooled = stats[d]
            # The generated tokens only (the prompt, equal in both, made a draft that got
            # every token wrong read as prompt_len / (prompt_len + new) the same).
            same = torch.cat([(o[:, prompt_len:] == r[:, prompt_len:]).flatten()
                              for o, r in zip(outputs[d], reference)])
            rows.append(dict(batch=batch, prompts=n_groups * batch, method=name,
                             seconds=median[name], ratio=plain / median[name],
                             acceptance=sum(s.accepted for s in pooled)
                             / max(1, sum(s.drafted for s in pooled)),
                             # The prompt's forward emits each generation's first token.
                             per_cycle=sum(s.tokens - 1 for s in pooled)
                             / max(1, sum(s.cycles for s in pooled)),
                             same=float(same.float().mean())))
    return rows


def forward_costs(run: str, n_loops: int, batch_sizes: list[int], prompt_len: int,
                  repeats: int = 21) -> dict[int, list[dict]]:
    """What a speculative cycle is made of, per batch size: the wall time of one cached
    forward of a draft (one token, 1 or 2 loops) and of a verification (``1 + drafts``
    tokens at ``n_loops``), each against one plain decode step (one token at ``n_loops``);
    medians of ``repeats`` rounds, the forwards taking turns, every forward after the same
    prefilled prompt."""
    model = load_model(run).model.eval()
    prompts_all = validation_prompts(run_val_batches(run), prompt_len)
    if prompt_len + 7 > model.cfg.max_seq_len:
        raise SystemExit(f"--prompt-len {prompt_len} leaves no room for a 7-token verification "
                         f"within max_seq_len={model.cfg.max_seq_len}")
    return {batch: _forward_costs(model, prompts_all[:batch], n_loops, repeats)
            for batch in batch_sizes}


def _forward_costs(model, prompts: torch.Tensor, n_loops: int, repeats: int) -> list[dict]:
    prompt_len = prompts.shape[1]
    cache = KVCache(prompt_len + 7)
    with torch.no_grad():
        model(prompts, n_loops, cache, 0)
    # name -> (tokens, loops, lens)
    shapes = {"plain step (1 token)": (1, n_loops, "coda"), "draft, 1 loop": (1, 1, "coda"),
              "draft, 2 loops": (1, 2, "coda"), "draft, 1 loop, head lens": (1, 1, "head"),
              "draft, 2 loops, head lens": (1, 2, "head")}
    shapes.update({f"verify {n} drafts": (n + 1, n_loops, "coda") for n in (2, 4, 6)})
    seconds: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(1 + repeats):
        for name, (tokens, loops, lens) in shapes.items():
            ids = prompts[:, -1:].repeat(1, tokens)
            seconds[name].append(_timed(model, ids, loops, cache, prompt_len,
                                        readout_lens=lens))
            cache.truncate(prompt_len)
    plain = statistics.median(seconds["plain step (1 token)"][1:])
    return [dict(forward=name, tokens=shapes[name][0], loops=shapes[name][1],
                 ms=1e3 * statistics.median(ts[1:]),
                 ratio=statistics.median(ts[1:]) / plain) for name, ts in seconds.items()]


def _plain_round(model, groups: list[torch.Tensor], new_tokens: int, n_loops: int) -> None:
    for prompts in groups:
        generate(model, prompts, new_tokens, n_loops, do_sample=False)


def _speculative_round(model, groups: list[torch.Tensor], new_tokens: int, n_loops: int,
                       draft: tuple[int, int, str], stats: dict, outputs: dict) -> None:
    """Speculative generations of every prompt batch with ``draft = (loops, tokens,
    lens)``; their counts and tokens replace the previous round's in ``stats`` and
    ``outputs``."""
    stats[draft] = [SpeculativeStats() for _ in groups]
    outputs[draft] = [speculative_generate(model, prompts, new_tokens, n_loops,
                                           draft_loops=draft[0], draft_tokens=draft[1],
                                           draft_lens=draft[2], stats=st)
                      for prompts, st in zip(groups, stats[draft])]


SHARING_MODES = ("per_depth", "every:2", "first", "last")


def cache_table(runs: list[str], loops: tuple[int, ...], prefill: int = 16) -> list[dict]:
    """Each depth-sharing mode on each text run: bytes per token against the reference's
    fp32 cache, and the validation loss of cached decoding (a ``prefill``-token prompt, then
    one token at a time, teacher-forced) in fp32 and in a bf16 cache."""
    from inference import reference_kv_bytes_per_token

    from open_mythos.inference import KVCache

    rows = []
    for run in runs:
        model = load_model(run).model.eval()
        batches = run_val_batches(run)
        for n_loops in loops:
            reference = reference_kv_bytes_per_token(model.cfg, n_loops)
            for dtype in (torch.float32, torch.bfloat16):
                for mode in SHARING_MODES:
                    total, count, nbytes, positions = 0.0, 0, 0, 0
                    for batch in batches:
                        ids, targets = batch["input_ids"], batch["targets"]
                        B, L = ids.shape
                        cache = KVCache(L, dtype=dtype, depth_sharing=mode)
                        with torch.no_grad():
                            logits = [model(ids[:, :prefill], n_loops, cache, 0)[:, -1]]
                            for pos in range(prefill, L - 1):
                                logits.append(model(ids[:, pos:pos + 1], n_loops, cache,
                                                    pos)[:, -1])
                        logits = torch.stack(logits, 1).float()  # predicts prefill-1..L-2
                        tgt = targets[:, prefill - 1:L - 1]
                        total += float(torch.nn.functional.cross_entropy(
                            logits.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                            reduction="sum"))
                        count += int((tgt != -100).sum())
                        nbytes += cache.nbytes()
                        positions += B * (L - 1)
                    per_token = nbytes / positions
                    rows.append(dict(run=str(run), attn=str(model.cfg.attn_type),
                                     loops=n_loops, dtype=str(dtype).removeprefix("torch."),
                                     mode=mode, bytes=per_token, reference=reference,
                                     ratio=reference / per_token, loss=total / count))
    return rows


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
    return time.perf_counter() - start


def points(rows: list[dict], key: str, n_loops: int) -> list[ExitPoint]:
    """The rows as :class:`ExitPoint` s ("none" is the fixed depth ``n_loops``)."""
    out = []
    for r in rows:
        name, loops = r["rule"], n_loops
        if name == "none" or name.startswith("fixed"):
            loops = n_loops if name == "none" else int(name.split()[1])
            name = f"fixed {loops}"
        out.append(ExitPoint(name, loops, r["loops"], r[key]))
    return out


def plot(task_rows, text_rows, path: str, n_loops: int, names: tuple[str, str] = ("", "")) -> None:
    panels = [(points(rows, key, n_loops), label, f"exit rules against fixed depth: {name}")
              for rows, key, label, name in
              ((task_rows, "accuracy", "exact-match accuracy", names[0]),
               (text_rows, "loss", "validation loss (nats/token)", names[1])) if rows]
    print(f"\nplot: {plot_exit_pareto(panels, path)}")


def check_runs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any table is measured, runs the options do not fit: a text run whose
    context cannot hold a prompt and the tokens decoded from it, a fixed-depth model where
    loops or cache depths are measured."""
    from open_mythos.checkpoints import read_config
    from open_mythos.registry import kind_of

    def config(run: str, option: str):
        try:
            cfg, _ = read_config(run)
        except (FileNotFoundError, ValueError) as err:
            p.error(f"{option} {run}: {err}")
        if not kind_of(cfg).looped:
            p.error(f"{option} {run} holds a fixed-depth model: it has no loops to exit "
                    "early from or cache depths to share")
        return cfg

    if args.task_run:
        config(args.task_run, "--task-run")
    if args.text_run:
        limit = config(args.text_run, "--text-run").max_seq_len
        for what, tokens in ((f"--new-tokens {args.new_tokens}", args.new_tokens),
                             (f"--speculative-tokens {args.speculative_tokens}",
                              args.speculative_tokens),
                             ("the 7 tokens of a verification", 7)):
            if args.prompt_len + tokens > limit:
                p.error(f"--prompt-len {args.prompt_len} + {what} exceeds the text run's "
                        f"max_seq_len={limit}")
    for run in args.cache_runs:
        config(run, "--cache-runs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task-run", metavar="DIR", help="a task run (the demo's looped model)")
    p.add_argument("--text-run", metavar="DIR", help="a text run")
    p.add_argument("--loops", type=positive_int, default=8, help="loops the rules start from")
    p.add_argument("--n-examples", type=positive_int, default=256, help="task examples (default 256)")
    p.add_argument("--split", default="id", help="task split (default id)")
    p.add_argument("--prompts", type=positive_int, default=16, help="text decoding prompts")
    p.add_argument("--prompt-len", type=positive_int, default=16,
                   help="text prompt length (default 16)")
    p.add_argument("--new-tokens", type=positive_int, default=32,
                   help="text tokens to decode (default 32)")
    p.add_argument("--speculative-batch", type=positive_int, nargs="+", default=[1, 8],
                   help="batch sizes of the speculative decoding table (default 1 8)")
    p.add_argument("--speculative-tokens", type=positive_int, default=48,
                   help="tokens decoded in the speculative table (default 48)")
    p.add_argument("--speculative-prompts", type=positive_int, default=8,
                   help="prompts each speculative row decodes, in batches of its batch size "
                        "(default 8)")
    p.add_argument("--cache-runs", nargs="+", metavar="DIR", default=[],
                   help="text runs whose cache modes to measure (GQA and MLA)")
    p.add_argument("--cache-loops", type=positive_int, nargs="+", default=[4, 8],
                   help="loop counts of the cache table (default 4 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="write the Pareto plot here")
    args = p.parse_args(argv)
    if not (args.task_run or args.text_run or args.cache_runs):
        p.error("give --task-run, --text-run or --cache-runs")
    check_runs(p, args)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"rules start from {args.loops} loops")
    task_rows = text_rows = []
    if args.task_run:
        task_rows = task_table(args.task_run, args.loops, args.n_examples, args.split, args.seed)
        base = task_rows[0]
        print(f"\n## Task run {args.task_run}: greedy answers, {args.n_examples} "
              f"{args.split} examples\n")
        print_table(["rule", "accuracy", "Δ vs none (pts)", "loops/pos", "saved", "computed",
                     "wall s", "wall / none"],
                    [[r["rule"], f"{r['accuracy']:.3f}",
                      f"{100 * (r['accuracy'] - base['accuracy']):+.1f}", f"{r['loops']:.2f}",
                      f"{r['saved']:.0%}", f"{r['computed']:.0%}", f"{r['seconds']:.2f}",
                      f"{r['seconds'] / base['seconds']:.2f}"] for r in task_rows])
    if args.text_run:
        text_rows = text_table(args.text_run, args.loops, args.prompts, args.prompt_len,
                               args.new_tokens)
        base = text_rows[0]
        print(f"\n## Text run {args.text_run}: validation loss of full forwards; greedy "
              f"decoding of {args.new_tokens} tokens from {args.prompts} prompts\n")
        print_table(["rule", "val loss", "Δ loss", "loops/pos", "saved", "decode loops",
                     "decode computed", "same tokens", "decode s", "decode / none"],
                    [[r["rule"], f"{r['loss']:.4f}", f"{r['loss'] - base['loss']:+.4f}",
                      f"{r['loops']:.2f}", f"{r['saved']:.0%}", f"{r['decode_loops']:.2f}",
                      f"{r['computed']:.0%}", f"{r['same_tokens']:.0%}",
                      f"{r['seconds']:.2f}", f"{r['seconds'] / base['seconds']:.2f}"]
                     for r in text_rows])
        spec = speculative_table(args.text_run, args.loops, args.speculative_batch,
                                 args.prompt_len, args.speculative_tokens,
                                 args.speculative_prompts)
        print(f"\n## Text run {args.text_run}: self-speculative greedy decoding of "
              f"{args.speculative_tokens} tokens at {args.loops} loops (median of 7 "
              "rounds, the methods taking turns; each row decodes the same prompts)\n")
        if any(d[0] >= args.loops for d in DRAFTS):
            print(f"(drafts of {args.loops} or more loops left out: as deep as the verifier, "
                  "they save nothing)\n")
        print_table(["batch", "prompts", "method", "s", "speedup", "acceptance",
                     "tokens/verify", "same tokens"],
                    [[r["batch"], r["prompts"], r["method"], f"{r['seconds']:.2f}",
                      f"{r['ratio']:.2f}x",
                      "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
                      f"{r['per_cycle']:.2f}", f"{r['same']:.0%}"] for r in spec])
        all_costs = forward_costs(args.text_run, args.loops, args.speculative_batch,
                                  args.prompt_len)
        for batch, costs in all_costs.items():
            print(f"\nCost of one cached forward at batch {batch} (median of 21 rounds), "
                  "against one plain decode step:\n")
            print_table(["forward", "tokens", "loops", "ms", "vs plain step"],
                        [[c["forward"], c["tokens"], c["loops"], f"{c['ms']:.2f}",
                          f"{c['ratio']:.2f}"] for c in costs])
    if args.cache_runs:
        rows = cache_table(args.cache_runs, tuple(args.cache_loops))
        print("\n## Depth-sharing KV caches: bytes per token against the reference's fp32 "
              "cache, and the loss of cached decoding (teacher-forced, after a 16-token "
              "prompt) on validation text\n")
        base = {(r["run"], r["loops"], r["dtype"]): r["loss"] for r in rows
                if r["mode"] == "per_depth"}
        print_table(["run", "attn", "loops", "cache", "mode", "bytes/token", "reference",
                     "smaller", "loss", "Δ loss"],
                    [[r["run"], r["attn"], r["loops"], r["dtype"], r["mode"],
                      f"{r['bytes']:.0f}", r["reference"], f"{r['ratio']:.1f}x",
                      f"{r['loss']:.4f}",
                      f"{r['loss'] - base[(r['run'], r['loops'], r['dtype'])]:+.4f}"]
                     for r in rows])
    if args.plot:
        plot(task_rows, text_rows, args.plot, args.loops,
             (str(args.task_run or ""), str(args.text_run or "")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
