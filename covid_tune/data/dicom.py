"""DICOM radiographs in, the same 8-bit grayscale as a PNG out.

A file is DICOM when it is named ``.dcm``, or when any other name (except ``.png``,
``.jpg``, ``.jpeg``, which PIL decodes) has ``DICM`` at byte 128. ``decode`` reads it with
pydicom (compressed transfer syntaxes through the pylibjpeg plugins) and turns its
stored values into the 8-bit image a viewer would show, in this order:

1. the modality LUT (``RescaleSlope``/``RescaleIntercept``, or a Modality LUT Sequence);
2. the VOI LUT, else the first window (``WindowCenter``/``WindowWidth``), as pydicom's
   ``apply_voi_lut`` does them; with neither, nothing;
3. MONOCHROME1 is inverted within the range of step 2, so bone is bright as in
   MONOCHROME2;
4. that range (the VOI LUT's entries, the window's output range, or with neither the
   image's own min..max) is scaled to 0..255 and rounded.

A multi-frame file gives its first frame only, and a warning says so. A colour file
(RGB, YBR, palette) is made gray as PIL's ``L`` mode does (a colour image of more than
8 bits is first stretched from its own min..max). ``covid_tune.data.preprocess.read_gray``
then resizes and crops it as it does every PNG. Anything pydicom cannot read or decode is a
``DicomError`` (a ``ValueError``) of one line, so the file is listed as unreadable.

``write_dicom`` stores an 8-bit image as a 12- or 16-bit DICOM file that decodes back to
it exactly (``covid-tune synth --format dicom``). pydicom is imported inside the
functions, so importing this module (as ``predict`` does) costs nothing.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pydicom import Dataset

SUFFIX = ".dcm"
MAGIC = b"DICM"
"""At byte 128, after the preamble, in every DICOM file (PS3.10)."""
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Names PIL decodes: never opened to look for the DICOM marker."""
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
HEADER_TAGS = ["PatientID", "ViewPosition"]
MULTI_FRAME = "a multi-frame DICOM file is read by its first frame only"
"""Warned (once a process, as Python shows a warning) when a file has more frames."""
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
"""Computed Radiography Image Storage: the SOP class ``write_dicom`` writes."""


class DicomError(ValueError):
    """A DICOM file that cannot be read or decoded; its message is one line."""


def is_dicom(path: str | Path) -> bool:
    """Named ``.dcm``, or any other name but ``.png``/``.jpg``/``.jpeg`` with ``DICM``
    at byte 128."""
    suffix = Path(path).suffix.lower()
    return suffix == SUFFIX or (suffix not in PIL_SUFFIXES and has_magic(path))


def has_magic(path: str | Path) -> bool:
    """Whether ``path`` is a regular file with ``DICM`` at byte 128 (a pipe or a
    device is never opened; a file that cannot be read has none)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == MAGIC
    except OSError:
        return False


def decode(path: str | Path) -> np.ndarray:
    """The full-size 8-bit image of a DICOM file: uint8 (rows, columns), after the
    steps in this module's docstring.

    Raises ``OSError`` when the file cannot be opened, PIL's ``DecompressionBombError``
    past ``Image.MAX_IMAGE_PIXELS``, and ``DicomError`` for everything else."""
    from pydicom import dcmread

    with open(path, "rb") as file:
        head = file.read(132)
        if head[128:] != MAGIC:
            raise DicomError("not a DICOM file (no DICM marker at byte 128)")
        file.seek(0)
        try:
            ds = dcmread(file)
            refuse_bomb(ds)
            return gray8(ds)
        except (OSError, MemoryError, Image.DecompressionBombError, DicomError):
            raise
        except Exception as exc:  # pydicom and its decoders fail in many ways: KeyError,
            # AttributeError, NotImplementedError, RuntimeError, struct.error, ...
            raise DicomError(f"DICOM: {_one_line(exc)}") from exc


def refuse_bomb(ds: Dataset) -> None:
    """Refuse more than ``Image.MAX_IMAGE_PIXELS`` pixels, as PNGs are, before decoding."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("no pixel data (a DICOM file without an image, such as a report)")
    if ds.get("Columns") is None or ds.get("Rows") is None:
        raise DicomError("DICOM: the header gives no Rows or Columns")
    width, height = int(ds.Columns), int(ds.Rows)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} pixels is more than the limit of {limit}")


