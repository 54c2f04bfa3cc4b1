"""A search-space file: YAML in, a checked ``SearchSpace`` out, and back.

Everything a sweep needs is validated here, once, and every problem is reported at once
as ``file: key: what is wrong``. Nothing downstream re-validates. The schema (the
dataclasses and the hyperparameters' names and types) is ``covid_tune.core.space``.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from covid_tune.core.space import (
    BACKBONE_UNITS,
    FOCAL_PARAMS,
    LOWER_IS_BETTER,
    PARAM_TYPES,
    COSTS,
    INTERVAL_OF,
    Asha,
    Augment,
    Choice,
    DataSpec,
    Fixed,
    Param,
    Range,
    SearchSpace,
    Selection,
    Stop,
    Threshold,
    Tracking,
    tracking_uri_problem,
    unit_count,
    units_phrase,
)
from covid_tune.core.tasks import TASKS
from covid_tune.errors import UserError

TOP_KEYS = (
    "task", "metric", "mode", "max_epochs", "image_size", "augment", "pretrained",
    "num_samples", "asha", "params", "start_with", "allow_train_metric", "trial_seed",
    "selection", "threshold", "data", "mlflow", "stop", "objectives",
)
STOP_KEYS = ("at", "converged")
MLFLOW_KEYS = ("tracking_uri", "experiment")
DATA_KEYS = ("classes", "split", "patient", "views")
SPLIT_KEYS = ("validation", "test")
SELECTION_KEYS = ("holdout",)
THRESHOLD_KEYS = ("rule", "target")
THRESHOLD_RULES = ("youden", "f1", "sensitivity")
ASHA_KEYS = ("grace_period", "reduction_factor")
AUGMENT_KEYS = ("rotation", "scale", "ratio", "flip")
RANGE_KEYS = ("low", "high", "log", "step")


SHIPPED_SPACES = ("binary", "multilabel", "demo")
"""The search spaces that ship with covid-tune (``search_spaces/`` in the source, the
package ``covid_tune.search_spaces`` once installed), named by ``--space NAME``."""


def find_space(given: str | Path) -> Path:
    """The file ``--space`` means: an existing file as given, else a shipped space by
    name (``binary``, ``multilabel``, ``demo``); else the path, for ``load_space`` to
    refuse."""
    path = Path(given)
    if path.is_file() or str(given) not in SHIPPED_SPACES:
        return path
    from importlib.resources import files

    return Path(str(files("covid_tune.search_spaces") / f"{given}.yaml"))


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (or a shipped space by name);
    UserError lists every problem."""
    path = find_space(path)
    if not path.is_file():
        raise UserError(f"{path}: no such search-space file; give a YAML file or a "
                        f"shipped space: {', '.join(SHIPPED_SPACES)}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the file ({exc})") from None
    return parse_space_text(text, str(path))


def parse_space_text(text: str, path: str) -> SearchSpace:
    """Parse and validate the YAML text of a search space that came from ``path``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: {_where(exc, text)}YAML syntax error: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a search space; see "
                        f"search_spaces/ for the shape") from None
    return parse_space(raw, path)


def _where(exc: yaml.YAMLError, text: str) -> str:
    """``line L, column C: `` of a YAML error, also for a bad character (ReaderError)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: "
    if isinstance(exc, yaml.reader.ReaderError):
        return f"line {text.count(chr(10), 0, exc.position) + 1}: "
    return ""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    """A value for a message, shortened: a YAML alias can make a list of millions."""
    return _REPR.repr(value)


