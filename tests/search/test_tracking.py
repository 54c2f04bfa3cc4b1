"""The sweep in MLflow (``covid_tune/search/tracking.py``), against a real tracking server
started on 127.0.0.1 with its own SQLite store (``mlflow_server``), read back through
MLflow's own client."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from covid_tune.cli import main
from covid_tune.errors import Stopped
from covid_tune.runs.record import SweepOptions
from covid_tune.runs.tracking import read_tracking
from covid_tune.search.define_by_run import trial_seed
from covid_tune.search.sweep import resume_sweep, run_sweep
from covid_tune.search.tracking import MlflowTracking, flat

EPOCHS = 3


def space(folder: Path, num_samples: int, grace: int, experiment: str,
          epochs: int = EPOCHS) -> Path:
    """A small binary study at 32 px, tracked in ``experiment``."""
    doc = {"task": "binary", "metric": "val_loss", "mode": "min", "max_epochs": epochs,
           "image_size": 32, "pretrained": "none", "num_samples": num_samples,
           "augment": False, "asha": {"grace_period": grace, "reduction_factor": 2},
           "params": {"backbone": "resnet18", "frozen_layers": {"low": 0, "high": 20},
                      "lr": {"low": 1e-3, "high": 0.1, "log": True},
                      "batch_size": 16, "hidden": 16, "dropout": 0.0},
           "mlflow": {"experiment": experiment}}
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def altered(fail: int = -1, poor: int = -1, interrupt: int = -1, driver: int = 0):
    """The trainable, altered by trial seed (a closure: cloudpickle ships it to Ray's
    workers by value):

    - ``fail``: fails before its first epoch;
    - ``poor``: reports a validation loss 10 higher than it got, so ASHA stops it at
      its first rung, whatever the others did;
    - ``interrupt``: on its first try, sends the ``driver`` SIGINT (as Ctrl-C) right
      after reporting its first epoch with its checkpoint, then goes on: the sweep
      stops with that trial half done, every time.
    """
    def trainable(config, data):
        import ray.tune

        from covid_tune.training.trial import train_trial

        seed = config["seed"]
        if seed == fail:
            raise RuntimeError("a trial that fails, for the test")
        report, first_try = ray.tune.report, ray.tune.get_checkpoint() is None

        def altered_report(metrics, *args, **kwargs):
            if seed == poor:
                metrics = {**metrics, "val_loss": metrics["val_loss"] + 10}
            report(metrics, *args, **kwargs)
            if first_try and seed == interrupt and metrics["epoch"] == 1:
                os.kill(driver, signal.SIGINT)
                time.sleep(3)  # Ray stops this trial meanwhile

        ray.tune.report = altered_report
        try:
            return train_trial(config, data)
        finally:
            ray.tune.report = report

    return trainable


def ray_trials(run_dir: Path) -> dict[str, dict]:
    """Trial id -> what Ray recorded of it: its config and its results by epoch."""
    found = {}
    for folder in run_dir.glob("trial_*"):
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()
                if line.strip()]
        found[folder.name.removeprefix("trial_")] = {
            "config": json.loads((folder / "params.json").read_text()),
            "epochs": {row["epoch"]: row for row in rows}}
    return found


def nested(client: MlflowClient, run_dir: Path) -> dict:
    """Trial id -> its MLflow run, under the sweep's parent run."""
    record = read_tracking(run_dir)
    runs = client.search_runs([record.experiment_id],
                              f"tags.mlflow.parentRunId = '{record.parent_run_id}'")
    return {run.data.tags["covid_tune.trial_id"]: run for run in runs}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_a_tracked_sweep_is_a_parent_run_with_a_nested_run_per_trial(
        ray_cluster, binary_data, mlflow_server, tmp_path, capsys):
    """Two trials at a time (two nodes), ASHA stopping one, one failing: one parent run
    with the space, the provenance and the leaderboard; each trial's run holds its own
    configuration and exactly the metrics Ray recorded for it, epoch by epoch; the
    statuses say how each ended."""
    run_dir = tmp_path / "runs" / "tracked"
    run_sweep(SweepOptions(space_file=str(space(tmp_path, 4, 1, "tracked-sweep")),
                           data=str(binary_data), storage_path=str(tmp_path / "runs"),
                           name="tracked", seed=5, max_failures=0, mlflow=mlflow_server),
              trainable=altered(fail=trial_seed(5, 2), poor=trial_seed(5, 3)))
    out = capsys.readouterr().out
    assert "note:" not in out.replace("note: trial", ""), out
    client = MlflowClient(mlflow_server)
    record = read_tracking(run_dir)
    assert out.count(f"mlflow: {mlflow_server}/#/experiments/") == 1
    assert "mlflow: the leaderboard is logged with the sweep's run" in out

    experiment = client.get_experiment_by_name("tracked-sweep")
    parents = client.search_runs([experiment.experiment_id], "tags.covid_tune.run != ''")
    assert [p.info.run_id for p in parents] == [record.parent_run_id]
    parent = parents[0]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert parent.data.params["task"] == "binary" and parent.data.params["seed"] == "5"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "sweep.json", "leaderboard"} <= artifacts
    board = {a.path for a in client.list_artifacts(parent.info.run_id, "leaderboard")}
    assert "leaderboard/leaderboard.md" in board and "leaderboard/roc-binary.png" in board

    ray = ray_trials(run_dir)
    runs = nested(client, run_dir)
    assert set(runs) == set(ray) and len(ray) == 4
    statuses = {}
    for trial_id, run in runs.items():
        config, epochs = ray[trial_id]["config"], ray[trial_id]["epochs"]
        assert run.info.run_name == f"trial_{trial_id}"
        assert run.data.params == {k: str(v) for k, v in flat(config).items()}
        assert run.data.tags["covid_tune.seed"] == str(config["seed"])
        for key in ("val_loss", "val_f1", "train_loss", "lr"):
            assert history(client, run.info.run_id, key) == [
                (epoch, pytest.approx(row[key])) for epoch, row in sorted(epochs.items())]
        status = run.data.tags["covid_tune.status"]
        statuses[trial_id] = status
        expected = ("failed" if not epochs else "finished" if max(epochs) == EPOCHS
                    else "stopped early")
        assert status == expected, (trial_id, sorted(epochs))
        assert run.info.status == ("FAILED" if status == "failed" else "FINISHED")
    assert sorted(statuses.values()).count("failed") == 1
    assert sorted(statuses.values()).count("stopped early") >= 1 and "finished" in statuses.values()
    best = min(row["val_loss"] for trial in ray.values() for row in trial["epochs"].values())
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best)

    # The exported best model, registered, links back to its trial's run.
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model"),
                 "--mlflow", mlflow_server, "--registered-name", "tracked-best"]) == 0
    version = client.get_model_version("tracked-best", "1")
    assert version.run_id == runs[version.tags["trial_id"]].info.run_id


