"""The assignment's tables, filled from sweeps: one row per group, its best checkpoint.

``write_leaderboard`` reads the runs (``covid_tune.runs.record``), picks each group's best
checkpoint (``covid_tune.results.rows``), re-scores it with the deterministic evaluation
transform on the run's own dataset, checked against the run's manifest, with its
selection split held out of Train as the sweep held it (``covid_tune.nn.weights``, ``covid_tune.nn.logits``), at
the checkpoint's tuned thresholds and at 0.5, with 95% bootstrap intervals
(``covid_tune.core.metrics``), and
writes ``leaderboard.md``, ``.csv`` and ``.parquet`` (``covid_tune.results.render``), a
confusion-matrix PNG per row, a comparison chart and an ROC chart per task
(``covid_tune.core.plots``), Grad-CAM overlays of a few images for each task's best row
(``covid_tune.bundle.cam``), Optuna's hyperparameter importances and, under ``reproduce/``,
a search-space file per row that trains that row again.

Nothing here imports Ray or the training code.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from covid_tune.core.space import SPLIT_PREFIXES
from covid_tune.data.dataset import (DataBundle, check_memory, load_dataset, patient_groups,
                                     patient_map, with_selection)
from covid_tune.errors import UserError
from covid_tune.core.metrics import scorecard
from covid_tune.core.plots import (write_chart, write_confusion, write_pareto, write_reliability,
                                   write_roc)
from covid_tune.bundle.cam import explain, grad_cam, write_overlays
from covid_tune.bundle.pick import (cost_value, front_keys, metric_interval, pick_record,
                                    trial_costs, trial_key)
from covid_tune.core.ranking import rank_key
from covid_tune.results.render import (ROC_OF, cam_file, chart_file, confusion_file,
                                      pareto_file, pareto_record, pareto_section,
                                      pareto_table_file, reliability_file, reproduce_command,
                                      roc_file, table_record, task_section, write_pareto_table,
                                      write_tables)
from covid_tune.runs.folder import STUDY_FILE
from covid_tune.runs.reader import (DataChoice, RunInfo, TrialRecord, best_overall,
                                    choose_datasets, chooser, read_run)
from covid_tune.results.rows import (TABLES, Row, TableSpec, pick_rows, reporting_splits,
                                     scored_splits, table_spec)
from covid_tune.core.tasks import POSITIVE_CLASS, TASKS


def write_leaderboard(run_dirs: list[str], out: str | None = None,
                      data: list[str] | None = None, allow_changed_data: bool = False,
                      external: dict[str, str] | None = None) -> str:
    """Write the leaderboard files into ``out``; return the markdown (also printed).

    ``data`` is one dataset folder for every run, or one per run in order (moved copies
    of the datasets the runs recorded). The files are written into a new folder beside
    ``out`` and moved into it only when all are written: a full disk leaves the
    previous leaderboard as it was. ``external`` (name -> collection, ``--external``)
    adds columns scoring each row on another labelled collection (``score_external``)."""
    runs = mark_earlier([read_run(d) for d in run_dirs])
    choices = choose_datasets(runs, data or [], allow_changed_data)
    externals = read_externals(external or {}, runs)
    folder = Path(out).resolve() if out else default_folder(runs[0])
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    except OSError as exc:
        raise UserError(cannot_write(folder, exc)) from None
    try:
        text = write_files(runs, choices, folder, stage, externals)
        move_staged(stage, folder)
    except OSError as exc:
        raise UserError(cannot_write(folder, exc)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return text + f"\nWritten to {folder}/ (leaderboard.md, .csv, .parquet and PNGs)\n"


def mark_earlier(runs: list[RunInfo]) -> list[RunInfo]:
    """Mark the trials of runs another run here was warm-started from (``earlier``)."""
    sources = {str(Path(where).resolve()) if "://" not in where else where
               for run in runs for where in run.record.options.warm_start}
    for run in runs:
        if str(run.path) in sources:
            for trial in run.trials:
                trial.earlier = True
    return runs


def default_folder(run: RunInfo) -> Path:
    """``<run>/leaderboard`` for a run on this machine; ``./leaderboard-<run name>`` for
    one on object storage (the files are written here, where they are read)."""
    if run.folder.is_local:
        return run.folder.local("leaderboard")
    return Path(f"leaderboard-{run.name}").resolve()


def write_files(runs: list[RunInfo], choices: dict[str, DataChoice], folder: Path,
                stage: Path, externals: dict | None = None) -> str:
    """Every file of the leaderboard, written into ``stage``, naming ``folder`` where
    a file refers to another; the markdown."""
    sections, table_rows, bundles = [], [], {}
    for task in (t for t in TABLES if any(r.task == t for r in runs)):
        task_runs = [r for r in runs if r.task == task]
        spec = table_spec(task, task_runs)
        rows = pick_rows(spec, task_runs)
        score_rows(spec, rows, choices, bundles, externals or {})
        spec = scored_splits(spec, rows)
        for row in rows:
            data = choices[row.run.name].root or row.run.record.provenance.data
            row.reproduce = reproduce_command(row, folder, str(data), stage)
        best = best_row(rows, task_runs)
        drawn = write_pictures(spec, rows, best,
                               dataset_for(choices[best.run.name], best, bundles), stage)
        importances = {run.name: param_importances(run) for run in task_runs}
        notes = task_notes(task_runs, choices) + score_notes(spec, rows) + external_notes(rows)
        section = task_section(spec, task_runs, rows, importances, notes,
                               best if drawn else None)
        costs = trial_costs(task_runs)
        if costs:
            section += "\n".join(write_pareto_part(task_runs, costs, best.record, stage,
                                                   dataset_for(choices[best.run.name], best,
                                                               bundles))) + "\n"
        sections.append(section)
        table_rows += [table_record(spec, row, i) for i, row in enumerate(rows)]
    text = "# Leaderboard\n\n" + "\n".join(sections)
    (stage / "leaderboard.md").write_text(text)
    write_tables(table_rows, stage)
    return text


def score_rows(spec: TableSpec, rows: list[Row], choices: dict[str, DataChoice],
               bundles: dict, externals: dict) -> None:
    """Each row's scores on its run's splits, on the external collections, and its
    group's best hand-grid and searched trials on the reporting split."""
    for row in rows:
        bundle = dataset_for(choices[row.run.name], row, bundles)
        row.scores, row.recorded = score_row(spec, row, bundle), bundle is None
        row.external = score_external(row, externals)
        row.hand_grid = score_hand_grid(spec, row, bundle)


