"""The search: Ray Tune runs the trials, Optuna's TPE picks them, ASHA stops weak ones.

``run_sweep`` holds the run folder (``covid_tune.runs.lock``: one driver at a time),
validates everything first (search space, dataset, the memory its decoded pixels
need, pretrained weights, resources, shared storage), decodes the dataset once,
records the run (``covid_tune.runs.record.write_record``: options, provenance, the resolved
space, the dataset's manifest), then starts (or joins) Ray and runs a ``Tuner``. The
run folder ``<storage-path>/<name>`` (a local or shared folder, or an ``s3://`` /
``gs://`` URI) is Ray Tune's own layout, readable by ``ray.tune.ExperimentAnalysis``,
plus the files ``covid_tune.runs.record`` describes.

Ctrl-C or SIGTERM ends the search the way Ray Tune's own stop does: the run's state
is saved, every trial keeps its last checkpoint, and ``Stopped`` carries the
``covid-tune resume`` command (the CLI exits 130 or 143).

The Optuna study lives in the driver's memory and is saved with Ray's searcher state,
in the same snapshot as the trials, so a resumed sweep's study matches its trials
exactly (``covid_tune.search.searcher``).

``resume_sweep`` continues a sweep whose driver died or was stopped: finished trials
are kept, the others resume from their last checkpoint, and the study carries on. A
driver killed between two snapshots may have deleted the checkpoint the last one names;
such a trial goes on from the newest checkpoint it still has
(``go_on_from_a_kept_checkpoint``).
"""

from __future__ import annotations

import _thread
import logging
import math
import os
import pickle
import re
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from covid_tune.search.cluster import check_object_store, check_resources, check_storage, start_ray
from covid_tune.core.ranking import rank_key
from covid_tune.core.space import SearchSpace, Stop, tracking_uri_problem
from covid_tune.core.units import duration, parse_duration
from covid_tune.core.space_file import find_space
from covid_tune.data.dataset import (SELECTION, DataBundle, Layout, assignment, check_memory, hold_out,
                             load_dataset, manifest, scan, train_grouping, with_selection)
from covid_tune.errors import Stalled, Stopped, UserError
from covid_tune.runs.lock import hold
from covid_tune.nn.models import check_pretrained
from covid_tune.runs.reader import CHECKPOINT_SCORE, choose_data, result_rows
from covid_tune.runs.folder import (DIVERGED_FILE, LOST_DIR, SNAPSHOT_FILE, STUDY_FILE,
                                    SWEEP_FILE, RunFolder)
from covid_tune.runs.record import (SweepOptions, clear_end, read_end, read_record, read_selection,
                                    read_space, write_end, write_num_samples, write_record)
from covid_tune.runs.tracking import one_line, read_tracking
from covid_tune.runs.ray_state import check_ray_state, put_back, trial_states
from covid_tune.runs.retention import checkpoint_folders, drop_resume_state, keep_best
from covid_tune.search._internals import (asha_record, asha_state, controller_storage,
                                          in_run_folder, point_at_checkpoint, raise_budget,
                                          restored_tune_config, run_callbacks, set_asha_state,
                                          stop_experiment)
from covid_tune.search.searcher import (WARM_START_ATTR, build_searcher, epoch_of,
                                       find_sweep_search, warm_trials)
from covid_tune.search.status import SweepStatus
from covid_tune.search.tracking import MlflowTracking
from covid_tune.runs.storage import exists, exists_on, is_uri, join, open_path
from covid_tune.training.trial import TrialDiverged, train_trial


