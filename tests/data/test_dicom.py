"""DICOM input: the documented transform (modality LUT, VOI LUT or window, MONOCHROME1
inverted, 8 bits) on hand-made files and on pydicom's own test files, bad files listed
in one line, patients and views from the headers, ``data.views``, and
``synth --format dicom``."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import binary_tree, image_like_bytes, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import Dataset, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covid_tune.cli import main
from covid_tune.core.space import DataSpec
from covid_tune.data import dicom
from covid_tune.data.check import check_dataset
from covid_tune.data.dataset import is_junk, load_dataset, scan
from covid_tune.data.preprocess import read_gray, try_read
from covid_tune.data.synth import generate
from covid_tune.errors import UserError


def dicom_file(path: Path, stored, photometric: str = "MONOCHROME2", bits: int = 12,
               signed: bool = False, **tags) -> Path:
    """A minimal uncompressed DICOM file of ``stored`` values, with ``tags`` set."""
    stored = np.asarray(stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dicom.CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = dicom.CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CR", 1, photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def write(path: Path, gray: np.ndarray, **traits) -> Path:
    """``dicom.write_dicom`` into a folder made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dicom.write_dicom(path, gray, **traits)
    return path


def phantom(shape=(40, 30), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- the transform ----------------------------------------------------------------------

@pytest.mark.parametrize("photometric, expected", [
    ("MONOCHROME2", [[0, 102, 255], [51, 153, 255]]),
    ("MONOCHROME1", [[255, 153, 0], [204, 102, 0]]),
])
def test_the_modality_lut_comes_first_then_the_window_then_inversion_then_8_bits(
        tmp_path, photometric, expected):
    """Rescaled values 2s - 100 are -100, 180, 400 / 140, 220, 420; the window (centre
    200.5, width 201: LINEAR, 100..300) puts them at 0, 0.4, 1 / 0.2, 0.6, 1 of its
    output range, MONOCHROME1 turns that over, and the range becomes 0..255. Windowing
    the stored values instead would give 51 for the 140 in the middle."""
    path = dicom_file(tmp_path / "x.dcm", [[0, 140, 250], [120, 160, 260]], photometric,
                      RescaleSlope="2", RescaleIntercept="-100", WindowCenter="200.5",
                      WindowWidth="201")
    assert dicom.decode(path).tolist() == expected


def test_the_window_range_is_scaled_not_the_images_own_min_to_max(tmp_path):
    """A window wider than the image keeps its contrast: 1000 and 3000 in the window
    2048/4096 of 12-bit data are 62 and 187, not 0 and 255; with no window at all the
    image's own min..max is stretched to 0..255."""
    stored = [[1000, 3000]]
    windowed = dicom_file(tmp_path / "w.dcm", stored, WindowCenter="2048", WindowWidth="4096")
    assert dicom.decode(windowed).tolist() == [[62, 187]]
    assert dicom.decode(dicom_file(tmp_path / "n.dcm", stored)).tolist() == [[0, 255]]


def test_a_voi_lut_wins_over_a_window_and_its_entries_make_the_range(tmp_path):
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 0, 8])
    lut.add_new("LUTData", "US", [10, 50, 90, 130])
    path = dicom_file(tmp_path / "lut.dcm", [[0, 1, 2, 3, 9]], VOILUTSequence=[lut],
                      WindowCenter="2048", WindowWidth="4096")
    assert dicom.decode(path).tolist() == [[0, 85, 170, 255, 255]]


def test_the_first_of_several_windows_is_used(tmp_path):
    path = dicom_file(tmp_path / "x.dcm", [[100, 200, 300]], WindowCenter=["200.5", "0"],
                      WindowWidth=["201", "10"])
    assert dicom.decode(path).tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("windowed", [True, False])