def write_pictures(spec: TableSpec, rows: list[Row], best: Row, bundle: DataBundle | None,
                   stage: Path) -> bool:
    """The task's PNGs: a confusion matrix per row, the comparison chart, the ROC
    curves, the best row's reliability diagram and Grad-CAM overlays; whether the
    overlays were drawn (not without data)."""
    task = best.record.task
    for index, row in enumerate(rows):
        write_confusion(row.scores.get(spec.chart_split, {}).get("confusion"),
                        f"{row.backbone}, {row.group} ({spec.chart_split})",
                        stage / confusion_file(task, index))
    labels = [f"{r.backbone}\n{r.group}" for r in rows]
    write_chart(labels, [r.scores for r in rows], spec.splits, stage / chart_file(task))
    write_roc(labels, [r.scores.get(spec.chart_split, {}).get("roc") for r in rows],
              f"ROC, {spec.chart_split} ({ROC_OF[task]})", stage / roc_file(task))
    write_reliability(reliability_curves(spec, best),
                      f"Reliability, {best.backbone}, {best.group} "
                      f"({reporting_split(spec, best) or 'not scored'})",
                      stage / reliability_file(task))
    return write_cams(spec, best, bundle, stage / cam_file(task))


def best_row(rows: list[Row], runs: list[RunInfo]) -> Row:
    """The row holding the task's best trial (by the first run's metric)."""
    _, record = best_overall(runs)
    return next(row for row in rows if row.record is record)


