"""Dataset folders: both layouts, junk, image modes, broken files, labels, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_tune.check import check_dataset
from covid_tune.data import load_dataset, read_gray, scan
from covid_tune.errors import UserError


def save(path: Path, mode: str = "L", size=(40, 30), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    if mode == "I;16":
        pixels = rng.integers(0, 4096, size=size[::-1]).astype(np.uint16)
        Image.fromarray(pixels).save(path)
        return path
    base = Image.fromarray(rng.integers(0, 255, size=size[::-1], dtype=np.uint8), mode="L")
    image = base.convert(mode) if mode != "L" else base
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def binary_tree(root: Path, per_class: int = 3) -> Path:
    """Published spelling is lower case; use odd cases to test the matching."""
    for s, split in enumerate(("Train", "VALIDATION", "test")):
        for c, cls in enumerate(("Infected", "normal")):
            for i in range(per_class):
                save(root / split / cls / f"{cls}{i}.png", value=100 * s + 10 * c + i)
    return root


def multilabel_tree(root: Path) -> Path:
    for split in ("Train", "Validation"):
        for cls in ("covid-19", "normal", "pneumonia"):
            for i in range(2):
                save(root / split / cls / f"{i}.png", value=i)
    for i in range(3):
        save(root / "Test" / f"{i}.png" if i != 2 else root / "Test" / "2.JPG", value=i)
    return root


def test_binary_layout_with_junk(tmp_path):
    root = binary_tree(tmp_path / "d")
    (root / "Train" / "normal" / "desktop.ini").write_text("[.ShellClassInfo]")
    (root / "Train" / ".DS_Store").write_bytes(b"\0\0")
    (root / "test" / "Infected" / "Thumbs.db").write_bytes(b"x")
    layout = scan(root)
    assert layout.task.name == "binary"
    assert {s: len(f) for s, f in layout.files.items()} == {"train": 6, "validation": 6, "test": 6}
    assert len(layout.junk) == 2  # the .DS_Store sits beside the class folders, not in one


def test_binary_labels_positive_is_infected(tmp_path):
    bundle = load_dataset(binary_tree(tmp_path / "d"), image_size=32, progress=False)
    train = bundle.splits["train"]
    for name, target in zip(train.names, train.targets):
        assert target == (1 if "Infected" in name else 0)
    assert train.images.shape == (6, 32, 32) and train.images.dtype == np.uint8


def test_multilabel_bits_and_flat_test(tmp_path):
    bundle = load_dataset(multilabel_tree(tmp_path / "d"), "multilabel", 32, progress=False)
    train = bundle.splits["train"]
    bits = {name.split("/")[1]: tuple(t) for name, t in zip(train.names, train.targets)}
    assert bits == {"covid-19": (1, 0, 1), "normal": (0, 1, 0), "pneumonia": (0, 0, 1)}
    assert bundle.splits["test"].targets.shape == (3, 0)
    assert sorted(bundle.splits["test"].names) == ["Test/0.png", "Test/1.png", "Test/2.JPG"]


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "P", "CMYK", "1", "LA"])
def test_every_image_mode_becomes_8_bit_gray(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = save(tmp_path / f"x{suffix}", mode=mode, size=(60, 40))
    pixels, original = read_gray(path, 32)
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8 and original == (60, 40)
    if mode == "I;16":
        assert pixels.max() > 200  # 12-bit data stretched to the full 8-bit range


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, 20:60] = 255  # a bright centre band, half the width
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    out, _ = read_gray(path, 20)
    assert out.shape == (20, 20) and out[:, 2:18].min() == 255


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    root = binary_tree(tmp_path / "d")
    good = (root / "Train" / "normal" / "normal0.png").read_bytes()
    (root / "Train" / "normal" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "Train" / "normal" / "empty.png").write_bytes(b"")
    (root / "Train" / "normal" / "text.jpg").write_text("not an image")
    bundle = load_dataset(root, image_size=32, progress=False)
    assert len(bundle.splits["train"]) == 6
    assert sorted(n.rsplit("/", 1)[1] for n, _ in bundle.skipped) == [
        "empty.png", "text.jpg", "truncated.png"]
    with pytest.raises(UserError, match="cannot be decoded.*3 such file"):
        load_dataset(root, image_size=32, strict=True, progress=False, use_cache=False)


@pytest.mark.parametrize("make, expected", [
    (lambda r: None, "no such folder"),
    (lambda r: binary_tree(r) and os.rename(r / "VALIDATION", r / "val"), "missing the validation/"),
    (lambda r: multilabel_tree(r), "this is the multilabel layout, not binary; pass --task multilabel"),
    (lambda r: (r / "train" / "infected").mkdir(parents=True), "neither layout found"),
])
def test_layout_mistakes(tmp_path, make, expected):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(UserError, match=expected):
        scan(root, "binary")


def test_class_of_only_junk_is_refused(tmp_path):
    root = binary_tree(tmp_path / "d")
    for path in (root / "Train" / "normal").iterdir():
        path.unlink()
    (root / "Train" / "normal" / "desktop.ini").write_text("x")
    with pytest.raises(UserError, match="normal: no .png/.jpg images in this class folder"):
        scan(root)


def test_binary_folder_given_as_multilabel(tmp_path):
    with pytest.raises(UserError, match="binary layout, not multilabel"):
        scan(binary_tree(tmp_path / "d"), "multilabel")


def test_cache_matches_direct_decode_and_is_rebuilt_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_TUNE_CACHE", str(tmp_path / "cache"))
    root = binary_tree(tmp_path / "d")
    first = load_dataset(root, image_size=24, progress=False)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_dataset(root, image_size=24, progress=False)
    train = again.splits["train"]
    for name, pixels in zip(train.names, train.images):
        np.testing.assert_array_equal(pixels, read_gray(root / name, 24)[0])
    np.testing.assert_array_equal(first.splits["train"].images, train.images)
    changed = root / train.names[0]
    save(changed, value=250)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = load_dataset(root, image_size=24, progress=False)
    np.testing.assert_array_equal(rebuilt.splits["train"].images[0], read_gray(changed, 24)[0])
    assert rebuilt.fingerprint != first.fingerprint
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_check_reports_counts_junk_unreadable_and_leaks(tmp_path):
    root = binary_tree(tmp_path / "d")
    (root / "test" / "normal" / "desktop.ini").write_text("x")
    (root / "test" / "normal" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    leak = (root / "Train" / "Infected" / "Infected0.png").read_bytes()
    (root / "test" / "Infected" / "copy.png").write_bytes(leak)
    report = check_dataset(str(root), progress=False)
    assert report.counts["train"] == {"infected": 3, "normal": 3}
    assert report.counts["test"] == {"infected": 4, "normal": 3}
    assert report.junk == ["test/normal/desktop.ini"]
    assert [p for p, _ in report.unreadable] == ["test/normal/bad.png"]
    assert report.duplicates == [["Train/Infected/Infected0.png", "test/Infected/copy.png"]]
    assert report.sizes == ((40, 30), (40, 30))
    text = "\n".join(report.lines())
    assert "duplicate images across splits: 1" in text and "bad.png" in text
