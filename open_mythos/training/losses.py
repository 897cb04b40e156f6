"""The training objective: next-token cross-entropy + ponder cost + MoE balance loss, and
the loop-supervision terms (per-loop readout loss, per-loop intermediate targets).

The cross-entropy is normalised by the number of supervised tokens of the *global* batch
(all micro-steps of all ranks), not per micro-batch, so that gradient accumulation and data
parallelism give the gradient of one big batch even when batches hold different numbers of
supervised tokens (task batches mask the prompt with -100).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossParts:
    """One micro-batch's contribution.

    Attributes:
        objective: differentiable scalar to call ``backward`` on (already scaled so that the
            sum over micro-steps, averaged over data-parallel ranks, is the step's loss).
        ce_sum: detached float32 sum of the token cross-entropies.
        ponder: detached mean ponder cost (expected loops per position) over this
            micro-batch's real tokens.
        aux: detached MoE balance loss (0 when the model reports none).
        ponder_sum: detached float32 sum of the ponder cost over the real tokens.
    """

    objective: torch.Tensor
    ce_sum: torch.Tensor
    ponder: torch.Tensor
    aux: torch.Tensor
    ponder_sum: torch.Tensor | None = None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions, in float32.

    Args:
        logits: (B, T, V) in any float dtype, or (N, V) (logits at selected positions).
        targets: (B, T) long, or (N,), ``IGNORE_INDEX`` where there is no loss.

    Returns:
        float32 scalar (0 when no position is supervised).
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def supervised_rows(targets: torch.Tensor, max_fraction: float = 0.5) -> torch.Tensor | None:
    """Flat indices (N,) of the supervised positions of ``targets`` (B, T), for
    ``forward(..., logits_at=...)``, or None when more than ``max_fraction`` of the
    positions are supervised (language modelling: selecting would save nothing).

    Call it on the batch's host copy: the indices are then known without a GPU sync.
    """
    flat = (targets != IGNORE_INDEX).flatten()
    n = int(flat.sum())
    if n > max_fraction * flat.numel():
        return None
    return flat.nonzero().squeeze(1)


def count_targets(targets: torch.Tensor) -> int:
    """Number of supervised positions of a (B, T) target tensor."""
    return int((targets != IGNORE_INDEX).sum())


def compute_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ponder_cost: torch.Tensor | None,
    aux_loss: torch.Tensor | None,
    *,
    ponder_weight: float,
    aux_weight: float,
    ce_scale: float,
    reg_scale: float,
    token_mask: torch.Tensor | None = None,
    ponder_scale: float | None = None,
) -> LossParts:
    """Objective of one micro-batch.

    ``objective = ce_sum * ce_scale + reg_scale * (ponder_weight * mean(ponder_cost)
    + aux_weight * aux_loss)``, the mean over the real tokens of ``token_mask`` ((B, T)
    bool, False at padding; None: every position). With ``W`` data-parallel ranks (which
    average gradients) and ``A`` accumulation micro-steps, pass
    ``ce_scale = W / n_supervised_global`` and ``reg_scale = 1 / A``: the averaged gradient
    is then that of ``ce_mean_global + ponder_weight * ponder_mean + aux_weight * aux_mean``.
    Micro-batches with different numbers of real tokens (padded task batches) make that
    ponder mean a mean of means; ``ponder_scale = W / n_real_global`` replaces its term by
    ``ponder_weight * ponder_sum * ponder_scale``, whose averaged gradient is that of the
    mean over the real tokens of the whole batch.

    Args:
        logits: (B, T, V).
        targets: (B, T) long with ``IGNORE_INDEX`` holes.
        ponder_cost: (B, T) differentiable expected loops, or None.
        aux_loss: scalar MoE balance loss, or None.
    """
    ce_sum = cross_entropy_sum(logits, targets)
    zero = ce_sum.new_zeros(())
    if ponder_cost is None:
        ponder_sum, ponder = zero, zero
    elif token_mask is None:
        ponder_sum = ponder_cost.float().sum()
        ponder = ponder_sum / max(ponder_cost.numel(), 1)
    else:
        real = token_mask.to(torch.float32)
        ponder_sum = (ponder_cost.float() * real).sum()
        ponder = ponder_sum / real.sum().clamp(min=1)
    aux = aux_loss.float() if aux_loss is not None else zero
    objective = ce_sum * ce_scale
    if ponder_weight:
        objective = objective + ponder_weight * (
            reg_scale * ponder if ponder_scale is None else ponder_scale * ponder_sum)
    if aux_weight:
        objective = objective + reg_scale * aux_weight * aux
    return LossParts(objective, ce_sum.detach(), ponder.detach(), aux.detach(),
                     ponder_sum.detach())


def readout_depths(n_loops: int, last: int | None = None) -> list[int]:
    """The loop counts read out for the per-loop loss: ``1..n_loops``, or the last ``last``."""
    first = 1 if last is None else max(1, n_loops - last + 1)
    return list(range(first, n_loops + 1))


def loop_weights(depths: Sequence[int], n_loops: int, gamma: float = 1.0) -> dict[int, float]:
    """Weight of each read-out depth ``d``: ``gamma ** (n_loops - d)``, normalised to sum 1."""
    raw = {d: gamma ** (n_loops - d) for d in depths}
    total = sum(raw.values())
    return {d: w / total for d, w in raw.items()}


def targets_at_depth(targets: torch.Tensor, answer_start: torch.Tensor, trace: torch.Tensor,
                     depth: int) -> torch.Tensor:
    """``targets`` with the position that predicts the first answer token set to what the
    state after ``depth`` steps should name: ``trace[:, min(depth, K) - 1]``.

    Args:
        targets: (B, T) long.
        answer_start: (B,) index of the first answer token (the prediction is one earlier).
        trace: (B, K) per-step targets (:func:`open_mythos.tasks.batching.trace_targets`).
    """
    out = targets.clone()
    rows = torch.arange(targets.shape[0], device=targets.device)
    out[rows, answer_start - 1] = trace[:, min(depth, trace.shape[1]) - 1]
    return out


def loop_readout_ce_sum(
    readouts: dict[int, torch.Tensor],
    targets: torch.Tensor,
    weights: dict[int, float],
    trace: torch.Tensor | None = None,
    answer_start: torch.Tensor | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
    output_depth: int | None = None,
) -> torch.Tensor:
    """``sum_d weights[d] * cross_entropy_sum(logits_d, targets_d)``, float32.

    ``targets_d`` is ``targets``, or with ``trace`` the per-step targets of
    :func:`targets_at_depth`, except at ``output_depth``: the depth whose readout is the
    model's output (the Coda lens after a step's last loop), which keeps ``targets`` (the
    answer, as the main cross-entropy asks of the same logits: a chain longer than the
    step's loops would otherwise give them two targets). ``readouts[d]`` are (B, T, V) logits, or with ``head`` (B, T,
    dim) states that ``head`` maps to logits, applied to the supervised positions only.
    ``rows``: the readouts are logits (N, V) at these flat positions of ``targets``
    (``forward(..., logits_at=rows)``). Scale the sum like the main cross-entropy sum
    (``ce_scale``).
    """
    mask = targets != IGNORE_INDEX  # the same positions at every depth
    total = None
    for d, readout in readouts.items():
        y = (targets if trace is None or d == output_depth
             else targets_at_depth(targets, answer_start, trace, d))
        if head is None:
            term = cross_entropy_sum(readout, y if rows is None else y.flatten()[rows])
        else:
            term = cross_entropy_sum(head(readout[mask]).unsqueeze(0), y[mask].unsqueeze(0))
        term = weights[d] * term
        total = term if total is None else total + term
    if total is None:
        raise ValueError("loop_readout_ce_sum needs at least one read-out depth")
    return total
