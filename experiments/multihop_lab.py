"""Multi-hop depth-extrapolation lab: a short, self-contained training loop for recipe search.

    python experiments/multihop_lab.py --hops 1 3 --ood 4 6 --T 3 --lmin 3 --lmax 6 --deep 1

Trains the demo-sized looped model (or, with ``--baseline``, its FLOPs-matched dense
baseline) on ``multihop`` chains and prints first-answer-token accuracy against loops, per
split and per hop count. It trades the Trainer's checkpoints and logging for knobs that are
not training options: a hop curriculum (``--curriculum``), a language-model loss on the
prompt tokens (``--prompt-loss``) and per-loop supervision with the chain's intermediate
values (``--deep``: the state after loop t, read out through the final norm and the LM head,
is trained to name the variable or digit reached after t hops; the baseline gets the same
signal after each core block). ``docs/depth_extrapolation.md`` lists the runs and their
results. One thread by default, so two runs fit side by side on 2 cores. ``--init`` starts
from a trained checkpoint (for example the demo's 1-hop model) instead of a fresh model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from open_mythos import MythosConfig, OpenMythos
from open_mythos.baseline import BaselineConfig, DenseBaseline, matched_baseline_config
from open_mythos.commands.argtypes import (  # noqa: E402
    loop_counts,
    non_negative_int,
    output_file,
    positive_float,
    positive_int,
)
from open_mythos.tasks import get_task, make_batch
from open_mythos.tasks.base import IGNORE_INDEX, PAD_ID, VOCAB_SIZE
from open_mythos.tasks.batching import collate, decode_answer
from open_mythos.training.schedule import LRSchedule

#: ``--dim`` and ``--heads`` of a fresh model.
DIM, HEADS = 64, 4


def non_negative_float(text: str) -> float:
    """A finite ``float >= 0`` (argparse type): a loss weight."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args() -> argparse.Namespace:
    """The arguments, every one checked here: a bad one fails before the training starts.

    Fills in ``lmin``/``lmax`` (default ``--T``) and ``dim``/``heads`` (the ``--init``
    checkpoint's, else :data:`DIM` and :data:`HEADS`).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hops", type=int, nargs=2, default=[1, 3], help="training hop range")
    p.add_argument("--ood", type=int, nargs=2, default=[4, 6], help="out-of-distribution hops")
    p.add_argument("--dis", type=int, nargs=2, default=[1, 4], help="distractor range")
    p.add_argument("--T", type=positive_int, default=3, help="T_train (and the baseline's core depth)")
    p.add_argument("--lmin", type=positive_int, help="fewest loops sampled in training (default T)")
    p.add_argument("--lmax", type=positive_int, help="most loops sampled in training (default T)")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--bs", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--prompt-loss", type=non_negative_float, default=0.0,
                   help="weight of next-token loss on the prompt tokens")
    p.add_argument("--deep", type=non_negative_float, default=0.0,
                   help="weight of the per-loop (per-core-block) intermediate-hop loss")
    p.add_argument("--curriculum", type=non_negative_int, default=0,
                   help="steps over which the largest training hop count rises to --hops[1]")
    p.add_argument("--baseline", action="store_true", help="train the dense baseline instead")
    p.add_argument("--init", metavar="RUN",
                   help="start from this checkpoint or run directory (e.g. a demo's looped/ or "
                        "baseline/ run) instead of a fresh model")
    p.add_argument("--dim", type=positive_int,
                   help=f"model width (default {DIM}; with --init, the checkpoint's)")
    p.add_argument("--heads", type=positive_int,
                   help=f"attention heads (default {HEADS}; with --init, the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--eval-loops", type=loop_counts, default="1,2,3,4,6,8,10,12,16",
                   help="loop counts to evaluate, e.g. 1,2,4,8 or 1-16 (the baseline: 1)")
    p.add_argument("--out", type=output_file,
                   help="write the arguments and accuracies here (JSON; missing folders are made)")
    a = p.parse_args()
    try:
        task = get_task("multihop", hops=a.hops, ood_hops=a.ood, distractors=a.dis)
    except ValueError as err:
        p.error(f"--hops/--ood/--dis: {err}")
    a.lmin, a.lmax = a.lmin or a.T, a.lmax or a.T
    if a.lmin > a.lmax:
        p.error(f"--lmin ({a.lmin}) must not exceed --lmax ({a.lmax}); either defaults to "
                f"--T ({a.T})")
    if a.init:
        check_init(p, a)
    else:
        a.dim, a.heads = a.dim or DIM, a.heads or HEADS
        try:
            config(a, task.max_len())
        except ValueError as err:
            p.error(f"--dim/--heads/--T: {err}")
    return a


def check_init(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``--init`` holds a model of the kind ``--baseline`` asks for, whose width and heads
    (set on ``a``) agree with ``--dim``/``--heads`` where given; reads only its config."""
    from open_mythos.checkpoints import read_config

    try:
        cfg, _ = read_config(a.init)
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--init: {err}")
    dense = isinstance(cfg, BaselineConfig)
    if dense != a.baseline:
        p.error(f"--init {a.init} holds a {'dense baseline' if dense else 'looped model'}: it "
                "must hold a dense baseline exactly when --baseline is given")
    for option, given, stored in (("--dim", a.dim, cfg.dim), ("--heads", a.heads, cfg.n_heads)):
        if given is not None and given != stored:
            p.error(f"{option} {given} differs from the --init checkpoint's {stored}; leave "
                    f"{option} out (it is taken from the checkpoint)")
    a.dim, a.heads = cfg.dim, cfg.n_heads


