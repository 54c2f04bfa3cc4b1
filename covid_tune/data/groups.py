"""Patient groups for the splits covid-tune draws: a patient's images, and copies of an
image, always land on the same side of a drawn split.

The patient (or study) key of an image is the first of these that gives one:

1. ``ImageFileRef.patient``: a CSV manifest's ``patient`` column, or DICOM's
   ``PatientID`` read when the folder was scanned;
2. the space's ``data: {patient: REGEX}``: the regex's first group that matched,
   searched in the file's path relative to the dataset root, then in its file name
   (so ``^(case\\d+)_`` works on names and ``^[^/]+/(\\w+)/`` on paths);
3. the layout's own file-name rule (``FolderLayout.patient_pattern``: Kaggle's
   ``person1_bacteria_1.jpeg`` is ``person1``);
4. none: the image is its own patient.

Images with the same key form a group; near-duplicates (perceptual hashes at most
``NEAR_BITS`` apart, ``covid_tune.data.patients``) join their groups too, by union-find.
Hashing decodes every image once at ``HASH_PIXELS``; the hashes are cached beside the
decode cache, keyed by each file's relative path, size and modification time, so a
second scan of the same folder decodes nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from covid_tune.data.patients import (
    HASH_PIXELS,
    NEAR_BITS,
    near_duplicates,
    patient_of,
    perceptual_hash,
)
from covid_tune.data.preprocess import try_read

SOURCES = {
    "manifest": "the manifest's patient column",
    "dicom": "DICOM PatientID",
    "regex": "data.patient",
    "layout": "the layout's file-name rule",
    "none": "no key",
}
"""Where an image's key came from, in order of precedence, as the run records it."""
HASH_CACHE_VERSION = "1"


@dataclass(frozen=True)
class Grouping:
    """How the images of a draw were grouped."""

    groups: dict[str, str]
    """Relative path -> its group, named by the group's first relative path."""
    keyed: dict[str, int]
    """Images per source of their key (``SOURCES``; ``none``: no key)."""
    near_merges: int
    """Near-duplicate pairs that joined two groups that were apart."""
    patient: str | None = None
    """The space's ``data.patient`` regex, if any."""
    layout_rule: str = ""
    """The layout's file-name rule, if it has one."""
    notes: tuple[str, ...] = ()
    """What a reader should know (a regex that matched nothing)."""

    @property
    def count(self) -> int:
        return len(set(self.groups.values()))

    def record(self) -> dict:
        """What the run records (``dataset.json``, ``grouping``)."""
        return {"images": len(self.groups), "groups": self.count, "keyed": dict(self.keyed),
                "near_merges": self.near_merges, "near_bits": NEAR_BITS,
                "patient": self.patient, "layout_rule": self.layout_rule,
                "notes": list(self.notes)}

    def line(self) -> str:
        return grouping_line(self.record())


def grouping_line(record: dict) -> str:
    """One line of a recorded grouping: ``624 images in 80 patient groups (keys: the
    layout's file-name rule 600, no key 24; 3 near-duplicate merges); ...``."""
    keyed = ", ".join(f"{SOURCES.get(source, source)} {n}"
                      for source, n in record.get("keyed", {}).items())
    text = (f"{record.get('images', 0)} images in {record.get('groups', 0)} patient groups "
            f"(keys: {keyed or 'none'}; {record.get('near_merges', 0)} near-duplicate "
            f"merge(s)); a split drawn from them keeps each group on one side")
    notes = record.get("notes") or []
    return text + "".join(f"; {note}" for note in notes)


def patient_key(patient: str | None, rel: str, regex: re.Pattern | None,
                layout_rule: re.Pattern | None, listed: bool) -> tuple[str | None, str]:
    """(key, source) of one image by the precedence above; ``patient`` is its
    ``ImageFileRef.patient``, ``rel`` its relative path, ``listed`` whether it comes
    from a CSV manifest (else a ``patient`` was read from DICOM)."""
    if patient:
        return patient, "manifest" if listed else "dicom"
    name = rel.rsplit("/", 1)[-1]
    if regex is not None:
        key = patient_of(rel, regex) or patient_of(name, regex)
        if key is not None:
            return key, "regex"
    key = patient_of(name, layout_rule)
    return (key, "layout") if key is not None else (None, "none")


