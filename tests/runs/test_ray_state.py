"""Ray Tune's snapshot of a run, read as plain JSON (``covid_tune/runs/ray_state.py``), on
a snapshot Ray 2.60 wrote itself (``tests/fixtures/before-0.2``): should Ray change the
layout of ``experiment_state-*.json``, the leaderboard's failed-trial count and
``resume``'s check break here first."""

from __future__ import annotations

from pathlib import Path

from covid_tune.runs.ray_state import check_ray_state, newest_ray_state, trial_states
from helpers import loaded_after

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "before-0.2"


def test_the_trial_states_of_a_snapshot_ray_wrote():
    """The run was stopped while its one trial ran: Ray's snapshot lists it RUNNING."""
    assert newest_ray_state(str(FIXTURE)) == "experiment_state-2026-12-05_20-39-58.json"
    assert trial_states(str(FIXTURE)) == {"ab557062": "RUNNING"}
    check_ray_state(str(FIXTURE))  # resumable: no UserError


def test_reading_the_snapshot_does_not_import_ray():
    assert loaded_after(f"from covid_tune.runs.ray_state import trial_states; "
                        f"trial_states({str(FIXTURE)!r})", ("ray",)) == []