class SweepScheduler(ASHAScheduler):
    """ASHA, which also makes sure the searcher hears how every trial ended.

    - It hands the searcher the trials that failed by diverging (the scheduler hears
      of a failed trial before the searcher does).
    - It keeps the trials not yet ended (``open``) and, before Tune starts trials at
      each step, tells the searcher of any that Ray ended without telling it
      (``tell_missed_ends``): Ray fails a trial whose reused actor could not be reset
      without a word to the scheduler or the searcher, and the Optuna study would
      keep it RUNNING for good, holding TPE's start-up wait open.

    ``search_alg`` is the sweep's searcher (in its ``ConcurrencyLimiter``, if any),
    given when both are built (``build_scheduler``); Ray's snapshot of the run
    (``tuner.pkl``) keeps the two together for ``resume``.
    """

    def __init__(self, *args, search_alg=None, stop: Stop | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.open: dict = {}
        """Trial id -> Ray's trial, for trials added and not yet ended."""
        self.stop, self.rank_mode = stop or Stop(), kwargs.get("mode", "max")
        self.best: dict[str, list] = {}
        """Trial id -> [its best score, that epoch's interval half-width], while it runs."""
        self.finished: list[list] = []
        """[trial id, best score, half-width] of each trial with a score, as they ended."""
        self.ended: str | None = None
        self.ending = False
        """``end`` decided: Tune's next step stops the sweep."""
        self.stopped_at: dict[str, int] = {}
        """Trial id -> the epoch at which ASHA stopped it: a driver stopped before Tune
        ended the trial saved the decision, and the trial's resumed report hears it
        again."""
        self.search_alg = None
        """The searcher, in its wrappers: told of the ends Ray misses."""
        self.serve(search_alg)

    def __setstate__(self, state: dict) -> None:
        """A scheduler pickled by an older covid-tune (a run's ``tuner.pkl``) gets the
        fields added since."""
        self.__dict__.update({"best": {}, "finished": [], "stop": Stop(), "ended": None,
                              "ending": False, "stopped_at": {},
                              "rank_mode": state.get("_mode") or "max"})
        self.__dict__.update(state)

    def serve(self, search_alg) -> None:
        """Work with ``search_alg``: tell it the ends Ray misses, and let it ask for them
        (its start-up hold counts the trials Ray still runs)."""
        self.search_alg = search_alg
        search = find_sweep_search(search_alg)
        if search is not None:
            search.scheduler = self

    def on_trial_error(self, tune_controller, trial) -> None:
        self.open.pop(trial.trial_id, None)
        search = find_sweep_search(self.search_alg)
        if search is not None and diverged(trial):
            if not hasattr(search, "diverged"):  # a searcher restored from an older run
                search.diverged = set()
            search.diverged.add(trial.trial_id)
        super().on_trial_error(tune_controller, trial)

    def on_trial_add(self, tune_controller, trial) -> None:
        storage = controller_storage(tune_controller)
        in_run_folder(trial, storage)  # a moved run folder
        if trial.status != trial.TERMINATED:  # a resumed trial, or a new one (no checkpoint)
            go_on_from_a_kept_checkpoint(trial)
        if not trial.is_finished():
            self.open[trial.trial_id] = trial
        if getattr(self, "search_alg", None) is None:  # a run written before 0.2
            self.serve(tune_controller.search_alg)
        search = find_sweep_search(self.search_alg)
        if search is not None and storage is not None:  # where Ray has the run now
            search.run_folder = RunFolder.on(storage.storage_filesystem,
                                             storage.experiment_fs_path)
        if search is not None and getattr(search, "budget", None):  # resume --num-samples
            raise_budget(tune_controller.search_alg, search.budget)
            search.budget = None
        super().on_trial_add(tune_controller, trial)
        if getattr(self, "rebuild", False) and "epoch" in (trial.last_result or {}):
            asha_record(self, trial.trial_id, scores_until(trial, self.metric,
                                                           epoch_of(trial.last_result)))

    def state(self) -> dict:
        """ASHA's rungs, and the scores ``stop`` goes by, saved with the searcher in
        each snapshot of the run."""
        return {**asha_state(self), "best": dict(self.best), "finished": list(self.finished),
                "stopped_at": dict(self.stopped_at)}

    def take_over(self, saved: dict | None) -> None:
        """After ``resume``: ASHA's rungs as the run's last snapshot saved them, or,
        for a run saved without them, rebuilt from each restored trial's results as
        they are added (``on_trial_add``)."""
        if saved:
            set_asha_state(self, saved)
            self.best, self.finished = dict(saved.get("best", {})), list(saved.get("finished", []))
            self.stopped_at = dict(saved.get("stopped_at", {}))
        self.rebuild = not saved

    def on_trial_result(self, tune_controller, trial, result) -> str:
        stopped_at = self.stopped_at.get(trial.trial_id)
        if stopped_at is not None and result.get("epoch", 0) >= stopped_at:
            return self.STOP  # decided before a stop of the driver cut the trial's end
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            self.stopped_at[trial.trial_id] = result.get("epoch", 0)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = self.best.get(trial.trial_id)
            if best is None or rank_key(value, self.rank_mode) > rank_key(best[0], self.rank_mode):
                half = result.get(f"{self.metric}_half_width", math.nan)
                self.best[trial.trial_id] = [value, half]
            goal = self.stop.at
            if goal is not None and rank_key(value, self.rank_mode) >= rank_key(goal, self.rank_mode):
                self.end(tune_controller, "goal", f"{self.metric} {value:.4f} reached the goal "
                         f"{goal:g} (trial {trial.trial_id}, epoch {result.get('epoch')})")
        return action

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self.open.pop(trial.trial_id, None)
        super().on_trial_complete(tune_controller, trial, result)
        best = self.best.pop(trial.trial_id, None)
        if best is not None:
            self.finished.append([trial.trial_id, *best])
            self.check_converged(tune_controller)

    def check_converged(self, tune_controller) -> None:
        """``stop: {converged: K}``: end the sweep when the last K trials to end have not
        raised the best score by more than the half-width of its bootstrap interval."""
        k = self.stop.converged
        if not k or len(self.finished) <= k:
            return

        def key(entry):
            return rank_key(entry[1], self.rank_mode)

        before, now = max(self.finished[:-k], key=key), max(self.finished, key=key)
        gain, half = abs(now[1] - before[1]), now[2]
        if isinstance(half, (int, float)) and math.isfinite(half) and gain <= half:
            self.end(tune_controller, "converged", f"the last {k} trials to end raised the best "
                     f"{self.metric} by {gain:.4f}, within the half-width of its 95% interval "
                     f"({half:.4f}): converged")

    def end(self, tune_controller, kind: str, reason: str) -> None:
        """End the sweep, once: no new trial is suggested from now on, and at Tune's
        next step (once it has kept the checkpoint of the result that decided) the
        running ones stop; why goes in the run's ``end.json``."""
        if self.ended:
            return
        self.ended = reason
        print(f"\n{reason}; ending the sweep", flush=True)
        search = find_sweep_search(self.search_alg)
        if search is not None:
            search.finished = True
            if getattr(search, "run_folder", None) is not None:
                write_end(search.run_folder, kind, reason)
        self.ending = True

    def choose_trial_to_run(self, tune_controller):
        if self.ending:
            self.ending = False
            stop_experiment(tune_controller)
            return None
        return self.choose_after_missed_ends(tune_controller)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.open.pop(trial.trial_id, None)
        super().on_trial_remove(tune_controller, trial)

    def choose_after_missed_ends(self, tune_controller):
        self.tell_missed_ends()
        return super().choose_trial_to_run(tune_controller)

    def tell_missed_ends(self) -> list[str]:
        """Tell the searcher of the open trials Ray has ended without telling it
        (failed: FAIL in the study); their ids. Called at every step, and by the
        searcher before it holds new trials back and before it is saved (a trial that
        fails in the sweep's last step has no next step)."""
        missed = [trial for trial in self.open.values() if trial.is_finished()]
        for trial in missed:
            del self.open[trial.trial_id]
            failed = trial.status == trial.ERROR
            if self.search_alg is not None:
                self.search_alg.on_trial_complete(
                    trial.trial_id, result=trial.last_result or None, error=failed)
            print(f"note: trial {trial.trial_id} ended ({'failed' if failed else 'stopped'}) "
                  f"without Ray Tune telling the search; the study now has it", flush=True)
        return [trial.trial_id for trial in missed]


def scores_until(trial, metric: str, last: int | None) -> dict[int, float]:
    """Epoch -> ``metric`` from a trial's ``result.json`` on the run's storage, up to
    epoch ``last`` (what the run's snapshot knew of it); empty if unreadable."""
    rows = result_rows(RunFolder.on(trial.storage.storage_filesystem, trial.path))
    return {row["epoch"]: row[metric] for row in rows
            if isinstance(row.get("epoch"), int) and metric in row
            and (last is None or row["epoch"] <= last)}


def go_on_from_a_kept_checkpoint(trial) -> str | None:
    """Point a restored trial whose last registered checkpoint is gone at the newest
    checkpoint folder it still has (the trainable then takes the newest intact one,
    ``covid_tune.training.trial.restore``), or at none, to start again; the folder, or None when
    nothing was gone.

    A driver killed between two snapshots of the run may have gone on past the last
    one: a better checkpoint made Ray delete the one the snapshot names
    (``num_to_keep``), or the trial finished and kept only its best (``CheckpointTrim``).
    Ray would refuse that trial on every try ("does not exist on storage anymore").
    Ray has no public call for this (``_internals.point_at_checkpoint``); should the
    fields it sets change, the trial is left as Ray restored it.
    """
    result = trial.latest_checkpoint_result
    if result is None:
        return None
    named = result.checkpoint
    try:
        folders = checkpoint_folders(named.filesystem, os.path.dirname(named.path.rstrip("/")))
        if on_storage(named) and (not folders or folders[-1].rstrip("/") == named.path.rstrip("/")):
            return None
        point_at_checkpoint(trial, on_storage, tune.Checkpoint(
            folders[-1], filesystem=named.filesystem) if folders else None)
    except (ImportError, AttributeError, OSError):
        return None
    print(f"note: trial {trial.trial_id}: the run's last snapshot names its checkpoint "
          f"{os.path.basename(named.path)}, {'kept' if on_storage(named) else 'gone'} since; "
          f"it goes on from {os.path.basename(folders[-1]) if folders else 'the start'}",
          flush=True)
    return folders[-1] if folders else None


def on_storage(checkpoint: tune.Checkpoint) -> bool:
    return exists_on(checkpoint.filesystem, checkpoint.path)


class SnapshotCopy(tune.Callback):
    """Keeps a whole copy of each snapshot of the run Ray Tune saves
    (``SweepSearch.keep_snapshot``): Ray asks callbacks for their state once the
    trials, the searcher and its wrappers are written, before it copies them into the
    run folder. Listed before ``CheckpointTrim``, which trims what the copy lists as
    finished."""

    def __init__(self, searcher):
        self.searcher = searcher

    def get_state(self) -> None:
        search = find_sweep_search(self.searcher)
        if search is not None:
            search.keep_snapshot()


class CheckpointTrim(tune.Callback):
    """Keeps each trial's checkpoints to what is needed, on any storage
    (``covid_tune.runs.retention.drop_resume_state``, ``keep_best``): a new checkpoint takes the
    optimizer state out of the trial's older ones; a finished trial (completed, stopped
    or failed) keeps its best epoch's checkpoint, weights only, from the first snapshot
    of the run that lists it finished. Ray's own
    ``num_to_keep`` still deletes the rest while the trial runs. A storage error here
    is noted once and never stops the sweep."""

    def __init__(self, metric: str, mode: str):
        self.metric, self.mode = metric, mode
        self.noted = False
        self.finished: list = []
        """Trials ended since the last snapshot, trimmed at the next (``get_state``)."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        fs, newest = checkpoint.filesystem, checkpoint.path.rstrip("/")
        self.guard(lambda: [drop_resume_state(fs, folder) for folder in checkpoint_folders(
            fs, os.path.dirname(newest)) if folder.rstrip("/") != newest])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.__dict__.setdefault("finished", []).append(trial)  # or restored from before

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.__dict__.setdefault("finished", []).append(trial)

    def get_state(self) -> None:
        """Called by Ray Tune as it saves each snapshot of the run, after the searcher
        (whose save keeps the whole copy ``resume`` goes on from): the trials that
        ended before it are trimmed now, not when they ended, so a driver killed in
        between leaves a trial that the last snapshot calls running with the newest
        checkpoint it goes on from. Nothing is saved (None)."""
        self.trim_finished()

    def on_experiment_end(self, trials, **info) -> None:
        self.trim_finished()

    def trim_finished(self) -> None:
        finished, self.finished = getattr(self, "finished", []), []
        for trial in finished:
            checkpoint = trial.checkpoint
            if checkpoint is not None:
                self.guard(lambda kept=checkpoint: keep_best(kept.filesystem, os.path.dirname(
                    kept.path.rstrip("/")), self.metric, self.mode))

    def guard(self, work) -> None:
        try:
            work()
        except OSError as exc:
            if not self.noted:
                print(f"note: could not trim a trial's checkpoints ({exc}); they are kept "
                      f"whole", flush=True)
            self.noted = True


def diverged(trial) -> bool:
    """Whether the trial failed by diverging: the trainable wrote ``diverged.txt`` in
    its folder (``covid_tune.training.trial.diverged_marker``), which Ray uploads with
    the trial's files once its actor stops, so it is on the run's storage for a retried
    trial's last failure; a first failure, before that upload, is known by the error
    Ray keeps on the driver (``Trial.pickled_error_file``) being ``TrialDiverged``."""
    marker = join(trial.path, DIVERGED_FILE)
    try:
        if exists_on(trial.storage.storage_filesystem, marker):
            return True
    except OSError:
        pass
    return isinstance(latest_error(trial), TrialDiverged)


def latest_error(trial) -> BaseException | None:
    """The error of the trial's latest failure, as Ray pickled it on the driver (an
    ``ray.exceptions.RayTaskError`` that is also an instance of the trainable's error);
    None if there is none or it cannot be read."""
    try:
        with open(trial.pickled_error_file, "rb") as stream:
            return pickle.load(stream)
    except (TypeError, OSError, EOFError, pickle.UnpicklingError, AttributeError,
            ImportError):
        return None


def build_scheduler(space: SearchSpace, searcher=None) -> ASHAScheduler:
    """ASHA for the space, serving ``searcher`` (``build_searcher``'s)."""
    return SweepScheduler(time_attr="epoch", metric=space.metric, mode=space.mode,
                          max_t=space.max_epochs, grace_period=space.asha.grace_period,
                          reduction_factor=space.asha.reduction_factor,
                          search_alg=searcher, stop=space.stop)


def trial_dirname(trial) -> str:
    """Short trial folder names: ``trial_<id>`` (Ray's default embeds the config)."""
    return f"trial_{trial.trial_id}"


def build_trainable(bundle: DataBundle, opts: SweepOptions, trainable=train_trial):
    """``trainable`` with the decoded data (one object-store copy) and its resources."""
    resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(trainable, data=bundle), resources)


def run_config(space: SearchSpace, opts: SweepOptions, searcher,
               tracker: MlflowTracking | None = None) -> tune.RunConfig:
    return tune.RunConfig(
        name=opts.name,
        storage_path=opts.storage_path,
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                   SweepStatus(space.metric, space.mode, space.max_epochs),
                   SnapshotCopy(searcher), CheckpointTrim(space.metric, space.mode),
                   *([tracker] if tracker else [])],
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=opts.keep_checkpoints, checkpoint_score_attribute=CHECKPOINT_SCORE,
            checkpoint_score_order=space.mode),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=1 if opts.verbose else 0,
    )