def gray8(ds: Dataset) -> np.ndarray:
    """A dataset's first frame as uint8 (rows, columns)."""
    from pydicom.pixels import pixel_array

    if int(ds.get("NumberOfFrames") or 1) > 1:
        warnings.warn(MULTI_FRAME)
    pixels = pixel_array(ds, index=0)
    if ds.get("PhotometricInterpretation") in MONOCHROME and pixels.ndim == 2:
        return monochrome8(pixels, ds)
    return colour8(pixels, ds)


def monochrome8(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values to 8 bits: modality LUT, VOI LUT or window, MONOCHROME1 inverted,
    the VOI's range scaled to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds, index=0)
    values = np.asarray(values, dtype=np.float64)
    low, high = voi_range(ds) or (float(values.min()), float(values.max()))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = low + high - values
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.round((values - low) * 255 / (high - low)), 0, 255).astype(np.uint8)


def voi_range(ds: Dataset) -> tuple[float, float] | None:
    """The range ``apply_voi_lut`` maps into: the first VOI LUT's smallest and largest
    entry, else the first window's output range (pydicom's: the stored values' range,
    rescaled); None when the file has neither."""
    from pydicom.pixels.processing import apply_voi, apply_windowing

    lut = ds.get("VOILUTSequence")
    if lut and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData")):
        count, first = lut[0].LUTDescriptor[:2]
        entries = apply_voi(np.arange(first, first + (count or 2**16)), ds, index=0)
        return float(entries.min()), float(entries.max())
    if None not in (ds.get("WindowCenter"), ds.get("WindowWidth")):
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
        return float(low), float(high)
    return None


def colour8(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """RGB (pydicom has already turned YBR into RGB) or palette colour to gray as PIL's
    ``L`` mode does; more than 8 bits are first stretched from the image's min..max."""
    from pydicom.pixels import apply_color_lut

    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(f"photometric interpretation {ds.get('PhotometricInterpretation')} "
                         f"with pixels of shape {pixels.shape} is not an image this reads")
    if pixels.dtype != np.uint8:
        values = pixels.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255 / (high - low)) if high > low else values * 0
        pixels = np.round(scaled).astype(np.uint8)
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).convert("L"))


def patient_id(path: str | Path) -> str | None:
    """``PatientID`` from the header (pixels are not read); None when empty or unreadable."""
    return header(path)[0]


def view_of(path: str | Path) -> str | None:
    """``ViewPosition`` upper case (``PA``, ``AP``, ``LL``, ``LATERAL``, ...) from the
    header; None when empty or unreadable."""
    return header(path)[1]


def header(path: str | Path) -> tuple[str | None, str | None]:
    """(``PatientID``, ``ViewPosition`` upper case) of a DICOM file, reading its header
    only; None for what is empty, absent or unreadable (``decode`` says why later)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        patient, view = (str(ds.get(tag) or "").strip() for tag in HEADER_TAGS)
    except Exception:  # noqa: BLE001 - unreadable: no patient, no view; decode lists it
        return None, None
    return patient or None, view.upper() or None


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def write_dicom(path: str | Path, gray: np.ndarray, *, patient: str, view: str,
                bits: int = 12, monochrome1: bool = False,
                rescale: tuple[float, float] | None = None, seed: int | list[int] = 0) -> None:
    """Store uint8 ``gray`` as an uncompressed (explicit VR little endian) CR file that
    ``decode`` gives back exactly.

    Gray level ``g`` becomes one of the ``k = 2**(bits - 8)`` stored values ``k*g`` ..
    ``k*g + k - 1`` (the low bits drawn with ``seed``; MONOCHROME1 stores ``255 - g``),
    and the window maps each such run back onto ``g``. ``rescale`` (slope, intercept)
    adds a modality LUT; the window is then in rescaled units. ``bits`` is 12 or 16."""
    from pydicom import Dataset, dcmwrite
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if bits not in (12, 16):
        raise ValueError(f"bits: {bits}; write 12 or 16")
    k = 2 ** (bits - 8)
    levels = (255 - gray if monochrome1 else gray).astype(np.uint16)
    low_bits = np.random.default_rng(seed).integers(0, k, gray.shape, dtype=np.uint16)
    stored = levels * k + low_bits
    slope, intercept = rescale or (1.0, 0.0)
    edge, span = slope * (k - 1) / 2 + intercept, 255 * k * slope

    def uid(*parts) -> str:
        return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = uid(patient, path, seed)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(patient), uid(patient, path)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", view
    ds.PatientID, ds.PatientName = patient, f"Phantom^{patient}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, MONOCHROME[0 if monochrome1 else 1]
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.WindowCenter = f"{edge + 0.5 + span / 2:.10g}"
    ds.WindowWidth = f"{span + 1:.10g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    dcmwrite(path, ds, enforce_file_format=True)
