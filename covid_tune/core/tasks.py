"""The two assignment tasks: folder layouts, class names and label encodings.

Part 1, ``binary``: ``<root>/{train,validation,test}/{infected,normal}``. One output
per class in the order ``("normal", "infected")``; the positive class for F1 is
``infected`` (index 1), stated here once so no metric gets it backwards.

Part 2, ``multilabel``: ``<root>/{Train,Validation}/{covid-19,normal,pneumonia}`` and a
flat, unlabelled ``<root>/Test``. Sigmoid outputs in the order
``("covid", "normal", "pneumonia")``; COVID-19 is a pneumonia, so it sets both bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str
    split_dirs: dict[str, str]
    """Canonical split name -> folder name as published (matched case-insensitively)."""
    class_dirs: tuple[str, ...]
    """Class folder names as published (matched case-insensitively)."""
    label_names: tuple[str, ...]
    """Model output order."""
    targets: dict[str, tuple[int, ...]]
    """Class folder -> target: a class index (binary) or the label bits (multilabel)."""
    labelled_splits: tuple[str, ...]
    """Splits with class sub-folders; any other split is a flat folder of images."""
    default_metric: str
    """The metric a space ranks by when it names none."""
    losses: tuple[str, ...]
    """The losses a space may name (``covid_tune.nn.losses.LOSSES`` builds them); the
    first is the default."""
    split_metrics: tuple[str, ...]
    """What ``covid_tune.core.metrics.compute_metrics`` returns of the whole split
    (``confusion`` aside), in its order."""
    label_metrics: tuple[str, ...] = ()
    """What it returns of each label too, as ``<metric>_<label>``."""
    implies: tuple[tuple[str, str], ...] = ()
    """(label, implied label) pairs: a prediction of the first also predicts the second
    (Part 2: COVID-19 is a pneumonia), so no decision contradicts the label encoding."""

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric a trial reports of a split, prefixed ``train_``, ``val_`` and, when
        the space holds out a selection split, ``sel_``: the epoch's mean ``loss``, then
        ``split_metrics``, then each of ``label_metrics`` per label."""
        per_label = tuple(f"{metric}_{label}" for metric in self.label_metrics
                          for label in self.label_names)
        return ("loss", *self.split_metrics, *per_label)

    @property
    def multilabel(self) -> bool:
        return self.name == "multilabel"

    @property
    def outputs(self) -> int:
        return len(self.label_names)

    def target_of(self, class_dir: str) -> np.ndarray:
        return np.asarray(self.targets[class_dir.lower()], dtype=np.float32)


BINARY = Task(
    name="binary",
    split_dirs={"train": "train", "validation": "validation", "test": "test"},
    class_dirs=("infected", "normal"),
    label_names=("normal", "infected"),
    targets={"normal": (0,), "infected": (1,)},
    labelled_splits=("train", "validation", "test"),
    default_metric="val_f1",
    losses=("ce",),
    split_metrics=("accuracy", "f1", "precision", "recall", "auroc", "ap"),
)

MULTILABEL = Task(
    name="multilabel",
    split_dirs={"train": "Train", "validation": "Validation", "test": "Test"},
    class_dirs=("covid-19", "normal", "pneumonia"),
    label_names=("covid", "normal", "pneumonia"),
    targets={"covid-19": (1, 0, 1), "normal": (0, 1, 0), "pneumonia": (0, 0, 1)},
    labelled_splits=("train", "validation"),
    default_metric="val_macro_f1",
    losses=("bce", "focal"),
    split_metrics=("accuracy", "hamming_loss", "macro_f1", "samples_f1", "f1", "auroc", "ap"),
    label_metrics=("f1", "auroc", "ap"),
    implies=(("covid", "pneumonia"),),
)

TASKS = {t.name: t for t in (BINARY, MULTILABEL)}
POSITIVE_CLASS = "infected"


@dataclass(frozen=True)
class FolderLayout:
    """A published folder layout: where one task's splits and classes are on disk."""

    name: str
    task: str
    """The task it is read as: ``binary`` or ``multilabel``."""
    title: str
    """Where the layout comes from, for messages and ``check``."""
    split_dirs: dict[str, str]
    """Split (train, validation, test) -> folder name as published."""
    class_dirs: dict[str, str]
    """Class folder as published -> the task's class (a key of ``Task.targets``)."""
    labelled_splits: tuple[str, ...]
    """Splits with class sub-folders; any other split is a flat folder of images."""
    images_dir: str = ""
    """A sub-folder of each class folder that holds its images (``images``, beside
    ``masks``), or empty: the images are in the class folder itself."""
    made_splits: tuple[tuple[str, float], ...] = ()
    """For a collection without split folders (empty ``split_dirs``): the splits made
    from it, as (split, fraction); the rest is train. Drawn seeded and stratified by
    class, and recorded in the run."""
    left_out: tuple[str, ...] = ()
    """Class folders of the collection that are not read (named by ``check``)."""
    patient_pattern: str = ""
    """A regular expression on a file name whose first group that matched is the
    patient (``covid_tune.data.patients``), or empty: the names carry no patient."""

    def mapping(self) -> str:
        """``NORMAL -> normal, PNEUMONIA -> infected`` (identity shown as the name)."""
        words = [f"{folder} -> {cls}" if folder != cls else folder
                 for folder, cls in self.class_dirs.items()]
        return ", ".join(words + [f"{folder} left out" for folder in self.left_out])


LAYOUTS = {layout.name: layout for layout in (
    FolderLayout("assignment-binary", "binary", "the assignment's Part 1 layout",
                 BINARY.split_dirs, {c: c for c in BINARY.class_dirs},
                 BINARY.labelled_splits),
    FolderLayout("assignment-multilabel", "multilabel", "the assignment's Part 2 layout",
                 MULTILABEL.split_dirs, {c: c for c in MULTILABEL.class_dirs},
                 MULTILABEL.labelled_splits),
    FolderLayout("kaggle-pneumonia", "binary",
                 'Kaggle "Chest X-Ray Images (Pneumonia)" (chest_xray/)',
                 {"train": "train", "validation": "val", "test": "test"},
                 {"normal": "normal", "pneumonia": "infected"},
                 ("train", "validation", "test"),
                 patient_pattern=r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-"),
    FolderLayout("covid-radiography", "multilabel",
                 'the "COVID-19 Radiography Database" (COVID-19_Radiography_Dataset/)',
                 {}, {"covid": "covid-19", "normal": "normal", "viral pneumonia": "pneumonia"},
                 ("train", "validation"), images_dir="images",
                 made_splits=(("validation", 0.15),), left_out=("lung_opacity",)),
)}
"""Every folder layout ``covid_tune.data.dataset.scan`` recognises, matched case-insensitively."""
