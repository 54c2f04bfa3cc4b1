"""Real sweeps end to end: Ray Tune on the session's two-node cluster, Optuna's TPE and
ASHA, on tiny generated datasets. The two shared sweeps (``swept``) are the ones the
leaderboard, export and TensorBoard tests read too."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import optuna
import yaml
from PIL import Image
from ray.tune import ExperimentAnalysis

from conftest import BINARY_SPACE, write_space
from covid_tune.cli import main
from covid_tune.runs.folder import STUDY_FILE


def study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=run_dir.name,
                             storage=f"sqlite:///{run_dir / STUDY_FILE}")


def test_binary_sweep_runs_trials_and_asha_stops_some(swept):
    results = swept.binary_results
    assert len(results) == 6 and not results.errors
    epochs = [r.metrics["epoch"] for r in results]
    assert max(epochs) == 3
    assert min(epochs) < 3, "ASHA stopped no trial"
    for result in results:
        checkpoint = result.get_best_checkpoint("val_loss", "min")
        assert (Path(checkpoint.path) / "checkpoint.pt").is_file()
        recipe = json.loads((Path(checkpoint.path) / "recipe.json").read_text())
        assert recipe["label_names"] == ["normal", "infected"]
        assert recipe["config"]["backbone"] == result.config["backbone"]


def test_binary_run_dir_is_readable_by_ray_and_optuna(swept):
    frames = ExperimentAnalysis(str(swept.binary)).trial_dataframes
    assert len(frames) == 6
    assert all({"val_f1", "val_accuracy", "train_loss"} <= set(df.columns)
               for df in frames.values())
    trials = study(swept.binary).trials
    states = {t.state.name for t in trials}
    assert len(trials) == 6 and states <= {"COMPLETE", "PRUNED"}
    assert "PRUNED" in states  # what ASHA stopped reached TPE as pruned, not complete
    assert all(max(t.intermediate_values) < 3 for t in trials if t.state.name == "PRUNED")


def test_the_shared_part_1_sweep_read_the_public_kaggle_layout(swept):
    """Its dataset is in chest_xray's folders: PNEUMONIA as infected, val as validation,
    found without any flag."""
    files = json.loads((swept.binary / "dataset.json").read_text())["files"]
    assert {name.split("/")[0] for name in files} == {"train", "val", "test"}
    assert any(name.startswith("train/pneumonia/") for name in files)
    frames = ExperimentAnalysis(str(swept.binary)).trial_dataframes.values()
    assert all(0 < f["val_auroc"].iloc[-1] <= 1 for f in frames)  # both classes in val


def test_start_with_rows_ran_first(swept):
    first = sorted(study(swept.binary).trials, key=lambda t: t.number)[:3]
    rows = BINARY_SPACE["start_with"]
    assert [t.params["backbone"] for t in first] == [r["backbone"] for r in rows]
    assert [t.params[f"frozen_layers_{r['backbone']}"] for t, r in zip(first, rows)] == [
        r["frozen_layers"] for r in rows]


def test_multilabel_sweep_end_to_end(swept):
    results = swept.multilabel_results
    assert len(results) == 4 and not results.errors
    for key in ("val_macro_f1", "val_samples_f1", "val_hamming_loss", "val_f1_covid",
                "train_accuracy"):
        assert all(0.0 <= r.metrics[key] <= 1.0 for r in results), key
    configs = [r.config for r in results]
    assert {c["loss"] for c in configs} == {"bce", "focal"}  # both hand-grid rows ran
    assert all(c["focal_gamma"] == 2.0 for c in configs if c["loss"] == "bce")
    assert len(study(swept.multilabel).trials) == 4


def test_a_held_out_selection_split_chooses_and_validation_only_reports(swept,
                                                                        multilabel_data):
    """``selection: {holdout: 0.15}``: the run records which Train images it held out;
    every trial reports ``sel_*`` beside ``val_*``; TPE was told ``sel_f1``; each
    trial's kept best checkpoint and its thresholds come from the selection split."""
    from covid_tune.data.dataset import hold_out, load_dataset, scan, train_grouping

    held = json.loads((swept.multilabel / "dataset.json").read_text())["selection"]
    layout = scan(multilabel_data, "multilabel")
    train = load_dataset(layout, "multilabel", 32, progress=False).splits["train"]
    groups = train_grouping(layout).groups  # phantoms: every image its own patient
    assert held == hold_out(train, 0.15, seed=3, groups=groups)  # the sweep's --seed
    assert 0 < len(held) < 0.25 * len(train)
    for result in swept.multilabel_results:
        history = result.metrics_dataframe
        assert {"sel_f1", "sel_auroc", "sel_loss", "val_f1", "train_f1"} <= set(history.columns)
        best = result.get_best_checkpoint("sel_f1", "max")
        recipe = json.loads((Path(best.path) / "recipe.json").read_text())
        assert recipe["metrics"]["sel_f1"] == history["sel_f1"].max()
        assert recipe["threshold_rule"]["split"] == "selection"
    frames = [r.metrics_dataframe for r in swept.multilabel_results]
    assert any(not f["sel_loss"].equals(f["val_loss"]) for f in frames)  # two splits
    trials = study(swept.multilabel).trials
    told = {(step, value) for t in trials for step, value in t.intermediate_values.items()}
    told |= {(len(t.intermediate_values) + 1, t.value) for t in trials
             if t.state.name == "COMPLETE"}  # Ray tells the last epoch as the final value
    reported = {(e, v) for f in frames for e, v in zip(f["epoch"], f["sel_f1"])}
    assert told and told <= reported


