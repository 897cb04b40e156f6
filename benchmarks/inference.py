"""Inference benchmark: prefill and decode throughput, KV bytes per token, ACT early exit.

    python benchmarks/inference.py            # full table (a few minutes on 2 cores)
    python benchmarks/inference.py --quick    # prompt lengths 64 and 512 only

Every row is measured against a naive baseline in the same run, using the same weights:
the upstream-style plain-dict cache that grows by ``torch.cat``, MLA without absorption
(the latent cache re-expanded through ``kv_up`` at every step) and no ACT early exit. The
decode tables also time the reference-style model (``reference_style.py``: the reference's
computation and cached decoding, same config, its own untrained weights, so its tokens are
not compared) in the same rotation.
"Eager" is ``generate(..., compile=False)``; "compiled" is ``generate(..., compile=True)``, one
``torch.compile``d fixed-shape graph per decode step (compilation time is printed apart and
not in the tok/s); ``--ablate`` adds the compiled step without its CPU tuning (inductor's
Python wrapper, every guard evaluated on every step). Prefill and decode are timed inside
the same generation: prefill tok/s is the prompt length over the time to the first token,
decode tok/s the decode steps over the time from the first token to the last (greedy
selection included, for every path alike). The paths take turns, in a rotating order.
The "session" section calls the default ``generate`` (``compile=None``) repeatedly on a fresh
model, each call followed by the reference-style model's: eager calls until the automatic
policy compiles (:mod:`open_mythos.inference.autocompile`), the compiling call, then the
compiled calls, each phase's decode rate against the reference's.
The "ACT-trained" rows first train the small GQA model for a few hundred steps with a ponder
penalty, so that its halting head really halts, then decode with up to ``--loops`` loops.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_medians, median_time, print_table  # noqa: E402
from reference_style import ReferenceStyleLM  # noqa: E402
from reference_style import greedy_stream as reference_stream  # noqa: E402

from open_mythos import MythosConfig, OpenMythos  # noqa: E402
from open_mythos.commands.argtypes import non_negative_int, positive_float, positive_int  # noqa: E402
from open_mythos.inference import KVCache, generate, static, stream  # noqa: E402
from open_mythos.layers import MLAttention, MoEFFN  # noqa: E402
from open_mythos.tasks import get_task, make_batch  # noqa: E402


def small_config(attn_type: str, **overrides) -> MythosConfig:
    """The small configs of SPEC §5 (reference: MLA 4608 B/token, GQA 3072, fp32, 4 loops)."""
    base = dict(vocab_size=1000, dim=256, n_heads=8, n_kv_heads=2, max_seq_len=2048 + 64,
                max_loop_iters=4, prelude_layers=1, coda_layers=1, attn_type=attn_type,
                kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=16,
                v_head_dim=32, n_experts=8, n_shared_experts=1, n_experts_per_tok=2,
                expert_dim=64, lora_rank=8)
    base.update(overrides)
    return MythosConfig(**base)


def reference_kv_bytes_per_token(cfg: MythosConfig, n_loops: int) -> int:
    """Bytes per token of the reference's fp32 cache: MLA kept the RoPE key once per head."""
    layers = cfg.prelude_layers + n_loops + cfg.coda_layers
    if cfg.attn_type == "mla":
        per_layer = cfg.kv_lora_rank + cfg.n_heads * cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    return 4 * per_layer * layers


def set_absorb(model: OpenMythos, value: bool | None) -> None:
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.absorb = value


def naive_stream(model: OpenMythos, ids: torch.Tensor, new: int, n_loops: int) -> Iterator[torch.Tensor]:
    """Upstream-style greedy decode, one (B, 1) token at a time: dict cache grown by cat, no
    absorption, no early exit."""
    set_absorb(model, False)
    try:
        with torch.no_grad():
            cache: dict = {}
            logits = model(ids, n_loops, cache, 0, act_early_exit=False)[:, -1]
            for step in range(new):
                tok = logits.argmax(-1, keepdim=True)
                yield tok
                if step < new - 1:
                    logits = model(tok, n_loops, cache, ids.shape[1] + step,
                                   act_early_exit=False)[:, -1]
    finally:
        set_absorb(model, None)


