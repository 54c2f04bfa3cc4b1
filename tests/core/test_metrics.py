"""Metrics against confusion matrices counted by hand."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from covid_tune.core.metrics import (binary_metrics, calibration, compute_metrics,
                                     multilabel_metrics)
from covid_tune.core.tasks import BINARY, MULTILABEL

# 10 images, 1 = infected. Scores may be on any increasing scale with the threshold on
# it: these are probabilities, so the threshold is 0.5 (log-odds 0). Predicted infected
# where prob > 0.5:
#   truth 1 1 1 1 0 0 0 0 0 0
#   pred  1 1 1 0 1 0 0 0 0 0   -> tp 3, fn 1, fp 1, tn 5
TRUTH = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PROB = np.array([0.9, 0.8, 0.6, 0.4, 0.7, 0.1, 0.2, 0.3, 0.5, 0.0])


def test_binary_hand_counted():
    m = binary_metrics(TRUTH, PROB, threshold=0.5)
    assert m["confusion"] == [[5, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75)  # 3 / (3 + 1)
    assert m["recall"] == pytest.approx(0.75)  # 3 / (3 + 1)
    assert m["f1"] == pytest.approx(0.75)  # 2*3 / (2*3 + 1 + 1)


def test_binary_positive_class_is_infected():
    # Predicting everything infected: F1 of infected is 2*4/(2*4+6) = 8/14, of normal it would be 0.
    m = binary_metrics(TRUTH, np.ones(10))
    assert m["confusion"] == [[0, 6], [0, 4]]
    assert m["f1"] == pytest.approx(8 / 14) and m["recall"] == 1.0 and m["precision"] == pytest.approx(0.4)


def test_binary_threshold():
    m = binary_metrics(TRUTH, PROB, threshold=0.35)  # adds the 0.4 (tp) and the 0.5 (fp)
    assert m["confusion"] == [[4, 2], [0, 4]]


def test_binary_no_positives_is_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none_true = binary_metrics(np.zeros(4, int), np.array([-2.2, -1.4, -0.8, -0.4]))
        none_predicted = binary_metrics(np.array([1, 1, 0, 0]), np.zeros(4))
    ranked = {k: none_true.pop(k) for k in ("auroc", "ap")}
    assert none_true == {"accuracy": 1.0, "f1": 0.0, "precision": 0.0, "recall": 0.0,
                         "confusion": [[4, 0], [0, 0]]}
    assert all(math.isnan(v) for v in ranked.values())  # undefined without a positive
    assert none_predicted["confusion"] == [[2, 0], [2, 0]]
    assert none_predicted["f1"] == 0.0 and none_predicted["accuracy"] == 0.5


def test_binary_all_infected_and_right():
    m = binary_metrics(np.ones(3, int), np.array([0.9, 0.8, 0.7]))
    assert math.isnan(m.pop("auroc")) and m.pop("ap") == 1.0  # no negative to rank against
    assert m == {"accuracy": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0, "confusion": [[0, 0], [0, 3]]}


NAMES = ("covid", "normal", "pneumonia")
COVID, NORMAL, PNEUMONIA = [1, 0, 1], [0, 1, 0], [0, 0, 1]
ML_TRUTH = np.array([COVID, COVID, NORMAL, NORMAL, PNEUMONIA, PNEUMONIA])
ML_PRED = np.array([
    [1, 0, 1],  # covid, right
    [0, 0, 1],  # covid called pneumonia: covid fn
    [0, 1, 0],  # right
    [0, 0, 0],  # nothing predicted: normal fn
    [0, 0, 1],  # right
    [1, 1, 1],  # covid fp, normal fp
])


def test_multilabel_hand_counted():
    m = multilabel_metrics(ML_TRUTH, np.where(ML_PRED == 1, 2.2, -2.2), NAMES)
    assert m["confusion"] == {
        "covid": [[3, 1], [1, 1]],  # f1 2/(2+1+1) = 0.5
        "normal": [[3, 1], [1, 1]],  # f1 0.5
        "pneumonia": [[2, 0], [0, 4]],  # f1 1.0
    }
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["hamming_loss"] == pytest.approx(4 / 18)
    assert m["f1_covid"] == 0.5 and m["f1_normal"] == 0.5 and m["f1_pneumonia"] == 1.0
    assert m["macro_f1"] == m["f1"] == pytest.approx(2 / 3)
    # per sample: 1, 2/3, 1, 0, 1, 2*1/(2*1+2) = 0.5
    assert m["samples_f1"] == pytest.approx((1 + 2 / 3 + 1 + 0 + 1 + 0.5) / 6)


def test_multilabel_empty_rows_count_as_right_in_samples_f1():
    truth = np.array([[0, 0, 0], [0, 1, 0]])
    m = multilabel_metrics(truth, np.array([[-2.2, -1.4, -0.8], [-2.2, -1.4, -0.8]]), NAMES)
    assert m["samples_f1"] == 0.5  # first row: nothing true, nothing predicted -> 1.0
    assert m["f1_covid"] == 0.0 and m["f1_normal"] == 0.0 and m["accuracy"] == 0.5


def test_compute_metrics_binary_from_logits():
    # softmax(logits)[:, 1] > 0.5 exactly when logit_1 > logit_0; a tie is normal.
    logits = np.array([[0.0, 3.0], [2.0, 1.0], [1.0, 1.0], [-500.0, 500.0]])
    m = compute_metrics(BINARY, np.array([[1.0], [0.0], [1.0], [1.0]]), logits)
    assert m["confusion"] == [[1, 0], [1, 2]]
    assert m["f1"] == pytest.approx(0.8)
    json.dumps(m)


def test_compute_metrics_multilabel_from_logits():
    logits = np.where(ML_PRED == 1, 2.0, -2.0)
    m = compute_metrics(MULTILABEL, ML_TRUTH.astype(np.float32), logits)
    assert m == multilabel_metrics(ML_TRUTH, ML_PRED, NAMES)
    assert all(type(v) is float for k, v in m.items() if k != "confusion")
    json.dumps(m)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics(np.array([0, 2]), np.array([0.1, 0.9]))
    with pytest.raises(ValueError, match="non-empty"):
        binary_metrics(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="label names"):
        multilabel_metrics(ML_TRUTH, ML_PRED, NAMES[:2])


def test_auroc_and_average_precision_by_hand():
    """Four images, P(infected) 0.1 0.4 0.35 0.8 for truths 0 0 1 1: of the four
    (positive, negative) pairs three are ordered right, AUROC 3/4; ranked by score the
    positives come 1st and 3rd, AP = 1/2 * 1 + 1/2 * 2/3 = 5/6."""
    scores = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert scores["auroc"] == pytest.approx(0.75)
    assert scores["ap"] == pytest.approx(5 / 6)


def test_macro_auroc_is_nan_when_a_label_is_undefined_so_splits_stay_comparable():
    """A macro mean over two labels on one split and three on another would compare
    different things: with pneumonia undefined the macro figures are NaN, and
    ``undefined_labels`` says why."""
    from covid_tune.core.metrics import undefined_labels

    truth = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])  # no pneumonia at all
    probs = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.6, 0.7, 0.3], [0.1, 0.1, 0.4]])
    scores = multilabel_metrics(truth, probs, ("covid", "normal", "pneumonia"))
    assert scores["auroc_covid"] == 1.0 and scores["auroc_normal"] == 1.0
    assert math.isnan(scores["auroc_pneumonia"]) and math.isnan(scores["ap_pneumonia"])
    assert math.isnan(scores["auroc"]) and math.isnan(scores["ap"])
    assert undefined_labels(MULTILABEL, truth) == ["pneumonia"]
    full = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
    assert multilabel_metrics(full, probs, ("covid", "normal", "pneumonia"))["auroc"] == \
        pytest.approx(np.mean([1.0, 0.5, 0.25]))


def test_covid_predicted_means_pneumonia_predicted():
    """Part 2's labels say COVID-19 is a pneumonia; a decision that calls an image covid
    but not pneumonia would contradict them, so covid implies pneumonia."""
    truth = np.array([[1, 0, 1], [0, 0, 1]])
    logits = np.array([[3.0, -3.0, -1.0], [-3.0, -3.0, 2.0]])  # covid yes, pneumonia no
    scores = compute_metrics(MULTILABEL, truth, logits)
    assert scores["accuracy"] == 1.0
    assert scores["confusion"]["pneumonia"] == [[0, 0], [0, 2]]


def test_bootstrap_intervals_are_seeded_plain_and_hold_the_estimate():
    from sklearn.metrics import roc_auc_score

    from covid_tune.core.metrics import _rank_auroc, _resamples, bootstrap_intervals

    rng = np.random.default_rng(3)
    targets = (rng.random(300) < 0.2).astype(int)  # a rare positive class
    logits = np.stack([np.zeros(300), 2.0 * targets + rng.normal(0, 1.2, 300)], axis=1)
    first = bootstrap_intervals(BINARY, targets, logits, seed=0)
    assert first == bootstrap_intervals(BINARY, targets, logits, seed=0)
    assert first != bootstrap_intervals(BINARY, targets, logits, seed=1)
    point = {**compute_metrics(BINARY, targets, logits),
             **calibration(BINARY, targets, logits)}
    for name in ("accuracy", "f1", "auroc", "ece", "brier"):
        low, high = first[name]
        assert low < point[name] < high, name
        assert high - low < 0.25, name
    index = _resamples(300, None, 50, rng)
    counts = targets[index].sum(axis=1)
    assert counts.min() < targets.sum() < counts.max()  # class counts vary, as in a new sample
    scores = logits[:, 1][index[:5]]
    assert np.allclose(_rank_auroc(targets[index[:5]].astype(bool), scores),
                       [roc_auc_score(targets[i], logits[i, 1]) for i in index[:5]])


def test_a_grouped_bootstrap_draws_whole_patients():
    from covid_tune.core.metrics import _resamples

    groups = np.repeat([f"p{i}" for i in range(40)], 3)  # 40 patients, 3 images each
    index = _resamples(len(groups), groups, 20, np.random.default_rng(0))
    assert index.shape == (20, 120)
    for row in index:
        whole = row[: 120 - 3]  # the last patient drawn may be cut short
        for start in range(0, len(whole), 3):
            assert len({groups[i] for i in whole[start:start + 3]}) == 1


def test_perfect_predictions_have_a_point_interval_and_an_roc_corner():
    from covid_tune.core.metrics import bootstrap_intervals, roc_points

    truth = np.tile([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0], [0, 0, 1]], (10, 1))
    logits = np.where(truth == 1, 4.0, -4.0)
    intervals = bootstrap_intervals(MULTILABEL, truth, logits, resamples=200)
    assert {k: intervals[k] for k in ("accuracy", "f1", "auroc")} == \
        {"accuracy": (1.0, 1.0), "f1": (1.0, 1.0), "auroc": (1.0, 1.0)}
    fpr, tpr = roc_points(MULTILABEL, truth, logits)
    assert fpr[0] == 0.0 and [f for f, t in zip(fpr, tpr) if t == 1.0][0] == 0.0


def test_intervals_are_left_out_below_ten_images_of_a_class():
    from covid_tune.core.metrics import interval_note

    assert interval_note(BINARY, np.array([1] * 9 + [0] * 50)) == \
        "no intervals: 9 positive image(s) of infected, fewer than 10"
    assert interval_note(BINARY, np.array([1] * 10 + [0] * 10)) is None
    truth = np.tile([[0, 0, 1], [0, 1, 0]], (20, 1))
    assert interval_note(MULTILABEL, np.vstack([truth, [[1, 0, 1]] * 10])) is None
    assert interval_note(MULTILABEL, np.vstack([truth, [[1, 0, 1]] * 5])) == \
        "no intervals: 5 positive image(s) of covid, fewer than 10"


def logits_of(prob: np.ndarray) -> np.ndarray:
    """Binary logits (normal 0, infected log-odds) whose P(infected) is ``prob``."""
    clipped = np.clip(prob, 1e-9, 1 - 1e-9)
    return np.stack([np.zeros(len(prob)), np.log(clipped / (1 - clipped))], axis=1)


def test_tuned_thresholds_by_hand():
    """TRUTH/PROB ranked: 0.9+ 0.8+ 0.7- 0.6+ 0.5- 0.4+ 0.3- ... F1 is best (0.8) and
    Youden's J is best (1 - 2/6) predicting infected down to 0.4, so the threshold is
    halfway to the next score, 0.35; sensitivity 0.75 is first reached at 0.6 (0.55)
    and 0.5 at 0.8 (0.75)."""
    from covid_tune.core.metrics import tuned_threshold

    truth = TRUTH.astype(bool)
    assert tuned_threshold(truth, PROB, "f1") == pytest.approx(0.35)
    assert tuned_threshold(truth, PROB, "youden") == pytest.approx(0.35)
    assert tuned_threshold(truth, PROB, "sensitivity", 0.75) == pytest.approx(0.55)
    assert tuned_threshold(truth, PROB, "sensitivity", 0.5) == pytest.approx(0.75)
    assert tuned_threshold(truth, PROB, "sensitivity", 1.0) == pytest.approx(0.35)
    assert binary_metrics(TRUTH, PROB, 0.35)["f1"] == pytest.approx(0.8)
    assert tuned_threshold(np.zeros(4, bool), PROB[:4], "f1") is None


@pytest.mark.parametrize("seed", range(5))
def test_tuned_thresholds_are_the_best_of_every_cut(seed):
    """Against brute force: no threshold between two scores does better by the rule."""
    from covid_tune.core.metrics import tuned_threshold

    rng = np.random.default_rng(seed)
    truth = rng.random(60) < 0.3
    prob = np.round(np.clip(0.35 * truth + rng.normal(0.35, 0.2, 60), 0, 1), 2)  # ties too
    cuts = np.unique(np.concatenate([[0.0, 1.0], prob]))
    candidates = (cuts[:-1] + cuts[1:]) / 2

    def rates(t):
        m = binary_metrics(truth.astype(int), prob, t)
        (tn, fp), (fn, tp) = m["confusion"]
        return m["f1"], tp / (tp + fn), tn / (tn + fp)

    best_f1 = max(rates(t)[0] for t in candidates)
    assert rates(tuned_threshold(truth, prob, "f1"))[0] == pytest.approx(best_f1)
    best_j = max(r[1] + r[2] - 1 for r in map(rates, candidates))
    _, sens, spec = rates(tuned_threshold(truth, prob, "youden"))
    assert sens + spec - 1 == pytest.approx(best_j)
    _, sens, spec = rates(tuned_threshold(truth, prob, "sensitivity", 0.9))
    assert sens >= 0.9
    assert spec == pytest.approx(max(r[2] for r in map(rates, candidates) if r[1] >= 0.9))


def test_thresholds_per_label_change_the_scores_and_the_intervals():
    from covid_tune.core.metrics import bootstrap_intervals, tune_thresholds

    chosen, untuned = tune_thresholds(BINARY, TRUTH, logits_of(PROB))
    # halfway between the log-odds of 0.4 and 0.3, the same images as 0.35 on probabilities
    halfway = (np.log(0.4 / 0.6) + np.log(0.3 / 0.7)) / 2
    assert list(chosen) == ["infected"] and chosen["infected"] == pytest.approx(halfway)
    assert untuned == []
    tuned = compute_metrics(BINARY, TRUTH, logits_of(PROB), chosen)
    assert tuned["f1"] == pytest.approx(0.8) and tuned["confusion"] == [[4, 2], [0, 4]]
    assert compute_metrics(BINARY, TRUTH, logits_of(PROB))["f1"] == pytest.approx(0.75)
    half = bootstrap_intervals(BINARY, TRUTH, logits_of(PROB), resamples=300)
    moved = bootstrap_intervals(BINARY, TRUTH, logits_of(PROB), resamples=300,
                                threshold_logits=chosen)
    assert half["auroc"] == moved["auroc"] and half["f1"] != moved["f1"]

    # Part 2: covid has one class only here, so it keeps 0.5 and says so
    truth = np.array([[0, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]])
    logits = np.array([[-3, 0.2, -1], [-3, 0.1, 0.1], [-3, 0.4, -2], [-3, -1.0, -0.2]])
    chosen, untuned = tune_thresholds(MULTILABEL, truth, logits)
    assert untuned == ["covid"] and chosen["covid"] == 0.0  # log-odds of 0.5
    assert compute_metrics(MULTILABEL, truth, logits, chosen)["accuracy"] == 1.0
    assert compute_metrics(MULTILABEL, truth, logits)["accuracy"] == 0.5


# --- logits where a probability saturates (issue 20) --------------------------------------
# A probability rounds to exactly 0 below about -745 log-odds and to 1 above about +37
# (the old tanh sigmoid gave 0 already below about -37): figures must come from the
# log-odds themselves.

def binary_logits(scores) -> np.ndarray:
    """Binary logits (normal 0, infected ``scores``): their log-odds are ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.stack([np.zeros(len(scores)), scores], axis=1)


