"""The search space as typed dataclasses, and the hyperparameters' names and types.

``covid_tune.core.space_file`` reads a YAML file into these, checking every key once.

A search-space file looks like ``search_spaces/binary.yaml``:

- fixed keys: ``task``, ``metric``, ``mode``, ``max_epochs``, ``image_size``,
  ``augment``, ``pretrained``, ``num_samples``, ``asha`` (``grace_period``,
  ``reduction_factor``);
- ``params``: one entry per hyperparameter, either a fixed value, ``{choices: [...]}``
  or ``{low: L, high: H, log: bool, step: S}``. ``frozen_layers`` may instead map each
  backbone to its own range (conditional on the backbone);
- ``start_with``: configurations evaluated first (the assignment's hand-picked rows);
- ``selection: {holdout: F}``: a seeded, stratified part F of Train held out to choose
  with (``sel_*`` metrics), so validation only reports;
- ``threshold: {rule: f1 | youden | sensitivity, target: T}``: how each label's
  decision threshold is tuned on the selection split;
- ``mlflow: {tracking_uri: URI, experiment: NAME}``: where the sweep is tracked in
  MLflow (``--mlflow URI`` overrides the URI);
- ``stop: {at: GOAL, converged: K}``: end the sweep before ``num_samples`` once the
  metric reaches a goal, or once K finished trials in a row brought no gain beyond the
  best's bootstrap interval;
- ``objectives: [latency_ms]``: deploy costs TPE minimises besides the metric (a Pareto
  search; ``COSTS`` lists them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

BACKBONE_UNITS: dict[str, int] = {
    "vgg16": 13,
    "resnet18": 20,
    "densenet121": 8,
    "resnet50": 17,
    "efficientnet_b0": 9,
    "convnext_tiny": 8,
    "mobilenet_v3_large": 17,
}
"""The backbones a space may name, in the leaderboard's order, and each one's freezable
units (the largest ``frozen_layers``): conv layers for vgg16 and resnet18, as the
assignment counted them, blocks for the others (``docs/search-spaces.md``).
``covid_tune.nn.models.BACKBONES`` builds them; a test counts the units."""
BACKBONE_CONVS = BACKBONE_UNITS
"""The old name (vgg16 and resnet18 count conv layers)."""
UNIT_WORDS: dict[str, str] = {"vgg16": "conv", "resnet18": "conv"}
"""What a unit of a backbone is, where it is a conv layer; ``block`` otherwise."""

PARAM_TYPES: dict[str, type] = {
    "backbone": str,
    "frozen_layers": int,
    "lr": float,
    "momentum": float,
    "batch_size": int,
    "weight_decay": float,
    "hidden": int,
    "dropout": float,
    "loss": str,
    "focal_alpha": float,
    "focal_gamma": float,
}
"""Every hyperparameter a search space may name, in sampling order: the one list of
hyperparameter names (TensorBoard's HParams and the leaderboard's columns derive from it)."""
TABLE_PARAMS = ("backbone", "loss")
"""Hyperparameters the assignment's tables group by; the others are extra columns."""

FOCAL_PARAMS = ("focal_alpha", "focal_gamma")
PARAM_DEFAULTS: dict[str, Any] = {
    "frozen_layers": 0,
    "lr": 1e-3,
    "momentum": 0.9,
    "batch_size": 32,
    "weight_decay": 0.0,
    "hidden": 256,
    "dropout": 0.5,
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
}

SPLIT_PREFIXES = {"train": "train", "selection": "sel", "validation": "val", "test": "test"}
"""Split name -> the prefix of its metrics."""
LOWER_IS_BETTER = ("loss", "hamming_loss")
"""Metric names (without the split) that ``mode: min`` ranks; every other one is
ranked by ``mode: max``."""


def unit_count(backbone: str) -> int:
    """Number of freezable units of ``backbone``: vgg16 13 convs, resnet18 20, ..."""
    return BACKBONE_UNITS[backbone]


def units_phrase(backbone: str) -> str:
    """What ``frozen_layers`` counts, in words: ``13 conv layers``, ``8 blocks``."""
    word = "conv layers" if UNIT_WORDS.get(backbone) == "conv" else "blocks"
    return f"{BACKBONE_UNITS[backbone]} {word}"


conv_count = unit_count
"""The old name."""


