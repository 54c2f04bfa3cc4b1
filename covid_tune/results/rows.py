"""Which checkpoints make the leaderboard: the assignment's groups and each one's best.

Trials are grouped as the assignment's tables group them (Part 1 by backbone and frozen
layers, Part 2 by backbone and loss). A group's row is its best checkpoint by the
sweep's metric, at the trial's best epoch, never simply the last. ``TABLES`` also says
which splits each task's table may score; ``table_spec`` adds the selection split of
runs that hold one out of Train, and ``scored_splits`` keeps those some row was scored
on (the assignment's Part 2 Test is unlabelled; a manifest's or a drawn one is not).
``chooser`` says which split chose a run's rows (and tuned their thresholds); every
other split only reports.

Nothing here imports torch or Ray; it works on ``covid_tune.runs.record`` records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from covid_tune.core.space import (BACKBONE_UNITS, FOCAL_PARAMS, PARAM_TYPES, TABLE_PARAMS,
                                   UNIT_WORDS)
from covid_tune.data.dataset import SELECTION
from covid_tune.runs.reader import RunInfo, TrialRecord, best_trial, chooser

LOSS_NAMES = {"ce": "Cross Entropy Loss", "bce": "BCE With Logits Loss", "focal": "Focal Loss"}
EXTRA_PARAMS = tuple(k for k in PARAM_TYPES if k not in TABLE_PARAMS)
"""The hyperparameters shown after the assignment's columns."""


def frozen_name(config: dict) -> str:
    """The assignment's "Frozen Layers" wording for a trial's ``frozen_layers``
    (``First 7 CNN Layers``); backbones frozen by blocks say ``First 3 Blocks`` and
    ``All Blocks except FC``."""
    frozen = int(config["frozen_layers"])
    if UNIT_WORDS.get(config["backbone"]) == "conv":
        everything, some = "All Layers except FC", f"First {frozen} CNN Layers"
    else:
        everything, some = "All Blocks except FC", f"First {frozen} Block{'s' * (frozen > 1)}"
    if frozen == BACKBONE_UNITS[config["backbone"]]:
        return everything
    return some if frozen else "None"


def loss_name(config: dict) -> str:
    return LOSS_NAMES.get(config["loss"], config["loss"])


def backbone_rank(config: dict) -> int:
    """The backbone's place in the registry (``BACKBONE_UNITS``' order)."""
    return list(BACKBONE_UNITS).index(config["backbone"])


@dataclass(frozen=True)
class TableSpec:
    """How one task's table groups, orders, scores and words its rows."""

    title: str
    group_column: str
    group_name: Callable[[dict], str]
    order: Callable[[dict], tuple]
    """Sort key of a group (the assignment's row order); trials with equal keys group."""
    splits: tuple[str, ...]
    """Splits re-scored and shown; test only where it is labelled and reported."""
    chart_split: str
    """The split the confusion PNGs and the comparison chart show."""
    f1_percent: bool
    """Part 2's table writes F1 in % (92/92); Part 1's as a fraction (89/0.907)."""
    headline: str


TABLES = {
    "binary": TableSpec(
        title="Part 1: normal vs infected (binary)",
        group_column="Frozen Layers", group_name=frozen_name,
        order=lambda c: (backbone_rank(c), -int(c["frozen_layers"])),
        splits=("train", "validation", "test"), chart_split="test", f1_percent=False,
        headline="Accuracy in %, F1 of the positive class, **infected**."),
    "multilabel": TableSpec(
        title="Part 2: covid / normal / pneumonia (multilabel)",
        group_column="Loss Function", group_name=loss_name,
        order=lambda c: (backbone_rank(c), list(LOSS_NAMES).index(c["loss"])),
        splits=("train", "validation", "test"), chart_split="validation", f1_percent=True,
        headline="Exact-match accuracy in %, macro F1 (over covid, normal, pneumonia) in %. "
                 "Test is scored where it is labelled (the assignment's Test is not)."),
}


def table_spec(task: str, runs: list[RunInfo]) -> TableSpec:
    """The task's table, scoring also the selection split when a run holds one out."""
    spec = TABLES[task]
    if any(run.selection for run in runs):
        spec = replace(spec, splits=(spec.splits[0], SELECTION, *spec.splits[1:]))
    return spec


def scored_splits(spec: TableSpec, rows: list[Row]) -> TableSpec:
    """``spec`` with only the splits some row has scores on: an unlabelled or absent
    test split gets no column."""
    return replace(spec, splits=tuple(s for s in spec.splits
                                      if any(s in row.scores for row in rows)))


def reporting_splits(spec: TableSpec, run: RunInfo) -> tuple[str, ...]:
    """The splits of ``spec`` that only report for ``run``: neither trained on nor used
    to choose. Only these get intervals; scores elsewhere are not inference."""
    return tuple(s for s in spec.splits if s not in ("train", chooser(run)))


@dataclass
class Row:
    """One table row: a group's best checkpoint, then its scores per split."""

    record: TrialRecord
    run: RunInfo
    group: str
    trials: list[TrialRecord]
    """Every trial of the group, the row's own included."""
    scores: dict[str, dict] = field(default_factory=dict)
    """Split -> metrics (with ``confusion``): re-scored, or as recorded if no data."""
    recorded: bool = False
    """True when the dataset was not found and the scores are the recorded ones."""
    reproduce: str = ""
    """A command that trains this row again."""
    hand_grid: dict = field(default_factory=dict)
    """The group's best hand-grid and searched trials scored on the reporting split
    (``covid_tune.results.leaderboard.score_hand_grid``)."""
    external: dict = field(default_factory=dict)
    """Name -> the checkpoint scored on an external collection (``--external``;
    ``covid_tune.results.leaderboard.score_external``)."""

    @property
    def backbone(self) -> str:
        return self.record.config["backbone"].upper()

    def best_of(self, hand_grid: bool) -> TrialRecord | None:
        """The group's best hand-grid (``start_with``) or best searched trial."""
        trials = [t for t in self.trials if t.hand_grid == hand_grid]
        return best_trial(trials, self.run.metric, self.run.mode) if trials else None


def pick_rows(spec: TableSpec, runs: list[RunInfo]) -> list[Row]:
    """Group every trial of the task's runs; each group's best checkpoint, in table order.

    Rows are chosen by the first run's metric (``notes`` says so if runs differ)."""
    metric, mode = runs[0].metric, runs[0].mode
    by_name = {run.name: run for run in runs}
    groups: dict[tuple, list[TrialRecord]] = {}
    for run in runs:
        for record in run.trials:
            groups.setdefault(spec.order(record.config), []).append(record)
    rows = []
    for key in sorted(groups):
        best = best_trial(groups[key], metric, mode)
        rows.append(Row(best, by_name[best.run], spec.group_name(best.config), groups[key]))
    return rows


def extra_params(config: dict) -> dict:
    """The tuned values the table's first columns do not already show."""
    shown = {"frozen_layers"} if config["task"] == "binary" else set()
    if config.get("loss") != "focal":
        shown |= set(FOCAL_PARAMS)
    return {k: config.get(k) for k in EXTRA_PARAMS if k not in shown}
