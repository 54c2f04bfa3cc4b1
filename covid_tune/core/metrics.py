"""Accuracy, F1 and confusion matrices from model outputs, in plain numpy.

What the tables' "Accuracy/F1" column means here:

- binary (Part 1): ``accuracy`` is the fraction of images classified right;
  ``f1`` is the F1 of the positive class, **infected** (index 1), not of normal.
- multilabel (Part 2): ``accuracy`` is exact-match accuracy (all three label bits
  right); ``f1`` is the macro F1, the unweighted mean of the per-label F1 of
  covid, normal and pneumonia.

**Everything here works on the log-odds scale, never on probabilities.** A label's
score is its log-odds: binary, ``logit_infected - logit_normal`` (the log-odds of
softmax's P(infected)); multilabel, each label's own logit (``log_odds``). A probability
saturates to exactly 0 or 1 in float64 beyond about -745 and +37 log-odds, and a
trained network's logits go there: two images with different logits would tie, AUROC
would fall to 0.5 and a tuned threshold could land on 0.0 and call nothing positive.
Log-odds keep every distinct logit apart, and since the sigmoid is increasing,
"probability > threshold" is exactly "score > the threshold's log-odds".

``auroc`` (area under the ROC curve) and ``ap`` (average precision, the area under the
precision-recall curve) rank the scores without a threshold: binary, of the infected
class; multilabel, the macro mean over the labels, with ``auroc_<label>`` and
``ap_<label>`` beside it. They are NaN where undefined (a split with one class only).
They come from scikit-learn, the implementation the papers in this field use, and it
keeps this module free of torch (the leaderboard re-scores without it).

A prediction is positive when its score is strictly above the label's threshold, given
as log-odds (``threshold_logits``, label -> log-odds): 0, that is probability 0.5,
unless tuned (``tune_thresholds``: per label, on the split that chooses, by the space's
``threshold`` rule); at 0 a binary tie goes to normal, as ``argmax`` would. Checkpoints
and ``model.json`` keep the same thresholds as probabilities too, for people to read.
Every value returned is a python ``float`` or ``int`` (or nested lists/dicts of them),
ready for ``ray.tune.report`` and JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from covid_tune.core import calibration as calibration_module
from covid_tune.core.tasks import POSITIVE_CLASS, Task


def binary_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float = 0.0) -> dict:
    """Accuracy, and F1/precision/recall with **infected = 1 as the positive class**.

    ``targets``: (N,) 0 = normal, 1 = infected. ``scores``: (N,) the log-odds of
    infected, positive where above ``threshold`` (log-odds too; 0 is P = 0.5). Any
    increasing scale works if ``threshold`` is on it (probabilities with 0.5, say).
    ``confusion`` is ``[[tn, fp], [fn, tp]]``: rows true normal/infected, columns
    predicted normal/infected. F1, precision and recall are 0.0 when undefined.
    """
    truth = _bits(targets, ndim=1)
    scores = np.asarray(scores, dtype=np.float64).reshape(truth.shape)
    predicted = scores > threshold
    confusion = _confusion(truth, predicted)
    (tn, fp), (fn, tp) = confusion
    return {
        "accuracy": float(np.mean(truth == predicted)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "auroc": auroc(truth, scores),
        "ap": average_precision(truth, scores),
        "confusion": confusion,
    }


def auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of one label; NaN when ``truth`` holds one class only."""
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, scores))


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one label; NaN when ``truth`` has no positive."""
    if not truth.any():
        return math.nan
    return float(average_precision_score(truth, scores))


def macro(values: list[float]) -> float:
    """The mean over every label; NaN when any label's value is undefined (a label with
    one class only on the split), so a macro figure always averages the same labels and
    stays comparable across splits. ``undefined_labels`` names the culprits."""
    return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


def decide(values: np.ndarray, limits: float | np.ndarray,
           implied: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Decisions from (..., K) log-odds: above the label's threshold, then each
    (label, implied label) column pair applied (COVID-19 predicted -> pneumonia too)."""
    predicted = np.asarray(values) > limits
    for source, target in implied:
        predicted[..., target] |= predicted[..., source]
    return predicted


