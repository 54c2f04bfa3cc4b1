"""``covid-tune check``: is this folder a usable dataset, and what is in it?

Counts per split and class, junk skipped, files that cannot be decoded (by path),
the range of image sizes, and the leaks between splits: exact-duplicate images (a known
leak in the public COVID-19 collections), near-duplicates by perceptual hash, and
patients with images in more than one split (``covid_tune.data.patients``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from covid_tune.core.space import DataSpec
from covid_tune.data.dataset import decode_all, scan
from covid_tune.data.groups import SOURCES, patient_key
from covid_tune.data.patients import (HASH_PIXELS, NEAR_BITS, NearDuplicate, SpanningPatient,
                                      near_duplicates, patient_rule, patients_across_splits,
                                      perceptual_hash)

PROBE_SIZE = HASH_PIXELS
"""Every file is fully decoded (and resized to this) to prove it is readable; the
perceptual hash is taken of that."""
EXAMPLES = 10
"""Leaks listed by name; the counts cover all."""


@dataclass
class CheckReport:
    root: str
    task: str
    counts: dict[str, dict[str, int]]
    junk: list[str]
    unreadable: list[tuple[str, str]]
    sizes: tuple[tuple[int, int], tuple[int, int]] | None
    """(smallest (width, height), largest (width, height)) by pixel count."""
    duplicates: list[list[str]] = field(default_factory=list)
    """Groups of byte-identical files found in more than one split."""
    layout: str = ""
    """Which published layout was found, with its folders and class mapping."""
    near: list[NearDuplicate] = field(default_factory=list)
    """Pairs of images in different splits that are near-duplicates by perceptual hash."""
    patient_rule: str = ""
    """The file-name rule patients were read by, or empty: none known."""
    patients: int = 0
    """Patients found by the rule."""
    unkeyed: int = 0
    """Readable files the rule found no patient in."""
    spanning: list[SpanningPatient] = field(default_factory=list)
    """Patients with images in more than one split."""

    @property
    def usable(self) -> bool:
        return all(sum(c.values()) > 0 for c in self.counts.values())

    def lines(self) -> list[str]:
        out = [f"{self.root}: {self.task} task, {self.layout}"]
        for split, classes in self.counts.items():
            detail = ", ".join(f"{name} {n}" for name, n in classes.items())
            out.append(f"  {split}: {sum(classes.values())} readable ({detail})")
        if self.sizes:
            (w0, h0), (w1, h1) = self.sizes
            out.append(f"  image sizes: {w0}x{h0} .. {w1}x{h1}")
        out.append(f"  junk files skipped: {len(self.junk)}")
        out.append(f"  unreadable files: {len(self.unreadable)}")
        out += [f"    {path}: {why}" for path, why in self.unreadable]
        out.append(f"  duplicate images across splits: {len(self.duplicates)}")
        out += [f"    {' = '.join(group)}" for group in self.duplicates[:EXAMPLES]]
        out.append(f"  near-duplicate pairs across splits (perceptual hash, at most "
                   f"{NEAR_BITS} of 256 bits apart): {len(self.near)}")
        out += [f"    {pair.first} ~ {pair.second} ({pair.bits} bits)"
                for pair in self.near[:EXAMPLES]]
        out += self.patient_lines()
        return out

    def patient_lines(self) -> list[str]:
        if not self.patient_rule:
            return ["  patients: the file names carry none this layout knows; pass "
                    "--patient REGEX (its first group is the patient) to check for "
                    "patients across splits"]
        out = [f"  patients ({self.patient_rule}): {self.patients}, "
               f"{self.unkeyed} file(s) matched no patient"]
        out.append(f"  patients with images in more than one split: {len(self.spanning)}")
        for leak in self.spanning[:EXAMPLES]:
            where = "; ".join(f"{split}: {', '.join(files[:3])}"
                              + (f" and {len(files) - 3} more" if len(files) > 3 else "")
                              for split, files in leak.files.items())
            out.append(f"    {leak.patient}: {where}")
        return out


def check_dataset(root: str, task: str | None = None, progress: bool = True,
                  patient: str | None = None) -> CheckReport:
    """Scan and fully decode every image of a dataset folder. Each image's patient is
    found as a drawn split finds it (``covid_tune.data.groups.patient_key``): a
    manifest's ``patient`` column or DICOM's ``PatientID``, then ``patient`` (a regular
    expression whose first group is the patient, searched in the relative path, then
    the file name), then the layout's own file-name rule."""
    regex = patient_rule(patient) if patient else None
    layout = scan(root, task, spec=DataSpec(patient=patient) if patient else None)
    pattern = layout.kind.patient_pattern
    rule = re.compile(pattern) if pattern else None
    listed = layout.listing is not None
    sources: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    unreadable, sizes, by_hash = [], [], defaultdict(list)
    hashes, names, splits = [], [], []
    keyed: dict[str, list[tuple[str, str]]] = defaultdict(list)
    unkeyed = 0
    for split, refs in layout.files.items():
        results = decode_all([r.path for r in refs], PROBE_SIZE, f"checking {split}", progress)
        tally: Counter = Counter()
        for ref, (pixels, size, why) in zip(refs, results):
            rel = ref.path.relative_to(layout.root).as_posix()
            if pixels is None:
                unreadable.append((rel, why))
                continue
            tally[ref.class_dir or "(unlabelled)"] += 1
            sizes.append(size)
            hashes.append(perceptual_hash(pixels))
            names.append(rel)
            splits.append(split)
            key, source = patient_key(ref.patient, rel, regex, rule, listed)
            sources.add(source)
            if key is None:
                unkeyed += 1
            else:
                keyed[split].append((rel, key))
            by_hash[hashlib.blake2b(ref.path.read_bytes(), digest_size=16).digest()].append(
                (split, rel))
        counts[split] = dict(sorted(tally.items()))
    duplicates = [[rel for _, rel in group] for group in by_hash.values()
                  if len({split for split, _ in group}) > 1]
    by_area = sorted(sizes, key=lambda s: s[0] * s[1])
    return CheckReport(
        root=str(layout.root), task=layout.task.name, counts=counts,
        junk=[p.relative_to(layout.root).as_posix() for p in layout.junk],
        unreadable=unreadable, sizes=(by_area[0], by_area[-1]) if by_area else None,
        duplicates=duplicates, layout=describe_layout(layout),
        near=near_duplicates(np.array(hashes), names, splits) if hashes else [],
        patient_rule=rules_used(sources, patient, pattern),
        patients=len({key for items in keyed.values() for _, key in items}),
        unkeyed=unkeyed if rules_used(sources, patient, pattern) else 0,
        spanning=patients_across_splits(keyed))


