"""Search-space files: every shipped YAML parses, every kind of mistake is reported
(also those found by fuzzing), and reading a space needs neither torch nor Ray."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covid_tune.core.space import (PARAM_TYPES, Augment, Choice, Fixed, Range, SearchSpace, Selection,
                                   Threshold, TrialConfig)
from covid_tune.core.space_file import (ASHA_KEYS, AUGMENT_KEYS, RANGE_KEYS, TOP_KEYS, dump_space,
                                        load_space, parse_space, parse_space_text)
from covid_tune.errors import UserError
from covid_tune.search.define_by_run import define_by_run, start_points
from helpers import loaded_after

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted(ROOT.glob("search_spaces/*.yaml"))
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
optuna.logging.set_verbosity(optuna.logging.WARNING)

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
    assert space.metric.startswith(f"{space.selection.prefix}_")
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


def test_part_2_chooses_on_a_held_out_selection_split_and_part_1_on_validation():
    multilabel = load_space("search_spaces/multilabel.yaml")
    assert (multilabel.metric, multilabel.selection.holdout) == ("sel_f1", 0.15)
    assert multilabel.selection.split == "selection"
    binary = load_space("search_spaces/binary.yaml")
    assert (binary.metric, binary.selection.split) == ("val_f1", "validation")
    assert binary.threshold == multilabel.threshold == Threshold("youden")


@pytest.mark.parametrize("changes, key, words", [
    ({"metric": "sel_f1"}, "metric", "needs a selection split"),
    ({"selection": {"holdout": 0.15}, "metric": "val_f1"}, "metric", "use sel_f1"),
    ({"selection": {"holdout": 0.9}}, "selection.holdout", "from 0 to 0.5"),
    ({"selection": {"holdout": True}}, "selection.holdout", "from 0 to 0.5"),
    ({"selection": {"hold_out": 0.1}}, "selection.hold_out", "did you mean 'holdout'"),
    ({"selection": 0.15}, "selection", "{holdout: 0.15}"),
    ({"threshold": {"rule": "max"}}, "threshold.rule", "youden, f1, sensitivity"),
    ({"threshold": {"rule": "sensitivity"}}, "threshold.target", "such as 0.95"),
    ({"threshold": {"rule": "sensitivity", "target": 1.5}}, "threshold.target", "(0, 1]"),
    ({"threshold": {"rule": "f1", "target": 0.9}}, "threshold.target", "only the sensitivity"),
])
def test_selection_and_threshold_mistakes_name_the_key(tmp_path, changes, key, words):
    message = errors_of(tmp_path, {**MINIMAL, **changes})
    assert f": {key}: " in message and words in message


def test_selection_and_threshold_settings_survive_the_round_trip(tmp_path):
    doc = {**MINIMAL, "metric": "sel_auroc", "selection": {"holdout": 0.2},
           "threshold": {"rule": "sensitivity", "target": 0.95}}
    space = load_space(write(tmp_path, doc))
    assert space.metric == "sel_auroc" and space.mode == "max"
    assert space.threshold == Threshold("sensitivity", 0.95)
    again = parse_space(yaml.safe_load(dump_space(space)), "again.yaml")
    assert (again.selection, again.threshold) == (Selection(0.2), space.threshold)
    assert space.fixed_settings()["threshold"] == {"rule": "sensitivity", "target": 0.95}
    assert load_space(write(tmp_path, {**MINIMAL, "selection": {"holdout": 0.1}})).metric \
        .startswith("sel_")


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
    ({"augment": {"flip": "yes"}}, "augment.flip: expected true or false"),
    ({"augment": {"rotate": 10}}, "augment.rotate: unknown key; did you mean 'rotation'?"),
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
    ({"backbone": {"choices": ["resnet18", "densenet121"]},
      "frozen_layers": {"resnet18": 20, "densenet121": {"low": 0, "high": 9}}},
     "params.frozen_layers.densenet121: densenet121 has 8 blocks; keep frozen_layers within 0..8"),
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


def test_augment_mistakes_are_reported_together(tmp_path):
    message = errors_of(tmp_path, {**MINIMAL, "augment": {"rotation": -1, "scale": [0.9, 0.5]}})
    assert message.startswith("2 problems:")
    assert "space.yaml: augment.rotation: expected degrees between 0 and 180" in message
    assert "space.yaml: augment.scale: expected [low, high]" in message


# --- typed, torch-free, and written back the same ---------------------------------------

def test_loading_a_space_imports_neither_torch_nor_ray():
    code = f"from covid_tune.core.space_file import load_space\nload_space({str(ROOT / 'search_spaces' / 'binary.yaml')!r})"
    assert loaded_after(code, ("torch", "ray", "torchvision")) == []


def test_augment_is_typed_from_the_yaml_to_the_trial(tmp_path):
    space = load_space(write(tmp_path, {**MINIMAL, "augment": {"rotation": 5, "scale": [0.5, 1]}}))
    assert isinstance(space.augment, Augment)
    assert space.augment == Augment(rotation=5, scale=(0.5, 1), ratio=Augment().ratio, flip=True)
    config = {**space.fixed_settings(), "backbone": "vgg16", "frozen_layers": 0, "lr": 0.01,
              "momentum": 0.9, "batch_size": 8, "weight_decay": 0.0, "hidden": 8,
              "dropout": 0.0, "loss": "bce", "focal_alpha": 0.25, "focal_gamma": 2.0}
    assert TrialConfig.from_dict(config).augment == space.augment  # Ray's dict, typed again
    assert load_space(write(tmp_path, {**MINIMAL, "augment": True})).augment == Augment()
    assert load_space(write(tmp_path, {**MINIMAL, "augment": False})).augment is None


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_dump_space_reads_back_to_the_same_space(tmp_path, path):
    """What a run keeps as its space.yaml is the space it was started with."""
    space = load_space(path)
    again = load_space(write(tmp_path, dump_space(space, "a header\nof two lines")))
    assert replace(again, source=space.source) == space
    unaugmented = replace(space, augment=None)
    again = load_space(write(tmp_path, dump_space(unaugmented)))
    assert replace(again, source=space.source) == unaugmented


# --- fuzzing: search spaces -------------------------------------------------------------

KNOWN_WORDS = (*TOP_KEYS, *PARAM_TYPES, *ASHA_KEYS, *AUGMENT_KEYS, *RANGE_KEYS, "choices",
               "binary", "multilabel", "vgg16", "resnet18", "ce", "bce", "focal", "val_f1",
               "val_macro_f1", "max", "min", "imagenet", "none")
SCALARS = (st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats()
           | st.text(max_size=12) | st.sampled_from(KNOWN_WORDS))
KEYS = st.sampled_from(KNOWN_WORDS) | st.text(max_size=8) | st.integers(-5, 5)
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(KEYS, inner, max_size=6), max_leaves=30)


SHIPPED = [yaml.safe_load(path.read_text()) for path in SPACES]


@st.composite
def mutated_space(draw) -> dict:
    """A shipped search space with 1 to 3 random changes: a key dropped or renamed, a
    value replaced by one of another type, somewhere in the tree."""
    doc = copy.deepcopy(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 3))):
        mutate_somewhere(draw, doc)
    return doc


def mutate_somewhere(draw, node) -> None:
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        action = draw(st.sampled_from(["drop", "rename", "replace"]))
        if action == "drop":
            del node[key]
        elif action == "rename" and isinstance(node, dict):
            node[draw(KEYS)] = node.pop(key)
        else:
            node[key] = draw(DOCUMENTS)
        return


def load_or_refuse(path: Path) -> None:
    """``load_space`` gives a SearchSpace (which Optuna can sample) or a UserError."""
    try:
        space = load_space(path)
    except UserError as exc:
        assert str(exc).startswith(str(path)) or " problems:\n" in str(exc)
        return
    assert isinstance(space, SearchSpace)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in start_points(space)[:1]:
        study.enqueue_trial(point)
    for _ in range(2):
        TrialConfig.from_dict(define_by_run(space)(study.ask()))


@pytest.fixture(scope="module")
def space_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-space") / "space.yaml"


@pytest.mark.slow
@FUZZ
@given(doc=DOCUMENTS)
def test_random_yaml_documents_load_or_are_refused(space_path, doc):
    space_path.write_text(yaml.safe_dump(doc))
    load_or_refuse(space_path)


@pytest.mark.slow
@FUZZ
@given(doc=mutated_space())
def test_mutated_shipped_spaces_load_or_are_refused(space_path, doc):
    space_path.write_text(yaml.safe_dump(doc))
    load_or_refuse(space_path)


@FUZZ
@given(text=st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(":-[]{},&*!|>'\"#\n "),
                    max_size=200))
@pytest.mark.slow
def test_random_text_loads_or_is_refused(space_path, text):
    space_path.write_text(text, encoding="utf-8")
    load_or_refuse(space_path)


@pytest.mark.parametrize("doc, expected", [
    ("task: [binary]\nparams: {backbone: vgg16}", "task: ['binary'] is not a task"),
    ("task: binary\nparams: {backbone: [vgg16]}", "params.backbone: expected a str"),
    ("task: binary\nparams: {backbone: {choices: [[vgg16]]}}", "choice ['vgg16'] is not str"),
    ("task: binary\nparams: {backbone: vgg16, lr: {low: .nan, high: 1}}",
     "params.lr.low: expected a float, got nan"),
    ("task: binary\nparams: {backbone: vgg16, lr: {low: 0.1, high: .inf}}",
     "params.lr.high: expected a float, got inf"),
    ("task: binary\nparams: {backbone: vgg16, lr: {low: 0.1, high: 1, choices: [1]}}",
     "params.lr.low: unknown key; valid keys: choices"),
    ("task: binary\nparams: {backbone: {choices: [vgg16, resnet18]}}\n"
     "start_with: [{frozen_layers: 3}]", "start_with[0].frozen_layers: frozen_layers depends "
                                         "on the backbone; give the row's backbone too"),
    ("task: binary\nparams: {backbone: vgg16}\n\x07", "line 3: YAML syntax error"),
    ("task: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
], ids=["task-list", "backbone-list", "choice-list", "nan", "inf", "choices-and-range",
        "frozen-row-without-backbone", "control-character", "deep-nesting"])
@pytest.mark.slow
def test_mistakes_found_by_fuzzing(tmp_path, doc, expected):
    path = tmp_path / "space.yaml"
    path.write_text(doc)
    with pytest.raises(UserError) as caught:
        load_space(path)
    assert expected in str(caught.value)


def test_an_alias_bomb_gives_a_short_message(tmp_path):
    """YAML aliases make a list of 9**6 items from a few lines; the message stays short."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcde", "bcdef")]
    path = tmp_path / "space.yaml"
    path.write_text("\n".join(lines) + "\ntask: binary\nparams: {backbone: vgg16, lr: *f}\n")
    with pytest.raises(UserError) as caught:
        load_space(path)
    assert "params.lr: expected a float" in str(caught.value) and len(str(caught.value)) < 5000