def parse_space(raw: Any, source: str) -> SearchSpace:
    """Validate a parsed YAML document; raise UserError with every problem found."""
    problems = Problems(source)
    if not isinstance(raw, dict):
        problems.add("(top)", "expected a mapping of keys such as task, metric, params")
        problems.raise_if_any()
    problems.unknown_keys(raw, TOP_KEYS, "")
    task = _task(raw, problems)
    params = _params(raw.get("params"), task, problems)
    selection = _selection(raw.get("selection"), problems)
    metric = _metric(raw, task, selection, problems)
    allow_train = _bool(raw, "allow_train_metric", False, problems)
    space = SearchSpace(
        source=source,
        task=task or "binary",
        metric=metric,
        mode=_mode(raw, metric, allow_train, problems),
        max_epochs=_int(raw, "max_epochs", 10, 1, problems),
        image_size=_int(raw, "image_size", 224, 32, problems),
        augment=_augment(raw.get("augment", True), problems),
        pretrained=_pretrained(raw.get("pretrained", "imagenet"), problems),
        num_samples=_int(raw, "num_samples", 16, 1, problems),
        asha=_asha(raw.get("asha") or {}, problems),
        params=params,
        start_with=_start_with(raw.get("start_with") or [], params, problems),
        allow_train_metric=allow_train,
        trial_seed=_int(raw, "trial_seed", 0, 0, problems) if "trial_seed" in raw else None,
        selection=selection,
        threshold=_threshold(raw.get("threshold"), problems),
        data=_data(raw.get("data"), task, problems),
        mlflow=_mlflow(raw.get("mlflow"), problems),
        stop=_stop(raw.get("stop"), problems),
        objectives=_objectives(raw.get("objectives"), problems),
    )
    if space.stop.converged and space.metric.split("_", 1)[-1] not in INTERVAL_OF:
        problems.add("stop.converged", f"{space.metric} has no bootstrap interval to tell a "
                     f"gain from noise; rank by one that has ({', '.join(INTERVAL_OF)}) "
                     f"or use stop.at")
    if space.asha.grace_period > space.max_epochs:
        problems.add("asha.grace_period", f"{space.asha.grace_period} is more than "
                     f"max_epochs ({space.max_epochs}); lower it")
    problems.raise_if_any()
    return space


class Problems:
    """Collects ``file: key: what is wrong`` lines, then raises them all at once."""

    def __init__(self, source: str):
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{self.source}: {key}: {message}")

    def unknown_keys(self, mapping: dict, valid: tuple, prefix: str) -> None:
        for key in mapping:
            if key not in valid:
                near = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
                self.add(f"{prefix}{key}", f"unknown key{hint}")

    def raise_if_any(self) -> None:
        if len(self.lines) == 1:
            raise UserError(self.lines[0])
        if self.lines:
            raise UserError(f"{len(self.lines)} problems:\n  " + "\n  ".join(self.lines))


def _task(raw: dict, problems: Problems) -> str | None:
    task = raw.get("task")
    if not isinstance(task, str) or task not in TASKS:
        problems.add("task", f"{_show(task)} is not a task; use one of: {', '.join(TASKS)}")
        return None
    return task


def _metric(raw: dict, task: str | None, selection: Selection, problems: Problems) -> str:
    """The ranking metric: of the choosing split (``sel_`` with a holdout, else ``val_``),
    or of train when ``allow_train_metric`` says so (checked in ``_mode``)."""
    chooser = selection.prefix
    default = (TASKS[task].default_metric if task else "val_f1").replace("val_", f"{chooser}_", 1)
    metric = raw.get("metric", default)
    if task is None:
        return metric if isinstance(metric, str) else default
    names = TASKS[task].metrics
    if isinstance(metric, str) and metric.split("_", 1)[-1] in names:
        prefix = metric.split("_", 1)[0]
        if prefix == "val" and selection.holdout:
            problems.add("metric", f"{metric} would choose on validation although "
                         f"selection.holdout sets a selection split aside to choose with; "
                         f"use sel_{metric[4:]} (validation then only reports)")
            return default
        if prefix == "sel" and not selection.holdout:
            problems.add("metric", f"{metric} needs a selection split; add selection: "
                         f"{{holdout: 0.15}} or use val_{metric[4:]}")
            return default
    valid = [f"{split}_{name}" for split in (chooser, "train") for name in names]
    if metric not in valid:
        problems.add("metric", f"{_show(metric)} is not reported by {task} trials; use one of: "
                     f"{', '.join(valid[: len(valid) // 2])}")
        return default
    return metric


