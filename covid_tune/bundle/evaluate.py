"""External validation: an exported model scored on another labelled collection, with
ONNX Runtime alone (no torch, no Ray).

``evaluate(model_dir, data, out)`` reads the bundle's ``model.json``
(``covid_tune.bundle.format``), reads ``data`` as every dataset is read
(``covid_tune.data.dataset.scan``: any folder layout covid-tune knows, or a CSV
manifest) for the card's task, decodes each image as training did, runs ``model.onnx``
on it (``covid_tune.bundle.predict``'s session and batches) and scores the labelled
images with ``covid_tune.core.metrics.scorecard`` at the card's thresholds and
temperatures: accuracy and F1 there and at 0.5, AUROC, AP (per label for Part 2), 95%
bootstrap intervals, ECE and Brier score before and after the temperatures.

Which images make a split (``read_collection``): a collection with split folders (or a
manifest with a split column) is scored per labelled split, and every labelled image
pooled as ``all``, the figure to quote: the model saw none of them. A collection
without split folders (or a manifest without a split column) is one split, ``all``.
Unlabelled splits (Part 2's ``Test``) are left out, and the report says so. A manifest's
``source`` column adds a row per source. The bootstrap draws whole patients where the
collection names them (a manifest's ``patient`` column, DICOM's ``PatientID``, the
layout's file-name rule, the grouping a drawn split made), else single images.

The leaderboard's ``--external`` columns (``covid_tune.results.leaderboard``) read and
score a collection with the same functions, running the row's checkpoint with torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_tune.bundle.format import CARD_FILE, read_card, temperatures, threshold_logits
from covid_tune.bundle.predict import BATCH, open_session, run_model
from covid_tune.core.metrics import scorecard
from covid_tune.core.space import DataSpec
from covid_tune.core.tasks import TASKS, Task
from covid_tune.data import csv_manifest
from covid_tune.data.dataset import ImageFileRef, Layout, decode_all, detect_layout, scan
from covid_tune.data.groups import patient_key
from covid_tune.data.preprocess import normalize
from covid_tune.errors import UserError

POOLED = "all"
"""Every labelled image of the collection: its only split when it has no split folders."""
NO_SOURCE = "(no source)"
REPORT_FILE, JSON_FILE = "evaluation.md", "evaluation.json"


@dataclass
class Collection:
    """A labelled collection as ``evaluate`` scores it."""

    name: str
    layout: Layout
    splits: dict[str, list[ImageFileRef]]
    """The labelled splits, in order; ``all`` alone for a collection without split folders."""
    unlabelled: list[str]
    """Splits left out: they have no labels."""


@dataclass
class Images:
    """One split of a collection, decoded: what a model is run on."""

    pixels: np.ndarray
    """uint8 (N, S, S)."""
    targets: np.ndarray
    """binary: (N,) class index; multilabel: (N, K) label bits, as training has them."""
    names: list[str]
    groups: list[str]
    """Each image's patient key (its own path when none is known)."""
    sources: list[str]
    skipped: list[tuple[str, str]]
    """(name, why) of the images that could not be decoded."""


def evaluate(model_dir: str, data: str, out: str | None = None,
             classes: list[str] | tuple[str, ...] = ()) -> str:
    """Score the bundle at ``model_dir`` on the collection ``data``; write
    ``evaluation.md`` and ``evaluation.json`` into ``out`` (default
    ``./evaluation-<collection name>``); a short summary."""
    folder = find_bundle(Path(model_dir))
    card = read_card(folder)
    task = TASKS[card["task"]]
    collection = read_collection(Path(data), task, class_spec(classes, task))
    session = open_session(folder / card["files"]["onnx"])
    images = decode_collection(collection, int(card["preprocessing"]["size"]))
    logits = {split: onnx_logits(session, card, part.pixels, folder)
              for split, part in images.items()}
    scores = score_collection(task, images, logits, threshold_logits(card), temperatures(card))
    report = build_report(folder, card, collection, images, scores, Path(data))
    target = Path(out) if out else Path(f"evaluation-{collection.name}").resolve()
    write_report(target, report)
    return summary(report, target)