def test_spaces_that_would_train_or_rank_something_else_are_refused(tmp_path):
    """Each of these used to be accepted and silently do something other than it says."""
    row_default = {**MINIMAL, "start_with": [{"backbone": "vgg16", "momentum": 0.5}]}
    assert ("start_with[0].momentum: not in params, so the row would train with the "
            "default" in errors_of(tmp_path, row_default))
    loss_max = {**MINIMAL, "metric": "val_loss", "mode": "max"}
    assert "mode: max contradicts metric val_loss (lower is better); use mode: min" in \
        errors_of(tmp_path, loss_max)
    f1_min = {**MINIMAL, "metric": "val_f1", "mode": "min"}
    assert "mode: min contradicts metric val_f1 (higher is better)" in errors_of(tmp_path, f1_min)
    train = {**MINIMAL, "metric": "train_f1"}
    assert "metric: train_f1 ranks trials by the split they were trained on" in \
        errors_of(tmp_path, train)


def test_a_train_metric_is_allowed_when_asked_and_mode_follows_the_metric(tmp_path):
    def load(tmp_path, doc):
        return load_space(write(tmp_path, doc))

    allowed = load(tmp_path, {**MINIMAL, "metric": "train_f1", "allow_train_metric": True})
    assert allowed.metric == "train_f1" and allowed.allow_train_metric
    assert parse_space_text(dump_space(allowed), "again").allow_train_metric
    assert load(tmp_path, {**MINIMAL, "metric": "val_loss"}).mode == "min"  # no mode given
    assert load(tmp_path, {**MINIMAL, "metric": "val_hamming_loss"}).mode == "min"