def _section(raw: Any, key: str, keys: tuple, example: str,
             problems: Problems) -> dict | None:
    """The mapping under a top-level ``key``, its unknown keys reported; None when the
    key is absent or not a mapping (reported, with ``example``)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.add(key, f"expected a mapping such as {example}")
        return None
    problems.unknown_keys(raw, keys, f"{key}.")
    return raw


def _selection(raw: Any, problems: Problems) -> Selection:
    raw = _section(raw, "selection", SELECTION_KEYS, "{holdout: 0.15}", problems)
    if raw is None:
        return Selection()
    holdout = raw.get("holdout", 0.0)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) \
            or not 0 <= holdout <= 0.5:
        problems.add("selection.holdout", f"expected a fraction of Train from 0 to 0.5 "
                                          f"(0.15 is usual), got {_show(holdout)}")
        return Selection()
    return Selection(float(holdout))


def _data(raw: Any, task: str | None, problems: Problems) -> DataSpec:
    raw = _section(raw, "data", DATA_KEYS, "{classes: {lung_opacity: pneumonia}} or "
                                           "{split: {validation: 0.15}}", problems)
    if raw is None:
        return DataSpec()
    classes, split = raw.get("classes") or {}, raw.get("split") or {}
    if not isinstance(classes, dict) or not isinstance(split, dict):
        problems.add("data", "classes and split are mappings")
        return DataSpec()
    valid = tuple(TASKS[task].targets) if task else ()
    seen: dict[str, str] = {}
    for folder, cls in classes.items():
        key = str(folder).lower()
        if key in seen:
            problems.add(f"data.classes.{folder}", f"the class folder {folder} is mapped twice "
                                                   f"(also as {seen[key]}); keep one entry")
        seen[key] = str(folder)
        if cls is not None and cls not in valid:
            problems.add(f"data.classes.{folder}", f"{_show(cls)} is not a {task} class; use "
                                                   f"one of: {', '.join(valid)}, or null to "
                                                   f"leave the folder out")
    problems.unknown_keys(split, SPLIT_KEYS, "data.split.")
    for name, fraction in split.items():
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0 < fraction < 0.5:
            problems.add(f"data.split.{name}", f"expected a fraction of train between 0 and "
                                               f"0.5, got {_show(fraction)}")
    if sum(v for v in split.values() if isinstance(v, (int, float))) >= 0.9:
        problems.add("data.split", "the drawn splits leave too little to train on")
    return DataSpec(tuple((str(k).lower(), v) for k, v in classes.items()),
                    tuple((str(k), float(v)) for k, v in split.items()
                          if isinstance(v, (int, float))),
                    _patient_rule(raw.get("patient"), problems),
                    _views(raw.get("views"), problems))


def _mlflow(raw: Any, problems: Problems) -> Tracking:
    """``mlflow: {tracking_uri: URI, experiment: NAME}``."""
    raw = _section(raw, "mlflow", MLFLOW_KEYS, "{tracking_uri: http://127.0.0.1:5000, "
                                               "experiment: chest-xray}", problems)
    if raw is None:
        return Tracking()
    uri, experiment = raw.get("tracking_uri"), raw.get("experiment", "covid-tune")
    if uri is not None and (not isinstance(uri, str) or tracking_uri_problem(uri)):
        problems.add("mlflow.tracking_uri", f"{_show(uri)}: " + (
            tracking_uri_problem(uri) if isinstance(uri, str) else
            "expected a URI such as http://127.0.0.1:5000"))
        uri = None
    if not isinstance(experiment, str) or not experiment.strip():
        problems.add("mlflow.experiment", f"expected an experiment name, got {_show(experiment)}")
        experiment = "covid-tune"
    return Tracking(uri, experiment.strip())


def _stop(raw: Any, problems: Problems) -> Stop:
    """``stop: {at: GOAL, converged: K}``."""
    raw = _section(raw, "stop", STOP_KEYS, "{at: 0.95} or {converged: 8}", problems)
    if raw is None:
        return Stop()
    at, converged = raw.get("at"), raw.get("converged")
    if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float))):
        problems.add("stop.at", f"expected the metric's goal, a number such as 0.95, got "
                                f"{_show(at)}")
        at = None
    if converged is not None and (isinstance(converged, bool) or not isinstance(converged, int)
                                  or converged < 2):
        problems.add("stop.converged", f"expected a number of trials >= 2, got "
                                       f"{_show(converged)}")
        converged = None
    return Stop(None if at is None else float(at), converged)


def _objectives(raw: Any, problems: Problems) -> tuple[str, ...]:
    """``objectives: [latency_ms]`` (or one name): deploy costs besides the metric."""
    if raw is None:
        return ()
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names:
        problems.add("objectives", f"expected a list of deploy costs such as [latency_ms]; "
                                   f"one of: {', '.join(COSTS)}")
        return ()
    for name in names:
        if not isinstance(name, str) or name not in COSTS:
            problems.add("objectives", f"{_show(name)} is not a deploy cost covid-tune "
                                       f"measures; use one of: {', '.join(COSTS)}")
            return ()
    if len(set(names)) < len(names):
        problems.add("objectives", f"{_show(names)} names a cost twice")
        return ()
    return tuple(names)


def _patient_rule(raw: Any, problems: Problems) -> str | None:
    """``data.patient``: a regular expression with a group, or None."""
    if raw is None:
        return None
    fix = "give a regular expression whose first group is the patient, e.g. '^(person\\d+)_'"
    if not isinstance(raw, str):
        problems.add("data.patient", f"expected a regular expression, got {_show(raw)}; {fix}")
        return None
    try:
        groups = re.compile(raw).groups
    except re.error as exc:
        problems.add("data.patient", f"{raw!r} is not a regular expression ({exc}); {fix}")
        return None
    if groups < 1:
        problems.add("data.patient", f"{raw!r} has no group; {fix}")
        return None
    return raw


def _views(raw: Any, problems: Problems) -> tuple[str, ...]:
    """``data.views``: a list of view names (``PA``, ``AP``, ``LATERAL``...), upper case."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v.strip()
                                                         for v in raw):
        problems.add("data.views", f"expected a list of views such as [PA, AP], got {_show(raw)}")
        return ()
    return tuple(dict.fromkeys(v.strip().upper() for v in raw))