def test_a_training_split_too_small_to_hold_out_is_refused(tmp_path, capsys):
    """One image per class: nothing can be held out without emptying a class of Train,
    so the sweep stops with the space's key before Ray starts."""
    from helpers import binary_tree, refused

    data = binary_tree(tmp_path / "data", per_class=1)
    space = write_space(tmp_path, {**BINARY_SPACE, "metric": "sel_f1", "mode": "max",
                                   "selection": {"holdout": 0.2}})
    err = refused(capsys, "sweep", "--space", str(space), "--data", str(data),
                  "--storage-path", str(tmp_path / "runs"))
    assert "selection.holdout: the training split" in err and "too few images" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("sweep.json"))


def test_the_selection_holdout_keeps_a_patient_on_one_side_and_says_how(tmp_path, capsys):
    """Kaggle's file names (personN_bacteria_K): the sweep's holdout takes whole
    patients, and its data lines say how the images were grouped."""
    from helpers import save
    from covid_tune.core.space_file import load_space
    from covid_tune.data.dataset import scan
    from covid_tune.search.sweep import decode

    root, value = tmp_path / "chest_xray", 0
    for split, patients in (("train", 16), ("val", 2), ("test", 2)):
        for p in range(patients):
            for k in range(1 + p % 3):
                for cls, name in (("PNEUMONIA", f"person{p}_bacteria_{k}.jpeg"),
                                  ("NORMAL", f"IM-{p:04d}-{k:04d}.jpeg")):
                    value += 1
                    save(root / split / cls / name, size=(32, 32), value=value)
    space = load_space(write_space(tmp_path, {**BINARY_SPACE, "metric": "sel_loss",
                                              "selection": {"holdout": 0.25}}))
    layout = scan(root, "binary")
    bundle, held = decode(layout, space, strict=False, seed=0)
    person = {name.split("/")[-1].split("_")[0] for name in held if "person" in name}
    kept = {name.split("/")[-1].split("_")[0] for name in bundle.splits["train"].names
            if "person" in name}
    assert person and not person & kept
    out = capsys.readouterr().out
    assert "  patients: 62 images in 32 patient groups (keys: the layout's file-name rule " \
           "62; 0 near-duplicate merge(s))" in out


