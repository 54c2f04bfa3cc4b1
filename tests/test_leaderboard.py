"""The leaderboard: groups, best checkpoints, rendering and files, from small real sweeps
(a Part 1 and a Part 2 run on the session's two-node Ray cluster); the pieces that need
no training are tested on hand-written trial folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from covid_tune.config import load_space
from covid_tune.leaderboard import (
    SPLIT_COLUMNS, duration, frozen_name, param_importances, write_leaderboard)
from covid_tune.runs import RunInfo, read_run, read_trial
from covid_tune.space import define_by_run
from covid_tune.sweep import SweepOptions, run_sweep

COMMON = """
mode: max
max_epochs: 2
image_size: 32
pretrained: none
augment: false
asha: {grace_period: 1, reduction_factor: 2}
"""
BINARY_SPACE = "task: binary\nmetric: val_f1\nnum_samples: 4" + COMMON + """
params:
  backbone: {choices: [vgg16, resnet18]}
  frozen_layers: {vgg16: {low: 0, high: 13}, resnet18: {low: 0, high: 20}}
  lr: {low: 1.0e-3, high: 5.0e-2, log: true}
  momentum: 0.9
  batch_size: 16
  hidden: 32
  dropout: 0.2
start_with:
  - {backbone: vgg16, frozen_layers: 13, lr: 0.01}
  - {backbone: resnet18, frozen_layers: 20, lr: 0.01}
  - {backbone: resnet18, frozen_layers: 0, lr: 0.01}
"""
MULTILABEL_SPACE = "task: multilabel\nmetric: val_f1\nnum_samples: 3" + COMMON + """
params:
  backbone: resnet18
  frozen_layers: {low: 0, high: 20}
  lr: {low: 1.0e-3, high: 5.0e-2, log: true}
  momentum: 0.9
  batch_size: 16
  hidden: 32
  dropout: 0.2
  loss: {choices: [bce, focal]}
  focal_gamma: {low: 0.5, high: 3.0}
start_with:
  - {frozen_layers: 0, loss: bce, lr: 0.01}
  - {frozen_layers: 0, loss: focal, focal_gamma: 2.0, lr: 0.01}
"""


def sweep(tmp: Path, name: str, space: str, data: Path) -> Path:
    space_file = tmp / f"{name}.yaml"
    space_file.write_text(space)
    run_sweep(SweepOptions(space_file=str(space_file), data=str(data), name=name,
                           storage_path=str(tmp / "runs")))
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def board(ray_cluster, binary_data, multilabel_data, tmp_path_factory):
    """Two real sweeps, then one leaderboard over both."""
    tmp = tmp_path_factory.mktemp("leaderboard")
    runs = [sweep(tmp, "part1", BINARY_SPACE, binary_data),
            sweep(tmp, "part2", MULTILABEL_SPACE, multilabel_data)]
    out = tmp / "board"
    text = write_leaderboard([str(r) for r in runs], str(out))
    return runs, out, text


def section_rows(text: str, title: str) -> list[dict]:
    """Rows of the table right under ``title`` (stops at the first non-table line)."""
    lines = text[text.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    header = [c.strip("| ") for c in block[0]]
    return [dict(zip(header, row)) for row in block[2:]]


def all_recipes(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"trial": p.parent.parent.name.removeprefix("trial_")}
            for p in run_dir.glob("trial_*/checkpoint_*/recipe.json")]


def test_part1_groups_and_columns(board):
    runs, _, text = board
    rows = section_rows(text, "## Part 1")
    assert list(rows[0])[:7] == ["Backbone", "Frozen Layers", "Epochs", "Training Time",
                                 *SPLIT_COLUMNS.values()]
    expected = {(r["config"]["backbone"].upper(), frozen_name(r["config"]))
                for r in all_recipes(runs[0])}
    assert {(r["Backbone"], r["Frozen Layers"]) for r in rows} == expected
    assert ("VGG16", "All Layers except FC") in expected
    assert ("RESNET18", "All Layers except FC") in expected and ("RESNET18", "None") in expected
    backbones = [r["Backbone"] for r in rows]
    assert backbones == sorted(backbones, key=["VGG16", "RESNET18"].index)
    for row in rows:
        assert row["Source"] in ("hand grid", "searched")
        assert row["Testing Set Accuracy/F1 Score"] != "n/a"


def test_each_row_is_its_groups_best_epoch(board):
    """The row's trial and epoch are the best checkpoint of its group, not the last epoch."""
    runs, _, text = board
    rows = section_rows(text, "## Part 1")
    recipes = all_recipes(runs[0])
    for row in rows:
        group = [r for r in recipes if (r["config"]["backbone"].upper(),
                                        frozen_name(r["config"])) == (row["Backbone"],
                                                                      row["Frozen Layers"])]
        best = max(r["metrics"]["val_f1"] for r in group)
        chosen = [r for r in group if r["trial"] == row["Trial"].split("/")[1]
                  and r["epoch"] == int(row["Epochs"])]
        assert chosen and chosen[0]["metrics"]["val_f1"] == best


