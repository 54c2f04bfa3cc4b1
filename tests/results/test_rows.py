"""Grouping and picking rows, on hand-made trial records: no training, no files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from covid_tune.core.space_file import parse_space
from covid_tune.runs.record import Provenance, SweepOptions, SweepRecord
from covid_tune.runs.reader import best_overall, RunInfo, TrialRecord
from covid_tune.results.rows import (EXTRA_PARAMS, TABLES, extra_params, frozen_name, pick_rows)

SPACE = {"task": "binary", "metric": "val_f1", "mode": "max", "max_epochs": 3,
         "image_size": 32, "num_samples": 4,
         "params": {"backbone": {"choices": ["vgg16", "resnet18"]},
                    "frozen_layers": {"vgg16": {"low": 0, "high": 13},
                                      "resnet18": {"low": 0, "high": 20}}}}


def trial(trial_id: str, backbone: str, frozen: int, f1: float, epoch: int = 2,
          hand_grid: bool = False, loss: str = "ce") -> TrialRecord:
    config = {"task": "binary", "backbone": backbone, "frozen_layers": frozen, "loss": loss,
              "lr": 0.01, "momentum": 0.9, "batch_size": 8, "weight_decay": 0.0,
              "hidden": 16, "dropout": 0.1, "focal_alpha": 0.25, "focal_gamma": 2.0}
    return TrialRecord("run", trial_id, config, Path(trial_id), epoch,
                       {"val_f1": f1, "val_loss": f1}, 1.0, hand_grid)


def run(trials: list[TrialRecord], name: str = "run", **space) -> RunInfo:
    record = SweepRecord(SweepOptions("s.yaml", "/data", name=name),
                         Provenance("/data", "x", 1, [], {}, "", ""))
    for t in trials:
        t.run = name
    return RunInfo(Path(name), name, record, parse_space({**SPACE, **space}, "s.yaml"), trials)


@pytest.mark.parametrize(("backbone", "frozen", "name"), [
    ("vgg16", 13, "All Layers except FC"), ("vgg16", 7, "First 7 CNN Layers"),
    ("vgg16", 0, "None"), ("resnet18", 20, "All Layers except FC"),
    ("resnet18", 1, "First 1 CNN Layers"), ("densenet121", 8, "All Blocks except FC"),
    ("resnet50", 1, "First 1 Block"), ("convnext_tiny", 3, "First 3 Blocks"),
    ("mobilenet_v3_large", 0, "None")])
def test_frozen_layer_names(backbone, frozen, name):
    assert frozen_name({"backbone": backbone, "frozen_layers": frozen}) == name


def test_groups_follow_the_assignments_order_and_pick_each_best():
    trials = [trial("a", "resnet18", 0, 0.7), trial("b", "vgg16", 0, 0.5),
              trial("c", "vgg16", 13, 0.6), trial("d", "vgg16", 0, 0.8, hand_grid=True),
              trial("e", "resnet18", 0, math.nan)]
    rows = pick_rows(TABLES["binary"], [run(trials)])
    assert [(r.backbone, r.group) for r in rows] == [
        ("VGG16", "All Layers except FC"), ("VGG16", "None"), ("RESNET18", "None")]
    assert [r.record.trial_id for r in rows] == ["c", "d", "a"]  # NaN never wins
    assert [len(r.trials) for r in rows] == [1, 2, 2]
    assert rows[1].best_of(True).trial_id == "d" and rows[1].best_of(False).trial_id == "b"
    assert rows[0].best_of(True) is None


def test_new_backbones_follow_the_registrys_order():
    trials = [trial("a", "mobilenet_v3_large", 0, 0.7), trial("b", "densenet121", 8, 0.5),
              trial("c", "resnet18", 0, 0.6), trial("d", "convnext_tiny", 2, 0.8)]
    rows = pick_rows(TABLES["binary"], [run(trials)])
    assert [r.record.trial_id for r in rows] == ["c", "b", "d", "a"]
    assert rows[1].group == "All Blocks except FC"


def test_min_metric_picks_the_lowest_and_ties_go_to_fewer_epochs():
    trials = [trial("a", "vgg16", 0, 0.3, epoch=3), trial("b", "vgg16", 0, 0.3, epoch=1),
              trial("c", "vgg16", 0, 0.9)]
    rows = pick_rows(TABLES["binary"], [run(trials, metric="val_loss", mode="min")])
    assert rows[0].record.trial_id == "b"


def test_rows_span_runs_and_the_best_run_is_named():
    first = run([trial("a", "vgg16", 0, 0.5)], name="one")
    second = run([trial("b", "vgg16", 0, 0.9)], name="two")
    rows = pick_rows(TABLES["binary"], [first, second])
    assert len(rows) == 1 and rows[0].run is second and len(rows[0].trials) == 2
    assert best_overall([first, second]) == (second, second.trials[0])


def test_extra_params_hide_what_the_table_already_shows():
    binary = extra_params(trial("a", "vgg16", 3, 0.5).config)
    assert "frozen_layers" not in binary and "focal_gamma" not in binary
    focal = extra_params({**trial("a", "vgg16", 3, 0.5, loss="focal").config,
                          "task": "multilabel"})
    assert {"frozen_layers", "focal_alpha", "focal_gamma"} <= set(focal)
    assert set(EXTRA_PARAMS) >= set(focal)