def test_a_messy_dataset_is_decoded_for_the_sweep_and_the_skips_are_said(binary_data,
                                                                         tmp_path, capsys):
    """Other sizes and modes, junk and a corrupt file: the sweep's decoding step gives
    every trial the same uniform uint8 images and says what it skipped (what follows,
    training on uint8 arrays, is the shared sweeps' path)."""
    from covid_tune.core.space_file import load_space
    from covid_tune.data.dataset import scan
    from covid_tune.search.sweep import decode

    root = tmp_path / "messy"
    shutil.copytree(binary_data, root)
    rng = np.random.default_rng(0)
    normal = root / "train" / "normal"
    Image.fromarray(rng.integers(0, 4000, (300, 200)).astype(np.uint16)).save(normal / "deep.png")
    Image.fromarray(rng.integers(0, 255, (50, 90, 4), dtype=np.uint8), "RGBA").save(normal / "a.PNG")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(normal / "c.JPEG")
    (normal / "desktop.ini").write_text("[.ShellClassInfo]")
    (normal / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    space = load_space(write_space(tmp_path, BINARY_SPACE))
    bundle, held = decode(scan(root, "binary"), space, strict=False)
    train = bundle.splits["train"]
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (32, 32)
    assert {"train/normal/deep.png", "train/normal/a.PNG", "train/normal/c.JPEG"} <= set(
        train.names) and held == []
    out = capsys.readouterr().out
    assert "train 75" in out and "skipped 1 unreadable file(s), e.g. train/normal/corrupt.png" in out


def test_a_sweep_whose_every_trial_failed_says_so_and_exits_1(capsys):
    """Ray's results of three failed trials: exit 1 and one line with the count and the
    first error's exception line; one good trial among them and it is a normal end."""
    from types import SimpleNamespace

    from covid_tune.cli import exit_code

    error = RuntimeError("Traceback (most recent call last):\n  File ...\n"
                         "covid_tune.training.trial.TrialDiverged: loss became nan at epoch 1")
    failed = [SimpleNamespace(error=error, path=f"/runs/r/trial_{i}") for i in range(3)]
    assert exit_code(failed) == 1
    err = capsys.readouterr().err
    assert err == ("covid-tune: every trial failed (3 of 3); the first: covid_tune.training.trial."
                   "TrialDiverged: loss became nan at epoch 1 (see /runs/r/trial_0/error.txt)\n")
    assert exit_code([*failed, SimpleNamespace(error=None, path="/runs/r/trial_3")]) == 0
    assert exit_code([]) == 0


def test_the_shipped_part_2_space_sweeps_the_covid_radiography_collection(
        ray_cluster, tmp_path, capsys):
    """Phantoms in the "COVID-19 Radiography Database" layout (no split folders) and
    the shipped ``multilabel`` space, shrunk by flags only: ``check`` and the sweep find
    the layout, the sweep draws validation and records every image's split, and the
    leaderboard re-scores the trial on exactly that validation split (the figures the
    trial reported come back)."""
    import csv

    from covid_tune.cli import main
    from covid_tune.data.synth import generate

    data = tmp_path / "COVID-19_Radiography_Dataset"
    generate(data, "multilabel", scale=0.01, size=32, progress=False, layout="covid-radiography")
    assert main(["check", str(data), "--quiet"]) == 0
    assert 'the "COVID-19 Radiography Database"' in capsys.readouterr().out
    assert main(["sweep", "--space", "multilabel", "--data", str(data), "--image-size", "32",
                 "--max-epochs", "1", "--num-samples", "1", "--pretrained", "none",
                 "--storage-path", str(tmp_path / "runs"), "--name", "radiography"]) == 0
    run = tmp_path / "runs" / "radiography"
    record = json.loads((run / "dataset.json").read_text())
    assert set(record["splits"].values()) == {"train", "validation"}
    assert record["selection"] and all(record["splits"][n] == "train" for n in record["selection"])
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "board")]) == 0
    with open(tmp_path / "board" / "leaderboard.csv", newline="") as handle:
        row, = csv.DictReader(handle)
    recipe = json.loads((Path(row["checkpoint"]) / "recipe.json").read_text())
    # trials report at the thresholds tuned on the selection split, as the table does
    assert float(row["validation_f1"]) == pytest.approx(recipe["metrics"]["val_f1"])
    assert float(row["selection_f1"]) == pytest.approx(recipe["metrics"]["sel_f1"])


def test_the_shipped_part_1_space_sweeps_the_kaggle_pneumonia_layout(
        ray_cluster, binary_data, tmp_path, capsys):
    """Phantoms in the Kaggle "Chest X-Ray Images (Pneumonia)" layout pass ``check``,
    and the shipped ``binary`` space, shrunk by flags only, trains its first hand-grid
    row (VGG16, all but the head frozen) on them."""
    from covid_tune.cli import main

    assert main(["check", str(binary_data), "--quiet"]) == 0
    assert 'Kaggle "Chest X-Ray Images (Pneumonia)"' in capsys.readouterr().out
    assert main(["sweep", "--space", "binary", "--data", str(binary_data), "--image-size", "32",
                 "--max-epochs", "1", "--num-samples", "1", "--pretrained", "none",
                 "--storage-path", str(tmp_path / "runs"), "--name", "kaggle"]) == 0
    result, = ExperimentAnalysis(str(tmp_path / "runs" / "kaggle")).trials
    assert (result.config["backbone"], result.config["frozen_layers"]) == ("vgg16", 13)
    assert 0 <= result.last_result["val_f1"] <= 1


