"""``covid-tune bench``: runs end to end, and counts the search's epochs as documented.

Correctness only. The tiny sizes make every figure meaningless as a speed, so no test
asserts a target.
"""

import json
import math

import pandas as pd
import pytest

from covid_tune.bench.measure import TINY, compare_search, epochs_until, run_bench
from covid_tune.bench.scale import SCALE_TINY

FIGURES = ("loader_speedup", "sweep_overhead", "search_epochs_ratio", "sweep_epoch_seconds",
           "driver_ms_per_trial_20", "checkpoint_write_ratio", "kept_bytes_per_trial_ratio")


def rows(*results):
    """Sweep rows from ``(trial, epoch, second, val_f1)`` tuples."""
    return pd.DataFrame(results, columns=["trial_id", "epoch", "timestamp", "val_f1"])


@pytest.mark.realistic  # eight small sweeps, 40 s: with the benchmarks in make soak
def test_tiny_bench_writes_the_three_figures(ray_cluster, tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = run_bench(json_path=str(path), sizes=TINY, scale_sizes=SCALE_TINY)
    written = json.loads(path.read_text())
    for key in FIGURES:
        value = written[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
        assert value == report[key]
    search = written["search"]
    assert search["grid_trials"] == TINY.grid_rows
    assert search["grid_epochs"] == TINY.grid_rows * TINY.search_epochs  # none stopped early
    assert written["machine"]["cpus"] >= 1
    table = capsys.readouterr().out
    assert "loader images/s" in table and "machine:" in table
    assert "driver ms/completion @20" in table
    kinds = written["loader"]["kinds"]
    assert set(kinds) == {"png", "jpeg"} and all(k["repeats"] == TINY.repeats
                                                   for k in kinds.values())
    assert written["loader_speedup"] == min(k["speedup"] for k in kinds.values())


def test_epochs_are_counted_in_arrival_order_across_parallel_trials():
    search = rows(("a", 1, 10, 0.5), ("b", 1, 11, 0.6), ("a", 2, 12, 0.7), ("b", 2, 13, 0.9))
    assert epochs_until(search, 0.7) == 3
    assert epochs_until(search, 0.55) == 2


def test_epochs_reported_in_the_same_second_as_the_match_count_as_spent():
    search = rows(("a", 1, 10, 0.9), ("b", 1, 10, 0.1), ("c", 1, 11, 0.2))
    assert epochs_until(search, 0.9) == 2


def test_a_search_that_never_matches_reports_a_lower_bound():
    grid = rows(*[(f"g{i}", e, e, 0.8) for i in range(6) for e in (1, 2)])
    search = rows(("a", 1, 5, 0.5), ("b", 1, 6, 0.7))
    figures = compare_search(grid, search)
    assert not figures["matched"]
    assert figures["ratio"] == 2 / 12
    assert figures["grid_best_f1"] == 0.8 and figures["search_best_f1"] == 0.7


def test_best_f1_within_the_grid_budget_ignores_later_epochs():
    grid = rows(("g", 1, 1, 0.6), ("g", 2, 2, 0.7))
    search = rows(("a", 1, 5, 0.5), ("b", 1, 6, 0.7), ("a", 2, 7, 0.95))
    figures = compare_search(grid, search)
    assert figures["matched"] and figures["epochs_to_match"] == 2
    assert figures["search_best_f1_in_grid_budget"] == 0.7
    assert figures["search_best_f1"] == 0.95