def find_bundle(path: Path) -> Path:
    """The task folder of a bundle: ``path`` itself, or its only ``binary/`` or
    ``multilabel/`` (``covid-tune export``'s ``OUT``)."""
    if (path / CARD_FILE).is_file() or not path.is_dir():
        return path
    found = [path / task for task in TASKS if (path / task / CARD_FILE).is_file()]
    if len(found) > 1:
        raise UserError(f"{path}: holds a model of each task ({', '.join(p.name for p in found)}"
                        f"); pass one of {', '.join(str(p) for p in found)}")
    return found[0] if found else path


def class_spec(pairs: list[str] | tuple[str, ...], task: Task) -> DataSpec | None:
    """``--classes WORD=CLASS ...`` as a space's ``data: {classes: {...}}`` (``WORD=``:
    leave it out); None without any."""
    mapped: dict[str, str | None] = {}
    for pair in pairs:
        word, sep, cls = pair.partition("=")
        word, cls = word.strip().lower(), cls.strip()
        if not sep or not word:
            raise UserError(f"--classes {pair}: expected WORD=CLASS, e.g. pneumonia=infected "
                            f"(WORD= leaves that folder or label out)")
        if cls and cls not in task.targets:
            raise UserError(f"--classes {pair}: {cls!r} is not a {task.name} class; use one "
                            f"of: {', '.join(task.targets)}, or {word}= to leave it out")
        if word in mapped:
            raise UserError(f"--classes {pair}: {word} is mapped twice; keep one")
        mapped[word] = cls or None
    return DataSpec(classes=tuple(mapped.items())) if mapped else None


def read_collection(data: Path, task: Task, spec: DataSpec | None = None) -> Collection:
    """The labelled splits of ``data`` for ``task`` (see the module's docstring);
    UserError naming the path and the fix."""
    check_collection(data, task, spec)
    layout = scan(data, task.name, spec=spec)
    labelled = {s: refs for s, refs in layout.files.items()
                if refs and all(r.class_dir for r in refs)}
    unlabelled = [s for s in layout.files if s not in labelled]
    if layout.kind.made_splits:  # drawn by scan: one collection, scored whole
        pooled = [r for refs in labelled.values() for r in refs]
        labelled = {POOLED: sorted(pooled, key=lambda r: r.path)}
    name = data.resolve().name if data.is_dir() else data.resolve().parent.name
    return Collection(name, layout, labelled, unlabelled)


def check_collection(data: Path, task: Task, spec: DataSpec | None) -> None:
    """Refuse a collection of the other task, and a manifest whose split column lacks
    train or validation rows, each with how to fix it."""
    if not csv_manifest.is_manifest(data):
        found = collection_task(data)
        if found != task.name:
            raise UserError(f"{data}: a {found} collection, but the model is {task.name}; "
                            f"evaluate the {found} model (export's OUT/{found}) on it")
        return
    listing = csv_manifest.read(data)
    splits = {row.split for row in listing.rows}
    lacking = [s for s in ("train", "validation") if s not in splits]
    if listing.has_split and lacking:
        raise UserError(f"{data}: its split column has no {lacking[0]} rows, which "
                        f"covid-tune reads a split column with; leave the column out to "
                        f"score every row as one collection")
    found = csv_manifest.guess_task(listing)
    if found != task.name and spec is None:
        raise UserError(f"{data}: its labels are those of a {found} collection, but the "
                        f"model is {task.name}; map them with --classes WORD=CLASS, or "
                        f"evaluate the {found} model (export's OUT/{found})")


def collection_task(data: Path) -> str:
    """The task of a collection: its folder layout's, or the one its manifest's labels
    name (``guess_task``); UserError for a path that is neither."""
    if csv_manifest.is_manifest(data):
        return csv_manifest.guess_task(csv_manifest.read(data))
    if data.is_dir():
        return detect_layout(data).task
    what = "not a folder or a .csv manifest" if data.exists() else "no such folder or file"
    raise UserError(f"{data}: {what}; pass a labelled collection: a folder in a layout "
                    f"covid-tune reads, or a CSV manifest (path,labels[,...])")