def _threshold(raw: Any, problems: Problems) -> Threshold:
    raw = _section(raw, "threshold", THRESHOLD_KEYS, "{rule: youden} or "
                                                     "{rule: sensitivity, target: 0.95}", problems)
    if raw is None:
        return Threshold()
    rule, target = raw.get("rule", "youden"), raw.get("target")
    if rule not in THRESHOLD_RULES:
        problems.add("threshold.rule", f"{_show(rule)} is not a rule; use one of: "
                                       f"{', '.join(THRESHOLD_RULES)}")
        return Threshold()
    if rule == "sensitivity":
        if isinstance(target, bool) or not isinstance(target, (int, float)) \
                or not 0 < target <= 1:
            problems.add("threshold.target", f"the sensitivity rule needs a target in (0, 1], "
                                             f"such as 0.95; got {_show(target)}")
            return Threshold()
        return Threshold(rule, float(target))
    if target is not None:
        problems.add("threshold.target", "only the sensitivity rule takes a target; drop it "
                                         "or use rule: sensitivity")
    return Threshold(rule)


def _mode(raw: dict, metric: str, allow_train: bool, problems: Problems) -> str:
    """``mode``, checked against the metric's direction; a train-split metric refused
    unless ``allow_train_metric``."""
    name = metric.split("_", 1)[-1] if isinstance(metric, str) else ""
    direction = "min" if name in LOWER_IS_BETTER else "max"
    mode = _one_of(raw, "mode", ("max", "min"), direction, problems)
    if mode in ("max", "min") and mode != direction and "mode" in raw:
        better = "lower" if direction == "min" else "higher"
        problems.add("mode", f"{mode} contradicts metric {metric} ({better} is better); use "
                             f"mode: {direction}")
    if isinstance(metric, str) and metric.startswith("train_") and not allow_train:
        problems.add("metric", f"{metric} ranks trials by the split they were trained on, "
                               f"which rewards memorising it; use a val_ metric (sel_ with "
                               f"selection.holdout), or set "
                               f"allow_train_metric: true if that is really wanted")
    return mode


