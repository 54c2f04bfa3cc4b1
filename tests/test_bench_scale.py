"""The bench's scale parts, at sizes that only check they run and count right: the
driver driven with simulated trials, checkpoint bytes, the stand-in cluster sweep."""

from __future__ import annotations

import optuna

from covid_tune.bench_scale import measure_checkpoints, simulate_driver
from covid_tune.runs import STUDY_FILE


def test_the_driver_simulation_ends_every_trial_once_and_the_study_file_holds_them(tmp_path):
    figures = simulate_driver(30, 4, tmp_path, window=10)
    assert [w["trials"] for w in figures["windows"]] == ["1-10", "11-20", "21-30"]
    assert all(w["ms_per_completion"] > 0 for w in figures["windows"])
    study = optuna.load_study(study_name="sim", storage=f"sqlite:///{tmp_path / STUDY_FILE}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 30 and set(states) <= {"COMPLETE", "PRUNED"}
    assert "PRUNED" in states  # ASHA stopped some at its rungs


def test_checkpoint_bytes_are_the_trainable_weights_and_their_momentum(tmp_path):
    """ResNet-18 with every conv frozen: the checkpoint holds the head and its momentum
    (a little over 2x the trainable bytes), the kept folder the head alone, while the
    plain way writes the whole network every epoch."""
    figures = measure_checkpoints(tmp_path, hidden=256, rows_of=(("resnet18", 20),))
    row, = figures["rows"]
    assert 2.0 <= row["write_ratio"] <= 2.2 and 1.0 <= row["kept_ratio"] <= 1.1
    assert row["plain_write_ratio"] > 40  # all of ResNet-18 and its head's momentum