def without_ray_tensorboard() -> None:
    """Keep Ray's TensorBoard logger out of the trial folders: each trial writes its own
    event files, whose HParams summary Ray's would replace (``run_config`` adds Ray's
    CSV and JSON loggers back). Also quiet Ray's warning that the run's state is saved
    often: with ``keep_checkpoints`` and short epochs that is by design."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@contextmanager
def as_found():
    """Leave the process as the sweep found it: ``os.environ`` (``without_ray_tensorboard``,
    ``start_ray``'s and ``fit``'s switches for Ray) and Optuna's log level
    (``build_searcher`` quiets it) are put back when the sweep ends, however it ends,
    so a program that calls ``run_sweep`` or ``resume_sweep`` keeps its own settings."""
    import optuna

    environ, verbosity = dict(os.environ), optuna.logging.get_verbosity()
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


def resolve(opts: SweepOptions) -> tuple[SweepOptions, SearchSpace]:
    """The options made absolute and named, and the space, checked; nothing decoded."""
    space = opts.space()
    name = opts.name or f"{space.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = replace(opts, name=name, storage_path=_absolute(opts.storage_path),
                   data=_absolute(opts.data),
                   warm_start=[_absolute(w.rstrip("/")) for w in opts.warm_start],
                   space_file=_absolute(str(find_space(opts.space_file))))
    open_path(opts.storage_path)  # an unknown URI scheme fails here, before decoding
    if opts.mlflow is not None and tracking_uri_problem(opts.mlflow):
        raise UserError(f"--mlflow {opts.mlflow}: {tracking_uri_problem(opts.mlflow)}")
    budget_seconds(opts.time_budget)
    backbones = space.params["backbone"]
    for backbone in getattr(backbones, "choices", None) or [backbones.value]:
        check_pretrained(backbone, space.pretrained)
    return opts, space


def budget_seconds(text: str | None) -> float | None:
    """``--time-budget`` in seconds (None: no budget); UserError naming the flag."""
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds is None:
        raise UserError(f"--time-budget {text}: not a duration; give one such as 90m, 2h "
                        f"or 1h30m")
    return seconds


def decode(layout: Layout, space: SearchSpace, strict: bool,
           held: list[str] | None = None, seed: int = 0) -> tuple[DataBundle, list[str]]:
    """The dataset decoded once for every trial, after checking that it fits in memory
    twice (this process's copy and the object store's), with the space's selection
    split moved out of Train: the ``held`` names a run recorded, or a new seeded draw
    in whole patient groups (``train_grouping``). Also the held-out names."""
    check_memory(layout, space.image_size, copies=2,
                 fix="pass --image-size with that size or less")
    bundle = load_dataset(layout, space.task, space.image_size, strict=strict)
    if held is None and space.selection.holdout:
        held = hold_out(bundle.splits["train"], space.selection.holdout, seed,
                        train_grouping(layout).groups)
        if not held:
            raise UserError(f"{space.source}: selection.holdout: the training split of "
                            f"{bundle.root} has too few images (or patient groups) per class "
                            f"to hold any out; add images or drop the selection key")
    bundle = with_selection(bundle, held or [])
    report_data(bundle)
    if layout.grouping is not None:  # a split drawn here: by patient group
        print(f"  patients: {layout.grouping.line()}")
    return bundle, held or []


def _absolute(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_sweep(opts: SweepOptions, trainable=train_trial) -> tune.ResultGrid:
    """Validate, decode the data once, record the run, then search; Ray's results.

    The run folder is held (``covid_tune.runs.lock``) from before decoding to the end;
    ``os.environ`` and Optuna's log level are left as they were (``as_found``).
    ``trainable`` is the trial function (``train_trial``; tests wrap it)."""
    opts, space = resolve(opts)
    run_dir = opts.run_dir()
    with hold(run_dir), as_found():
        if exists(join(run_dir, SWEEP_FILE)):
            raise UserError(f"{run_dir}: a sweep of this name exists; pick another --name "
                            f"or continue it with `covid-tune resume {run_dir}`")
        warm = warm_trials(space, opts.warm_start) if opts.warm_start else []
        if opts.warm_start:
            report_warm(warm, opts.warm_start)
        layout = scan(opts.data, space.task, spec=space.data)
        bundle, held = decode(layout, space, opts.strict, seed=opts.seed)
        start_ray(opts.address)
        check_resources(opts.cpus_per_trial, opts.gpus_per_trial)
        check_object_store(bundle_bytes(bundle), space.image_size)
        check_storage(opts.storage_path, opts.shared_storage)
        write_record(opts, space, opts.data, manifest(layout), held, assignment(layout),
                     layout.grouping.record() if layout.grouping else None)
        searcher = build_searcher(space, join(run_dir, STUDY_FILE), opts.name, opts.seed,
                                  opts.max_concurrent, run_dir, warm)
        without_ray_tensorboard()
        tracker = tracking(space, opts, run_dir, opts.mlflow or space.mlflow.tracking_uri)
        tuner = tune.Tuner(
            build_trainable(bundle, opts, trainable),
            tune_config=tune.TuneConfig(search_alg=searcher,
                                        scheduler=build_scheduler(space, searcher),
                                        num_samples=space.num_samples, reuse_actors=True,
                                        trial_dirname_creator=trial_dirname),
            run_config=run_config(space, opts, searcher, tracker),
        )
        results = fit(tuner, run_dir, tracker, opts.time_budget)
        attach_leaderboard(tracker, run_dir)
    report_best(results, space, run_dir)
    return results


def report_warm(warm: list, runs: list[str]) -> None:
    """Say how many earlier trials TPE starts from, run by run."""
    counts = {}
    for trial in warm:
        source = trial.user_attrs[WARM_START_ATTR]
        counts[source] = counts.get(source, 0) + 1
    print(f"warm start: TPE starts from {len(warm)} finished trial(s) of {len(runs)} earlier "
          f"run(s): " + ", ".join(f"{source} ({count})" for source, count in counts.items()))


def tracking(space: SearchSpace, opts: SweepOptions, run_dir: str,
             uri: str | None) -> MlflowTracking | None:
    """The sweep's MLflow tracking at ``uri`` (``covid_tune.search.tracking``); None
    when it is not tracked."""
    if not uri:
        return None
    settings = {**space.fixed_settings(), "num_samples": space.num_samples,
                "asha": {"grace_period": space.asha.grace_period,
                         "reduction_factor": space.asha.reduction_factor},
                "seed": opts.seed, "data": opts.data, "space_file": opts.space_file}
    return MlflowTracking(uri, space.mlflow.experiment, run_dir, opts.name, space.metric,
                          space.mode, space.max_epochs, settings)


def attach_leaderboard(tracker: MlflowTracking | None, run_dir: str) -> None:
    """With tracking on, the finished sweep's leaderboard, uploaded to its parent run
    (written in a temporary folder: the run folder is left as the sweep left it)."""
    if tracker is None or not tracker.on:
        return
    import tempfile

    from covid_tune.results.leaderboard import write_leaderboard

    with tempfile.TemporaryDirectory(prefix="covid-tune-leaderboard-") as folder:
        try:
            write_leaderboard([run_dir], folder)
        except Exception as exc:  # the trials are kept; the sweep's end must not fail here
            print(f"note: no leaderboard for MLflow ({one_line(exc)}); `covid-tune "
                  f"leaderboard {run_dir}` writes it", flush=True)
            return
        tracker.attach_leaderboard(folder)


def resume_sweep(run_dir: str | Path, address: str | None = None, data: str | None = None,
                 allow_changed_data: bool = False, trainable=train_trial,
                 mlflow: str | None = None, num_samples: int | None = None,
                 time_budget: str | None = None) -> tune.ResultGrid:
    """Continue a sweep whose driver died or was stopped: finished trials kept, the rest
    resumed.

    Ray restores the trials and the searcher (with the Optuna study) from the run's
    last snapshot; trials it lists as unfinished restart from their last checkpoint.
    ``address`` overrides the cluster address the sweep was started with; ``data``
    points at a moved copy of the dataset (checked against the run's manifest).
    ``run_dir`` is a local folder or a URI (``s3://bucket/runs/name?endpoint_override=...``),
    read and continued where the sweep wrote it. ``mlflow`` tracks it there (its runs
    go on where the run's ``mlflow.json`` says, else new ones start); by default a
    tracked sweep goes on being tracked where it was. ``num_samples`` raises the trial
    budget of a stopped or finished sweep (recorded in ``sweep.json``); ``time_budget``
    ends this resume as Ctrl-C does once the time is up.
    """
    if mlflow is not None and tracking_uri_problem(mlflow):
        raise UserError(f"--mlflow {mlflow}: {tracking_uri_problem(mlflow)}")
    budget_seconds(time_budget)
    run_dir = _absolute(str(run_dir).rstrip("/"))
    run = RunFolder(run_dir)
    record = read_record(run)
    opts = record.options
    space = read_space(run, record)
    with hold(run_dir), as_found():
        restored = put_back(run)
        if restored:
            print(f"note: Ray Tune's snapshot of the run was cut short or behind; it goes on "
                  f"from the whole copy kept in {SNAPSHOT_FILE} ({', '.join(restored)})")
        check_ray_state(run)
        if num_samples is not None:
            check_budget(run, num_samples)
        choice = choose_data(run, record, space.task, data, allow_changed_data,
                             required=True, spec=space.data)
        for note in choice.notes:
            print(f"note: {note}")
        bundle, _ = decode(choice.layout, space, opts.strict, read_selection(run, space))
        start_ray(address or opts.address)
        check_resources(opts.cpus_per_trial, opts.gpus_per_trial)
        check_object_store(bundle_bytes(bundle), space.image_size)
        check_storage(run_dir if is_uri(run_dir) else str(Path(run_dir).parent),
                      opts.shared_storage)
        without_ray_tensorboard()
        try:
            tuner = tune.Tuner.restore(run_dir,
                                       trainable=build_trainable(bundle, opts, trainable),
                                       resume_unfinished=True, resume_errored=True)
        except (ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            raise UserError(f"{run_dir}: Ray Tune cannot read its snapshot of the run "
                            f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
                            f"; it cannot be resumed, but its finished trials still give a "
                            f"leaderboard") from None
        tracked = read_tracking(run)
        tracker = tracking(space, opts, run_dir, mlflow or (tracked and tracked.tracking_uri)
                           or opts.mlflow or space.mlflow.tracking_uri)
        if tracked and tracker and tracker.tracking_uri == tracked.tracking_uri:
            tracker.experiment = tracked.experiment
        callbacks = run_callbacks(tuner)
        callbacks[:] = [c for c in callbacks if not isinstance(c, MlflowTracking)]
        callbacks.extend([tracker] if tracker else [])
        if num_samples is not None:
            grow(tuner, run, num_samples)
        clear_end(run)
        results = fit(tuner, run_dir, tracker, time_budget)
        set_aside_lost_trials(run_dir, results)
        attach_leaderboard(tracker, run_dir)
    report_best(results, space, run_dir)
    return results


def check_budget(run: RunFolder, num_samples: int) -> None:
    """``resume --num-samples N`` must raise the budget past the trials the run has."""
    have = len(trial_states(run))
    if num_samples <= have:
        raise UserError(f"--num-samples {num_samples}: {run.where()} already has {have} "
                        f"trials; give more than {have} to grow the sweep (or resume without "
                        f"it to finish the ones it has)")


def grow(tuner: tune.Tuner, run: RunFolder, num_samples: int) -> None:
    """Raise a restored sweep's trial budget: Ray's ``TuneConfig`` and the count Ray
    restores from the snapshot (``SweepScheduler`` sets it as trials are restored),
    and ``sweep.json``'s record."""
    config = restored_tune_config(tuner)
    config.num_samples = num_samples
    search = find_sweep_search(config.search_alg)
    if search is None:
        raise UserError(f"{run.where()}: this run's search cannot grow (it was written by an "
                        f"older covid-tune); start a new sweep with --warm-start {run.where()}")
    search.budget, search.finished = num_samples, False
    write_num_samples(run, num_samples)
    print(f"the sweep grows to {num_samples} trials")


def bundle_bytes(bundle: DataBundle) -> int:
    return sum(split.images.nbytes for split in bundle.splits.values())


STOP_GRACE_SECONDS = 8.0
"""How long Ray Tune's own graceful stop may take after Ctrl-C or SIGTERM before the
driver stops at once, from the run's last snapshot (as a second signal does)."""


def fit(tuner: tune.Tuner, run_dir: str, tracker: MlflowTracking | None = None,
        time_budget: str | None = None) -> tune.ResultGrid:
    """``tuner.fit()``, stopped cleanly by Ctrl-C or SIGTERM: Ray Tune saves the run's
    state (every trial keeps its last checkpoint), then ``Stopped`` says how to resume.
    A second signal, or a graceful stop that takes longer than ``STOP_GRACE_SECONDS``,
    stops at once; ``resume`` then goes on from the run's last snapshot. A sweep with
    nothing to run for too long ends with ``Stalled`` (``covid_tune.search.status``).
    ``time_budget`` spent stops it as Ctrl-C does, and it returns. Why it ended goes in
    the run's ``end.json`` (``write_end``), unless ``stop`` in the space ended it and
    said so there."""
    hint = f"continue with: covid-tune resume {shlex.quote(run_dir)}"
    with signals_stop_tune(budget_seconds(time_budget)) as received, closed(tracker):
        try:
            results = tuner.fit()
        except KeyboardInterrupt:
            if not received:
                raise
        except Exception as exc:
            stalled = stall_in(exc)
            if stalled is None:
                raise
            raise Stalled(f"{stalled}; finished trials and every other trial's last "
                          f"checkpoint are kept; {hint}") from None
    if received and received[0] == BUDGET:
        write_end(run_dir, "time budget", f"the time budget ({time_budget}) was spent; "
                                          f"finished trials and every other trial's last "
                                          f"checkpoint are kept; {hint}")
    elif received:
        name = signal.Signals(received[0]).name
        message = (f"stopped by {name}; finished trials and every other trial's last "
                   f"checkpoint are kept; {hint}")
        write_end(run_dir, "stopped", message)
        raise Stopped(received[0], message)
    elif read_end(run_dir) is None:
        write_end(run_dir, "finished", f"all {len(results)} trials ran")
    else:
        drop_unstarted(run_dir, results)
    return results


@contextmanager
def closed(tracker: MlflowTracking | None):
    """The tracker's last calls sent however the sweep ends (Ray Tune's end of the
    experiment closes it too, but not when the driver stops at once)."""
    try:
        yield
    finally:
        if tracker is not None:
            tracker.stopped_at_once()
            tracker.close(wait=10.0)


def stall_in(exc: BaseException) -> str | None:
    """The message of a ``Stalled`` raised by the status line, however Ray Tune
    wrapped it; None for any other error."""
    for _ in range(6):
        if exc is None:
            return None
        if isinstance(exc, Stalled):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


BUDGET = "time budget"
"""What ``signals_stop_tune`` lists when the time budget, not a signal, stopped it."""


@contextmanager
def signals_stop_tune(budget: float | None = None):
    """Turn SIGINT and SIGTERM, and ``budget`` seconds spent, into Ray Tune's own
    graceful stop (its SIGUSR1 handler, installed by ``fit``); the list it yields holds
    the signal received (or ``BUDGET``), if any. A second signal, or
    ``STOP_GRACE_SECONDS`` without the stop done, raises ``KeyboardInterrupt`` in the
    main thread.

    Only the main thread can set handlers; elsewhere (tests run sweeps in threads)
    signals keep their usual effect, and a budget is not kept (a note says so).
    """
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        if budget:
            print("note: the time budget needs the sweep in the main thread; it is not "
                  "kept here", flush=True)
        yield received
        return
    done = threading.Event()

    def stop_gracefully(cause, message: str) -> None:
        """Ray Tune's own stop (SIGUSR1), cut short after ``STOP_GRACE_SECONDS``."""
        received.append(cause)
        print(f"\n{message}; Ray Tune saves the run's state first", file=sys.stderr, flush=True)
        threading.Thread(target=stop_at_once_after_grace, args=(done,), daemon=True,
                         name="covid-tune-stop-grace").start()
        os.kill(os.getpid(), signal.SIGUSR1)

    def budget_spent():
        while signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN):
            if done.wait(0.2):  # Ray Tune listens once the sweep starts
                return
        if not received and not done.is_set():
            stop_gracefully(BUDGET, f"the time budget ({duration(budget)}) is spent: "
                                    f"stopping the sweep")

    timer = threading.Timer(budget, budget_spent) if budget else None
    if timer is not None:
        timer.daemon = True
        timer.start()

    def stop(signum, frame):
        if received or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN):
            raise KeyboardInterrupt  # again, or before Ray Tune listens: stop at once
        stop_gracefully(signum, f"{signal.Signals(signum).name}: stopping the sweep (send it "
                                f"again to stop at once)")

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ray's would hide which signal came
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(without_tune_restore_hints)
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis_log.addFilter(without_unstarted_trials)
    try:
        yield received
    finally:
        done.set()
        if timer is not None:
            timer.cancel()
        tune_log.removeFilter(without_tune_restore_hints)
        analysis_log.removeFilter(without_unstarted_trials)
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_at_once_after_grace(done: threading.Event) -> None:
    """Interrupt the main thread if Ray Tune's graceful stop is not done in time (it
    can wait on the searcher, or on actors that do not end)."""
    if not done.wait(STOP_GRACE_SECONDS):
        print(f"the graceful stop took over {STOP_GRACE_SECONDS:.0f} s; stopping at once",
              file=sys.stderr, flush=True)
        _thread.interrupt_main(signal.SIGINT)


def without_tune_restore_hints(record: logging.LogRecord) -> bool:
    """Drop Ray Tune's own stop messages, which point at ``Tuner.restore`` in Python:
    ``Stopped`` names the command that resumes the sweep."""
    text = record.getMessage()
    return not text.startswith(("Stop signal received", "Experiment has been interrupted"))


def without_unstarted_trials(record: logging.LogRecord) -> bool:
    """Drop Ray Tune's warning about trials without results when each one it names
    never started (its folder is empty): a sweep that ``stop`` ended leaves the trial
    Ray had queued next; ``drop_unstarted`` removes its folder."""
    text = record.getMessage()
    if not text.startswith("Failed to fetch metrics"):
        return True
    folders = re.findall(r"not found at (\S+?)'?\)", text)
    return not folders or any(not os.path.isdir(f) or os.listdir(f) for f in folders)


def drop_unstarted(run_dir: str, results: tune.ResultGrid) -> int:
    """Remove the empty folders of trials a ``stop`` ended before they started; how
    many."""
    run, dropped = RunFolder(run_dir), 0
    for result in results:
        name = os.path.basename(result.path.rstrip("/"))
        if not result.metrics and run.exists(name) and not run.files(name) \
                and not run.folders(name):
            run.fs.delete_dir(run.path(name))
            dropped += 1
    return dropped


def set_aside_lost_trials(run_dir: str, results: tune.ResultGrid) -> list[str]:
    """Move the folders of trials the resumed run does not know into ``lost_trials/``.

    A driver killed between two snapshots of the run may have started trials that the
    last snapshot does not list; the resumed run starts new ones in their place, so
    their folders would otherwise be counted twice by anything reading the run.
    """
    known = {os.path.basename(result.path.rstrip("/")) for result in results}
    run = RunFolder(run_dir)
    lost = [name for name in run.trial_folders() if name not in known]
    for name in lost:
        run.move((name,), (LOST_DIR, name))
    if lost:
        print(f"moved {len(lost)} folder(s) of trials lost with the old driver to "
              f"{run.where(LOST_DIR)}")
    return lost


def failure_summary(results) -> str | None:
    """When every trial failed: one line with how many and the first one's error (its
    last line, where Ray puts the exception); None otherwise."""
    if not len(results) or any(result.error is None for result in results):
        return None
    first = next(iter(results))
    lines = [line.strip() for line in str(first.error).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(first.error).__name__
    return (f"every trial failed ({len(results)} of {len(results)}); the first: "
            f"{reason[:300]} (see {first.path}/error.txt)")


def report_data(bundle: DataBundle) -> None:
    counts = ", ".join(f"{split} {len(s)}" for split, s in bundle.splits.items())
    print(f"data: {bundle.root} ({bundle.task}, {bundle.image_size} px): {counts}")
    if SELECTION in bundle.splits:
        print(f"  {SELECTION}: held out of train; it chooses (ASHA, TPE, best epoch, best "
              f"trial, thresholds), validation only reports")
    if bundle.skipped:
        print(f"  skipped {len(bundle.skipped)} unreadable file(s), e.g. "
              f"{bundle.skipped[0][0]}: {bundle.skipped[0][1]}")


def report_best(results: tune.ResultGrid, space: SearchSpace, run_dir: str) -> None:
    """Print the best trial (by its best epoch) and where its checkpoint is."""
    finished = [r for r in results if r.metrics and space.metric in r.metrics]
    end = read_end(run_dir)
    if not finished:
        print("no trial reported a result yet" if end and end.resumable else
              "no trial reported a result; see the errors above")
        if end is not None:
            print(f"  ended: {end.reason}")
        return
    best = results.get_best_result(space.metric, space.mode, scope="all")
    checkpoint = (best.get_best_checkpoint(space.metric, space.mode)
                  if best.best_checkpoints else None)
    errors = sum(1 for r in results if r.error)
    ran = sum(1 for r in results if r.metrics or r.error)
    print(f"\n{ran} trials, {errors} failed. Best trial {best.metrics['trial_id']}: "
          f"{space.metric} = {_best_value(best, space):.4f}")
    params = {k: best.config[k] for k in ("backbone", "frozen_layers", "lr", "loss")
              if k in best.config}
    print(f"  config: {params}")
    print(f"  checkpoint: {checkpoint.path if checkpoint else '(none kept)'}")
    print(f"  run dir: {run_dir}")
    if end is not None:
        print(f"  ended: {end.reason}")


def _best_value(result, space: SearchSpace) -> float:
    values = result.metrics_dataframe[space.metric]
    return float(max(values, key=lambda v: rank_key(v, space.mode)))
