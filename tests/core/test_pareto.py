"""The Pareto front of (metric, cost) points and the pick rules, on hand-made points."""

from __future__ import annotations

import math

import pytest

from covid_tune.core.pareto import Point, dominates, front, pick, resolve


def ids(points: list[Point]) -> list[str]:
    return [p.id for p in points]


# accuracy (max) against latency in ms: c is dominated by b (worse and slower)
POINTS = [Point("a", 0.95, 40.0), Point("b", 0.90, 10.0), Point("c", 0.85, 12.0),
          Point("d", 0.80, 2.0), Point("e", 0.93, 20.0)]


def test_the_front_keeps_what_nothing_beats_on_both_axes_cheapest_first():
    assert ids(front(POINTS, "max")) == ["d", "b", "e", "a"]


def test_dominance_needs_one_strict_gain():
    a, same, slower = Point("a", 0.9, 10.0), Point("s", 0.9, 10.0), Point("x", 0.9, 11.0)
    assert dominates(a, slower, "max") and not dominates(slower, a, "max")
    assert not dominates(a, same, "max") and not dominates(same, a, "max")


def test_equal_points_are_all_on_the_front_and_ties_pick_the_first_given():
    points = [Point("x", 0.9, 10.0), Point("y", 0.9, 10.0), Point("z", 0.8, 10.0)]
    assert ids(front(points, "max")) == ["x", "y"]
    assert pick(points, "max", "best").id == "x"
    assert pick(points, "max", "cheapest").id == "x"


def test_a_tie_on_one_axis_is_settled_by_the_other():
    same_metric = [Point("slow", 0.9, 30.0), Point("fast", 0.9, 10.0)]
    same_cost = [Point("worse", 0.7, 10.0), Point("better", 0.9, 10.0)]
    assert ids(front(same_metric, "max")) == ["fast"]
    assert ids(front(same_cost, "max")) == ["better"]
    assert pick(same_metric, "max", "best").id == "fast"  # ties to the lower cost
    assert pick(same_cost, "max", "cheapest").id == "better"


def test_nan_and_missing_values_are_on_no_front_and_never_picked():
    points = [Point("ok", 0.8, 10.0), Point("nan-metric", math.nan, 1.0),
              Point("no-cost", 0.99, None), Point("inf-cost", 0.99, math.inf),
              Point("nan-cost", 0.99, math.nan)]
    assert ids(front(points, "max")) == ["ok"]
    for rule in ("best", "cheapest"):
        assert pick(points, "max", rule).id == "ok"
    with pytest.raises(ValueError, match="both a metric and a cost"):
        pick(points[1:], "max", "best")


def test_a_metric_to_minimise_turns_the_front_around():
    losses = [Point("a", 0.20, 40.0), Point("b", 0.30, 10.0), Point("c", 0.35, 12.0),
              Point("d", 0.50, 2.0)]
    assert ids(front(losses, "min")) == ["d", "b", "a"]
    assert pick(losses, "min", "best").id == "a"
    assert pick(losses, "min", "cheapest").id == "d"
    # within the best's interval means at most its high end for a loss
    assert pick(losses, "min", "cheapest-within-interval", (0.15, 0.30)).id == "b"
    assert pick(losses, "min", "cheapest-within-interval", (0.15, 0.29)).id == "a"


def test_cheapest_within_the_best_points_interval():
    assert pick(POINTS, "max", "best").id == "a"
    assert pick(POINTS, "max", "cheapest").id == "d"
    # b (0.90) is as good as a (0.95) within [0.89, 0.99], and cheaper than e
    assert pick(POINTS, "max", "cheapest-within-interval", (0.89, 0.99)).id == "b"
    assert pick(POINTS, "max", "cheapest-within-interval", (0.91, 0.99)).id == "e"
    # an interval that leaves out the best point itself still picks it
    assert pick(POINTS, "max", "cheapest-within-interval", (0.96, 0.99)).id == "a"
    # a dominated point (c) is never picked, even inside the interval
    assert pick(POINTS, "max", "cheapest-within-interval", (0.0, 1.0)).id == "d"
    with pytest.raises(ValueError, match="interval"):
        pick(POINTS, "max", "cheapest-within-interval")


def test_a_single_point_is_the_front_and_every_pick():
    one = [Point("only", 0.7, 5.0)]
    assert ids(front(one, "max")) == ["only"]
    for rule, interval in (("best", None), ("cheapest", None),
                           ("cheapest-within-interval", (0.9, 0.95))):
        assert pick(one, "max", rule, interval).id == "only"


def test_rule_names_and_the_fastest_alias():
    assert resolve("fastest", "params") == ("cheapest", "latency_ms")
    assert resolve("cheapest", "params") == ("cheapest", "params")
    with pytest.raises(ValueError, match="unknown pick rule 'quickest'"):
        resolve("quickest")
