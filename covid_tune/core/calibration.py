"""How far a model's probabilities are from the frequencies they claim, and a temperature
per label that brings them closer.

A label's probability is the sigmoid of its log-odds (``covid_tune.core.metrics.log_odds``:
binary, P(infected); multilabel, each label's own sigmoid). Two figures, per split:

- **Brier score**: the mean of (probability - truth)^2 over the images (and, for Part 2,
  over the three labels). 0 is perfect; always saying 0.5 scores 0.25.
- **ECE** (expected calibration error): the probabilities are put in ``BINS`` equal-width
  bins of [0, 1]; in each bin, the gap between the mean probability and the fraction of
  images that are positive, weighted by the bin's share of the images. For Part 2, the
  mean of the three labels' ECE. 0 is perfect; a model that says 0.9 for images of which
  60% are positive has an ECE near 0.3.

**Temperature scaling** divides a label's log-odds by a temperature T fitted on the
choosing split (the one that tunes the thresholds) by maximum likelihood: T > 1 softens
an over-confident model, T < 1 sharpens a timid one. It is increasing, so it changes no
ranking (AUROC) and no decision: a threshold t on the raw log-odds is t / T on the scaled
ones. Everything is computed on the log-odds in float64 (``logaddexp``), so logits far
from 0 neither saturate nor overflow.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

BINS = 15
"""Equal-width bins of [0, 1] for the ECE and the reliability diagram."""
TEMPERATURE_RANGE = (0.05, 100.0)
"""The temperatures searched; a fit at either end is clipped there."""


def probabilities(values: np.ndarray, temperatures: np.ndarray | None = None) -> np.ndarray:
    """Sigmoid of (N, K) log-odds divided by (K,) ``temperatures`` (1 when None)."""
    values = np.asarray(values, dtype=np.float64)
    if temperatures is not None:
        values = values / np.asarray(temperatures, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        return np.exp(-np.logaddexp(0.0, -values))


def brier(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Brier score over axis -2 (images) and -1 (labels): (..., N, K) -> (...)."""
    return np.mean((probs - truth) ** 2, axis=(-2, -1))


def ece(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ECE with ``BINS`` equal-width bins, per label then averaged over labels:
    (..., N, K) -> (...). A probability of exactly 1 goes in the last bin."""
    truth = truth.astype(np.float64)
    bins = np.minimum((probs * BINS).astype(np.int64), BINS - 1)
    count = probs.shape[-2]
    gap = np.zeros(probs.shape[:-2] + probs.shape[-1:])
    for b in range(BINS):
        inside = bins == b
        claimed = np.where(inside, probs, 0.0).sum(axis=-2)
        observed = np.where(inside, truth, 0.0).sum(axis=-2)
        gap += np.abs(claimed - observed)  # = share of the bin * |mean p - fraction positive|
    return (gap / count).mean(axis=-1)


def calibration(truth: np.ndarray, values: np.ndarray,
                temperatures: np.ndarray | None = None) -> dict[str, float]:
    """``{"ece": ..., "brier": ...}`` of (N, K) bool ``truth`` and (N, K) log-odds."""
    probs = probabilities(values, temperatures)
    return {"ece": float(ece(truth, probs)), "brier": float(brier(truth, probs))}


def reliability(truth: np.ndarray, values: np.ndarray,
                temperatures: np.ndarray | None = None) -> list[tuple[float, float, int]]:
    """(mean probability, fraction positive, images) of each non-empty bin, every label
    pooled: the points of a reliability diagram."""
    probs = probabilities(values, temperatures).ravel()
    truth = np.asarray(truth, dtype=np.float64).ravel()
    bins = np.minimum((probs * BINS).astype(np.int64), BINS - 1)
    points = []
    for b in range(BINS):
        inside = bins == b
        if inside.any():
            points.append((float(probs[inside].mean()), float(truth[inside].mean()),
                           int(inside.sum())))
    return points


def fit_temperature(truth: np.ndarray, values: np.ndarray) -> float | None:
    """The temperature that minimises one label's negative log-likelihood (log-odds
    ``values``, (N,)); None when ``truth`` holds one class only (nothing to fit)."""
    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        return None
    values = np.asarray(values, dtype=np.float64)
    signed = np.where(truth, values, -values)  # log-odds of the true answer

    def nll(log_t: float) -> float:
        return float(np.logaddexp(0.0, -signed / math.exp(log_t)).mean())

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded",
                            options={"xatol": 1e-4})
    return float(math.exp(found.x))