def _pairs(label_names: Sequence[str], implies: Sequence[tuple[str, str]]
           ) -> list[tuple[int, int]]:
    index = {name: k for k, name in enumerate(label_names)}
    return [(index[a], index[b]) for a, b in implies if a in index and b in index]


def undefined_labels(task: Task, targets: np.ndarray) -> list[str]:
    """The labels whose AUROC is undefined on this split (one class only): the reason a
    macro AUROC is NaN."""
    truth = _bits(targets, ndim=2) if task.multilabel else _bits(targets, ndim=1)[:, None]
    return [label for k, label in enumerate(threshold_labels(task))
            if truth[:, k].all() or not truth[:, k].any()]


def multilabel_metrics(
    targets: np.ndarray, scores: np.ndarray, label_names: Sequence[str],
    threshold: float | np.ndarray = 0.0, implies: Sequence[tuple[str, str]] = ()
) -> dict:
    """Exact-match accuracy, Hamming loss, macro and per-sample F1, per-label F1 and confusion.

    ``targets``, ``scores``: (N, K) in the order of ``label_names``, the scores each
    label's log-odds (its logit); ``threshold``, log-odds too, one for every label or
    (K,) in that order; ``implies``, (label, implied label) pairs applied to the
    decisions (``decide``). ``f1`` is the macro F1. In ``samples_f1`` a sample with no
    true and no predicted label scores 1.0. ``auroc`` and ``ap`` are the means over
    **every** label, NaN when any label's is undefined (``macro``).
    """
    truth = _bits(targets, ndim=2)
    if truth.shape[1] != len(label_names):
        raise ValueError(f"{truth.shape[1]} label columns but {len(label_names)} label names")
    scores = np.asarray(scores, dtype=np.float64).reshape(truth.shape)
    predicted = decide(scores, threshold, _pairs(label_names, implies))
    confusions = {name: _confusion(truth[:, k], predicted[:, k]) for k, name in enumerate(label_names)}
    label_f1 = {name: _f1(c) for name, c in confusions.items()}
    macro_f1 = float(np.mean(list(label_f1.values())))
    label_auroc = {name: auroc(truth[:, k], scores[:, k]) for k, name in enumerate(label_names)}
    label_ap = {name: average_precision(truth[:, k], scores[:, k])
                for k, name in enumerate(label_names)}
    return {
        "accuracy": float(np.mean(np.all(truth == predicted, axis=1))),
        "hamming_loss": float(np.mean(truth != predicted)),
        "macro_f1": macro_f1,
        "samples_f1": _samples_f1(truth, predicted),
        "f1": macro_f1,
        **{f"f1_{name}": value for name, value in label_f1.items()},
        "auroc": macro(list(label_auroc.values())),
        "ap": macro(list(label_ap.values())),
        **{f"auroc_{name}": value for name, value in label_auroc.items()},
        **{f"ap_{name}": value for name, value in label_ap.items()},
        "confusion": confusions,
    }


def compute_metrics(task: Task, targets: np.ndarray, outputs: np.ndarray,
                    threshold_logits: dict[str, float] | None = None) -> dict:
    """Metrics of ``task`` from raw logits: binary (N, 2) or multilabel (N, K): the
    names ``task.metrics`` declares (all but ``loss``, which training adds), and
    ``confusion``.

    Binary targets are class indices, (N,) or (N, 1); multilabel targets are (N, K) bits.
    ``threshold_logits`` maps labels (binary: ``infected``) to their decision threshold
    as log-odds; a label it does not name is decided at 0 (probability 0.5).
    """
    limits = threshold_array(task, threshold_logits)
    return _SCORERS[task.name](task, targets, log_odds(task, outputs), limits)


SCORE_BOUND = 1e300
"""Where ``log_odds`` holds an infinite logit: past any finite float32 logit."""


def log_odds(task: Task, outputs: np.ndarray) -> np.ndarray:
    """(N, K) log-odds from raw logits, K = 1 for binary: ``logit_infected -
    logit_normal``, the log-odds of softmax's P(infected); multilabel, the logits.

    Exact, so distinct logits stay distinct. An infinite one (a diverged trial) is
    held at +-1e300, far beyond any finite float32 logit, so thresholds stay finite and
    scikit-learn, which refuses infinities, can still rank it.
    """
    logits = np.asarray(outputs, dtype=np.float64)
    values = logits if task.multilabel else (logits[:, 1] - logits[:, 0])[:, None]
    return np.clip(values, -SCORE_BOUND, SCORE_BOUND)