def _bool(raw: dict, key: str, default: bool, problems: Problems) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        problems.add(key, f"expected true or false, got {_show(value)}")
        return default
    return value


def _one_of(raw: dict, key: str, valid: tuple, default: Any, problems: Problems) -> Any:
    value = raw.get(key, default)
    if value not in valid:
        problems.add(key, f"{_show(value)} is not valid; use one of: {', '.join(map(str, valid))}")
    return value


def _int(raw: dict, key: str, default: int, minimum: int, problems: Problems) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(key, f"expected an integer, got {_show(value)}")
        return default
    if value < minimum:
        problems.add(key, f"{value} is too small; use at least {minimum}")
    return value


def _augment(value: Any, problems: Problems) -> Augment | None:
    defaults = Augment().to_raw()
    if value is False or value is None:
        return None
    if value is True:
        return Augment()
    if not isinstance(value, dict):
        problems.add("augment", "expected true, false or a mapping of rotation, scale, ratio, flip")
        return None
    problems.unknown_keys(value, AUGMENT_KEYS, "augment.")
    merged = {**defaults, **{k: v for k, v in value.items() if k in AUGMENT_KEYS}}
    if not isinstance(merged["rotation"], (int, float)) or not 0 <= merged["rotation"] <= 180:
        problems.add("augment.rotation", "expected degrees between 0 and 180")
    for key, most in (("scale", 1.0), ("ratio", 10.0)):
        pair = merged[key]
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, (int, float)) and 0 < v <= most for v in pair)
                and pair[0] <= pair[1]):
            problems.add(f"augment.{key}", f"expected [low, high] with 0 < low <= high <= {most:g}")
    if not isinstance(merged["flip"], bool):
        problems.add("augment.flip", "expected true or false")
        return None
    return Augment.from_dict(merged)


def _pretrained(value: Any, problems: Problems) -> str:
    if not isinstance(value, str) or not value:
        problems.add("pretrained", "expected 'imagenet', 'none' or a path to a local state dict")
        return "none"
    return value


def _asha(raw: Any, problems: Problems) -> Asha:
    if not isinstance(raw, dict):
        problems.add("asha", "expected a mapping with grace_period and reduction_factor")
        return Asha()
    problems.unknown_keys(raw, ASHA_KEYS, "asha.")
    grace = raw.get("grace_period", Asha.grace_period)
    factor = raw.get("reduction_factor", Asha.reduction_factor)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        problems.add("asha.grace_period", f"expected an integer >= 1, got {_show(grace)}")
        grace = Asha.grace_period
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        problems.add("asha.reduction_factor", f"expected a number > 1, got {_show(factor)}")
        factor = Asha.reduction_factor
    return Asha(grace_period=grace, reduction_factor=float(factor))


def _params(raw: Any, task: str | None, problems: Problems) -> dict[str, Param]:
    if not isinstance(raw, dict) or not raw:
        problems.add("params", "expected a mapping of hyperparameters (backbone, lr, ...)")
        return {}
    problems.unknown_keys(raw, tuple(PARAM_TYPES), "params.")
    params: dict[str, Param] = {}
    for name in PARAM_TYPES:
        if name == "frozen_layers" or name not in raw:
            continue
        params[name] = _param(raw[name], name, PARAM_TYPES[name], problems)
    if "backbone" not in params:
        problems.add("params.backbone", "missing; use {choices: [vgg16, resnet18]} or one backbone")
        return params
    backbones = _values(params["backbone"])
    for backbone in backbones:
        if not isinstance(backbone, str) or backbone not in BACKBONE_UNITS:
            problems.add("params.backbone", f"unknown backbone {_show(backbone)}; use one of: "
                         f"{', '.join(BACKBONE_UNITS)}")
    known = [b for b in backbones if isinstance(b, str) and b in BACKBONE_UNITS]
    params["frozen_layers"] = _frozen(raw.get("frozen_layers", 0), known, problems)
    _check_loss(params, task, problems)
    return params


