"""Patient-grouped splits: every split covid-tune draws (validation from a collection or
a manifest's rows, the selection holdout of Train) keeps a patient's images, and
near-duplicate copies of an image, on one side, and stays stratified by class."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import save
from PIL import Image

from covid_tune.core.space import DataSpec
from covid_tune.core.tasks import LAYOUTS
from covid_tune.data.dataset import (
    assignment,
    hold_out,
    load_dataset,
    scan,
    stratified_parts,
    train_grouping,
)
from covid_tune.data.groups import group_images, grouping_line, patient_key

KAGGLE = re.compile(LAYOUTS["kaggle-pneumonia"].patient_pattern)


@pytest.mark.parametrize("patient, rel, listed, key, source", [
    ("P7", "images/person1_a.png", True, "P7", "manifest"),    # the manifest column first
    ("P7", "train/x/person1_a.png", False, "P7", "dicom"),     # DICOM's PatientID
    (None, "site3/case12/a.png", False, "case12", "regex"),    # data.patient on the path
    (None, "train/x/case9_a.png", False, "case9", "regex"),    # ... then on the name
    (None, "train/x/person4_virus_2.jpeg", False, "person4", "layout"),  # the layout's rule
    (None, "train/x/0b1e.png", False, None, "none"),           # none: its own group
])
def test_the_patient_key_comes_from_the_first_rule_that_gives_one(patient, rel, listed, key,
                                                                   source):
    regex = re.compile(r"^[^/]+/(case\d+)/|^(case\d+)_")
    assert patient_key(patient, rel, regex, KAGGLE, listed) == (key, source)


def groups_of(sizes: list[int], rng) -> tuple[list[str], list[str]]:
    """Items of groups of the given sizes, each group mostly of one class (one in ten
    groups mixed), classes about 60 / 30 / 10 %, in a shuffled (name) order."""
    strata, groups = [], []
    for g, size in enumerate(sizes):
        main = rng.choice(["normal", "pneumonia", "covid"], p=[0.6, 0.3, 0.1])
        for _ in range(size):
            mixed = rng.random() < 0.1
            strata.append(rng.choice(["normal", "pneumonia"]) if mixed else main)
            groups.append(f"p{g}")
    order = rng.permutation(len(strata))
    return [strata[i] for i in order], [groups[i] for i in order]


def test_groups_stay_whole_and_every_class_stays_close_to_its_fraction():
    """Small groups (1 to 4 images): each group goes wholly to one part, and every
    class's share of each part is within 2 points of the fraction asked for."""
    rng = np.random.default_rng(0)
    strata, groups = groups_of(rng.integers(1, 5, 400).tolist(), rng)
    parts = stratified_parts(strata, [0.15, 0.1], seed=3, groups=groups)
    where = {}
    for p, part in enumerate(parts):
        for i in part:
            assert where.setdefault(groups[i], p) == p  # a group in one part only
    rest = set(range(len(strata))) - {i for part in parts for i in part}
    assert not {groups[i] for i in rest} & set(where)
    totals = Counter(strata)
    for part, fraction in zip(parts, [0.15, 0.1]):
        taken = Counter(strata[i] for i in part)
        for cls, n in totals.items():
            assert abs(taken[cls] / n - fraction) <= 0.02, (cls, taken[cls], n)
    assert stratified_parts(strata, [0.15, 0.1], seed=3, groups=groups) == parts
    renamed = [f"other-{g}" for g in groups]  # only which items share a group counts
    assert stratified_parts(strata, [0.15, 0.1], seed=3, groups=renamed) == parts
    assert stratified_parts(strata, [0.15, 0.1], seed=4, groups=groups) != parts


def test_every_item_its_own_group_is_the_per_image_draw():
    rng = np.random.default_rng(1)
    strata = rng.choice(["a", "b", "c"], 300, p=[0.7, 0.25, 0.05]).tolist()
    for seed in range(5):
        plain = stratified_parts(strata, [0.15, 0.15], seed)
        assert stratified_parts(strata, [0.15, 0.15], seed, list(range(300))) == plain


