"""The assignment's tables, filled from sweeps: one row per group, its best checkpoint.

Trials are grouped as the assignment's tables group them (Part 1 by backbone and frozen
layers, Part 2 by backbone and loss). Each group's row is its best checkpoint by the
sweep's validation metric (the best epoch, not the last), re-evaluated with the
deterministic evaluation transform on train and validation, and on test for Part 1
only: the row was chosen on validation, so test is scored for chosen rows alone.

``write_leaderboard`` writes ``leaderboard.md``, ``leaderboard.csv``,
``leaderboard.parquet``, a confusion-matrix PNG per row, a comparison chart per task
and, under ``reproduce/``, a search-space file per row that trains that row again.
"""

from __future__ import annotations

import csv
import math
import shlex
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from covid_tune.config import FOCAL_PARAMS, load_space
from covid_tune.data import DataBundle, load_dataset
from covid_tune.errors import UserError
from covid_tune.metrics import compute_metrics
from covid_tune.models import BACKBONES, conv_count
from covid_tune.runs import RunInfo, TrialRecord, best_trial, data_root, load_model, read_run
from covid_tune.tasks import TASKS

SPLIT_COLUMNS = {
    "train": "Training Set Accuracy/F1 Score",
    "validation": "Validation Set Accuracy/F1 Score",
    "test": "Testing Set Accuracy/F1 Score",
}
LOSS_NAMES = {"ce": "Cross Entropy Loss", "bce": "BCE With Logits Loss", "focal": "Focal Loss"}
HYPERPARAMETERS = ("frozen_layers", "lr", "momentum", "batch_size", "weight_decay", "hidden",
                   "dropout", "focal_alpha", "focal_gamma")


def frozen_name(config: dict) -> str:
    """The assignment's "Frozen Layers" wording for a trial's ``frozen_layers``."""
    frozen = int(config["frozen_layers"])
    if frozen == conv_count(config["backbone"]):
        return "All Layers except FC"
    return f"First {frozen} CNN Layers" if frozen else "None"


def loss_name(config: dict) -> str:
    return LOSS_NAMES.get(config["loss"], config["loss"])


def backbone_rank(config: dict) -> int:
    return list(BACKBONES).index(config["backbone"])


@dataclass(frozen=True)
class TableSpec:
    """How one task's table groups, orders, renders and scores its rows."""

    title: str
    group_column: str
    group_name: Callable[[dict], str]
    order: Callable[[dict], tuple]
    """Sort key of a group (the assignment's row order)."""
    splits: tuple[str, ...]
    """Splits re-evaluated and shown; test only where it is labelled and reported."""
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
        splits=("train", "validation"), chart_split="validation", f1_percent=True,
        headline="Exact-match accuracy in %, macro F1 (over covid, normal, pneumonia) in %; "
                 "Test is unlabelled, so not scored."),
}


@dataclass
class Row:
    """One table row: a group's best checkpoint and its scores per split."""

    record: TrialRecord
    run: RunInfo
    group: str
    trials: list[TrialRecord]
    scores: dict[str, dict]
    """Split -> metrics (with ``confusion``); re-evaluated, or recorded if no data."""
    recorded: bool = False
    """True when the dataset was not found and the scores are the recorded ones."""
    reproduce: str = ""
    """A command that trains this row again."""


def write_leaderboard(run_dirs: list[str], out: str | None = None) -> str:
    """Write the leaderboard files into ``out``; return the markdown (also printed)."""
    runs = [read_run(d) for d in run_dirs]
    folder = Path(out) if out else runs[0].path / "leaderboard"
    folder.mkdir(parents=True, exist_ok=True)
    sections, rows = [], []
    for task in (t for t in TABLES if any(r.task == t for r in runs)):
        task_runs = [r for r in runs if r.task == task]
        task_rows = build_rows(TABLES[task], task_runs)
        for row in task_rows:
            row.reproduce = reproduce_command(row, folder)
        sections.append(render_task(TABLES[task], task_runs, task_rows, folder))
        rows += [table_record(TABLES[task], row, i) for i, row in enumerate(task_rows)]
    text = "# Leaderboard\n\n" + "\n".join(sections)
    (folder / "leaderboard.md").write_text(text)
    write_tables(rows, folder)
    return text + f"\nWritten to {folder}/ (leaderboard.md, .csv, .parquet and PNGs)\n"


