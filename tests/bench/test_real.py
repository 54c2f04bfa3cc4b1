"""``covid-tune bench --real``: how a sweep's run folder and output are read, checked on
a hand-made run folder and on the session's shared sweeps; the full soak is not run."""

from __future__ import annotations

import json
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from covid_tune.bench import real as soak
from covid_tune.cli import build_parser, main
from covid_tune.core.space_file import find_space
from covid_tune.bench.real import REAL, read_outcomes, run_logged, scan_log, sweep_command

REUSE_ERROR = ("ray.tune.error._AbortTrialExecution: Trainable runner reuse requires "
               "reset_config() to be implemented and return True.")


def make_trial(run, trial_id: str, reported: int, logged: int, error: str = "") -> None:
    """A trial folder: ``reported`` results Tune recorded, ``logged`` TensorBoard epochs
    the trial wrote, and an ``error.txt`` when ``error`` is given."""
    folder = run / f"trial_{trial_id}"
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "epoch_seconds": 5.0 + e, "time_this_iter_s": 6.0 + e,
                         "config": {"backbone": "resnet18"}}) for e in range(1, reported + 1)]
    (folder / "result.json").write_text("\n".join(lines + ['{"epoch": 9, "cut']) + "\n")
    if logged:
        writer = SummaryWriter(log_dir=str(folder))
        for epoch in range(1, logged + 1):
            writer.add_scalar("loss/train", 0.5, epoch)
        writer.close()
    if error:
        (folder / "error.txt").write_text(
            f"Failure # 1 (occurred at 2026-11-22_10-00-00)\nTraceback (most recent call "
            f"last):\n  File \"x.py\", line 1\n{error}\n\nFailure # 2 (occurred at later)\n"
            f"RuntimeError: the retry's error\n")


def write_snapshot(run, states: dict[str, str]) -> None:
    """Ray Tune's snapshot of the run, as ``covid_tune.runs.ray_state.trial_states`` reads it."""
    entries = [[json.dumps({"trial_id": t, "status": s}), "{}"] for t, s in states.items()]
    (run / "experiment_state-2026-11-22_10-00-00.json").write_text(
        json.dumps({"trial_data": entries}))


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "binary-soak"
    make_trial(run, "done", reported=4, logged=4)
    make_trial(run, "stopped", reported=2, logged=3)  # trained one epoch after ASHA's stop
    make_trial(run, "quiet", reported=2, logged=2)
    make_trial(run, "reuse", reported=0, logged=0, error=REUSE_ERROR)
    make_trial(run, "retried", reported=4, logged=4, error="RuntimeError: node lost")
    make_trial(run, "running", reported=1, logged=2)  # reporting when the sweep ended
    write_snapshot(run, {"done": "TERMINATED", "stopped": "TERMINATED",
                         "quiet": "TERMINATED", "reuse": "ERROR", "retried": "TERMINATED",
                         "running": "RUNNING", "pending": "PENDING"})
    return run


def test_trials_are_counted_by_how_they_ended(run):
    figures = read_outcomes(run, max_epochs=4)
    assert figures["trials"] == 7
    assert (figures["finished"], figures["stopped"], figures["failed"],
            figures["unfinished"]) == (2, 2, 1, 2)
    assert figures["errors"] == {REUSE_ERROR: 1}  # the first failure, not the retry's


def test_epochs_trained_after_a_stop_are_the_trials_own_steps_past_tunes_last(run):
    figures = read_outcomes(run, max_epochs=4)
    details = {t["trial_id"]: t for t in figures["trial_details"]}
    assert details["stopped"]["after_stop"] == 1
    assert details["running"]["after_stop"] == 0  # not ended: its report was on its way
    assert figures["epochs_after_stop"] == 1 and figures["trials_trained_after_stop"] == 1


