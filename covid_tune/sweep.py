"""The search: Ray Tune runs the trials, Optuna's TPE picks them, ASHA stops weak ones.

``run_sweep`` validates everything first (search space, dataset, pretrained weights,
resources, shared storage), decodes the dataset once, then starts (or joins) Ray and
runs a ``Tuner``. The run directory ``<storage-path>/<name>`` (a local or shared
folder, or an ``s3://`` / ``gs://`` URI) is Ray Tune's own layout, readable by
``ray.tune.ExperimentAnalysis``, plus ``sweep.json`` (what was asked) and ``optuna.db``
(the Optuna study, for ``optuna.load_study`` or optuna-dashboard).

The study lives in the driver's memory and is saved with Ray's searcher state, in the
same snapshot as the trials, so a resumed sweep's study matches its trials exactly.
``optuna.db`` is an SQLite copy rewritten each time a trial ends.

``resume_sweep`` continues a sweep whose driver died: finished trials are kept, the
others resume from their last checkpoint, and the study carries on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from covid_tune.cluster import (check_resources, check_storage, exists, is_uri, join,
                                list_dirs, move_dir, open_path, read_bytes, start_ray,
                                write_bytes)
from covid_tune.config import SearchSpace, load_space
from covid_tune.data import DataBundle, load_dataset
from covid_tune.errors import UserError
from covid_tune.models import check_pretrained
from covid_tune.space import define_by_run, start_points
from covid_tune.train import train_trial

SWEEP_FILE = "sweep.json"
STUDY_FILE = "optuna.db"
LOST_DIR = "lost_trials"
"""Where ``resume`` moves the folders of trials the run's last snapshot did not list."""


@dataclass(frozen=True)
class SweepOptions:
    """What ``covid-tune sweep`` was asked to do (saved as ``sweep.json``)."""

    space_file: str
    data: str
    name: str = ""
    storage_path: str = "runs"
    num_samples: int | None = None
    max_epochs: int | None = None
    image_size: int | None = None
    pretrained: str | None = None
    max_concurrent: int | None = None
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    seed: int = 0
    max_failures: int = 2
    keep_checkpoints: int = 2
    strict: bool = False
    task: str | None = None
    shared_storage: bool = False
    """Skip the check that every node sees a local ``storage_path``."""

    def space(self) -> SearchSpace:
        return load_space(self.space_file).with_overrides(
            max_epochs=self.max_epochs, image_size=self.image_size,
            pretrained=self.pretrained, num_samples=self.num_samples)

    def run_dir(self) -> str:
        return join(self.storage_path, self.name)


class SweepSearch(OptunaSearch):
    """Ray's OptunaSearch with two fixes for sweeps that run trials in parallel.

    - A trial ASHA stopped before ``max_epochs`` is told to Optuna as PRUNED (Ray tells
      it COMPLETE at its low early score, which misleads TPE); an errored trial is FAIL.
    - Until ``n_startup`` trials have finished, no more than ``n_startup`` are started
      (Ray issue 52535: otherwise every trial started while the first ones run is drawn
      at random, far more than TPE's start-up count).

    Each time a trial ends, the study is written to ``study_file`` as SQLite.
    """

    def __init__(self, *args, max_epochs: int, n_startup: int, study_file: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs
        self.n_startup = n_startup
        self.study_file = study_file

    def suggest(self, trial_id: str):
        if trial_id not in self._ot_trials and self.waiting_for_startup():
            return None
        return super().suggest(trial_id)

    def waiting_for_startup(self) -> bool:
        started, finished = len(self._ot_trials), len(self._completed_trials)
        return started >= self.n_startup and finished < self.n_startup

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.tell_optuna(trial_id, result, error)
        self.save_study()

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self.save_study()  # the file may hold trials the restored snapshot does not

    def save_study(self) -> None:
        if not self.study_file:
            return
        try:
            write_bytes(self.study_file, study_as_sqlite(self._ot_study))
        except OSError as exc:  # a storage hiccup must not stop the sweep
            warnings.warn(f"could not write {self.study_file}: {exc}")

    def tell_optuna(self, trial_id: str, result: dict | None, error: bool) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        state = None
        if error:
            state = optuna.trial.TrialState.FAIL
        elif result and result.get("epoch", self.max_epochs) < self.max_epochs:
            state = optuna.trial.TrialState.PRUNED
        if state is None:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        step = (result or {}).get("training_iteration", (result or {}).get("epoch"))
        reported = self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values
        if state == optuna.trial.TrialState.PRUNED and step is not None and step not in reported:
            # Ray passes the result that made ASHA stop only here, not to on_trial_result.
            ot_trial.report(result[self.metric], step)
        try:
            self._ot_study.tell(ot_trial, state=state)
        except (ValueError, RuntimeError) as exc:
            warnings.warn(f"Optuna refused the result of {trial_id}: {exc}")
        self._completed_trials.add(trial_id)


def study_as_sqlite(study: optuna.Study) -> bytes:
    """An SQLite file holding ``study``, for ``optuna.load_study`` and optuna-dashboard."""
    memory = optuna.storages.RDBStorage("sqlite:///:memory:")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created"
    try:
        optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                          to_storage=memory)
    finally:
        optuna.logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, STUDY_FILE)
        target = sqlite3.connect(path)
        memory.engine.raw_connection().driver_connection.backup(target)
        target.close()
        return Path(path).read_bytes()


