"""The search itself: the searcher's fixes unit-tested, then real sweeps end to end
(Ray Tune on a two-node local cluster, Optuna TPE, ASHA) on tiny generated datasets."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from ray.tune import ExperimentAnalysis

from covid_tune.config import load_space
from covid_tune.sweep import STUDY_FILE, SweepOptions, build_searcher, run_sweep

TINY = {
    "metric": "val_loss", "mode": "min", "max_epochs": 3, "image_size": 32,
    "pretrained": "none", "num_samples": 6, "asha": {"grace_period": 1, "reduction_factor": 2},
    "augment": {"rotation": 10, "scale": [0.8, 1.0], "flip": True},
}


def space_file(tmp_path: Path, task: str, **extra) -> Path:
    params = {"backbone": "resnet18", "frozen_layers": {"resnet18": {"low": 0, "high": 20}},
              "lr": {"low": 1e-4, "high": 0.1, "log": True}, "batch_size": 16, "hidden": 32,
              "dropout": 0.1}
    if task == "multilabel":
        params |= {"loss": {"choices": ["bce", "focal"]}, "focal_gamma": {"low": 0.5, "high": 3.0}}
    doc = {"task": task, **TINY, "params": params, **extra}
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_searcher_waits_for_startup_trials(tmp_path):
    """Ray issue 52535: no more than n_startup random trials while the first ones run."""
    space = load_space(space_file(tmp_path, "binary"))
    searcher = build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=None)
    n = searcher.n_startup
    assert n == 2  # a third of 6 samples
    assert all(searcher.suggest(f"t{i}") is not None for i in range(n))
    assert searcher.suggest("late") is None
    searcher.on_trial_result("t0", {"val_loss": 0.5, "training_iteration": 1, "epoch": 1})
    searcher.on_trial_complete("t0", {"val_loss": 0.5, "epoch": 3})
    assert searcher.suggest("late") is None
    searcher.on_trial_complete("t1", {"val_loss": 0.7, "epoch": 3})
    assert searcher.suggest("late") is not None


def test_stopped_trials_are_pruned_and_errors_fail(tmp_path):
    space = load_space(space_file(tmp_path, "binary"))
    searcher = build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=None)
    for trial_id, last in (("full", {"epoch": 3}), ("stopped", {"epoch": 1}),
                           ("crashed", {"epoch": 1, "error": True})):
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_result(trial_id, {"val_loss": 0.6, "training_iteration": 1, "epoch": 1})
        searcher.on_trial_complete(trial_id, {"val_loss": 0.4, "epoch": last["epoch"]},
                                   error=last.get("error", False))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert study.trials[0].value == 0.4
    assert study.trials[1].intermediate_values == {1: 0.6}


def trials_of(run_dir: Path) -> dict[str, "object"]:
    return ExperimentAnalysis(str(run_dir)).trial_dataframes


@pytest.fixture(scope="module")
def binary_run(ray_cluster, binary_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep-binary")
    start = [{"frozen_layers": 20, "lr": 0.01}, {"frozen_layers": 0, "lr": 0.0001}]
    opts = SweepOptions(space_file=str(space_file(tmp, "binary", start_with=start)),
                        data=str(binary_data), name="bin", storage_path=str(tmp / "runs"),
                        seed=3)
    results = run_sweep(opts)
    return tmp / "runs" / "bin", results


def test_binary_sweep_runs_trials_and_asha_stops_some(binary_run):
    run_dir, results = binary_run
    assert len(results) == 6 and not results.errors
    epochs = [r.metrics["epoch"] for r in results]
    assert max(epochs) == 3
    assert min(epochs) < 3, "ASHA stopped no trial"
    for result in results:
        checkpoint = result.get_best_checkpoint("val_loss", "min")
        assert (Path(checkpoint.path) / "checkpoint.pt").is_file()
        recipe = json.loads((Path(checkpoint.path) / "recipe.json").read_text())
        assert recipe["label_names"] == ["normal", "infected"]
        assert recipe["config"]["backbone"] == "resnet18"


def test_binary_run_dir_is_readable_by_ray_and_optuna(binary_run):
    run_dir, results = binary_run
    frames = trials_of(run_dir)
    assert len(frames) == 6
    assert all({"val_f1", "val_accuracy", "train_loss"} <= set(df.columns) for df in frames.values())
    study = optuna.load_study(study_name="bin", storage=f"sqlite:///{run_dir / STUDY_FILE}")
    states = {t.state.name for t in study.trials}
    assert len(study.trials) == 6 and states <= {"COMPLETE", "PRUNED"}
    assert "PRUNED" in states  # what ASHA stopped reached TPE as pruned, not complete
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(max(t.intermediate_values) < 3 for t in pruned)


def test_start_with_rows_ran_first(binary_run):
    run_dir, _ = binary_run
    study = optuna.load_study(study_name="bin", storage=f"sqlite:///{run_dir / STUDY_FILE}")
    first = sorted(study.trials, key=lambda t: t.number)[:2]
    assert [t.params["frozen_layers_resnet18"] for t in first] == [20, 0]
    assert [t.params["lr"] for t in first] == [0.01, 0.0001]


def test_multilabel_sweep_end_to_end(ray_cluster, multilabel_data, tmp_path):
    opts = SweepOptions(space_file=str(space_file(tmp_path, "multilabel")),
                        data=str(multilabel_data), name="ml", storage_path=str(tmp_path / "runs"),
                        num_samples=4, max_epochs=2)
    results = run_sweep(opts)
    assert len(results) == 4 and not results.errors
    metrics = results[0].metrics
    for key in ("val_macro_f1", "val_samples_f1", "val_hamming_loss", "val_f1_covid",
                "train_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    configs = [r.config for r in results]
    assert all(c["focal_gamma"] == 2.0 for c in configs if c["loss"] == "bce")
    study = optuna.load_study(study_name="ml", storage=f"sqlite:///{tmp_path / 'runs' / 'ml' / STUDY_FILE}")
    assert len(study.trials) == 4


def test_sweep_on_a_messy_dataset(ray_cluster, binary_data, tmp_path, capsys):
    """Other sizes and modes, junk and a corrupt file: the sweep runs and says what it skipped."""
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "messy"
    shutil.copytree(binary_data, root)
    rng = np.random.default_rng(0)
    normal = root / "train" / "normal"
    Image.fromarray(rng.integers(0, 4000, (300, 200)).astype(np.uint16)).save(normal / "deep.png")
    Image.fromarray(rng.integers(0, 255, (50, 90, 4), dtype=np.uint8), "RGBA").save(normal / "a.PNG")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(normal / "c.JPEG")
    (normal / "desktop.ini").write_text("[.ShellClassInfo]")
    (normal / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    opts = SweepOptions(space_file=str(space_file(tmp_path, "binary")), data=str(root),
                        name="messy", storage_path=str(tmp_path / "runs"), num_samples=1,
                        max_epochs=1)
    results = run_sweep(opts)
    assert len(results) == 1 and not results.errors
    out = capsys.readouterr().out
    assert "train 75" in out and "skipped 1 unreadable file(s), e.g. train/normal/corrupt.png" in out
