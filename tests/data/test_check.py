"""``covid-tune check``: counts, junk, unreadable files and leaks, on tiny hand-made
folders; exit 2 when a split has nothing decodable, or with ``--strict``."""

from __future__ import annotations

import shutil


from covid_tune.data.check import check_dataset
from covid_tune.cli import main
from helpers import refused, binary_tree, save

BROKEN_PNG = b"\x89PNG\r\n\x1a\n broken"


def test_check_reports_counts_junk_unreadable_and_leaks(tmp_path):
    root = binary_tree(tmp_path / "d")
    (root / "test" / "normal" / "desktop.ini").write_text("x")
    (root / "test" / "normal" / "bad.png").write_bytes(BROKEN_PNG)
    leak = (root / "Train" / "Infected" / "Infected0.png").read_bytes()
    (root / "test" / "Infected" / "copy.png").write_bytes(leak)
    report = check_dataset(str(root), progress=False)
    assert report.usable and report.task == "binary"
    assert report.counts["train"] == {"infected": 3, "normal": 3}
    assert report.counts["test"] == {"infected": 4, "normal": 3}
    assert report.junk == ["test/normal/desktop.ini"]
    assert [p for p, _ in report.unreadable] == ["test/normal/bad.png"]
    assert report.duplicates == [["Train/Infected/Infected0.png", "test/Infected/copy.png"]]
    assert report.sizes == ((40, 30), (40, 30))
    text = "\n".join(report.lines())
    assert "duplicate images across splits: 1" in text and "bad.png" in text
    assert "train: 6 readable (infected 3, normal 3)" in text


def test_duplicates_within_one_split_are_not_a_leak(tmp_path):
    root = binary_tree(tmp_path / "d")
    twin = (root / "Train" / "normal" / "normal0.png").read_bytes()
    (root / "Train" / "Infected" / "twin.png").write_bytes(twin)
    assert check_dataset(str(root), progress=False).duplicates == []


def test_an_unlabelled_split_is_counted_and_sizes_span_the_images(tmp_path):
    root = tmp_path / "d"
    for split in ("Train", "Validation"):
        for cls in ("covid-19", "normal", "pneumonia"):
            save(root / split / cls / "0.png", value=1, size=(50, 20))
    save(root / "Test" / "a.png", value=2, size=(10, 10))
    save(root / "Test" / "b.png", value=3, size=(80, 60))
    report = check_dataset(str(root), progress=False)
    assert report.task == "multilabel"
    assert report.counts["test"] == {"(unlabelled)": 2}
    assert report.sizes == ((10, 10), (80, 60))


def test_check_exits_2_when_a_split_has_no_decodable_image(tmp_path, capsys):
    root = binary_tree(tmp_path / "d")
    for path in (root / "VALIDATION").rglob("*.png"):
        path.write_bytes(BROKEN_PNG)
    assert not check_dataset(str(root), progress=False).usable
    assert main(["check", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("covid-tune: error: ") and err.count("\n") == 1, err
    assert "no image of the validation split(s) can be decoded; replace the files" in err
    assert "validation: 0 readable" in out and "unreadable files: 6" in out
    assert "VALIDATION/normal/normal0.png" in out  # the files to replace are listed


def test_check_strict_refuses_corrupt_file(tmp_path, capsys, binary_data):
    assert main(["check", str(binary_data), "--strict", "--quiet"]) == 0
    assert "unreadable files: 0" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(binary_data, copy)
    (copy / "train" / "normal" / "broken.png").write_bytes(BROKEN_PNG)
    message = refused(capsys, "check", str(copy), "--strict", "--quiet")
    assert "train/normal/broken.png: cannot be decoded" in message
    assert "1 such file(s); remove them or drop --strict" in message