def build_rows(spec: TableSpec, runs: list[RunInfo]) -> list[Row]:
    """Group every trial of the task's runs; score each group's best checkpoint."""
    metric, mode = runs[0].metric, runs[0].mode
    groups: dict[tuple, list[TrialRecord]] = {}
    for run in runs:
        for record in run.trials:
            groups.setdefault(spec.order(record.config), []).append(record)
    rows, bundles = [], {}
    for key in sorted(groups):
        best = best_trial(groups[key], metric, mode)
        run = next(r for r in runs if r.name == best.run)
        bundle = dataset_for(run, best, bundles)
        scores = score_row(spec, best, bundle)
        rows.append(Row(best, run, spec.group_name(best.config), groups[key], scores,
                        recorded=bundle is None))
    return rows


def dataset_for(run: RunInfo, record: TrialRecord, cache: dict) -> DataBundle | None:
    """The run's dataset at the trial's image size (decoded once), or ``None`` if gone."""
    root = data_root(run)
    if root is None:
        return None
    key = (str(root), record.config["image_size"])
    if key not in cache:
        cache[key] = load_dataset(root, record.task, record.config["image_size"],
                                  progress=False)
    return cache[key]


def score_row(spec: TableSpec, record: TrialRecord, bundle: DataBundle | None) -> dict:
    """Metrics per split: re-evaluated when the data is there, else as recorded."""
    if bundle is None:
        return {split: {k: record.metrics.get(f"{prefix}_{k}", math.nan)
                        for k in ("accuracy", "f1")}
                for split, prefix in (("train", "train"), ("validation", "val"))}
    from covid_tune.train import Device, predict_logits

    device = Device.pick()
    model = load_model(record).to(device.torch)
    scores = {}
    for split in spec.splits:
        data = bundle.splits.get(split)
        if data is not None and data.targets.size:
            logits = predict_logits(model, data.images, 128, device)
            scores[split] = compute_metrics(TASKS[record.task], data.targets, logits)
    return scores


def cell(spec: TableSpec, scores: dict | None) -> str:
    """``89/0.907`` (Part 1) or ``92/92`` (Part 2), as the assignment wrote them."""
    if not scores or math.isnan(scores.get("accuracy", math.nan)):
        return "n/a"
    accuracy, f1 = 100 * scores["accuracy"], scores["f1"]
    return f"{accuracy:.0f}/{100 * f1:.0f}" if spec.f1_percent else f"{accuracy:.0f}/{f1:.3f}"


def duration(seconds: float | None) -> str:
    """``1hr 40min``, ``3min 5s`` or ``12s``."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}hr {minutes}min"
    return f"{minutes}min {secs}s" if minutes else f"{secs}s"


def source(record: TrialRecord) -> str:
    return {True: "hand grid", False: "searched", None: "?"}[record.hand_grid]


def hyperparameters(record: TrialRecord) -> dict:
    """The tuned values the table's first columns do not already show."""
    config = record.config
    shown = {"frozen_layers"} if config["task"] == "binary" else set()
    if config["loss"] != "focal":
        shown |= set(FOCAL_PARAMS)
    return {k: config[k] for k in HYPERPARAMETERS if k not in shown}


def display_row(spec: TableSpec, row: Row) -> dict:
    """The markdown row: the assignment's columns, then the rest."""
    record = row.record
    shown = {
        "Backbone": record.config["backbone"].upper(),
        spec.group_column: row.group,
        "Epochs": record.epoch,
        "Training Time": duration(record.seconds),
        **{SPLIT_COLUMNS[s]: cell(spec, row.scores.get(s)) for s in spec.splits},
    }
    shown.update({k: format_value(v) for k, v in hyperparameters(record).items()})
    shown.update({"Source": source(record), "Trial": f"{record.run}/{record.trial_id}",
                  "Reproduce": f"`{row.reproduce}`"})
    return shown


