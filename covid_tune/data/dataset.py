"""Image folders in, decoded uint8 tensors out: find the files, decode them once, cache them.

``scan`` reads a folder in either assignment layout (names matched case-insensitively,
junk such as ``desktop.ini`` skipped and counted). ``load_dataset`` decodes every image
once to 8-bit grayscale at the sweep's working size (shorter side resized, centre
crop) into a ``DataBundle`` of numpy arrays, cached on disk under a fingerprint of every
file's path, size and modification time, so a changed dataset is decoded again. Trials
receive the bundle through Ray's object store, never by re-reading the folder.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from covid_tune.data import csv_manifest, dicom
from covid_tune.core.space import DataSpec
from covid_tune.core.units import human_bytes
from covid_tune.errors import UserError
from covid_tune.data.groups import Grouping, file_stamp, group_images
from covid_tune.data.preprocess import try_read
from covid_tune.core.tasks import LAYOUTS, TASKS, FolderLayout, Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", dicom.SUFFIX)
JUNK_NAMES = ("desktop.ini", ".ds_store", "thumbs.db", "ehthumbs.db", "icon\r")
CACHE_VERSION = "3"
"""Bumped when decoding changes (2: PNG/JPEG decoders only, bombs refused per image;
3: each image's class is in the fingerprint, so a changed class map decodes again)."""


@dataclass(frozen=True)
class ImageFileRef:
    path: Path
    class_dir: str | None
    """The task's class its folder maps to (``FolderLayout.class_dirs``), or ``None``
    for an unlabelled split."""
    patient: str | None = None
    """The patient (or study) key, where one is known (a manifest's ``patient`` column,
    DICOM's ``PatientID``, a file-name rule); None: the image is its own patient."""
    view: str | None = None
    """The view (``PA``, ``AP``, ``LATERAL``, ...), where known."""
    source: str | None = None
    """The collection it comes from (a manifest's ``source`` column), where known."""


@dataclass
class Layout:
    """What ``scan`` found: the image files of each split, and what it skipped."""

    root: Path
    task: Task
    files: dict[str, list[ImageFileRef]]
    kind: FolderLayout = LAYOUTS["assignment-binary"]
    """Which published layout the folder is in (``covid_tune.core.tasks.LAYOUTS``), or the
    layout a CSV manifest describes."""
    junk: list[Path] = field(default_factory=list)
    listing: Path | None = None
    """The CSV manifest the images were listed in (``covid_tune.data.csv_manifest``)."""
    patient: str | None = None
    """The space's ``data.patient`` regex, if any (``covid_tune.data.groups``)."""
    grouping: Grouping | None = None
    """How the images of the splits drawn here (or of Train, for the selection holdout:
    ``train_grouping``) were grouped by patient; None: nothing drawn yet."""


@dataclass
class Split:
    images: np.ndarray
    """uint8 (N, S, S) grayscale."""
    targets: np.ndarray
    """binary: int64 (N,) class index; multilabel: float32 (N, K) label bits; (N, 0)
    for an unlabelled split."""
    names: list[str]
    """Paths relative to the dataset root."""

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class DataBundle:
    """A decoded dataset: what every trial of a sweep trains and evaluates on."""

    task: str
    root: str
    image_size: int
    splits: dict[str, Split]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(relative path, reason) of files that could not be decoded."""
    fingerprint: str = ""
    groups: dict[str, str] = field(default_factory=dict)
    """Name -> patient group (``covid_tune.data.groups``) where a reader grouped the
    images (the leaderboard, for a bootstrap by patient); empty: each image alone."""


def is_junk(path: Path) -> bool:
    """Not an image: a junk name, or neither an image suffix nor a DICOM file of
    another name (``DICM`` at byte 128, as files named by their UID often are)."""
    name = path.name.lower()
    if name in JUNK_NAMES or name.startswith("._"):
        return True
    return path.suffix.lower() not in IMAGE_SUFFIXES and not dicom.has_magic(path)


def _entries(folder: Path) -> list[tuple[Path, bool]]:
    """(path, is a folder) of everything directly inside ``folder``, sorted by name.

    Nothing is followed further down, so a symlink loop cannot make a scan hang; a
    link that loops or points nowhere is not a folder, and is left to ``try_read``.
    """
    try:
        return [(p, _is_dir(p)) for p in sorted(folder.iterdir())]
    except OSError as exc:
        raise UserError(f"{folder}: cannot list the folder ({exc.strerror}); check that "
                        f"you may read it (ls -ld, chmod)") from None


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder: a symlink loop or a broken link is not."""
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except PermissionError:
        raise
    except OSError:
        return False


def _children(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-case name."""
    return {p.name.lower(): p for p, is_dir in _entries(folder) if is_dir}


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, junk) directly inside ``folder``, sorted by name."""
    images, junk = [], []
    for path, is_dir in _entries(folder):
        if not is_dir:
            (junk if is_junk(path) else images).append(path)
    return images, junk


def detect_layout(root: Path, task: str | None = None) -> FolderLayout:
    """Tell the layout from the folders (``covid_tune.core.tasks.LAYOUTS``): the class
    folders under its train folder and, where several layouts fit, its validation
    folder too. With ``task``, only that task's layouts are accepted."""
    splits = _children(root)
    found = [layout for layout in LAYOUTS.values() if _fits(layout, splits)]
    if len(found) > 1:
        found = [layout for layout in found
                 if layout.split_dirs.get("validation", "").lower() in splits] or found
    wanted = [layout for layout in found if task is None or layout.task == task]
    if len(wanted) == 1:
        return wanted[0]
    if len(wanted) > 1:
        raise UserError(f"{root}: matches {len(wanted)} layouts at once "
                        f"({', '.join(layout.title for layout in wanted)}); keep one set of "
                        f"class folders under the training split")
    if found:
        raise UserError(f"{root}: this is the {found[0].task} layout, not {task}; pass "
                        f"--task {found[0].task} or point at the right folder")
    expected = "; ".join(f"{_where_classes(layout)} ({layout.title})"
                         for layout in LAYOUTS.values())
    raise UserError(f"{root}: no known layout found; expected one of: {expected}")


def _where_classes(layout: FolderLayout) -> str:
    """``train/{infected,normal}`` or ``{covid,normal}/images``: where its classes are."""
    classes = "{" + ",".join(layout.class_dirs) + "}"
    if layout.made_splits:
        return f"{classes}/{layout.images_dir}"
    return f"{layout.split_dirs['train']}/{classes}"


def _fits(layout: FolderLayout, folders: dict[str, Path]) -> bool:
    """Whether the class folders of ``layout`` are where it keeps them: under its train
    folder, or (a collection without splits) in ``folders`` themselves, each with its
    images sub-folder."""
    if layout.made_splits:
        return set(folders) >= set(layout.class_dirs) and all(
            layout.images_dir in _children(folders[c]) for c in layout.class_dirs)
    train = folders.get(layout.split_dirs["train"].lower())
    return train is not None and set(_children(train)) >= set(layout.class_dirs)


def detect_task(root: Path) -> Task:
    """The task of the folder's layout."""
    return TASKS[detect_layout(root).task]


def scan(root: str | Path, task: str | None = None, assigned: dict[str, str] | None = None,
         spec: DataSpec | None = None) -> Layout:
    """Find every image of a dataset folder; UserError when the layout is wrong.

    ``spec`` (a space's ``data:``) changes the detected layout's class map and which
    splits are drawn from train. Drawn splits (all of them for a collection without
    split folders) are made here (``split_collection``); ``assigned`` (relative path ->
    split, as a run recorded it) keeps the run's split."""
    root = Path(root)
    if csv_manifest.is_manifest(root):
        return scan_csv(root, task, assigned, spec)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise UserError(f"{root}: {what}; pass the dataset root (holding train/ and "
                        f"validation/) or a CSV manifest (path,labels[,split])")
    kind = with_spec(detect_layout(root, task), spec, root)
    layout = Layout(root=root, task=TASKS[kind.task], files={}, kind=kind,
                    patient=spec.patient if spec else None)
    splits = _children(root)
    drawn = dict(kind.made_splits)
    for split, dirname in kind.split_dirs.items():
        folder = splits.get(dirname.lower())
        if split in drawn:
            continue  # drawn from train below
        if folder is None:
            if split == "test":
                continue
            raise UserError(f"{root}: missing the {dirname}/ folder of {kind.title}")
        layout.files[split] = _scan_split(folder, split, kind, layout.junk)
    if drawn and not kind.split_dirs:
        layout.files["train"] = _class_refs(root, kind, layout.junk, "the collection")
    layout.files = by_view(layout.files, spec, root)
    if drawn:
        pool = layout.files.pop("train")
        made, layout.grouping = split_collection(pool, root, kind, assigned or {},
                                                 layout.patient)
        layout.files.update(made)
    layout.files = {s: layout.files[s] for s in ("train", "validation", "test")
                    if s in layout.files}
    return layout


def with_spec(kind: FolderLayout, spec: DataSpec | None, root: Path) -> FolderLayout:
    """The layout with a space's ``data:`` applied: class folders mapped (or left out
    with null) and splits drawn from train."""
    if spec is None or not (spec.classes or spec.split):
        return kind
    classes = dict(kind.class_dirs)
    left_out = [f for f in kind.left_out if f not in dict(spec.classes)]
    home = root if kind.made_splits else _children(root).get(kind.split_dirs["train"].lower())
    present = _children(home) if home is not None else {}
    for folder, target in spec.classes:
        if folder not in present:
            raise UserError(f"{root}: data.classes names the class folder {folder}/, which is "
                            f"not there; use one of: {', '.join(sorted(present))}")
        classes.pop(folder, None)
        if target is None:
            left_out.append(folder)
        else:
            classes[folder] = target
    made = spec.split or kind.made_splits
    return replace(kind, class_dirs=classes, left_out=tuple(left_out),
                   made_splits=tuple(made))


def _scan_split(folder: Path, split: str, kind: FolderLayout,
                junk: list[Path]) -> list[ImageFileRef]:
    refs: list[ImageFileRef] = []
    if split not in kind.labelled_splits:
        images, skipped = _files(folder)
        junk += skipped
        refs = [ImageFileRef(p, None) for p in images]
    else:
        refs = _class_refs(folder, kind, junk, split)
    if not refs:
        raise UserError(f"{folder}: no .png/.jpg/.dcm images in this split")
    return refs


def _class_refs(folder: Path, kind: FolderLayout, junk: list[Path],
                where: str) -> list[ImageFileRef]:
    """The images of every class folder of ``kind`` under ``folder`` (in its images
    sub-folder, if the layout has one), each with the task's class."""
    classes = _children(folder)
    refs = []
    for class_dir, target in kind.class_dirs.items():
        if class_dir not in classes:
            raise UserError(f"{folder}: missing the class folder {class_dir}/ of {where}")
        images_folder = classes[class_dir]
        if kind.images_dir:
            images_folder = _children(images_folder).get(kind.images_dir, images_folder)
        images, skipped = _files(images_folder)
        junk += skipped
        if not images:
            raise UserError(f"{images_folder}: no .png/.jpg/.dcm images in this class folder; a "
                            f"{kind.task} dataset needs every class")
        refs += [ImageFileRef(p, target) for p in images]
    return refs


def by_view(files: dict[str, list[ImageFileRef]], spec: DataSpec | None,
            where: Path) -> dict[str, list[ImageFileRef]]:
    """Each split's images with the patient and view of their DICOM header filled in
    where they have none (a manifest's columns win), then, when the space lists
    ``data.views``, only the images of those views.

    An image of no known view (a DICOM file without ``ViewPosition``, another format
    with no manifest ``view``) is left out too, and a warning says how many. A split
    left empty, or a training class left without an image, is refused."""
    files = {split: [_with_header(ref) for ref in refs] for split, refs in files.items()}
    views = spec.views if spec else ()
    if not views:
        return files
    kept = {split: [r for r in refs if r.view in views] for split, refs in files.items()}
    out = Counter(r.view or "unknown" for refs in files.values() for r in refs
                  if r.view not in views)
    listed = f"data.views [{', '.join(views)}]"
    for split, refs in kept.items():
        if not refs:
            found = Counter(r.view or "unknown" for r in files[split])
            raise UserError(f"{where}: {listed} keeps no image of the {split} split; its "
                            f"views are {_tally(found)}; list the views you want in data.views")
    lost = sorted({r.class_dir for r in files.get("train", [])}
                  - {r.class_dir for r in kept.get("train", [])}, key=str)
    if lost:
        raise UserError(f"{where}: {listed} keeps no training image of class {lost[0]}; "
                        f"list more views in data.views")
    if out["unknown"]:
        warnings.warn(f"{where}: {listed} leaves out {sum(out.values())} image(s): "
                      f"{_tally(out)}; an image of unknown view has no DICOM ViewPosition "
                      f"and no view column in a manifest")
    return kept


def _with_header(ref: ImageFileRef) -> ImageFileRef:
    """``ref`` with the ``PatientID`` and ``ViewPosition`` of its DICOM header where it
    has no patient or view of its own."""
    if (ref.patient and ref.view) or not dicom.is_dicom(ref.path):
        return ref
    patient, view = dicom.header(ref.path)
    return replace(ref, patient=ref.patient or patient, view=ref.view or view)


def _tally(counts: Counter) -> str:
    return ", ".join(f"{view} {n}" for view, n in sorted(counts.items()))


def scan_csv(path: Path, task: str | None, assigned: dict[str, str] | None,
             spec: DataSpec | None) -> Layout:
    """The images a CSV manifest lists (``covid_tune.data.csv_manifest``), as a ``Layout``
    rooted at the CSV's folder. Without a split column, validation (or the space's
    ``data.split``) is drawn from the rows as for a collection without split folders."""
    listing = csv_manifest.read(path)
    the_task = TASKS[task or csv_manifest.guess_task(listing)]
    mapped = dict(spec.classes) if spec else {}
    seen = {w for row in listing.rows for w in row.words}
    for word in mapped:
        if word not in seen:
            raise UserError(f"{path}: data.classes names the label {word}, which no row has; "
                            f"use one of: {', '.join(sorted(seen))}")
    files: dict[str, list[ImageFileRef]] = {}
    classes: dict[str, str] = {}
    for row in listing.rows:
        split = row.split or "train"
        cls = None
        if row.words:
            try:
                cls = csv_manifest.class_of(row.words, the_task, mapped)
            except ValueError as exc:
                raise UserError(f"{path}:{row.line}: {exc}") from None
            if cls is None:
                continue  # left out by data.classes
            classes[csv_manifest.SEPARATOR.join(row.words)] = cls
        elif split != "test":
            raise UserError(f"{path}:{row.line}: no labels; only test images may be "
                            f"unlabelled (give this row its labels or split test)")
        files.setdefault(split, []).append(ImageFileRef(row.path, cls, row.patient, row.view,
                                                        row.source))
    files = by_view(files, spec, path)
    labelled = tuple(s for s, refs in files.items() if any(r.class_dir for r in refs))
    if "test" in labelled and not all(r.class_dir for r in files["test"]):
        raise UserError(f"{path}: some test rows have labels and some do not; label every "
                        f"test image or none")
    made = (spec.split if spec else ()) or (() if listing.has_split else (("validation", 0.15),))
    kind = FolderLayout(
        "csv-manifest", the_task.name, f"a CSV manifest ({path.name})",
        {s: s for s in ("train", "validation", "test") if s in files} if listing.has_split else {},
        dict(sorted(classes.items())), ("train", "validation", *labelled),
        made_splits=tuple(made),
        left_out=tuple(sorted(w for w, c in mapped.items() if c is None)))
    root = listing.folder
    patient, grouping = spec.patient if spec else None, None
    if made:
        drawn, grouping = split_collection(files.get("train", []), root, kind, assigned or {},
                                           patient, listed=True)
        files = {**{s: r for s, r in files.items() if s not in drawn}, **drawn}
    for split in ("train", "validation"):
        if not files.get(split):
            raise UserError(f"{path}: no {split} rows; add some, or leave out the split "
                            f"column to draw validation from the rows")
    missing = [c for c in the_task.targets if all(r.class_dir != c for r in files["train"])]
    if missing:
        raise UserError(f"{path}: no train row is labelled {missing[0]}; a {the_task.name} "
                        f"dataset needs every class ({', '.join(the_task.targets)})")
    order = {s: files[s] for s in ("train", "validation", "test") if s in files}
    return Layout(root=root, task=the_task, files=order, kind=kind, listing=path,
                  patient=patient, grouping=grouping)


SPLIT_SEED = 0
"""Seeds the split of a collection without split folders; the run records the result."""


def split_collection(refs: list[ImageFileRef], root: Path, kind: FolderLayout,
                     assigned: dict[str, str], patient: str | None = None,
                     listed: bool = False) -> tuple[dict[str, list[ImageFileRef]],
                                                    Grouping | None]:
    """Split a collection into train and ``kind.made_splits``, stratified by class and
    grouped by patient (``stratified_parts`` with ``SPLIT_SEED``, files in name order):
    each made split takes about its fraction of every class, in whole groups
    (``covid_tune.data.groups``: the patient key, by ``patient``, the space's regex, and
    the layout's rule, with near-duplicates joined). Files ``assigned`` a split (a
    run's record) keep it; the grouping of the others is returned (None: none left)."""
    files: dict[str, list[ImageFileRef]] = {"train": [], **{s: [] for s, _ in kind.made_splits}}
    pending = []
    for ref in refs:
        split = assigned.get(_rel(ref.path, root))
        (files[split] if split in files else pending).append(ref)
    pending.sort(key=lambda r: _rel(r.path, root))
    grouping = group_images(pending, root, patient=patient, layout_rule=kind.patient_pattern,
                            listed=listed, cache=cache_dir()) if pending else None
    groups = [grouping.groups[_rel(ref.path, root)] for ref in pending] if grouping else None
    parts = stratified_parts([ref.class_dir for ref in pending],
                             [fraction for _, fraction in kind.made_splits], SPLIT_SEED, groups)
    for (split, _), part in zip(kind.made_splits, parts):
        files[split] += [pending[i] for i in part]
    drawn = {i for part in parts for i in part}
    files["train"] += [ref for i, ref in enumerate(pending) if i not in drawn]
    return {split: sorted(refs_, key=lambda r: _rel(r.path, root))
            for split, refs_ in files.items()}, grouping


def assignment(layout: Layout) -> dict[str, str]:
    """Relative path -> split of a collection split here (empty for split folders):
    what a run records so that readers split it the same way."""
    if not layout.kind.made_splits:
        return {}
    return {_rel(ref.path, layout.root): split for split, refs in layout.files.items()
            for ref in refs}


def decode_all(paths: list[Path], size: int, desc: str, progress: bool = True) -> list:
    """``try_read`` over many files on every core, with a progress bar on a terminal."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: try_read(p, size), paths, chunksize=1)
        return list(tqdm(results, total=len(paths), desc=desc, unit="img",
                         disable=None if progress else True, leave=False))


def manifest(layout: Layout) -> dict[str, int]:
    """Relative path -> bytes of every image: what a run records of its dataset, so a
    moved copy still matches and a changed one is told apart (``covid_tune.runs.record``)."""
    files = {}
    if layout.listing is not None:
        files[_rel(layout.listing.absolute(), layout.root)] = layout.listing.stat().st_size
    for refs in layout.files.values():
        for ref in refs:
            try:
                files[_rel(ref.path, layout.root)] = ref.path.stat().st_size
            except OSError:
                files[_rel(ref.path, layout.root)] = -1
    return files


def fingerprint(layout: Layout) -> str:
    """A hash of every file's relative path, size and modification time."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{CACHE_VERSION}|{layout.task.name}".encode())
    for split in sorted(layout.files):
        for ref in layout.files[split]:
            rel = ref.path.relative_to(layout.root).as_posix()
            digest.update(f"|{rel}|{ref.class_dir}|{file_stamp(ref.path)}".encode())
    return digest.hexdigest()


def decoded_bytes(layout: Layout, size: int) -> int:
    """What ``load_dataset`` will hold: one uint8 pixel per image per pixel of the
    ``size`` x ``size`` crop."""
    return sum(len(refs) for refs in layout.files.values()) * size * size


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux's
    ``MemAvailable``), else free physical pages; None when neither is known."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def largest_fitting_size(size: int, need: int, room: int) -> int:
    """The largest image side at which ``need`` bytes (needed at ``size``) shrink to
    ``room`` bytes: decoded bytes grow with the square of the side."""
    return int(size * math.sqrt(room / need)) if need else size


def check_memory(layout: Layout, size: int, copies: int, fix: str) -> None:
    """Refuse, before decoding, a dataset whose decoded pixels (held ``copies`` times)
    do not fit in the memory available now; ``fix`` ends the message."""
    room = available_memory()
    need = decoded_bytes(layout, size) * copies
    if room is None or need <= room:
        return
    images = sum(len(refs) for refs in layout.files.values())
    held = " held twice: by this process and by Ray's object store" if copies == 2 else ""
    fit = largest_fitting_size(size, need, room)
    raise UserError(f"{layout.root}: {images} images at {size} px decode to "
                    f"{human_bytes(need)}{held}, more than the {human_bytes(room)} of memory "
                    f"available; the largest image size that fits is {fit} px; {fix}")


SELECTION = "selection"
"""The split held out of Train to choose with (``selection: {holdout: F}``)."""


def hold_out(split: Split, fraction: float, seed: int,
             groups: dict[str, str] | None = None) -> list[str]:
    """The names of a seeded part ``fraction`` of ``split``, stratified by label
    combination (a class for Part 1, a set of label bits for Part 2) and drawn in whole
    groups: ``groups`` maps a name to its patient group (``train_grouping``; a name it
    lacks is its own group).

    Each combination gives about ``round(fraction * n)`` images, at least one group and
    never all of them when it has two or more, so a rare label is on both sides. The
    draw depends only on the names, their labels, their groups, ``fraction`` and
    ``seed``: the same dataset gives the same split in any order, on any machine.
    """
    order = np.argsort(np.asarray(split.names))
    targets = split.targets.reshape(len(split), -1)[order]
    keys = [groups.get(split.names[i], split.names[i]) for i in order] if groups else None
    (picked,) = stratified_parts([tuple(row) for row in targets.tolist()], [fraction], seed,
                                 keys)
    return sorted(split.names[order[i]] for i in picked)


def train_grouping(layout: Layout) -> Grouping:
    """How Train's images are grouped for the selection holdout: the grouping of the
    collection they were drawn from (``scan``), or one made now of Train and kept on
    the layout, which the run records."""
    train = layout.files.get("train", [])
    known = layout.grouping.groups if layout.grouping else {}
    if layout.grouping is None or any(_rel(r.path, layout.root) not in known for r in train):
        layout.grouping = group_images(train, layout.root, patient=layout.patient,
                                       layout_rule=layout.kind.patient_pattern,
                                       listed=layout.listing is not None, cache=cache_dir())
    return layout.grouping


def stratified_parts(strata: list, fractions: list[float], seed: int,
                     groups: list | None = None) -> list[list[int]]:
    """Seeded, stratified parts of a list of items, in whole groups: for each fraction,
    the positions of the items it takes; the items no part takes are the rest.

    ``strata[i]`` is item ``i``'s stratum (a class, or a tuple of label bits) and
    ``groups[i]`` its group (a patient; None: every item its own group); the items come
    in a fixed order (by name), so the draw depends only on them and ``seed``. A group
    goes wholly to one part or to the rest; its stratum is its items' most common one
    (a tie: the first in sorted order). Strata are taken in sorted order and the groups
    of each are shuffled with one ``numpy.random.default_rng(seed)``; then each part in
    turn walks the shuffled groups and takes one when that brings its count of the
    stratum's items (from groups taken before too) closer to ``round(fraction * n)``
    of the stratum's ``n`` items. It takes at least one group (the smallest, when none
    fits), but always leaves one group behind for the rest (a stratum of a single
    group stays whole in the rest). With every item its own group this is the per-item
    draw: ``round(fraction * n)`` items, at least one, one left behind.
    ``hold_out`` and ``split_collection`` both draw with it; runs record what it drew.
    """
    rng = np.random.default_rng(seed)
    members: dict = {}
    for i, key in enumerate(range(len(strata)) if groups is None else groups):
        members.setdefault(key, []).append(i)
    tally = {key: Counter(strata[i] for i in items) for key, items in members.items()}
    by_stratum: dict = {}
    for key, counts in tally.items():
        most = max(counts.values())
        by_stratum.setdefault(min(s for s, n in counts.items() if n == most), []).append(key)
    totals = Counter(strata)
    have = [Counter() for _ in fractions]
    parts: list[list[int]] = [[] for _ in fractions]
    for stratum in sorted(by_stratum):
        keys = by_stratum[stratum]
        left = [keys[i] for i in rng.permutation(len(keys))]
        for part, fraction, held in zip(parts, fractions, have):
            quota = max(round(fraction * totals[stratum]), 1)
            taken, left = _take_groups(left, quota, stratum, held, tally)
            for key in taken:
                part += members[key]
                held.update(tally[key])
    return parts


def _take_groups(left: list, quota: int, stratum, held: Counter,
                 tally: dict) -> tuple[list, list]:
    """(taken, still left) of the shuffled groups ``left`` for one part that holds
    ``held`` items per stratum and wants ``quota`` of ``stratum``."""
    taken, kept, count = [], [], held[stratum]
    for position, key in enumerate(left):
        room, size = quota - count, tally[key][stratum]
        behind = len(kept) + len(left) - position - 1
        if room > 0 and size < 2 * room and behind >= 1:
            taken.append(key)
            count += size
        else:
            kept.append(key)
    if count == 0 and len(kept) >= 2:
        smallest = min(kept, key=lambda k: tally[k][stratum])
        taken.append(smallest)
        kept.remove(smallest)
    return taken, kept


def with_selection(bundle: DataBundle, names: list[str]) -> DataBundle:
    """A copy of ``bundle`` whose ``names`` (from ``hold_out``) are moved out of Train
    into the ``selection`` split; ``bundle`` itself when ``names`` is empty.

    Names no longer in Train (a dataset changed since the run) are passed over, as the
    caller's manifest check has said; none or all of Train matching is refused."""
    if not names:
        return bundle
    train = bundle.splits["train"]
    held = np.isin(np.asarray(train.names), np.asarray(names))
    if not held.any() or held.all():
        raise UserError(f"{bundle.root}: the run's selection split matches "
                        f"{'none' if not held.any() else 'all'} of the training images; "
                        f"this is not the dataset the run held them out of")
    part = {name: Split(images=train.images[mask], targets=train.targets[mask],
                        names=[n for n, m in zip(train.names, mask) if m])
            for name, mask in (("train", ~held), (SELECTION, held))}
    splits = {"train": part["train"], SELECTION: part[SELECTION],
              **{k: v for k, v in bundle.splits.items() if k != "train"}}
    return DataBundle(task=bundle.task, root=bundle.root, image_size=bundle.image_size,
                      splits=splits, skipped=bundle.skipped, fingerprint=bundle.fingerprint,
                      groups=bundle.groups)


def cache_dir() -> Path:
    """``$COVID_TUNE_CACHE`` or ``~/.cache/covid-tune``."""
    return Path(os.environ.get("COVID_TUNE_CACHE") or Path.home() / ".cache" / "covid-tune")


def load_dataset(root: str | Path | Layout, task: str | None = None, image_size: int = 224,
                 *, strict: bool = False, use_cache: bool = True,
                 progress: bool = True) -> DataBundle:
    """Decode a dataset folder (or a ``scan`` of it) once into a ``DataBundle``, from
    the cache when valid."""
    layout = root if isinstance(root, Layout) else scan(root, task)
    key = fingerprint(layout)
    cached = cache_dir() / f"{layout.task.name}-{key}-{image_size}.npz"
    if use_cache and cached.is_file():
        try:
            return _read_cache(cached, layout, image_size, key, strict)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    bundle = _decode_layout(layout, image_size, key, progress)
    _refuse_unreadable(bundle, strict)
    if use_cache:
        _write_cache(cached, bundle)
    return bundle


def _decode_layout(layout: Layout, size: int, key: str, progress: bool) -> DataBundle:
    task = layout.task
    bundle = DataBundle(task=task.name, root=str(layout.root), image_size=size, splits={},
                        fingerprint=key)
    for split, refs in layout.files.items():
        results = decode_all([r.path for r in refs], size, f"decoding {split}", progress)
        kept = [(r, px) for r, (px, _, _) in zip(refs, results) if px is not None]
        bundle.skipped += [(_rel(r.path, layout.root), why)
                           for r, (px, _, why) in zip(refs, results) if px is None]
        if not kept:
            raise UserError(f"{layout.root}: no image of the {split} split could be decoded")
        images = np.stack([px for _, px in kept])
        bundle.splits[split] = Split(images=images, targets=_targets(task, [r for r, _ in kept]),
                                     names=[_rel(r.path, layout.root) for r, _ in kept])
    return bundle


def _targets(task: Task, refs: list[ImageFileRef]) -> np.ndarray:
    if refs[0].class_dir is None:
        return np.zeros((len(refs), 0), dtype=np.float32)
    bits = np.stack([task.target_of(r.class_dir) for r in refs])
    return bits.astype(np.float32) if task.multilabel else bits[:, 0].astype(np.int64)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _refuse_unreadable(bundle: DataBundle, strict: bool) -> None:
    if strict and bundle.skipped:
        name, why = bundle.skipped[0]
        raise UserError(f"{bundle.root}/{name}: cannot be decoded ({why}); "
                        f"{len(bundle.skipped)} such file(s) in all; remove them or drop --strict")


def _write_cache(path: Path, bundle: DataBundle) -> None:
    arrays = {"skipped": np.array([f"{n}\t{w}" for n, w in bundle.skipped], dtype=str)}
    for split, data in bundle.splits.items():
        arrays[f"{split}/images"] = data.images
        arrays[f"{split}/targets"] = data.targets
        arrays[f"{split}/names"] = np.array(data.names, dtype=str)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp.exists():
            tmp.unlink()  # a full disk leaves no half-written cache behind
        warnings.warn(f"could not write the decode cache {path} ({exc}); continuing without it")


def _read_cache(path: Path, layout: Layout, size: int, key: str, strict: bool) -> DataBundle:
    with np.load(path, allow_pickle=False) as stored:
        splits = {split: Split(images=stored[f"{split}/images"],
                               targets=stored[f"{split}/targets"],
                               names=stored[f"{split}/names"].tolist())
                  for split in layout.files}
        skipped = [tuple(s.split("\t", 1)) for s in stored["skipped"].tolist()]
    bundle = DataBundle(task=layout.task.name, root=str(layout.root), image_size=size,
                        splits=splits, skipped=skipped, fingerprint=key)
    _refuse_unreadable(bundle, strict)
    return bundle


def patient_map(layout) -> dict[str, str]:
    """Name -> patient group of every image of the layout (its patient key, joined with
    near-duplicates: ``covid_tune.data.groups``), hashes from the cache after the first
    time; only the names that share their group with another image."""
    refs = [ref for split_refs in layout.files.values() for ref in split_refs]
    grouping = group_images(refs, layout.root, patient=layout.patient,
                            layout_rule=layout.kind.patient_pattern,
                            listed=layout.listing is not None, cache=cache_dir())
    sizes = Counter(grouping.groups.values())
    return {name: group for name, group in grouping.groups.items() if sizes[group] > 1}


def patient_groups(bundle: DataBundle, split: str) -> list[str] | None:
    """Each image's patient group on ``split`` for a bootstrap by patient; None when no
    two images of the split share a patient (each image then stands alone)."""
    names = bundle.splits[split].names
    groups = [bundle.groups.get(name, name) for name in names]
    return groups if len(set(groups)) < len(groups) else None
