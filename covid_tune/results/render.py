"""The leaderboard's words and tables: markdown sections, CSV/parquet rows and the
search-space files that train a row again.

Everything here turns ``covid_tune.results.rows.Row`` objects (with their scores) into
text; nothing is computed or decided here, and nothing imports torch or Ray.
"""

from __future__ import annotations

import csv
import math
import shlex
from dataclasses import replace
from pathlib import Path

from covid_tune.core.units import duration
from covid_tune.core.space import FOCAL_PARAMS, PARAM_TYPES, Asha, Fixed, SearchSpace
from covid_tune.core.space_file import dump_space, load_space
from covid_tune.runs.reader import chooser, RunInfo, TrialRecord
from covid_tune.results.rows import (EXTRA_PARAMS, Row, TableSpec, extra_params, frozen_name,
                                     loss_name, reporting_splits)

SPLIT_COLUMNS = {
    "train": "Training Set Accuracy/F1 Score",
    "selection": "Selection Set Accuracy/F1 Score",
    "validation": "Validation Set Accuracy/F1 Score",
    "test": "Testing Set Accuracy/F1 Score",
}


def cell(spec: TableSpec, scores: dict | None) -> str:
    """``89/0.907`` (Part 1) or ``92/92`` (Part 2), as the assignment wrote them."""
    if not scores or math.isnan(scores.get("accuracy", math.nan)):
        return "n/a"
    accuracy, f1 = 100 * scores["accuracy"], scores["f1"]
    return f"{accuracy:.0f}/{100 * f1:.0f}" if spec.f1_percent else f"{accuracy:.0f}/{f1:.3f}"


ROC_OF = {"binary": "infected", "multilabel": "every label bit pooled"}
"""What each task's ROC chart plots."""


def auroc_cell(scores: dict | None) -> str:
    """``0.912 [0.881, 0.940]`` (with the 95% interval when re-scored), or ``n/a`` when
    the split was not scored or AUROC is undefined."""
    value = (scores or {}).get("auroc", math.nan)
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}{interval_text(scores, 'auroc')}"


def interval_text(scores: dict | None, metric: str) -> str:
    """`` [low, high]``, or nothing when there is no interval."""
    low, high = (scores or {}).get("ci", {}).get(metric, (math.nan, math.nan))
    return "" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]"


def thresholds_text(record: TrialRecord) -> str:
    """``covid 0.31, normal 0.62`` (tuned), or ``0.5 (not tuned)``."""
    if not record.thresholds:
        return "0.5 (not tuned)"
    untuned = set(record.threshold_rule.get("untuned") or ())
    degenerate = record.threshold_rule.get("degenerate") or {}
    return ", ".join(f"{label} {value:.2f}" + (" (untuned)" if label in untuned else "")
                     + (f" (**{degenerate[label]}**)" if label in degenerate else "")
                     for label, value in record.thresholds.items())


def calibration_cell(scores: dict | None) -> str:
    """``ECE 0.121 → 0.043 [0.031, 0.060], Brier 0.105 → 0.098``: before and after the
    temperatures, with the interval of the scaled ECE where there is one."""
    if not scores or "calibration" not in scores:
        return "n/a"
    before, after = scores["calibration"], scores["calibrated"]
    return (f"ECE {before['ece']:.3f} → {after['ece']:.3f}{interval_text(scores, 'ece')}, "
            f"Brier {before['brier']:.3f} → {after['brier']:.3f}")


def rule_text(rule: dict) -> str:
    """``f1`` or ``sensitivity >= 0.95``, the way a threshold was tuned."""
    if not rule:
        return "none (0.5)"
    name = rule.get("rule", "?")
    return f"{name} >= {rule['target']:g}" if rule.get("target") is not None else name


def cam_file(task: str) -> str:
    return f"cam-{task}.png"


def roc_file(task: str) -> str:
    return f"roc-{task}.png"


def reliability_file(task: str) -> str:
    return f"reliability-{task}.png"


def source(record: TrialRecord) -> str:
    kind = "hand grid" if record.hand_grid else "searched"
    return f"{kind}, earlier run" if record.earlier else kind


def format_value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def confusion_file(task: str, index: int) -> str:
    return f"confusion-{task}-{index + 1}.png"


