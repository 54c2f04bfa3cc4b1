"""ECE, Brier score and temperatures, by hand and on outputs like a trained network's:
logits far from 0, skewed classes, tiny splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covid_tune.core.calibration import (BINS, brier, ece, fit_temperature, probabilities,
                                         reliability)
from covid_tune.core.metrics import calibration, fit_temperatures
from covid_tune.core.tasks import BINARY, MULTILABEL


def test_brier_and_ece_by_hand():
    """Four images said 0.9, 0.9, 0.2, 0.2 of which the first three are positive:
    Brier = (0.01 + 0.01 + 0.64 + 0.04) / 4 = 0.175. The 0.9 bin is 100% positive
    (gap 0.1, half the images), the 0.2 bin 50% (gap 0.3): ECE = 0.5*0.1 + 0.5*0.3."""
    truth = np.array([[1], [1], [1], [0]], dtype=bool)
    probs = np.array([[0.9], [0.9], [0.2], [0.2]])
    assert float(brier(truth, probs)) == pytest.approx(0.175)
    assert float(ece(truth, probs)) == pytest.approx(0.2)
    assert reliability(truth, np.log(probs / (1 - probs))) == [
        (pytest.approx(0.2), 0.5, 2), (pytest.approx(0.9), 1.0, 2)]


def test_a_probability_of_exactly_one_falls_in_the_last_bin():
    truth = np.array([[1], [0]], dtype=bool)
    assert float(ece(truth, np.array([[1.0], [0.0]]))) == 0.0
    assert BINS == 15


def test_saturated_logits_neither_overflow_nor_tie():
    """Logits of +-800 (a float64 exp overflows past 709): probabilities are 0 and 1,
    no warning, no NaN, and the fitted temperature is finite."""
    values = np.array([[800.0], [-800.0], [750.0], [-20.0]])
    with np.errstate(all="raise"):
        probs = probabilities(values)
    assert probs.ravel().tolist() == [1.0, 0.0, 1.0, pytest.approx(math.exp(-20), rel=1e-6)]
    truth = np.array([True, False, False, True])  # two confident mistakes
    temperature = fit_temperature(truth, values[:, 0])
    assert math.isfinite(temperature) and temperature > 50  # soften hard


def test_temperature_recovers_an_overconfident_models_scale():
    """Scores drawn calibrated, then multiplied by 3 (an over-confident network): the
    fitted temperature is about 3, and dividing by it brings ECE back down."""
    rng = np.random.default_rng(0)
    true_log_odds = rng.normal(0, 1.5, 20_000)
    truth = rng.random(20_000) < 1 / (1 + np.exp(-true_log_odds))
    logits = np.stack([np.zeros(20_000), 3 * true_log_odds], axis=1)
    found = fit_temperatures(BINARY, truth.astype(int), logits)
    assert found["infected"] == pytest.approx(3.0, rel=0.05)
    before = calibration(BINARY, truth.astype(int), logits)
    after = calibration(BINARY, truth.astype(int), logits, found)
    assert after["ece"] < 0.02 and before["ece"] > 0.1
    assert after["brier"] < before["brier"]


def test_a_label_with_one_class_keeps_temperature_one():
    """On a tiny, skewed choosing split with no covid at all, covid is not fitted."""
    truth = np.array([[0, 1, 0], [0, 0, 1], [0, 1, 0]])
    logits = np.array([[-9.0, 4.0, -3.0], [-7.0, -2.0, 5.0], [-8.0, 1.0, 0.5]])
    found = fit_temperatures(MULTILABEL, truth, logits)
    assert found["covid"] == 1.0
    assert set(found) == {"covid", "normal", "pneumonia"}
    assert all(0.05 <= t <= 100 for t in found.values())


def test_temperature_changes_no_decision_and_no_ranking():
    from covid_tune.core.metrics import compute_metrics

    rng = np.random.default_rng(1)
    truth = (rng.random(200) < 0.3).astype(int)
    logits = np.stack([np.zeros(200), 6 * truth - 3 + rng.normal(0, 3, 200)], axis=1)
    t = fit_temperatures(BINARY, truth, logits)["infected"]
    scaled = logits / t
    a, b = compute_metrics(BINARY, truth, logits, {"infected": 0.7}), \
        compute_metrics(BINARY, truth, scaled, {"infected": 0.7 / t})
    assert a["confusion"] == b["confusion"] and a["auroc"] == b["auroc"]