def write_pareto_part(runs: list[RunInfo], costs: tuple[str, ...], best: TrialRecord,
                      stage: Path, bundle: DataBundle | None) -> list[str]:
    """The task's Pareto section (``covid_tune.core.pareto``): every trial's metric and
    costs with the front marked, as markdown and ``pareto-<task>.csv``, the chart, and
    which trial each ``export --pick`` rule takes; its markdown lines."""
    metric, mode, task = runs[0].metric, runs[0].mode, runs[0].task
    trials = sorted((t for run in runs for t in run.trials),
                    key=lambda t: rank_key(t.score(metric), mode), reverse=True)
    fronts = front_keys(trials, metric, mode, costs)
    better = "higher" if mode == "max" else "lower"
    write_pareto(f"{metric} ({better} is better)", pareto_panels(trials, metric, fronts, best),
                 f"{metric} against deploy cost, {task} (every trial at its best epoch)",
                 stage / pareto_file(task))
    rows = [pareto_record(t, metric, {c: cost_value(t, c) for c in costs}, fronts)
            for t in trials]
    write_pareto_table(rows, stage / pareto_table_file(task))
    interval, note = metric_interval(best, bundle, metric)
    return pareto_section(task, metric, mode, rows, pick_texts(runs, costs[0], interval, note))


def pareto_panels(trials: list[TrialRecord], metric: str, fronts: dict[str, list[str]],
                  best: TrialRecord) -> dict[str, dict]:
    """Cost -> the chart's panel: every trial with the cost, the front, the best trial."""
    panels = {}
    for cost, keys in fronts.items():
        placed = {trial_key(t): (cost_value(t, cost), t.score(metric)) for t in trials
                  if cost_value(t, cost) is not None and not math.isnan(t.score(metric))}
        mark = placed.get(trial_key(best))
        panels[cost] = {"trials": list(placed.values()), "front": [placed[k] for k in keys],
                        "best": (*mark, f"best: {best.trial_id}") if mark else None}
    return panels


def pick_texts(runs: list[RunInfo], cost: str, interval: tuple | None, note: str) -> list[str]:
    """Which trial each ``export --pick`` rule takes on the front of ``cost``."""
    run, best = best_overall(runs)
    trials = [t for r in runs for t in r.trials]
    lines = [f"`--pick best` exports `{trial_key(best)}` (the best `{run.metric}`)."]
    if interval is None:
        lines.append(f"`--pick cheapest-within-interval`: no bootstrap interval of the best "
                     f"trial's `{run.metric}` ({note}).")
    else:
        chosen = pick_record(trials, run, "cheapest-within-interval", cost, interval)
        lines.append(f"`--pick cheapest-within-interval` exports `{trial_key(chosen)}`: the "
                     f"cheapest by `{cost}` within the best's 95% interval "
                     f"[{interval[0]:.4f}, {interval[1]:.4f}].")
    cheapest = pick_record(trials, run, "cheapest", cost, None)
    lines.append(f"`--pick cheapest` exports `{trial_key(cheapest)}` (the lowest `{cost}` "
                 f"on the front).")
    return lines


CAM_IMAGES = 4


def write_cams(spec: TableSpec, row: Row, bundle: DataBundle | None, path: Path) -> bool:
    """Grad-CAM overlays of a few images of the chart split (one of each label
    combination first) for the row's model, in one PNG; False when there is no data."""
    data = bundle.splits.get(spec.chart_split) if bundle is not None else None
    if data is None or not data.targets.size:
        return False
    from covid_tune.nn.weights import load_model
    from covid_tune.nn.logits import logits_and_features
    from covid_tune.nn.device import Device
    from covid_tune.nn.models import cam_spec

    model = load_model(row.record.local_checkpoint())
    picks = cam_picks(data.targets, CAM_IMAGES)
    logits, features = logits_and_features(model, data.images[picks], Device.pick())
    cam = cam_spec(model)
    weights = {k: v.numpy() for k, v in model.state_dict().items()
               if k.rsplit(".", 1)[0] in cam["head"]}
    task = TASKS[row.record.task]
    positive = None if task.multilabel else POSITIVE_CLASS
    threshold = row.record.threshold_logits.get(POSITIVE_CLASS, 0.0)
    items = []
    for k, index in enumerate(picks):
        direction, title = explain(logits[k], list(task.label_names), positive, threshold)
        heat = grad_cam(features[k], weights, cam, direction)
        items.append((data.images[index], heat, f"{data.names[index]}\n{title}"))
    write_overlays(items, path, f"Grad-CAM of the best row: {row.backbone}, {row.group} "
                                f"({spec.chart_split})")
    return True