def saturated_split(seed: int, n: int = 40, low: float = -383.0, high: float = -135.0):
    """Targets and infected log-odds between ``low`` and ``high``, the positives ranked
    higher on the whole (AUROC about 0.8), as a trained model's selection split gave."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % 3 == 0  # a third positive
    scores = np.clip((low + high) / 2 + (high - low) * (0.18 * truth + rng.normal(0, 0.15, n)),
                     low, high)
    return truth.astype(int), scores


@pytest.mark.parametrize("seed", range(3))
def test_auroc_and_ap_rank_logits_far_below_saturation(seed):
    """Logits from -135 to -383 (every probability 0.0 with the old sigmoid): AUROC and
    AP are the rank figures of the log-odds, not 0.5, for both tasks."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth, scores = saturated_split(seed)
    expected = roc_auc_score(truth, scores)
    assert 0.65 < expected < 1.0
    m = compute_metrics(BINARY, truth, binary_logits(scores))
    assert m["auroc"] == pytest.approx(expected) and m["auroc"] != 0.5
    assert m["ap"] == pytest.approx(average_precision_score(truth, scores))
    # Part 2, each label its own logit, far past either end (+-40 .. +-400)
    labels = np.stack([truth, 1 - truth, truth], axis=1)
    logits = np.stack([scores, -scores, scores + 520.0], axis=1)  # 135..383 for the last two
    ml = compute_metrics(MULTILABEL, labels, logits)
    assert [ml[f"auroc_{n}"] for n in NAMES] == pytest.approx([expected] * 3)


