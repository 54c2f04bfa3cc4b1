"""Ray Tune's snapshot of a run, read as plain JSON (``covid_tune/runs/ray_state.py``), on
a snapshot Ray 2.60 wrote itself (``tests/fixtures/before-0.2``): should Ray change the
layout of ``experiment_state-*.json``, the leaderboard's failed-trial count and
``resume``'s check break here first."""

from __future__ import annotations

from pathlib import Path

from covid_tune.runs.folder import SNAPSHOT_FILE
from covid_tune.runs.ray_state import (check_ray_state, keep_snapshot, newest_ray_state, put_back,
                                       read_snapshot, trial_states)
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


def staged(folder: Path, session: str, trials: str) -> None:
    """Ray's staging folder once it has saved a snapshot: the trials, the searcher and
    the search's wrappers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"experiment_state-{session}.json").write_text(
        '{"trial_data": [], "runner_data": {}, "trials": "%s"}' % trials)
    (folder / f"searcher-state-{session}.pkl").write_bytes(b"\x80\x05searcher " + trials.encode())
    (folder / f"search_gen_state-{session}.json").write_bytes(b"\x80\x05counter " + trials.encode())


def copy_out(staging: Path, run: Path, session: str) -> list[str]:
    """Ray's own copy of a snapshot into the run folder; the names copied."""
    names = [p.name for p in staging.glob(f"*-{session}.*")]
    for name in names:
        (run / name).write_bytes((staging / name).read_bytes())
    return names


def test_a_snapshot_ray_copied_only_in_part_is_put_back_whole(tmp_path):
    run, staging, session = tmp_path / "run", tmp_path / "staging", "2026-12-06_05-00-00"
    run.mkdir()
    assert keep_snapshot(run, str(staging), session) is False  # nothing staged
    staged(staging, session, "two")
    assert keep_snapshot(run, str(staging), session) is True
    names = copy_out(staging, run, session)
    whole = {name: (run / name).read_bytes() for name in names}
    assert len(whole) == 3 and read_snapshot(run) == whole
    assert put_back(run) == []  # Ray's files are whole: nothing to do
    state = run / f"experiment_state-{session}.json"
    state.write_bytes(whole[state.name][:20])  # killed while Ray copied it
    (run / f"searcher-state-{session}.pkl").unlink()
    assert sorted(put_back(run)) == sorted([state.name, f"searcher-state-{session}.pkl"])
    assert {name: (run / name).read_bytes() for name in whole} == whole
    check_ray_state(run)


def test_a_newer_snapshot_cut_short_is_set_aside_and_a_newer_whole_one_wins(tmp_path):
    run, staging = tmp_path / "run", tmp_path / "staging"
    run.mkdir()
    old, new = "2026-12-06_05-00-00", "2026-12-06_06-00-00"
    staged(staging, old, "old")
    keep_snapshot(run, str(staging), old)
    copy_out(staging, run, old)
    (run / f"experiment_state-{new}.json").write_text('{"trial_data": [')  # cut short
    assert put_back(run) == []  # Ray's old files equal the copy
    assert newest_ray_state(str(run)) == f"experiment_state-{old}.json"
    assert (run / f"experiment_state-{new}.json.damaged").exists()
    (run / f"experiment_state-{new}.json").write_text('{"trial_data": []}')  # whole
    (run / f"experiment_state-{old}.json").write_text("")
    assert put_back(run) == []  # the copy is older than Ray's newest whole one
    assert newest_ray_state(str(run)) == f"experiment_state-{new}.json"


def test_a_run_without_a_kept_copy_or_with_a_damaged_one_is_left_to_rays_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert put_back(run) == [] and read_snapshot(run) == {}
    (run / SNAPSHOT_FILE).write_bytes(b"not a tar file")
    assert put_back(run) == [] and read_snapshot(run) == {}
