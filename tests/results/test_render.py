"""The leaderboard's words and tables, on hand-made rows: cells, durations, escaping,
and reproduce spaces that load back to the row's configuration."""

from __future__ import annotations

import math

import optuna

from covid_tune.core.space_file import load_space
from covid_tune.results.render import cell, display_row, markdown_table, optuna_label, reproduce_command
from covid_tune.core.units import duration
from covid_tune.results.rows import TABLES, pick_rows
from covid_tune.search.define_by_run import define_by_run
from test_rows import run, trial


def test_duration():
    assert [duration(s) for s in (12.4, 185, 6000, None)] == ["12s", "3min 5s", "1hr 40min", "?"]


def test_cells_are_written_as_the_assignment_wrote_them():
    scores = {"accuracy": 0.891, "f1": 0.9071}
    assert cell(TABLES["binary"], scores) == "89/0.907"
    assert cell(TABLES["multilabel"], scores) == "89/91"
    assert cell(TABLES["binary"], {"accuracy": math.nan, "f1": 0.0}) == "n/a"
    assert cell(TABLES["binary"], None) == "n/a"


def test_markdown_escapes_pipes():
    lines = markdown_table([{"a": "x|y", "b": 1}])
    assert lines[2] == "| x\\|y | 1 |"


def test_optuna_labels():
    assert optuna_label("frozen_layers_vgg16") == "frozen_layers (vgg16)"
    assert optuna_label("lr") == "lr"


def test_display_row_shows_the_assignments_columns_then_the_rest():
    row = pick_rows(TABLES["binary"], [run([trial("a", "vgg16", 13, 0.8, hand_grid=True)])])[0]
    row.scores = {"train": {"accuracy": 1.0, "f1": 1.0}}
    shown = display_row(TABLES["binary"], row)
    assert list(shown)[:4] == ["Backbone", "Frozen Layers", "Epochs", "Training Time"]
    assert shown["Training Set Accuracy/F1 Score"] == "100/1.000"
    assert shown["Testing Set Accuracy/F1 Score"] == "n/a"
    assert shown["Source"] == "hand grid" and shown["lr"] == "0.01"


def test_reproduce_space_loads_back_to_the_rows_config(tmp_path):
    source = run([trial("a", "resnet18", 7, 0.8, epoch=2)],
                 augment={"rotation": 5.0, "flip": False})
    row = pick_rows(TABLES["binary"], [source])[0]
    command = reproduce_command(row, tmp_path, "/data set")
    assert "--data '/data set'" in command and "--seed 0 --cpus-per-trial 1" in command
    space = load_space(tmp_path / "reproduce" / "run-a.yaml")
    assert space.max_epochs == 2 and space.num_samples == 1 and space.start_with == ()
    assert space.augment == source.space.augment and space.image_size == 32
    config = define_by_run(space)(optuna.create_study().ask())
    for key, value in row.record.config.items():
        if key not in ("focal_alpha", "focal_gamma"):
            assert config[key] == value, key
