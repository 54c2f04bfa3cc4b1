"""``covid-tune check``: is this folder a usable dataset, and what is in it?

Counts per split and class, junk skipped, files that cannot be decoded (by path),
the range of image sizes, and exact-duplicate images across splits (a known leak in
the public COVID-19 collections).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from covid_tune.data.dataset import decode_all, scan

PROBE_SIZE = 32
"""Every file is fully decoded (and resized to this) to prove it is readable."""


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
        out += [f"    {' = '.join(group)}" for group in self.duplicates[:20]]
        return out


def check_dataset(root: str, task: str | None = None, progress: bool = True) -> CheckReport:
    """Scan and fully decode every image of a dataset folder."""
    layout = scan(root, task)
    counts: dict[str, dict[str, int]] = {}
    unreadable, sizes, by_hash = [], [], defaultdict(list)
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
        duplicates=duplicates, layout=describe_layout(layout))


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
                   f"with a fixed seed (a run records the split)")
    text = f"{kind.title} ({splits}; classes {kind.mapping()})"
    size = len(layout.files.get("validation", []))
    if size < SMALL_VALIDATION:
        text += (f"\n  warning: the validation split holds only {size} images; a score on so "
                 f"few moves by whole points per image; in the space, draw validation from "
                 f"train (data: {{split: {{validation: 0.15}}}}) or choose on a part of "
                 f"train (selection: {{holdout: 0.15}})")
    return text