def format_value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table_record(spec: TableSpec, row: Row, index: int) -> dict:
    """A row for the CSV/parquet files: the displayed columns plus plain numbers."""
    record = row.record
    plain = {"task": record.task, "Backbone": record.config["backbone"].upper(),
             "Frozen Layers": frozen_name(record.config),
             "Loss Function": loss_name(record.config),
             "Epochs": record.epoch, "Training Time": duration(record.seconds),
             "training_seconds": record.seconds}
    for split in SPLIT_COLUMNS:
        scores = row.scores.get(split) if split in spec.splits else None
        plain[SPLIT_COLUMNS[split]] = cell(spec, scores) if scores else None
        plain[f"{split}_accuracy"] = float(scores["accuracy"]) if scores else None
        plain[f"{split}_f1"] = float(scores["f1"]) if scores else None
    unused = FOCAL_PARAMS if record.config["loss"] != "focal" else ()
    plain.update({k: None if k in unused else record.config.get(k) for k in HYPERPARAMETERS})
    plain.update({
        "metric": record.config["metric"], "metric_value": record.score(record.config["metric"]),
        "source": source(record), "run": record.run, "trial_id": record.trial_id,
        "checkpoint": str(record.checkpoint), "scores": "recorded" if row.recorded else
        "re-evaluated", "confusion_png": confusion_file(record.task, index),
        "reproduce": row.reproduce})
    return plain


def write_tables(rows: list[dict], folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    pq.write_table(table, folder / "leaderboard.parquet")


def render_task(spec: TableSpec, runs: list[RunInfo], rows: list[Row], folder: Path) -> str:
    """One task's section: the table, pictures, hand grid vs search, importances, notes."""
    metric = runs[0].metric
    lines = [f"## {spec.title}", "",
             f"Runs: {', '.join(f'`{r.name}` ({len(r.trials)} trials)' for r in runs)}. "
             f"Each row is its group's best checkpoint by `{metric}` (best epoch), "
             f"re-evaluated on {', '.join(spec.splits)}. {spec.headline} "
             f"Epochs and Training Time are those of that checkpoint.", ""]
    lines += markdown_table([display_row(spec, row) for row in rows])
    for index, row in enumerate(rows):
        write_confusion(spec, row, folder / confusion_file(row.record.task, index))
    chart = write_chart(spec, rows, folder)
    links = ", ".join(f"[{r.record.config['backbone'].upper()}, {r.group}]"
                      f"({confusion_file(r.record.task, i)})" for i, r in enumerate(rows))
    lines += ["", f"Confusion matrices ({spec.chart_split}): {links}", "",
              f"![Accuracy and F1 per row]({chart.name})", ""]
    lines += hand_grid_section(spec, rows, metric)
    for run in runs:
        lines += importance_section(run)
    lines += notes_section(runs, rows)
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|")
                                        for c in columns) + " |")
    return lines


def hand_grid_section(spec: TableSpec, rows: list[Row], metric: str) -> list[str]:
    """Each group's best hand-grid trial beside its best searched trial (validation)."""
    table = []
    for row in rows:
        hand = [t for t in row.trials if t.hand_grid]
        searched = [t for t in row.trials if t.hand_grid is False]
        table.append({
            "Backbone": row.record.config["backbone"].upper(), spec.group_column: row.group,
            f"Hand grid `{metric}`": best_text(hand, metric, row.record.config["mode"]),
            f"Best searched `{metric}`": best_text(searched, metric, row.record.config["mode"]),
            "Trials": len(row.trials)})
    return ["### Hand grid (start_with) beside the search", "",
            *markdown_table(table), ""]


def best_text(trials: list[TrialRecord], metric: str, mode: str) -> str:
    if not trials:
        return "—"
    best = best_trial(trials, metric, mode)
    return f"{best.score(metric):.3f} (`{best.trial_id}`, epoch {best.epoch})"


def importance_section(run: RunInfo) -> list[str]:
    importances, note = param_importances(run)
    lines = [f"### Hyperparameter importances (Optuna, `{run.name}`)", ""]
    if importances:
        rows = [{"Hyperparameter": optuna_label(k), "Importance": f"{v:.3f}"}
                for k, v in importances.items()]
        lines += markdown_table(rows) + [""]
    if note:
        lines += [note, ""]
    return lines


