"""``openmythos inspect``: what each loop of a looped model predicts, for one prompt.

::

    openmythos inspect --checkpoint runs/text --prompt "The cat sat on the" --out inspect/
    openmythos inspect --checkpoint demo_out/looped/chain --prompt "a=1;b=a?b" \\
        --n-loops 8 --exit-kl 0.01 --exit-min-loops 2 --out inspect/

Writes to ``--out``:
    ``lens.png``: the logit lens per loop: for every position (the token read so far) and
        every loop, the most likely next token and its probability.
    ``kl.png``: KL divergence between successive loops' next-token distributions.
    ``depth.png``: the loops each position ran: ACT halting (models trained with ACT) and
        the exit rule given by the ``--exit-*`` options.
    ``inspect.json``: the numbers behind the figures.
and prints the top token of every position at every loop.

Exit status: 0, or 2 for invalid arguments or an unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from .argtypes import Once, check_output_dir
from .exit_options import add_exit_arguments, exit_rule_from_args

#: The figures ``inspect`` may write; those a run does not write are removed from ``--out``,
#: so that a figure of an earlier prompt is never taken for this one's.
FIGURES = ("lens.png", "kl.png", "depth.png")

#: The most (loops x positions x vocabulary) entries of the per-loop distributions (float64).
MAX_READOUT_ENTRIES = 2**27


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``inspect`` on the ``openmythos`` command."""
    from .generate import add_model_arguments

    p = subparsers.add_parser(
        "inspect", help="per-loop logit lens, KL between loops and exit depths for a prompt",
        description="Read out every loop of a looped model on one prompt: the top next "
                    "token per position and loop, KL between successive loops, and where "
                    "ACT or an exit rule stops each position. Figures and JSON go to --out.")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, action=Once, help="the text to read")
    p.add_argument("--lens", choices=["coda", "head"],
                   help="coda: the rest of the network (with ACT off, what an exit there "
                        "outputs); head: final norm and head only, the lens the exit rules "
                        "decide on. Default: head with an --exit-* rule (so the KL shown is "
                        "the one the rule reads), else coda")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_exit_arguments(p)
    p.set_defaults(func=run)
    return p


def inspect_prompt(model: Any, ids: Any, n_loops: int, lens: str = "coda",
                   exit_rule: Any = None) -> dict[str, Any]:
    """The per-loop readout of ``ids`` (1, T): ``top`` and ``prob`` ((loops, T) top token
    and its probability), ``kl`` ((loops - 1, T) nats, loop d against d - 1), ``act_loops``
    (T,) or None, and ``exit_loops`` (T,) or None."""
    import torch

    with torch.no_grad():
        out = model.readout(ids, n_loops, lens=lens)
        logp = torch.stack([torch.log_softmax(out.depth_logits[d][0].double(), -1)
                            for d in range(1, n_loops + 1)])  # (loops, T, V)
        prob, top = logp.exp().max(-1)
        kl = (logp[1:].exp() * (logp[1:] - logp[:-1])).sum(-1)
        act_loops = None
        if model.cfg.use_act:
            model(ids, n_loops, act_early_exit=False)
            act_loops = model.recurrent.last_position_loops[0].tolist()
        exit_loops = None
        if exit_rule is not None:
            model(ids, n_loops, exit_rule=exit_rule, act_early_exit=False)
            exit_loops = model.recurrent.last_position_loops[0].tolist()
    return dict(top=top.tolist(), prob=prob.tolist(), kl=kl.tolist(), act_loops=act_loops,
                exit_loops=exit_loops)


