"""Loss functions by name: ``ce`` (binary task), ``bce`` and ``focal`` (multilabel task).

``ce`` takes two-class logits ``[B, 2]`` and int64 class targets ``[B]``; ``bce`` and
``focal`` take per-label logits ``[B, K]`` and float 0/1 targets of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Alpha-balanced sigmoid focal loss, per label, from logits.

    ``-[y * alpha * (1-p)**gamma * log(p) + (1-y) * (1-alpha) * p**gamma * log(1-p)]``
    with ``p = sigmoid(logit)``. ``log p`` and ``log(1-p)`` come from ``logsigmoid``
    and the modulating factors from ``exp(gamma * log ...)``, so loss and gradient stay
    finite for any logit and any ``gamma >= 0``.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        log_p = F.logsigmoid(logits)
        log_not_p = F.logsigmoid(-logits)
        positive = targets * self.alpha * torch.exp(self.gamma * log_not_p) * log_p
        negative = (1 - targets) * (1 - self.alpha) * torch.exp(self.gamma * log_p) * log_not_p
        return _REDUCTIONS[self.reduction](-(positive + negative))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


_REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": torch.mean,
    "sum": torch.sum,
    "none": lambda loss: loss,
}

LOSSES: dict[str, Callable[[float, float], nn.Module]] = {
    "ce": lambda alpha, gamma: nn.CrossEntropyLoss(),
    "bce": lambda alpha, gamma: nn.BCEWithLogitsLoss(),
    "focal": lambda alpha, gamma: FocalLoss(alpha, gamma),
}
"""Loss name -> factory taking ``(alpha, gamma)``; only ``focal`` uses them."""


def build_loss(name: str, alpha: float = 0.25, gamma: float = 2.0) -> nn.Module:
    """The loss called ``name``; ``alpha`` and ``gamma`` apply to ``focal`` only."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name](alpha, gamma)
