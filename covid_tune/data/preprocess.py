"""From an image file to what a model eats, without torch: one home for preprocessing.

Training (through the decode cache), evaluation, export and prediction all decode with
``read_gray`` and normalise with ``normalize`` (or, on a trial's device, with
``covid_tune.nn.augment.to_model_input``, which equals it when nothing is augmented), so
they agree to the pixel. ``describe`` is the same recipe in words and numbers, as
``model.json`` records it. ``sigmoid`` and ``logit`` live in ``covid_tune.core.numeric``.

Only numpy and PIL are imported (pydicom only inside ``covid_tune.data.dicom``'s
functions, when a DICOM file is read), so ``covid-tune predict`` stays light.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from covid_tune.data import dicom

IMAGE_FORMATS = ("PNG", "JPEG")
"""What PIL may decode, whatever the suffix (a .png that is really a JPEG is common);
never its other plugins (EPS would run Ghostscript)."""
ImageFile.LOAD_TRUNCATED_IMAGES = False

MEAN = (0.485, 0.456, 0.406)
"""ImageNet per-channel mean of [0, 1] pixels; gray is repeated to three channels."""
STD = (0.229, 0.224, 0.225)
"""ImageNet per-channel standard deviation of [0, 1] pixels."""
STEPS = (
    "decode to 8-bit grayscale; resize the shorter side to {size} px (bilinear); "
    "centre crop {size}x{size}; divide by 255; repeat to 3 channels; subtract mean and "
    "divide by std per channel"
)


def to_gray8(image: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, P, RGB, RGBA, CMYK, I;16, I, F) as 8-bit grayscale.

    Modes of more than 8 bits are stretched from their own min..max to 0..255.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else pixels * 0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "CMYK":
        image = image.convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image.convert("L")


def read_gray(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image: 8-bit grayscale, shorter side resized to ``size``, centre crop.

    Returns the ``(size, size)`` uint8 array and the original (width, height). The same
    function serves training, evaluation, export and prediction, so they agree.
    Only PIL's PNG and JPEG decoders are used, and pydicom for DICOM files
    (``covid_tune.data.dicom``). Raises ``OSError``/``ValueError``/``SyntaxError`` or
    PIL's ``DecompressionBombError`` for a file that cannot be decoded.
    """
    if dicom.is_dicom(path):
        gray = Image.fromarray(dicom.decode(path))
        return fit(gray, size), gray.size
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        refuse_bomb(image)
        original = image.size
        image.draft("L", (size, size))
        gray = to_gray8(image)
    return fit(gray, size), original


def fit(gray: Image.Image, size: int) -> np.ndarray:
    """An 8-bit image's shorter side resized to ``size`` (bilinear), centre-cropped to
    ``size`` x ``size``, as uint8."""
    scale = size / min(gray.size)
    width, height = max(size, round(gray.width * scale)), max(size, round(gray.height * scale))
    gray = gray.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    gray = gray.crop((left, top, left + size, top + size))
    return np.asarray(gray, dtype=np.uint8)


def refuse_bomb(image: Image.Image) -> None:
    """Refuse more than ``Image.MAX_IMAGE_PIXELS`` pixels: PIL itself only warns up to
    twice that. Checked per image because warning filters are process-wide and the
    decode runs in threads."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} pixels is more than the limit of {limit}")


def try_read(path: Path, size: int) -> tuple[np.ndarray | None, tuple[int, int] | None, str]:
    """``read_gray`` that reports a failure as a reason instead of raising."""
    why = not_a_file(path)
    if why:
        return None, None, why
    try:
        pixels, original = read_gray(path, size)
        return pixels, original, ""
    except Image.DecompressionBombError as exc:
        return None, None, f"decompression bomb: {_first_line(exc)}"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, None, _first_line(exc)


def not_a_file(path: Path) -> str:
    """Why ``path`` is not a regular file to open ('' when it is): a symlink loop, a
    broken link, a pipe (opening one would block) or a device."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        link = "a symlink loop or a broken link: " if path.is_symlink() else ""
        return f"cannot open ({link}{exc.strerror})"
    return "" if stat.S_ISREG(mode) else "not a regular file (a pipe, socket or device)"


def _first_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return exc.strerror  # the path is already named beside it
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def normalize(pixels: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """uint8 ``(B, S, S)`` -> float32 ``(B, 3, S, S)``: ``(x / 255 - mean) / std``."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected uint8 (B, S, S), got {pixels.dtype} {pixels.shape}")
    x = pixels[:, None].astype(np.float32) / np.float32(255)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def describe(size: int) -> dict:
    """The preprocessing of a model that sees ``size`` px images, as ``model.json`` has it."""
    return {"size": size, "grayscale_to_channels": 3, "resize": "shorter side, bilinear",
            "crop": "centre", "scale": 1 / 255, "mean": list(MEAN), "std": list(STD),
            "steps": STEPS.format(size=size)}