def cam_picks(targets, count: int) -> list[int]:
    """Up to ``count`` image indices: the first of each label combination, then the
    next ones in order."""
    rows = targets.reshape(len(targets), -1)
    firsts = sorted({tuple(r): i for i, r in reversed(list(enumerate(rows.tolist())))}.values())
    rest = [i for i in range(len(rows)) if i not in firsts]
    return (firsts + rest)[:count]


def move_staged(stage: Path, folder: Path) -> None:
    """Move every file of ``stage`` to the same place under ``folder`` (renames on one
    file system: no space needed, each file replaced whole)."""
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = folder / path.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def cannot_write(folder: Path, exc: OSError) -> str:
    where = f" ({Path(exc.filename).name})" if getattr(exc, "filename", None) else ""
    return (f"{folder}: cannot write the leaderboard{where}: "
            f"{exc.strerror or str(exc).splitlines()[0]}; the files already there are "
            f"unchanged; free space (or fix the permissions) and run it again")


def dataset_for(choice: DataChoice, row: Row, cache: dict) -> DataBundle | None:
    """The dataset at the row's image size, with the run's selection split held out of
    Train (decoded once per folder and size)."""
    if choice.layout is None:
        return None
    key = (str(choice.root), row.record.config["image_size"])
    if key not in cache:
        check_memory(choice.layout, key[1], copies=1,
                     fix="free memory, or run the leaderboard on a machine with more")
        cache[key] = load_dataset(choice.layout, row.run.task,
                                  row.record.config["image_size"], progress=False)
        cache[key].groups = patient_map(choice.layout)
    if (*key, row.run.name) not in cache:
        cache[(*key, row.run.name)] = with_selection(cache[key], row.run.selection)
    return cache[(*key, row.run.name)]


def score_row(spec: TableSpec, row: Row, bundle: DataBundle | None) -> dict[str, dict]:
    """Metrics per split (``covid_tune.core.metrics.scorecard``): re-scored at the
    checkpoint's tuned thresholds and temperatures (``at_0.5`` beside them) when the
    data is there, with intervals on the splits that only report; else as the trial
    recorded them (``at_0.5`` then holds the recorded values too)."""
    record = row.record
    if bundle is None:
        recorded = {split: {k: record.metrics.get(f"{SPLIT_PREFIXES[split]}_{k}", math.nan)
                            for k in ("accuracy", "f1", "auroc", "ap")}
                    for split in spec.splits if split != "test"}
        return {split: {**scores, "at_0.5": dict(scores)} for split, scores in recorded.items()
                if f"{SPLIT_PREFIXES[split]}_f1" in record.metrics}
    reporting = reporting_splits(spec, row.run)
    return score_trial(record, bundle, spec.splits, reporting)


def score_trial(record: TrialRecord, bundle: DataBundle, splits, reporting) -> dict[str, dict]:
    """``scorecard`` of a trial's checkpoint on each labelled split of ``splits`` in
    ``bundle``; intervals only on the ``reporting`` ones."""
    from covid_tune.nn.device import Device
    from covid_tune.nn.logits import predict_logits
    from covid_tune.nn.weights import load_model

    device = Device.pick()
    model = load_model(record.local_checkpoint()).to(device.torch)
    task, scores = TASKS[record.task], {}
    for split in splits:
        data = bundle.splits.get(split)
        if data is not None and data.targets.size:
            logits = predict_logits(model, data.images, 128, device)
            scores[split] = scorecard(task, data.targets, logits, record.threshold_logits,
                                      record.temperatures, groups=patient_groups(bundle, split),
                                      intervals=split in reporting)
    return scores