@dataclass(frozen=True)
class Augment:
    """Random geometry for each training image (``augment:`` in a space; ``false`` is none)."""

    rotation: float = 15.0
    """Largest rotation in degrees; each sample turns uniformly within ±rotation."""
    scale: tuple[float, float] = (0.7, 1.0)
    """Range of the fraction of the image area the crop keeps, as in torchvision's
    ``RandomResizedCrop``; the crop is then stretched to the output size."""
    ratio: tuple[float, float] = (0.75, 1.333)
    """Range of the crop's width / height, sampled log-uniformly. A side that would
    exceed the image is clipped to it, so extreme ratios keep less area than asked."""
    flip: bool = True
    """Mirror left-right with probability 0.5."""

    @classmethod
    def off(cls) -> Augment:
        """The identity: no rotation, the whole image, no flip."""
        return cls(rotation=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)

    @classmethod
    def from_dict(cls, raw: dict | None) -> Augment | None:
        """From a trial config or a recipe (JSON turns the pairs into lists)."""
        if raw is None or isinstance(raw, Augment):
            return raw
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def to_raw(self) -> dict:
        return {"rotation": self.rotation, "scale": list(self.scale),
                "ratio": list(self.ratio), "flip": self.flip}


@dataclass(frozen=True)
class Selection:
    """Which split chooses: ASHA's rungs, TPE, a trial's best epoch and the best trial."""

    holdout: float = 0.0
    """Fraction of Train held out (seeded, stratified by label combination) as the
    ``selection`` split; 0 means validation chooses."""

    @property
    def split(self) -> str:
        """``selection`` when Train is held out from, else ``validation``."""
        return "selection" if self.holdout else "validation"

    @property
    def prefix(self) -> str:
        """The prefix of the choosing split's metrics: ``sel`` or ``val``."""
        return SPLIT_PREFIXES[self.split]


@dataclass(frozen=True)
class DataSpec:
    """How a dataset folder is read when its layout's defaults do not fit (``data:``)."""

    classes: tuple[tuple[str, str | None], ...] = ()
    """Class folder -> the task's class (``null``: leave the folder out), on top of
    the detected layout's own mapping; e.g. ``{lung_opacity: pneumonia}``."""
    split: tuple[tuple[str, float], ...] = ()
    """Splits drawn from train (seeded, stratified by class) instead of read from
    folders, as (split, fraction); e.g. ``{validation: 0.15}`` for a tiny ``val/``."""
    patient: str | None = None
    """A regular expression whose first group, searched in each file's relative path,
    is its patient key; every drawn split keeps a patient on one side."""
    views: tuple[str, ...] = ()
    """The views kept (``PA``, ``AP``, ``LATERAL``, ...: DICOM's ``ViewPosition`` or a
    manifest's ``view`` column), upper case; empty keeps every image."""

    def to_raw(self) -> dict:
        raw = {}
        if self.classes:
            raw["classes"] = dict(self.classes)
        if self.split:
            raw["split"] = dict(self.split)
        if self.patient:
            raw["patient"] = self.patient
        if self.views:
            raw["views"] = list(self.views)
        return raw


TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                    "databricks")
"""The tracking URI schemes MLflow reads (a plain folder path is a file store too)."""


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with an MLflow tracking URI, with the fix; None when MLflow can take
    it (``http(s)://HOST:PORT`` for a server, ``sqlite:///FILE``, a database URL, or a
    folder)."""
    scheme, sep, rest = uri.partition("://")
    if not uri.strip():
        return "empty; give http://HOST:PORT, sqlite:///FILE or a folder"
    if sep and scheme.split("+")[0].lower() not in TRACKING_SCHEMES:
        return (f"{scheme}:// is not a tracking store MLflow reads; use http(s)://HOST:PORT "
                f"(a tracking server), sqlite:///FILE, a database URL or a folder")
    if scheme in ("http", "https") and not rest.split("/")[0]:
        return "no host; give http://HOST:PORT"
    return None


@dataclass(frozen=True)
class Tracking:
    """Where a sweep is tracked in MLflow (``mlflow:`` in the space): one parent run per
    sweep, a nested run per trial (``covid_tune.search.tracking``)."""

    tracking_uri: str | None = None
    """The tracking server (``http://HOST:PORT``) or store; None: not tracked, unless
    ``--mlflow URI`` is given."""
    experiment: str = "covid-tune"
    """The MLflow experiment the sweep's runs go in (made if missing)."""

    def to_raw(self) -> dict:
        raw = {"tracking_uri": self.tracking_uri} if self.tracking_uri else {}
        return raw if self.experiment == "covid-tune" else {**raw, "experiment": self.experiment}


@dataclass(frozen=True)
class Stop:
    """When a sweep ends before ``num_samples`` (``stop:`` in the space); both unset:
    it runs them all. The sweep's summary and the leaderboard say which one ended it."""

    at: float | None = None
    """A goal for the metric: the sweep ends once a trial's best epoch reaches it
    (``>=`` for a metric to maximise, ``<=`` to minimise)."""
    converged: int | None = None
    """K: the sweep ends when the last K finished trials have not raised the best score
    by more than the half-width of the best's bootstrap interval (its noise)."""

    def to_raw(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


INTERVAL_OF = {"accuracy": "accuracy", "f1": "f1", "macro_f1": "f1", "auroc": "auroc",
               "ece": "ece", "brier": "brier"}
"""The metrics that have a bootstrap interval, and the name it goes by in
``covid_tune.core.metrics.bootstrap_intervals`` (Part 2's ``macro_f1`` is its ``f1``)."""

COSTS: dict[str, str] = {
    "latency_ms": "ONNX Runtime CPU latency per image at batch 1, in milliseconds",
    "params": "the model's parameters, frozen ones included",
}
"""The deploy costs a space may name in ``objectives``: each trial measures them once
(``covid_tune.training.cost``) and reports them with every epoch; lower is better."""


@dataclass(frozen=True)
class Threshold:
    """How each label's decision threshold is tuned on the selection split."""

    rule: str = "youden"
    """``youden`` (default): the best sensitivity + specificity - 1; ``f1``: the best F1
    among thresholds that leave some image negative; ``sensitivity``: the highest
    threshold whose sensitivity reaches ``target`` (so the best specificity at that
    sensitivity). Youden never makes a label all-positive and does not follow the
    prevalence up; the evidence is in ``docs/results.md``."""
    target: float | None = None
    """The sensitivity the ``sensitivity`` rule must reach (0 < target <= 1)."""

    @classmethod
    def from_dict(cls, raw: dict | None) -> Threshold:
        if isinstance(raw, Threshold):
            return raw
        return cls(**raw) if raw else cls()

    def to_raw(self) -> dict:
        return {"rule": self.rule} if self.target is None else \
            {"rule": self.rule, "target": self.target}


@dataclass(frozen=True)
class Fixed:
    """A hyperparameter held at one value: never sampled."""

    value: Any


@dataclass(frozen=True)
class Choice:
    """A categorical hyperparameter."""

    choices: tuple


@dataclass(frozen=True)
class Range:
    """A numeric hyperparameter in ``[low, high]``, integer when ``integer``."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high


Param = Fixed | Choice | Range


@dataclass(frozen=True)
class Asha:
    """ASHA's settings: the least epochs a trial gets, and how hard each rung cuts."""

    grace_period: int = 2
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class SearchSpace:
    """One study: a validated search-space file."""

    source: str
    """The file it came from (for messages and the run's record)."""
    task: str
    """``binary`` (Part 1) or ``multilabel`` (Part 2); see ``covid_tune.core.tasks``."""
    metric: str
    """The metric trials are ranked by, e.g. ``val_f1``: ASHA's, TPE's, the best
    checkpoint's and the best trial's."""
    mode: str
    """``max`` or ``min``."""
    max_epochs: int
    """Epochs of a trial that ASHA never stops."""
    image_size: int
    """Side of the square images the models see, in pixels."""
    augment: Augment | None
    """Training augmentation, or ``None`` for none."""
    pretrained: str
    """``imagenet``, ``none`` or a path to a local state dict."""
    num_samples: int
    """Trials to run, ``start_with`` rows included."""
    asha: Asha
    """ASHA's grace period and reduction factor."""
    params: dict[str, Param]
    """Hyperparameter name -> Fixed/Choice/Range; ``frozen_layers`` is a dict
    backbone -> Param."""
    start_with: tuple[dict, ...] = field(default_factory=tuple)
    """Configurations evaluated first (the assignment's hand-picked rows)."""
    allow_train_metric: bool = False
    """Whether ``metric`` may be a ``train_`` metric. Off by default: ranking by the
    split the model was fitted on picks the trial that memorised best."""
    trial_seed: int | None = None
    """The seed of every trial, when set (the leaderboard's reproduce files set it);
    otherwise each trial's seed comes from the sweep's ``--seed`` and its number."""
    selection: Selection = Selection()
    """The split that chooses (a held-out part of Train, or validation)."""
    threshold: Threshold = Threshold()
    """How the labels' decision thresholds are tuned on the choosing split."""
    data: DataSpec = DataSpec()
    """Class map and drawn splits that override the detected layout's."""
    mlflow: Tracking = Tracking()
    """Where the sweep is tracked in MLflow (nowhere by default)."""
    stop: Stop = Stop()
    """When the sweep ends before ``num_samples``."""
    objectives: tuple[str, ...] = ()
    """Deploy costs (``COSTS``) TPE minimises besides ``metric``: a Pareto search. ASHA
    still ranks by ``metric`` alone."""

    def fixed_settings(self) -> dict:
        """The keys every trial shares, as they go into each trial's config."""
        return {
            "task": self.task,
            "metric": self.metric,
            "mode": self.mode,
            "max_epochs": self.max_epochs,
            "image_size": self.image_size,
            "augment": self.augment.to_raw() if self.augment else None,
            "pretrained": self.pretrained,
            "threshold": self.threshold.to_raw(),
            **({"objectives": list(self.objectives)} if self.objectives else {}),
            **({"report_interval": True} if self.stop.converged else {}),
        }

    def with_overrides(self, **overrides: Any) -> SearchSpace:
        """A copy with command-line overrides (``None`` means keep); revalidated."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        if changes.get("max_epochs", self.max_epochs) < self.asha.grace_period:
            changes["asha"] = replace(self.asha, grace_period=changes["max_epochs"])
        from covid_tune.core.space_file import parse_space, to_raw

        raw = to_raw(replace(self, **changes))
        return parse_space(raw, self.source)


@dataclass(frozen=True)
class TrialConfig:
    """What one trial trains: the resolved config Ray hands the trainable."""

    task: str
    """``binary`` or ``multilabel``."""
    backbone: str
    """``vgg16`` or ``resnet18`` (torchvision), with a new head."""
    frozen_layers: int
    """The first N conv layers (and their BatchNorms) are not trained."""
    lr: float
    """SGD learning rate."""
    momentum: float
    """SGD momentum."""
    batch_size: int
    """Training images per step."""
    weight_decay: float
    """SGD L2 penalty."""
    hidden: int
    """Width of the head's hidden layer."""
    dropout: float
    """Dropout before the head's last layer."""
    loss: str
    """``ce`` (binary), ``bce`` or ``focal`` (multilabel)."""
    focal_alpha: float
    """Focal loss weight of the positive bits (unused by other losses)."""
    focal_gamma: float
    """Focal loss focusing exponent (unused by other losses)."""
    max_epochs: int
    """Epochs unless ASHA stops the trial first."""
    image_size: int
    """Side of the square input images, in pixels."""
    augment: Augment | None
    """Training augmentation, or ``None``."""
    pretrained: str
    """``imagenet``, ``none`` or a local state-dict file the backbone starts from."""
    metric: str
    """The sweep's ranking metric (picks the trial's best checkpoint)."""
    mode: str
    """``max`` or ``min``."""
    seed: int = 0
    """Seeds the initial head weights, the batch order and the augmentation."""
    threshold: Threshold = Threshold()
    """How each checkpoint's decision thresholds are tuned on the choosing split."""
    objectives: tuple[str, ...] = ()
    """The deploy costs the sweep searches besides the metric (``COSTS``): the trial
    measures ``latency_ms`` only when named (``params`` always)."""
    report_interval: bool = False
    """Report ``<metric>_half_width`` with every epoch: the half-width of the metric's
    95% bootstrap interval on its split (``stop: {converged: K}`` needs it)."""

    @classmethod
    def from_dict(cls, config: dict) -> TrialConfig:
        """Build from a Ray trial config; keys that are Optuna bookkeeping are ignored."""
        names = cls.__dataclass_fields__
        values = {k: v for k, v in config.items() if k in names}
        values["augment"] = Augment.from_dict(values.get("augment"))
        values["threshold"] = Threshold.from_dict(values.get("threshold"))
        values["objectives"] = tuple(values.get("objectives") or ())
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