def threshold_labels(task: Task) -> tuple[str, ...]:
    """The labels that have a threshold: each label (multilabel), or ``infected``."""
    return task.label_names if task.multilabel else (POSITIVE_CLASS,)


def threshold_array(task: Task, threshold_logits: dict[str, float] | None) -> np.ndarray:
    """(K,) thresholds as log-odds in the order of ``threshold_labels``; 0 (probability
    0.5) where not given."""
    given = threshold_logits or {}
    return np.array([float(given.get(label, 0.0)) for label in threshold_labels(task)])


def _score_binary(task: Task, targets: np.ndarray, values: np.ndarray,
                  limits: np.ndarray) -> dict:
    return binary_metrics(targets, values[:, 0], float(limits[0]))


def _score_multilabel(task: Task, targets: np.ndarray, values: np.ndarray,
                      limits: np.ndarray) -> dict:
    return multilabel_metrics(targets, values, task.label_names, limits, task.implies)


_SCORERS: dict[str, Callable[[Task, np.ndarray, np.ndarray, np.ndarray], dict]] = {
    "binary": _score_binary,
    "multilabel": _score_multilabel,
}


def _bits(targets: np.ndarray, ndim: int) -> np.ndarray:
    """Targets as a bool array of ``ndim`` dimensions; 0/1 values only, at least one row."""
    array = np.asarray(targets)
    if ndim == 1:
        array = array.reshape(-1)
    if array.ndim != ndim or len(array) == 0:
        raise ValueError(f"expected non-empty {ndim}-d targets, got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("targets must be 0 or 1")
    return array.astype(bool)


def _confusion(truth: np.ndarray, predicted: np.ndarray) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]`` as python ints."""
    counts = np.bincount(2 * truth.astype(int) + predicted.astype(int), minlength=4)
    return [[int(counts[0]), int(counts[1])], [int(counts[2]), int(counts[3])]]


def _f1(confusion: list[list[int]]) -> float:
    (_, fp), (fn, tp) = confusion
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else 0.0


def _samples_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    tp = np.sum(truth & predicted, axis=1)
    wrong = np.sum(truth != predicted, axis=1)
    denominator = 2 * tp + wrong
    scores = np.divide(2 * tp, denominator, out=np.ones(len(tp)), where=denominator > 0)
    return float(np.mean(scores))


# --- intervals and curves (the leaderboard's re-scoring) ---------------------------------

INTERVAL_METRICS = ("accuracy", "f1", "auroc", "ece", "brier")
RESAMPLES = 1000
MIN_PER_CLASS = 10
"""Intervals are left out when a label has fewer positive or negative images than this
on the split: a resample of so few gives an interval that looks exact and is not."""


def interval_note(task: Task, targets: np.ndarray) -> str | None:
    """Why a split gets no intervals (a label with fewer than ``MIN_PER_CLASS`` positive
    or negative images), or None when it gets them."""
    truth = _bits(targets, ndim=2) if task.multilabel else _bits(targets, ndim=1)[:, None]
    for k, label in enumerate(threshold_labels(task)):
        positives = int(truth[:, k].sum())
        negatives = len(truth) - positives
        if min(positives, negatives) < MIN_PER_CLASS:
            which = "positive" if positives < negatives else "negative"
            return (f"no intervals: {min(positives, negatives)} {which} image(s) of "
                    f"{label}, fewer than {MIN_PER_CLASS}")
    return None


def bootstrap_intervals(task: Task, targets: np.ndarray, outputs: np.ndarray,
                        resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95,
                        threshold_logits: dict[str, float] | None = None,
                        temperatures: dict[str, float] | None = None,
                        groups: Sequence | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy, F1 (at ``threshold_logits``, as
    ``compute_metrics``), AUROC, ECE and Brier score (after ``temperatures``, when
    given), from raw logits (ranked as log-odds, ``log_odds``).

    A plain bootstrap: each resample draws as many images as the split has, with
    replacement, so class counts vary as they would in another sample of the same
    population. With ``groups`` (one key per image: its patient), whole groups are
    drawn instead (a cluster bootstrap), since a patient's images are not independent.
    A resample in which a label has one class only has no AUROC and is left out of the
    AUROC interval. The ECE interval is moved by the resamples' median bias
    (``_recentred``). Seeded: the same split and outputs give the same interval. Every
    resample is scored at once, in numpy; AUROC is the Mann-Whitney rank form of the
    area scikit-learn computes. The caller leaves intervals out where
    ``interval_note`` says so.
    """
    truth, values = _truth_and_log_odds(task, targets, outputs)
    index = _resamples(len(truth), groups, resamples, np.random.default_rng(seed))
    picked, picked_values = truth[index], values[index]  # (B, N, K)
    predicted = decide(picked_values, threshold_array(task, threshold_logits),
                       _pairs(task.label_names, task.implies))
    if task.multilabel:
        accuracy = np.all(picked == predicted, axis=2).mean(axis=1)
    else:
        accuracy = (picked == predicted)[:, :, 0].mean(axis=1)
    tp = np.sum(picked & predicted, axis=1)
    wrong = np.sum(picked != predicted, axis=1)
    f1 = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(tp.shape), where=(2 * tp + wrong) > 0)
    auroc_ = np.stack([_rank_auroc(picked[:, :, k], picked_values[:, :, k])
                       for k in range(truth.shape[1])], axis=1)
    probs = calibration_module.probabilities(picked_values, temperature_array(task, temperatures))
    with np.errstate(all="ignore"):
        figures = {"accuracy": accuracy, "f1": f1.mean(axis=1),
                   "auroc": auroc_.mean(axis=1),
                   "ece": calibration_module.ece(picked, probs),
                   "brier": calibration_module.brier(picked, probs)}
    tail = 100 * (1 - level) / 2
    found = {name: _percentiles(resampled, tail) for name, resampled in figures.items()}
    point = calibration_module.ece(truth, calibration_module.probabilities(
        values, temperature_array(task, temperatures)))
    found["ece"] = _recentred(found["ece"], figures["ece"], float(point))
    return found