def test_a_part_2_csv_manifest_with_a_labelled_test_split_is_scored_on_test(
        ray_cluster, tmp_path, capsys):
    """A CSV manifest (``covid|pneumonia`` labels, every split labelled) sweeps, and the
    Part 2 table gains a test column: its exact-match accuracy is the model's own
    predictions on the manifest's test rows at the checkpoint's thresholds."""
    import csv

    from covid_tune.cli import main
    from covid_tune.data.dataset import load_dataset, scan
    from covid_tune.nn.weights import load_model
    from covid_tune.nn.logits import predict_logits
    from covid_tune.nn.device import Device
    from covid_tune.data.synth import generate

    generate(tmp_path / "listed", "multilabel", scale=0.01, size=32, progress=False,
             layout="csv-manifest")
    listing = tmp_path / "listed" / "manifest.csv"
    space = write_space(tmp_path, {
        "task": "multilabel", "max_epochs": 1, "image_size": 32, "pretrained": "none",
        "num_samples": 1, "augment": False, "asha": {"grace_period": 1},
        "params": {"backbone": "resnet18", "frozen_layers": 0, "lr": 0.01, "momentum": 0.9,
                   "batch_size": 16, "hidden": 32, "dropout": 0.0, "loss": "bce"}})
    assert main(["sweep", "--space", str(space), "--data", str(listing), "--storage-path",
                 str(tmp_path / "runs"), "--name", "listed"]) == 0
    assert main(["leaderboard", str(tmp_path / "runs" / "listed"), "--out",
                 str(tmp_path / "board")]) == 0
    assert "Testing Set Accuracy/F1 Score" in (tmp_path / "board" / "leaderboard.md").read_text()
    with open(tmp_path / "board" / "leaderboard.csv", newline="") as handle:
        row, = csv.DictReader(handle)
    recipe = json.loads((Path(row["checkpoint"]) / "recipe.json").read_text())
    test = load_dataset(scan(listing, "multilabel"), image_size=32, use_cache=False,
                        progress=False).splits["test"]
    logits = predict_logits(load_model(row["checkpoint"]), test.images, 8, Device.pick())
    cuts = np.array([recipe["threshold_logits"][name]
                     for name in ("covid", "normal", "pneumonia")])
    decided = logits > cuts
    decided[:, 2] |= decided[:, 0]  # covid implies pneumonia
    exact = float(np.mean(np.all(decided == test.targets.astype(bool), axis=1)))
    assert float(row["test_accuracy"]) == pytest.approx(exact)


def test_a_finished_trial_keeps_its_best_epoch_weights_only(swept):
    """Every trial of the shared sweep (completed or stopped by ASHA) keeps one
    checkpoint, its best epoch by the sweep's metric, without optimizer state; the
    checkpoint stores the weights and records its base (the seeded initialisation)."""
    for folder in sorted(swept.binary.glob("trial_*")):
        kept = sorted(folder.glob("checkpoint_*"))
        assert len(kept) == 1, kept
        assert not (kept[0] / "optimizer.pt").exists()
        recipe = json.loads((kept[0] / "recipe.json").read_text())
        epochs = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        best = min(epochs, key=lambda r: (r["val_loss"], r["epoch"]))
        assert recipe["epoch"] == best["epoch"]
        assert recipe["base"]["kind"] == "init"


# --- epochs longer than Ray's timeouts ---------------------------------------------------

REUSE_TIMEOUT = 1
"""Seconds Ray gives a stopped trial's thread to end before it reuses the actor, in
these tests (``TUNE_FUNCTION_THREAD_TIMEOUT_S``, read by the worker when it resets)."""