def test_sensitivity_rule_keeps_a_positive_scored_past_saturation():
    """Infected log-odds 3, 1, -40 (positives) and -2, -3, -1.5: sensitivity 1.0 must
    call the -40 one positive too (the old rule put the threshold at probability 0.0
    and so called it negative: recall 2/3)."""
    from covid_tune.core.metrics import tune_thresholds, tuned_threshold

    truth = np.array([1, 1, 1, 0, 0, 0])
    logits = binary_logits([3, 1, -40, -2, -3, -1.5])
    chosen, untuned = tune_thresholds(BINARY, truth, logits, "sensitivity", 1.0)
    assert untuned == [] and chosen["infected"] < -40
    assert chosen["infected"] == pytest.approx(-40.5)  # halfway to 1 under the lowest score
    m = compute_metrics(BINARY, truth, logits, chosen)
    assert m["recall"] == 1.0 and m["confusion"] == [[0, 3], [0, 3]]
    # the same far below any float's reach of -1: still strictly under the lowest score
    assert tuned_threshold(truth.astype(bool), np.array([3, 1, -1e20, -2, -3, -1.5]),
                           "sensitivity", 1.0) < -1e20


@pytest.mark.parametrize(("low", "high"), [(-383.0, -135.0), (-400.0, -40.0), (40.0, 400.0)])
@pytest.mark.parametrize("seed", range(3))
def test_f1_and_youden_rules_on_saturated_logits_call_positives_positive(seed, low, high):
    """Where every probability is 0 (or 1), the F1 rule still picks a cut between two
    distinct log-odds that calls positives positive, and it is the best F1 of all cuts."""
    from covid_tune.core.metrics import tune_thresholds

    truth, scores = saturated_split(seed, low=low, high=high)
    logits = binary_logits(scores)
    for rule in ("f1", "youden"):
        chosen, _ = tune_thresholds(BINARY, truth, logits, rule)
        m = compute_metrics(BINARY, truth, logits, chosen)
        (_, fp), (fn, tp) = m["confusion"]
        assert tp > 0 and m["f1"] > 0, rule
        assert scores.min() - 1 < chosen["infected"] < scores.max(), rule
    cuts = np.unique(np.concatenate([[low - 1, high + 1], scores]))
    best = max(binary_metrics(truth, scores, t)["f1"] for t in (cuts[:-1] + cuts[1:]) / 2)
    assert m["f1"] <= best and compute_metrics(
        BINARY, truth, logits, tune_thresholds(BINARY, truth, logits)[0])["f1"] == best


