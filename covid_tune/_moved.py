"""Where the modules of the flat layout (before 0.2) went, for the run folders they wrote.

Ray Tune's snapshot of a run (``tuner.pkl``, ``searcher-state-*.pkl``, the trials in
``experiment_state-*.json``) pickles our classes and functions by module path, so a run
written before the move names ``covid_tune.sweep.SweepScheduler``,
``covid_tune.config.SearchSpace`` and so on. ``covid_tune/__init__.py`` installs
``OldPaths`` so that those names still import (for ``covid-tune resume``), and
``covid_tune.search`` (a module then, a package now) answers the two names it held.
Nothing else in covid-tune imports an old path; ``tests/runs/test_before_move.py`` resumes
a run folder written by the flat layout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_MODULES = {
    "covid_tune.config": "covid_tune.core.space",
    "covid_tune.space": "covid_tune.search.define_by_run",
    "covid_tune.sweep": "covid_tune.search.sweep",
    "covid_tune.status": "covid_tune.search.status",
}
"""Old module path → the module that holds its pickled names now."""

OLD_SEARCH_NAMES = {"SweepSearch", "StudyMirror"}
"""What old snapshots read off ``covid_tune.search`` (now ``covid_tune.search.searcher``)."""


class OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that replaced it (the same object)."""

    def find_spec(self, name, path=None, target=None):
        if name in OLD_MODULES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(OLD_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(OldPaths())


def old_search_name(name: str):
    """``covid_tune.search.<name>`` as a snapshot from before the move spells it."""
    if name in OLD_SEARCH_NAMES:
        return getattr(importlib.import_module("covid_tune.search.searcher"), name)
    raise AttributeError(f"module 'covid_tune.search' has no attribute {name!r}")
