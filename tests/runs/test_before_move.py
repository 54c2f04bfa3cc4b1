"""Run folders written before the move into subpackages keep working.

``tests/fixtures/before-0.2`` was written by the flat layout (its README says how): Ray's
snapshot in it pickles ``covid_tune.sweep.SweepScheduler``, ``covid_tune.search.SweepSearch``,
``covid_tune.config.SearchSpace`` and more by their old module paths.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "before-0.2"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A copy of the old run folder (somewhere else than where it was written) and a
    regenerated copy of its dataset."""
    from covid_tune.data.synth import generate

    tmp = tmp_path_factory.mktemp("before-move")
    data = tmp / "data" / "chest_xray"
    generate(data, "binary", scale=0.006, size=48, seed=1, progress=False,
             layout="kaggle-pneumonia")
    shutil.copytree(FIXTURE, tmp / "runs" / "before-0.2")
    return tmp / "runs" / "before-0.2", data


def test_the_old_snapshot_unpickles_into_todays_classes():
    from covid_tune.core.space import SearchSpace
    from covid_tune.search.searcher import SweepSearch
    from covid_tune.search.sweep import SweepScheduler

    config = pickle.loads((FIXTURE / "tuner.pkl").read_bytes())["_tune_config"]
    assert type(config.scheduler) is SweepScheduler
    assert type(config.search_alg.searcher) is SweepSearch
    (state,) = FIXTURE.glob("searcher-state-*.pkl")
    assert "covid_tune.config" in state.read_bytes().decode("latin-1")
    saved = pickle.loads(state.read_bytes())
    assert any(isinstance(getattr(v, "space", None), SearchSpace) for v in saved.values())


@pytest.mark.slow
def test_leaderboard_and_export_read_an_old_run(old_run, tmp_path):
    from covid_tune.bundle.export import export_best
    from covid_tune.results.leaderboard import write_leaderboard

    run, data = old_run
    table = write_leaderboard([str(run)], out=str(tmp_path / "board"), data=[str(data)])
    assert "RESNET18" in table and "All Layers except FC" in table
    export_best([str(run)], str(tmp_path / "model"), data=[str(data)])
    assert (tmp_path / "model" / "binary" / "model.onnx").is_file()


def test_resume_finishes_an_old_run_where_it_now_is(ray_cluster, old_run):
    from covid_tune.runs.reader import read_run
    from covid_tune.search.sweep import resume_sweep

    run, data = old_run
    before = {p.name for p in run.glob("trial_*")}
    results = resume_sweep(run, data=str(data))
    assert len(results) == 6 and not results.errors
    trials = {p.name for p in run.glob("trial_*")}
    assert before < trials and len(trials) == 6
    assert not (run / "lost_trials").exists()
    assert len(read_run(run).trials) == 6