def n_startup_trials(space: SearchSpace) -> int:
    """TPE's random start-up trials: the hand-picked rows, or a third of the budget."""
    return max(len(space.start_with), min(10, max(2, space.num_samples // 3)))


def build_searcher(space: SearchSpace, study_path: str | None, name: str, seed: int,
                   max_concurrent: int | None) -> ConcurrencyLimiter | SweepSearch:
    """TPE in a ``SweepSearch``; the study is kept in memory and copied to ``study_path``
    (a local path or a URI) as SQLite each time a trial ends."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=n_startup_trials(space))
    searcher = SweepSearch(
        space=define_by_run(space), metric=space.metric, mode=space.mode,
        points_to_evaluate=start_points(space) or None, sampler=sampler,
        study_name=name, max_epochs=space.max_epochs, n_startup=n_startup_trials(space),
        study_file=study_path)
    if max_concurrent:
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return searcher


def build_scheduler(space: SearchSpace) -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode,
                         max_t=space.max_epochs, grace_period=space.asha.grace_period,
                         reduction_factor=space.asha.reduction_factor)


def trial_dirname(trial) -> str:
    """Short trial folder names: ``trial_<id>`` (Ray's default embeds the config)."""
    return f"trial_{trial.trial_id}"


def build_trainable(bundle: DataBundle, opts: SweepOptions):
    resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(train_trial, data=bundle), resources)


def run_config(space: SearchSpace, opts: SweepOptions) -> tune.RunConfig:
    return tune.RunConfig(
        name=opts.name,
        storage_path=opts.storage_path,
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=opts.keep_checkpoints, checkpoint_score_attribute=space.metric,
            checkpoint_score_order=space.mode),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=1,
    )


def without_ray_tensorboard() -> None:
    """Keep Ray's TensorBoard logger out of the trial folders: each trial writes its own
    event files, whose HParams summary Ray's would replace (``run_config`` adds Ray's
    CSV and JSON loggers back)."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"


def prepare(opts: SweepOptions) -> tuple[SweepOptions, SearchSpace, DataBundle]:
    """Everything that can fail on bad input, done before Ray starts."""
    space = opts.space()
    name = opts.name or f"{space.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = replace(opts, name=name, storage_path=_absolute(opts.storage_path))
    open_path(opts.storage_path)  # an unknown URI scheme fails here, before decoding
    backbones = space.params["backbone"]
    for backbone in getattr(backbones, "choices", None) or [backbones.value]:
        check_pretrained(backbone, space.pretrained)
    bundle = load_dataset(opts.data, space.task, space.image_size, strict=opts.strict)
    return opts, space, bundle


def _absolute(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_sweep(opts: SweepOptions) -> tune.ResultGrid:
    """Validate, decode the data once, then run the search; returns Ray's results."""
    opts, space, bundle = prepare(opts)
    report_data(bundle)
    run_dir = opts.run_dir()
    if exists(join(run_dir, SWEEP_FILE)):
        raise UserError(f"{run_dir}: a sweep of this name exists; pick another --name or "
                        f"continue it with `covid-tune resume {run_dir}`")
    start_ray(opts.address)
    check_resources(opts.cpus_per_trial, opts.gpus_per_trial)
    check_storage(opts.storage_path, opts.shared_storage)
    record_options(opts)
    searcher = build_searcher(space, join(run_dir, STUDY_FILE), opts.name, opts.seed,
                              opts.max_concurrent)
    without_ray_tensorboard()
    tuner = tune.Tuner(
        build_trainable(bundle, opts),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=build_scheduler(space),
                                    num_samples=space.num_samples,
                                    trial_dirname_creator=trial_dirname),
        run_config=run_config(space, opts),
    )
    results = tuner.fit()
    report_best(results, space, run_dir)
    return results


def resume_sweep(run_dir: str | Path, address: str | None = None) -> tune.ResultGrid:
    """Continue a sweep whose driver died: finished trials kept, the rest resumed.

    Ray restores the trials and the searcher (with the Optuna study) from the run's
    last snapshot; trials it lists as unfinished restart from their last checkpoint.
    ``address`` overrides the cluster address the sweep was started with.
    """
    run_dir = _absolute(str(run_dir)).rstrip("/")
    opts = read_options(run_dir)
    if not tune.Tuner.can_restore(run_dir):
        raise UserError(f"{run_dir}: the sweep stopped before Ray Tune saved any state, so "
                        f"there is nothing to resume; start it again with `covid-tune sweep` "
                        f"(another --name, or remove this folder)")
    space = opts.space()
    bundle = load_dataset(opts.data, space.task, space.image_size, strict=opts.strict)
    start_ray(address or opts.address)
    check_resources(opts.cpus_per_trial, opts.gpus_per_trial)
    check_storage(run_dir.rsplit("/", 1)[0], opts.shared_storage)
    without_ray_tensorboard()
    tuner = tune.Tuner.restore(run_dir, trainable=build_trainable(bundle, opts),
                               resume_unfinished=True, resume_errored=True)
    results = tuner.fit()
    set_aside_lost_trials(run_dir, results)
    report_best(results, space, run_dir)
    return results


def record_options(opts: SweepOptions) -> None:
    """Write ``sweep.json``, the first file of the run: storage trouble shows here."""
    path = join(opts.run_dir(), SWEEP_FILE)
    try:
        write_bytes(path, json.dumps(asdict(opts), indent=1).encode())
    except OSError as exc:
        raise UserError(f"{path}: cannot write to the storage path ({exc})") from None


def read_options(run_dir: str) -> SweepOptions:
    path = join(run_dir, SWEEP_FILE)
    if not exists(path):
        raise UserError(f"{run_dir}: not a covid-tune run (no {SWEEP_FILE}); pass the folder "
                        f"`covid-tune sweep` printed")
    try:
        return SweepOptions(**json.loads(read_bytes(path)))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a sweep record this version can read ({exc}); "
                        f"start the sweep again with `covid-tune sweep`") from None