def slowed(folder: Path, batch_seconds: float, fail_lr: float | None = None):
    """The trainable with every training batch ``batch_seconds`` longer (as a bigger
    model or dataset would make it), recording in ``folder/<trial id>`` the worker's
    pid and each epoch whose training pass completed; the trial with learning rate
    ``fail_lr`` raises before its first epoch. A closure, so cloudpickle ships it to
    the workers by value."""
    def trainable(config, data):
        import os
        import time

        import ray.tune

        from covid_tune.training import trial as train

        if config["lr"] == fail_lr:
            raise RuntimeError("no GPU memory left (made up, before the first epoch)")

        # Ray waits this long (2 s unless set) for a stopped trial's thread before it
        # reuses the actor; 1 s here lets epochs of 2 s outlast it.
        os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(REUSE_TIMEOUT)
        log = folder / ray.tune.get_context().get_trial_id()
        log.write_text(f"pid {os.getpid()}\n")
        to_device, one_epoch = train.to_device, train.train_one_epoch

        def slow_to_device(*args, **kwargs):
            time.sleep(batch_seconds)
            return to_device(*args, **kwargs)

        def logged_epoch(*args, **kwargs):
            result = one_epoch(*args, **kwargs)
            with open(log, "a") as out:
                out.write(f"trained {args[7]}\n")
            return result

        train.to_device, train.train_one_epoch = slow_to_device, logged_epoch
        try:
            return train.train_trial(config, data)
        finally:
            train.to_device, train.train_one_epoch = to_device, one_epoch

    return trainable


@pytest.mark.realistic  # real timing (epochs longer than Ray's timeout): make soak runs it
def test_trials_asha_stops_end_within_rays_reuse_timeout_and_the_next_trial_runs(
        ray_cluster, binary_data, tmp_path):
    """Epochs of about 2 s, longer than the time Ray gives a stopped trial's thread
    before it reuses the actor (1 s here, 2 s by default), and ASHA at every epoch of
    two: every trial trains and none fails (before the fix the trial after each ASHA
    stop failed with "Could not re-use actor"), actors are reused, and no stopped trial
    trains or publishes an epoch past the one ASHA stopped it at. One trial fails
    before its first epoch: the study has it as FAIL, and it holds every trial once,
    none left RUNNING."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep

    doc = {**BINARY_SPACE, "num_samples": 5, "max_epochs": 2, "augment": False,
           "params": {**BINARY_SPACE["params"], "backbone": "resnet18", "frozen_layers": 20,
                      "batch_size": 8},
           "start_with": [{"lr": 0.02}]}
    space = write_space(tmp_path, doc)
    logs = tmp_path / "logs"
    logs.mkdir()
    opts = SweepOptions(space_file=str(space), data=str(binary_data), name="slow",
                        storage_path=str(tmp_path / "runs"), seed=3)
    results = run_sweep(opts, trainable=slowed(logs, batch_seconds=0.4, fail_lr=0.02))

    failed = [r for r in results if r.error]
    assert len(results) == 5 and len(failed) == 1, [str(r.error)[-300:] for r in failed]
    assert "made up, before the first epoch" in str(failed[0].error)
    trials = study(tmp_path / "runs" / "slow").trials
    states = [t.state.name for t in trials]
    assert len(states) == 5 and states.count("FAIL") == 1 and "RUNNING" not in states
    epochs = {Path(r.path).name.removeprefix("trial_"): r.metrics["epoch"]
              for r in results if not r.error}
    assert [e for e in epochs.values() if e < 2], "ASHA stopped no trial; the test needs one"
    lines = {t: (logs / t).read_text().splitlines() for t in epochs}
    pids = [lines[t][0] for t in epochs]
    assert len(set(pids)) < len(pids)  # some actor was reused
    for trial_id, last in epochs.items():
        trained = [int(line.split()[1]) for line in lines[trial_id][1:]]
        assert max(trained) == last, (trial_id, trained, last)
        events = EventAccumulator(str(tmp_path / "runs" / "slow" / f"trial_{trial_id}"))
        events.Reload()
        steps = {e.step for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
        assert max(steps) == last, (trial_id, sorted(steps), last)
    first_epoch = [r.metrics_dataframe["time_this_iter_s"].iloc[0] for r in results
                   if not r.error]
    assert min(first_epoch) > 1.5 * REUSE_TIMEOUT  # longer than Ray's reuse timeout


@pytest.mark.slow
def test_a_trial_whose_metric_does_not_move_keeps_its_earliest_epoch(binary_data, tmp_path):
    """val_f1 the same at every epoch (a learning rate too small to change a single
    prediction): Ray keeps the epoch-1 checkpoint, not the last one, and the trial's
    row reads epoch 1, as ``runs.best_recipe`` documents for ties."""
    from covid_tune.runs.record import SweepOptions
    from covid_tune.runs.checkpoint import read_recipe
    from covid_tune.runs.reader import read_run
    from covid_tune.search.sweep import run_sweep

    doc = {**BINARY_SPACE, "metric": "val_f1", "mode": "max", "num_samples": 1,
           "max_epochs": 2, "augment": False,
           "params": {**BINARY_SPACE["params"], "backbone": "resnet18", "frozen_layers": 20,
                      "lr": 1e-12, "dropout": 0.0},
           "start_with": []}
    opts = SweepOptions(space_file=str(write_space(tmp_path, doc)), data=str(binary_data),
                        name="flat", storage_path=str(tmp_path / "runs"), seed=1)
    results = run_sweep(opts)
    scores = list(results[0].metrics_dataframe["val_f1"])
    assert len(scores) == 2 and len(set(scores)) == 1, scores  # the metric did not move
    kept = sorted((tmp_path / "runs" / "flat").glob("trial_*/checkpoint_*"))
    assert [read_recipe(folder)["epoch"] for folder in kept] == [1]
    [row] = read_run(tmp_path / "runs" / "flat").trials
    assert row.epoch == 1


def test_a_trial_that_diverges_on_its_only_try_is_pruned_not_failed(ray_cluster,
                                                                    binary_data, tmp_path):
    """With no retries (``--max-failures 0``) the scheduler hears of a diverged trial
    before Ray uploads its ``diverged.txt``: it knows it by the error Ray keeps on the
    driver, so TPE is still told PRUNED (it ignores FAIL and would try the region
    again). The retried case is ``test_cluster.py``'s crash test.

    The sweep leaves the caller's process as it found it: ``os.environ`` (Ray's switches
    the sweep sets) and Optuna's log level (which the searcher quiets)."""
    import os

    from covid_tune.runs.folder import DIVERGED_FILE
    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep

    doc = {**BINARY_SPACE, "num_samples": 2, "max_epochs": 1, "augment": False,
           "params": {**BINARY_SPACE["params"], "backbone": "resnet18", "frozen_layers": 10,
                      "lr": {"low": 1e-3, "high": 1e7, "log": True}, "hidden": 16,
                      "dropout": 0.0},
           "start_with": [{"lr": 0.01}, {"lr": 1e6}]}
    opts = SweepOptions(space_file=str(write_space(tmp_path, doc)), data=str(binary_data),
                        name="nan", storage_path=str(tmp_path / "runs"), seed=1,
                        max_failures=0)
    environ, verbosity = dict(os.environ), optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        results = run_sweep(opts)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert dict(os.environ) == environ
    finally:
        optuna.logging.set_verbosity(verbosity)
    bad = next(r for r in results if r.config["lr"] == 1e6)
    assert bad.error is not None and (Path(bad.path) / DIVERGED_FILE).is_file()
    assert sorted(t.state.name for t in study(tmp_path / "runs" / "nan").trials) == [
        "COMPLETE", "PRUNED"]


