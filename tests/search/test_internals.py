"""Every private Ray or Optuna name covid-tune relies on (``covid_tune/search/_internals.py``)
is still there, on objects Ray and Optuna build themselves: an upgrade that drops or
renames one fails here, with the name in the failure, before a sweep meets it."""

from __future__ import annotations

import importlib
import logging
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from covid_tune.search import _internals


@pytest.fixture(scope="module")
def ran(ray_cluster, tmp_path_factory) -> dict:
    """One real trial, and what a scheduler hook saw of it."""
    seen: dict = {}

    def report_twice(config):  # defined here: Ray's workers cannot import a test module
        """Two epochs, each with a checkpoint; each report says what the trial sees of
        its own Ray session."""
        session = _internals.trial_session()
        for step in (1, 2):
            with tempfile.TemporaryDirectory() as folder:
                Path(folder, "step").write_text(str(step))
                tune.report({"step": step, "session": type(session).__name__,
                             "stop_event": type(getattr(session, "stop_event", None)).__name__,
                             "asked_to_stop": _internals.asked_to_stop(session)},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    class Watch(FIFOScheduler):
        def on_trial_add(self, tune_controller, trial):
            seen.update(wrapper=tune_controller, trial=trial,
                        storage=_internals.controller_storage(tune_controller))
            super().on_trial_add(tune_controller, trial)

    storage = tmp_path_factory.mktemp("internals")
    results = tune.Tuner(report_twice, tune_config=tune.TuneConfig(scheduler=Watch()),
                         run_config=tune.RunConfig(name="internals", storage_path=str(storage),
                                                   verbose=0)).fit()
    assert not results.errors, results.errors
    return {**seen, "results": results, "storage_path": storage}


# Ray Tune ------------------------------------------------------------------------

def test_a_scheduler_hook_reaches_the_runs_storage(ran):
    """``TrialRunnerWrapper._tune_controller`` and ``TuneController._storage``."""
    assert hasattr(ran["wrapper"], "_tune_controller")
    assert hasattr(ran["wrapper"]._tune_controller, "_storage")
    storage = ran["storage"]
    assert storage is not None and storage.experiment_dir_name == "internals"
    assert Path(storage.storage_fs_path) == Path(ran["storage_path"])


def test_a_trial_finds_its_session_and_the_stop_event_tune_sets(ran):
    """``ray.train._internal.session.get_session`` and ``_TrainSession.stop_event``."""
    metrics = ran["results"][0].metrics
    assert metrics["session"] == "_TrainSession"
    assert metrics["stop_event"] == "Event"
    assert metrics["asked_to_stop"] is False
    assert _internals.trial_session() is None  # outside a trial
    assert _internals.asked_to_stop(None) is False


def test_a_restored_trial_can_be_pointed_at_another_checkpoint(ran):
    """``_CheckpointManager._checkpoint_results``, ``._latest_checkpoint_result`` and
    ``ray.train._internal.session._TrainingResult``, on the trial Ray ran."""
    from ray.train._internal.session import _TrainingResult  # noqa: F401

    trial = ran["trial"]
    registered = [r.checkpoint for r in trial.run_metadata.checkpoint_manager
                  .best_checkpoint_results]
    assert len(registered) == 2 and trial.checkpoint.path == registered[1].path
    first = registered[0]
    _internals.point_at_checkpoint(trial, lambda c: c.path == first.path, first)
    assert trial.checkpoint.path == first.path
    assert [r.checkpoint.path for r in trial.run_metadata.checkpoint_manager
            .best_checkpoint_results] == [first.path]
    assert trial.latest_checkpoint_result.metrics["step"] == 2  # the metrics stay
    _internals.point_at_checkpoint(trial, lambda c: False, None)
    assert trial.checkpoint is None


def test_a_restored_tuner_runs_the_callbacks_added_to_its_list(ran):
    """``Tuner._local_tuner``: ``run_callbacks`` of a restored ``Tuner`` is the list its
    fit calls (``resume --mlflow`` changes it)."""
    calls: list[str] = []

    class Heard(tune.Callback):
        def setup(self, **info):
            calls.append("setup")

        def on_experiment_end(self, trials, **info):
            calls.append(f"end {len(trials)}")

    def report_twice(config):  # the trainable's name, for the restore's check
        raise AssertionError("the run is finished: no trial should run again")

    tuner = tune.Tuner.restore(str(Path(ran["storage_path"]) / "internals"), report_twice)
    callbacks = _internals.run_callbacks(tuner)
    assert isinstance(callbacks, list)
    callbacks.append(Heard())
    tuner.fit()
    assert calls == ["setup", "end 1"]


def test_rays_storage_logger_is_the_one_named():
    """``ray.train._internal.storage``: the logger the trainable quiets."""
    module = importlib.import_module(_internals.RAY_STORAGE_LOGGER)
    assert module.logger is logging.getLogger(_internals.RAY_STORAGE_LOGGER)


# Optuna inside Ray's OptunaSearch ---------------------------------------------------

def test_ray_optuna_search_keeps_its_study_its_trials_and_the_ones_told():
    """``OptunaSearch._ot_study``, ``._ot_trials``, ``._completed_trials``."""
    search = OptunaSearch(space={"x": tune.uniform(0, 1)}, metric="m", mode="min", seed=0)
    config = search.suggest("a")
    assert isinstance(_internals.ot_study(search), optuna.Study)
    assert list(_internals.ot_trials(search)) == ["a"]
    assert isinstance(_internals.ot_trials(search)["a"], optuna.Trial)
    assert _internals.told(search) == set()
    search.on_trial_complete("a", {"m": 0.5, **config})
    assert _internals.told(search) == {"a"}
    assert [t.state for t in _internals.ot_study(search).trials] == [TrialState.COMPLETE]


def test_a_failed_trial_of_an_in_memory_study_runs_again_under_its_number():
    """``Study._storage``, ``Trial._trial_id``, ``InMemoryStorage._set_trial``."""
    study = optuna.create_study()
    study.ask()
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    _internals.reopen(study, trial)
    assert study.trials[1].state == TrialState.RUNNING
    assert study.trials[1].datetime_complete is None
    study.tell(trial, 0.25)
    assert [t.number for t in study.trials] == [0, 1]
    assert study.trials[1].state == TrialState.COMPLETE and study.trials[1].value == 0.25


def test_ashas_rungs_can_be_read_put_back_and_rebuilt():
    """ASHA's rungs after a few results, put into a fresh scheduler, make the same call
    on the next result; rebuilt from the trials' scores they hold the same values."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    def asha():
        return ASHAScheduler(time_attr="epoch", metric="val_loss", mode="min", max_t=8,
                             grace_period=1, reduction_factor=2)

    scores = {"a": {1: 0.5, 2: 0.4}, "b": {1: 0.6, 2: 0.5}, "c": {1: 0.3, 2: 0.2}}
    first = asha()
    for trial_id, epochs in scores.items():
        trial = SimpleNamespace(trial_id=trial_id)
        first.on_trial_add(None, trial)
        for epoch, value in epochs.items():
            first.on_trial_result(None, trial, {"epoch": epoch, "val_loss": value})
    state = _internals.asha_state(first)
    assert state["rungs"][0][-1] == [1, {"a": -0.5, "b": -0.6, "c": -0.3}]  # milestone 1

    restored, rebuilt = asha(), asha()
    _internals.set_asha_state(restored, state)
    for trial_id, epochs in scores.items():
        rebuilt.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        _internals.asha_record(rebuilt, trial_id, epochs)
    assert _internals.asha_state(rebuilt)["rungs"] == state["rungs"]
    late, fresh = SimpleNamespace(trial_id="late"), asha()  # fresh: what resume had before
    for scheduler in (first, restored, fresh):
        scheduler.on_trial_add(None, late)
    result = {"epoch": 1, "val_loss": 0.7}
    assert first.on_trial_result(None, late, result) == TrialScheduler.STOP
    assert restored.on_trial_result(None, late, dict(result)) == TrialScheduler.STOP
    assert fresh.on_trial_result(None, late, dict(result)) == TrialScheduler.CONTINUE