def rules_used(sources: set[str], patient: str | None, pattern: str) -> str:
    """Where the patient keys come from, in order of precedence (``the manifest's
    patient column, then`` a regex); empty when nothing could give one."""
    rules = [SOURCES[s] for s in ("manifest", "dicom") if s in sources]
    return ", then ".join(rules + [rule for rule in (patient, pattern) if rule])


SMALL_VALIDATION = 100
"""Fewer validation images than this make a choosing split that moves with every image."""


def describe_layout(layout) -> str:
    """``Kaggle "..." (splits train, val, test; classes NORMAL -> normal, ...)``, and a
    warning when the validation split is tiny."""
    kind = layout.kind
    drawn = dict(kind.made_splits)
    folders = [kind.split_dirs[s] for s in layout.files if s in kind.split_dirs
               and s not in drawn]
    listed = layout.listing is not None
    splits = (f"splits {', '.join(folders)}" if folders
              else "no split column" if listed else "no split folders")
    if drawn:
        made = ", ".join(f"{split} {fraction:.0%}" for split, fraction in drawn.items())
        splits += (f"; {made} of each class drawn from {'the rows' if listed else 'train'} "
                   f"with a fixed seed, a patient's images on one side (a run records the "
                   f"split)")
    text = f"{kind.title} ({splits}; classes {kind.mapping()})"
    size = len(layout.files.get("validation", []))
    if size < SMALL_VALIDATION:
        text += (f"\n  warning: the validation split holds only {size} images; a score on so "
                 f"few moves by whole points per image; in the space, draw validation from "
                 f"train (data: {{split: {{validation: 0.15}}}}) or choose on a part of "
                 f"train (selection: {{holdout: 0.15}})")
    return text