def test_monochrome1_and_monochrome2_of_the_same_anatomy_decode_alike(tmp_path, windowed):
    """MONOCHROME1 stores 4095 - s where MONOCHROME2 stores s (a viewer shows the two
    alike); the mirrored window has its centre at 4096 - c under LINEAR's half-pixel
    rule."""
    stored = phantom().astype(np.int64) * 12 + 500
    two, one = {}, {}
    if windowed:
        two, one = ({"WindowCenter": "2000", "WindowWidth": "2501"},
                    {"WindowCenter": "2096", "WindowWidth": "2501"})
    a = dicom.decode(dicom_file(tmp_path / "2.dcm", stored, **two))
    b = dicom.decode(dicom_file(tmp_path / "1.dcm", 4095 - stored, "MONOCHROME1", **one))
    assert np.array_equal(a, b) and a.max() > 200 and a.min() < 50


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("monochrome1", [False, True])
@pytest.mark.parametrize("rescale", [None, (2.0, -1024.0)])
def test_12_and_16_bit_files_decode_to_the_image_they_store(tmp_path, bits, monochrome1,
                                                             rescale):
    gray = phantom()
    path = tmp_path / "x.dcm"
    write(path, gray, patient="P1", view="PA", bits=bits,
                      monochrome1=monochrome1, rescale=rescale, seed=1)
    ds = pydicom.dcmread(path)
    assert ds.BitsStored == bits and ds.pixel_array.max() >= 2 ** (bits - 1)
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert ("RescaleSlope" in ds) == bool(rescale)
    assert np.array_equal(dicom.decode(path), gray)


def test_read_gray_resizes_a_dicom_as_it_does_the_same_png(tmp_path):
    gray = phantom((50, 70))
    Image.fromarray(gray).save(tmp_path / "x.png")
    write(tmp_path / "x.dcm", gray, patient="P1", view="AP", bits=16)
    png, png_size = read_gray(tmp_path / "x.png", 32)
    dcm, dcm_size = read_gray(tmp_path / "x.dcm", 32)
    assert np.array_equal(png, dcm) and png_size == dcm_size == (70, 50)


# --- pydicom's own test files -----------------------------------------------------------