def decode_collection(collection: Collection, size: int,
                      progress: bool = False) -> dict[str, Images]:
    """Each labelled split decoded at ``size`` px (``try_read``, as training did);
    unreadable images are skipped and listed. UserError when a split has none left."""
    layout, task = collection.layout, collection.layout.task
    decoded = {}
    for split, refs in collection.splits.items():
        results = decode_all([r.path for r in refs], size, f"decoding {split}", progress)
        names = [r.path.relative_to(layout.root).as_posix() for r in refs]
        kept = [k for k, (pixels, _, _) in enumerate(results) if pixels is not None]
        if not kept:
            raise UserError(f"{layout.root}: no image of the {split} split can be decoded; "
                            f"run covid-tune check on it")
        keys = group_keys(layout, refs, names)
        decoded[split] = Images(
            pixels=np.stack([results[k][0] for k in kept]),
            targets=targets_of(task, [refs[k] for k in kept]),
            names=[names[k] for k in kept], groups=[keys[k] for k in kept],
            sources=[refs[k].source or NO_SOURCE for k in kept],
            skipped=[(names[k], why) for k, (pixels, _, why) in enumerate(results)
                     if pixels is None])
    return decoded


def targets_of(task: Task, refs: list[ImageFileRef]) -> np.ndarray:
    """Class index (binary) or label bits (multilabel) of each image."""
    bits = np.stack([task.target_of(r.class_dir) for r in refs])
    return bits if task.multilabel else bits[:, 0].astype(np.int64)


def group_keys(layout: Layout, refs: list[ImageFileRef], names: list[str]) -> list[str]:
    """Each image's patient key: the grouping of a drawn split where ``scan`` made one,
    else its patient (manifest, DICOM) or the layout's file-name rule, else its path."""
    drawn = layout.grouping.groups if layout.grouping else {}
    rule = re.compile(layout.kind.patient_pattern) if layout.kind.patient_pattern else None
    listed = layout.listing is not None
    return [drawn.get(name) or patient_key(ref.patient, name, None, rule, listed)[0] or name
            for ref, name in zip(refs, names)]


def onnx_logits(session, card: dict, pixels: np.ndarray, folder: Path) -> np.ndarray:
    """(N, K) logits of ``model.onnx``, in batches, columns in the task's label order."""
    prep = card["preprocessing"]
    parts = [run_model(session, card, normalize(pixels[i:i + BATCH], prep["mean"], prep["std"]),
                       str(folder))[0] for i in range(0, len(pixels), BATCH)]
    order = card["output"].get("label_order") or card["output"]["class_order"]
    columns = [order.index(label) for label in TASKS[card["task"]].label_names]
    return np.concatenate(parts)[:, columns]


def pooled(images: dict[str, Images]) -> Images:
    """Every split's images as one."""
    parts = list(images.values())
    return Images(np.concatenate([p.pixels for p in parts]),
                  np.concatenate([p.targets for p in parts]),
                  [n for p in parts for n in p.names], [g for p in parts for g in p.groups],
                  [s for p in parts for s in p.sources], [s for p in parts for s in p.skipped])


def score_collection(task: Task, images: dict[str, Images], logits: dict[str, np.ndarray],
                     limits: dict[str, float], scale: dict[str, float]) -> dict:
    """``{"splits": {split: scorecard}, "sources": {split: {source: scorecard}}}`` of
    each split and, with two or more, of ``all``; bootstrap by patient where any
    patient has two images or more. Sources only when the collection names some."""
    parts = {split: (part, logits[split]) for split, part in images.items()}
    if len(parts) > 1:
        parts[POOLED] = (pooled(images), np.concatenate(list(logits.values())))
    result: dict = {"splits": {}, "sources": {}}
    for split, (part, values) in parts.items():
        result["splits"][split] = score_images(task, part, values, limits, scale)
        names = sorted(set(part.sources))
        if names != [NO_SOURCE]:
            result["sources"][split] = {
                name: score_images(task, part, values, limits, scale,
                                   np.asarray(part.sources) == name)
                for name in names}
    return result


def score_images(task: Task, part: Images, values: np.ndarray, limits: dict[str, float],
                 scale: dict[str, float], mask: np.ndarray | None = None) -> dict:
    """``scorecard`` of ``part`` (or of its images in ``mask``), with ``images`` and
    ``patients`` (None: the bootstrap drew images)."""
    keep = np.ones(len(values), bool) if mask is None else mask
    groups = [g for g, k in zip(part.groups, keep) if k]
    patients = len(set(groups)) if len(set(groups)) < len(groups) else None
    scores = scorecard(task, part.targets[keep], values[keep], limits, scale,
                       groups=groups if patients else None)
    return {"images": int(keep.sum()), "patients": patients, **scores}


