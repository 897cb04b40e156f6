"""Command-line options for a training-free exit rule, shared by the commands that run a model.

::

    --exit-kl 0.01 --exit-min-loops 2     # stop a position once successive loops agree
"""

from __future__ import annotations

import argparse
from typing import Any

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


def add_no_exit_rule_argument(p: argparse.ArgumentParser) -> None:
    """``--no-exit-rule``, for the commands that run a Hugging Face export with the exit
    rule its config sets (:func:`resolve_exit_rule`)."""
    p.add_argument("--no-exit-rule", action="store_true",
                   help="ignore the exit rule a Hugging Face export's config sets for its "
                        "forwards (default: apply it, as the Hugging Face model does)")


def resolve_exit_rule(args: argparse.Namespace, loaded: Any) -> tuple[ExitRule | None, bool]:
    """``(rule, from_config)``: the rule of the ``--exit-*`` options if given, else the one
    ``loaded`` (a :class:`~open_mythos.checkpoints.LoadedModel`) sets by default, unless
    ``--no-exit-rule``; ``from_config`` says the rule is the model's default.

    Raises:
        ValueError: ``--no-exit-rule`` with an ``--exit-*`` criterion, or an invalid threshold.
    """
    given = exit_rule_from_args(args) if hasattr(args, "exit_kl") else None
    if getattr(args, "no_exit_rule", False):
        if given is not None:
            raise ValueError("--no-exit-rule contradicts the --exit-* options given")
        return None, False
    if given is not None or loaded.exit_rule is None:
        return given, False
    return loaded.exit_rule, True