def chart_file(task: str) -> str:
    return f"comparison-{task}.png"


def display_row(spec: TableSpec, row: Row) -> dict:
    """The markdown row: the assignment's columns, then the rest."""
    record = row.record
    reporting = [s for s in reporting_splits(spec, row.run) if s in spec.splits]
    judged = reporting[-1] if reporting else None
    shown = {
        "Backbone": row.backbone,
        spec.group_column: row.group,
        "Epochs": record.epoch,
        "Training Time": duration(record.seconds),
        **{SPLIT_COLUMNS[s]: cell(spec, row.scores.get(s)) for s in spec.splits},
        f"F1 95% CI ({'/'.join(reporting) or 'no reporting split'})": " / ".join(
            interval_text(row.scores.get(s), "f1").strip() or "n/a" for s in reporting),
        f"AUROC ({'/'.join(spec.splits)})": " / ".join(
            auroc_cell(row.scores.get(s)) for s in spec.splits),
        f"Calibration ({judged or 'n/a'})": calibration_cell(row.scores.get(judged)),
        "Thresholds": thresholds_text(record),
        f"At 0.5 ({'/'.join(spec.splits)})": " / ".join(
            cell(spec, (row.scores.get(s) or {}).get("at_0.5")) for s in spec.splits),
    }
    shown.update({k: format_value(v) for k, v in extra_params(record.config).items()})
    shown.update(external_columns(spec, row))
    shown.update({"Source": source(record), "Trial": f"{record.run}/{record.trial_id}",
                  "Reproduce": f"`{row.reproduce}`"})
    return shown


def table_record(spec: TableSpec, row: Row, index: int) -> dict:
    """A row for the CSV/parquet files: the displayed columns plus plain numbers."""
    record = row.record
    plain = {"task": record.task, "Backbone": row.backbone,
             "Frozen Layers": frozen_name(record.config),
             "Loss Function": loss_name(record.config),
             "Epochs": record.epoch, "Training Time": duration(record.seconds),
             "training_seconds": record.seconds}
    for split in SPLIT_COLUMNS:
        scores = row.scores.get(split) if split in spec.splits else None
        plain[SPLIT_COLUMNS[split]] = cell(spec, scores) if scores else None
        plain[f"{split}_accuracy"] = float(scores["accuracy"]) if scores else None
        plain[f"{split}_f1"] = float(scores["f1"]) if scores else None
        for name in ("auroc", "ap"):
            plain[f"{split}_{name}"] = float(scores.get(name, math.nan)) if scores else None
        for name in ("ece", "brier"):
            before = (scores or {}).get("calibration", {}).get(name)
            after = (scores or {}).get("calibrated", {}).get(name)
            plain[f"{split}_{name}"], plain[f"{split}_{name}_scaled"] = before, after
        for name in ("accuracy", "f1", "auroc", "ece", "brier"):
            low, high = (scores or {}).get("ci", {}).get(name, (None, None))
            plain[f"{split}_{name}_ci_low"], plain[f"{split}_{name}_ci_high"] = low, high
        half = (scores or {}).get("at_0.5") or {}
        for name in ("accuracy", "f1"):
            plain[f"{split}_{name}_at_0_5"] = float(half[name]) if name in half else None
    plain.update(external_record(row))
    unused = FOCAL_PARAMS if record.config["loss"] != "focal" else ()
    plain.update({k: None if k in unused else record.config.get(k) for k in EXTRA_PARAMS})
    plain.update({
        "metric": row.run.metric, "metric_value": record.score(row.run.metric),
        "selected_on": chooser(row.run), "thresholds": thresholds_text(record),
        "threshold_rule": rule_text(record.threshold_rule),
        "degenerate_thresholds": ", ".join(f"{label} {what}" for label, what in
                                           (record.threshold_rule.get("degenerate") or {}).items()),
        "temperatures": ", ".join(f"{label} {t:.3g}" for label, t in record.temperatures.items()),
        "source": source(record), "run": record.run, "trial_id": record.trial_id,
        "checkpoint": str(record.checkpoint), "scores": "recorded" if row.recorded else
        "re-scored", "confusion_png": confusion_file(record.task, index),
        "reproduce": row.reproduce})
    return plain