def naive_decode(model: OpenMythos, ids: torch.Tensor, new: int, n_loops: int) -> torch.Tensor:
    """The tokens of :func:`naive_stream`, (B, new)."""
    return torch.cat(list(naive_stream(model, ids, new, n_loops)), 1)


def timed_stream(tokens: Iterable[torch.Tensor]) -> tuple[float, float, int]:
    """``(prefill s, decode s, decode steps)`` of one generation: the time to the first token
    (the prompt's forward), then from the first token to the last (one forward per step)."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in tokens:
        last = time.perf_counter()
        first = first or last
        n += 1
    return first - t0, last - first, n - 1


def interleaved_streams(makers: dict[str, Callable[[], Iterable[torch.Tensor]]], repeats: int,
                        warmup: int = 1) -> dict[str, tuple[float, float, int]]:
    """Median ``(prefill s, decode s, decode steps)`` of each generation in ``makers``.

    The generations take turns, one of each per round, so that a machine whose speed
    drifts during the run (shared CPUs do, by tens of percent) slows them all alike and
    the ratios between them stay fair; the order rotates every round, so no path always
    runs right after the same other one."""
    for _ in range(warmup):
        for make in makers.values():
            timed_stream(make())
    runs: dict[str, list] = {name: [] for name in makers}
    names = list(makers)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            runs[name].append(timed_stream(makers[name]()))
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs),
                   rs[0][2]) for name, rs in runs.items()}


def without_decode_tuning(make: Callable[[], Iterable[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """The generation of ``make`` with the compiled step as it was before its CPU tuning:
    inductor's Python wrapper and every guard evaluated on every step."""
    saved = static.CPP_WRAPPER_ON_CPU, static.SKIP_REPEATED_GUARDS
    static.CPP_WRAPPER_ON_CPU = static.SKIP_REPEATED_GUARDS = False
    try:
        yield from make()
    finally:
        static.CPP_WRAPPER_ON_CPU, static.SKIP_REPEATED_GUARDS = saved


def decode_rows(model: OpenMythos, reference: ReferenceStyleLM, prompt_lens: list[int], new: int,
                n_loops: int, label: str, repeats: int,
                ablate: bool = False) -> tuple[list[list[object]], list[str]]:
    """Rows of the decode table, and one note per prompt length on compilation time.

    Prefill and decode are timed inside the same generation (time to the first token, then
    the ``new - 1`` decode steps), so neither is estimated by subtraction; the three paths
    take turns (:func:`interleaved_streams`)."""
    rows, notes = [], []
    cfg = model.cfg
    for plen in prompt_lens:
        ids = torch.randint(0, cfg.vocab_size - 3, (1, plen), generator=torch.Generator().manual_seed(plen))

        def ours(compile: bool, n: int = new, ids: torch.Tensor = ids):
            return stream(model, ids, n, n_loops, do_sample=False, compile=compile,
                          act_early_exit=False)

        t0 = time.perf_counter()
        list(ours(True))  # compiles (once per model structure, batch, cache bucket, n_loops)
        first_call = time.perf_counter() - t0
        makers = {
            "reference": lambda ids=ids: reference_stream(reference, ids, new, n_loops),
            "naive": lambda ids=ids: naive_stream(model, ids, new, n_loops),
            "eager": lambda: ours(False),
            "compiled": lambda: ours(True),
        }
        if ablate:
            makers["untuned"] = lambda: without_decode_tuning(lambda: ours(True))
        times = interleaved_streams(makers, repeats)
        pf_slow, dec_slow, steps = times["naive"]
        pf_eager, dec_eager, _ = times["eager"]
        dec_comp = times["compiled"][1]
        dec_ref = times["reference"][1]
        ref = naive_decode(model, ids, 8, n_loops)
        same = all(torch.equal(generate(model, ids, 8, n_loops, do_sample=False, compile=c,
                                        act_early_exit=False)[:, plen:], ref)
                   for c in (False, True))
        row = [label, plen, f"{plen / pf_eager:,.0f}", f"{plen / pf_slow:,.0f}",
               f"{steps / dec_slow:.1f}", f"{steps / dec_eager:.1f}",
               f"{steps / dec_comp:.1f}", f"{dec_slow / dec_eager:.2f}x",
               f"{dec_slow / dec_comp:.2f}x", "yes" if same else "NO",
               f"{steps / dec_ref:.1f}", f"{dec_ref / dec_eager:.2f}x",
               f"{dec_ref / dec_comp:.2f}x"]
        if ablate:
            dec_untuned = times["untuned"][1]
            row += [f"{steps / dec_untuned:.1f}", f"{dec_untuned / dec_comp:.2f}x"]
        rows.append(row)
        notes.append(f"{label} prompt {plen}: first compiled call (compilation included) "
                     f"{first_call:.1f} s")
    return rows, notes


