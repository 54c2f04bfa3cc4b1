"""Optuna's TPE inside Ray Tune, fixed for sweeps that run many trials at once.

``SweepSearch`` is Ray's ``OptunaSearch`` with three changes: a trial ASHA stopped is
told to Optuna as PRUNED, not COMPLETE at its low early score; new trials wait while
TPE's start-up trials run (Ray issue 52535); and the study is kept in ``optuna.db``
(SQLite) by ``StudyMirror``, one trial at a time, for ``optuna.load_study`` and
optuna-dashboard.

What ``OptunaSearch`` keeps private (its study, its trials, the ones told) is reached
through ``covid_tune.search._internals``, the one home of private Ray and Optuna names;
everything else here is Optuna's public API.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from covid_tune.core.ranking import rank_key
from covid_tune.core.space import SearchSpace
from covid_tune.errors import UserError
from covid_tune.runs.folder import STUDY_FILE, RunFolder
from covid_tune.runs.record import read_record, read_space
from covid_tune.runs.ray_state import drop_snapshot, keep_snapshot, session_of
from covid_tune.search._internals import ot_study, ot_trials, reopen, told
from covid_tune.search.define_by_run import define_by_run, start_points
from covid_tune.runs.storage import is_uri, write_bytes


class SweepSearch(OptunaSearch):
    """Ray's OptunaSearch with two fixes for sweeps that run trials in parallel.

    - A trial ASHA stopped before ``max_epochs`` is told to Optuna as PRUNED (Ray tells
      it COMPLETE at its low early score, which misleads TPE); an errored trial is FAIL,
      but a diverged one is PRUNED at the worst value seen, so TPE avoids its region.
    - Until ``n_startup`` trials have a result TPE learns from, no more than
      ``n_startup`` are started
      (Ray issue 52535: otherwise every trial started while the first ones run is drawn
      at random, far more than TPE's start-up count).

    With ``objectives`` in the space the search is a Pareto one: ``metric`` and
    ``mode`` are lists (the space's metric, then each deploy cost, minimised), the
    study has one direction per objective, and TPE learns from finished trials' values
    of all of them; Optuna takes no per-epoch values in such a study, so a stopped
    trial is PRUNED without one. ASHA still ranks trials by the space's metric alone.

    The study is mirrored into ``study_file`` (``StudyMirror``): a trial that ends at
    once, running trials' new epochs every ``StudyMirror.interval`` seconds. On
    ``resume``, trials that failed are reopened, to be told their new outcome.
    """

    def __init__(self, *args, max_epochs: int, n_startup: int, study_file: str | None = None,
                 run_dir: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs
        self.n_startup = n_startup
        self.study_file = study_file
        self.run_folder = RunFolder(run_dir) if run_dir else None
        """Where the whole copy of each snapshot goes (``keep_snapshot``); the scheduler
        points it at the run folder where Ray has it now (a resumed, moved run)."""
        self.asha: dict | None = None
        """ASHA's rungs at the last snapshot (``_internals.asha_state``), saved with
        the searcher so that ``resume`` puts them back."""
        self.snapshot_noted = False
        self.finished = False
        """``stop: {at, converged}`` ended the sweep: no more suggestions."""
        self.budget: int | None = None
        """``resume --num-samples``: the trial budget the scheduler raises Ray's count to."""
        self.diverged: set[str] = set()
        """Trials whose loss became NaN or infinite (``SweepScheduler`` marks them)."""
        self.scheduler = None
        """The sweep's ``SweepScheduler`` (it sets itself here; not saved with the
        searcher): asked to tell ends Ray missed before the start-up hold counts."""
        self.mirror = StudyMirror(study_file) if study_file else None
        if self.mirror:  # opening SQLite takes most of a second: before trials, not during
            self.mirror.sync(self.study, now=True)

    @property
    def pareto(self) -> bool:
        """Whether TPE searches deploy costs besides the metric (``objectives``): Optuna
        then takes no per-epoch values, and a trial ASHA stopped is PRUNED without one."""
        return isinstance(self.metric, list)

    @property
    def study(self) -> optuna.Study:
        """The Optuna study, in the driver's memory (saved with Ray's snapshot)."""
        return ot_study(self)

    def suggest(self, trial_id: str):
        if getattr(self, "finished", False):  # stop: {at, converged} ended the sweep
            return Searcher.FINISHED
        if trial_id not in ot_trials(self) and self.waiting_for_startup():
            return None
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict):
        """An epoch's score, as the trial's value at step ``epoch`` (not Ray's
        ``training_iteration``, which a resumed trial counts on from its re-report of
        the epoch it goes on from); an epoch the study holds already is skipped."""
        if not self.pareto and trial_id in ot_trials(self) and trial_id not in told(self):
            ot_trial, step = ot_trials(self)[trial_id], epoch_of(result)
            if step is not None and step not in self.frozen(ot_trial).intermediate_values:
                ot_trial.report(result[self.metric], step)
        if self.mirror:
            self.mirror.sync(self.study)

    def waiting_for_startup(self) -> bool:
        """Whether to hold new trials while TPE is still drawing at random: fewer than
        ``n_startup`` trials have a result it learns from (COMPLETE or PRUNED; TPE
        ignores FAIL), and Ray still runs a trial that may give one. A failed trial does
        not release the hold, but nothing waits once Ray runs none of this search's
        trials: what counts is the trials suggested and not yet ended in Ray (every end
        reaches ``on_trial_complete``; ``SweepScheduler`` tells the ones Ray misses),
        not the study's RUNNING trials."""
        if len(ot_trials(self)) < self.n_startup or getattr(self, "startup_done", False):
            return False
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        learned = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
        self.startup_done = learned >= self.n_startup  # for good: no O(trials) scan per ask
        return not self.startup_done and self.in_ray() > 0

    def in_ray(self) -> int:
        """How many of this search's trials Ray has not ended yet."""
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.tell_missed_ends()
        ended = told(self)
        return sum(trial_id not in ended for trial_id in ot_trials(self))

    def save(self, checkpoint_path: str):
        """Saved with every snapshot of the run, the last one after Tune's loop ended:
        ends Ray missed in the last step reach the study first."""
        scheduler, self.scheduler = getattr(self, "scheduler", None), None
        if scheduler is not None:
            scheduler.tell_missed_ends()
            self.asha = scheduler.state()
        try:
            super().save(checkpoint_path)
        finally:
            self.scheduler = scheduler
        self.saved_to = checkpoint_path

    def keep_snapshot(self) -> None:
        """A whole copy of the snapshot Ray has just saved (this searcher's state went
        to ``saved_to``, beside the rest of it), in the run folder
        (``covid_tune.runs.ray_state.keep_snapshot``); one note if it cannot be
        written, and the old copy goes, so ``resume`` never takes an older one than
        Ray's. Called by ``SnapshotCopy`` once Ray has written the whole snapshot."""
        saved_to, run_folder = getattr(self, "saved_to", None), getattr(self, "run_folder", None)
        session = session_of(saved_to) if saved_to else None
        if run_folder is None or session is None:
            return
        try:
            keep_snapshot(run_folder, os.path.dirname(saved_to), session)
        except OSError as exc:
            with contextlib.suppress(OSError):
                drop_snapshot(run_folder)
            if not getattr(self, "snapshot_noted", False):
                print(f"note: could not keep a copy of the run's snapshot ({exc}); resume "
                      f"goes on from Ray Tune's own files", flush=True)
            self.snapshot_noted = True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.tell_optuna(trial_id, result, error)
        if self.mirror:
            self.mirror.sync(self.study, now=True)

    def restore(self, checkpoint_path: str):
        study_file, scheduler = self.study_file, getattr(self, "scheduler", None)
        run_folder, budget = getattr(self, "run_folder", None), getattr(self, "budget", None)
        super().restore(checkpoint_path)
        self.study_file = study_file or self.study_file
        self.run_folder = run_folder or getattr(self, "run_folder", None)
        if budget:  # resume --num-samples, set before Ray restored the saved state
            self.budget, self.finished = budget, False
        self.scheduler = scheduler
        if scheduler is not None:  # ASHA's rungs as they were, or rebuilt from results
            scheduler.take_over(getattr(self, "asha", None))
        self.reopen_failed()
        if self.study_file:  # the file may hold trials the restored snapshot does not
            self.mirror = StudyMirror(self.study_file)
            self.mirror.rebuild(self.study)

    def reopen_failed(self) -> None:
        """``resume`` runs the failed trials again (``resume_errored``): their FAIL entries
        go back to RUNNING, so the study hears their new outcome and still lists each
        trial once (Optuna has no public way to reopen a trial: ``_internals.reopen``)."""
        trials = self.study.get_trials(deepcopy=False)
        for trial_id, ot_trial in ot_trials(self).items():
            if trials[ot_trial.number].state == TrialState.FAIL:
                reopen(self.study, ot_trial)
                told(self).discard(trial_id)

    def tell_optuna(self, trial_id: str, result: dict | None, error: bool) -> None:
        if trial_id in told(self) or trial_id not in ot_trials(self):
            return super().on_trial_complete(trial_id, result, error)
        state = None
        if error and trial_id in getattr(self, "diverged", ()):
            return self.tell_diverged(trial_id)
        if error:
            state = optuna.trial.TrialState.FAIL
        elif result and result.get("epoch", self.max_epochs) < self.max_epochs:
            state = optuna.trial.TrialState.PRUNED
        if state is None:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = ot_trials(self)[trial_id]
        step = epoch_of(result or {})
        reported = self.frozen(ot_trial).intermediate_values
        if (state == optuna.trial.TrialState.PRUNED and step is not None
                and step not in reported and not self.pareto):
            # Ray passes the result that made ASHA stop only here, not to on_trial_result.
            ot_trial.report(result[self.metric], step)
        try:
            self.study.tell(ot_trial, state=state, skip_if_finished=True)
        except (ValueError, RuntimeError) as exc:
            warnings.warn(f"Optuna refused the result of {trial_id}: {exc}")
        told(self).add(trial_id)


    def tell_diverged(self, trial_id: str) -> None:
        """PRUNED at the worst value the study has seen (TPE ignores FAIL, so it would
        never learn that this region of the space blows up)."""
        ot_trial = ot_trials(self)[trial_id]
        seen = [v for t in self.study.get_trials(deepcopy=False)
                for v in (*t.intermediate_values.values(), *(t.values or ()))
                if math.isfinite(v)]
        reported = self.frozen(ot_trial).intermediate_values
        if seen and not self.pareto:  # a multi-objective study takes no intermediate value
            worst = min(seen, key=lambda v: rank_key(v, self.mode))
            ot_trial.report(worst, max(reported, default=0) + 1)
        self.study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        told(self).add(trial_id)

    def frozen(self, ot_trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        """What the study holds of ``ot_trial`` now (its number is its place)."""
        return self.study.get_trials(deepcopy=False)[ot_trial.number]


def epoch_of(result: dict) -> int | None:
    """The epoch a result reports (Ray's iteration count for results without one)."""
    return result.get("epoch", result.get("training_iteration"))


def find_sweep_search(searcher) -> SweepSearch | None:
    """The ``SweepSearch`` inside Ray's wrappers (SearchGenerator, ConcurrencyLimiter)."""
    for _ in range(4):
        if isinstance(searcher, SweepSearch) or searcher is None:
            return searcher
        searcher = getattr(searcher, "searcher", None)
    return None


class StudyMirror:
    """The driver's in-memory study, kept in an SQLite file (``optuna.db``) one trial at
    a time, so each write costs the same at trial 1000 as at trial 1.

    ``sync`` adds the trials started since the last call and brings the unfinished ones
    it holds up to date (new epochs, then the end state), in the study's order, so the
    file's trial numbers are the study's. A trial that ends is written at once; running
    trials' epochs at most every ``interval`` seconds. A file behind a URI is written
    locally and uploaded at most every ``upload_every`` seconds, and whenever no trial
    is left running (a sweep's end). After a failed write (a full disk) the previous
    file is kept, one note is printed, and the next ``sync`` writes the whole study
    afresh (``rebuild``, also used on ``resume``)."""

    interval = 5.0
    upload_every = 20.0

    def __init__(self, target: str):
        self.target = target
        self.local = target if not is_uri(target) else os.path.join(
            tempfile.mkdtemp(prefix="covid-tune-study-"), STUDY_FILE)
        self.db: optuna.storages.RDBStorage | None = None
        self.study_id = 0
        self.rows: list[int] = []
        """The file's trial id of each trial number written."""
        self.written: dict[int, tuple] = {}
        """Trial number -> what the file holds of it (``shown``), for trials written
        before they ended."""
        self.last_sync = self.last_upload = -math.inf
        self.failed = False
        """A write failed: the next sync rebuilds the file from the study."""
        self.noted = False
        """The one note about a failed write has been printed."""

    def __getstate__(self) -> dict:
        return {"target": self.target}  # Ray's snapshot: an open database is not part of it

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["target"])

    def sync(self, study: optuna.Study, now: bool = False) -> None:
        clock = time.monotonic()
        if not now and clock - self.last_sync < self.interval:
            return
        self.last_sync = clock
        if self.failed:
            return self.rebuild(study)
        try:
            self.write_changes(study)
        except Exception as exc:  # SQLite on a full disk fails in SQLAlchemy's many ways
            self.note_failure(exc)
            return
        self.upload(study, clock)

    def write_changes(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        if self.db is None:
            self.open_file(study)
        for frozen in trials[len(self.rows):]:
            self.rows.append(self.db.create_new_trial(self.study_id, template_trial=frozen))
            if not frozen.state.is_finished():
                self.written[frozen.number] = shown(frozen)
        for number in sorted(self.written):
            self.write_trial(trials[number], self.rows[number], self.written.pop(number))

    def write_trial(self, frozen, row: int, before: tuple) -> None:
        """What changed in an unfinished trial since ``before`` (``shown``): an enqueued
        trial's parameters once it is asked, new epochs, the end state."""
        state, params, steps = before
        for name in list(frozen.params)[len(params):]:
            distribution = frozen.distributions[name]
            self.db.set_trial_param(row, name, distribution.to_internal_repr(
                frozen.params[name]), distribution)
        for step in sorted(frozen.intermediate_values)[steps:]:
            self.db.set_trial_intermediate_value(row, step, frozen.intermediate_values[step])
        if frozen.state.is_finished():
            for key, value in frozen.user_attrs.items():
                self.db.set_trial_user_attr(row, key, value)
        if frozen.state != state:
            self.db.set_trial_state_values(row, frozen.state, frozen.values)
        if not frozen.state.is_finished():
            self.written[frozen.number] = shown(frozen)

    def open_file(self, study: optuna.Study) -> None:
        """A new, empty file for the study (replacing one left from before)."""
        for suffix in ("", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.local + suffix)
        os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
        self.db = quiet_storage(self.local)
        self.study_id = self.db.create_new_study(study.directions, study.study_name)
        self.rows, self.written = [], {}

    def rebuild(self, study: optuna.Study) -> None:
        """The whole study written afresh (beside the file, then moved over it)."""
        self.close()
        try:
            write_bytes(self.local, study_as_sqlite(study))
            self.db = quiet_storage(self.local)
            self.study_id = self.db.get_study_id_from_name(study.study_name)
            trials = self.db.get_all_trials(self.study_id, deepcopy=False)
            self.rows = [self.db.get_trial_id_from_study_id_trial_number(
                self.study_id, t.number) for t in trials]
            self.written = {t.number: shown(t) for t in trials if not t.state.is_finished()}
        except Exception as exc:
            self.close()
            self.note_failure(exc)
            return
        self.failed = False
        self.upload(study, time.monotonic(), force=True)

    def upload(self, study: optuna.Study, clock: float, force: bool = False) -> None:
        """Copy the local file to the URI: when due, or when no trial is running."""
        if self.local == self.target:
            return
        running = any(not t.state.is_finished() for t in study.get_trials(deepcopy=False))
        if not force and running and clock - self.last_upload < self.upload_every:
            return
        try:
            write_bytes(self.target, Path(self.local).read_bytes())
        except OSError as exc:
            self.note_failure(exc, rebuild=False)
            return
        self.last_upload = clock

    def note_failure(self, exc: Exception, rebuild: bool = True) -> None:
        if not self.noted:
            cause = root_cause(exc)
            why = getattr(cause, "strerror", None) or str(cause).splitlines()[0][:200]
            print(f"note: could not write {self.target} ({why}); the previous copy is kept, "
                  f"the study itself lives in Ray's snapshot of the run, and it is written "
                  f"again with the next trial's news", flush=True)
            self.noted = True
        if rebuild:
            self.close()
            self.failed = True

    def close(self) -> None:
        if self.db is not None:
            self.db.engine.dispose()
        self.db = None


def shown(frozen) -> tuple:
    """What a file holds of a trial it was given unfinished: state, parameter names, and
    the number of epochs."""
    return frozen.state, tuple(frozen.params), len(frozen.intermediate_values)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error: Optuna wraps SQLAlchemy's, which wraps sqlite3's."""
    for _ in range(8):
        inner = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def quiet_storage(path: str) -> optuna.storages.RDBStorage:
    """Optuna's SQLite storage for ``path``, without its INFO lines."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.storages.RDBStorage(f"sqlite:///{path}")
    finally:
        optuna.logging.set_verbosity(verbosity)


def study_as_sqlite(study: optuna.Study) -> bytes:
    """An SQLite file holding ``study``, for ``optuna.load_study`` and optuna-dashboard."""
    memory = optuna.storages.RDBStorage("sqlite:///:memory:")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created"
    try:
        written = optuna.create_study(storage=memory, study_name=study.study_name,
                                      directions=study.directions)
        for key, value in study.user_attrs.items():
            written.set_user_attr(key, value)
        written.add_trials(study.get_trials(deepcopy=False))
    finally:
        optuna.logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, STUDY_FILE)
        target = sqlite3.connect(path)
        memory.engine.raw_connection().driver_connection.backup(target)
        target.close()
        return Path(path).read_bytes()


WARM_START_ATTR = "warm_start"
"""The user attribute of a trial added from an earlier run: that run's folder."""


def warm_trials(space: SearchSpace, runs: list[str]) -> list[optuna.trial.FrozenTrial]:
    """The finished trials (COMPLETE and PRUNED: what TPE learns from) of earlier runs,
    as trials of ``space``: a parameter ``space`` fixes is dropped, a trial with a value
    outside a range ``space`` narrowed (or a parameter it never had) is left out. A run
    of another task, metric or objectives is refused in one line."""
    found = []
    for where in runs:
        run = RunFolder(where)
        earlier = read_space(run, read_record(run))
        if (earlier.task, earlier.metric, earlier.objectives) != (
                space.task, space.metric, space.objectives):
            raise UserError(f"--warm-start {run.where()}: its trials were scored for "
                            f"{goal_text(earlier)}, this sweep's are for {goal_text(space)}; "
                            f"warm-start from a run of the same task and metric")
        if not run.exists(STUDY_FILE):
            raise UserError(f"--warm-start {run.where()}: no {STUDY_FILE} (the run stopped "
                            f"before its first trial); pick a run with finished trials")
        with run.local_file(STUDY_FILE) as path:
            storage = quiet_storage(str(path))
            try:
                name = storage.get_all_studies()[0].study_name
                trials = optuna.load_study(study_name=name, storage=storage).get_trials(
                    states=(TrialState.COMPLETE, TrialState.PRUNED))
            finally:
                storage.engine.dispose()
        found += [t for t in (refit(space, trial, run.where()) for trial in trials) if t]
    return found


def goal_text(space: SearchSpace) -> str:
    costs = f" and {', '.join(space.objectives)}" if space.objectives else ""
    return f"{space.task} by {space.metric}{costs}"


def refit(space: SearchSpace, trial: optuna.trial.FrozenTrial,
          source: str) -> optuna.trial.FrozenTrial | None:
    """``trial`` as a trial of ``space``'s define-by-run function (its distributions),
    or None when one of its values lies outside them or it lacks a searched one."""
    probe = optuna.create_study()  # in memory: only asked, never told
    probe.enqueue_trial(trial.params, skip_if_exists=False)
    asked = probe.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns of fixed values out of range
        define_by_run(space)(asked)
    for name, value in asked.params.items():
        if name not in trial.params or not within(asked.distributions[name], value):
            return None
    return optuna.trial.create_trial(
        state=trial.state, values=trial.values,
        params=dict(asked.params), distributions=dict(asked.distributions),
        intermediate_values=dict(trial.intermediate_values) if len(space.objectives) == 0
        else None, user_attrs={WARM_START_ATTR: source, "warm_start_number": trial.number})


def within(distribution, value) -> bool:
    """Whether ``value`` is one ``distribution`` can give."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def n_startup_trials(space: SearchSpace) -> int:
    """TPE's random start-up trials: the hand-picked rows, or a third of the budget."""
    return max(len(space.start_with), min(10, max(2, space.num_samples // 3)))


def build_searcher(space: SearchSpace, study_path: str | None, name: str, seed: int,
                   max_concurrent: int | None, run_dir: str | None = None,
                   warm: list[optuna.trial.FrozenTrial] = ()) -> ConcurrencyLimiter | SweepSearch:
    """TPE in a ``SweepSearch``; the study is kept in memory and mirrored into
    ``study_path`` (a local path or a URI) as SQLite (``StudyMirror``). Optuna's own INFO lines
    are turned off: the sweep's status line says what they would."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=n_startup_trials(space))
    metric, mode = space.metric, space.mode
    if space.objectives:  # a Pareto search: the metric, then each cost, lower is better
        metric, mode = [metric, *space.objectives], [mode, *["min"] * len(space.objectives)]
    points = [point for point in start_points(space)  # a hand row run before is learned
              if not any(point == {k: t.params.get(k) for k in point} for t in warm)]
    searcher = SweepSearch(
        space=define_by_run(space, seed), metric=metric, mode=mode,
        points_to_evaluate=points or None, sampler=sampler,
        study_name=name, max_epochs=space.max_epochs, n_startup=n_startup_trials(space),
        study_file=study_path, run_dir=run_dir)
    if warm:
        searcher.study.add_trials(warm)
        if searcher.mirror:
            searcher.mirror.sync(searcher.study, now=True)
    if max_concurrent:
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return searcher