def external_columns(spec: TableSpec, row: Row) -> dict:
    """``External NAME Acc/F1`` and ``External NAME AUROC [CI]`` for each external
    collection the row was scored on (``--external``), every labelled image pooled."""
    shown = {}
    for name, external in row.external.items():
        shown[f"External {name} Acc/F1"] = cell(spec, external["scores"])
        shown[f"External {name} AUROC [CI]"] = auroc_cell(external["scores"])
    return shown


def external_record(row: Row) -> dict:
    """The external scores as plain numbers for the CSV/parquet row:
    ``external_<name>_<metric>`` (with ``_ci_low``/``_ci_high``, ``_at_0_5`` and the
    calibration before and after the temperatures)."""
    plain = {}
    for name, external in row.external.items():
        scores, key = external["scores"], f"external_{name}"
        plain[f"{key}_images"] = scores["images"]
        for metric in ("accuracy", "f1", "auroc", "ap"):
            plain[f"{key}_{metric}"] = float(scores.get(metric, math.nan))
        for metric in ("accuracy", "f1", "auroc"):
            low, high = scores.get("ci", {}).get(metric, (None, None))
            plain[f"{key}_{metric}_ci_low"], plain[f"{key}_{metric}_ci_high"] = low, high
        for metric in ("accuracy", "f1"):
            plain[f"{key}_{metric}_at_0_5"] = float(scores["at_0.5"][metric])
        for metric in ("ece", "brier"):
            plain[f"{key}_{metric}"] = scores["calibration"][metric]
            plain[f"{key}_{metric}_scaled"] = scores["calibrated"][metric]
    return plain


def write_tables(rows: list[dict], folder: Path) -> None:
    """``leaderboard.csv`` and ``leaderboard.parquet`` from plain rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    pq.write_table(table, folder / "leaderboard.parquet")


def markdown_table(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|")
                                        for c in columns) + " |")
    return lines


def task_section(spec: TableSpec, runs: list[RunInfo], rows: list[Row],
                 importances: dict[str, tuple[dict, str]], notes: list[str],
                 cam_row: Row | None = None) -> str:
    """One task's section: the table, pictures (with the Grad-CAM overlays of
    ``cam_row``, the best row, when they were drawn), hand grid vs search,
    importances, notes."""
    metric = runs[0].metric
    lines = [f"## {spec.title}", "",
             f"Runs: {', '.join(f'`{r.name}` ({r.summary()})' for r in runs)}. "
             f"Each row is its group's best checkpoint by `{metric}` (best epoch), "
             f"re-scored on {', '.join(spec.splits)}. {spec.headline} "
             f"Epochs and Training Time are those of that checkpoint.", "",
             *[selection_text(spec, run) for run in runs], ""]
    lines += markdown_table([display_row(spec, row) for row in rows])
    links = ", ".join(f"[{r.backbone}, {r.group}]({confusion_file(r.record.task, i)})"
                      for i, r in enumerate(rows))
    lines += ["", f"Confusion matrices ({spec.chart_split}): {links}", "",
              f"![Accuracy and F1 per row]({chart_file(rows[0].record.task)})", "",
              f"![ROC curves, {spec.chart_split}]({roc_file(rows[0].record.task)})", "",
              f"![Reliability of the best row]({reliability_file(rows[0].record.task)})", "",
              *([f"![Grad-CAM of the best row, {cam_row.backbone}, {cam_row.group}]"
                 f"({cam_file(cam_row.record.task)})", ""] if cam_row else []),
              INTERVALS_TEXT, "", CALIBRATION_TEXT, ""]
    lines += hand_grid_section(spec, rows, metric)
    for run in runs:
        lines += importance_section(run.name, *importances[run.name])
    if notes:
        lines += ["### Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines) + "\n"


INTERVALS_TEXT = (
    "Intervals are 95% percentile bootstrap intervals, on the splits that only report: "
    "1000 resamples of the split's images (of its patients, when the data has patient "
    "keys) drawn with replacement, seeded (the same files give the same intervals). None "
    "is given on train or the choosing split, where a score is not an estimate of how the "
    "model does on new images, nor where a label has fewer than 10 positive or negative "
    "images (see Notes).")
CALIBRATION_TEXT = (
    "Calibration: ECE (15 equal-width probability bins; the mean gap between predicted "
    "probability and observed frequency, per label then averaged) and the Brier score "
    "(mean squared error of the probabilities), before → after each label's temperature, "
    "fitted on the choosing split and applied by `predict`. Lower is better for both; "
    "the temperature changes no decision and no AUROC.")


def selection_text(spec: TableSpec, run: RunInfo) -> str:
    """Which split chose the run's rows, and which splits only report."""
    chose = chooser(run)
    space = run.space
    if run.selection:
        where = (f"**selection**, {len(run.selection)} images "
                 f"({space.selection.holdout:.0%} of Train, seeded and stratified by label "
                 f"combination, never trained on)")
    else:
        where = "**validation**"
    reporting = [s for s in spec.splits if s not in ("train", chose)]
    report = (f"Reported only: {', '.join(reporting)}; "
              f"{'it' if len(reporting) == 1 else 'they'} chose nothing, so "
              f"{'its' if len(reporting) == 1 else 'their'} scores carry no winner's curse."
              if reporting else "No split only reports: every score below was also used "
                                "to choose, so it is optimistic.")
    return (f"- `{run.name}` chose on {where}: ASHA's rungs, TPE, each trial's best epoch, "
            f"each group's best trial and the thresholds (rule `{rule_text(run_rule(run))}`) "
            f"all used `{run.metric}` there, scored at the thresholds tuned there each "
            f"epoch: the rows are chosen by the figure the table reports. {report} "
            f"Accuracy/F1 cells apply each checkpoint's thresholds (column Thresholds); "
            f"\"At 0.5\" shows them at 0.5.")