def _param(raw: Any, key: str, kind: type, problems: Problems) -> Param:
    where = f"params.{key}"
    if isinstance(raw, dict) and "choices" in raw:
        problems.unknown_keys({k: 0 for k in raw if k != "choices"}, ("choices",), f"{where}.")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            problems.add(where, "choices must be a non-empty list")
            return Choice(())
        for value in choices:
            if not _is_kind(value, kind):
                problems.add(where, f"choice {_show(value)} is not {kind.__name__}")
        return Choice(tuple(choices))
    if isinstance(raw, dict):
        return _range(raw, where, kind, problems)
    if not _is_kind(raw, kind):
        problems.add(where, f"expected a {kind.__name__}, {{choices: [...]}} or "
                     f"{{low: .., high: ..}}, got {_show(raw)}")
    return Fixed(raw)


def _range(raw: dict, where: str, kind: type, problems: Problems) -> Range:
    problems.unknown_keys(raw, RANGE_KEYS, f"{where}.")
    if kind is str:
        problems.add(where, "a text parameter takes a value or {choices: [...]}, not a range")
        return Range(0, 1)
    low, high = raw.get("low"), raw.get("high")
    log, step = raw.get("log", False), raw.get("step")
    bad = [k for k, v in (("low", low), ("high", high)) if not _is_kind(v, kind)]
    for k in bad:
        problems.add(f"{where}.{k}", f"expected a {kind.__name__}, got {_show(raw.get(k))}")
    if bad:
        return Range(0, 1, integer=kind is int)
    if low >= high:
        problems.add(where, f"low ({low}) must be less than high ({high})")
    if not isinstance(log, bool):
        problems.add(f"{where}.log", f"expected true or false, got {_show(log)}")
    elif log and low <= 0:
        problems.add(where, f"log scale needs low > 0, got {low}")
    if step is not None and (not _is_kind(step, kind) or step <= 0 or log):
        problems.add(f"{where}.step", "expected a positive number, and no step with log scale")
    return Range(low, high, bool(log), step, integer=kind is int)


def _frozen(raw: Any, backbones: list[str], problems: Problems) -> Param | dict[str, Param]:
    if isinstance(raw, dict) and raw and set(raw) <= set(BACKBONE_UNITS):
        per = {b: _param(v, f"frozen_layers.{b}", int, problems) for b, v in raw.items()}
        for backbone in backbones:
            if backbone not in per:
                problems.add(f"params.frozen_layers.{backbone}",
                             "missing; give a range for every backbone in the search")
    else:
        param = _param(raw, "frozen_layers", int, problems)
        per = {b: param for b in backbones}
    for backbone, param in per.items():
        most = unit_count(backbone)
        if any(v < 0 or v > most for v in _values(param) if isinstance(v, int)):
            problems.add(f"params.frozen_layers.{backbone}",
                         f"{backbone} has {units_phrase(backbone)}; keep frozen_layers "
                         f"within 0..{most}")
    return per


def _check_loss(params: dict[str, Param], task: str | None, problems: Problems) -> None:
    if task is None:
        return
    valid = TASKS[task].losses
    params.setdefault("loss", Fixed(valid[0]))
    losses = _values(params["loss"])
    for loss in losses:
        if loss not in valid:
            problems.add("params.loss", f"{_show(loss)} is not a {task} loss; use one of: "
                         f"{', '.join(valid)}")
    for key in FOCAL_PARAMS:
        if key in params and "focal" not in losses:
            problems.add(f"params.{key}", "only used with the focal loss; add focal to "
                         "params.loss choices or remove this key")


