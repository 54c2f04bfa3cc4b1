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
from covid_tune.data.groups import grouping_line
from covid_tune.core.numeric import logit
from covid_tune.core.ranking import rank_key
from covid_tune.errors import UserError
from covid_tune.runs.checkpoint import RECIPE_FILE, DamagedCheckpoint, parse_recipe_bytes
from covid_tune.runs.folder import DATASET_FILE, RESULT_FILE, STUDY_FILE, RunFolder
from covid_tune.runs.ray_state import trial_states
from covid_tune.runs.record import (
    SweepRecord,
    manifest_fingerprint,
    read_end,
    read_grouping,
    read_manifest,
    read_record,
    read_selection,
    read_space,
    read_splits,
)

# which dataset folder a run's results are scored on ------------------------------

@dataclass(frozen=True)
class DataChoice:
    """The dataset folder a reader uses for a run, and what the output should say."""

    root: Path | None
    """``None`` when the dataset is nowhere to be found (scores stay as recorded)."""
    notes: tuple[str, ...] = ()
    layout: Layout | None = None
    """The scan of ``root`` the check was made on, for ``load_dataset`` to decode."""


def choose_data(run_dir: str | RunFolder, record: SweepRecord, task: str, data: str | None = None,
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
    checkpoint: Path | str
    """The checkpoint folder: a local path, or a URI shown without query or credentials
    (``local_checkpoint`` gives a copy on this machine)."""
    epoch: int
    metrics: dict
    """What the trial reported at that epoch (``train_*``, ``val_*``, timings)."""
    seconds: float | None
    """Wall time of the trial up to the end of that epoch (Ray's ``time_total_s``)."""
    hand_grid: bool = False
    """Whether the config is a ``start_with`` row of the run's space."""
    earlier: bool = False
    """From a run another run of the leaderboard was warm-started from (``--warm-start``):
    TPE of the later run learned from it."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Label -> the decision threshold tuned at that epoch, as a probability, for people
    to read (empty: 0.5 for every label)."""
    threshold_logits: dict[str, float] = field(default_factory=dict)
    """The same thresholds as log-odds, exact: what the metrics apply (empty: 0, that is
    0.5, for every label)."""
    threshold_rule: dict = field(default_factory=dict)
    """How they were tuned: ``rule``, ``target``, ``split``, the ``untuned`` labels (no
    positive or no negative on that split, so left at 0.5) and the ``degenerate`` ones
    (label -> ``all positive``/``all negative`` on that split)."""
    temperatures: dict[str, float] = field(default_factory=dict)
    """Label -> the temperature fitted on the choosing split (log-odds / T are the
    calibrated log-odds); empty for a run written before they were (1 for every label)."""
    source: RunFolder | None = field(default=None, repr=False, compare=False)
    """The trial's folder, where the checkpoint is read from."""

    @property
    def task(self) -> str:
        return self.config["task"]

    def local_checkpoint(self) -> Path:
        """The checkpoint folder on this machine, for ``load_model``: itself, or a copy
        checked against its recipe (``RunFolder.local_checkpoint``)."""
        if self.source is None or self.source.is_local:
            return Path(self.checkpoint)
        return self.source.local_checkpoint(str(self.checkpoint).rsplit("/", 1)[-1])

    def score(self, metric: str) -> float:
        value = self.metrics.get(metric, math.nan)
        return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass
class RunInfo:
    """What ``read_run`` found in one run folder."""

    path: Path | str
    """The run folder: a local path, or a URI shown without query or credentials."""
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
    folder: RunFolder | None = field(default=None, repr=False, compare=False)
    """The run folder, opened (``path`` opened when not given)."""

    def __post_init__(self):
        if self.folder is None:
            self.folder = RunFolder(self.path)

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
    def study_path(self) -> Path | str:
        """Where the run's Optuna study is (``folder.local_file`` gives a local copy)."""
        return self.folder.local(STUDY_FILE) if self.folder.is_local else \
            self.folder.where(STUDY_FILE)


def read_run(run_dir: str | Path | RunFolder) -> RunInfo:
    """Every trial of a run at its best checkpoint, wherever the run is (a local path, or
    a ``file://``, ``s3://`` or ``gs://`` URI); UserError if there is none."""
    run = RunFolder(run_dir)
    record = read_record(run)
    space = read_space(run, record)
    name = record.options.name or run.name
    trials, notes = [], []
    for trial in run.trial_folders():
        record_, why = read_trial(run.sub(trial), name, space)
        if record_ is None:
            notes.append(f"{trial}: {why}; left out")
            continue
        if why:
            notes.append(f"{trial}: {why}")
        record_.hand_grid = any(matches(record_.config, row) for row in space.start_with)
        trials.append(record_)
    if not trials:
        raise UserError(f"{run.where()}: no trial of this run has a usable checkpoint yet; "
                        f"wait for the first epoch to end, or check the trials' error.txt "
                        f"files")
    states = trial_states(run)
    if not states:
        notes.append("Ray Tune's snapshot of the run (experiment_state-*.json) is missing or "
                     "cannot be read, so failed trials are not counted")
    grouping = read_grouping(run)
    if grouping:
        notes.append(f"Patients: {grouping_line(grouping)}.")
    if record.options.warm_start:
        notes.append(f"TPE started from the finished trials of earlier runs (warm start): "
                     f"{', '.join(record.options.warm_start)}; give them to the leaderboard "
                     f"too to see their rows, marked earlier.")
    end = read_end(run)
    if end is not None and end.kind != "finished":
        notes.append(f"The sweep ended early: {end.reason}.")
    return RunInfo(run.local() if run.is_local else run.where(), name, record, space, trials,
                   notes, states, read_selection(run, space), folder=run)


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


def read_trial(folder: Path | str | RunFolder, run: str,
               space: SearchSpace) -> tuple[TrialRecord | None, str]:
    """A trial's best kept checkpoint by the run's metric, or ``None``; and what a
    reader should know (why none, or which checkpoints were passed over).

    Checkpoints whose recipe is damaged are passed over; their weights are checked
    only when a reader loads them (``load_checkpoint``)."""
    trial = RunFolder(folder)
    recipes, damaged = [], 0
    for checkpoint in trial.folders(prefix="checkpoint_"):
        where = trial.local(checkpoint) if trial.is_local else trial.where(checkpoint)
        try:
            recipes.append((parse_recipe_bytes(trial.read_bytes(checkpoint, RECIPE_FILE),
                                               where), where))
        except (DamagedCheckpoint, OSError):
            damaged += 1
    if not recipes:
        return None, (f"{damaged} checkpoint(s), none with a readable {RECIPE_FILE}" if damaged
                      else "no checkpoint (the trial failed before its first epoch ended)")
    recipe, checkpoint = best_recipe(recipes, space.metric, space.mode)
    epoch = int(recipe["epoch"])
    passed_over = (f"{damaged} checkpoint(s) without a readable {RECIPE_FILE} passed over"
                   if damaged else "")
    temperatures = _numbers(recipe.get("temperatures"), 1e-6, math.inf)
    thresholds, threshold_logits = _thresholds(recipe, temperatures)
    return TrialRecord(run=run, trial_id=trial.name.removeprefix("trial_"),
                       config=recipe["config"], checkpoint=checkpoint, epoch=epoch,
                       metrics=recipe["metrics"], seconds=training_seconds(trial, epoch),
                       thresholds=thresholds, threshold_logits=threshold_logits,
                       threshold_rule=recipe.get("threshold_rule") or {},
                       temperatures=temperatures, source=trial), passed_over


def _thresholds(recipe: dict, temperatures: dict[str, float]
                ) -> tuple[dict[str, float], dict[str, float]]:
    """A recipe's tuned thresholds as (probabilities after the label's temperature,
    raw log-odds), label -> number; both empty when they are not usable.

    The log-odds are the recipe's ``threshold_logits`` when they name the same labels;
    a recipe written before they were recorded has the probabilities only, turned into
    log-odds here (0.5 is 0, 0.0 is -inf)."""
    probabilities = _numbers(recipe.get("thresholds"), 0.0, 1.0)
    logits = _numbers(recipe.get("threshold_logits"), -math.inf, math.inf)
    if not probabilities:
        return {}, {}
    if logits.keys() != probabilities.keys():
        logits = {label: float(logit(p)) * temperatures.get(label, 1.0)
                  for label, p in probabilities.items()}
    return probabilities, logits


def _numbers(raw, low: float, high: float) -> dict[str, float]:
    """``raw`` as label -> float when it is a dict of numbers from low to high, else {}."""
    if not isinstance(raw, dict) or not all(
            isinstance(v, (int, float)) and low <= v <= high for v in raw.values()):
        return {}
    return {str(k): float(v) for k, v in raw.items()}


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


def best_recipe(recipes: list[tuple[dict, Path | str]], metric: str,
                mode: str) -> tuple[dict, Path | str]:
    """The best ``(recipe, folder)`` by ``metric``; on a tie the earlier epoch."""
    return max(recipes, key=lambda item: (rank_key(item[0]["metrics"].get(metric), mode),
                                          -int(item[0]["epoch"])))


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord:
    """The trial whose best checkpoint scores best on ``metric``; ties to fewer epochs."""
    return max(trials, key=lambda t: (rank_key(t.score(metric), mode), -t.epoch))


def best_overall(runs: list[RunInfo]) -> tuple[RunInfo, TrialRecord]:
    """The best trial over the runs of one task, by the first run's metric."""
    trials = [t for run in runs for t in run.trials]
    record = best_trial(trials, runs[0].metric, runs[0].mode)
    return next(r for r in runs if r.name == record.run), record


def chooser(run: RunInfo) -> str:
    """The split that chose the run's trials, epochs and thresholds: ``selection`` or
    ``validation``."""
    return run.space.selection.split


def result_rows(folder: Path | str | RunFolder) -> list[dict]:
    """A trial's ``result.json``, one dict per reported result, in order; a line being
    written while we read, or a damaged one, is skipped; empty if unreadable."""
    try:
        lines = RunFolder(folder).read_text(RESULT_FILE).splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def training_seconds(folder: Path | str | RunFolder, epoch: int) -> float | None:
    """``time_total_s`` of the last result reported for ``epoch`` in ``result.json``."""
    seconds = None
    for result in result_rows(folder):
        if result.get("epoch") == epoch:
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
    return {run.name: choose_data(run.folder, run.record, run.task, folder, allow_changed,
                                  spec=run.space.data)
            for run, folder in zip(runs, given)}
