"""Command-line options for a training-free exit rule, shared by the commands that run a model.

::

    --exit-kl 0.01 --exit-min-loops 2     # stop a position once successive loops agree
"""

from __future__ import annotations

import argparse

from ..layers.recurrence import ExitRule


def add_exit_arguments(p: argparse.ArgumentParser) -> None:
    """``--exit-kl``, ``--exit-entropy``, ``--exit-rel-change``, ``--exit-argmax-streak`` and
    ``--exit-min-loops`` (see :class:`~open_mythos.layers.recurrence.ExitRule`)."""
    g = p.add_argument_group("exit rule (training-free early exit per position)")
    g.add_argument("--exit-kl", type=float, metavar="NATS",
                   help="exit once KL between successive loops' next-token distributions "
                        "is below NATS")
    g.add_argument("--exit-entropy", type=float, metavar="NATS",
                   help="exit once the next-token distribution's entropy is below NATS")
    g.add_argument("--exit-rel-change", type=float, metavar="R",
                   help="exit once the state changes by less than R relative to its norm")
    g.add_argument("--exit-argmax-streak", type=int, metavar="M",
                   help="exit once the most likely token has stayed the same for M loops")
    g.add_argument("--exit-min-loops", type=int, metavar="N",
                   help="never exit before N loops (default 1; needs a criterion above)")


def exit_rule_from_args(args: argparse.Namespace) -> ExitRule | None:
    """The rule the options describe, or None when no criterion is given.

    Raises:
        ValueError: an invalid threshold (the message names the field).
    """
    criteria = dict(kl=args.exit_kl, entropy=args.exit_entropy,
                    rel_change=args.exit_rel_change, argmax_streak=args.exit_argmax_streak)
    if all(v is None for v in criteria.values()):
        if args.exit_min_loops is not None:  # was ignored without a word
            raise ValueError("--exit-min-loops needs a criterion: --exit-kl, --exit-entropy, "
                             "--exit-rel-change or --exit-argmax-streak")
        return None
    return ExitRule(**criteria, min_loops=1 if args.exit_min_loops is None
                    else args.exit_min_loops)