def kv_rows(n_loops: int) -> list[list[object]]:
    rows = []
    for attn in ("gqa", "mla"):
        cfg = small_config(attn)
        model = OpenMythos(cfg).eval()
        ids = torch.randint(0, 1000, (1, 32))
        sizes = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            cache = KVCache(32, dtype=dtype)
            with torch.no_grad():
                model(ids, n_loops, cache, 0)
            sizes[name] = cache.nbytes() // 32
        ref = reference_kv_bytes_per_token(cfg, n_loops)
        rows.append([attn, ref, sizes["fp32"], sizes["bf16"], f"{ref / sizes['fp32']:.2f}x",
                     f"{ref / sizes['bf16']:.2f}x"])
    return rows


def train_halting(model: OpenMythos, steps: int, ponder_weight: float, seed: int = 0) -> list[float]:
    """Short parity training with a ponder penalty: the halting head learns to halt early."""
    task = get_task("parity")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = make_batch(task, rng, "train", 16)
        logits = model(batch["input_ids"], n_loops=4)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
        loss = ce + ponder_weight * model.recurrent.last_ponder_cost.mean() + 0.01 * model.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_router_bias()
        losses.append(ce.item())
    return losses


def act_rows(n_loops: int, steps: int, repeats: int) -> tuple[list[list[object]], str]:
    torch.manual_seed(0)
    # Halting bias 0 (p = 0.5 per loop at init, upstream's) rather than the default -3 (an
    # untrained head runs every loop), and a ponder weight of 0.1: with the default init the
    # head then learns to halt within a few hundred steps (with -3 and 0.02 the ponder cost
    # stayed at n_loops in 300 steps, 2026-12-03, and there was nothing to skip).
    model = OpenMythos(small_config("gqa", vocab_size=259, max_loop_iters=4,
                                    act_halt_bias_init=0.0))
    losses = train_halting(model, steps, ponder_weight=0.1)
    model.eval()
    task = get_task("parity")
    rng = random.Random(1)
    prompts = [task.generate(rng, "id").prompt for _ in range(4)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[257] + [ord(c) for c in p.rjust(width, "0")] for p in prompts])
    new = 32
    runs = {}
    for early in (False, True):
        t = median_time(lambda early=early: generate(model, ids, new, n_loops, do_sample=False,
                                                        act_early_exit=early),
                        repeats=repeats, warmup=1)
        out = generate(model, ids, new, n_loops, do_sample=False, act_early_exit=early)
        runs[early] = (t, out, model.recurrent.last_work_fraction, model.recurrent.last_loops_run)
    t_naive = median_time(lambda: naive_decode(model, ids, new, n_loops), repeats=repeats, warmup=1)
    with torch.no_grad():
        model(ids, n_loops, act_early_exit=False)
    ponder = model.recurrent.last_ponder_cost.mean().item()
    rows = [
        ["naive (cat cache, no early exit)", f"{t_naive:.3f}", "1.00x", f"{n_loops}/{n_loops}", "-"],
        ["ours, early exit off", f"{runs[False][0]:.3f}", f"{t_naive / runs[False][0]:.2f}x",
         f"{n_loops}/{n_loops}", "-"],
        ["ours, early exit on", f"{runs[True][0]:.3f}", f"{t_naive / runs[True][0]:.2f}x",
         f"{runs[True][3]}/{n_loops} (work {runs[True][2]:.0%})",
         "yes" if torch.equal(runs[True][1], runs[False][1]) else "NO"],
    ]
    if losses:
        last = losses[-20:]
        trained = (f"trained {steps} steps (CE {losses[0]:.2f} -> mean of the last "
                   f"{len(last)} {sum(last) / len(last):.2f})")
    else:
        trained = "untrained (--train-steps 0)"
    note = f"{trained}, mean ACT ponder cost at n_loops={n_loops}: {ponder:.2f} loops"
    return rows, note


