"""The run folder's file names, and where each one is written and read."""

from __future__ import annotations

import json

from covid_tune.errors import UserError
from covid_tune.runs.storage import exists, read_bytes

SWEEP_FILE = "sweep.json"
SPACE_FILE = "space.yaml"
DATASET_FILE = "dataset.json"
STUDY_FILE = "optuna.db"
LOCK_FILE = "sweep.lock"
LOST_DIR = "lost_trials"
"""Where ``resume`` moves the folders of trials the run's last snapshot did not list."""
RESULT_FILE = "result.json"
DIVERGED_FILE = "diverged.txt"
"""Written in a trial folder when the trial diverges: its retries then fail at once."""
RAY_STATE_GLOB = "experiment_state-*.json"


def read_json(path: str, what: str) -> object:
    """A JSON file of the run; UserError naming it if it is missing or damaged."""
    if not exists(path):
        raise UserError(f"{path}: missing; {what}")
    try:
        return json.loads(read_bytes(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: damaged, not readable JSON ({brief(exc)}); {what}") from None


def brief(exc: Exception) -> str:
    """An error's first line, at most 160 characters, for a one-line message."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