def reporting_split(spec: TableSpec, row: Row) -> str | None:
    """The split a row is judged on: test where scored, else the last split that only
    reports; None when every scored split also trained or chose."""
    reporting = [s for s in reporting_splits(spec, row.run) if s in row.scores]
    return reporting[-1] if reporting else None


def reliability_curves(spec: TableSpec, row: Row) -> dict[str, list]:
    """The best row's reliability on its reporting split, before and after its
    temperatures."""
    split = reporting_split(spec, row)
    scores = row.scores.get(split) or {}
    if "reliability" not in scores:
        return {}
    return {"as trained": scores["reliability_raw"], "temperature-scaled": scores["reliability"]}


def score_hand_grid(spec: TableSpec, row: Row, bundle: DataBundle | None) -> dict:
    """The group's best hand-grid and best searched trial (by the run's metric), each
    scored on the row's reporting split with intervals: ``{"split": ..., "hand grid":
    (record, scores), "searched": (record, scores)}``; empty without data or a
    reporting split."""
    split = reporting_split(spec, row)
    if bundle is None or split is None:
        return {}
    found = {"split": split}
    for name, hand in (("hand grid", True), ("searched", False)):
        record = row.best_of(hand)
        if record is None:
            continue
        scores = (row.scores if record is row.record
                  else score_trial(record, bundle, (split,), (split,)))
        found[name] = (record, scores.get(split))
    return found


def score_notes(spec: TableSpec, rows: list[Row]) -> list[str]:
    """What the scoring left out, per row and split (intervals, macro AUROC), and the
    thresholds that call a whole label positive or negative on the choosing split."""
    notes = []
    for row in rows:
        name = f"{row.backbone}, {row.group}"
        for split in spec.splits:
            for note in (row.scores.get(split) or {}).get("notes", []):
                notes.append(f"{name}, {split}: {note}.")
        rule = row.record.threshold_rule
        for label, what in (rule.get("degenerate") or {}).items():
            notes.append(f"{name}: **the threshold of {label} calls every image "
                         f"{what.removeprefix('all ')} on {rule.get('split')}**; it says "
                         f"nothing about the image (use another threshold rule, or more "
                         f"images to choose with).")
    return notes


def task_notes(runs: list[RunInfo], choices: dict[str, DataChoice]) -> list[str]:
    """What a reader should know: skipped trials, the datasets used, mixed metrics."""
    notes = [f"`{run.name}`: {note}" for run in runs for note in run.notes]
    notes += [f"`{run.name}`: {note}" for run in runs for note in choices[run.name].notes]
    metrics = {run.metric for run in runs}
    if len(metrics) > 1:
        notes.append(f"The runs use different metrics ({', '.join(sorted(metrics))}); "
                     f"rows are chosen by the first run's `{runs[0].metric}`.")
    return notes


def param_importances(run: RunInfo) -> tuple[dict[str, float], str]:
    """Optuna's importances for the run's study, or a note saying why there are none."""
    import optuna

    if not run.folder.exists(STUDY_FILE):
        return {}, f"No Optuna study found ({STUDY_FILE} is missing)."
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with run.folder.local_file(STUDY_FILE) as study_file:  # a copy, for object storage
            return study_importances(optuna, study_file, run)
    finally:
        optuna.logging.set_verbosity(level)