def set_aside_lost_trials(run_dir: str, results: tune.ResultGrid) -> list[str]:
    """Move the folders of trials the resumed run does not know into ``lost_trials/``.

    A driver killed between two snapshots of the run may have started trials that the
    last snapshot does not list; the resumed run starts new ones in their place, so
    their folders would otherwise be counted twice by anything reading the run.
    """
    known = {os.path.basename(result.path.rstrip("/")) for result in results}
    lost = [name for name in list_dirs(run_dir) if name.startswith("trial_")
            and name not in known]
    for name in lost:
        move_dir(join(run_dir, name), join(run_dir, LOST_DIR, name))
    if lost:
        print(f"moved {len(lost)} folder(s) of trials lost with the old driver to "
              f"{join(run_dir, LOST_DIR)}")
    return lost


def report_data(bundle: DataBundle) -> None:
    counts = ", ".join(f"{split} {len(s)}" for split, s in bundle.splits.items())
    print(f"data: {bundle.root} ({bundle.task}, {bundle.image_size} px): {counts}")
    if bundle.skipped:
        print(f"  skipped {len(bundle.skipped)} unreadable file(s), e.g. "
              f"{bundle.skipped[0][0]}: {bundle.skipped[0][1]}")


def report_best(results: tune.ResultGrid, space: SearchSpace, run_dir: str) -> None:
    """Print the best trial (by its best epoch) and where its checkpoint is."""
    finished = [r for r in results if r.metrics and space.metric in r.metrics]
    if not finished:
        print("no trial reported a result; see the errors above")
        return
    best = results.get_best_result(space.metric, space.mode, scope="all")
    checkpoint = best.get_best_checkpoint(space.metric, space.mode)
    errors = sum(1 for r in results if r.error)
    print(f"\n{len(results)} trials, {errors} failed. Best trial {best.metrics['trial_id']}: "
          f"{space.metric} = {_best_value(best, space):.4f}")
    params = {k: best.config[k] for k in ("backbone", "frozen_layers", "lr", "loss")
              if k in best.config}
    print(f"  config: {params}")
    print(f"  checkpoint: {checkpoint.path if checkpoint else '(none kept)'}")
    print(f"  run dir: {run_dir}")


def _best_value(result, space: SearchSpace) -> float:
    values = result.metrics_dataframe[space.metric]
    return float(values.max() if space.mode == "max" else values.min())
