"""The sweep in MLflow: one parent run per sweep, a nested run per trial.

``MlflowTracking`` is a Ray Tune callback, so everything is written by the driver with
``MlflowClient`` calls that name their run: trials that run at once never share MLflow's
"active run", and never write to each other's runs (Ray's own ``MLflowLoggerCallback``
has no nested runs). What goes where:

- the parent run (named as the sweep): the space's settings as parameters, ``space.yaml``
  and ``sweep.json`` (the provenance) as artifacts, ``best_<metric>`` as it improves,
  and, when the sweep ends, the leaderboard (``attach_leaderboard``);
- each trial's run (``trial_<id>``): its configuration as parameters (``seed`` among
  them), every epoch's metrics with ``step`` = the epoch, and how it ended in the tag
  ``covid_tune.status``: ``finished``, ``stopped early`` (ASHA), ``failed`` or
  ``interrupted`` (the sweep was stopped; ``resume`` reopens it).

The parent's id is kept in the run folder (``mlflow.json``), so ``resume`` logs to the
same runs: a trial that goes on from a checkpoint continues its run, and an epoch that
run already holds is not logged twice. The calls go through one background thread, so
a slow server never holds up the sweep; a server that cannot be reached, at the start
or later, is one note, and the sweep goes on without tracking.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from pathlib import Path

from ray import tune

from covid_tune.core.ranking import better
from covid_tune.runs.folder import SPACE_FILE, SWEEP_FILE, RunFolder
from covid_tune.runs.tracking import (
    TrackingRecord,
    Unreachable,
    connect,
    one_line,
    read_tracking,
    run_url,
    write_tracking,
)

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's tag that nests a run under another (``mlflow.utils.mlflow_tags``)."""
TRIAL_TAG = "covid_tune.trial_id"
STATUS_TAG = "covid_tune.status"
RAY_KEYS = frozenset({
    "training_iteration", "timestamp", "time_this_iter_s", "time_since_restore",
    "iterations_since_restore", "pid", "done", "should_checkpoint", "timesteps_total",
    "episodes_total", "timesteps_since_restore",
})
"""Ray's own bookkeeping in a result: not logged (``time_total_s`` is)."""
FLUSH_SECONDS = 60.0
"""How long the end of a sweep waits for the calls still queued."""
MLFLOW_STATUS = {"finished": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED",
                 "interrupted": "KILLED"}