def config(a: argparse.Namespace, seq_len: int) -> MythosConfig:
    """The configuration of a fresh model (the baseline's when ``--baseline``)."""
    cfg = MythosConfig(
        vocab_size=VOCAB_SIZE, dim=a.dim, n_heads=a.heads, n_kv_heads=a.heads,
        max_seq_len=max(64, seq_len), max_loop_iters=a.T, prelude_layers=1, coda_layers=1,
        attn_type="gqa", n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=32,
        lora_rank=4, use_act=False, init_std=a.dim**-0.5, embed_init_std=1.0)
    return matched_baseline_config(cfg, a.T) if a.baseline else cfg


def build(a: argparse.Namespace, seq_len: int) -> torch.nn.Module:
    cfg = config(a, seq_len)
    return DenseBaseline(cfg) if a.baseline else OpenMythos(cfg)


def first_token_accuracy(model, batch, n_loops: int, baseline: bool) -> float:
    """Share of examples whose first answer token is the argmax at the last prompt position."""
    with torch.no_grad():
        logits = model(batch["input_ids"]) if baseline else model(batch["input_ids"], n_loops=n_loops)
    rows = torch.arange(batch["input_ids"].shape[0])
    pos = batch["answer_start"] - 1
    return (logits[rows, pos].argmax(-1) == batch["targets"][rows, pos]).float().mean().item()


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    task = get_task("multihop", hops=a.hops, ood_hops=a.ood, distractors=a.dis)
    if a.init:
        from open_mythos.training import load_checkpoint

        model = load_checkpoint(a.init)[0].train()  # kind, dim and heads: checked by check_init
    else:
        model = build(a, task.max_len())
    states: list[torch.Tensor] = []  # per-loop (per-core-block) states of the current step
    if a.baseline:
        for block in model.core:
            block.register_forward_hook(lambda m, i, o: states.append(o))
    else:
        model.recurrent.injection.register_forward_hook(lambda m, i, o: states.append(o))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng, loop_rng = random.Random(a.seed), random.Random(a.seed + 1)
    lmin, lmax = a.lmin, a.lmax

    lr_at = LRSchedule(a.lr, warmup_steps=20, decay_steps=a.steps)  # cosine to 0.1 x lr

    t0 = time.time()
    for step in range(a.steps):
        source = task
        if a.curriculum:
            span = a.hops[1] - a.hops[0] + 1
            hi = min(a.hops[1], a.hops[0] + int(span * step / a.curriculum))
            source = get_task("multihop", hops=[a.hops[0], hi], ood_hops=[hi + 1, hi + 1],
                              distractors=a.dis)
        batch = make_batch(source, rng, "train", a.bs, seq_len=task.max_len("train"))
        ids, targets = batch["input_ids"], batch["targets"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        states.clear()
        logits = model(ids) if a.baseline else model(ids, n_loops=loop_rng.randint(lmin, lmax))
        flat = logits.flatten(0, 1).float()
        loss = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX)
        if a.prompt_loss > 0:
            nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], PAD_ID)], 1)
            prompt_targets = torch.where((nxt != PAD_ID) & (targets == IGNORE_INDEX), nxt,
                                         torch.full_like(nxt, IGNORE_INDEX))
            loss = loss + a.prompt_loss * F.cross_entropy(flat, prompt_targets.flatten(),
                                                          ignore_index=IGNORE_INDEX)
        if a.deep > 0:
            rows, pos = torch.arange(ids.shape[0]), batch["answer_start"] - 1
            traces = [task.trace(decode_answer(ids[r, 1:pos[r] + 1])) for r in rows.tolist()]
            deep = 0.0
            for t, h in enumerate(states):
                want = torch.tensor([ord(tr[min(t, len(tr) - 1)]) for tr in traces])
                deep = deep + F.cross_entropy(model.head(model.norm(h[rows, pos])).float(), want)
            loss = loss + a.deep * deep / len(states)
        if not a.baseline:
            loss = loss + 0.01 * model.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_router_bias()
        if step % 200 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.4f} t {time.time() - t0:.0f}s", flush=True)

    model.eval()
    loops = [1] if a.baseline else a.eval_loops
    results = {}
    for split in ("id", "ood_hops"):
        batch = make_batch(task, random.Random(1234), split, 512)
        results[split] = {n: first_token_accuracy(model, batch, n, a.baseline) for n in loops}
        print(split, " ".join(f"{n}:{v:.3f}" for n, v in results[split].items()), flush=True)
    for hops in range(a.hops[0], a.ood[1] + 1):
        rng_h = random.Random(99)
        batch = collate([task.generate_at(rng_h, hops) for _ in range(256)])
        accs = [first_token_accuracy(model, batch, n, a.baseline) for n in loops]
        print(f"hops={hops}", " ".join(f"{n}:{v:.2f}" for n, v in zip(loops, accs)), flush=True)
    print(f"time {time.time() - t0:.0f}s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, default=str)


if __name__ == "__main__":
    main()