def reference(ds: Dataset) -> np.ndarray:
    """The documented transform, written with pydicom's functions: the first frame,
    modality LUT, VOI LUT or first window, MONOCHROME1 inverted, the window's output
    range (pydicom's: the stored values' range, rescaled) or the image's min..max to
    0..255."""
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        pixels = pixels[0]
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    if "WindowCenter" in ds:
        bits = ds.BitsStored
        low, high = ((0, 2**bits - 1) if ds.PixelRepresentation == 0
                     else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        if "RescaleSlope" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            low, high = low * slope + intercept, high * slope + intercept
    else:
        low, high = values.min(), values.max()
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = low + high - values
    return np.round((values - low) * 255 / (high - low)).astype(np.uint8)


MONOCHROME_FILES = [
    "CT_small.dcm",                   # signed 16-bit, rescale, no window: min..max
    "MR_small.dcm",                   # a window
    "MR_small_RLE.dcm",               # RLE
    "MR_small_jp2klossless.dcm",      # JPEG 2000 lossless (pylibjpeg-openjpeg)
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS (pylibjpeg-libjpeg)
    "JPEG2000.dcm",                   # JPEG 2000
    "JPGExtended.dcm",                # 12-bit JPEG extended (pylibjpeg-libjpeg)
    "693_J2KI.dcm",                   # JPEG 2000, 14-bit signed, rescale and window
    "J2K_pixelrep_mismatch.dcm",      # three windows: the first is used
    "examples_overlay.dcm",           # 12-bit, two windows
    "rtdose.dcm",                     # 15 frames of 32-bit: the first frame
    "liver_1frame.dcm",               # 1-bit
]


@pytest.mark.filterwarnings(f"ignore:{dicom.MULTI_FRAME}")
@pytest.mark.parametrize("name", MONOCHROME_FILES)
def test_pydicoms_monochrome_test_files_decode_by_the_documented_transform(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    assert np.array_equal(dicom.decode(path), reference(ds))


def test_a_monochrome1_copy_of_a_pydicom_file_is_its_inverse(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    decoded = dicom.decode(tmp_path / "m1.dcm")
    assert np.array_equal(decoded, reference(ds))
    assert np.array_equal(decoded, 255 - dicom.decode(get_testdata_file("MR_small.dcm")))


def test_a_multi_frame_file_gives_its_first_frame_and_says_so():
    path = get_testdata_file("rtdose.dcm")  # 15 frames
    with pytest.warns(UserWarning, match="read by its first frame only"):
        first = dicom.decode(path)
    ds = pydicom.dcmread(path)
    assert np.array_equal(first, reference(ds)) and first.shape == ds.pixel_array.shape[1:]


@pytest.mark.filterwarnings(f"ignore:{dicom.MULTI_FRAME}")
@pytest.mark.parametrize("name", [
    "SC_rgb_jpeg_dcmtk.dcm",   # YBR_FULL in JPEG baseline
    "SC_rgb_rle_2frame.dcm",   # RGB, two frames
    "examples_rgb_color.dcm",  # RGB, uncompressed
])
def test_colour_files_become_gray_as_pil_makes_l(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    rgb = ds.pixel_array[0] if int(ds.get("NumberOfFrames") or 1) > 1 else ds.pixel_array
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(dicom.decode(get_testdata_file(name)), expected)


def test_a_palette_colour_file_is_read_through_its_palette():
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)
    assert rgb.dtype == np.uint16  # 16-bit palette entries: stretched, then gray
    decoded = dicom.decode(path)
    assert decoded.shape == ds.pixel_array.shape and decoded.max() == 255


# --- what is a DICOM file, and bad ones -------------------------------------------------

def test_dicom_files_without_the_suffix_are_found_by_their_marker(tmp_path):
    gray = phantom()
    for name in ("IM0001", "1.2.840.113619.2.55.3"):
        write(tmp_path / name, gray, patient="P1", view="PA")
        assert dicom.is_dicom(tmp_path / name) and not is_junk(tmp_path / name)
        pixels, size, why = try_read(tmp_path / name, 16)
        assert pixels.shape == (16, 16) and size == (30, 40) and why == ""
    (tmp_path / "notes").write_text("x" * 200)
    assert not dicom.is_dicom(tmp_path / "notes") and is_junk(tmp_path / "notes")
    assert dicom.is_dicom(tmp_path / "anything.DCM")  # by name, read or not


def dicom_bytes(tmp_path_factory) -> list[bytes]:
    """Small DICOM files to break: uncompressed 12-bit, RLE, JPEG-LS, JPEG 2000."""
    path = tmp_path_factory.mktemp("seed") / "x.dcm"
    dicom.write_dicom(path, phantom((12, 16)), patient="P1", view="PA")
    return [path.read_bytes()] + [Path(get_testdata_file(name)).read_bytes() for name in (
        "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm")]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> tuple[Path, list[bytes]]:
    return tmp_path_factory.mktemp("fuzz"), dicom_bytes(tmp_path_factory)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_broken_bytes_of_dicom_files_decode_or_are_listed(fuzz, data):
    folder, seeds = fuzz
    path = folder / "fuzz.dcm"
    path.write_bytes(data.draw(image_like_bytes(seeds)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of what it repairs
        pixels, size, why = try_read(path, 16)
    if pixels is None:
        assert size is None and why and "\n" not in why
    else:
        assert pixels.shape == (16, 16) and why == ""


def test_a_png_named_as_a_png_is_never_looked_into(tmp_path):
    write(tmp_path / "x.png", phantom(), patient="P1", view="PA")
    assert not dicom.is_dicom(tmp_path / "x.png")
    pixels, _, why = try_read(tmp_path / "x.png", 16)
    assert pixels is None and "cannot identify image file" in why


def bad_files(folder: Path) -> dict[str, str]:
    """Broken DICOM files by name, with the start of the reason each is listed with."""
    write(folder / "good.dcm", phantom(), patient="P1", view="PA")
    good = (folder / "good.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (folder / "garbage.dcm").write_text("this is not a DICOM file\n" * 20)
    (folder / "empty.dcm").write_bytes(b"")
    ds = pydicom.dcmread(folder / "good.dcm")
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    (folder / "good.dcm").unlink()
    (folder / "lossy.dcm").write_bytes(Path(get_testdata_file("JPEG-lossy.dcm")).read_bytes())
    return {"truncated.dcm": "DICOM: The number of bytes of pixel data is less than",
            "garbage.dcm": "not a DICOM file (no DICM marker at byte 128)",
            "empty.dcm": "not a DICOM file (no DICM marker at byte 128)",
            "nopixels.dcm": "no pixel data",
            "lossy.dcm": "DICOM: Unable to decode as exceptions were raised by all available"}


def test_a_broken_dicom_file_is_one_line_not_a_traceback(tmp_path):
    for name, reason in bad_files(tmp_path).items():
        pixels, size, why = try_read(tmp_path / name, 16)
        assert pixels is None and size is None
        assert why.startswith(reason) and "\n" not in why and len(why) <= 200, (name, why)


def test_a_dicom_past_the_pixel_limit_is_a_bomb(tmp_path, monkeypatch):
    write(tmp_path / "x.dcm", phantom(), patient="P1", view="PA")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _, _, why = try_read(tmp_path / "x.dcm", 16)
    assert why == "decompression bomb: 30x40 pixels is more than the limit of 1000"


def test_broken_dicom_files_in_a_dataset_are_listed_and_skipped(tmp_path):
    root = binary_tree(tmp_path / "d")
    reasons = bad_files(root / "Train" / "normal")
    bundle = load_dataset(root, image_size=16, progress=False, use_cache=False)
    skipped = {name.rsplit("/", 1)[1]: why for name, why in bundle.skipped}
    assert sorted(skipped) == sorted(reasons)
    report = check_dataset(str(root), progress=False)
    assert sorted(p.rsplit("/", 1)[1] for p, _ in report.unreadable) == sorted(reasons)
    with pytest.raises(UserError, match=r"cannot be decoded .*5 such file"):
        load_dataset(root, image_size=16, strict=True, progress=False, use_cache=False)


# --- patients, views, data.views --------------------------------------------------------

@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory) -> tuple[Path, Path]:
    """The same phantoms as DICOM files and as PNGs (binary, a few per class)."""
    folder = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(folder / "dcm"), "--task", "binary", "--scale", "0.005",
                 "--size", "32", "--format", "dicom", "--quiet"]) == 0
    generate(folder / "png", "binary", scale=0.005, size=32, progress=False)
    return folder / "dcm", folder / "png"


def test_synth_writes_dicom_of_every_kind_with_patients_and_views(dicom_data):
    dcm, _ = dicom_data
    files = sorted(dcm.rglob("*"))
    assert files and all(p.suffix == ".dcm" for p in files if p.is_file())
    headers = [pydicom.dcmread(p) for p in files if p.is_file()]
    assert {ds.PhotometricInterpretation for ds in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {ds.BitsStored for ds in headers} == {12, 16}
    assert {"RescaleSlope" in ds for ds in headers} == {True, False}
    assert all("WindowCenter" in ds and "WindowWidth" in ds for ds in headers)
    views = Counter(ds.ViewPosition for ds in headers)
    assert set(views) == {"PA", "AP", "LATERAL"} and views["LATERAL"] < views["PA"]
    per_patient = Counter(ds.PatientID for ds in headers)
    assert set(Counter(per_patient.values())) <= {1, 2, 3} and max(per_patient.values()) == 3
    assert np.mean(list(per_patient.values())) > 2


def test_synth_dicom_decodes_to_the_png_phantom_of_the_same_seed(dicom_data):
    dcm, png = dicom_data
    pairs = [(p, png / p.relative_to(dcm).with_suffix(".png")) for p in dcm.rglob("*.dcm")]
    assert len(pairs) > 50
    for dcm_file, png_file in pairs:
        assert np.array_equal(dicom.decode(dcm_file), np.asarray(Image.open(png_file)))


def test_a_dicom_folder_scans_with_patient_and_view_from_the_headers(dicom_data):
    dcm, _ = dicom_data
    layout = scan(dcm)
    refs = [ref for split in layout.files.values() for ref in split]
    for ref in refs[::7]:
        ds = pydicom.dcmread(ref.path, stop_before_pixels=True)
        assert (ref.patient, ref.view) == (ds.PatientID, ds.ViewPosition)
        assert (dicom.patient_id(ref.path), dicom.view_of(ref.path)) == (ref.patient, ref.view)
    kept = scan(dcm, spec=DataSpec(views=("PA",)))
    assert {ref.view for split in kept.files.values() for ref in split} == {"PA"}
    for split, refs_ in layout.files.items():
        assert len(kept.files[split]) == sum(ref.view == "PA" for ref in refs_)


def test_views_leave_out_images_of_unknown_view_and_say_how_many(tmp_path):
    root = binary_tree(tmp_path / "d")  # PNGs: no view
    for split in ("Train", "VALIDATION", "test"):
        for cls in ("Infected", "normal"):
            for i, view in enumerate(("PA", "LATERAL", "")):
                write(root / split / cls / f"{i}.dcm", phantom(seed=i),
                                  patient=f"P{i}", view=view)
    with pytest.warns(UserWarning, match=r"data.views \[PA, AP\] leaves out 30 image\(s\): "
                                         r"LATERAL 6, unknown 24"):
        layout = scan(root, spec=DataSpec(views=("PA", "AP")))
    assert all(len(refs) == 2 and {r.path.name for r in refs} == {"0.dcm"}
               for refs in layout.files.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without data.views every image is kept, silently
        assert sum(len(refs) for refs in scan(root).files.values()) == 36
    with pytest.raises(UserError, match=r"data.views \[AP\] keeps no image of the train split; "
                                        r"its views are LATERAL 2, PA 2, unknown 8"):
        scan(root, spec=DataSpec(views=("AP",)))


def test_a_class_without_an_image_of_the_views_is_refused(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "validation"):
        for cls, view in (("infected", "PA"), ("normal", "AP")):
            write(root / split / cls / "0.dcm", phantom(), patient="P", view=view)
        write(root / split / "normal" / "1.dcm", phantom(), patient="P", view="PA")
    with pytest.raises(UserError, match=r"data.views \[AP\] keeps no training image of class "
                                        r"infected"):
        scan(root, spec=DataSpec(views=("AP",)))


def test_a_manifest_of_dicom_files_takes_its_columns_first_then_the_headers(tmp_path):
    for i in range(8):
        write(tmp_path / "img" / f"{i}.dcm", phantom(seed=i), patient=f"H{i // 2}",
                          view="PA" if i % 2 else "AP")
    save(tmp_path / "img" / "8.png", value=8)
    rows = ["path,labels,split,patient,view"]
    rows += [f"img/{i}.dcm,{'normal' if i % 4 < 2 else 'infected'},"
             f"{'train' if i < 6 else 'validation'},{'M' if i == 0 else ''},"
             f"{'lateral' if i == 1 else ''}" for i in range(8)]
    rows.append("img/8.png,normal,validation,,PA")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    layout = scan(tmp_path / "data.csv")
    refs = {r.path.name: r for split in layout.files.values() for r in split}
    assert (refs["0.dcm"].patient, refs["0.dcm"].view) == ("M", "AP")       # the column wins
    assert (refs["1.dcm"].patient, refs["1.dcm"].view) == ("H0", "LATERAL")
    assert (refs["5.dcm"].patient, refs["5.dcm"].view) == ("H2", "PA")      # the header
    assert (refs["8.png"].patient, refs["8.png"].view) == (None, "PA")
    kept = scan(tmp_path / "data.csv", spec=DataSpec(views=("PA", "AP")))
    names = {r.path.name for split in kept.files.values() for r in split}
    assert names == {f"{i}.dcm" for i in (0, 2, 3, 4, 5, 6, 7)} | {"8.png"}


def test_synth_dicom_as_a_csv_manifest_scans_and_decodes(tmp_path):
    out = tmp_path / "m"
    generate(out, "multilabel", scale=0.005, size=32, progress=False, layout="csv-manifest",
             fmt="dicom")
    lines = (out / "manifest.csv").read_text().splitlines()
    assert all(line.split(",")[0].endswith(".dcm") for line in lines[1:])
    layout = scan(out / "manifest.csv")
    refs = [r for split in layout.files.values() for r in split]
    assert all(r.patient and r.view for r in refs)
    bundle = load_dataset(layout, image_size=16, progress=False, use_cache=False)
    assert not bundle.skipped and sum(len(s) for s in bundle.splits.values()) == len(refs)