def stubborn(folder: Path, batch_seconds: float):
    """``slowed``, except that stopped trials go on training as before the fix (the
    stop check between batches is gone): Ray then fails the next trial on that actor
    ("reuse requires reset_config() ... to return True") without telling the
    searcher."""
    slow = slowed(folder, batch_seconds)

    def trainable(config, data):
        from covid_tune.training import trial as train

        train.Publisher.end_if_stopped = lambda self: None
        return slow(config, data)

    return trainable


@pytest.mark.realistic
def test_trials_ray_fails_without_telling_the_search_reach_the_study_and_nothing_stalls(
        ray_cluster, binary_data, tmp_path):
    """The failure issue 20 found, provoked with the old trainable: trials whose reused
    actor Ray could not reset. The sweep runs every trial to its end (before the fix
    it stalled with nothing running), and the study holds every trial once, none left
    RUNNING, each failed one as FAIL. In the realistic tier (``make soak``): the
    scheduler's part is tested without Ray in ``test_searcher.py``."""
    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep

    doc = {**BINARY_SPACE, "num_samples": 6, "max_epochs": 3, "augment": False,
           "params": {**BINARY_SPACE["params"], "backbone": "resnet18", "frozen_layers": 20,
                      "batch_size": 8},
           "start_with": []}
    logs = tmp_path / "logs"
    logs.mkdir()
    opts = SweepOptions(space_file=str(write_space(tmp_path, doc)), data=str(binary_data),
                        name="ends", storage_path=str(tmp_path / "runs"), seed=3)
    results = run_sweep(opts, trainable=stubborn(logs, 0.45))

    errors = {Path(r.path).name: str(r.error) for r in results if r.error}
    assert len(results) == 6
    assert any("reset_config()" in e for e in errors.values()), errors
    trials = study(tmp_path / "runs" / "ends").trials
    assert len(trials) == 6 and not [t for t in trials if t.state.name == "RUNNING"]
    assert sum(t.state.name == "FAIL" for t in trials) == len(errors)