def headline(scores: dict) -> tuple[str, dict, dict]:
    """(split, scorecard, per-source scorecards) of the pooled images of a
    ``score_collection`` result (its only split, if one): the external figure."""
    split = POOLED if POOLED in scores["splits"] else next(iter(scores["splits"]))
    return split, scores["splits"][split], scores["sources"].get(split, {})


# --- the report ---------------------------------------------------------------------------

def build_report(folder: Path, card: dict, collection: Collection, images: dict[str, Images],
                 scores: dict, data: Path) -> dict:
    """Everything ``evaluation.json`` holds."""
    trained_on = card.get("source", {}).get("data")
    own = bool(trained_on) and Path(trained_on).resolve() == data.resolve()
    return {
        "model": {"folder": str(folder), "task": card["task"], "backbone": card.get("backbone"),
                  "thresholds": card["thresholds"], "threshold_logits": threshold_logits(card),
                  "temperatures": temperatures(card),
                  "threshold_rule": card.get("threshold_rule"),
                  "validation_metrics": card.get("validation_metrics", {}),
                  "source": {k: card.get("source", {}).get(k) for k in ("run", "trial_id", "data")}},
        "collection": {"path": str(data), "name": collection.name,
                       "layout": collection.layout.kind.title,
                       "classes": collection.layout.kind.mapping(),
                       "unlabelled_splits": collection.unlabelled,
                       "skipped": [list(s) for part in images.values() for s in part.skipped],
                       "trained_on": own},
        "splits": {s: without_curves(v) for s, v in scores["splits"].items()},
        "sources": {s: {name: without_curves(v) for name, v in by.items()}
                    for s, by in scores["sources"].items()},
    }


def without_curves(scores: dict) -> dict:
    """A scorecard without its ROC curve (as many points as images)."""
    return {k: v for k, v in scores.items() if k != "roc"}


def plain(value):
    """JSON-safe: NaN as null, tuples as lists."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def write_report(folder: Path, report: dict) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JSON_FILE).write_text(json.dumps(plain(report), indent=1))
        (folder / REPORT_FILE).write_text(markdown(report))
    except OSError as exc:
        raise UserError(f"--out {folder}: cannot write the report "
                        f"({exc.strerror or exc}); choose a folder you may write to") from None


def number(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def with_interval(scores: dict, metric: str) -> str:
    """``0.912 [0.881, 0.940]``, the interval where there is one."""
    low, high = scores.get("ci", {}).get(metric, (math.nan, math.nan))
    value = number(scores.get(metric))
    return value if math.isnan(low) or value == "n/a" else f"{value} [{low:.3f}, {high:.3f}]"


def bootstrap_of(scores: dict) -> str:
    if not scores.get("ci"):
        return "none"
    return f"{scores['patients']} patients" if scores.get("patients") else "images"


def score_columns(scores: dict) -> dict:
    """The figures of one split (or source) as table cells."""
    half, raw, cal = scores["at_0.5"], scores["calibration"], scores["calibrated"]
    return {"Images": scores["images"], "Accuracy": with_interval(scores, "accuracy"),
            "F1": with_interval(scores, "f1"),
            "At 0.5 (Acc/F1)": f"{number(half['accuracy'])}/{number(half['f1'])}",
            "AUROC": with_interval(scores, "auroc"), "AP": number(scores.get("ap")),
            "ECE (raw → scaled)": f"{number(raw['ece'])} → {number(cal['ece'])}",
            "Brier (raw → scaled)": f"{number(raw['brier'])} → {number(cal['brier'])}",
            "Bootstrap by": bootstrap_of(scores)}


def table(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |"
              for row in rows]]


def markdown(report: dict) -> str:
    """``evaluation.md``: what was scored, the figures per split, per label and per
    source, the model's own validation figures beside them, and the notes."""
    model, data = report["model"], report["collection"]
    thresholds = ", ".join(f"{k} {v:.3g}" for k, v in model["thresholds"].items())
    intro = (f"Model: `{model['folder']}` ({model['backbone']}; run "
             f"`{model['source']['run']}`, trial `{model['source']['trial_id']}`). "
             f"Collection: `{data['path']}`, {data['layout']} ({data['classes']}). "
             f"Scored with ONNX Runtime at the card's thresholds ({thresholds}) and "
             f"temperatures; **{POOLED}** pools every labelled image.")
    lines = [f"# External validation: {model['task']} model on {data['name']}", "", intro, ""]
    lines += table([{"Split": split, **score_columns(s)}
                    for split, s in report["splits"].items()])
    lines += ["", own_validation(model), ""]
    if model["task"] == "multilabel":
        lines += ["## Per label", ""] + table(label_rows(report["splits"])) + [""]
    if report["sources"]:
        lines += ["## Per source", ""]
        lines += table([{"Split": split, "Source": name, **score_columns(s)}
                        for split, by in report["sources"].items() for name, s in by.items()])
        lines += [""]
    lines += ["## How to read this", "", READING, ""]
    notes = report_notes(report)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


