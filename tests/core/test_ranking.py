"""``better``: the one "better in this mode" of the best trial, checkpoint, status line,
TensorBoard's best epoch and the searcher's worst value."""

from __future__ import annotations

import math

import pytest

from covid_tune.core.ranking import better, rank_key

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("a, b, mode, expected", [
    (0.9, 0.8, "max", True), (0.8, 0.9, "max", False),
    (0.2, 0.3, "min", True), (0.3, 0.2, "min", False),
    # NaN is never better than a number, and any number beats NaN, in both modes
    (NAN, 0.5, "max", False), (NAN, 0.5, "min", False),
    (0.5, NAN, "max", True), (0.5, NAN, "min", True),
    (-INF, NAN, "max", True), (INF, NAN, "min", True),
    (NAN, NAN, "max", False), (None, 0.1, "max", False), (0.1, None, "min", True),
    # a tie is not better: what came first keeps its place
    (0.7, 0.7, "max", False), (0.7, 0.7, "min", False), (INF, INF, "max", False),
    # infinities are numbers
    (INF, 1e308, "max", True), (-INF, -1e308, "min", True), (INF, 0.0, "min", False),
])
def test_better(a, b, mode, expected):
    assert better(a, b, mode) is expected


def test_the_best_of_many_by_rank_key_skips_nan_and_keeps_the_first_of_a_tie():
    values = [NAN, 0.4, 0.9, NAN, 0.9, 0.1]
    best = max(range(len(values)), key=lambda i: rank_key(values[i], "max"))
    assert best == 2  # max keeps the first of equal keys
    assert min([0.4, 0.9, 0.1], key=lambda v: rank_key(v, "min")) == 0.9  # the worst
    assert max(values, key=lambda v: rank_key(v, "min")) == 0.1
    assert math.isnan(max([NAN, NAN], key=lambda v: rank_key(v, "max")))
