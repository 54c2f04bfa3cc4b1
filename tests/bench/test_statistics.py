"""The simulations behind the threshold rule and the intervals (smaller than
``python -m covid_tune.bench.statistics``, whose output docs/results.md quotes)."""

from __future__ import annotations

from covid_tune.bench.statistics import interval_coverage, threshold_rules


def test_the_default_rule_never_calls_a_whole_label_positive_and_tracks_prevalence():
    """Youden (the default) and the guarded F1 rule never make a label all-positive or
    all-negative on the choosing split, at prevalence 0.1 to 0.65 and a weak model; at
    high prevalence Youden calls fewer images positive than F1 does (F1 chases recall),
    and its positive rate moves less with the prevalence than F1's: a threshold
    chosen on one collection's class mix carries to another."""
    outcomes = threshold_rules(prevalences=(0.1, 0.65), aurocs=(0.65, 0.85), repeats=80)
    assert all(o.degenerate == 0.0 for o in outcomes)
    by = {(o.rule, o.prevalence, o.auroc): o for o in outcomes}
    for auroc in (0.65, 0.85):
        assert by["youden", 0.65, auroc].positive_rate < by["f1", 0.65, auroc].positive_rate
    for auroc in (0.65, 0.85):
        spread = {rule: by[rule, 0.65, auroc].positive_rate - by[rule, 0.1, auroc].positive_rate
                  for rule in ("youden", "f1")}
        assert 0 < spread["youden"] < 0.75 * spread["f1"], spread


def test_intervals_cover_at_least_ninety_percent_of_nominal_at_n_100_prevalence_0_1():
    """At n = 100 and prevalence 0.1 the stratified bootstrap of 0.2.0 held the
    population F1 78% of the time; the plain bootstrap must reach 0.9 * 95%. Samples
    with fewer than 10 positives get no interval and are not counted."""
    found = interval_coverage(size=100, prevalence=0.1, repeats=120, resamples=400)
    assert found.shown >= 40 and found.left_out > 0
    for name, covered in found.covered.items():
        assert covered >= 0.9 * 0.95, (name, covered)
