"""Reading a whole run: its trials, their best checkpoints, how they rank, and which
dataset folder its results are scored on."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from covid_tune.core.space import DataSpec, SearchSpace
from covid_tune.data.csv_manifest import is_manifest
from covid_tune.data.dataset import Layout, manifest, scan
from covid_tune.core.numeric import logit
from covid_tune.errors import UserError
from covid_tune.runs.checkpoint import RECIPE_FILE, DamagedCheckpoint, parse_recipe
from covid_tune.runs.folder import DATASET_FILE, RESULT_FILE, STUDY_FILE
from covid_tune.runs.ray_state import newest_ray_state
from covid_tune.runs.record import (
    SweepRecord,
    manifest_fingerprint,
    read_manifest,
    read_record,
    read_selection,
    read_space,
    read_splits,
)
from covid_tune.runs.storage import is_uri, read_bytes

# which dataset folder a run's results are scored on ------------------------------

@dataclass(frozen=True)
class DataChoice:
    """The dataset folder a reader uses for a run, and what the output should say."""

    root: Path | None
    """``None`` when the dataset is nowhere to be found (scores stay as recorded)."""
    notes: tuple[str, ...] = ()
    layout: Layout | None = None
    """The scan of ``root`` the check was made on, for ``load_dataset`` to decode."""


def choose_data(run_dir: str, record: SweepRecord, task: str, data: str | None = None,
                allow_changed: bool = False, required: bool = False,
                spec: DataSpec | None = None) -> DataChoice:
    """The run's dataset: ``data`` (a moved copy) or the recorded folder, checked
    against the run's manifest. A different dataset is refused unless
    ``allow_changed``, in which case the difference is returned as a note."""
    root = Path(data).expanduser().resolve() if data else Path(record.provenance.data)
    if not (root.is_dir() or is_manifest(root)):
        if data:
            raise UserError(f"--data {data}: no such folder or CSV manifest")
        if required:
            raise UserError(f"{root}: the dataset this run was trained on is not there any "
                            f"more; pass --data DIR pointing at a copy of it")
        return DataChoice(None, (f"The dataset folder {root} was not found, so the scores "
                                 f"are the ones recorded during training (train with "
                                 f"augmentation) and test is not scored; pass --data DIR "
                                 f"to re-score on a copy.",))
    layout = scan(root, task, read_splits(run_dir), spec)
    current = manifest(layout)
    if manifest_fingerprint(current) == record.provenance.data_fingerprint:
        return DataChoice(root, (), layout)
    try:
        change = describe_change(read_manifest(run_dir), current)
    except UserError:
        if not allow_changed:
            raise
        change = f"{DATASET_FILE} cannot be read to count the difference"
    if not allow_changed:
        raise UserError(f"{root}: not the dataset run {record.options.name} was trained on "
                        f"({change}); point --data at the right copy, or pass "
                        f"--allow-changed-data to go on anyway")
    return DataChoice(root, (f"The dataset at {root} differs from the one the run was "
                             f"trained on ({change}); scored anyway (--allow-changed-data).",),
                      layout)


def describe_change(recorded: dict[str, int], current: dict[str, int]) -> str:
    """``3 files added, 1 removed, 2 changed`` between two manifests."""
    added = len(current.keys() - recorded.keys())
    removed = len(recorded.keys() - current.keys())
    changed = sum(1 for k in recorded.keys() & current.keys() if recorded[k] != current[k])
    return f"{added} file(s) added, {removed} removed, {changed} changed in size"


# reading a whole run --------------------------------------------------------------

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
    hand_grid: bool = False
    """Whether the config is a ``start_with`` row of the run's space."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Label -> the decision threshold tuned at that epoch, as a probability, for people
    to read (empty: 0.5 for every label)."""
    threshold_logits: dict[str, float] = field(default_factory=dict)
    """The same thresholds as log-odds, exact: what the metrics apply (empty: 0, that is
    0.5, for every label)."""
    threshold_rule: dict = field(default_factory=dict)
    """How they were tuned: ``rule``, ``target``, ``split`` and the ``untuned`` labels
    (no positive or no negative on that split, so left at 0.5)."""

    @property
    def task(self) -> str:
        return self.config["task"]

    def score(self, metric: str) -> float:
        value = self.metrics.get(metric, math.nan)
        return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass
class RunInfo:
    """What ``read_run`` found in one run folder."""

    path: Path
    name: str
    record: SweepRecord
    space: SearchSpace
    """The run's own resolved space (``space.yaml``)."""
    trials: list[TrialRecord]
    notes: list[str] = field(default_factory=list)
    """Things a reader of the output should know (damaged files, skipped trials)."""
    states: dict[str, str] = field(default_factory=dict)
    """Trial id -> Ray Tune's status (TERMINATED, ERROR, ...) from the run's last
    snapshot; empty when there is none to read."""
    selection: list[str] = field(default_factory=list)
    """The Train images held out as the selection split (empty: validation chose)."""

    def summary(self) -> str:
        """``12 trials, 2 failed`` (every trial Ray knows, not only the usable ones)."""
        total = len(self.states) or len(self.trials)
        failed = sum(status == "ERROR" for status in self.states.values())
        return f"{total} trials, {failed} failed" if self.states else f"{total} trials"

    @property
    def task(self) -> str:
        return self.space.task

    @property
    def metric(self) -> str:
        return self.space.metric

    @property
    def mode(self) -> str:
        return self.space.mode

    @property
    def study_path(self) -> Path:
        return self.path / STUDY_FILE


