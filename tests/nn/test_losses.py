"""Focal loss against its formula, and the loss registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from covid_tune.nn.losses import FocalLoss, build_loss


def naive_focal(logits, targets, alpha, gamma):
    p = torch.sigmoid(logits)
    return -(targets * alpha * (1 - p) ** gamma * torch.log(p)
             + (1 - targets) * (1 - alpha) * p**gamma * torch.log(1 - p))


def test_gamma_0_alpha_half_is_half_bce():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 3), torch.randint(0, 2, (8, 3)).float()
    focal = FocalLoss(alpha=0.5, gamma=0.0)(logits, targets)
    bce = nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(focal, bce / 2)


def test_hand_computed_value():
    # logit 0 -> p = 0.5; y = 1: 0.25 * 0.5**2 * log 2; y = 0: 0.75 * 0.5**2 * log 2.
    loss = FocalLoss(alpha=0.25, gamma=2.0, reduction="none")(torch.zeros(2), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([0.0625 * math.log(2), 0.1875 * math.log(2)]))
    # logit ln 3 -> p = 0.75; y = 1: 0.25 * 0.25**2 * -log 0.75
    loss = FocalLoss(alpha=0.25, gamma=2.0)(torch.tensor([math.log(3)]), torch.tensor([1.0]))
    torch.testing.assert_close(loss, torch.tensor(0.25 * 0.0625 * -math.log(0.75)))


def test_reductions():
    logits, targets = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_label = FocalLoss(reduction="none")(logits, targets)
    assert per_label.shape == (2, 2)
    torch.testing.assert_close(FocalLoss(reduction="sum")(logits, targets), per_label.sum())
    torch.testing.assert_close(FocalLoss()(logits, targets), per_label.mean())
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="max")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_large_logits_give_finite_loss_and_grads(gamma):
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0, 1e4, -1e4], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    loss = FocalLoss(alpha=0.25, gamma=gamma, reduction="sum")(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() > 100 * 0.75  # the confidently wrong ones dominate: ~ (1 - alpha) * 100


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.7, 0.5), (2.0, 1.0)])
def test_gradient_matches_the_naive_formula(alpha, gamma):
    torch.manual_seed(1)
    logits = (torch.randn(6, 3, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 2, (6, 3)).double()
    naive_logits = logits.detach().clone().requires_grad_()
    loss = FocalLoss(alpha, gamma)(logits, targets)
    naive = naive_focal(naive_logits, targets, alpha, gamma).mean()
    loss.backward()
    naive.backward()
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(logits.grad, naive_logits.grad)


def test_build_loss():
    assert isinstance(build_loss("ce"), nn.CrossEntropyLoss)
    assert isinstance(build_loss("bce"), nn.BCEWithLogitsLoss)
    focal = build_loss("focal", alpha=0.7, gamma=1.0)
    assert isinstance(focal, FocalLoss) and (focal.alpha, focal.gamma) == (0.7, 1.0)
    with pytest.raises(ValueError, match="valid: ce, bce, focal"):
        build_loss("dice")


def test_losses_accept_their_task_shapes():
    binary = build_loss("ce")(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    multilabel = build_loss("focal")(torch.randn(4, 3), torch.tensor([[1, 0, 1], [0, 1, 0]] * 2).float())
    assert binary.ndim == multilabel.ndim == 0


def test_every_loss_a_task_allows_is_built_here():
    from covid_tune.core.tasks import TASKS
    from covid_tune.nn.losses import LOSSES

    assert {loss for task in TASKS.values() for loss in task.losses} == set(LOSSES)
