"""Every use of a private Ray Tune or Optuna name in covid-tune, in one place.

Each function here reaches past a public API because none does the job; each has a test
in ``tests/search/test_internals.py`` that fails if the name it relies on goes away, so
an upgrade of Ray or Optuna breaks there first, with the name in the failure.
"""

from __future__ import annotations

import copy


def controller_storage(tune_controller):
    """The run's storage (Ray's ``StorageContext``) seen from a scheduler hook.

    Tune hands schedulers a ``TrialRunnerWrapper`` that only lets whitelisted names
    through; the storage is not one of them."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    return getattr(controller, "_storage", None)


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