def run_rule(run: RunInfo) -> dict:
    """The run's threshold rule, as its space says."""
    return {"rule": run.space.threshold.rule, "target": run.space.threshold.target}


def hand_grid_section(spec: TableSpec, rows: list[Row], metric: str) -> list[str]:
    """Each group's best hand-grid trial beside its best searched trial, both chosen by
    ``metric`` and compared on a split that chose neither, with intervals: on the
    choosing split the best of ~20 searched trials beats the best of 1-2 hand-picked
    ones by the winner's curse alone."""
    table = []
    for row in rows:
        found = row.hand_grid
        split = found.get("split")
        table.append({"Backbone": row.backbone, spec.group_column: row.group,
                      "Compared on": split or "—",
                      "Hand grid": compared_text(spec, found.get("hand grid"), split),
                      "Best searched": compared_text(spec, found.get("searched"), split),
                      f"By `{metric}` (choosing split)": " vs ".join(
                          best_text(row.best_of(hand), metric) for hand in (True, False)),
                      "Trials": len(row.trials)})
    return ["### Hand grid (start_with) beside the search", "",
            "Each group's best hand-picked and best searched trial, chosen on the choosing "
            "split and compared on a split that only reports, with 95% intervals. Where the "
            "intervals overlap, the search has not shown it is better.", "",
            *markdown_table(table), ""]


def compared_text(spec: TableSpec, found: tuple | None, split: str | None) -> str:
    """``89/0.907, F1 [0.85, 0.95], AUROC 0.93 [0.90, 0.96]`` of one trial on ``split``."""
    if not found or found[1] is None:
        return "—"
    record, scores = found
    return (f"{cell(spec, scores)}, F1{interval_text(scores, 'f1') or ' (no interval)'}, "
            f"AUROC {auroc_cell(scores)} (`{record.trial_id}`)")


def best_text(trial: TrialRecord | None, metric: str) -> str:
    if trial is None:
        return "—"
    return f"{trial.score(metric):.3f} (`{trial.trial_id}`, epoch {trial.epoch})"


def importance_section(name: str, importances: dict[str, float], note: str) -> list[str]:
    lines = [f"### Hyperparameter importances (Optuna, `{name}`)", ""]
    if importances:
        rows = [{"Hyperparameter": optuna_label(k), "Importance": f"{v:.3f}"}
                for k, v in importances.items()]
        lines += markdown_table(rows) + [""]
    if note:
        lines += [note, ""]
    return lines


def optuna_label(name: str) -> str:
    """``frozen_layers_vgg16`` -> ``frozen_layers (vgg16)``."""
    head, _, backbone = name.rpartition("_")
    return f"{head} ({backbone})" if head == "frozen_layers" else name


