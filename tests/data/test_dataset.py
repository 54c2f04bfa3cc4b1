"""Dataset folders: both layouts, junk, broken and hostile files (bombs, symlink loops,
pipes, folders that cannot be listed, random bytes), labels, the decode cache."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from covid_tune.data.check import check_dataset
from covid_tune.cli import main
from covid_tune.data.dataset import load_dataset, scan
from covid_tune.errors import UserError
from covid_tune.data.preprocess import read_gray
from helpers import as_ordinary_user, binary_tree, encoded, image_like_bytes, refused, save


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
    (lambda r: (r / "train" / "infected").mkdir(parents=True), "no known layout found; "
     r"expected one of: train/\{infected,normal\} \(the assignment's Part 1 layout\)"),
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
    with pytest.raises(UserError, match="normal: no .png/.jpg/.dcm images in this class folder"):
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


# --- hostile data -----------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_listed_skipped_and_fatal_with_strict(tmp_path, capsys):
    root = binary_tree(tmp_path / "d")
    (root / "Train" / "normal" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    bundle = load_dataset(root, image_size=32, progress=False, use_cache=False)
    assert [name for name, _ in bundle.skipped] == ["Train/normal/bomb.png"]
    assert bundle.skipped[0][1].startswith("decompression bomb")
    assert main(["check", str(root), "--quiet"]) == 0
    assert "Train/normal/bomb.png: decompression bomb" in capsys.readouterr().out
    assert "bomb.png: cannot be decoded (decompression bomb" in refused(
        capsys, "check", str(root), "--strict", "--quiet")


@pytest.mark.timeout(60)
def test_symlink_loops_broken_links_and_pipes_are_listed_not_followed(tmp_path):
    root = binary_tree(tmp_path / "d")
    normal = root / "Train" / "normal"
    os.symlink("loop.png", normal / "loop.png")
    os.symlink("b.png", normal / "a.png")
    os.symlink("a.png", normal / "b.png")
    os.symlink("nowhere.png", normal / "gone.png")
    os.symlink("..", normal / "up")  # a folder loop: not descended into
    os.mkfifo(normal / "pipe.png")  # opening it would block for ever
    bundle = load_dataset(root, image_size=32, progress=False, use_cache=False)
    skipped = dict(bundle.skipped)
    assert sorted(skipped) == [f"Train/normal/{n}.png" for n in ("a", "b", "gone", "loop", "pipe")]
    assert "symlink loop" in skipped["Train/normal/loop.png"]
    assert "not a regular file" in skipped["Train/normal/pipe.png"]
    assert len(bundle.splits["train"]) == 6
    report = check_dataset(str(root), progress=False)
    assert sorted(p for p, _ in report.unreadable) == sorted(skipped)


def test_a_folder_that_cannot_be_listed_names_it(tmp_path, monkeypatch):
    """Simulated (tests run as root here, and root reads everything): listing the
    class folder fails with EACCES, as it would for an ordinary user."""
    root = binary_tree(tmp_path / "d")
    locked = root / "Train" / "normal"
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(UserError, match=r"normal: cannot list the folder \(Permission denied\); "
                                        r"check that you may read it"):
        scan(root)


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                    reason="running as root, and no setpriv to drop root's capabilities")
@pytest.mark.slow
def test_files_and_folders_without_permission_as_an_ordinary_user(tmp_path):
    """Really denied: the commands run without root's power over permissions. An
    unreadable image is skipped and named, and refused under --strict (sweep's --strict
    takes the same path); an unreadable class folder stops the scan with one line."""
    root = binary_tree(tmp_path / "d")
    secret = root / "Train" / "normal" / "normal0.png"
    secret.chmod(0)
    home = tmp_path / "home"
    home.mkdir()
    found = as_ordinary_user(["check", str(root), "--quiet"], home)
    assert found.returncode == 0, found.stderr
    assert "Train/normal/normal0.png" in found.stdout and "Permission denied" in found.stdout
    strict = as_ordinary_user(["check", str(root), "--strict", "--quiet"], home)
    error = strict.stderr.strip().splitlines()[-1]  # after the progress bars
    assert strict.returncode == 2 and strict.stderr.count("error") == 1, strict.stderr
    assert error.startswith("covid-tune: error: ") and "Traceback" not in strict.stderr
    assert "Train/normal/normal0.png: cannot be decoded (Permission denied)" in error
    (root / "Train" / "Infected").chmod(0)
    listing = as_ordinary_user(["check", str(root), "--quiet"], home)
    assert listing.returncode == 2 and listing.stderr.count("\n") == 1, listing.stderr
    assert "Infected: cannot list the folder (Permission denied)" in listing.stderr


def test_an_empty_unlabelled_test_split_is_refused(tmp_path):
    root = multilabel_tree(tmp_path / "d")
    for path in (root / "Test").iterdir():
        path.unlink()
    with pytest.raises(UserError, match="Test: no .png/.jpg/.dcm images in this split"):
        scan(root)


def test_data_folder_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")
    assert "data.zip: is a file, not a folder; pass the dataset root" in refused(
        capsys, "check", str(path))


# --- fuzzing: image files in a dataset --------------------------------------------------

SEED_IMAGES = [encoded("PNG", "L"), encoded("PNG", "RGBA"), encoded("JPEG", "RGB"),
               encoded("TIFF", "L")]


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory) -> Path:
    return binary_tree(tmp_path_factory.mktemp("fuzz") / "d", per_class=1)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=image_like_bytes(SEED_IMAGES))
def test_random_bytes_in_a_dataset_are_read_or_listed(fuzz_tree, data):
    (fuzz_tree / "Train" / "normal" / "fuzz.png").write_bytes(data)
    bundle = load_dataset(fuzz_tree, image_size=16, progress=False, use_cache=False)
    kept = "Train/normal/fuzz.png" in bundle.splits["train"].names
    assert kept != ("Train/normal/fuzz.png" in dict(bundle.skipped))


# --- memory preflight ---------------------------------------------------------------------

def test_a_dataset_that_cannot_fit_in_memory_is_refused_before_decoding(tmp_path, capsys):
    """40-odd images at 60000 px would be over 100 GiB: refused at once, naming the need,
    the memory available and the largest image size that fits."""
    from covid_tune.data.dataset import available_memory, decoded_bytes

    root = binary_tree(tmp_path / "d")
    space = tmp_path / "space.yaml"
    space.write_text("task: binary\npretrained: none\nparams: {backbone: resnet18}\n")
    err = refused(capsys, "sweep", "--space", str(space), "--data", str(root),
                  "--storage-path", str(tmp_path / "runs"), "--image-size", "60000")
    images = len([p for p in root.rglob("*.png")])
    need = decoded_bytes(scan(root), 60000) * 2
    assert f"{images} images at 60000 px decode to {need / 2**30:.1f} GiB held twice" in err
    fit = int(err.split("largest image size that fits is ")[1].split(" px")[0])
    expected = (available_memory() / (2 * images)) ** 0.5  # memory moves a little meanwhile
    assert abs(fit - expected) <= 0.02 * expected
    assert "pass --image-size" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_largest_fitting_size_scales_with_the_square_root():
    from covid_tune.data.dataset import largest_fitting_size

    assert largest_fitting_size(224, need=4 * 10**9, room=10**9) == 112
    assert largest_fitting_size(224, need=10**9, room=10**9) == 224


def selection_fixture(n_covid=4, n_normal=40, n_pneumonia=20):
    """A decoded Part 2 bundle with tiny images whose pixel value is their index."""
    from covid_tune.data.dataset import DataBundle, Split

    rows = [(1, 0, 1)] * n_covid + [(0, 1, 0)] * n_normal + [(0, 0, 1)] * n_pneumonia
    n = len(rows)
    train = Split(images=np.arange(n, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2),
                  targets=np.array(rows, dtype=np.float32),
                  names=[f"Train/x/{i:03d}.png" for i in range(n)])
    val = Split(images=np.zeros((2, 2, 2), np.uint8),
                targets=np.array([(0, 1, 0), (0, 0, 1)], dtype=np.float32),
                names=["Validation/a.png", "Validation/b.png"])
    return DataBundle(task="multilabel", root="/data", image_size=2,
                      splits={"train": train, "validation": val})


def test_the_selection_split_is_seeded_stratified_and_independent_of_order():
    from covid_tune.data.dataset import Split, hold_out

    bundle = selection_fixture()
    train = bundle.splits["train"]
    held = hold_out(train, 0.15, seed=7)
    labels = {name: tuple(t) for name, t in zip(train.names, train.targets)}
    counts = {combo: sum(labels[n] == combo for n in held) for combo in set(labels.values())}
    # round(0.15 * n) of every label combination: covid 4 -> 1, normal 40 -> 6, pneumonia 20 -> 3
    assert counts == {(1, 0, 1): 1, (0, 1, 0): 6, (0, 0, 1): 3}
    assert held == hold_out(train, 0.15, seed=7)
    assert held != hold_out(train, 0.15, seed=8)
    reverse = Split(train.images[::-1], train.targets[::-1], train.names[::-1])
    assert hold_out(reverse, 0.15, seed=7) == held
    # a combination of two keeps one on each side; of one, it stays in Train
    tiny = selection_fixture(n_covid=2, n_normal=1, n_pneumonia=3).splits["train"]
    picked = hold_out(tiny, 0.01, seed=0)
    assert len(picked) == 2 and not any(n.endswith("002.png") for n in picked)


def test_stratified_parts_take_each_fraction_of_every_stratum_and_the_same_draw_every_time():
    """The one splitter behind ``hold_out`` and ``split_collection``: runs record what it
    drew, so the pinned positions below fail a change that would split old data anew."""
    from covid_tune.data.dataset import stratified_parts

    strata = ["b"] * 6 + ["a"] * 4 + ["c"]  # positions 0-5 b, 6-9 a, 10 c
    # strata in sorted order (a, then b), one rng: a 4 -> 2, b 6 -> 3, c 1 -> none
    assert stratified_parts(strata, [0.5], seed=0) == [[8, 6, 5, 3, 2]]
    two = stratified_parts(strata, [0.2, 0.3], seed=5)
    assert two == [[9, 1], [7, 4, 2]]  # a: 1 and 1; b: round(1.2) = 1, round(1.8) = 2
    assert not set(two[0]) & set(two[1])
    assert stratified_parts(strata, [0.5], seed=1) != stratified_parts(strata, [0.5], seed=0)
    # never the whole stratum: each leaves at least one item to the rest
    assert stratified_parts(["x", "x"], [0.9, 0.9], seed=0) == [[0], []]


def test_with_selection_moves_the_held_out_images_out_of_train():
    from covid_tune.data.dataset import SELECTION, with_selection

    bundle = selection_fixture()
    names = ["Train/x/000.png", "Train/x/010.png", "Train/x/050.png"]
    moved = with_selection(bundle, names)
    assert list(moved.splits) == ["train", SELECTION, "validation"]
    assert moved.splits[SELECTION].names == names
    assert moved.splits[SELECTION].images[:, 0, 0].tolist() == [0, 10, 50]
    assert moved.splits[SELECTION].targets.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert len(moved.splits["train"]) == 61 and not set(names) & set(moved.splits["train"].names)
    assert moved.splits["validation"] is bundle.splits["validation"]
    assert with_selection(bundle, []) is bundle
    with pytest.raises(UserError, match="matches none of the training images"):
        with_selection(bundle, ["Train/x/elsewhere.png"])


def kaggle_tree(root: Path, per_class: int = 3) -> Path:
    """The Kaggle "Chest X-Ray Images (Pneumonia)" layout: chest_xray/{train,val,test}
    with NORMAL and PNEUMONIA in capitals, as published."""
    for s, split in enumerate(("train", "val", "test")):
        for c, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(per_class):
                save(root / split / cls / f"person{i}_{cls.lower()}.jpeg",
                     value=100 * s + 10 * c + i)
    return root


def test_the_kaggle_pneumonia_layout_is_found_and_mapped(tmp_path):
    """PNEUMONIA is infected, val is validation; check says which layout it found, the
    mapping, and that a validation split of 3 images is too small to choose on."""
    root = kaggle_tree(tmp_path / "chest_xray")
    layout = scan(root)
    assert (layout.kind.name, layout.task.name) == ("kaggle-pneumonia", "binary")
    assert {split: len(refs) for split, refs in layout.files.items()} == {
        "train": 6, "validation": 6, "test": 6}
    bundle = load_dataset(root, image_size=32, use_cache=False, progress=False)
    val = bundle.splits["validation"]
    assert {(n.split("/")[1], int(t)) for n, t in zip(val.names, val.targets)} == {
        ("NORMAL", 0), ("PNEUMONIA", 1)}
    text = "\n".join(check_dataset(str(root), progress=False).lines())
    assert 'binary task, Kaggle "Chest X-Ray Images (Pneumonia)"' in text
    assert "classes normal, pneumonia -> infected" in text
    assert "warning: the validation split holds only 6 images" in text


def test_class_folders_of_two_layouts_at_once_are_refused(tmp_path):
    root = binary_tree(tmp_path / "d")
    for split in ("Train", "VALIDATION", "test"):
        save(root / split / "pneumonia" / "p.png")
    (root / "val").mkdir()
    with pytest.raises(UserError, match="matches 2 layouts at once .*keep one set of class"):
        scan(root)


def test_a_spaces_data_key_draws_validation_from_train_and_maps_more_classes(tmp_path):
    """``data: {split: {validation: 0.15}}`` on the Kaggle layout draws validation from
    train (its 16-image val/ is not read); ``data: {classes: {lung_opacity:
    pneumonia}}`` brings the left-out folder of the radiography collection in."""
    from covid_tune.core.space import DataSpec
    from covid_tune.data.synth import generate

    root = kaggle_tree(tmp_path / "chest_xray", per_class=10)
    layout = scan(root, spec=DataSpec(split=(("validation", 0.2),)))
    assert {s: len(r) for s, r in layout.files.items()} == {"train": 16, "validation": 4,
                                                           "test": 20}
    assert all(ref.path.parts[-3] == "train" for ref in layout.files["validation"])
    assert "splits train, test; validation 20% of each class drawn from train" in \
        "\n".join(check_dataset_layout(layout))

    collection = tmp_path / "COVID-19_Radiography_Dataset"
    generate(collection, "multilabel", scale=0.005, size=32, progress=False,
             layout="covid-radiography")
    save(collection / "lung_opacity" / "images" / "o.png")
    plain = scan(collection)
    more = scan(collection, spec=DataSpec(classes=(("lung_opacity", "pneumonia"),)))
    count = sum(len(r) for r in more.files.values())
    assert count == sum(len(r) for r in plain.files.values()) + 1
    assert "lung_opacity -> pneumonia" in more.kind.mapping()
    fewer = scan(collection, spec=DataSpec(classes=(("covid", None),)))
    assert "covid-19" not in {r.class_dir for refs in fewer.files.values() for r in refs}
    with pytest.raises(UserError, match="names the class folder masks/, which is not there"):
        scan(collection, spec=DataSpec(classes=(("masks", "normal"),)))


def check_dataset_layout(layout) -> list[str]:
    from covid_tune.data.check import describe_layout

    return describe_layout(layout).splitlines()
