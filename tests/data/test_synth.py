"""Synthetic phantoms: layouts, counts, determinism, and that the classes differ by
structure rather than by mean brightness."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_tune.errors import UserError
from covid_tune.data.synth import (CLASS_IDS, PHANTOM_NOTE, SPLIT_IDS, draw_phantom,
                                   folder_layout, generate, phantom_kind, plan_images,
                                   scaled_counts)

SIZE = 48


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("binary") / "data"
    return out, generate(out, "binary", scale=0.02, size=SIZE, seed=0, progress=False)


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("multilabel") / "data"
    return out, generate(out, "multilabel", scale=0.01, size=SIZE, seed=0, progress=False)


def files_by_folder(root: Path) -> dict[str, int]:
    return {
        str(folder.relative_to(root)): len(list(folder.glob("*.png")))
        for folder in root.rglob("*")
        if folder.is_dir() and not any(p.is_dir() for p in folder.iterdir())
    }


def load(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255 for p in paths])


def best_threshold_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the best rule 'class 1 iff value > t' (or its reverse) over all t."""
    ordered = labels[np.argsort(values)]
    ones_left = np.concatenate([[0], np.cumsum(ordered)])
    zeros_left = np.arange(len(ordered) + 1) - ones_left
    correct = zeros_left + (ordered.sum() - ones_left)
    accuracy = correct / len(ordered)
    return float(np.maximum(accuracy, 1 - accuracy).max())


def test_binary_layout_and_counts(binary):
    out, counts = binary
    assert counts == {
        "train": {"infected": 98, "normal": 142},
        "validation": {"infected": 12, "normal": 18},
        "test": {"infected": 12, "normal": 18},
    }
    on_disk = files_by_folder(out)
    expected = {f"{s}/{c}": n for s, classes in counts.items() for c, n in classes.items()}
    assert on_disk == expected
    name = next((out / "train" / "normal").glob("*.png")).stem
    assert len(name) == 36 and name.count("-") == 4


def test_multilabel_layout_counts_and_flat_test(multilabel):
    out, counts = multilabel
    assert counts["Train"] == {"covid-19": 2, "normal": 40, "pneumonia": 20}
    assert counts["Validation"] == {"covid-19": 2, "normal": 4, "pneumonia": 2}
    assert sorted(p.name for p in out.iterdir()) == ["Test", "Train", "Validation"]
    for split in ("Train", "Validation"):
        for cls, n in counts[split].items():
            assert len(list((out / split / cls).glob("*.png"))) == n
    test_files = list((out / "Test").iterdir())
    assert all(p.is_file() for p in test_files)
    n_test = sum(counts["Test"].values())
    assert sorted(p.name for p in test_files) == sorted(f"{i}.png" for i in range(n_test))


def test_images_are_8bit_grayscale_of_requested_size(binary, multilabel):
    for out, _ in (binary, multilabel):
        for path in list(out.rglob("*.png"))[::25]:
            with Image.open(path) as image:
                assert image.mode == "L" and image.size == (SIZE, SIZE)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def snapshot(seed: int, name: str) -> dict[str, bytes]:
        out = tmp_path / name
        generate(out, "multilabel", scale=0.003, size=32, seed=seed, progress=False)
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}

    first, again, other = snapshot(1, "a"), snapshot(1, "b"), snapshot(2, "c")
    assert first == again
    assert set(first) != set(other)
    assert first["Test/0.png"] != other["Test/0.png"]


def test_mean_brightness_does_not_separate_classes_but_lung_structure_does(binary):
    out, _ = binary
    normal = sorted(out.glob("*/normal/*.png"))
    infected = sorted(out.glob("*/infected/*.png"))
    images = load(normal + infected)
    labels = np.array([0] * len(normal) + [1] * len(infected))
    means = images.mean(axis=(1, 2))
    assert best_threshold_accuracy(means, labels) < 0.7  # the majority class alone gives 0.59
    rows = slice(int(0.3 * SIZE), int(0.7 * SIZE))
    left = slice(int(0.12 * SIZE), int(0.38 * SIZE))
    right = slice(int(0.62 * SIZE), int(0.88 * SIZE))
    lungs = np.concatenate([images[:, rows, left], images[:, rows, right]], axis=2)
    bright_in_lungs = (lungs > means[:, None, None]).mean(axis=(1, 2))
    assert bright_in_lungs[labels == 1].mean() > bright_in_lungs[labels == 0].mean()
    assert best_threshold_accuracy(bright_in_lungs, labels) > 0.8


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"task": "tertiary"}, "task"),
        ({"scale": 0}, "scale"),
        ({"scale": 1.5}, "scale"),
        ({"size": 16}, "size"),
        ({"contrast": 0}, "contrast"),
        ({"noise": -1}, "noise"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, argument):
    args = {"task": "binary", "scale": 0.01, "size": 32, "progress": False} | kwargs
    with pytest.raises(UserError, match=f"^{argument}:"):
        generate(tmp_path / "data", **args)
    assert not (tmp_path / "data").exists()


