"""Every use of a private Ray Tune or Optuna name in covid-tune, in one place.

Each function here reaches past a public API because none does the job; each has a test
in ``tests/search/test_internals.py`` that fails if the name it relies on goes away, so
an upgrade of Ray or Optuna breaks there first, with the name in the failure.
``pyproject.toml`` pins Ray and Optuna to the minor versions those tests ran on.

This module imports nothing from covid-tune, and nothing heavier than Ray and Optuna:
the trainable (``covid_tune.training.trial``) imports it too, without the driver.

The private names, and why no public route exists:

Ray Tune
- ``TrialRunnerWrapper._tune_controller``, ``TuneController._storage``
  (``controller_storage``): a scheduler hook gets a wrapper that lets only a few names
  through; the run's storage, where a resumed run folder is now, is not one of them.
- ``_CheckpointManager._checkpoint_results``, ``._latest_checkpoint_result`` and
  ``ray.train._internal.session._TrainingResult`` (``point_at_checkpoint``): Ray has no
  call to point a restored trial at another checkpoint than the one its snapshot names.
- ``ray.train._internal.session.get_session`` and ``_TrainSession.stop_event``
  (``trial_session``, ``asked_to_stop``): Tune tells a trial to stop only through its
  next ``report``; a trial that trains between reports has no public way to ask.
- ``Tuner._local_tuner`` (``run_callbacks``, ``restored_tune_config``): ``Tuner.restore``
  brings back the run's ``RunConfig`` and ``TuneConfig``, callbacks and searcher
  included, and takes no new ones; ``resume --mlflow`` must change where the sweep is
  tracked, ``resume --num-samples`` its budget.
- ``SearchGenerator._total_samples``, ``._finished`` (``raise_budget``): the trial
  budget Ray restores from the snapshot over the ``TuneConfig``'s.
- ``TuneController.request_stop_experiment`` behind the scheduler's
  ``TrialRunnerWrapper`` (``stop_experiment``): a scheduler cannot end a sweep
  publicly; ``stop: {at, converged}`` is decided where every result arrives.
- ``AsyncHyperBandScheduler._brackets``, ``._num_stopped``, ``._trial_info``,
  ``._metric_op`` and ``_Bracket._rungs`` (``asha_state``, ``set_asha_state``,
  ``asha_record``): Ray Tune saves no scheduler with its snapshot (issue 30838; the PR
  that would, 30952, was closed unmerged), so ASHA's rungs are empty after a resume.
- ``RAY_STORAGE_LOGGER`` (``ray.train._internal.storage``): the logger that notes every
  artifact upload; only its private module name reaches it.

Optuna inside Ray's ``OptunaSearch``
- ``OptunaSearch._ot_study``, ``._ot_trials``, ``._completed_trials`` (``ot_study``,
  ``ot_trials``, ``told``): the study, the Optuna trial of each Ray trial, and the Ray
  trials already told; ``OptunaSearch`` keeps them and exposes none.
- ``Study._storage``, ``Trial._trial_id`` and ``InMemoryStorage._set_trial``
  (``reopen``): Optuna never lets a finished trial run again; ``resume`` re-runs failed
  trials, and the study must hear their new outcome on the same trial.
"""

from __future__ import annotations

import copy

RAY_STORAGE_LOGGER = "ray.train._internal.storage"
"""The name of Ray's logger that notes each upload of a trial's files."""


# Ray Tune: the driver ------------------------------------------------------------

