"""covid-tune: distributed hyperparameter search for chest X-ray classifiers.

The public surface is this module and the ``covid-tune`` command.
"""

__version__ = "0.2.0"

from covid_tune import _moved

_moved.install()

__all__ = [
    "UserError", "load_space", "load_dataset", "SweepOptions", "run_sweep", "resume_sweep",
]


def __getattr__(name):
    # Imported lazily so `covid-tune --help` does not wait for torch and Ray.
    if name == "UserError":
        from covid_tune.errors import UserError
        return UserError
    if name == "load_space":
        from covid_tune.core.space_file import load_space
        return load_space
    if name == "load_dataset":
        from covid_tune.data.dataset import load_dataset
        return load_dataset
    if name == "SweepOptions":
        from covid_tune.runs.record import SweepOptions
        return SweepOptions
    if name in ("run_sweep", "resume_sweep"):
        from covid_tune.search import sweep
        return getattr(sweep, name)
    raise AttributeError(name)