def _recentred(interval: tuple[float, float], resampled: np.ndarray,
               point: float) -> tuple[float, float]:
    """A percentile interval moved by the resamples' median bias: a binned ECE is
    larger on a resample than on the split (repeated images fill the bins unevenly),
    so the plain interval can lie wholly above the estimate. Clipped at 0."""
    bias = float(np.median(resampled)) - point
    return max(interval[0] - bias, 0.0), max(interval[1] - bias, 0.0)


def _resamples(count: int, groups: Sequence | None, resamples: int, rng) -> np.ndarray:
    """(resamples, count) row indices: images drawn with replacement, or, with
    ``groups``, whole groups drawn with replacement until ``count`` images are taken
    (the last group cut short) so every resample has the split's size."""
    if groups is None:
        return rng.integers(0, count, (resamples, count))
    _, group = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(group == g) for g in range(group.max() + 1)]
    rows = np.empty((resamples, count), dtype=np.int64)
    for b in range(resamples):
        order = rng.integers(0, len(members), count)  # never more groups than images
        rows[b] = np.concatenate([members[g] for g in order])[:count]
    return rows


def temperature_array(task: Task, temperatures: dict[str, float] | None) -> np.ndarray | None:
    """(K,) temperatures in the order of ``threshold_labels`` (1 where not given), or
    None when there are none."""
    if not temperatures:
        return None
    return np.array([float(temperatures.get(label, 1.0)) for label in threshold_labels(task)])


def calibration(task: Task, targets: np.ndarray, outputs: np.ndarray,
                temperatures: dict[str, float] | None = None) -> dict[str, float]:
    """ECE and Brier score of a split (``covid_tune.core.calibration``), after
    ``temperatures`` when given."""
    truth, values = _truth_and_log_odds(task, targets, outputs)
    return calibration_module.calibration(truth, values, temperature_array(task, temperatures))


def reliability(task: Task, targets: np.ndarray, outputs: np.ndarray,
                temperatures: dict[str, float] | None = None) -> list[tuple[float, float, int]]:
    """The reliability diagram's points (``covid_tune.core.calibration.reliability``)."""
    truth, values = _truth_and_log_odds(task, targets, outputs)
    return calibration_module.reliability(truth, values, temperature_array(task, temperatures))