def test_bootstrap_intervals_and_roc_points_on_saturated_logits():
    """Intervals and the ROC curve rank the log-odds: not the point (0.5, 0.5) of a
    curve that is only its two corners, as saturated probabilities gave."""
    from covid_tune.core.metrics import bootstrap_intervals, roc_points, tune_thresholds

    truth, scores = saturated_split(0, n=90, low=-400.0, high=-40.0)
    logits = binary_logits(scores)
    chosen, _ = tune_thresholds(BINARY, truth, logits)
    point = compute_metrics(BINARY, truth, logits, chosen)
    intervals = bootstrap_intervals(BINARY, truth, logits, resamples=300,
                                    threshold_logits=chosen)
    for name in ("accuracy", "f1", "auroc"):
        low, high = intervals[name]
        assert low < point[name] < high and high - low < 0.5, name
    assert intervals["auroc"][0] > 0.5
    fpr, tpr = roc_points(BINARY, truth, logits)
    assert len(fpr) > 4 and 0 < np.trapezoid(tpr, fpr) == pytest.approx(point["auroc"])
    ml = np.stack([scores, scores + 440.0, -scores], axis=1)  # -400..-40, 40..400, 40..400
    labels = np.stack([truth, truth, 1 - truth], axis=1)
    ml_ci = bootstrap_intervals(MULTILABEL, labels, ml, resamples=300)
    assert ml_ci["auroc"][0] > 0.5 and ml_ci["auroc"][0] < ml_ci["auroc"][1]


