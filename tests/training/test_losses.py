"""The objective: CE over supervised tokens, ponder and aux terms, global normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from open_mythos.training.losses import compute_loss, count_targets


def sample(seed=0, B=4, T=6, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100
    targets[2, :] = -100
    return logits, targets


def test_cross_entropy_ignores_masked_positions():
    logits, targets = sample()
    n = count_targets(targets)
    parts = compute_loss(logits, targets, None, None, ponder_weight=0.0, aux_weight=0.0,
                         ce_scale=1.0 / n, reg_scale=1.0)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert n == int(keep.sum())
    assert parts.objective.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_terms():
    logits, targets = sample()
    ponder = torch.full((4, 6), 3.0, requires_grad=True)
    aux = torch.tensor(1.5, requires_grad=True)
    n = count_targets(targets)
    parts = compute_loss(logits, targets, ponder, aux, ponder_weight=0.1, aux_weight=0.01,
                         ce_scale=1.0 / n, reg_scale=0.5)
    ce = parts.ce_sum.item() / n
    assert parts.objective.item() == pytest.approx(ce + 0.5 * (0.1 * 3.0 + 0.01 * 1.5), rel=1e-6)
    parts.objective.backward()
    assert ponder.grad is not None and aux.grad.item() == pytest.approx(0.5 * 0.01)
    assert parts.ponder.item() == 3.0 and parts.aux.item() == 1.5
    # The ponder cost is the mean over real tokens: padding (here 7.0) is left out.
    padded = torch.full((4, 6), 3.0)
    padded[:, 4:] = 7.0
    real = torch.ones(4, 6, dtype=torch.bool)
    real[:, 4:] = False
    parts = compute_loss(logits, targets, padded, None, ponder_weight=0.1, aux_weight=0.0,
                         ce_scale=1.0 / n, reg_scale=1.0, token_mask=real)
    assert parts.ponder.item() == 3.0


def test_split_batches_sum_to_the_global_mean():
    """Micro-batches (or ranks) with different numbers of supervised tokens: with
    ce_scale = 1 / n_global the summed objectives and gradients equal the whole batch's."""
    logits, targets = sample()
    n = count_targets(targets)
    whole = compute_loss(logits, targets, None, None, ponder_weight=0, aux_weight=0,
                         ce_scale=1.0 / n, reg_scale=1.0).objective
    (g_whole,) = torch.autograd.grad(whole, logits)
    halves = [compute_loss(logits[i:i + 2], targets[i:i + 2], None, None, ponder_weight=0,
                           aux_weight=0, ce_scale=1.0 / n, reg_scale=0.5).objective
              for i in (0, 2)]
    (g_split,) = torch.autograd.grad(sum(halves), logits)
    assert sum(halves).item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(g_split, g_whole)