SECTIONS = ("kv", "moe", "prefill", "decode", "session", "act")


def _prefill(model: OpenMythos, ids: torch.Tensor, n_loops: int, last_only: bool) -> torch.Tensor:
    """One prompt's forward into a fresh cache; the last position's logits, (B, V), computed
    at every position or (``last_only``) at the last alone."""
    from open_mythos.inference.generation import last_positions

    at = last_positions(ids) if last_only else None
    out = model(ids, n_loops, KVCache(ids.shape[1]), 0, logits_at=at)
    return out if last_only else out[:, -1]


def prefill_rows(prompt_lens: list[int], vocabs: tuple[int, ...], n_loops: int,
                 repeats: int) -> list[list[object]]:
    """A prompt's forward into a fresh cache with the logits of every position (what a
    prefill computed before 2026-12-05) against the last position's only (``logits_at``:
    the head and the last Coda block run there alone, what ``generate`` and the server do
    now), same model and prompt, their calls interleaved; and whether the last logits agree."""
    rows = []
    for vocab in vocabs:
        torch.manual_seed(0)
        model = OpenMythos(small_config("gqa", vocab_size=vocab)).eval()
        for T in prompt_lens:
            ids = torch.randint(0, vocab, (1, T))
            run = {name: partial(_prefill, model, ids, n_loops, name == "last")
                   for name in ("every", "last")}
            with torch.no_grad():
                same = torch.allclose(run["last"](), run["every"](), rtol=1e-4, atol=1e-4)
                times = alternating_medians(run, repeats=repeats)
            rows.append([vocab, T, f"{1e3 * times['every']:.1f}", f"{1e3 * times['last']:.1f}",
                         f"{times['every'] / times['last']:.2f}x", "yes" if same else "NO"])
    return rows