def param_importances(run: RunInfo) -> tuple[dict[str, float], str]:
    """Optuna's importances for the run's study, or a note saying why there are none."""
    import optuna

    if not run.study_path.is_file():
        return {}, f"No Optuna study found ({run.study_path.name} is missing)."
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run.study_path}")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, (f"Too few trials for importances: {len(complete)} ran to max_epochs, "
                    f"at least 2 are needed. Run more trials (--num-samples).")
    basis = (f"Computed from the {len(complete)} trials that ran to max_epochs (trials ASHA "
             f"stopped early are not counted), on each one's last-epoch `{run.metric}`.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as exc:
            return {}, f"Optuna could not compute importances: {exc}"
    extra = " ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    return importances, f"{basis} {extra}".strip()


def optuna_label(name: str) -> str:
    """``frozen_layers_vgg16`` -> ``frozen_layers (vgg16)``."""
    for backbone in BACKBONES:
        if name.endswith(f"_{backbone}"):
            return f"{name.removesuffix('_' + backbone)} ({backbone})"
    return name


def notes_section(runs: list[RunInfo], rows: list[Row]) -> list[str]:
    notes = [f"`{run.name}`: {note}" for run in runs for note in run.notes]
    if any(row.recorded for row in rows):
        notes.append("The dataset folder was not found, so train/validation scores are the "
                     "ones recorded during training (train with augmentation) and test is "
                     "not scored. Point sweep.json's `data` at the dataset to re-evaluate.")
    metrics = {run.metric for run in runs}
    if len(metrics) > 1:
        notes.append(f"The runs use different metrics ({', '.join(sorted(metrics))}); "
                     f"rows are chosen by the first run's `{runs[0].metric}`.")
    return ["### Notes", "", *[f"- {n}" for n in notes], ""] if notes else []


def confusion_file(task: str, index: int) -> str:
    return f"confusion-{task}-{index + 1}.png"


def write_confusion(spec: TableSpec, row: Row, path: Path) -> None:
    """The row's confusion matrix (one panel per label for multilabel) as a PNG."""
    from covid_tune.tensorboard import draw_confusion

    plt = pyplot()
    confusion = row.scores.get(spec.chart_split, {}).get("confusion")
    panels = confusion if isinstance(confusion, dict) else {"infected": confusion}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 2.9), squeeze=False)
    for ax, (label, matrix) in zip(axes[0], panels.items()):
        if matrix is None:
            ax.text(0.5, 0.5, "not scored", ha="center", va="center")
            ax.set_axis_off()
        else:
            draw_confusion(ax, np.asarray(matrix), label)
    fig.suptitle(f"{row.record.config['backbone'].upper()}, {row.group} ({spec.chart_split})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_chart(spec: TableSpec, rows: list[Row], folder: Path) -> Path:
    """Accuracy and F1 of every row, one panel per split: the assignment's bar chart."""
    plt = pyplot()
    labels = [f"{r.record.config['backbone'].upper()}\n{r.group}" for r in rows]
    splits = [s for s in spec.splits if any(s in r.scores for r in rows)]
    fig, axes = plt.subplots(len(splits), 1, figsize=(max(5, 1.3 * len(rows)), 2.8 * len(splits)),
                             squeeze=False)
    x = np.arange(len(rows))
    for ax, split in zip(axes[:, 0], splits):
        for offset, key in ((-0.2, "accuracy"), (0.2, "f1")):
            values = [r.scores.get(split, {}).get(key, math.nan) for r in rows]
            ax.bar(x + offset, values, width=0.4, label=key)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(split)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"comparison-{rows[0].record.task}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reproduce_command(row: Row, folder: Path) -> str:
    """``covid-tune sweep`` over a one-point space file written for this row."""
    record = row.record
    space_file = folder / "reproduce" / f"{record.run}-{record.trial_id}.yaml"
    write_reproduce_space(record, space_file)
    data = row.run.data or "DATA"
    seed = row.run.options.get("seed", 0)
    return (f"covid-tune sweep --space {shlex.quote(str(space_file))} --data "
            f"{shlex.quote(data)} --name reproduce-{record.trial_id} --seed {seed}")


def write_reproduce_space(record: TrialRecord, path: Path) -> None:
    """A search space with every hyperparameter fixed to the trial's, for its epochs."""
    config = record.config
    params = {k: config[k] for k in ("backbone", *HYPERPARAMETERS[:-2], "loss")}
    if config["loss"] == "focal":
        params.update({k: config[k] for k in FOCAL_PARAMS})
    space = {
        "task": config["task"], "metric": config["metric"], "mode": config["mode"],
        "max_epochs": record.epoch, "image_size": config["image_size"],
        "augment": config["augment"] or False, "pretrained": config["pretrained"],
        "num_samples": 1, "asha": {"grace_period": record.epoch, "reduction_factor": 2},
        "params": params,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Trains trial {record.trial_id} of run {record.run} again: its "
              f"hyperparameters, for the {record.epoch} epoch(s) of its leaderboard row.\n")
    path.write_text(header + yaml.safe_dump(space, sort_keys=False))
    try:
        load_space(path)
    except UserError as exc:  # a bug here, not the user's: say so plainly
        raise RuntimeError(f"wrote an invalid reproduce space: {exc}") from exc