def test_a_stopped_sweep_resumed_logs_to_the_same_runs(
        ray_cluster, binary_data, mlflow_server, tmp_path, capsys):
    """Ctrl-C once a trial has finished and the next has done an epoch: the trial still
    running is ``interrupted``
    (KILLED), the parent too. ``resume`` (no flag: the run's ``mlflow.json``) reopens the
    same parent and the same trial runs; no epoch is logged twice; all end FINISHED."""
    run_dir = tmp_path / "runs" / "resumed"
    opts = SweepOptions(space_file=str(space(tmp_path, 2, 2, "resumed-sweep", epochs=2)),
                        data=str(binary_data), storage_path=str(tmp_path / "runs"),
                        name="resumed", seed=2, max_concurrent=1, mlflow=mlflow_server)
    with pytest.raises(Stopped):
        run_sweep(opts, trainable=altered(interrupt=trial_seed(2, 1), driver=os.getpid()))
    client = MlflowClient(mlflow_server)
    record = read_tracking(run_dir)
    before = nested(client, run_dir)
    assert client.get_run(record.parent_run_id).info.status == "KILLED"
    interrupted = [run for run in before.values()
                   if run.data.tags["covid_tune.status"] == "interrupted"]
    assert sorted(run.data.tags["covid_tune.status"] for run in before.values()) == \
        ["finished", "interrupted"]
    assert interrupted[0].info.status == "KILLED"

    capsys.readouterr()
    resume_sweep(run_dir, trainable=altered())  # the same trainable name, unaltered
    out = capsys.readouterr().out
    assert "trial run(s) continued" in out
    assert read_tracking(run_dir) == record
    experiment = client.get_experiment_by_name("resumed-sweep")
    assert len(client.search_runs([experiment.experiment_id],
                                  "tags.covid_tune.run != ''")) == 1
    after = nested(client, run_dir)
    assert len(after) == 2 and {k: r.info.run_id for k, r in before.items()}.items() <= \
        {k: r.info.run_id for k, r in after.items()}.items()
    for run in after.values():
        steps = [step for step, _ in history(client, run.info.run_id, "val_loss")]
        assert steps == [1, 2], (run.info.run_name, steps)
        assert run.info.status == "FINISHED" and run.data.tags["covid_tune.status"] == "finished"
    assert client.get_run(record.parent_run_id).info.status == "FINISHED"


def tracker(uri: str, run_dir: Path) -> MlflowTracking:
    return MlflowTracking(uri, "unreachable", str(run_dir), "sweep", "val_f1", "max", 2,
                          {"task": "binary"})