@pytest.mark.slow
def test_a_graceful_stop_that_hangs_is_cut_short_with_the_resume_command(monkeypatch):
    """Ray Tune's own stop should end a sweep within seconds; should it hang (a searcher
    or an actor that does not answer), the driver stops at once after the grace period
    and still names the resume command."""
    import os
    import signal
    import threading
    import time

    from covid_tune.search import sweep
    from covid_tune.errors import Stopped

    monkeypatch.setattr(sweep, "STOP_GRACE_SECONDS", 0.5)

    class HangingTuner:
        def fit(self):
            previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # Tune listens...
            try:
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # ...but never ends
                    time.sleep(0.05)
            finally:
                signal.signal(signal.SIGUSR1, previous)

    started = time.monotonic()
    with pytest.raises(Stopped) as stopped:
        sweep.fit(HangingTuner(), "/runs/hung")
    assert time.monotonic() - started < 5
    assert stopped.value.signum == signal.SIGTERM
    assert str(stopped.value).endswith("continue with: covid-tune resume /runs/hung")


# --- stops, budgets, growing a sweep ---------------------------------------------------

def steady_space(tmp_path, stop: dict, num_samples: int = 6) -> Path:
    """A study whose trials score alike (one seed for all, a learning rate too small to
    move a prediction, only the dropout searched), one epoch each, one at a time."""
    doc = {**BINARY_SPACE, "metric": "val_f1", "mode": "max", "num_samples": num_samples,
           "max_epochs": 1, "augment": False, "stop": stop, "start_with": [],
           "trial_seed": 5,
           "asha": {"grace_period": 1, "reduction_factor": 2},
           "params": {**BINARY_SPACE["params"], "backbone": "resnet18", "frozen_layers": 20,
                      "lr": 1e-9, "dropout": {"low": 0.0, "high": 0.01}}}
    return write_space(tmp_path, doc)


@pytest.mark.parametrize("stop, kind, trials, words", [
    ({"at": 0.0}, "goal", 1, "val_f1 {best} reached the goal 0 (trial "),
    ({"converged": 2}, "converged", 3, "the last 2 trials to end raised the best val_f1 by "),
])
def test_a_goal_or_a_converged_study_ends_the_sweep_and_says_why(ray_cluster, binary_data,
                                                                 tmp_path, capsys, stop,
                                                                 kind, trials, words):
    """``stop: {at: G}`` ends the sweep at the first result that reaches G;
    ``stop: {converged: K}`` once K trials in a row brought no gain beyond the best's
    bootstrap half-width (trials here score alike: the third ends it). The summary,
    ``end.json`` and the leaderboard say why."""
    from covid_tune.runs.ray_state import trial_states
    from covid_tune.runs.record import read_end

    run = tmp_path / "runs" / kind
    assert main(["sweep", "--space", str(steady_space(tmp_path, stop)), "--data",
                 str(binary_data), "--storage-path", str(tmp_path / "runs"), "--name", kind,
                 "--max-concurrent", "1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    end = read_end(run)
    assert end is not None and end.kind == kind and not end.resumable
    best = max(json.loads(line)["val_f1"] for path in run.glob("trial_*/result.json")
               for line in path.read_text().splitlines())
    assert words.format(best=f"{best:.4f}") in end.reason
    assert f"ended: {end.reason}" in out
    assert len(trial_states(run)) == trials, trial_states(run)  # not the 6 of num_samples
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "board")]) == 0
    assert end.reason in (tmp_path / "board" / "leaderboard.md").read_text()