def test_non_empty_output_folder_is_refused(tmp_path):
    (tmp_path / "old.png").write_bytes(b"")
    with pytest.raises(UserError, match="choose an empty folder"):
        generate(tmp_path, "binary", scale=0.01, size=32, progress=False)


def test_note_says_synthetic():
    assert "synthetic" in PHANTOM_NOTE and "clinical" in PHANTOM_NOTE


def test_phantoms_in_the_kaggle_pneumonia_layout_are_read_back_as_written(tmp_path):
    """The same phantoms as the assignment layout (same names, same pixels), in
    chest_xray's folders: scan finds the layout and every class where synth put it."""
    from covid_tune.data.dataset import scan

    kaggle = generate(tmp_path / "k", "binary", scale=0.002, size=32, seed=0,
                      progress=False, layout="kaggle-pneumonia")
    plain = generate(tmp_path / "a", "binary", scale=0.002, size=32, seed=0, progress=False)
    assert kaggle == {"train": {"pneumonia": 10, "normal": 14},
                      "val": {"pneumonia": 2, "normal": 2},
                      "test": {"pneumonia": 2, "normal": 2}}
    layout = scan(tmp_path / "k")
    assert layout.kind.name == "kaggle-pneumonia"
    assert sum(len(refs) for refs in layout.files.values()) == sum(
        sum(c.values()) for c in plain.values())
    same = (tmp_path / "k" / "train" / "pneumonia").iterdir()
    first = next(same)
    assert first.read_bytes() == (tmp_path / "a" / "train" / "infected" / first.name).read_bytes()
    with pytest.raises(UserError, match="'kaggle-pneumonia' is not a multilabel layout"):
        generate(tmp_path / "m", "multilabel", layout="kaggle-pneumonia", progress=False)


def test_phantoms_in_the_covid_radiography_layout_are_split_and_the_split_kept(tmp_path):
    """One folder per class with images/ and masks/ and no split folders: scan reads the
    three classes it maps (Lung_Opacity left out), makes a seeded, stratified 15%
    validation split, and keeps a recorded split when given one."""
    from covid_tune.data.check import check_dataset
    from covid_tune.data.dataset import assignment, scan

    root = tmp_path / "COVID-19_Radiography_Dataset"
    written = generate(root, "multilabel", scale=0.01, size=32, seed=0, progress=False,
                       layout="covid-radiography")
    assert written == {"": {"covid": 6, "normal": 48, "viral pneumonia": 24}}
    (root / "lung_opacity" / "images").mkdir()
    (root / "lung_opacity" / "images" / "x.png").write_bytes(
        (next((root / "normal" / "images").iterdir())).read_bytes())
    layout = scan(root)
    assert (layout.kind.name, layout.task.name) == ("covid-radiography", "multilabel")
    by_class = {split: sorted({r.class_dir for r in refs}) for split, refs in layout.files.items()}
    assert by_class == {"train": ["covid-19", "normal", "pneumonia"],
                        "validation": ["covid-19", "normal", "pneumonia"]}
    sizes = {split: len(refs) for split, refs in layout.files.items()}
    assert sizes == {"train": 66, "validation": 12}  # 15%: covid 1 of 6, 7 of 48, 4 of 24
    split = assignment(layout)
    assert split == assignment(scan(root))  # seeded: the same every time
    moved = next(name for name, s in split.items() if s == "validation")
    again = scan(root, assigned={**split, moved: "train"})
    assert assignment(again)[moved] == "train"
    text = "\n".join(check_dataset(str(root), progress=False).lines())
    assert "COVID-19 Radiography Database" in text and "lung_opacity left out" in text
    assert "covid -> covid-19" in text and "viral pneumonia -> pneumonia" in text



def test_the_default_acquisition_is_the_drawn_phantom_and_another_shifts_it(tmp_path):
    """Without --contrast and --noise every file is the PNG of the phantom as drawn,
    byte for byte, as before the flags; with them, the same anatomy with a narrower
    range and noise."""
    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    generate(plain, "binary", scale=0.003, size=SIZE, seed=4, progress=False)
    generate(shifted, "binary", scale=0.003, size=SIZE, seed=4, progress=False,
             contrast=0.5, noise=10)
    jobs = plan_images(plain, folder_layout("binary", None), scaled_counts("binary", 0.003), 4)
    for path, split, cls, index in jobs:
        rng = np.random.default_rng([4, SPLIT_IDS.index(split), CLASS_IDS.index(cls), index])
        png = io.BytesIO()
        Image.fromarray(draw_phantom(rng, SIZE, phantom_kind(cls, index))).save(png, "PNG")
        assert path.read_bytes() == png.getvalue()
    before = np.stack([np.asarray(Image.open(p)) for p, *_ in jobs]).astype(float)
    after = np.stack([np.asarray(Image.open(shifted / p.relative_to(plain)))
                      for p, *_ in jobs]).astype(float)
    assert not np.array_equal(before, after)
    assert np.all(after.std(axis=(1, 2)) < before.std(axis=(1, 2)))  # half the range, + noise
    correlation = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(before, after)]
    assert min(correlation) > 0.8  # the same phantoms