READING = ("Accuracy and F1 apply the card's thresholds, tuned on the run's choosing split; "
           "At 0.5 shows them at probability 0.5. AUROC and AP rank the images without a "
           "threshold, so a drop there means the model tells the classes apart less well "
           "on this collection, not only that its thresholds no longer fit. Intervals are "
           "95% percentile bootstrap intervals (1000 resamples, whole patients where the "
           "collection names them). ECE and Brier are before (raw) and after the card's "
           "temperatures; a scaled ECE well above the model's own suggests the "
           "temperatures do not carry over either.")


def own_validation(model: dict) -> str:
    """The model's figures on its own validation split, as its run recorded them."""
    metrics = model["validation_metrics"]
    shown = ", ".join(f"{word} {number(metrics[name])}" for name, word in
                      (("accuracy", "accuracy"), ("f1", "F1"), ("auroc", "AUROC"))
                      if isinstance(metrics.get(name), (int, float)))
    return (f"For comparison, on its own validation split (as the run recorded it): {shown}."
            if shown else "The card records no validation figures to compare with.")


def label_rows(splits: dict) -> list[dict]:
    labels = [k.removeprefix("auroc_") for k in next(iter(splits.values()))
              if k.startswith("auroc_")]
    return [{"Split": split, "Label": label, "F1": number(s.get(f"f1_{label}")),
             "AUROC": number(s.get(f"auroc_{label}")), "AP": number(s.get(f"ap_{label}"))}
            for split, s in splits.items() for label in labels]


def report_notes(report: dict) -> list[str]:
    data, notes = report["collection"], []
    if data["trained_on"]:
        notes.append("**This is the dataset the model was trained and chosen on**: only "
                     "its test split (if any) is unseen; train, validation and all are not "
                     "external figures.")
    if data["unlabelled_splits"]:
        notes.append(f"Not scored (no labels): {', '.join(data['unlabelled_splits'])}.")
    if data["skipped"]:
        name, why = data["skipped"][0]
        notes.append(f"{len(data['skipped'])} image(s) could not be decoded and were left "
                     f"out, e.g. {name}: {why}.")
    for split, scores in report["splits"].items():
        notes += [f"{split}: {note}." for note in scores.get("notes", [])]
    for split, by in report["sources"].items():
        for name, scores in by.items():
            notes += [f"{split}, {name}: {note}." for note in scores.get("notes", [])]
    return notes


def summary(report: dict, folder: Path) -> str:
    """A few lines for the terminal: each split's headline figures."""
    data = report["collection"]
    model = report["model"]
    lines = [f"{model['task']} model {model['folder']} on {data['path']} ({data['layout']}):"]
    for split, s in report["splits"].items():
        lines.append(f"  {split}: {s['images']} images, accuracy {number(s['accuracy'])}, "
                     f"F1 {number(s['f1'])}, AUROC {with_interval(s, 'auroc')}, ECE "
                     f"{number(s['calibration']['ece'])} -> {number(s['calibrated']['ece'])}")
    for split, by in report["sources"].items():
        if split == POOLED or len(report["splits"]) == 1:
            lines += [f"  {split}, {name}: {s['images']} images, AUROC {with_interval(s, 'auroc')}"
                      for name, s in by.items()]
    lines.append(f"Written to {folder}/ ({REPORT_FILE}, {JSON_FILE})")
    return "\n".join(lines)
