"""Ray Tune's snapshot of a run (``experiment_state-*.json``), read as plain JSON: the
one owner of its format on the read side (``resume`` checks it; the leaderboard counts
its trials' states). Nothing here imports Ray."""

from __future__ import annotations

import json
from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.runs.folder import RAY_STATE_GLOB, RunFolder

# Ray's snapshot, for resume -------------------------------------------------------

def newest_ray_state(run_dir: str | RunFolder) -> str | None:
    """The name of Ray Tune's newest ``experiment_state-*.json`` in the run, if any."""
    states = sorted(name for name in RunFolder(run_dir).files()
                    if Path(name).match(RAY_STATE_GLOB))
    return states[-1] if states else None


def check_ray_state(run_dir: str | RunFolder) -> None:
    """Refuse a run whose Ray Tune snapshot is missing or damaged, before Ray starts."""
    run = RunFolder(run_dir)
    newest = newest_ray_state(run)
    if newest is None:
        raise UserError(f"{run.where()}: the sweep stopped before Ray Tune saved any state, so "
                        f"there is nothing to resume; start it again with `covid-tune sweep` "
                        f"(another --name, or remove this folder)")
    state = run.read_json(newest, what="Ray Tune's snapshot of the run is damaged, so it "
                                       "cannot be resumed; its finished trials still give a "
                                       "leaderboard")
    if not isinstance(state, dict) or "trial_data" not in state:
        raise UserError(f"{run.where(newest)}: damaged Ray Tune snapshot (no trial list); the run "
                        f"cannot be resumed; its finished trials still give a leaderboard")


def trial_states(run_dir: str | RunFolder) -> dict[str, str]:
    """Trial id -> status from Ray Tune's newest snapshot of the run (plain JSON); empty
    if there is none or it cannot be read (the leaderboard then counts what it finds)."""
    run = RunFolder(run_dir)
    newest = newest_ray_state(run)
    if newest is None:
        return {}
    try:
        snapshot = json.loads(run.read_bytes(newest))
        trials = [json.loads(entry[0]) for entry in snapshot["trial_data"]]
        return {str(t["trial_id"]): str(t["status"]) for t in trials}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}
