"""The Pareto front of trials scored on a metric and a deploy cost, and the rules that
pick one trial from it (``export --pick``, the leaderboard's Pareto section).

A point is a trial at its best epoch: its metric value (higher is better for ``mode:
max``, lower for ``mode: min``) and one cost (``COSTS`` in ``covid_tune.core.space``:
lower is always better).

- **Dominance.** ``a`` dominates ``b`` when ``a`` is at least as good on both the metric
  and the cost, and strictly better on one of them.
- **The front** is every point no other point dominates. Equal points (the same metric
  and the same cost) do not dominate each other, so all of them are on the front or
  none is; a tie on one axis is settled by the other.
- **Unusable points.** A point whose metric or cost is missing, NaN or infinite is on no
  front and is never picked (``usable``).
- **Ties in a pick** go to the lower cost, then to the point given first.

Pick rules (``RULES``), each on the usable points:

- ``best``: the best metric, ties to the lower cost (always on the front);
- ``cheapest-within-interval``: the cheapest front point whose metric is inside the
  best point's bootstrap interval on the side that matters (``>=`` its low end for
  ``mode: max``, ``<=`` its high end for ``mode: min``): a model the data cannot tell
  from the best, bought cheaper. The best point itself always qualifies;
- ``cheapest``: the cheapest front point (the best metric among the cheapest).

``ALIASES`` name a rule with a cost: ``fastest`` is ``cheapest`` on ``latency_ms``.

Pure Python; nothing here imports torch, Ray or Optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("best", "cheapest-within-interval", "cheapest")
"""The pick rules, from the best metric to the lowest cost."""
ALIASES = {"fastest": ("cheapest", "latency_ms")}
"""Rule names that fix the cost too: name -> (rule, cost)."""


@dataclass(frozen=True)
class Point:
    """One trial on the metric-cost plane."""

    id: str
    """What the caller knows the trial by (``run/trial_id``)."""
    metric: float | None
    """The trial's metric at its best epoch; None or NaN: not scored."""
    cost: float | None
    """Its deploy cost (lower is better); None or NaN: not reported."""


def usable(point: Point) -> bool:
    """Whether the point has a finite metric and a finite cost."""
    return all(isinstance(v, (int, float)) and math.isfinite(v)
               for v in (point.metric, point.cost))


def goodness(point: Point, mode: str) -> float:
    """The metric turned so that higher is better."""
    return point.metric if mode == "max" else -point.metric


def dominates(a: Point, b: Point, mode: str) -> bool:
    """Whether ``a`` is at least as good as ``b`` on both axes and better on one."""
    at_least = goodness(a, mode) >= goodness(b, mode) and a.cost <= b.cost
    return at_least and (goodness(a, mode) > goodness(b, mode) or a.cost < b.cost)


def front(points: list[Point], mode: str) -> list[Point]:
    """The usable points no other point dominates, cheapest first (the given order
    among equal points)."""
    candidates = [p for p in points if usable(p)]
    kept = [p for p in candidates if not any(dominates(q, p, mode) for q in candidates)]
    return sorted(kept, key=lambda p: (p.cost, -goodness(p, mode)))


def best(points: list[Point], mode: str) -> Point:
    """The usable point with the best metric; ties to the lower cost, then the first."""
    candidates = [p for p in points if usable(p)]
    if not candidates:
        raise ValueError("no point has both a metric and a cost")
    return min(candidates, key=lambda p: (-goodness(p, mode), p.cost))


def cheapest(points: list[Point], mode: str) -> Point:
    """The cheapest point of the front (the best metric among equally cheap ones)."""
    found = front(points, mode)
    if not found:
        raise ValueError("no point has both a metric and a cost")
    return found[0]


def within(point: Point, interval: tuple[float, float], mode: str) -> bool:
    """Whether the point's metric is inside ``interval`` on the side that matters:
    ``>=`` its low end for ``max``, ``<=`` its high end for ``min``."""
    low, high = interval
    return point.metric >= low if mode == "max" else point.metric <= high


def cheapest_within(points: list[Point], mode: str,
                    interval: tuple[float, float]) -> Point:
    """The cheapest front point within the best point's ``interval`` (the best point
    when none cheaper is)."""
    top = best(points, mode)
    close = [p for p in front(points, mode) if p is top or within(p, interval, mode)]
    return close[0]


def pick(points: list[Point], mode: str, rule: str,
         interval: tuple[float, float] | None = None) -> Point:
    """The point ``rule`` (one of ``RULES``) chooses; ``interval`` is the best point's
    bootstrap interval, which ``cheapest-within-interval`` needs. ValueError when no
    point is usable, or for an unknown rule."""
    if rule == "best":
        return best(points, mode)
    if rule == "cheapest":
        return cheapest(points, mode)
    if rule == "cheapest-within-interval":
        if interval is None:
            raise ValueError("cheapest-within-interval needs the best point's interval")
        return cheapest_within(points, mode, interval)
    raise ValueError(f"unknown pick rule {rule!r}; use one of {', '.join(RULES)}")


def resolve(name: str, cost: str | None = None) -> tuple[str, str | None]:
    """``(rule, cost)`` for a rule name or an alias (``fastest``: ``cheapest`` on
    ``latency_ms``); the alias's cost replaces ``cost``."""
    if name in ALIASES:
        return ALIASES[name]
    if name not in RULES:
        raise ValueError(f"unknown pick rule {name!r}; use one of "
                         f"{', '.join([*RULES, *ALIASES])}")
    return name, cost
