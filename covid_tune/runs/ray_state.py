"""Ray Tune's snapshot of a run (``experiment_state-*.json``), read as plain JSON: the
one owner of its format on the read side (``resume`` checks it; the leaderboard counts
its trials' states), and of the whole copy of the newest snapshot kept beside it
(``snapshot.tar``: ``keep_snapshot``, ``put_back``). Nothing here imports Ray."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.runs.folder import RAY_STATE_GLOB, SNAPSHOT_FILE, RunFolder

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


# a whole copy of the newest snapshot ----------------------------------------------

STATE_NAME = "experiment_state-{}.json"
SNAPSHOT_NAMES = (STATE_NAME, "searcher-state-{}.pkl", "search_gen_state-{}.json")
"""The files of one Ray Tune snapshot of a run: the trials, the searcher (with the
Optuna study and ASHA's rungs) and the search's wrappers (trial count, concurrency)."""


def session_of(searcher_file: str) -> str | None:
    """The session a searcher state file belongs to, from its name (Ray's temporary
    name for it ends the same way)."""
    match = re.search(r"searcher-state-(.+)\.pkl$", os.path.basename(searcher_file))
    return match.group(1) if match else None


def keep_snapshot(run_dir: str | RunFolder, staging: str, session: str) -> bool:
    """Keep a whole copy of the snapshot Ray Tune has just written in its ``staging``
    folder (``SNAPSHOT_NAMES`` of ``session``), packed in one file (``SNAPSHOT_FILE``)
    that replaces the previous one by rename; False when the staging folder does not
    hold the snapshot.

    Ray then copies its files into the run folder in place, one after the other: a
    driver killed while it copies leaves them cut short or out of step, which the copy
    kept here makes good (``put_back``). Raises OSError when the copy cannot be
    written (the caller removes the old one, so a kept copy is never older than
    Ray's own)."""
    paths = {name.format(session): os.path.join(staging, name.format(session))
             for name in SNAPSHOT_NAMES}
    if not all(os.path.isfile(path) for path in list(paths.values())[:2]):
        return False
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, path in paths.items():
            if os.path.isfile(path):
                data = Path(path).read_bytes()
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
    RunFolder(run_dir).write_bytes(SNAPSHOT_FILE, data=buffer.getvalue())
    return True


def drop_snapshot(run_dir: str | RunFolder) -> None:
    """Remove the kept copy (after a failed write: Ray's own files are then newer)."""
    run = RunFolder(run_dir)
    if run.exists(SNAPSHOT_FILE):
        run.fs.delete_file(run.path(SNAPSHOT_FILE))


def read_snapshot(run_dir: str | RunFolder) -> dict[str, bytes]:
    """The files of the kept copy, by name; empty when there is none or it cannot be
    read (a run written before covid-tune kept one)."""
    run = RunFolder(run_dir)
    try:
        data = run.read_bytes(SNAPSHOT_FILE)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError, AttributeError):
        return {}
    if not any(name.startswith("experiment_state-") for name in files):
        return {}
    return files


def put_back(run_dir: str | RunFolder) -> list[str]:
    """Before ``resume``: make Ray Tune's snapshot in the run folder the kept copy
    (``keep_snapshot``) where it differs, and set aside (``*.damaged``) any newer
    ``experiment_state`` Ray could not have finished; the names written back.

    The copy is the newest complete snapshot: it is written before Ray copies its own
    files, and removed when it cannot be written. So a run folder whose newest
    ``experiment_state`` is newer than the copy and reads as JSON keeps Ray's files."""
    run = RunFolder(run_dir)
    kept = read_snapshot(run)
    if not kept:
        return []
    state_name = next(name for name in kept if name.startswith("experiment_state-"))
    newer = [name for name in run.files() if Path(name).match(RAY_STATE_GLOB)
             and name > state_name]
    if any(readable_json(run, name) for name in newer):
        return []
    for name in newer:
        run.move((name,), (f"{name}.damaged",))
    written = []
    for name, data in kept.items():
        if not run.exists(name) or run.read_bytes(name) != data:
            run.write_bytes(name, data=data)
            written.append(name)
    return written


def readable_json(run: RunFolder, name: str) -> bool:
    try:
        json.loads(run.read_bytes(name))
    except (OSError, ValueError):
        return False
    return True
