"""Leaks between splits: patient keys from file names, near-duplicates by perceptual hash,
and what ``check`` reports on a collection that has both."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from covid_tune.cli import main
from covid_tune.core.tasks import LAYOUTS
from covid_tune.data.check import check_dataset
from covid_tune.data.patients import (NEAR_BITS, near_duplicates, patient_of, patient_rule,
                                      patients_across_splits)
from covid_tune.errors import UserError
from helpers import refused

KAGGLE = re.compile(LAYOUTS["kaggle-pneumonia"].patient_pattern)


@pytest.mark.parametrize("name, patient", [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1946_bacteria_4874.jpeg", "person1946"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("COVID-1.png", None),
    ("xperson1_bacteria_1.jpeg", None),
])
def test_kaggles_file_names_give_the_patient(name, patient):
    assert patient_of(name, KAGGLE) == patient


def test_a_users_rule_takes_its_first_group_that_matched():
    rule = patient_rule(r"^p(\d+)-|^(\w+)_scan")
    assert patient_of("p12-a.png", rule) == "12"
    assert patient_of("anna_scan2.png", rule) == "anna"
    assert patient_of("other.png", rule) is None
    assert patient_of("p12-a.png", None) is None


@pytest.mark.parametrize("pattern, says", [("person(", "not a regular expression"),
                                            (r"person\d+", "has no group")])
def test_a_bad_patient_rule_is_refused_by_name(pattern, says):
    with pytest.raises(UserError, match=re.escape(f"--patient {pattern!r}: {says}")):
        patient_rule(pattern)


def test_patients_across_splits_lists_only_those_on_two_sides():
    keyed = {"train": [("a1", "A"), ("a2", "A"), ("b1", "B")],
             "test": [("a3", "A"), ("c1", "C")]}
    (leak,) = patients_across_splits(keyed)
    assert leak.patient == "A" and leak.files == {"train": ["a1", "a2"], "test": ["a3"]}


def flipped(row: np.ndarray, count: int, rng) -> np.ndarray:
    bits = np.unpackbits(row)
    where = rng.choice(bits.size, count, replace=False)
    bits[where] ^= 1
    return np.packbits(bits)


def test_near_duplicates_by_bands_equal_every_pair_compared():
    """The band index finds exactly what comparing every pair finds: planted copies at
    0 to 14 bits, and random hashes (about 128 bits apart) never."""
    rng = np.random.default_rng(0)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8) for _ in range(60)]
    splits = [("train", "test")[i % 2] for i in range(60)]
    for k, distance in enumerate(range(15)):
        hashes.append(flipped(hashes[k], distance, rng))
        splits.append("validation")
    names = [f"f{i}" for i in range(len(hashes))]
    found = {(p.first, p.second, p.bits) for p in near_duplicates(np.array(hashes), names, splits)}
    bits = np.unpackbits(np.array(hashes), axis=1)
    every = {(names[a], names[b], int((bits[a] != bits[b]).sum()))
             for a in range(len(names)) for b in range(a + 1, len(names))
             if splits[a] != splits[b] and (bits[a] != bits[b]).sum() <= NEAR_BITS}
    assert found == every
    assert {d for _, _, d in found} == set(range(NEAR_BITS + 1))


def test_near_duplicates_in_one_split_are_not_a_leak():
    row = np.zeros(32, np.uint8)
    assert near_duplicates(np.array([row, row]), ["a", "b"], ["train", "train"]) == []


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A small Kaggle-layout collection of phantoms with leaks planted: one patient's
    images in train and validation, and a train image re-encoded as JPEG at another size
    in test."""
    from covid_tune.data.synth import generate

    root = tmp_path_factory.mktemp("leaky") / "chest_xray"
    generate(root, "binary", scale=0.006, size=96, seed=4, progress=False,
             layout="kaggle-pneumonia")
    train = sorted((root / "train" / "pneumonia").glob("*.png"))
    val = sorted((root / "val" / "pneumonia").glob("*.png"))
    train[0].rename(train[0].with_name("person7_bacteria_1.png"))
    train[1].rename(train[1].with_name("person7_bacteria_2.png"))
    val[0].rename(val[0].with_name("person7_virus_3.png"))
    source = sorted((root / "train" / "normal").glob("*.png"))[0]
    Image.open(source).resize((80, 80)).save(root / "test" / "normal" / "copy.jpeg",
                                             quality=80)
    return root, source.relative_to(root).as_posix()