def study_importances(optuna, study_file: Path, run: RunInfo) -> tuple[dict[str, float], str]:
    """``param_importances`` on a local copy of the study file."""
    try:
        study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{study_file}")
        complete = study.get_trials(deepcopy=False,
                                    states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as exc:  # a damaged SQLite file fails in SQLAlchemy's many ways
        return {}, f"The Optuna study {STUDY_FILE} cannot be read ({type(exc).__name__})."
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


# --- external collections (--external NAME=DIR) -----------------------------------------

class External:
    """A labelled collection scored beside the run's own splits, decoded once per image
    size (``covid_tune.bundle.evaluate`` reads it as ``covid-tune evaluate`` does)."""

    def __init__(self, path: str, collection):
        self.path, self.collection, self.decoded = path, collection, {}

    def images(self, size: int) -> dict:
        if size not in self.decoded:
            from covid_tune.bundle.evaluate import decode_collection

            self.decoded[size] = decode_collection(self.collection, size)
        return self.decoded[size]


def read_externals(external: dict[str, str], runs: list[RunInfo]) -> dict[str, External]:
    """Each collection read (not yet decoded) for the task of its layout, before any
    work: UserError when it is missing, unreadable, or of a task no run has."""
    from covid_tune.bundle.evaluate import collection_task, read_collection

    tasks = sorted({run.task for run in runs})
    found = {}
    for name, path in external.items():
        task = collection_task(Path(path))
        if task not in tasks:
            raise UserError(f"--external {name}={path}: a {task} collection, but the runs "
                            f"are {', '.join(tasks)}; pass a collection of their task")
        found[name] = External(path, read_collection(Path(path), TASKS[task]))
    return found


def score_external(row: Row, externals: dict[str, External]) -> dict[str, dict]:
    """Name -> the row's checkpoint scored on each external collection of its task, every
    labelled image pooled (``score_collection``'s headline): ``{"path", "layout",
    "split", "scores", "sources"}``. Run with torch, as ``score_trial``."""
    wanted = {n: e for n, e in externals.items()
              if e.collection.layout.task.name == row.record.task}
    if not wanted:
        return {}
    from covid_tune.bundle.evaluate import headline, score_collection
    from covid_tune.nn.device import Device
    from covid_tune.nn.logits import predict_logits
    from covid_tune.nn.weights import load_model

    record, device = row.record, Device.pick()
    model = load_model(record.local_checkpoint()).to(device.torch)
    found = {}
    for name, external in wanted.items():
        images = external.images(int(record.config["image_size"]))
        logits = {split: predict_logits(model, part.pixels, 128, device)
                  for split, part in images.items()}
        split, scores, sources = headline(score_collection(
            TASKS[record.task], images, logits, record.threshold_logits, record.temperatures))
        found[name] = {"path": external.path, "layout": external.collection.layout.kind.title,
                       "split": split, "scores": scores, "sources": sources,
                       "own": same_folder(external.path, row.run.record.provenance.data)}
    return found


def same_folder(path: str, other: str | None) -> bool:
    """Whether two local paths name the same folder or file (a run's own dataset)."""
    try:
        return bool(other) and "://" not in str(other) and \
            Path(path).resolve() == Path(str(other)).resolve()
    except OSError:
        return False


def external_notes(rows: list[Row]) -> list[str]:
    """What each external column holds, then each row's figures per source and what
    the scoring left out."""
    from covid_tune.results.render import auroc_cell

    notes = []
    for name, ext in (rows[0].external if rows else {}).items():
        own = sorted({row.run.name for row in rows if row.external[name]["own"]})
        seen = (f"**it is the dataset run(s) {', '.join(own)} trained and chose on**, so "
                f"these are not external figures" if own else
                "the model saw none of them, so the drop from the row's test (or "
                "validation) figures is what a new site would see")
        notes.append(f"External `{name}`: `{ext['path']}` ({ext['layout']}), "
                     f"{ext['scores']['images']} labelled images (split `{ext['split']}`), "
                     f"scored with each row's checkpoint at its thresholds; {seen}.")
    for row in rows:
        for name, ext in row.external.items():
            label = f"{row.backbone}, {row.group}, external `{name}`"
            notes += [f"{label}: {note}." for note in ext["scores"].get("notes", [])]
            notes += [f"{label}, source `{source}`: {s['images']} images, accuracy "
                      f"{s['accuracy']:.3f}, F1 {s['f1']:.3f}, AUROC {auroc_cell(s)}."
                      for source, s in ext["sources"].items()]
    return notes