def controller_storage(tune_controller):
    """The run's storage (Ray's ``StorageContext``) seen from a scheduler hook.

    Tune hands schedulers a ``TrialRunnerWrapper`` that only lets whitelisted names
    through; the storage is not one of them."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    return getattr(controller, "_storage", None)


def run_callbacks(tuner) -> list:
    """The callbacks a restored ``Tuner`` will run with: the list itself, to change in
    place."""
    run_config = tuner._local_tuner.get_run_config()
    if run_config.callbacks is None:
        run_config.callbacks = []
    return run_config.callbacks


def stop_experiment(tune_controller) -> None:
    """End the sweep from a scheduler hook: no new trials, running ones stopped (as
    ``RunConfig(stop=...)``'s ``stop_all`` does, but decided by the scheduler, whose
    state covers every trial's results); the hook's wrapper hides the call."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller.request_stop_experiment()


def restored_tune_config(tuner):
    """The ``TuneConfig`` a restored ``Tuner`` runs with (its searcher, its
    ``num_samples``), to change in place; ``Tuner.restore`` takes no new one."""
    return tuner._local_tuner._tune_config


def raise_budget(search_generator, num_samples: int) -> None:
    """Let Ray's ``SearchGenerator`` (what a scheduler hook sees as ``search_alg``)
    create trials up to ``num_samples``: it restores its count and ``finished`` flag
    from the run's snapshot, after the ``TuneConfig`` is read."""
    search_generator._total_samples = num_samples
    search_generator._finished = False


def in_run_folder(trial, storage) -> bool:
    """Point a new trial at the run folder where it is now, if it pointed elsewhere; True
    when it was moved.

    Ray restores the search algorithm with the experiment it was first given, storage
    included, so after ``resume`` of a run folder that was moved (or copied) new trials
    would be written to the old place. Restored trials are fixed by Ray itself
    (``TuneController._restore_trials``); this does the same for new ones."""
    if storage is None:
        return False
    if (trial.storage.storage_fs_path == storage.storage_fs_path
            and trial.storage.experiment_dir_name == storage.experiment_dir_name):
        return False
    moved = copy.copy(trial.storage)
    moved.storage_filesystem = storage.storage_filesystem
    moved.storage_fs_path = storage.storage_fs_path
    moved.experiment_dir_name = storage.experiment_dir_name
    trial.set_storage(moved)
    return True


def point_at_checkpoint(trial, kept, checkpoint) -> None:
    """Make ``checkpoint`` (a ``ray.tune.Checkpoint``, or None to start afresh) the
    trial's latest, and drop the registered checkpoints ``kept`` refuses; the latest
    result's metrics stay. Raises ImportError or AttributeError where Ray changed the
    fields."""
    from ray.train._internal.session import _TrainingResult

    manager = trial.run_metadata.checkpoint_manager
    metrics = manager.latest_checkpoint_result.metrics
    manager._checkpoint_results = [r for r in manager._checkpoint_results
                                   if kept(r.checkpoint)]
    manager._latest_checkpoint_result = (
        _TrainingResult(checkpoint=checkpoint, metrics=metrics) if checkpoint else None)
    trial.run_metadata.invalidate_cache()
    trial.invalidate_json_state()


def asha_state(scheduler) -> dict:
    """What ASHA has learned: each bracket's rungs (milestone, and the score each trial
    had there: the metric times +1 or -1) and how many trials it stopped. Ray Tune
    does not save a scheduler with its snapshot (Ray issue 30838)."""
    return {"rungs": [[[milestone, dict(recorded)] for milestone, recorded in bracket._rungs]
                      for bracket in scheduler._brackets],
            "stopped": scheduler._num_stopped}


def set_asha_state(scheduler, state: dict) -> None:
    """Put back what ``asha_state`` gave."""
    for bracket, rungs in zip(scheduler._brackets, state["rungs"]):
        bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
    scheduler._num_stopped = state["stopped"]


def asha_record(scheduler, trial_id: str, epochs: dict[int, float]) -> None:
    """Record a trial's scores at the rungs it passed (``epochs``: epoch -> metric), as
    ASHA would have on seeing each result: at a rung's milestone, the first epoch that
    reached it; rungs that already hold the trial are left alone."""
    bracket = scheduler._trial_info.get(trial_id, scheduler._brackets[0])
    for milestone, recorded in bracket._rungs:
        reached = [epoch for epoch in sorted(epochs) if epoch >= milestone]
        if reached and trial_id not in recorded:
            recorded[trial_id] = scheduler._metric_op * epochs[reached[0]]


# Ray Tune: inside a trial --------------------------------------------------------

def trial_session():
    """This trial's Ray session (None outside Tune, or where Ray moved it)."""
    try:
        from ray.train._internal.session import get_session
    except ImportError:
        return None
    return get_session()


def asked_to_stop(session) -> bool:
    """Whether Ray Tune has asked the trial of ``session`` to end: the session's stop
    event, which Tune sets when it stops the trial or reuses its actor. False where the
    field is missing (another Ray) or outside Tune; the stop then still arrives through
    the next report."""
    event = getattr(session, "stop_event", None)
    return bool(event is not None and event.is_set())


# Optuna inside Ray's OptunaSearch -------------------------------------------------

def ot_study(searcher):
    """The ``optuna.Study`` an ``OptunaSearch`` asks and tells."""
    return searcher._ot_study


def ot_trials(searcher) -> dict:
    """Ray trial id -> the ``optuna.Trial`` it was asked as (each trial suggested)."""
    return searcher._ot_trials


def told(searcher) -> set:
    """The Ray trial ids whose end the study has been told (``OptunaSearch`` adds one
    per ``on_trial_complete``)."""
    return searcher._completed_trials


def reopen(study, trial) -> None:
    """Make the finished ``trial`` (an ``optuna.Trial``) of an in-memory ``study``
    RUNNING again, to be told a new outcome: the study still lists it once, under its
    number."""
    from optuna.trial import TrialState

    storage = study._storage
    reopened = copy.copy(storage.get_trial(trial._trial_id))
    reopened.state, reopened.datetime_complete = TrialState.RUNNING, None
    storage._set_trial(trial._trial_id, reopened)