def test_a_server_that_cannot_be_reached_is_one_note_and_nothing_else(
        ray_cluster, binary_data, tmp_path, capsys):
    """Nothing listens on the port: ``setup`` says so once, and every later hook does
    nothing; a real sweep tracked there runs to its end with that one note."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    callback = tracker(f"http://127.0.0.1:{port}", tmp_path)
    started = time.monotonic()
    callback.setup()
    assert time.monotonic() - started < 10
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"note: MLflow at http://127.0.0.1:{port} "
                                                   f"does not answer")
    assert "the sweep goes on without MLflow tracking" in out
    assert not callback.on and read_tracking(tmp_path) is None

    class Trial:
        trial_id, config, status, ERROR = "t1", {"lr": 0.1}, "TERMINATED", "ERROR"
        last_result = {"epoch": 1}

        def is_finished(self):
            return True

    callback.on_trial_start(0, [], Trial())
    callback.on_trial_result(0, [], Trial(), {"epoch": 1, "val_f1": 0.5})
    callback.on_trial_complete(0, [], Trial())
    callback.on_experiment_end([Trial()])
    assert capsys.readouterr().out == ""

    results = run_sweep(SweepOptions(
        space_file=str(space(tmp_path, 1, 1, "never", epochs=1)), data=str(binary_data),
        storage_path=str(tmp_path / "runs"), name="untracked", seed=1,
        mlflow=f"http://127.0.0.1:{port}"))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("note:")] == [
        f"note: MLflow at http://127.0.0.1:{port} does not answer ([Errno 111] Connection "
        f"refused); the sweep goes on without MLflow tracking"]
    assert len(results) == 1 and results[0].error is None and results[0].metrics["epoch"] == 1
    assert read_tracking(tmp_path / "runs" / "untracked") is None


def test_a_call_the_server_refuses_mid_sweep_is_one_note_and_the_rest_is_dropped(
        mlflow_server, tmp_path, capsys):
    """A trial result for a run the server does not know (as after a server lost its
    store): one note, then no more calls."""
    callback = tracker(mlflow_server, tmp_path)
    callback.setup()
    assert callback.on and read_tracking(tmp_path).parent_run_id == callback.parent
    callback.runs["t1"] = "0" * 32  # no such run
    callback.on_trial_result(0, [], type("T", (), {"trial_id": "t1"})(),
                             {"epoch": 1, "val_f1": 0.5})
    callback.on_trial_result(0, [], type("T", (), {"trial_id": "t1"})(),
                             {"epoch": 2, "val_f1": 0.6})
    callback.close()
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "failed a call" in out, out
    assert not callback.on


def test_the_tracker_pickles_as_its_target_alone(mlflow_server, tmp_path, capsys):
    """Ray keeps the callback in the run's snapshot: its client and thread stay out."""
    import pickle

    callback = tracker(mlflow_server, tmp_path)
    callback.setup()
    copy = pickle.loads(pickle.dumps(callback))
    callback.close()
    assert copy.tracking_uri == mlflow_server and copy.run_dir == str(tmp_path)
    assert copy.client is None and copy.worker is None and copy.parent is None


def test_a_driver_that_stops_at_once_leaves_its_runs_interrupted_not_running(
        mlflow_server, tmp_path, capsys):
    """No end of the experiment from Ray Tune (a second Ctrl-C): the trial runs the
    driver started, and the parent, end KILLED with the tag ``interrupted``."""
    callback = tracker(mlflow_server, tmp_path)
    callback.setup(total_num_samples=2)
    trial = type("T", (), {"trial_id": "t1", "config": {"lr": 0.1, "seed": 4}})()
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": 1, "val_f1": 0.5})
    callback.stopped_at_once()
    callback.close()
    client = MlflowClient(mlflow_server)
    run = client.get_run(callback.runs["t1"])
    assert (run.info.status, run.data.tags["covid_tune.status"]) == ("KILLED", "interrupted")
    assert history(client, run.info.run_id, "val_f1") == [(1, 0.5)]
    parent = client.get_run(callback.parent)
    assert (parent.info.status, parent.data.tags["covid_tune.status"]) == ("KILLED",
                                                                          "interrupted")
    assert "note:" not in capsys.readouterr().out


def test_a_leaderboard_that_cannot_be_built_ends_the_sweep_with_a_note(
        mlflow_server, tmp_path, capsys):
    """The sweep's trials are kept whatever the leaderboard does: here the folder holds
    no run, and the end of the sweep is one note naming the command that writes it."""
    from covid_tune.search.sweep import attach_leaderboard

    callback = tracker(mlflow_server, tmp_path)
    callback.setup()
    callback.close()
    capsys.readouterr()
    attach_leaderboard(callback, str(tmp_path))
    out = capsys.readouterr().out
    assert out.startswith("note: no leaderboard for MLflow (") and out.count("\n") == 1
    assert f"`covid-tune leaderboard {tmp_path}` writes it" in out