def run(args: argparse.Namespace) -> int:
    """Load, read out every loop, write the figures; exit status 0 or 2."""
    import torch

    from ..integrations.textgen import encode_prompts, lossy_readback
    from ..registry import is_looped
    from .generate import load_for_inference

    try:
        out = check_output_dir(args.out)
        exit_rule = exit_rule_from_args(args)
        # The KL figure next to the exit depths is the rule's own (head) unless asked.
        lens = args.lens or ("head" if exit_rule is not None else "coda")
        loaded, tokenizer = load_for_inference(args)
        model = loaded.model.eval()
        if not is_looped(model):
            raise ValueError("inspect reads out loops: the checkpoint holds a dense baseline")
        n_loops = args.n_loops or loaded.n_loops or model.cfg.max_loop_iters
        # Framed as in training: BOS first for a task run, nothing added for a text run
        # (an empty prompt starts from the token training texts start after, as
        # generate's does).
        ids = encode_prompts(tokenizer, [args.prompt])[0]
        readback = lossy_readback(tokenizer, args.prompt, ids)
        if readback is not None:
            print(f"openmythos inspect: warning: the tokenizer reads the prompt as "
                  f"{readback!r} (characters it has no token for are lost)", file=sys.stderr)
        if len(ids) > model.cfg.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model reads at most "
                             f"{model.cfg.max_seq_len}")
        if n_loops * len(ids) * model.cfg.vocab_size > MAX_READOUT_ENTRIES:
            raise ValueError(f"{n_loops} loops x {len(ids)} tokens x {model.cfg.vocab_size} "
                             "vocabulary entries is too large a readout; use fewer loops or "
                             "a shorter prompt")
        device = next(model.parameters()).device
        data = inspect_prompt(model, torch.tensor([ids], device=device), n_loops, lens,
                              exit_rule)
        out.mkdir(parents=True, exist_ok=True)
    except BrokenPipeError:  # the reader went away (| head): the CLI ends quietly
        raise
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        print(f"openmythos inspect: error: {err}", file=sys.stderr)
        return 2
    labels = [_show(_token_text(tokenizer, i)) for i in ids]
    if exit_rule is not None and lens != "head":
        print("openmythos inspect: note: the exit rule decides on the head lens; the KL "
              "shown is the coda lens's (--lens head shows the rule's)", file=sys.stderr)
    data.update(tokens=labels, n_loops=n_loops, lens=lens, checkpoint=str(loaded.path),
                exit_rule=None if exit_rule is None else dataclasses.asdict(exit_rule))
    top_text = [[_show(_token_text(tokenizer, t)) for t in row]
                for row in data["top"]]
    _print_lens(labels, top_text, data)
    name = (f"{loaded.path.parent.parent.name}/{loaded.path.name}"
            if loaded.path.parent.name == "checkpoints" else loaded.path.name)
    try:
        written = _write_staged(out, {**data, "top_text": top_text}, labels, top_text, data,
                                title=f"{name}: {args.prompt!r}")
    except (OSError, ValueError) as err:  # a full disk, a directory in a file's way
        print(f"openmythos inspect: error: {err}", file=sys.stderr)
        return 2
    print("\nwrote " + ", ".join(str(f) for f in written))
    return 0


#: The hidden folder inside ``--out`` that inspect writes to (:mod:`open_mythos.staging`).
STAGING_PREFIX = ".openmythos-inspect.partial-"


def _write_staged(out: Path, record: dict[str, Any], labels: list[str],
                  top_text: list[list[str]], data: dict[str, Any], title: str) -> list[Path]:
    """``inspect.json`` and the figures, written into a staging folder and moved into
    ``out`` once all are written, with an earlier prompt's figures that this one does not
    draw removed: stopped or failed midway, ``out`` keeps the earlier prompt's files, never
    a mix of two prompts'."""
    from ..staging import remove_killed, staging_folder

    if remove_killed(out, STAGING_PREFIX):
        raise ValueError(f"another inspect is writing into {out}; wait for it or choose "
                         "another --out")
    with staging_folder(out, STAGING_PREFIX) as stage:
        (stage / "inspect.json").write_text(json.dumps(record, indent=1))
        figures = _plot(stage, labels, top_text, data, title=title)
        for stale in set(FIGURES) - {f.name for f in figures}:
            (out / stale).unlink(missing_ok=True)
        written = [*figures, stage / "inspect.json"]
        for path in written:
            os.replace(path, out / path.name)
    return [out / path.name for path in written]