def test_tiny_splits_skewed_classes_and_ties_on_the_logit_scale():
    from covid_tune.core.metrics import tuned_threshold

    # two images, one of each class, both far past saturation: split between them
    tiny = np.array([True, False])
    for rule in ("f1", "youden"):
        assert tuned_threshold(tiny, np.array([-200.0, -300.0]), rule) == -250.0
    assert tuned_threshold(tiny, np.array([400.0, 300.0]), "sensitivity", 1.0) == 350.0
    # adjacent floats are two scores: the threshold parts them (halfway would round onto one)
    close = np.array([-300.0, np.nextafter(-300.0, -np.inf)])  # the midpoint rounds to -300
    t = tuned_threshold(tiny, close, "f1")
    assert close[1] <= t < close[0]
    assert binary_metrics(tiny.astype(int), close, t)["accuracy"] == 1.0
    # one positive in 60, ranked top among deep negative log-odds: only it is called
    skewed = np.zeros(60, bool)
    skewed[7] = True
    scores = -np.linspace(100, 400, 60)
    scores[7] = -90.0
    t = tuned_threshold(skewed, scores, "f1")
    assert scores[0] < t < -90.0
    assert binary_metrics(skewed.astype(int), scores, t)["f1"] == 1.0
    # a tie between classes is never split; with nothing to gain the higher cut wins
    tie = np.array([True, False, True, False])
    t = tuned_threshold(tie, np.array([-50.0, -50.0, -60.0, -70.0]), "f1")
    assert t == -65.0  # calls both -50s and the -60 positive: F1 0.8
    assert tuned_threshold(tie, np.array([-50.0, -50.0, -50.0, -50.0]), "youden") == -49.5


