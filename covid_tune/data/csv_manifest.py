"""A CSV manifest: a dataset in any folder layout, listed one image per row.

The header is ``path,labels`` and may add ``split``, ``patient``, ``view`` and
``source``, in any order after the first two::

    path,labels,split
    images/0001.png,normal,train
    images/0002.png,covid|pneumonia,validation
    images/0003.png,,test

* ``path``: the image, relative to the CSV's folder (an absolute path must lie inside
  it, so the run can record every image by the same relative name).
* ``labels``: a class of the task (Part 1: ``normal`` or ``infected``; Part 2:
  ``covid-19``, ``normal`` or ``pneumonia``), or for Part 2 the label names joined with
  ``|`` (``covid|pneumonia`` is COVID-19). Other words are mapped by the space's
  ``data: {classes: {...}}``. Empty: unlabelled, allowed in the test split only.
* ``split``: ``train``, ``validation`` (or ``val``) or ``test``. Without the column,
  validation is drawn from the rows (``covid_tune.data.dataset.split_collection``).
* ``patient``: the patient (or study) an image belongs to; every split covid-tune
  draws keeps a patient's images on one side. Empty: the image is its own patient.
* ``view``: the radiograph's view (``PA``, ``AP``, ``LATERAL``, ...), upper case;
  the space's ``data: {views: [PA, AP]}`` keeps only those. Empty: unknown.
* ``source``: the collection or hospital an image comes from; the leaderboard and
  ``evaluate`` give a row of metrics per source. Empty: none.

This module reads and checks the file; ``covid_tune.data.dataset.scan`` turns it into a
``Layout``. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.core.tasks import TASKS, Task

COLUMNS = ("path", "labels", "split", "patient", "view", "source")
SPLIT_WORDS = {"train": "train", "validation": "validation", "val": "validation",
               "test": "test"}
SEPARATOR = "|"


@dataclass(frozen=True)
class Row:
    line: int
    path: Path
    """Absolute and normalised (symlinks kept), inside the CSV's folder."""
    words: tuple[str, ...]
    """The labels as written, lower case, sorted; empty for an unlabelled image."""
    split: str | None
    """``train``, ``validation`` or ``test``; None when the CSV has no split column."""
    patient: str | None = None
    """The ``patient`` column; None when absent or empty."""
    view: str | None = None
    """The ``view`` column, upper case; None when absent or empty."""
    source: str | None = None
    """The ``source`` column; None when absent or empty."""


@dataclass(frozen=True)
class CsvManifest:
    path: Path
    folder: Path
    """The CSV's folder, absolute: every path is relative to it."""
    rows: tuple[Row, ...]
    has_split: bool


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() == ".csv" and path.is_file()


def read(path: Path) -> CsvManifest:
    """Every row of the CSV, checked: header, paths (present, inside the folder, each
    once) and split words. Labels are checked against a task by ``class_of``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"{path}: cannot read the manifest ({why})") from None
    table = list(csv.reader(text.splitlines()))
    header = [c.strip().lower() for c in table[0]] if table else []
    if header[:2] != ["path", "labels"] or not set(header) <= set(COLUMNS) \
            or len(set(header)) != len(header):
        raise UserError(f"{path}: the header must be path,labels, then any of "
                        f"{','.join(COLUMNS[2:])}; found {','.join(header) or 'an empty file'}")
    has_split = "split" in header
    folder = Path(os.path.abspath(path.parent))
    rows, seen, missing = [], {}, []
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UserError(f"{path}:{line}: {len(cells)} fields, expected {len(header)} "
                            f"({','.join(header)}); quote a path that holds a comma")
        cell = dict(zip(header, (c.strip() for c in cells)))
        image = Path(os.path.normpath(folder / cell["path"]))
        if not image.is_relative_to(folder):
            raise UserError(f"{path}:{line}: {cell['path']} is outside the manifest's folder "
                            f"{folder}; move the CSV into a folder above every image")
        if image in seen:
            raise UserError(f"{path}:{line}: {cell['path']} is listed twice (also on line "
                            f"{seen[image]}); keep one row per image")
        seen[image] = line
        if not image.is_file():
            missing.append((line, cell["path"]))
        split = None
        if has_split:
            split = SPLIT_WORDS.get(cell["split"].lower())
            if split is None:
                raise UserError(f"{path}:{line}: split {cell['split']!r} is not one of train, "
                                f"validation, val, test")
        words = tuple(sorted(w.strip().lower() for w in cell["labels"].split(SEPARATOR)
                             if w.strip()))
        rows.append(Row(line, image, words, split, cell.get("patient") or None,
                        (cell.get("view") or "").upper() or None, cell.get("source") or None))
    if missing:
        line, name = missing[0]
        raise UserError(f"{path}:{line}: {name}: no such file ({len(missing)} such row(s) in "
                        f"all); paths are relative to the CSV's folder")
    if not rows:
        raise UserError(f"{path}: the manifest lists no images")
    return CsvManifest(path, folder, tuple(rows), has_split)


def guess_task(manifest: CsvManifest) -> str:
    """``binary`` when every label is a Part 1 class, else ``multilabel``."""
    words = {w for row in manifest.rows for w in row.words}
    return "binary" if words <= set(TASKS["binary"].targets) else "multilabel"


def class_of(words: tuple[str, ...], task: Task,
             mapped: dict[str, str | None]) -> str | None:
    """The task's class of a row's labels; None when the space's ``data.classes``
    (``mapped``: word -> class, or None to leave such rows out) leaves it out. Raises
    ValueError naming the fix."""
    if any(w in mapped and mapped[w] is None for w in words):
        return None
    words = tuple(sorted({mapped.get(w, w) for w in words}))
    if len(words) == 1 and words[0] in task.targets:
        return words[0]
    bits = tuple(int(name in words) for name in task.label_names)
    if task.multilabel and set(words) <= set(task.label_names):
        for cls, target in task.targets.items():
            if target == bits:
                return cls
        raise ValueError(f"labels {SEPARATOR.join(words)} are not a class of Part 2 (COVID-19 "
                         f"is a pneumonia: write covid{SEPARATOR}pneumonia)")
    known = ", ".join(task.targets)
    raise ValueError(f"label {SEPARATOR.join(words)!r} is not a {task.name} class; use one of "
                     f"{known}, or map it in the space (data: {{classes: {{word: class}}}})")
