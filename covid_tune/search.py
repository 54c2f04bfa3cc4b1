"""Optuna's TPE inside Ray Tune, fixed for sweeps that run many trials at once.

``SweepSearch`` is Ray's ``OptunaSearch`` with three changes: a trial ASHA stopped is
told to Optuna as PRUNED, not COMPLETE at its low early score; new trials wait while
TPE's start-up trials run (Ray issue 52535); and the study is copied to ``optuna.db``
(SQLite) whenever a trial ends, for ``optuna.load_study`` and optuna-dashboard.

It reaches into ``OptunaSearch``'s private attributes (``_ot_study``, ``_ot_trials``,
``_completed_trials``), which is why ``pyproject.toml`` caps Ray and Optuna below their
next major versions; ``tests/test_search.py`` holds the contract.
"""

from __future__ import annotations

import copy
import math
import os
import sqlite3
import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from covid_tune.config import SearchSpace
from covid_tune.runs import STUDY_FILE
from covid_tune.space import define_by_run, start_points
from covid_tune.storage import write_bytes


class SweepSearch(OptunaSearch):
    """Ray's OptunaSearch with two fixes for sweeps that run trials in parallel.

    - A trial ASHA stopped before ``max_epochs`` is told to Optuna as PRUNED (Ray tells
      it COMPLETE at its low early score, which misleads TPE); an errored trial is FAIL,
      but a diverged one is PRUNED at the worst value seen, so TPE avoids its region.
    - Until ``n_startup`` trials have a result TPE learns from, no more than
      ``n_startup`` are started
      (Ray issue 52535: otherwise every trial started while the first ones run is drawn
      at random, far more than TPE's start-up count).

    Each time a trial ends, the study is written to ``study_file`` as SQLite. On
    ``resume``, trials that failed are reopened, to be told their new outcome.
    """

    def __init__(self, *args, max_epochs: int, n_startup: int, study_file: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs
        self.n_startup = n_startup
        self.study_file = study_file
        self.diverged: set[str] = set()
        """Trials whose loss became NaN or infinite (``SweepScheduler`` marks them)."""

    def suggest(self, trial_id: str):
        if trial_id not in self._ot_trials and self.waiting_for_startup():
            return None
        return super().suggest(trial_id)

    def waiting_for_startup(self) -> bool:
        """Whether TPE is still drawing at random: fewer than ``n_startup`` trials have
        a result it learns from (COMPLETE or PRUNED; TPE ignores FAIL). A failed trial
        does not release the hold, but nothing waits once no trial is running."""
        if len(self._ot_trials) < self.n_startup or getattr(self, "startup_done", False):
            return False
        states = [t.state for t in self._ot_study.get_trials(deepcopy=False)]
        learned = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
        running = sum(s == TrialState.RUNNING for s in states)
        self.startup_done = learned >= self.n_startup  # for good: no O(trials) scan per ask
        return not self.startup_done and running > 0

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.tell_optuna(trial_id, result, error)
        self.save_study()

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self.reopen_failed()
        self.save_study()  # the file may hold trials the restored snapshot does not

    def reopen_failed(self) -> None:
        """``resume`` runs the failed trials again (``resume_errored``): their FAIL entries
        go back to RUNNING, so the study hears their new outcome and still lists each
        trial once. Optuna has no public way to reopen a trial; this sets the in-memory
        storage's record (pinned versions, held by tests/test_search.py)."""
        storage = self._ot_study._storage
        for trial_id, ot_trial in self._ot_trials.items():
            frozen = storage.get_trial(ot_trial._trial_id)
            if frozen.state != TrialState.FAIL:
                continue
            reopened = copy.copy(frozen)
            reopened.state, reopened.datetime_complete = TrialState.RUNNING, None
            storage._set_trial(ot_trial._trial_id, reopened)
            self._completed_trials.discard(trial_id)

    def save_study(self) -> None:
        if not self.study_file:
            return
        try:
            write_bytes(self.study_file, study_as_sqlite(self._ot_study))
        except OSError as exc:  # a full disk or a storage hiccup must not stop the sweep
            if not getattr(self, "study_write_failed", False):
                print(f"note: could not write {self.study_file} "
                      f"({getattr(exc, 'strerror', None) or exc}); the previous copy is kept, "
                      f"the study itself lives in Ray's snapshot of the run, and the copy is "
                      f"tried again when the next trial ends", flush=True)
            self.study_write_failed = True
        else:
            self.study_write_failed = False

    def tell_optuna(self, trial_id: str, result: dict | None, error: bool) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
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


    def tell_diverged(self, trial_id: str) -> None:
        """PRUNED at the worst value the study has seen (TPE ignores FAIL, so it would
        never learn that this region of the space blows up)."""
        ot_trial = self._ot_trials[trial_id]
        seen = [v for t in self._ot_study.get_trials(deepcopy=False)
                for v in (*t.intermediate_values.values(), *(t.values or ()))
                if math.isfinite(v)]
        reported = self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values
        if seen:
            worst = max(seen) if self._mode == "min" else min(seen)
            ot_trial.report(worst, max(reported, default=0) + 1)
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def find_sweep_search(searcher) -> SweepSearch | None:
    """The ``SweepSearch`` inside Ray's wrappers (SearchGenerator, ConcurrencyLimiter)."""
    for _ in range(4):
        if isinstance(searcher, SweepSearch) or searcher is None:
            return searcher
        searcher = getattr(searcher, "searcher", None)
    return None


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
    (a local path or a URI) as SQLite each time a trial ends. Optuna's own INFO lines
    are turned off: the sweep's status line says what they would."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=n_startup_trials(space))
    searcher = SweepSearch(
        space=define_by_run(space, seed), metric=space.metric, mode=space.mode,
        points_to_evaluate=start_points(space) or None, sampler=sampler,
        study_name=name, max_epochs=space.max_epochs, n_startup=n_startup_trials(space),
        study_file=study_path)
    if max_concurrent:
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return searcher