def test_the_ece_interval_holds_its_estimate_on_a_small_well_calibrated_split():
    """On 40 calibrated images a resample's binned ECE is larger than the split's own
    (repeated images fill the bins unevenly): the plain percentile interval lies wholly
    above the estimate here (0.124 against [0.127, 0.280]; 0.007 against [0.021, 0.211]
    on a demo row). Moved by the median bias, it holds it."""
    from covid_tune.core import metrics
    from covid_tune.core.calibration import ece, probabilities

    rng = np.random.default_rng(10)
    log_odds = rng.normal(0, 1.5, 40)
    truth = (rng.random(40) < 1 / (1 + np.exp(-log_odds))).astype(int)  # 16 positives
    logits = np.stack([np.zeros(40), log_odds], axis=1)
    point = calibration(BINARY, truth, logits)["ece"]
    resampled = metrics.bootstrap_intervals(BINARY, truth, logits, seed=0)["ece"]
    assert 0.0 <= resampled[0] <= point <= resampled[1]
    plain = metrics._percentiles  # the same resamples, not moved: above the estimate
    rows = metrics._resamples(40, None, metrics.RESAMPLES, np.random.default_rng(0))
    values = log_odds[:, None]
    spread = ece(truth[:, None][rows].astype(bool), probabilities(values[rows]))
    assert point < plain(spread, 2.5)[0]