def test_the_example_space_in_the_docs_is_valid():
    """The search-space example in docs/search-spaces.md parses to what its comments say."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "search-spaces.md").read_text()
    section = text[text.index("## An example, every key"):]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    space = parse_space_text(block, "docs/search-spaces.md")
    assert (space.metric, space.selection.holdout, space.threshold) == (
        "sel_f1", 0.15, Threshold("youden"))


def test_shipped_spaces_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    """``--space binary`` is the shipped file (the package's copy once installed); a
    file of that name in the working folder wins; anything else is refused with the
    names."""
    from covid_tune.core.space_file import SHIPPED_SPACES, find_space

    monkeypatch.chdir(tmp_path)
    for name in SHIPPED_SPACES:
        path = find_space(name)
        assert path.is_absolute() and path.name == f"{name}.yaml"
        assert path.read_text() == (ROOT / "search_spaces" / f"{name}.yaml").read_text()
        assert load_space(name).source == str(path)
    write(tmp_path, MINIMAL, "binary")
    assert find_space("binary") == Path("binary")
    assert load_space("binary").source == "binary"  # the local file, not the shipped one
    with pytest.raises(UserError, match="give a YAML file or a shipped space: binary, "
                                        "multilabel, demo"):
        load_space("resnet")


@pytest.mark.parametrize("data, key, words", [
    ({"classes": {"COVID": "covid-19", "covid": "covid-19"}}, "data.classes.covid",
     "mapped twice"),
    ({"classes": {"lung_opacity": "opacity"}}, "data.classes.lung_opacity",
     "is not a multilabel class"),
    ({"split": {"validation": 0.7}}, "data.split.validation", "between 0 and 0.5"),
    ({"split": {"val": 0.1}}, "data.split.val", "valid keys: validation, test"),
    ({"folders": {}}, "data.folders", "unknown key"),
])
def test_data_key_mistakes_name_the_key(tmp_path, data, key, words):
    message = errors_of(tmp_path, {**MINIMAL, "data": data})
    assert f": {key}: " in message and words in message


def test_the_data_key_survives_the_round_trip(tmp_path):
    from covid_tune.core.space import DataSpec

    doc = {**MINIMAL, "data": {"classes": {"Lung_Opacity": "pneumonia", "COVID": None},
                               "split": {"validation": 0.15}}}
    space = load_space(write(tmp_path, doc))
    assert space.data == DataSpec((("covid", None), ("lung_opacity", "pneumonia")),
                                  (("validation", 0.15),))  # the file is written sorted
    assert parse_space(yaml.safe_load(dump_space(space)), "again.yaml").data == space.data


@pytest.mark.parametrize("mlflow, key, words", [
    ({"tracking_uri": "ftp://host/x"}, "mlflow.tracking_uri",
     "ftp:// is not a tracking store MLflow reads; use http(s)://HOST:PORT"),
    ({"tracking_uri": "http://"}, "mlflow.tracking_uri", "no host; give http://HOST:PORT"),
    ({"tracking_uri": 5000}, "mlflow.tracking_uri", "expected a URI such as"),
    ({"experiment": ""}, "mlflow.experiment", "expected an experiment name"),
    ({"experimnt": "x"}, "mlflow.experimnt", "did you mean 'experiment'"),
    ("http://127.0.0.1:5000", "mlflow", "expected a mapping such as {tracking_uri: "),
])
def test_mlflow_key_mistakes_name_the_key(tmp_path, mlflow, key, words):
    message = errors_of(tmp_path, {**MINIMAL, "mlflow": mlflow})
    assert f": {key}: " in message and words in message


def test_the_mlflow_key_survives_the_round_trip_and_loads_without_mlflow(tmp_path):
    from covid_tune.core.space import Tracking

    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org", "sqlite:///m.db",
                "postgresql+psycopg2://u@db/mlflow", str(tmp_path / "mlruns"), "databricks"):
        doc = {**MINIMAL, "mlflow": {"tracking_uri": uri, "experiment": "chest-xray"}}
        space = load_space(write(tmp_path, doc))
        assert space.mlflow == Tracking(uri, "chest-xray")
        assert parse_space(yaml.safe_load(dump_space(space)), "again.yaml").mlflow == space.mlflow
    assert load_space(write(tmp_path, MINIMAL)).mlflow == Tracking(None, "covid-tune")
    assert "mlflow" not in dump_space(load_space(write(tmp_path, MINIMAL)))


@pytest.mark.parametrize("doc, key, words", [
    ({"stop": {"at": "high"}}, "stop.at", "expected the metric's goal, a number such as 0.95"),
    ({"stop": {"at": True}}, "stop.at", "expected the metric's goal"),
    ({"stop": {"converged": 1}}, "stop.converged", "expected a number of trials >= 2, got 1"),
    ({"stop": {"converged": 2.5}}, "stop.converged", "expected a number of trials >= 2"),
    ({"stop": {"convergd": 4}}, "stop.convergd", "did you mean 'converged'"),
    ({"stop": 0.95}, "stop", "expected a mapping such as {at: 0.95} or {converged: 8}"),
    ({"objectives": ["speed"]}, "objectives", "'speed' is not a deploy cost covid-tune "
                                              "measures; use one of: latency_ms, params"),
    ({"objectives": []}, "objectives", "expected a list of deploy costs such as [latency_ms]"),
    ({"objectives": ["params", "params"]}, "objectives", "names a cost twice"),
    ({"stop": {"converged": 4}, "metric": "val_loss", "mode": "min"}, "stop.converged",
     "val_loss has no bootstrap interval to tell a gain from noise; rank by one that has "
     "(accuracy, f1, macro_f1, auroc, ece, brier) or use stop.at"),
])
def test_stop_and_objectives_mistakes_name_the_key(tmp_path, doc, key, words):
    message = errors_of(tmp_path, {**MINIMAL, **doc})
    assert f": {key}: " in message and words in message


def test_stop_and_objectives_survive_the_round_trip(tmp_path):
    from covid_tune.core.space import Stop

    doc = {**MINIMAL, "stop": {"at": 1, "converged": 6}, "objectives": "latency_ms"}
    space = load_space(write(tmp_path, doc))
    assert space.stop == Stop(at=1.0, converged=6) and space.objectives == ("latency_ms",)
    again = parse_space(yaml.safe_load(dump_space(space)), "again.yaml")
    assert (again.stop, again.objectives) == (space.stop, space.objectives)
    plain = load_space(write(tmp_path, MINIMAL))
    assert plain.stop == Stop() and plain.objectives == ()
    assert "stop" not in dump_space(plain) and "objectives" not in dump_space(plain)
