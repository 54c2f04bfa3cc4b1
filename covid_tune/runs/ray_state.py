"""Ray Tune's snapshot of a run (``experiment_state-*.json``), for ``resume``."""

from __future__ import annotations

from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.runs.folder import RAY_STATE_GLOB
from covid_tune.runs.folder import read_json
from covid_tune.runs.storage import join, list_files

# Ray's snapshot, for resume -------------------------------------------------------

def newest_ray_state(run_dir: str) -> str | None:
    """The path of Ray Tune's newest ``experiment_state-*.json`` in the run, if any."""
    states = sorted(name for name in list_files(run_dir) if Path(name).match(RAY_STATE_GLOB))
    return join(run_dir, states[-1]) if states else None


def check_ray_state(run_dir: str) -> None:
    """Refuse a run whose Ray Tune snapshot is missing or damaged, before Ray starts."""
    newest = newest_ray_state(run_dir)
    if newest is None:
        raise UserError(f"{run_dir}: the sweep stopped before Ray Tune saved any state, so "
                        f"there is nothing to resume; start it again with `covid-tune sweep` "
                        f"(another --name, or remove this folder)")
    state = read_json(newest, "Ray Tune's snapshot of the run is damaged, so it cannot be "
                               "resumed; its finished trials still give a leaderboard")
    if not isinstance(state, dict) or "trial_data" not in state:
        raise UserError(f"{newest}: damaged Ray Tune snapshot (no trial list); the run "
                        f"cannot be resumed; its finished trials still give a leaderboard")
