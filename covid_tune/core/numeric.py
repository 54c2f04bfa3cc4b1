"""Log-odds and probabilities in float64, exact in both tails."""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function in float64, without overflow and accurate in both tails.

    ``exp(x) / (1 + exp(x))`` for negative ``x``, ``1 / (1 + exp(-x))`` otherwise: a
    negative logit gives a probability near ``exp(x)``, not 0, for as long as float64
    can hold it (down to about -745), so probabilities of different logits stay apart
    there. Above about +37 the result is 1.0: a probability cannot tell such logits
    apart, which is why decisions compare log-odds (``logit``) instead.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(under="ignore"):
        small = np.exp(-np.abs(x))  # in (0, 1]: never overflows
        return np.where(x < 0, small / (1.0 + small), 1.0 / (1.0 + small))


def logit(p: np.ndarray) -> np.ndarray:
    """The log-odds ``log(p) - log1p(-p)`` of probabilities, in float64; ``-inf`` at 0
    and ``inf`` at 1. It undoes ``sigmoid`` to rounding for negative logits
    (``logit(sigmoid(-300))`` is -300); a probability near 1 has already lost the
    digits that told large positive logits apart."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)