def group_images(refs: list, root: Path, *, patient: str | None = None,
                 layout_rule: str = "", listed: bool = False,
                 cache: Path | None = None) -> Grouping:
    """Group ``refs`` (``ImageFileRef``) by patient key and near-duplicate hash.

    ``patient`` is the space's ``data.patient`` regex, ``layout_rule`` the layout's
    ``patient_pattern``; ``cache`` the folder of the hash cache (None: no cache)."""
    names = [ref.path.relative_to(root).as_posix() for ref in refs]
    regex = re.compile(patient) if patient else None
    rule = re.compile(layout_rule) if layout_rule else None
    keys = [patient_key(ref.patient, rel, regex, rule, listed) for ref, rel in zip(refs, names)]
    joined = UnionFind(len(refs))
    first: dict[str, int] = {}
    for i, (key, _) in enumerate(keys):
        if key is not None:
            joined.union(i, first.setdefault(key, i))
    hashes = image_hashes([ref.path for ref in refs], names, root, cache)
    merges = sum(joined.union(a, b) for a, b in near_pairs(hashes, names))
    sources = [source for _, source in keys]
    keyed = {s: sources.count(s) for s in SOURCES if s in sources}
    notes: tuple[str, ...] = ()
    if regex is not None and "regex" not in keyed:
        unmatched = (f"data.patient '{patient}' matched none of the {len(refs)} images' "
                     f"paths or names, so it gave no key")
        notes = (unmatched,)
    groups = joined.named(names)
    return Grouping(groups, keyed, merges, patient, layout_rule, notes)


class UnionFind:
    """Disjoint sets over ``0 .. n-1``."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        """Join the sets of ``a`` and ``b``; whether they were apart."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return False
        self.parent[max(a, b)] = min(a, b)
        return True

    def named(self, names: list[str]) -> dict[str, str]:
        """Name -> the smallest name of its set: the same groups in any order."""
        smallest: dict[int, str] = {}
        for i, name in enumerate(names):
            root = self.find(i)
            smallest[root] = min(smallest.get(root, name), name)
        return {name: smallest[self.find(i)] for i, name in enumerate(names)}


def near_pairs(hashes: list[np.ndarray | None], names: list[str]) -> list[tuple[int, int]]:
    """(i, j) of every two images whose hashes are near-duplicates; images without a
    hash (unreadable) are in none."""
    have = [i for i, h in enumerate(hashes) if h is not None]
    if len(have) < 2:
        return []
    index = {names[i]: i for i in have}
    own = [names[i] for i in have]  # each image its own "split": every pair is a candidate
    pairs = near_duplicates(np.array([hashes[i] for i in have]), own, own)
    return [(index[p.first], index[p.second]) for p in pairs]


def image_hashes(paths: list[Path], names: list[str], root: Path,
                 cache: Path | None) -> list[np.ndarray | None]:
    """The perceptual hash of each image (None: it cannot be decoded), from the cache
    where the file's size and modification time still match, else decoded at
    ``HASH_PIXELS`` (on every core) and added to the cache."""
    stored = _read_hashes(cache, root) if cache else {}
    stamps = [file_stamp(path) for path in paths]
    found: list[np.ndarray | None] = [None] * len(paths)
    todo = []
    for i, (name, stamp) in enumerate(zip(names, stamps)):
        hit = stored.get(name)
        if hit is not None and hit[0] == stamp:
            found[i] = hit[1]
        else:
            todo.append(i)
    if not todo:
        return found
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda i: _hash_file(paths[i]), todo, chunksize=8)
        for i, digest in zip(todo, tqdm(results, total=len(todo), unit="img", leave=False,
                                        disable=None, desc="hashing for near-duplicates")):
            found[i] = digest
            if digest is not None:
                stored[names[i]] = (stamps[i], digest)
    if cache:
        _write_hashes(cache, root, stored)
    return found


def _hash_file(path: Path) -> np.ndarray | None:
    pixels, _, _ = try_read(path, HASH_PIXELS)
    return None if pixels is None else perceptual_hash(pixels)


def file_stamp(path: Path) -> str:
    """Size and modification time; a fixed word for a file that cannot be stat'ed."""
    try:
        info = path.stat()
    except OSError:
        return "unreadable"
    return f"{info.st_size}|{info.st_mtime_ns}"


def _hash_file_of(cache: Path, root: Path) -> Path:
    """One cache file per dataset root."""
    where = hashlib.blake2b(str(Path(root).absolute()).encode(), digest_size=10).hexdigest()
    return cache / f"phash{HASH_CACHE_VERSION}-{where}.npz"


def _read_hashes(cache: Path, root: Path) -> dict[str, tuple[str, np.ndarray]]:
    path = _hash_file_of(cache, root)
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: (stamp, digest) for name, stamp, digest in
                    zip(stored["names"].tolist(), stored["stamps"].tolist(), stored["hashes"])}
    except (OSError, ValueError, KeyError):
        return {}  # none yet, or damaged: hashed again


def _write_hashes(cache: Path, root: Path, stored: dict[str, tuple[str, np.ndarray]]) -> None:
    path = _hash_file_of(cache, root)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    names = sorted(stored)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, names=np.array(names, dtype=str),
                 stamps=np.array([stored[n][0] for n in names], dtype=str),
                 hashes=np.array([stored[n][1] for n in names], dtype=np.uint8).reshape(
                     len(names), -1))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp.exists():
            tmp.unlink()
        warnings.warn(f"could not write the hash cache {path} ({exc}); continuing without it")