@pytest.mark.realistic  # a real time budget: about a minute (make soak)
def test_a_time_budget_stops_as_ctrl_c_does_and_resume_grows_the_sweep(ray_cluster,
                                                                        binary_data,
                                                                        tmp_path, capsys):
    """``--time-budget`` ends the sweep gracefully (trials kept mid-way, the reason
    recorded, the run resumable); ``resume --num-samples N`` then finishes them and
    grows the sweep to N trials, each once, the study with it; a budget not above the
    trials the run has is refused in one line. Batches are slowed so that the sweep
    outlasts its budget on any machine."""
    from covid_tune.runs.ray_state import trial_states
    from covid_tune.runs.record import SweepOptions, read_end, read_record
    from covid_tune.search.sweep import resume_sweep, run_sweep

    space = steady_space(tmp_path, {}, num_samples=4)
    doc = yaml.safe_load(space.read_text())
    doc["max_epochs"], doc["asha"]["grace_period"] = 3, 3  # no ASHA stop: 3 epochs each
    space.write_text(yaml.safe_dump(doc))
    run, logs = tmp_path / "runs" / "budget", tmp_path / "logs"
    logs.mkdir()
    trainable = slowed(logs, batch_seconds=0.4)  # about 2 s an epoch, 6 s a trial
    started = time.monotonic()
    run_sweep(SweepOptions(space_file=str(space), data=str(binary_data), name="budget",
                           storage_path=str(tmp_path / "runs"), max_concurrent=1,
                           time_budget="12s"), trainable=trainable)
    print(f"stopped by the budget after {time.monotonic() - started:.0f} s")
    end, states = read_end(run), trial_states(run)
    assert end.kind == "time budget" and end.resumable and "resume" in end.reason
    assert len(states) < 4 or set(states.values()) != {"TERMINATED"}, states
    assert "ended: the time budget (12s) was spent" in capsys.readouterr().out

    assert main(["resume", str(run), "--num-samples", str(len(states))]) == 2
    assert "--num-samples" in capsys.readouterr().err
    resume_sweep(run, num_samples=6, trainable=trainable)
    states = trial_states(run)
    assert len(states) == 6 and set(states.values()) == {"TERMINATED"}, states
    assert read_end(run).reason == "all 6 trials ran"
    assert read_record(run).options.num_samples == 6
    study = optuna.load_study(study_name="budget", storage=f"sqlite:///{run / STUDY_FILE}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    assert len(list(run.glob("trial_*"))) == 6


def test_the_schedulers_state_brings_back_its_rungs_and_its_stop_decisions():
    """What ``SweepScheduler.state`` saves (with the searcher, in each snapshot) makes a
    new scheduler decide as the old one did: a trial it stopped is stopped again when
    its resumed report of that epoch arrives (a driver stopped before Tune ended the
    trial), and a new trial meets the same rung."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from covid_tune.core.space_file import parse_space
    from covid_tune.search.sweep import build_scheduler

    class Trial(SimpleNamespace):  # what the scheduler reads of Ray's Trial
        TERMINATED, status, last_result, latest_checkpoint_result = "TERMINATED", "PENDING", {}, None

        def is_finished(self):
            return False

    space = parse_space({**BINARY_SPACE, "max_epochs": 4}, "space.yaml")
    first = build_scheduler(space)
    trials = {name: Trial(trial_id=name) for name in ("good", "poor", "late")}
    for trial in trials.values():
        first.on_trial_add(SimpleNamespace(search_alg=None), trial)
    assert first.on_trial_result(None, trials["good"], {"epoch": 1, "val_loss": 0.5}) == \
        TrialScheduler.CONTINUE
    assert first.on_trial_result(None, trials["poor"], {"epoch": 1, "val_loss": 0.9}) == \
        TrialScheduler.STOP
    resumed = build_scheduler(space)
    resumed.take_over(first.state())
    for trial in trials.values():
        resumed.on_trial_add(SimpleNamespace(search_alg=None), trial)
    assert resumed.on_trial_result(None, trials["poor"], {"epoch": 1, "val_loss": 0.9}) == \
        TrialScheduler.STOP
    assert resumed.on_trial_result(None, trials["late"], {"epoch": 1, "val_loss": 0.95}) == \
        first.on_trial_result(None, trials["late"], {"epoch": 1, "val_loss": 0.95}) == \
        TrialScheduler.STOP