def session_rows(attn: str, prompt_len: int, new: int, n_loops: int, after_s: float,
                 max_calls: int, cost_s: float | None = None
                 ) -> tuple[list[list[object]], list[str]]:
    """The default ``generate`` (``compile=None``) over a session of repeated calls, each
    followed by the reference-style model's call on the same prompt.

    A fresh model and a fresh automatic-compile policy (nothing compiled or counted yet in
    this process for them): the calls decode eagerly until their eager steps add up to the
    expected compilation time, one call compiles, the rest run compiled. The session ends
    ``after_s`` seconds of decoding after the compilation (or after ``max_calls``). Rows:
    the eager calls, the compiling call and the compiled calls, each phase's median
    decode tok/s against the reference's over the same calls; notes: the session's totals
    against never compiling and compiling at once (both estimated from the phases' rates).
    ``cost_s``: the policy's compilation-time estimate (default: the library's).
    """
    import open_mythos.inference.generation as generation
    from open_mythos.inference.autocompile import AutoCompile

    torch.manual_seed(1)
    model = OpenMythos(small_config(attn)).eval()
    reference = ReferenceStyleLM(small_config(attn)).eval()
    ids = torch.randint(0, model.cfg.vocab_size - 3, (1, prompt_len),
                        generator=torch.Generator().manual_seed(prompt_len))
    policy = AutoCompile() if cost_s is None else AutoCompile(cost_s=cost_s)
    saved = generation.auto_compile
    generation.auto_compile = policy
    calls = []  # (phase, decode s, steps, call wall s, reference decode s)
    try:
        after = None
        key = generation.shape_key(model, ids, new, n_loops, None)
        for _ in range(max_calls):
            was = policy.has_compiled(model, key)
            t0 = time.perf_counter()
            _, dec, steps = timed_stream(stream(model, ids, new, n_loops, do_sample=False))
            wall = time.perf_counter() - t0
            now = policy.has_compiled(model, key)
            phase = "compiled" if was else ("compiling" if now else "eager")
            ref = timed_stream(reference_stream(reference, ids, new, n_loops))[1]
            calls.append((phase, dec, steps, wall, ref))
            if phase == "compiling":
                after = 0.0
            elif phase == "compiled":
                after += dec
                if after >= after_s:
                    break
    finally:
        generation.auto_compile = saved
    rows, rates = [], {}
    for phase in ("eager", "compiling", "compiled"):
        part = [c for c in calls if c[0] == phase]
        if not part:
            continue
        steps = part[0][2]
        ours = statistics.median(steps / c[1] for c in part)
        ref = statistics.median(steps / c[4] for c in part)
        rates[phase] = ours
        rows.append([attn, prompt_len, phase, len(part), f"{sum(c[3] for c in part):.1f}",
                     f"{ours:.1f}", f"{ref:.1f}", f"{ours / ref:.2f}x"])
    notes = []
    if "compiling" in rates:
        compile_s = next(c[3] for c in calls if c[0] == "compiling")
        tokens = sum(c[2] for c in calls)
        total = sum(c[3] for c in calls)
        never = tokens / rates["eager"]
        at_once = compile_s + tokens / rates.get("compiled", rates["compiling"])
        notes.append(f"{attn} prompt {prompt_len}: {len(calls)} calls, {tokens} decode steps in "
                     f"{total:.1f} s (prefills included); never compiling ~{never:.1f} s, "
                     f"compiling at the first call ~{at_once:.1f} s; the compiling call took "
                     f"{compile_s:.1f} s")
    return rows, notes

#: MoE layers of the dispatch table: (dim, expert_dim, n_experts, top-k). The small
#: configs' layers, then upstream-like widths.
MOE_SHAPES = ((64, 32, 4, 2), (256, 64, 8, 2), (512, 128, 64, 4), (1024, 512, 64, 4),
              (2048, 1408, 64, 4))


