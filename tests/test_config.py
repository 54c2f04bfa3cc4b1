"""Search-space files: every shipped YAML parses, every kind of mistake is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from covid_tune.config import Choice, Fixed, Range, TrialConfig, load_space
from covid_tune.errors import UserError

SPACES = sorted(Path(__file__).resolve().parent.parent.glob("search_spaces/*.yaml"))

MINIMAL = {
    "task": "multilabel",
    "params": {
        "backbone": {"choices": ["vgg16", "resnet18"]},
        "lr": {"low": 1e-4, "high": 1e-1, "log": True},
        "loss": {"choices": ["bce", "focal"]},
        "focal_alpha": {"low": 0.1, "high": 0.9},
    },
}


def write(tmp_path, doc, name="space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def errors_of(tmp_path, doc) -> str:
    with pytest.raises(UserError) as caught:
        load_space(write(tmp_path, doc))
    return str(caught.value)


def with_params(**changes) -> dict:
    return {**MINIMAL, "params": {**MINIMAL["params"], **changes}}


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_shipped_space_is_valid(path):
    space = load_space(path)
    assert space.task in ("binary", "multilabel")
    assert space.metric.startswith("val_")
    assert isinstance(space.params["backbone"], (Choice, Fixed))
    assert set(space.params["frozen_layers"]) >= {"vgg16", "resnet18"} & set(
        getattr(space.params["backbone"], "choices", ()))


def test_shipped_spaces_start_with_the_assignment_grid():
    binary = load_space("search_spaces/binary.yaml")
    rows = {(r["backbone"], r["frozen_layers"]) for r in binary.start_with}
    assert rows == {("vgg16", 13), ("vgg16", 7), ("vgg16", 4), ("vgg16", 0),
                    ("resnet18", 20), ("resnet18", 0)}
    multilabel = load_space("search_spaces/multilabel.yaml")
    rows = {(r["backbone"], r["loss"]) for r in multilabel.start_with}
    assert rows == {("vgg16", "bce"), ("vgg16", "focal"), ("resnet18", "bce"),
                    ("resnet18", "focal")}


def test_minimal_file_gets_defaults(tmp_path):
    space = load_space(write(tmp_path, MINIMAL))
    assert space.metric == "val_macro_f1" and space.mode == "max"
    assert space.params["frozen_layers"]["vgg16"] == Fixed(0)
    assert space.params["lr"] == Range(1e-4, 1e-1, log=True)


def test_yaml_syntax_error_names_line(tmp_path):
    message = errors_of(tmp_path, "task: binary\nparams: {backbone: [vgg16\n")
    assert "space.yaml" in message and "line 3" in message


def test_unknown_key_suggests_nearest(tmp_path):
    message = errors_of(tmp_path, {**MINIMAL, "max_epoch": 3})
    assert "max_epoch: unknown key; did you mean 'max_epochs'?" in message
    message = errors_of(tmp_path, with_params(learning_rate=0.1, dropuot=0.1))
    assert "params.dropuot: unknown key; did you mean 'dropout'?" in message
    assert "params.learning_rate" in message


@pytest.mark.parametrize("change, expected", [
    ({"max_epochs": "ten"}, "max_epochs: expected an integer"),
    ({"mode": "maximise"}, "mode: 'maximise' is not valid"),
    ({"task": "triage"}, "task: 'triage' is not a task"),
    ({"metric": "val_auc"}, "metric: 'val_auc' is not reported by multilabel trials"),
    ({"asha": {"grace_period": 50}}, "asha.grace_period: 50 is more than max_epochs"),
    ({"augment": {"scale": [0.9, 0.5]}}, "augment.scale"),
])
def test_top_level_mistakes(tmp_path, change, expected):
    assert expected in errors_of(tmp_path, {**MINIMAL, **change})


@pytest.mark.parametrize("params, expected", [
    ({"lr": {"low": 0.1, "high": 0.01}}, "params.lr: low (0.1) must be less than high (0.01)"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
    ({"lr": "fast"}, "params.lr: expected a float"),
    ({"batch_size": {"low": 8.5, "high": 64}}, "params.batch_size.low: expected a int"),
    ({"backbone": {"choices": []}}, "choices must be a non-empty list"),
    ({"backbone": {"choices": ["vgg16", "densenet"]}}, "unknown backbone 'densenet'"),
    ({"frozen_layers": {"vgg16": {"low": 0, "high": 14}, "resnet18": 0}},
     "vgg16 has 13 conv layers"),
    ({"frozen_layers": {"vgg16": 3}}, "params.frozen_layers.resnet18: missing"),
    ({"loss": "bce"}, "params.focal_alpha: only used with the focal loss"),
    ({"loss": {"choices": ["ce"]}}, "'ce' is not a multilabel loss"),
])
def test_parameter_mistakes(tmp_path, params, expected):
    assert expected in errors_of(tmp_path, with_params(**params))


def test_all_problems_reported_at_once(tmp_path):
    doc = {**with_params(lr={"low": 1, "high": 0}, dropout="x"), "mode": "up", "extra": 1}
    message = errors_of(tmp_path, doc)
    assert message.startswith("4 problems:")
    for key in ("params.lr", "params.dropout", "mode", "extra"):
        assert f"space.yaml: {key}:" in message


def test_start_with_outside_space_is_refused(tmp_path):
    doc = {**MINIMAL, "start_with": [{"backbone": "vgg16", "lr": 5.0}, {"learning": 1}]}
    message = errors_of(tmp_path, doc)
    assert "start_with[0].lr: 5.0 is outside the search space" in message
    assert "start_with[1].learning: unknown key" in message


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such search-space file"):
        load_space(tmp_path / "nope.yaml")


def test_overrides_revalidate_and_clamp_grace(tmp_path):
    space = load_space(write(tmp_path, {**MINIMAL, "asha": {"grace_period": 3}}))
    quick = space.with_overrides(max_epochs=2, image_size=32)
    assert quick.max_epochs == 2 and quick.image_size == 32 and quick.asha.grace_period == 2
    with pytest.raises(UserError, match="image_size"):
        space.with_overrides(image_size=8)


def test_trial_config_ignores_optuna_bookkeeping():
    config = {"task": "binary", "backbone": "vgg16", "frozen_layers": 4,
              "frozen_layers_vgg16": 4, "lr": 0.01, "momentum": 0.9, "batch_size": 8,
              "weight_decay": 0.0, "hidden": 16, "dropout": 0.1, "loss": "ce",
              "focal_alpha": 0.25, "focal_gamma": 2.0, "max_epochs": 2, "image_size": 32,
              "augment": None, "pretrained": "none", "metric": "val_f1", "mode": "max"}
    cfg = TrialConfig.from_dict(config)
    assert cfg.frozen_layers == 4 and cfg.to_dict()["backbone"] == "vgg16"