def test_a_class_held_by_one_patient_stays_in_the_rest_and_a_big_group_is_not_forced_in():
    strata = ["covid"] * 5 + ["normal"] * 40
    groups = ["c"] * 5 + [f"n{i // 2}" for i in range(40)]
    (part,) = stratified_parts(strata, [0.2], seed=0, groups=groups)
    assert not any(strata[i] == "covid" for i in part)
    assert Counter(groups[i] for i in part).most_common(1)[0][1] == 2 and len(part) == 8
    # one group far over the quota and many small ones: the small ones fill it
    strata, groups = ["x"] * 40, ["big"] * 20 + [f"s{i}" for i in range(20)]
    (part,) = stratified_parts(strata, [0.2], seed=0, groups=groups)
    assert len(part) == 8 and "big" not in {groups[i] for i in part}


def listed(root: Path, rows: list[tuple[str, str, str]], split: bool = False) -> Path:
    """Noise PNGs (each different) listed in a CSV manifest with a patient column."""
    lines = ["path,labels,patient" + (",split" if split else "")]
    for i, (name, label, patient) in enumerate(rows):
        save(root / "images" / name, size=(24, 24), value=i)
        lines.append(f"images/{name},{label},{patient}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv"


def sides(layout) -> dict[str, set[str]]:
    """Patient key -> the splits its images are in."""
    found: dict[str, set[str]] = {}
    for split, refs in layout.files.items():
        for ref in refs:
            found.setdefault(ref.patient, set()).add(split)
    return found


def test_a_manifests_drawn_validation_keeps_each_patient_on_one_side(tmp_path):
    rows = [(f"{cls}{p}_{k}.png", cls, f"{cls}-p{p}")
            for cls, patients in (("normal", 30), ("infected", 20))
            for p in range(patients) for k in range(1 + p % 3)]
    csv = listed(tmp_path / "m", rows)
    layout = scan(csv, "binary")
    assert all(len(s) == 1 for s in sides(layout).values())
    totals = Counter(label for _, label, _ in rows)  # normal 60, infected 39
    counts = Counter(r.class_dir for r in layout.files["validation"])
    assert all(abs(counts[cls] / n - 0.15) <= 0.05 for cls, n in totals.items())
    grouping = layout.grouping
    assert grouping.keyed == {"manifest": 99} and grouping.count == 50
    assert grouping.near_merges == 0
    assert "99 images in 50 patient groups (keys: the manifest's patient column 99; 0 " \
           "near-duplicate merge(s))" in grouping.line()
    assert assignment(scan(csv, "binary")) == assignment(layout)  # the same every time
    again = scan(csv, "binary", assignment(layout))  # as a reader or resume scans it
    assert assignment(again) == assignment(layout) and again.grouping is None


def kaggle_like(root: Path, patients: int = 24) -> Path:
    """The Kaggle pneumonia layout with its file names: personN_bacteria_K.jpeg (1 to 4
    images a patient) and IM-NNNN-000K.jpeg, every image different noise."""
    value = 0
    for split, count in (("train", patients), ("val", 2), ("test", 2)):
        for p in range(count):
            for k in range(1 + p % 4):
                value += 1
                save(root / split / "PNEUMONIA" / f"person{p}_bacteria_{k}.jpeg",
                     size=(32, 32), value=value)
                value += 1
                save(root / split / "NORMAL" / f"IM-{p:04d}-{k:04d}.jpeg", size=(32, 32),
                     value=value)
    return root


def test_a_kaggle_like_layout_keeps_patients_together_in_both_draws(tmp_path):
    """Validation drawn from train (``data: {split: ...}``) and the selection holdout,
    both by the layout's own file-name rule."""
    root = kaggle_like(tmp_path / "chest_xray")
    layout = scan(root, spec=DataSpec(split=(("validation", 0.2),)))
    patient = {r.path.name: KAGGLE.match(r.path.name) for refs in layout.files.values()
               for r in refs}
    split_of = {}
    for split, refs in layout.files.items():
        for ref in refs:
            key = next(g for g in patient[ref.path.name].groups() if g)
            assert split_of.setdefault((ref.path.parts[-3], key), split) == split
    assert layout.grouping.keyed == {"layout": 120}
    assert layout.files["validation"]

    plain = scan(root)  # split folders: only the holdout is drawn
    assert plain.grouping is None
    train = load_dataset(plain, "binary", 16, progress=False).splits["train"]
    grouping = train_grouping(plain)
    assert plain.grouping is grouping and grouping.count == 48
    held = set(hold_out(train, 0.25, seed=1, groups=grouping.groups))
    for name in train.names:
        together = {n for n in train.names if grouping.groups[n] == grouping.groups[name]}
        assert (together <= held) or not (together & held)
    assert 0.15 <= len(held) / len(train) <= 0.35
    assert hold_out(train, 0.25, seed=1, groups=grouping.groups) == sorted(held)


def phantom_collection(root: Path) -> Path:
    from covid_tune.data.synth import generate

    generate(root, "multilabel", scale=0.01, size=96, progress=False,
             layout="covid-radiography")
    return root


def test_near_duplicate_copies_land_on_the_same_side(tmp_path):
    """Ten images each with a copy re-encoded as JPEG at another size, in a collection
    without patient keys: each copy joins its original's group and split."""
    root = phantom_collection(tmp_path / "COVID-19_Radiography_Dataset")
    originals = sorted((root / "normal" / "images").glob("*.png"))[:10]
    for k, path in enumerate(originals):
        Image.open(path).resize((80, 80)).save(path.with_name(f"copy{k}.jpeg"), quality=80)
    layout = scan(root)
    grouping = layout.grouping
    assert grouping.near_merges >= 10 and grouping.keyed == {"none": len(grouping.groups)}
    split_of = {r.path.name: s for s, refs in layout.files.items() for r in refs}
    for k, path in enumerate(originals):
        rel = path.relative_to(root).as_posix()
        assert grouping.groups[rel] == grouping.groups[rel.replace(path.name, f"copy{k}.jpeg")]
        assert split_of[path.name] == split_of[f"copy{k}.jpeg"]


def test_a_regex_that_matches_nothing_leaves_every_image_its_own_group_and_says_so(tmp_path):
    rows = [(f"img{i}.png", ("normal", "infected")[i % 2], "") for i in range(20)]
    csv = listed(tmp_path / "m", rows)
    layout = scan(csv, "binary", spec=DataSpec(patient=r"^(case\d+)_"))
    grouping = layout.grouping
    assert grouping.count == 20 and grouping.keyed == {"none": 20}
    note = ("data.patient '^(case\\d+)_' matched none of the 20 images' paths or names, so "
            "it gave no key")
    assert grouping.notes == (note,)
    assert "matched none of the 20 images" in grouping.line()
    record = grouping.record()
    assert record["patient"] == r"^(case\d+)_" and grouping_line(record) == grouping.line()


def test_hashes_are_cached_by_path_size_and_time(tmp_path, monkeypatch):
    from covid_tune.data import groups

    rows = [(f"img{i}.png", ("normal", "infected")[i % 2], "") for i in range(6)]
    csv = listed(tmp_path / "m", rows)
    refs = [r for split in scan(csv, "binary").files.values() for r in split]
    calls = []
    real = groups._hash_file
    monkeypatch.setattr(groups, "_hash_file", lambda path: calls.append(path) or real(path))
    cache = tmp_path / "cache"
    first = group_images(refs, csv.parent, cache=cache)
    assert len(calls) == 6
    assert group_images(refs, csv.parent, cache=cache) == first and len(calls) == 6
    save(refs[0].path, size=(24, 24), value=99)  # changed: hashed again, alone
    group_images(refs, csv.parent, cache=cache)
    assert calls[6:] == [refs[0].path]