def fit_temperatures(task: Task, targets: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """A temperature per label (``threshold_labels``) fitted on these outputs (the split
    that chooses); 1.0 for a label with one class only there."""
    truth, values = _truth_and_log_odds(task, targets, outputs)
    fitted = {}
    for k, label in enumerate(threshold_labels(task)):
        value = calibration_module.fit_temperature(truth[:, k], values[:, k])
        fitted[label] = 1.0 if value is None else value
    return fitted


def degenerate_labels(task: Task, targets: np.ndarray, outputs: np.ndarray,
                      threshold_logits: dict[str, float] | None) -> dict[str, str]:
    """Labels whose threshold calls every image of this split positive, or none:
    label -> ``all positive`` / ``all negative``. Such a threshold says nothing about
    the image, whatever F1 it reaches."""
    _, values = _truth_and_log_odds(task, targets, outputs)
    predicted = decide(values, threshold_array(task, threshold_logits),
                       _pairs(task.label_names, task.implies))
    flagged = {}
    for k, label in enumerate(threshold_labels(task)):
        if predicted[:, k].all():
            flagged[label] = "all positive"
        elif not predicted[:, k].any():
            flagged[label] = "all negative"
    return flagged


def scorecard(task: Task, targets: np.ndarray, outputs: np.ndarray,
              threshold_logits: dict[str, float] | None = None,
              temperatures: dict[str, float] | None = None, groups: Sequence | None = None,
              intervals: bool = True) -> dict:
    """Everything a reporting split is scored with, from raw logits: ``compute_metrics``
    at ``threshold_logits``, ``at_0.5`` (accuracy and F1 at probability 0.5), the
    calibration before (``calibration``: ECE, Brier) and after the temperatures
    (``calibrated``), ``ci`` (``bootstrap_intervals``, by patient when ``groups`` are
    given) unless ``intervals`` is off (a split that trained or chose) or the split is
    too small (``interval_note``, then in ``notes``), ``undefined`` (labels with one
    class only: macro AUROC is NaN), the ROC curve (``roc``), and the reliability
    diagram's points after scaling (``reliability``) and before (``reliability_raw``)."""
    scores = compute_metrics(task, targets, outputs, threshold_logits)
    half = compute_metrics(task, targets, outputs)
    scores["at_0.5"] = {k: half[k] for k in ("accuracy", "f1")}
    scores["calibration"] = calibration(task, targets, outputs)
    scores["calibrated"] = calibration(task, targets, outputs, temperatures)
    notes, scores["ci"] = [], {}
    undefined = undefined_labels(task, targets)
    if undefined:
        notes.append(f"AUROC undefined for {', '.join(undefined)} (one class only), so "
                     f"the macro AUROC is not given")
    if intervals:
        note = interval_note(task, targets)
        if note:
            notes.append(note)
        else:
            scores["ci"] = bootstrap_intervals(task, targets, outputs,
                                               threshold_logits=threshold_logits,
                                               temperatures=temperatures, groups=groups)
    scores["undefined"] = undefined
    scores["notes"] = notes
    scores["roc"] = roc_points(task, targets, outputs)
    scores["reliability"] = reliability(task, targets, outputs, temperatures)
    scores["reliability_raw"] = reliability(task, targets, outputs)
    return scores


def roc_points(task: Task, targets: np.ndarray, outputs: np.ndarray
               ) -> tuple[list[float], list[float]] | None:
    """(false positive rates, true positive rates) of the ROC curve: binary, of the
    infected class; multilabel, every label bit pooled (micro average). None when
    the split holds one class only."""
    truth, values = _truth_and_log_odds(task, targets, outputs)
    truth, values = truth.ravel(), values.ravel()
    if truth.all() or not truth.any():
        return None
    fpr, tpr, _ = roc_curve(truth, values)
    return fpr.tolist(), tpr.tolist()


def _truth_and_log_odds(task: Task, targets: np.ndarray, outputs: np.ndarray):
    """(N, K) bool truth and (N, K) log-odds (``log_odds``), K = 1 for binary (infected)."""
    truth = _bits(targets, ndim=2) if task.multilabel else _bits(targets, ndim=1)[:, None]
    return truth, log_odds(task, outputs)


def _rank_auroc(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row (B, N): (sum of positives' ranks - P(P+1)/2) / (P * Q), ties
    ranked as their mean; NaN for a row with one class only."""
    ranks = rankdata(scores, axis=1)
    positives = truth.sum(axis=1)
    negatives = truth.shape[1] - positives
    rank_sum = np.where(truth, ranks, 0).sum(axis=1)
    with np.errstate(all="ignore"):
        area = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), area, np.nan)


def _percentiles(values: np.ndarray, tail: float) -> tuple[float, float]:
    defined = values[~np.isnan(values)]
    if not len(defined):
        return math.nan, math.nan
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


# --- tuned thresholds ---------------------------------------------------------------------

def tune_thresholds(task: Task, targets: np.ndarray, outputs: np.ndarray, rule: str = "f1",
                    target: float | None = None) -> tuple[dict[str, float], list[str]]:
    """Each label's decision threshold as log-odds, by ``rule`` on these outputs (the
    split that chooses), and the labels left at 0 (probability 0.5) because the split
    has no positive or no negative of them.

    ``youden`` (the default) maximises sensitivity + specificity - 1; ``f1`` maximises
    the label's F1 among thresholds that call some image negative (the guard: calling
    every image positive often has the best F1 at a high prevalence, and says nothing);
    ``sensitivity`` takes the highest threshold whose sensitivity reaches ``target``,
    which is the best specificity at that sensitivity. Ties go to the higher threshold.
    Why Youden by default: ``covid_tune.bench.statistics`` and ``docs/results.md``.
    """
    truth, values = _truth_and_log_odds(task, targets, outputs)
    chosen, untuned = {}, []
    for k, label in enumerate(threshold_labels(task)):
        value = tuned_threshold(truth[:, k], values[:, k], rule, target)
        if value is None:
            untuned.append(label)
        chosen[label] = 0.0 if value is None else value
    return chosen, untuned


def tuned_threshold(truth: np.ndarray, scores: np.ndarray, rule: str,
                    target: float | None = None) -> float | None:
    """One label's threshold by ``rule``, on the scale of ``scores`` (log-odds); None
    when ``truth`` holds one class only.

    scikit-learn's ROC curve lists every distinct score as a cut (positive when score
    >= cut), after a first cut that calls nothing positive. Since a prediction here is
    positive when its score is *above* the threshold, the threshold returned lies
    halfway between the chosen cut and the next lower score, so exactly the same images
    are positive. Below the lowest score that is 0.5 under it (every image positive);
    the nothing-positive cut is 0.5 over the highest score. Where floats are too
    coarse for halfway, the threshold is the float just under the cut.
    """
    if truth.all() or not truth.any():
        return None
    fpr, tpr, cuts = roc_curve(truth, scores, drop_intermediate=False)
    positives, negatives = truth.sum(), len(truth) - truth.sum()
    tp, fp = tpr * positives, fpr * negatives
    if rule == "f1":
        merit = 2 * tp / (positives + tp + fp)  # 2TP / (2TP + FP + FN)
        merit = np.where(fp < negatives, merit, -np.inf)  # not every image positive
    elif rule == "youden":
        merit = tpr - fpr
    elif rule == "sensitivity":
        merit = np.where(tpr >= target - 1e-12, -fpr, -np.inf)
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    best = int(np.argmax(merit))
    if best == 0:  # nothing positive: above the highest score
        highest = float(cuts[1])
        return _between(highest, max(highest + 1.0, float(np.nextafter(highest, np.inf))))
    upper = float(cuts[best])
    if best + 1 < len(cuts):
        return _between(float(cuts[best + 1]), upper)
    return _between(min(upper - 1.0, float(np.nextafter(upper, -np.inf))), upper)


def _between(low: float, high: float) -> float:
    """Halfway from ``low`` to ``high`` (``low < high``), as a float ``t`` with
    ``low <= t < high``: a score is above ``t`` exactly when it is ``high`` or more."""
    return max(low, min(low / 2 + high / 2, float(np.nextafter(high, -np.inf))))