def test_part2_groups_by_loss_and_has_no_test_column(board):
    runs, _, text = board
    rows = section_rows(text, "## Part 2")
    assert list(rows[0])[:6] == ["Backbone", "Loss Function", "Epochs", "Training Time",
                                 SPLIT_COLUMNS["train"], SPLIT_COLUMNS["validation"]]
    assert SPLIT_COLUMNS["test"] not in rows[0]
    losses = {r["config"]["loss"] for r in all_recipes(runs[1])}
    names = {"bce": "BCE With Logits Loss", "focal": "Focal Loss"}
    assert [r["Loss Function"] for r in rows] == [names[k] for k in ("bce", "focal") if k in losses]


def test_hand_grid_and_importances_are_shown(board):
    _, _, text = board
    assert text.count("### Hand grid (start_with) beside the search") == 2
    assert "### Hyperparameter importances (Optuna, `part1`)" in text
    assert "### Hyperparameter importances (Optuna, `part2`)" in text
    hand = section_rows(text, "### Hand grid")
    vgg = next(r for r in hand if r["Backbone"] == "VGG16")
    assert vgg["Hand grid `val_f1`"] != "—"  # the hand-grid VGG16 row ran


def test_files_parquet_csv_and_pngs(board):
    _, out, text = board
    table = pq.read_table(out / "leaderboard.parquet")
    md_rows = len(section_rows(text, "## Part 1")) + len(section_rows(text, "## Part 2"))
    assert table.num_rows == md_rows
    records = table.to_pylist()
    assert {r["task"] for r in records} == {"binary", "multilabel"}
    assert all(r["scores"] == "re-evaluated" for r in records)
    assert all(r["test_f1"] is None for r in records if r["task"] == "multilabel")
    with open(out / "leaderboard.csv", newline="") as handle:
        assert [r["trial_id"] for r in csv.DictReader(handle)] == [r["trial_id"] for r in records]
    pictures = [out / r["confusion_png"] for r in records]
    pictures += [out / "comparison-binary.png", out / "comparison-multilabel.png"]
    for path in pictures:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"


def test_reevaluated_validation_matches_what_training_recorded(board):
    """Same checkpoint, same deterministic transform: the same validation scores."""
    _, out, _ = board
    for record in pq.read_table(out / "leaderboard.parquet").to_pylist():
        recipe = json.loads((Path(record["checkpoint"]) / "recipe.json").read_text())
        assert record["validation_f1"] == pytest.approx(recipe["metrics"]["val_f1"], abs=1e-6)
        assert record["validation_accuracy"] == pytest.approx(
            recipe["metrics"]["val_accuracy"], abs=1e-6)


def test_reproduce_spaces_fix_the_rows_config(board):
    _, out, _ = board
    for record in pq.read_table(out / "leaderboard.parquet").to_pylist():
        space_file = record["reproduce"].split("--space ")[1].split(" ")[0]
        space = load_space(space_file)
        assert space.max_epochs == record["Epochs"] and space.num_samples == 1
        config = define_by_run(space)(optuna.create_study().ask())
        recipe = json.loads((Path(record["checkpoint"]) / "recipe.json").read_text())
        wanted = recipe["config"]
        for key in ("backbone", "frozen_layers", "lr", "hidden", "loss", "focal_gamma"):
            assert config[key] == wanted[key], key


