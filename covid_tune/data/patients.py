"""Leaks between splits: which patient an image belongs to, patients whose images sit in
more than one split, and near-duplicate images across splits.

A patient key comes from the file name: a layout's own rule (Kaggle's pneumonia
collection names files ``person1_bacteria_1.jpeg`` and ``IM-0115-0001.jpeg``), or a
regular expression given by the user (``check --patient REGEX``), whose first group
that matched is the key. A file the rule does not match has no key and is not counted.

Near-duplicates are found by perceptual hash (``imagehash.phash`` with 16 x 16 = 256
bits, on the image decoded to 64 px): two images whose hashes differ in at most
``NEAR_BITS`` bits. On this repository's phantoms a re-encoded copy differs by about 2
bits, a copy resized to 100 px by 6 to 8, and two different phantoms by at least 20
(``docs/data.md``). A perceptual hash does not see through a crop or a shift of a few
pixels: those copies are not found.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from covid_tune.errors import UserError

HASH_SIDE = 16
"""``phash``'s ``hash_size``: a 16 x 16 bit hash (256 bits)."""
HASH_PIXELS = 64
"""The side of the decoded image the hash is taken of."""
NEAR_BITS = 12
"""Images whose hashes differ in at most this many of the 256 bits are near-duplicates."""


def patient_rule(pattern: str) -> re.Pattern:
    """``pattern`` compiled, or a UserError naming it."""
    try:
        rule = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--patient {pattern!r}: not a regular expression ({exc}); give "
                        f"one whose first group is the patient, e.g. '^(person\\d+)_'") from None
    if rule.groups < 1:
        raise UserError(f"--patient {pattern!r}: has no group; put the patient part of the "
                        f"file name in parentheses, e.g. '^(person\\d+)_'")
    return rule


def patient_of(name: str, rule: re.Pattern | None) -> str | None:
    """The patient key of a file name by ``rule`` (its first group that matched), or None."""
    match = rule.search(name) if rule else None
    if match is None:
        return None
    return next((group for group in match.groups() if group), None)


@dataclass
class SpanningPatient:
    """A patient with images in more than one split."""

    patient: str
    files: dict[str, list[str]]
    """Split -> the patient's files there (relative paths)."""


def patients_across_splits(keyed: dict[str, list[tuple[str, str]]]) -> list[SpanningPatient]:
    """The patients of ``keyed`` (split -> (relative path, patient)) found in more than one
    split, most images first."""
    seen: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split, items in keyed.items():
        for rel, patient in items:
            seen[patient][split].append(rel)
    spanning = [SpanningPatient(p, dict(files)) for p, files in seen.items() if len(files) > 1]
    return sorted(spanning, key=lambda s: (-sum(map(len, s.files.values())), s.patient))


def perceptual_hash(pixels: np.ndarray) -> np.ndarray:
    """The 256-bit perceptual hash of a decoded grey image, as 32 bytes."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIDE).hash
    return np.packbits(bits.flatten())


@dataclass
class NearDuplicate:
    first: str
    second: str
    bits: int
    """How many of the 256 hash bits differ (0: the same picture to the hash)."""


def near_duplicates(hashes: np.ndarray, names: list[str], splits: list[str],
                    near: int = NEAR_BITS) -> list[NearDuplicate]:
    """Pairs of images in different splits whose hashes (one row of packed bits each)
    differ in at most ``near`` bits, closest first.

    Each hash is cut into ``near + 1`` bands; by the pigeonhole rule two hashes that
    differ in at most ``near`` bits are equal on some band, so only images that share a
    band are compared, not every pair."""
    if len(hashes) < 2:
        return []
    bits = np.unpackbits(hashes, axis=1)
    bounds = np.linspace(0, bits.shape[1], near + 2).astype(int)
    candidates: set[tuple[int, int]] = set()
    for low, high in zip(bounds[:-1], bounds[1:]):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for index, band in enumerate(np.packbits(bits[:, low:high], axis=1)):
            buckets[band.tobytes()].append(index)
        for members in buckets.values():
            candidates.update((a, b) for i, a in enumerate(members) for b in members[i + 1:]
                              if splits[a] != splits[b])
    pairs = []
    for a, b in candidates:
        differ = int(np.count_nonzero(bits[a] != bits[b]))
        if differ <= near:
            pairs.append(NearDuplicate(names[a], names[b], differ))
    return sorted(pairs, key=lambda p: (p.bits, p.first, p.second))