def test_check_reports_a_patient_across_splits_and_a_resized_copy(leaky):
    root, source = leaky
    report = check_dataset(str(root), progress=False)
    assert [leak.patient for leak in report.spanning] == ["person7"]
    assert {split: len(files) for split, files in report.spanning[0].files.items()} == {
        "train": 2, "validation": 1}
    assert report.patients == 1 and report.unkeyed == sum(
        sum(c.values()) for c in report.counts.values()) - 3
    assert [(p.first, p.second) for p in report.near] == [(source, "test/normal/copy.jpeg")]
    assert report.duplicates == []  # not byte-identical: only the hash sees it
    text = "\n".join(report.lines())
    assert "near-duplicate pairs across splits (perceptual hash, at most 12 of 256 bits " \
           "apart): 1" in text
    assert "patients with images in more than one split: 1" in text
    assert "person7: train: pneumonia/" not in text and "person7: train: train/pneumonia/" in text


def test_check_takes_a_users_patient_rule_and_refuses_a_bad_one(leaky, tmp_path, capsys):
    root, _ = leaky
    copy = tmp_path / "chest_xray"
    shutil.copytree(root, copy)
    for path in (copy / "test" / "normal").glob("*.png"):
        path.rename(path.with_name(f"case9_{path.name}"))
    (copy / "train" / "normal" / "case9_extra.png").write_bytes(
        next((copy / "test" / "normal").glob("case9_*.png")).read_bytes())
    assert main(["check", str(copy), "--quiet", "--patient", r"^(case\d+)_"]) == 0
    out = capsys.readouterr().out
    # --patient comes before the layout's own rule, which still keys the files it does
    # not match (person7), as a drawn split keys them (covid_tune.data.groups)
    assert "patients with images in more than one split: 2" in out
    assert "case9: " in out and "person7: " in out
    assert "duplicate images across splits: 1" in out
    err = refused(capsys, "check", str(copy), "--quiet", "--patient", "case(")
    assert "--patient 'case(': not a regular expression" in err


def test_check_says_when_the_names_carry_no_patient(tmp_path):
    from helpers import binary_tree

    report = check_dataset(str(binary_tree(tmp_path / "data")), progress=False)
    assert report.patient_rule == "" and report.spanning == []
    assert "pass --patient REGEX" in "\n".join(report.lines())


def test_check_reads_patients_as_a_drawn_split_does_a_manifest_column_first(tmp_path):
    """A manifest's patient column comes before ``--patient``, which comes before the
    layout's rule (``covid_tune.data.groups.patient_key``)."""
    from helpers import save

    lines = ["path,labels,split,patient"]
    for i, (split, patient) in enumerate([("train", "A"), ("train", ""), ("validation", "A"),
                                          ("validation", ""), ("train", "B"),
                                          ("validation", "")]):
        name = f"case{i % 2}_{i}.png"
        save(tmp_path / name, size=(24, 24), value=i)
        lines.append(f"{name},{('normal', 'infected')[i % 2]},{split},{patient}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    report = check_dataset(str(tmp_path / "list.csv"), progress=False)
    assert [leak.patient for leak in report.spanning] == ["A"]
    assert report.patient_rule == "the manifest's patient column" and report.unkeyed == 3
    report = check_dataset(str(tmp_path / "list.csv"), progress=False, patient=r"^(case\d)_")
    assert [leak.patient for leak in report.spanning] == ["case1", "A"]  # most images first
    assert report.patient_rule == r"the manifest's patient column, then ^(case\d)_"