class MlflowTracking(tune.Callback):
    """Logs a sweep to MLflow (see the module's docstring); pickled with the run by Ray
    as its target alone (``__getstate__``)."""

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str, sweep_name: str,
                 metric: str, mode: str, max_epochs: int, settings: dict):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_dir, self.sweep_name = run_dir, sweep_name
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.settings = settings
        """The space's settings, the parent run's parameters."""
        self._reset()

    def _reset(self) -> None:
        self.client = None
        self.parent: str | None = None
        self.experiment_id = ""
        self.runs: dict[str, str] = {}
        """Trial id -> its MLflow run."""
        self.logged: dict[str, float] = {}
        """Trial id -> the last epoch its run holds."""
        self.started: set[str] = set()
        """Trials this driver started."""
        self.ended: set[str] = set()
        """Trials whose end this driver logged."""
        self.total = 0
        self.experiment_ended = False
        self.best: float | None = None
        self.results = 0
        self.calls: queue.Queue = queue.Queue()
        self.worker: threading.Thread | None = None
        self.failed = False

    def __getstate__(self) -> dict:
        keep = ("tracking_uri", "experiment", "run_dir", "sweep_name", "metric", "mode",
                "max_epochs", "settings")
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def on(self) -> bool:
        return self.parent is not None and not self.failed

    # Ray Tune's hooks (the driver's thread) -----------------------------------------

    def setup(self, total_num_samples: int = 0, **info) -> None:
        self.total = total_num_samples or 0
        try:
            self.client = connect(self.tracking_uri)
            self.parent = self.open_parent()
            self.runs = self.trial_runs()
        except Unreachable as exc:
            self.note(f"{exc}")
            return
        except Exception as exc:  # the server refused a call: same as unreachable
            self.note(f"MLflow at {self.tracking_uri} refused the sweep's run "
                      f"({one_line(exc)})")
            self.parent = None
            return
        print(f"mlflow: {run_url(self.tracking_uri, self.experiment_id, self.parent)}"
              + (f" ({len(self.runs)} trial run(s) continued)" if self.runs else ""),
              flush=True)
        self.worker = threading.Thread(target=self.work, daemon=True,
                                       name="covid-tune-mlflow")
        self.worker.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.add(trial.trial_id)
        self.send(self.start_trial, trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = {key: float(value) for key, value in result.items()
                   if key not in RAY_KEYS and isinstance(value, (int, float))
                   and not isinstance(value, bool)}
        self.send(self.log_epoch, trial.trial_id, metrics,
                  int(result.get("timestamp", time.time()) * 1000))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.send(self.tag, trial.trial_id, "covid_tune.retried", "true")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        self.send(self.end_trial, trial.trial_id, self.ending(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        self.send(self.end_trial, trial.trial_id, "failed")

    def on_experiment_end(self, trials, **info) -> None:
        """Close what the sweep leaves open. A trial this driver started whose end
        Ray never reported was stopped with the sweep (Ray marks it ended as it cleans
        up): ``interrupted``, as is a trial an earlier driver left running. A trial that
        ended under an earlier driver, whose run is still open (that driver was
        killed), gets its end. Then the parent: ``finished`` when every trial ended."""
        interrupted = len(trials) < self.total
        for trial in trials:
            if trial.trial_id in self.ended:
                continue
            if trial.trial_id in self.started or not trial.is_finished():
                interrupted = True
                self.send(self.end_trial, trial.trial_id, "interrupted",
                          trial.trial_id not in self.started)
            else:
                self.send(self.end_trial, trial.trial_id, self.ending(trial), True)
        self.send(self.end_parent, "interrupted" if interrupted else "finished")
        self.experiment_ended = True
        self.close()

    def stopped_at_once(self) -> None:
        """The driver stopped without Ray Tune's end of the experiment (a second Ctrl-C,
        or a graceful stop that took too long): what it started and did not end is
        ``interrupted``, the parent too."""
        if self.experiment_ended:
            return
        for trial_id in self.started - self.ended:
            self.send(self.end_trial, trial_id, "interrupted")
        self.send(self.end_parent, "interrupted")
        self.experiment_ended = True

    def ending(self, trial) -> str:
        if trial.status == trial.ERROR:
            return "failed"
        epoch = (trial.last_result or {}).get("epoch", 0)
        return "finished" if epoch >= self.max_epochs else "stopped early"

    # the calls, on the worker thread ------------------------------------------------

    def send(self, call, *args) -> None:
        if self.on and self.worker is not None:
            self.calls.put((call, args))

    def work(self) -> None:
        while True:
            item = self.calls.get()
            if item is None:
                return
            call, args = item
            if self.failed:
                continue
            try:
                call(*args)
            except Exception as exc:
                self.note(f"MLflow at {self.tracking_uri} failed a call ({one_line(exc)})")

    def close(self, wait: float = FLUSH_SECONDS) -> None:
        """Send what is queued (at most ``wait`` seconds), then stop the worker."""
        if self.worker is None:
            return
        self.calls.put(None)
        self.worker.join(wait)
        if self.worker.is_alive():
            self.note(f"MLflow at {self.tracking_uri} took over {wait:.0f} s for the last "
                      f"calls; some of the sweep's end is not logged")
        self.worker = None

    def note(self, what: str) -> None:
        if not self.failed:
            print(f"note: {what}; the sweep goes on without MLflow tracking", flush=True)
        self.failed = True

    # what each call does -------------------------------------------------------------

    def open_parent(self) -> str:
        """The sweep's parent run: the one ``mlflow.json`` names (reopened), or a new one
        with the space's settings and the run's record."""
        record = read_tracking(self.run_dir)
        if record is not None and record.tracking_uri == self.tracking_uri:
            try:
                run = self.client.get_run(record.parent_run_id)
            except Exception:  # deleted on the server: start a new parent
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                self.experiment_id = record.experiment_id
                self.best = run.data.metrics.get(f"best_{self.metric}")
                self.results = max((m.step for m in self.client.get_metric_history(
                    record.parent_run_id, f"best_{self.metric}")), default=0)
                self.client.update_run(record.parent_run_id, status="RUNNING")
                return record.parent_run_id
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = (found.experiment_id if found is not None
                              else self.client.create_experiment(self.experiment))
        parent = self.client.create_run(self.experiment_id, run_name=self.sweep_name, tags={
            "covid_tune.run": self.run_dir, "covid_tune.task": str(self.settings.get("task")),
            "covid_tune.metric": self.metric}).info.run_id
        self.log_params(parent, self.settings)
        run = RunFolder(self.run_dir)
        for name in (SPACE_FILE, SWEEP_FILE):
            if run.exists(name):
                with run.local_file(name) as path:
                    self.client.log_artifact(parent, str(path))
        write_tracking(self.run_dir, TrackingRecord(self.tracking_uri, self.experiment,
                                                    self.experiment_id, parent))
        return parent

    def trial_runs(self) -> dict[str, str]:
        """The trial runs already under the parent (a resumed sweep's)."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{self.parent}'",
            max_results=50_000)
        return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in found
                if TRIAL_TAG in run.data.tags}

    def start_trial(self, trial_id: str, config: dict) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is not None:  # resumed: its run goes on
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, STATUS_TAG, "running")
            history = self.client.get_metric_history(run_id, "epoch")
            self.logged[trial_id] = max((m.step for m in history), default=0)
            return
        tags = {PARENT_TAG: self.parent, TRIAL_TAG: trial_id, STATUS_TAG: "running",
                "covid_tune.seed": str(config.get("seed"))}
        run_id = self.client.create_run(self.experiment_id, run_name=f"trial_{trial_id}",
                                        tags=tags).info.run_id
        self.runs[trial_id] = run_id
        self.log_params(run_id, config)

    def log_epoch(self, trial_id: str, metrics: dict[str, float], stamp: int) -> None:
        from mlflow.entities import Metric

        run_id, epoch = self.runs.get(trial_id), int(metrics.get("epoch", 0))
        if run_id is None or epoch <= self.logged.get(trial_id, 0):
            return  # no run (started before tracking), or an epoch it already holds
        self.client.log_batch(run_id, metrics=[Metric(key, value, stamp, epoch)
                                               for key, value in sorted(metrics.items())])
        self.logged[trial_id] = epoch
        self.results += 1
        value = metrics.get(self.metric)
        if value is not None and math.isfinite(value) and (
                self.best is None or better(value, self.best, self.mode)):
            self.best = value
            self.client.log_metric(self.parent, f"best_{self.metric}", value, stamp,
                                   self.results)

    def tag(self, trial_id: str, key: str, value: str) -> None:
        if trial_id in self.runs:
            self.client.set_tag(self.runs[trial_id], key, value)

    def end_trial(self, trial_id: str, status: str, only_if_open: bool = False) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        if only_if_open and self.client.get_run(run_id).info.status != "RUNNING":
            return
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_terminated(run_id, MLFLOW_STATUS[status])

    def end_parent(self, status: str) -> None:
        self.client.set_tag(self.parent, STATUS_TAG, status)
        self.client.set_terminated(self.parent, MLFLOW_STATUS[status])

    def log_params(self, run_id: str, values: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in flat(values).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters a call
            self.client.log_batch(run_id, params=params[start:start + 100])

    # after the sweep ------------------------------------------------------------------

    def attach_leaderboard(self, folder: str | Path) -> None:
        """Upload the sweep's leaderboard folder to the parent run (``leaderboard/``)."""
        if not self.on:
            return
        try:
            self.client.log_artifacts(self.parent, str(folder), "leaderboard")
            print("mlflow: the leaderboard is logged with the sweep's run", flush=True)
        except Exception as exc:
            self.note(f"MLflow at {self.tracking_uri} did not take the leaderboard "
                      f"({one_line(exc)})")


def flat(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested mappings as ``a.b`` keys (the trial's ``augment``, ``threshold``)."""
    out: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