def test_every_trial_logs_to_tensorboard(board):
    """TensorBoard's own reader finds scalars, images and HParams in every trial."""
    for run in board[0]:
        trials = sorted(run.glob("trial_*"))
        assert trials
        for trial in trials:
            events = EventAccumulator(str(trial))
            events.Reload()
            tags = events.Tags()
            assert {"loss/train", "loss/val", "accuracy/val", "f1/val", "trial/lr",
                    "trial/epoch_seconds", "images_per_second/train",
                    "best/val_f1"} <= set(tags["scalars"])
            assert "confusion/val" in tags["images"]
            content = events.PluginTagToContent("hparams")
            start = hparams_metadata.parse_session_start_info_plugin_data(
                content[hparams_metadata.SESSION_START_INFO_TAG])
            assert {"backbone", "lr"} <= set(start.hparams)
    multilabel_trial = next(board[0][1].glob("trial_*"))
    events = EventAccumulator(str(multilabel_trial))
    events.Reload()
    assert {"f1_covid/val", "f1_normal/val", "f1_pneumonia/val"} <= set(events.Tags()["scalars"])


def test_hparams_dashboard_compares_best_epochs(board):
    """The HParams dashboard's metrics are the trials' best-epoch scores, not Ray's."""
    trial = next(board[0][0].glob("trial_*"))
    events = EventAccumulator(str(trial))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG])
    assert "best/val_f1" in {m.name.tag for m in experiment.metric_infos}


# --- no training needed below -------------------------------------------------------

def fake_checkpoint(trial: Path, index: int, epoch: int, val_f1: float) -> None:
    folder = trial / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    config = {"task": "binary", "backbone": "resnet18", "frozen_layers": 0, "loss": "ce",
              "metric": "val_f1", "mode": "max", "image_size": 32}
    (folder / "recipe.json").write_text(json.dumps(
        {"epoch": epoch, "config": config, "metrics": {"val_f1": val_f1}}))


def test_best_epoch_not_last(tmp_path):
    trial = tmp_path / "trial_abc"
    for index, (epoch, f1) in enumerate([(2, 0.9), (3, 0.7)]):
        fake_checkpoint(trial, index, epoch, f1)
    (trial / "result.json").write_text("\n".join(json.dumps(
        {"epoch": e, "time_total_s": 10.0 * e}) for e in (1, 2, 3)))
    record = read_trial(trial, "run")
    assert (record.epoch, record.seconds, record.trial_id) == (2, 20.0, "abc")


def test_run_without_checkpoints_is_refused(tmp_path):
    from covid_tune.errors import UserError

    (tmp_path / "sweep.json").write_text(json.dumps({"name": "r", "space_file": "gone.yaml"}))
    (tmp_path / "trial_x").mkdir()
    with pytest.raises(UserError, match="no trial of this run has a checkpoint"):
        read_run(tmp_path)


def test_too_few_trials_for_importances(tmp_path):
    study = optuna.create_study(study_name="r", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                direction="maximize")
    study.enqueue_trial({"lr": 0.01})
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)})
    study.tell(trial, 0.5)
    run = RunInfo(tmp_path, "r", {}, trials=[])
    importances, note = param_importances(run)
    assert importances == {} and "Too few trials" in note


@pytest.mark.parametrize(("backbone", "frozen", "name"), [
    ("vgg16", 13, "All Layers except FC"), ("vgg16", 7, "First 7 CNN Layers"),
    ("vgg16", 0, "None"), ("resnet18", 20, "All Layers except FC")])
def test_frozen_layer_names(backbone, frozen, name):
    assert frozen_name({"backbone": backbone, "frozen_layers": frozen}) == name


def test_duration():
    assert [duration(s) for s in (12.4, 185, 6000, None)] == ["12s", "3min 5s", "1hr 40min", "?"]
