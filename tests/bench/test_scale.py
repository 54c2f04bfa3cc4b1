"""The bench's scale parts, at sizes that only check they run and count right: the
driver driven with simulated trials and checkpoint bytes (the fake-GPU cluster needs a
Ray of its own, so it is not run here)."""

from __future__ import annotations

import pytest
import optuna

from covid_tune.bench.scale import SCALE_TINY, measure_scale
from covid_tune.runs.folder import STUDY_FILE


@pytest.mark.slow
def test_the_tiny_scale_parts_end_every_trial_once_and_give_the_jsons_figures(tmp_path):
    """20 simulated trials through the real searcher and ASHA: each ends once, some
    stopped at a rung, all in the study file; the figures the bench's JSON holds."""
    report = measure_scale(tmp_path, SCALE_TINY)
    assert [w["trials"] for w in report["driver"]["windows"]] == ["1-20"]
    assert report["driver_ms_per_trial_20"] == report["driver"]["ms_per_completion_last_window"]
    study = optuna.load_study(study_name="sim",
                              storage=f"sqlite:///{tmp_path / 'driver' / STUDY_FILE}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 20 and set(states) <= {"COMPLETE", "PRUNED"} and "PRUNED" in states
    # ResNet-18 with every conv frozen, from a pretrained file: the checkpoint holds the
    # head and its momentum, the kept folder the head alone; the plain way writes the
    # whole network every epoch
    row, = report["checkpoints"]["rows"]
    assert 2.0 <= report["checkpoint_write_ratio"] == row["write_ratio"] <= 2.2
    assert 1.0 <= report["kept_bytes_per_trial_ratio"] == row["kept_ratio"] <= 1.1
    assert row["plain_write_ratio"] > 40
    assert "cluster" not in report