def reproduce_command(row: Row, folder: Path, data: str, stage: Path | None = None) -> str:
    """``covid-tune sweep`` over a one-point space file written for this row, under
    ``folder`` (written into ``stage`` if given, a folder that becomes ``folder``)."""
    record = row.record
    name = Path("reproduce") / f"{record.run}-{record.trial_id}.yaml"
    space_file = folder / name
    write_reproduce_space(row, (stage or folder) / name)
    opts = row.run.record.options
    return (f"covid-tune sweep --space {shlex.quote(str(space_file))} --data "
            f"{shlex.quote(data)} --name reproduce-{record.trial_id} --seed {opts.seed} "
            f"--cpus-per-trial {opts.cpus_per_trial:g}")


def reproduce_space(row: Row) -> SearchSpace:
    """The run's space with every hyperparameter fixed to the row's trial, for its epochs."""
    config = row.record.config
    focal = config["loss"] == "focal"
    params = {k: Fixed(config[k]) for k in PARAM_TYPES
              if k != "frozen_layers" and (focal or k not in FOCAL_PARAMS)}
    params["frozen_layers"] = {config["backbone"]: Fixed(config["frozen_layers"])}
    epochs = row.record.epoch
    return replace(row.run.space, max_epochs=epochs, num_samples=1, params=params,
                   asha=Asha(grace_period=epochs, reduction_factor=2), start_with=(),
                   trial_seed=config.get("seed", 0))


def write_reproduce_space(row: Row, path: Path) -> None:
    header = (f"Trains trial {row.record.trial_id} of run {row.record.run} again: its "
              f"hyperparameters, for the {row.record.epoch} epoch(s) of its leaderboard row.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_space(reproduce_space(row), header))
    load_space(path)  # a bug here, not the user's, if this fails


# --- the Pareto section (objectives: deploy costs) ----------------------------------------

def pareto_file(task: str) -> str:
    return f"pareto-{task}.png"


def pareto_table_file(task: str) -> str:
    return f"pareto-{task}.csv"


def pareto_record(record: TrialRecord, metric: str, costs: dict[str, float | None],
                  fronts: dict[str, list[str]]) -> dict:
    """A trial's row of the Pareto table, plain values: who it is, its metric at its
    best epoch, its costs and whether it is on each cost's front."""
    key = f"{record.run}/{record.trial_id}"
    return {"Trial": key, "Backbone": record.config["backbone"].upper(),
            "Frozen Layers": frozen_name(record.config), "lr": record.config.get("lr"),
            "Loss Function": loss_name(record.config), "Epoch": record.epoch,
            metric: record.score(metric), **costs,
            **{f"On front ({cost})": key in keys for cost, keys in fronts.items()}}


def write_pareto_table(rows: list[dict], path: Path) -> None:
    """``pareto-<task>.csv``: the Pareto table's plain values."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pareto_cell(value) -> str:
    """A Pareto table cell: ``yes``/blank for front membership, ``n/a`` for a missing
    or NaN number, else the number (parameters in full)."""
    if isinstance(value, bool):
        return "yes" if value else ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.0f}" if isinstance(value, float) and value >= 1e4 else format_value(value)


def pareto_section(task: str, metric: str, mode: str, rows: list[dict],
                   picks: list[str]) -> list[str]:
    """The task's "Pareto front" section: what the front is, the table of every trial
    (its best epoch), the chart and which trial each ``export --pick`` rule takes."""
    direction = "higher" if mode == "max" else "lower"
    return ["### Pareto front: metric against deploy cost", "",
            (f"Every trial at its best epoch by `{metric}` ({direction} is better) against "
             f"the deploy costs its space's `objectives` named (lower is better). A trial "
             f"is on the front when no other trial is at least as good on both and better "
             f"on one; trials without a cost are on no front (docs/pareto.md)."), "",
            *markdown_table([{k: pareto_cell(v) for k, v in row.items()} for row in rows]),
            "", f"![{metric} against deploy cost]({pareto_file(task)})", "",
            f"Table as CSV: [{pareto_table_file(task)}]({pareto_table_file(task)}).", "",
            *[f"- {line}" for line in picks], ""]