def test_epoch_seconds_come_from_every_reported_epoch(run):
    figures = read_outcomes(run, max_epochs=4)
    seconds = figures["epoch_seconds"]
    assert seconds["n"] == 4 + 2 + 2 + 4 + 1  # the damaged last line of each is skipped
    assert (seconds["min"], seconds["max"]) == (6.0, 9.0)
    assert figures["epoch_wall_seconds"]["min"] == 7.0
    assert figures["epoch_seconds_by_backbone"]["resnet18"]["n"] == seconds["n"]


def test_a_sweep_that_left_no_run_folder_has_no_trials(tmp_path):
    figures = read_outcomes(tmp_path / "never-started", max_epochs=4)
    assert figures["trials"] == 0 and figures["epoch_seconds"]["n"] == 0


def test_the_shared_sweeps_are_read_as_ray_tune_saw_them(swept):
    for run_dir, results, max_epochs in ((swept.binary, swept.binary_results, 3),
                                         (swept.multilabel, swept.multilabel_results, 2)):
        figures = read_outcomes(run_dir, max_epochs)
        assert figures["trials"] == len(results)
        assert figures["failed"] == sum(r.error is not None for r in results)
        finished = sum(r.error is None and r.metrics["epoch"] == max_epochs for r in results)
        assert figures["finished"] == finished
        assert figures["stopped"] == len(results) - finished - figures["failed"]
        assert figures["epoch_seconds"]["n"] == sum(len(r.metrics_dataframe) for r in results)
        assert figures["epoch_seconds"]["min"] > 0


def test_stall_lines_and_a_stalled_exit_are_found_in_the_output():
    text = ("2 running, 4 done\r0 running, 4 done; nothing running for 1 min: the search "
            "suggests no new trial\nCould not re-use actor for trial x: busy\n"
            "(train_trial pid=7) Fatal Python error: Aborted\n"
            "covid-tune: stalled: nothing ran for 15 min while 6 trial(s) were left\n")
    found = scan_log(text, exit_code=1)
    assert len(found["stall_lines"]) == 1 and found["exit_stalled"]
    assert found["reuse_failures"] == 1 and found["trial_processes_aborted"] == 1
    assert not scan_log(text, exit_code=0)["exit_stalled"]
    assert scan_log("12 trials, 0 failed\n", 0) == {
        "stall_lines": [], "exit_stalled": False, "reuse_failures": 0,
        "trial_processes_aborted": 0}


@pytest.mark.slow
def test_a_sweep_past_its_time_limit_is_stopped_and_its_output_kept(tmp_path):
    log = tmp_path / "sweep.log"
    ran = run_logged([sys.executable, "-c", "import time; print('started', flush=True); "
                      "time.sleep(60)"], log, limit_s=1)
    assert ran["timed_out"] and ran["exit_code"] != 0 and ran["wall_seconds"] < 30
    assert log.read_text().startswith("started")


def test_the_shipped_spaces_run_unchanged_with_only_size_flags(tmp_path):
    for space in REAL.spaces:
        command = sweep_command(find_space(space.name), tmp_path / "data", tmp_path / "runs",
                                "name", REAL)
        assert command[command.index("--space") + 1] == str(find_space(space.name))
        assert [a for a in command if a.startswith("--")] == [
            "--space", "--data", "--storage-path", "--name", "--num-samples", "--max-epochs",
            "--image-size", "--pretrained", "--max-concurrent"]
        assert command[command.index("--pretrained") + 1] == "none"


def test_bench_real_runs_the_soak(monkeypatch, tmp_path):
    assert build_parser().parse_args(["bench", "--real"]).real
    called = {}
    monkeypatch.setattr(soak, "run_soak", lambda json_path: called.setdefault("json", json_path))
    assert main(["bench", "--real", "--json", str(tmp_path / "soak.json")]) == 0
    assert called == {"json": str(tmp_path / "soak.json")}


def test_bench_refuses_quick_and_real_together(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", "--quick", "--real"])
    assert exit_.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