def _token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text; its bytes as ``\\xNN`` when they are part of a multi-byte character
    (each such byte decoded alone was the same U+FFFD)."""
    raw = tokenizer.token_bytes(int(token_id))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)


def _show(text: str) -> str:
    """A token's text, visible: a space as ␣, other whitespace and control characters
    escaped, the empty string as ∅."""
    if not text:
        return "∅"
    return "".join("␣" if c == " " else c if c.isprintable()
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def _print_lens(labels: list[str], top_text: list[list[str]], data: dict[str, Any]) -> None:
    width = max(3, *(len(t) for t in labels), *(len(t) for row in top_text for t in row))
    print("loop  " + " ".join(t.rjust(width) for t in labels))
    for d, row in enumerate(top_text, start=1):
        print(f"{d:>4}  " + " ".join(t.rjust(width) for t in row))
    for name in ("act_loops", "exit_loops"):
        if data[name] is not None:
            print(f"{name}: {data[name]}")


def _plot(out: Path, labels: list[str], top_text: list[list[str]], data: dict[str, Any],
          title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    loops, T = len(data["prob"]), len(labels)
    size = (max(6.0, 0.55 * T + 2), max(3.0, 0.4 * loops + 1.5))
    paths = [_plot_lens(out, labels, top_text, data, title, size)]
    if loops > 1:
        paths.append(_plot_kl(out, labels, data, title, size))
    series = [(name, data[key]) for name, key in (("ACT halting", "act_loops"),
                                                    ("exit rule", "exit_loops"))
              if data[key] is not None]
    if series:
        paths.append(_plot_depth(out, labels, series, loops, title, size[0]))
    return paths


def _plot_lens(out: Path, labels: list[str], top_text: list[list[str]], data: dict[str, Any],
               title: str, size: tuple[float, float]) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    loops, T = len(data["prob"]), len(labels)
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(np.array(data["prob"]), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   origin="lower", extent=(-0.5, T - 0.5, 0.5, loops + 0.5))
    for d in range(loops):
        for j in range(T):
            ax.text(j, d + 1, top_text[d][j][:5], ha="center", va="center", fontsize=7,
                    color="white" if data["prob"][d][j] < 0.6 else "black")
    _axes(ax, labels, loops, "loop (state read out after it)")
    fig.colorbar(im, ax=ax, label="probability of the top next token")
    ax.set_title(f"logit lens ({data['lens']}) per loop: top next token\n{title}", fontsize=9)
    return _save(fig, out / "lens.png")


def _plot_kl(out: Path, labels: list[str], data: dict[str, Any], title: str,
             size: tuple[float, float]) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    loops, T = len(data["prob"]), len(labels)
    fig, ax = plt.subplots(figsize=size)
    kl = np.maximum(np.array(data["kl"]), 1e-12)
    im = ax.imshow(np.log10(kl), aspect="auto", cmap="magma", origin="lower",
                   extent=(-0.5, T - 0.5, 1.5, loops + 0.5))
    _axes(ax, labels, loops, "loop d (against d - 1)", first=2)
    fig.colorbar(im, ax=ax, label="log10 KL(p_d || p_(d-1)) (nats)")
    ax.set_title(f"how much each loop changes the prediction ({data['lens']} lens)\n{title}",
                 fontsize=9)
    return _save(fig, out / "kl.png")


def _plot_depth(out: Path, labels: list[str], series: list[tuple[str, list[int]]], loops: int,
                title: str, width: float) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    T = len(labels)
    fig, ax = plt.subplots(figsize=(width, 3.5))
    bar = 0.8 / len(series)
    for k, (name, depths) in enumerate(series):
        ax.bar(np.arange(T) + (k - (len(series) - 1) / 2) * bar, depths, bar, label=name,
               hatch="//" if k else None, alpha=0.85)
    ax.set_xticks(range(T), labels, fontsize=7)
    ax.set_xlabel("position (token read)")
    ax.set_ylabel("loops run")
    ax.set_ylim(0, loops + 0.5)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.set_title(f"loops each position ran (of {loops})\n{title}", fontsize=9)
    return _save(fig, out / "depth.png")


def _axes(ax: Any, labels: list[str], loops: int, ylabel: str, first: int = 1) -> None:
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(first, loops + 1))
    ax.set_xlabel("position (token read; the readout predicts the next one)")
    ax.set_ylabel(ylabel)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