def moe_dispatch_rows(tokens: Iterable[int], repeats: int) -> list[list[object]]:
    """The MoE layer's two dispatches timed on a few tokens (no autograd, the same routing
    for both), and the one :meth:`MoEFFN.gathers` picks."""
    rows = []
    for dim, width, experts, k in MOE_SHAPES:
        cfg = MythosConfig(vocab_size=256, dim=dim, n_heads=8, n_kv_heads=8, expert_dim=width,
                           n_experts=experts, n_experts_per_tok=k, max_seq_len=64)
        moe = MoEFFN(cfg).eval()
        for n in tokens:
            x = torch.randn(n, dim)
            with torch.no_grad():
                idx, gates, _ = moe.route(x)
                gather, sort = (
                    median_time(partial(dispatch, x, idx, gates, x.dtype), repeats=repeats,
                                warmup=2)
                    for dispatch in (moe._dispatch_gather, moe._dispatch_sorted))
            slots = n * k
            copied = slots * moe.expert_elements
            rows.append([f"{dim}/{width}, {experts} top-{k}", n, slots, f"{copied / 1e6:.2f}M",
                         f"{1e3 * gather:.3f}", f"{1e3 * sort:.3f}", f"{sort / gather:.2f}x",
                         "gather" if moe.gathers(slots) else "sorted"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="prompt lengths 64 and 512 only")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--loops", type=positive_int, default=8, help="loops allowed in the ACT rows")
    parser.add_argument("--train-steps", type=non_negative_int, default=300)
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed generations per path and prompt length (median)")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the compiled step without its CPU tuning (inductor's "
                             "Python wrapper, every guard on every step)")
    parser.add_argument("--session-s", type=positive_float, default=10.0,
                        help="session section: seconds of compiled decoding after the "
                             "compilation (default 10)")
    parser.add_argument("--session-calls", type=positive_int, default=2000,
                        help="session section: most calls per model (default 2000)")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable): " + ", ".join(SECTIONS))
    args = parser.parse_args(argv)
    sections = args.only or list(SECTIONS)
    torch.set_num_threads(args.threads)
    prompt_lens = [64, 512] if args.quick else [64, 512, 2048]
    repeats = args.repeats

    print(f"# OpenMythos inference benchmark (torch {torch.__version__}, {args.threads} threads, "
          f"fp32, median of {repeats} interleaved generations per path)\n")
    if "kv" in sections:
        print("## KV cache bytes per token (small configs, 4 loops: 1 prelude + 4 loops + 1 "
              "coda layers)\n")
        print_table(["attn", "reference fp32", "ours fp32", "ours bf16", "ratio fp32",
                     "ratio bf16"], kv_rows(4))
    if "moe" in sections:
        print("\n## MoE dispatch of a few tokens (no autograd): gathering each slot's expert "
              "weights against sorting by expert, median ms\n")
        print_table(["layer (dim/expert dim)", "tokens", "slots", "weights copied", "gather ms",
                     "sorted ms", "gather speed-up", "taken"],
                    moe_dispatch_rows((1, 4, 16) if args.quick else (1, 2, 4, 8, 16, 32),
                                      repeats))

    if "prefill" in sections:
        print("\n## Prefill of one prompt (small GQA, untrained, 4 loops, batch 1): the logits "
              "of every position against the last position's only, median ms\n")
        print_table(["vocab", "prompt", "every position ms", "last position ms", "speed-up",
                     "same last logits"],
                    prefill_rows(prompt_lens, (1000,) if args.quick else (1000, 32000), 4,
                                 repeats))

    headers = ["model", "prompt", "prefill tok/s", "naive prefill tok/s", "naive decode tok/s",
               "eager decode tok/s", "compiled decode tok/s", "eager speed-up",
               "compiled speed-up", "same tokens", "reference-style decode tok/s",
               "eager vs reference", "compiled vs reference"]
    if args.ablate:
        headers += ["untuned compiled tok/s", "tuning gain"]
    for attn in ("gqa", "mla") if "decode" in sections else ():
        torch.manual_seed(0)
        model = OpenMythos(small_config(attn)).eval()
        reference = ReferenceStyleLM(small_config(attn)).eval()
        print(f"\n## Greedy decode of 32 tokens, small {attn.upper()} (untrained, 4 loops, batch 1)\n")
        rows, notes = decode_rows(model, reference, prompt_lens, 32, 4, attn, repeats,
                                  args.ablate)
        print_table(headers, rows)
        print("\n" + "; ".join(notes))

    if "session" in sections:
        print("\n## The default generate over a session: repeated greedy calls of 32 tokens, "
              "small configs (untrained, 4 loops, batch 1), each followed by the "
              "reference-style model's\n")
        rows, notes = [], []
        for attn, plen in (("gqa", 64), ("mla", 512)):
            r, n = session_rows(attn, plen, 32, 4, args.session_s, args.session_calls)
            rows += r
            notes += n
        print_table(["model", "prompt", "phase", "calls", "wall s", "decode tok/s",
                     "reference-style tok/s", "vs reference"], rows)
        print("\n" + "\n".join(notes))

    if "act" not in sections:
        return
    rows, note = act_rows(args.loops, args.train_steps, repeats)
    print(f"\n## ACT early exit on an ACT-trained small GQA model: 4 prompts, 32 new tokens, "
          f"up to {args.loops} loops\n")
    print(note + "\n")
    print_table(["decode path", "seconds", "speed-up vs naive", "loops run", "same tokens"], rows)


if __name__ == "__main__":
    main()