def _start_with(raw: Any, params: dict[str, Param], problems: Problems) -> tuple[dict, ...]:
    if not isinstance(raw, list):
        problems.add("start_with", "expected a list of configurations")
        return ()
    for i, row in enumerate(raw):
        where = f"start_with[{i}]"
        if not isinstance(row, dict):
            problems.add(where, "expected a mapping of hyperparameter values")
            continue
        problems.unknown_keys(row, tuple(PARAM_TYPES), f"{where}.")
        for key, value in row.items():
            param = params.get(key)
            if key in PARAM_TYPES and key not in params and "backbone" in params:
                problems.add(f"{where}.{key}", f"not in params, so the row would train with "
                                               f"the default and be labelled wrongly; add "
                                               f"params.{key} or drop it from the row")
                continue
            if key == "frozen_layers" and isinstance(param, dict):
                param = _row_frozen(row, params, param, where, problems)
            if param is not None and not _allows(param, value):
                problems.add(f"{where}.{key}", f"{_show(value)} is outside the search space")
    return tuple(raw)


def _row_frozen(row: dict, params: dict[str, Param], per: dict[str, Param], where: str,
                problems: Problems) -> Param | None:
    """The frozen_layers range that applies to a ``start_with`` row (by its backbone)."""
    backbone = row.get("backbone", _only(params.get("backbone")))
    if backbone is None:
        problems.add(f"{where}.frozen_layers", "frozen_layers depends on the backbone; "
                     "give the row's backbone too")
    return per.get(backbone) if isinstance(backbone, str) else None


def _allows(param: Param, value: Any) -> bool:
    if isinstance(param, Fixed):
        return value == param.value
    if isinstance(param, Choice):
        return value in param.choices
    return param.contains(value) and (not param.integer or isinstance(value, int))


def _values(param: Param | None) -> list:
    """The discrete values a parameter can take, or its bounds for a range."""
    if isinstance(param, Fixed):
        return [param.value]
    if isinstance(param, Choice):
        return list(param.choices)
    if isinstance(param, Range):
        return [param.low, param.high]
    return []


def _only(param: Param | None) -> Any:
    return param.value if isinstance(param, Fixed) else None


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:  # NaN and infinity are no hyperparameter values
        if isinstance(value, float):
            return math.isfinite(value)
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def to_raw(space: SearchSpace) -> dict:
    """Back to the YAML shape: re-validated after overrides, and what every space file
    covid-tune writes holds (``dump_space``)."""
    def param_raw(p: Param) -> Any:
        if isinstance(p, Fixed):
            return p.value
        if isinstance(p, Choice):
            return {"choices": list(p.choices)}
        out = {"low": p.low, "high": p.high, "log": p.log}
        return out if p.step is None else {**out, "step": p.step}

    params = {k: (
        {b: param_raw(p) for b, p in v.items()} if isinstance(v, dict) else param_raw(v)
    ) for k, v in space.params.items()}
    return {
        **{k: v for k, v in space.fixed_settings().items() if k != "report_interval"},
        "augment": space.augment.to_raw() if space.augment is not None else False,
        "num_samples": space.num_samples,
        "asha": asdict(space.asha),
        "params": params,
        "start_with": list(space.start_with),
        **({"allow_train_metric": True} if space.allow_train_metric else {}),
        **({"trial_seed": space.trial_seed} if space.trial_seed is not None else {}),
        **({"selection": asdict(space.selection)} if space.selection.holdout else {}),
        **({"data": space.data.to_raw()} if space.data.to_raw() else {}),
        **({"mlflow": space.mlflow.to_raw()} if space.mlflow.to_raw() else {}),
        **({"stop": space.stop.to_raw()} if space.stop.to_raw() else {}),
    }


def dump_space(space: SearchSpace, header: str = "") -> str:
    """A space as YAML text that ``load_space`` reads back to the same space."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(to_raw(space), sort_keys=False)
