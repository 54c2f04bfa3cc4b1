"""Simulations behind the leaderboard's statistics: how each threshold rule behaves at
the prevalences chest X-ray collections have, and how often the bootstrap intervals hold
the population's value. ``docs/results.md`` quotes their output; the tests run smaller
versions of them.

Scores come from the binormal model: a negative image's log-odds score is N(0, 1), a
positive's N(d, 1), with d = sqrt(2) * Phi^-1(AUROC), so the population AUROC is known
exactly. A "choosing split" of ``n`` images is drawn, a threshold is tuned on it, and
the threshold is judged on a large sample of the same population.

    python -m covid_tune.bench.statistics
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from covid_tune.core.metrics import bootstrap_intervals, interval_note, tuned_threshold
from covid_tune.core.tasks import BINARY

POPULATION = 200_000


def draw(rng: np.random.Generator, count: int, prevalence: float,
         auroc: float) -> tuple[np.ndarray, np.ndarray]:
    """(truth, log-odds scores) of ``count`` images from the binormal model."""
    truth = rng.random(count) < prevalence
    shift = math.sqrt(2) * norm.ppf(auroc)
    return truth, rng.normal(0.0, 1.0, count) + shift * truth


@dataclass
class RuleOutcome:
    rule: str
    prevalence: float
    auroc: float
    degenerate: float
    """Share of choosing splits on which the threshold called every image positive or
    every image negative."""
    positive_rate: float
    """Mean share of the population called positive."""
    f1: float
    """Mean population F1 at the tuned threshold."""
    accuracy: float


def threshold_rules(rules=("youden", "f1"), prevalences=(0.1, 0.3, 0.5, 0.65),
                    aurocs=(0.65, 0.75, 0.85), size: int = 100, repeats: int = 300,
                    seed: int = 0) -> list[RuleOutcome]:
    """Each rule at each prevalence and AUROC, over ``repeats`` choosing splits."""
    found = []
    for auroc in aurocs:
        for prevalence in prevalences:
            rng = np.random.default_rng(seed)
            truth, scores = draw(rng, POPULATION, prevalence, auroc)
            splits = [draw(rng, size, prevalence, auroc) for _ in range(repeats)]
            for rule in rules:
                found.append(judge_rule(rule, splits, truth, scores, prevalence, auroc))
    return found


def judge_rule(rule: str, splits, truth, scores, prevalence: float,
               auroc: float) -> RuleOutcome:
    degenerate, rates, f1s, accuracies = [], [], [], []
    for split_truth, split_scores in splits:
        cut = tuned_threshold(split_truth, split_scores, rule)
        if cut is None:
            continue
        called = split_scores > cut
        degenerate.append(called.all() or not called.any())
        predicted = scores > cut
        tp = np.sum(predicted & truth)
        wrong = np.sum(predicted != truth)
        rates.append(predicted.mean())
        f1s.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
        accuracies.append(1 - wrong / len(truth))
    return RuleOutcome(rule, prevalence, auroc, float(np.mean(degenerate)),
                       float(np.mean(rates)), float(np.mean(f1s)), float(np.mean(accuracies)))


@dataclass
class Coverage:
    size: int
    prevalence: float
    auroc: float
    shown: int
    """Samples that got intervals (``interval_note`` leaves the others out)."""
    left_out: int
    covered: dict[str, float]
    """Metric -> share of the shown intervals that held the population value."""


def interval_coverage(size: int = 100, prevalence: float = 0.1, auroc: float = 0.85,
                      repeats: int = 200, resamples: int = 1000, seed: int = 0) -> Coverage:
    """How often the 95% bootstrap intervals (``bootstrap_intervals``, at probability 0.5)
    of accuracy, F1 and AUROC hold the population's value, over ``repeats`` samples of
    ``size`` images."""
    rng = np.random.default_rng(seed)
    truth, scores = draw(rng, 2_000_000, prevalence, auroc)
    predicted = scores > 0
    tp = np.sum(predicted & truth)
    truths = {"accuracy": float(np.mean(predicted == truth)),
              "f1": float(2 * tp / (2 * tp + np.sum(predicted != truth))), "auroc": auroc}
    held = {name: [] for name in truths}
    left_out = 0
    for repeat in range(repeats):
        sample_truth, sample_scores = draw(rng, size, prevalence, auroc)
        targets = sample_truth.astype(int)
        if interval_note(BINARY, targets):
            left_out += 1
            continue
        logits = np.stack([np.zeros(size), sample_scores], axis=1)
        intervals = bootstrap_intervals(BINARY, targets, logits, resamples=resamples,
                                        seed=repeat)
        for name, value in truths.items():
            low, high = intervals[name]
            held[name].append(low <= value <= high)
    return Coverage(size, prevalence, auroc, repeats - left_out, left_out,
                    {name: float(np.mean(values)) for name, values in held.items()})


def main() -> None:
    print("Threshold rules: choosing splits of 100 images, 300 each; population 200,000")
    print("| AUROC | prevalence | rule | degenerate | called positive | F1 | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for o in threshold_rules():
        print(f"| {o.auroc:.2f} | {o.prevalence:.2f} | {o.rule} | {o.degenerate:.1%} | "
              f"{o.positive_rate:.2f} | {o.f1:.3f} | {o.accuracy:.3f} |")
    print()
    print("Coverage of 95% intervals (plain bootstrap, 1000 resamples), 400 samples each")
    print("| n | prevalence | AUROC | shown | left out | accuracy | F1 | AUROC |")
    print("|---|---|---|---|---|---|---|---|")
    for size, prevalence in ((100, 0.1), (100, 0.3), (300, 0.1), (1000, 0.1)):
        c = interval_coverage(size, prevalence, repeats=400)
        print(f"| {size} | {prevalence:.2f} | {c.auroc:.2f} | {c.shown} | {c.left_out} | "
              f"{c.covered['accuracy']:.3f} | {c.covered['f1']:.3f} | "
              f"{c.covered['auroc']:.3f} |")


if __name__ == "__main__":
    main()