def read_run(run_dir: str | Path) -> RunInfo:
    """Every trial of a run at its best checkpoint; UserError if there is none."""
    if is_uri(str(run_dir)):
        raise UserError(f"{run_dir}: read a local copy of the run; download it first (for "
                        f"instance `aws s3 sync` or `gsutil rsync`) and pass that folder")
    path = Path(run_dir).expanduser().resolve()
    record = read_record(str(path))
    space = read_space(str(path), record)
    name = record.options.name or path.name
    trials, notes = [], []
    for folder in sorted(path.glob("trial_*")):
        record_, why = read_trial(folder, name, space)
        if record_ is None:
            notes.append(f"{folder.name}: {why}; left out")
            continue
        if why:
            notes.append(f"{folder.name}: {why}")
        record_.hand_grid = any(matches(record_.config, row) for row in space.start_with)
        trials.append(record_)
    if not trials:
        raise UserError(f"{path}: no trial of this run has a usable checkpoint yet; wait "
                        f"for the first epoch to end, or check the trials' error.txt files")
    states = trial_states(str(path))
    if not states:
        notes.append("Ray Tune's snapshot of the run (experiment_state-*.json) is missing or "
                     "cannot be read, so failed trials are not counted")
    return RunInfo(path, name, record, space, trials, notes, states,
                   read_selection(str(path), space))


def trial_states(run_dir: str) -> dict[str, str]:
    """Trial id -> status from Ray Tune's newest snapshot of the run (plain JSON); empty
    if there is none or it cannot be read (the leaderboard then counts what it finds)."""
    newest = newest_ray_state(run_dir)
    if newest is None:
        return {}
    try:
        snapshot = json.loads(read_bytes(newest))
        trials = [json.loads(entry[0]) for entry in snapshot["trial_data"]]
        return {str(t["trial_id"]): str(t["status"]) for t in trials}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


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


def read_trial(folder: Path, run: str, space: SearchSpace) -> tuple[TrialRecord | None, str]:
    """A trial's best kept checkpoint by the run's metric, or ``None``; and what a
    reader should know (why none, or which checkpoints were passed over).

    Checkpoints whose recipe is damaged are passed over; their weights are checked
    only when a reader loads them (``load_checkpoint``)."""
    recipes, damaged = [], 0
    for checkpoint in sorted(p for p in folder.glob("checkpoint_*") if p.is_dir()):
        try:
            recipes.append((parse_recipe(checkpoint), checkpoint))
        except DamagedCheckpoint:
            damaged += 1
    if not recipes:
        return None, (f"{damaged} checkpoint(s), none with a readable {RECIPE_FILE}" if damaged
                      else "no checkpoint (the trial failed before its first epoch ended)")
    recipe, checkpoint = best_recipe(recipes, space.metric, space.mode)
    epoch = int(recipe["epoch"])
    passed_over = (f"{damaged} checkpoint(s) without a readable {RECIPE_FILE} passed over"
                   if damaged else "")
    thresholds, threshold_logits = _thresholds(recipe)
    return TrialRecord(run=run, trial_id=folder.name.removeprefix("trial_"),
                       config=recipe["config"], checkpoint=checkpoint, epoch=epoch,
                       metrics=recipe["metrics"], seconds=training_seconds(folder, epoch),
                       thresholds=thresholds, threshold_logits=threshold_logits,
                       threshold_rule=recipe.get("threshold_rule") or {}), passed_over


