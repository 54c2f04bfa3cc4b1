"""Which of two metric values is better in a space's ``mode``: the one comparison every
"best so far" uses (the best trial and checkpoint, the status line, TensorBoard's best
epoch, the searcher's worst value, the sweep's summary).

- ``mode: max``: higher is better; ``mode: min``: lower is better.
- NaN (a diverged or undefined metric), or anything that is not a number, is never
  better than a number, and every number, ``inf`` and ``-inf`` included, is better than
  NaN. Two NaNs tie.
- A tie is not better: what came first keeps its place (the earlier epoch, the first
  trial to reach a value).
"""

from __future__ import annotations

import math


def rank_key(value, mode: str) -> tuple[int, float]:
    """A key to maximise (``max(..., key=...)``): a number before NaN, then by ``mode``."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return (0, 0.0)
    return (1, value if mode == "max" else -value)


def better(a, b, mode: str) -> bool:
    """Whether ``a`` is strictly better than ``b`` in ``mode`` (``max`` or ``min``); NaN
    is never better than a number, and a tie is not better."""
    return rank_key(a, mode) > rank_key(b, mode)
