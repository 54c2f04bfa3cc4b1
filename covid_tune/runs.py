"""Reading a sweep's run directory: each trial's best checkpoint, its epoch and time.

A run directory is Ray Tune's layout plus ``sweep.json`` (see ``covid_tune.sweep``).
``read_run`` walks the ``trial_<id>/`` folders and, for each trial, picks the kept
checkpoint with the best value of the sweep's metric (the best epoch, never simply
the last), reading the ``recipe.json`` each checkpoint carries. Nothing here needs
Ray to be running; the leaderboard and the exporter both start from these records.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from covid_tune.config import TrialConfig, load_space
from covid_tune.errors import UserError
from covid_tune.sweep import STUDY_FILE, SWEEP_FILE
from covid_tune.train import RECIPE_FILE, load_checkpoint


@dataclass
class TrialRecord:
    """One trial at its best kept checkpoint."""

    run: str
    """The run's name (its folder name)."""
    trial_id: str
    config: dict
    """The resolved ``TrialConfig`` as a dict (from the checkpoint's recipe)."""
    checkpoint: Path
    epoch: int
    metrics: dict
    """What the trial reported at that epoch (``train_*``, ``val_*``, timings)."""
    seconds: float | None
    """Wall time of the trial up to the end of that epoch (Ray's ``time_total_s``)."""
    hand_grid: bool | None = None
    """Whether the config is a ``start_with`` row of the space; ``None`` if unknown."""

    @property
    def task(self) -> str:
        return self.config["task"]

    def score(self, metric: str) -> float:
        return float(self.metrics.get(metric, math.nan))


@dataclass
class RunInfo:
    """What ``read_run`` found in one run directory."""

    path: Path
    name: str
    options: dict
    """``sweep.json``: what ``covid-tune sweep`` was asked to do."""
    trials: list[TrialRecord]
    notes: list[str] = field(default_factory=list)
    """Things a reader of the leaderboard should know (missing files, skipped trials)."""

    @property
    def task(self) -> str:
        return self.trials[0].task

    @property
    def metric(self) -> str:
        return self.trials[0].config["metric"]

    @property
    def mode(self) -> str:
        return self.trials[0].config["mode"]

    @property
    def data(self) -> str:
        return str(self.options.get("data", ""))

    @property
    def study_path(self) -> Path:
        return self.path / STUDY_FILE


def read_run(run_dir: str | Path) -> RunInfo:
    """Every trial of a run at its best checkpoint; UserError if there is none."""
    if "://" in str(run_dir):
        raise UserError(f"{run_dir}: read a local copy of the run; download it first (for "
                        f"instance `aws s3 sync` or `gsutil rsync`) and pass that folder")
    path = Path(run_dir).expanduser().resolve()
    options = read_options(path)
    name = options.get("name") or path.name
    start_with, notes = hand_grid_rows(options)
    trials = []
    for folder in sorted(path.glob("trial_*")):
        record = read_trial(folder, name)
        if record is None:
            notes.append(f"{folder.name}: no checkpoint with a recipe (the trial failed "
                         f"before its first epoch ended); left out")
            continue
        if start_with is not None:
            record.hand_grid = any(matches(record.config, row) for row in start_with)
        trials.append(record)
    if not trials:
        raise UserError(f"{path}: no trial of this run has a checkpoint yet; wait for the "
                        f"first epoch to end, or check the trials' error.txt files")
    return RunInfo(path, name, options, trials, notes)


def read_options(path: Path) -> dict:
    """The run's ``sweep.json`` as it was written (older or partial files included)."""
    sweep_file = path / SWEEP_FILE
    if not sweep_file.is_file():
        raise UserError(f"{path}: not a covid-tune run (no {SWEEP_FILE}); pass the run "
                        f"folder `covid-tune sweep` printed")
    return json.loads(sweep_file.read_text())


def hand_grid_rows(options: dict) -> tuple[list[dict] | None, list[str]]:
    """The space file's ``start_with`` rows, or ``None`` and a note if it is gone."""
    space_file = options.get("space_file", "")
    try:
        return list(load_space(space_file).start_with), []
    except UserError as exc:
        return None, [f"cannot tell hand-grid rows from searched ones: {exc}"]


def matches(config: dict, row: dict) -> bool:
    """Whether a trial config equals a ``start_with`` row on the keys the row gives."""
    for key, wanted in row.items():
        value = config.get(key)
        if isinstance(wanted, float) or isinstance(value, float):
            if not isinstance(value, (int, float)) or not math.isclose(value, wanted,
                                                                       rel_tol=1e-9):
                return False
        elif value != wanted:
            return False
    return True


def read_trial(folder: Path, run: str) -> TrialRecord | None:
    """A trial's best kept checkpoint by its own sweep metric, or ``None``."""
    recipes = [(json.loads(p.read_text()), p.parent)
               for p in sorted(folder.glob(f"checkpoint_*/{RECIPE_FILE}"))]
    if not recipes:
        return None
    config = recipes[0][0]["config"]
    recipe, checkpoint = best_recipe(recipes, config["metric"], config["mode"])
    epoch = int(recipe["epoch"])
    trial_id = folder.name.removeprefix("trial_")
    return TrialRecord(run=run, trial_id=trial_id, config=recipe["config"],
                       checkpoint=checkpoint, epoch=epoch, metrics=recipe["metrics"],
                       seconds=training_seconds(folder, epoch))


def best_recipe(recipes: list[tuple[dict, Path]], metric: str, mode: str) -> tuple[dict, Path]:
    """The best ``(recipe, folder)`` by ``metric``; on a tie the earlier epoch."""
    def key(item: tuple[dict, Path]) -> tuple[float, int]:
        value = float(item[0]["metrics"].get(metric, math.nan))
        value = -math.inf if math.isnan(value) else (value if mode == "max" else -value)
        return value, -int(item[0]["epoch"])

    return max(recipes, key=key)


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord:
    """The trial whose best checkpoint scores best on ``metric``; ties to fewer epochs."""
    def key(record: TrialRecord) -> tuple[float, int]:
        value = record.score(metric)
        value = -math.inf if math.isnan(value) else (value if mode == "max" else -value)
        return value, -record.epoch

    return max(trials, key=key)


def training_seconds(folder: Path, epoch: int) -> float | None:
    """``time_total_s`` of the last result reported for ``epoch`` in ``result.json``."""
    seconds = None
    results = folder / "result.json"
    if not results.is_file():
        return None
    for line in results.read_text().splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written while we read
        if result.get("epoch") == epoch:
            seconds = result.get("time_total_s")
    return seconds


def load_model(record: TrialRecord):
    """The trial's model at its best checkpoint, in eval mode, on the CPU."""
    from covid_tune.models import build_model
    from covid_tune.tasks import TASKS

    state, recipe = load_checkpoint(record.checkpoint)
    cfg = TrialConfig.from_dict(recipe["config"])
    model = build_model(cfg.backbone, TASKS[cfg.task].outputs, cfg.hidden, cfg.dropout,
                        cfg.frozen_layers, pretrained="none")
    model.load_state_dict(state["model"])
    return model.eval()


def data_root(run: RunInfo) -> Path | None:
    """The run's dataset folder if it is still there (relative paths from the cwd)."""
    root = Path(os.path.expanduser(run.data)) if run.data else None
    return root if root is not None and root.is_dir() else None