def _thresholds(recipe: dict) -> tuple[dict[str, float], dict[str, float]]:
    """A recipe's tuned thresholds as (probabilities, log-odds), label -> number; both
    empty when they are not usable.

    The log-odds are the recipe's ``threshold_logits`` when they name the same labels;
    a recipe written before they were recorded has the probabilities only, turned into
    log-odds here (0.5 is 0, 0.0 is -inf)."""
    probabilities = _numbers(recipe.get("thresholds"), 0.0, 1.0)
    logits = _numbers(recipe.get("threshold_logits"), -math.inf, math.inf)
    if not probabilities:
        return {}, {}
    if logits.keys() != probabilities.keys():
        logits = {label: float(logit(p)) for label, p in probabilities.items()}
    return probabilities, logits


def _numbers(raw, low: float, high: float) -> dict[str, float]:
    """``raw`` as label -> float when it is a dict of numbers from low to high, else {}."""
    if not isinstance(raw, dict) or not all(
            isinstance(v, (int, float)) and low <= v <= high for v in raw.values()):
        return {}
    return {str(k): float(v) for k, v in raw.items()}


def rank_key(value: float, mode: str) -> float:
    """A value to maximise: NaN ranks last in either mode."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


CHECKPOINT_SCORE = "checkpoint_score"
"""The reported value Ray ranks a trial's checkpoints by (``tie_broken``)."""


def tie_broken(value: float, epoch: int, mode: str) -> float:
    """``value`` moved ``epoch`` units in the last place toward worse, so that of two
    equal values the earlier epoch ranks higher, as ``best_recipe`` has it. Ray's
    checkpoint manager keeps the later of two equal scores, and with one checkpoint
    kept it would delete the earlier first. Values apart by more than a few units in
    the last place keep their order; NaN stays NaN."""
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        return value
    step = epoch * math.ulp(value)
    return value - step if mode == "max" else value + step


def best_recipe(recipes: list[tuple[dict, Path]], metric: str, mode: str) -> tuple[dict, Path]:
    """The best ``(recipe, folder)`` by ``metric``; on a tie the earlier epoch."""
    return max(recipes, key=lambda item: (rank_key(item[0]["metrics"].get(metric), mode),
                                          -int(item[0]["epoch"])))


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord:
    """The trial whose best checkpoint scores best on ``metric``; ties to fewer epochs."""
    return max(trials, key=lambda t: (rank_key(t.score(metric), mode), -t.epoch))


def training_seconds(folder: Path, epoch: int) -> float | None:
    """``time_total_s`` of the last result reported for ``epoch`` in ``result.json``."""
    try:
        lines = (folder / RESULT_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return None
    seconds = None
    for line in lines:
        try:
            result = json.loads(line)
        except ValueError:
            continue  # a line being written while we read, or a damaged one
        if isinstance(result, dict) and result.get("epoch") == epoch:
            value = result.get("time_total_s")
            seconds = float(value) if isinstance(value, (int, float)) else seconds
    return seconds


def choose_datasets(runs: list[RunInfo], data: list[str],
                    allow_changed: bool = False) -> dict[str, DataChoice]:
    """Each run's dataset folder: ``--data`` (one for all, or one per run) or the
    recorded one, checked against the run's manifest."""
    if len(data) > 1 and len(data) != len(runs):
        raise UserError(f"--data given {len(data)} times for {len(runs)} runs; give it once "
                        f"for every run, or once per run in the same order")
    given = data * len(runs) if len(data) == 1 else data or [None] * len(runs)
    return {run.name: choose_data(str(run.path), run.record, run.task, folder, allow_changed,
                                  spec=run.space.data)
            for run, folder in zip(runs, given)}
