"""Synthetic chest-radiograph phantoms in the assignment's exact folder layouts.

``generate`` writes 8-bit grayscale PNGs (or DICOM files that decode to the same
pixels) so every other module (data loading, the search, export) can be run end to end
without the real data set. Each image is a drawn phantom: a torso, two dark lung
fields, the mediastinum and heart, the spine and ribs. Pneumonia adds dense one-sided
blobs in a lower zone; COVID-19 adds faint, wide, bilateral opacities near the outer
lung edges. A random per-image brightness that ignores the class keeps the classes
from being told apart by mean intensity.

Every image draws from its own generator, seeded by (seed, split, class, index), so
the same arguments give byte-identical files whatever order they are written in.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from covid_tune.data import dicom
from covid_tune.errors import UserError
from covid_tune.core.tasks import LAYOUTS, FolderLayout

PHANTOM_NOTE = (
    "This data is synthetic: drawn chest-radiograph phantoms, not patient images, "
    "so any score on it says nothing about clinical performance."
)

FULL_COUNTS: dict[str, dict[str, dict[str, int]]] = {
    "binary": {
        "train": {"infected": 4919, "normal": 7081},
        "validation": {"infected": 615, "normal": 885},
        "test": {"infected": 615, "normal": 885},
    },
    "multilabel": {
        "train": {"covid-19": 200, "normal": 4000, "pneumonia": 2000},
        "validation": {"covid-19": 28, "normal": 400, "pneumonia": 200},
        "test": {"covid-19": 28, "normal": 401, "pneumonia": 200},
    },
}
"""Full-scale images per canonical split and class folder. The multilabel Test split
(629 images, unlabelled on disk) is mixed in the proportions of Validation."""

MIN_PER_CLASS = 2
SPLIT_IDS = ("train", "validation", "test")
CLASS_IDS = ("normal", "infected", "pneumonia", "covid-19")
"""Fixed positions that seed each image's generator; never reorder them."""


def generate(
    out: Path,
    task: str,
    scale: float = 0.05,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
    layout: str | None = None,
    fmt: str = "png",
    contrast: float = 1.0,
    noise: float = 0.0,
) -> dict[str, dict[str, int]]:
    """Write a synthetic data set for ``task`` under the empty folder ``out``, in the
    task's assignment layout or in ``layout`` (a name in ``covid_tune.core.tasks.LAYOUTS``).

    Returns ``{split folder: {class folder: images}}``, split folders as on disk
    (``train`` or ``Train``). For the flat multilabel ``Test`` folder the counts
    still say how many images of each class it holds; the disk does not.
    ``fmt`` ``dicom`` writes each image as a ``.dcm`` file (``save_phantom``) instead of
    a PNG, with the same names and pixels. ``contrast`` and ``noise`` draw the same
    phantoms as another scanner would show them (``acquire``); the defaults change nothing.
    """
    out = Path(out)
    check_args(out, task, scale, size, seed)
    if fmt not in FORMATS:
        raise UserError(f"format: {fmt!r} is not a format; use one of: {', '.join(FORMATS)}")
    if not contrast > 0:
        raise UserError(f"contrast: {contrast} is out of range; use a factor above 0 (1: as drawn)")
    if not noise >= 0:
        raise UserError(f"noise: {noise} is out of range; use 0 or more (8-bit units)")
    counts = scaled_counts(task, scale)
    shift = (contrast, noise)
    if layout == CSV_LAYOUT:
        return write_listed(out, task, counts, seed, size, progress, fmt, shift)
    kind = folder_layout(task, layout)
    jobs = plan_images(out, kind, counts, seed)
    for path, split, cls, index in tqdm(jobs, desc="synth", unit="img", disable=not progress):
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, SPLIT_IDS.index(split), CLASS_IDS.index(cls), index])
        pixels = acquire(draw_phantom(rng, size, phantom_kind(cls, index)), *shift, rng)
        save_phantom(pixels, path, fmt, (seed, split, cls, index))
    folders = {cls: folder for folder, cls in kind.class_dirs.items()}
    if kind.made_splits:  # one pool, as the collection is published
        for folder in (*folders.values(), *kind.left_out):
            (out / folder / "masks").mkdir(parents=True, exist_ok=True)
        (out / "README.md.txt").write_text("Synthetic phantoms in this collection's layout.\n")
        pooled: dict[str, int] = {}
        for classes in counts.values():
            for cls, n in classes.items():
                pooled[folders[cls]] = pooled.get(folders[cls], 0) + n
        return {"": pooled}
    return {kind.split_dirs[split]: {folders[c]: n for c, n in classes.items()}
            for split, classes in counts.items()}


CSV_LAYOUT = "csv-manifest"
"""``--layout csv-manifest``: every image in one folder, listed in ``manifest.csv``."""


def write_listed(out: Path, task: str, counts: dict[str, dict[str, int]], seed: int,
                 size: int, progress: bool, fmt: str = "png",
                 shift: tuple[float, float] = (1.0, 0.0)) -> dict[str, dict[str, int]]:
    """Every image in ``out/images``, listed with its labels and split (every split
    labelled, Part 2's test too) in ``out/manifest.csv`` (``covid_tune.data.csv_manifest``).
    Part 2's labels are written as label names: ``covid|pneumonia``."""
    words = {"covid-19": "covid|pneumonia"} if task == "multilabel" else {}
    lines = ["path,labels,split"]
    for split, classes in counts.items():
        for cls, n in classes.items():
            names = random.Random(f"{seed}/{split}/{cls}")
            for index in tqdm(range(n), desc=f"synth {split} {cls}", unit="img",
                              disable=not progress):
                name = f"images/{hex_name(names)}"
                rng = np.random.default_rng([seed, SPLIT_IDS.index(split),
                                             CLASS_IDS.index(cls), index])
                (out / "images").mkdir(parents=True, exist_ok=True)
                pixels = acquire(draw_phantom(rng, size, phantom_kind(cls, index)), *shift, rng)
                written = save_phantom(pixels, out / name, fmt, (seed, split, cls, index))
                lines.append(f"{written.relative_to(out).as_posix()},{words.get(cls, cls)},{split}")
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    return {"manifest.csv": {f"{split}/{cls}": n for split, classes in counts.items()
                             for cls, n in classes.items()}}


FORMATS = ("png", "dicom")
"""``--format``: 8-bit PNGs, or DICOM files (``covid_tune.data.dicom.write_dicom``)."""
VIEWS = ("PA", "AP", "PA", "PA", "AP", "PA", "LATERAL", "PA", "AP", "PA")
"""The DICOM view of a class's image ``index``: ``VIEWS[index % 10]``."""


def save_phantom(pixels: np.ndarray, path: Path, fmt: str,
                 key: tuple[int, str, str, int]) -> Path:
    """Write one phantom as a PNG at ``path`` or, for ``dicom``, as a DICOM file of the
    same name with the suffix ``.dcm`` (``dicom_traits`` of ``key``: seed, split, class,
    index); the path written."""
    if fmt == "png":
        Image.fromarray(pixels).save(path)
        return path
    path = path.with_suffix(dicom.SUFFIX)
    dicom.write_dicom(path, pixels, **dicom_traits(*key))
    return path


def dicom_traits(seed: int, split: str, cls: str, index: int) -> dict:
    """How a class's image ``index`` is stored as DICOM, so that every kind occurs in a
    few images: 2 or 3 images per patient (patient ``index * 2 // 5`` of its split and
    class), ``VIEWS`` (mostly PA and AP, every tenth LATERAL), every third MONOCHROME1,
    every other one 16-bit (else 12-bit), every fourth with a rescale slope and
    intercept. Each decodes to the phantom's exact pixels."""
    ids = [seed, SPLIT_IDS.index(split), CLASS_IDS.index(cls), index]
    return {"patient": f"PH{seed}-{ids[1]}{ids[2]}-{index * 2 // 5:05d}",
            "view": VIEWS[index % len(VIEWS)], "bits": 16 if index % 2 else 12,
            "monochrome1": index % 3 == 1,
            "rescale": (2.0, -1024.0) if index % 4 == 3 else None, "seed": ids}


def folder_layout(task: str, layout: str | None) -> FolderLayout:
    """The layout to write: ``layout`` by name, or the task's assignment layout."""
    name = layout or f"assignment-{task}"
    kind = LAYOUTS.get(name)
    if kind is None or kind.task != task:
        names = [n for n, k in LAYOUTS.items() if k.task == task] + [CSV_LAYOUT]
        raise UserError(f"layout: {name!r} is not a {task} layout; use one of: "
                        f"{', '.join(names)}")
    return kind


def check_args(out: Path, task: str, scale: float, size: int, seed: int) -> None:
    """Raise ``UserError`` naming the bad argument and the fix."""
    if task not in FULL_COUNTS:
        raise UserError(f"task: unknown task {task!r}; choose one of {sorted(FULL_COUNTS)}")
    if not 0 < scale <= 1:
        raise UserError(f"scale: {scale} is out of range; use a fraction in (0, 1], e.g. 0.05")
    if size < 32:
        raise UserError(f"size: {size} px is too small; use at least 32, e.g. 128")
    if seed < 0:
        raise UserError(f"seed: {seed} is negative; use an integer >= 0")
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} is a file; choose an empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"out: {out} already contains files; choose an empty folder")


def scaled_counts(task: str, scale: float) -> dict[str, dict[str, int]]:
    """Full-scale counts times ``scale``, rounded, at least ``MIN_PER_CLASS`` each."""
    return {
        split: {cls: max(MIN_PER_CLASS, round(n * scale)) for cls, n in classes.items()}
        for split, classes in FULL_COUNTS[task].items()
    }


def plan_images(
    out: Path, kind: FolderLayout, counts: dict[str, dict[str, int]], seed: int
) -> list[tuple[Path, str, str, int]]:
    """One ``(path, split, class, index within class)`` per image to write."""
    folders = {cls: folder for folder, cls in kind.class_dirs.items()}
    jobs = []
    for split, classes in counts.items():
        if kind.made_splits:  # no split folders: every class folder holds all its images
            for cls, n in classes.items():
                names = random.Random(f"{seed}/{split}/{cls}")
                jobs += [(out / folders[cls] / kind.images_dir / hex_name(names), split, cls, i)
                         for i in range(n)]
            continue
        folder = out / kind.split_dirs[split]
        if split in kind.labelled_splits:
            for cls, n in classes.items():
                names = random.Random(f"{seed}/{split}/{cls}")
                jobs += [(folder / folders[cls] / hex_name(names), split, cls, i)
                         for i in range(n)]
        else:
            mixed = [(cls, i) for cls, n in classes.items() for i in range(n)]
            random.Random(f"{seed}/{split}/order").shuffle(mixed)
            jobs += [(folder / f"{k}.png", split, cls, i) for k, (cls, i) in enumerate(mixed)]
    return jobs


def hex_name(names: random.Random) -> str:
    """A uuid-like file name, as in the published data set."""
    return f"{uuid.UUID(int=names.getrandbits(128))}.png"


def phantom_kind(cls: str, index: int) -> str:
    """What to draw for a class folder: ``infected`` alternates pneumonia and COVID-19."""
    if cls == "infected":
        return "pneumonia" if index % 2 == 0 else "covid-19"
    return cls


def draw_phantom(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """One ``size`` x ``size`` uint8 radiograph phantom of ``kind``.

    ``kind`` is ``normal``, ``pneumonia`` or ``covid-19``.
    """
    x, y = pose_grid(rng, size)
    lungs = lung_fields(rng, x, y)
    image = anatomy(rng, x, y, lungs)
    if kind == "pneumonia":
        image += consolidation(rng, x, y, lungs)
    elif kind == "covid-19":
        image += ground_glass(rng, x, y, lungs)
    image = blur(image, sigma=0.7 * size / 128)
    return expose(rng, image)


def pose_grid(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates in [-1, 1] of each pixel, after a random rotation and shift."""
    axis = np.linspace(-1.0, 1.0, size)
    x, y = np.meshgrid(axis, axis)
    angle = np.deg2rad(rng.uniform(-8, 8))
    dx, dy = rng.uniform(-0.06, 0.06, size=2)
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * (x - dx) + sin * (y - dy), -sin * (x - dx) + cos * (y - dy)


def soft_ellipse(x, y, cx, cy, rx, ry, edge=0.06) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth edge of width ~``edge``."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp(-np.clip((1.0 - r) / edge, -30, 30)))


def lung_fields(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> list[dict]:
    """Two lung fields, each with its centre, radii and soft mask, wider at the base."""
    scale = rng.uniform(0.85, 1.1)
    lungs = []
    for side in (-1, 1):
        lung = {"side": side, "cx": side * 0.4 * scale, "cy": -0.05, "ry": 0.56 * scale}
        lung["rx"] = 0.27 * scale * rng.uniform(0.92, 1.08)
        widen = np.maximum(1.0 + 0.25 * (y - lung["cy"]) / lung["ry"], 0.4)
        lung["mask"] = soft_ellipse(x, y, lung["cx"], lung["cy"], lung["rx"] * widen, lung["ry"])
        lungs.append(lung)
    return lungs


def anatomy(rng: np.random.Generator, x, y, lungs: list[dict]) -> np.ndarray:
    """Background, torso, lungs, heart and mediastinum, spine and ribs, as a float image."""
    body = soft_ellipse(x, y, 0.0, 0.12, 0.86, 1.05, edge=0.04)
    image = 0.05 + 0.45 * body
    image -= 0.3 * (lungs[0]["mask"] + lungs[1]["mask"])
    image += 0.15 * np.exp(-((x / 0.11) ** 2 + ((y + 0.15) / 0.55) ** 2))  # mediastinum
    heart_x = rng.uniform(0.08, 0.16)  # the patient's left, the viewer's right
    image += 0.2 * soft_ellipse(x, y, heart_x, 0.3, 0.25, 0.19, edge=0.12)
    image += 0.07 * np.exp(-((x / 0.05) ** 2)) * body  # spine
    image += ribs(rng, x, y) * soft_ellipse(x, y, 0.0, -0.08, 0.8, 0.62, edge=0.08)
    image += 0.04 * texture(rng, x.shape[0], cells=10) * (lungs[0]["mask"] + lungs[1]["mask"])
    return image


def ribs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Curved bright bands crossing both lungs, falling towards the sides."""
    count = 8
    spacing = rng.uniform(0.13, 0.15)
    tops = -0.7 + spacing * np.arange(count)[:, None, None]
    curve = tops + 0.9 * x**2 - 0.25 * np.abs(x)
    bands = np.exp(-(((y - curve) / 0.03) ** 2)).sum(axis=0)
    return 0.07 * bands * (np.abs(x) > 0.06)


def texture(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse noise upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def patchiness(rng: np.random.Generator, size: int, depth: float, cells: int) -> np.ndarray:
    """A positive multiplier around 1 that breaks an opacity into patches."""
    return np.clip(1.0 + depth * texture(rng, size, cells), 0.3, None)


def blobs(x, y, centres, sigmas, amplitudes) -> np.ndarray:
    """Sum of isotropic gaussians, one per (centre, sigma, amplitude)."""
    cx, cy = centres[:, 0, None, None], centres[:, 1, None, None]
    sigma = sigmas[:, None, None]
    bumps = amplitudes[:, None, None] * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return bumps.sum(axis=0)


def consolidation(rng: np.random.Generator, x, y, lungs: list[dict]) -> np.ndarray:
    """Pneumonia: a few dense blobs in one lung, mostly in its lower zone."""
    lung = lungs[rng.integers(2)]
    n = rng.integers(2, 5)
    centres = np.column_stack([
        lung["cx"] + lung["rx"] * rng.uniform(-0.6, 0.6, n),
        lung["cy"] + lung["ry"] * rng.uniform(0.0, 0.7, n),
    ])
    dense = blobs(x, y, centres, rng.uniform(0.08, 0.14, n), rng.uniform(0.2, 0.3, n))
    return 0.3 * np.tanh(dense / 0.3) * lung["mask"] * patchiness(rng, x.shape[0], 0.3, cells=16)


def ground_glass(rng: np.random.Generator, x, y, lungs: list[dict]) -> np.ndarray:
    """COVID-19: faint, wide opacities near the outer edge of both lungs."""
    haze = np.zeros_like(x)
    for lung in lungs:
        n = rng.integers(2, 4)
        centres = np.column_stack([
            lung["cx"] + lung["side"] * lung["rx"] * rng.uniform(0.55, 0.9, n),
            lung["cy"] + lung["ry"] * rng.uniform(-0.3, 0.7, n),
        ])
        sigmas, amplitudes = rng.uniform(0.14, 0.22, n), rng.uniform(0.12, 0.18, n)
        haze += blobs(x, y, centres, sigmas, amplitudes) * lung["mask"]
    return haze * patchiness(rng, x.shape[0], 0.5, cells=12)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur with edge padding."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    size = image.shape[0]
    padded = np.pad(image, radius, mode="edge")
    rows = sum(w * padded[:, k : k + size] for k, w in enumerate(taps))
    return sum(w * rows[k : k + size, :] for k, w in enumerate(taps))


def acquire(pixels: np.ndarray, contrast: float, noise: float,
            rng: np.random.Generator) -> np.ndarray:
    """The phantom as another acquisition shows it (``synth --contrast --noise``): its
    range around its mean times ``contrast``, then Gaussian noise of standard deviation
    ``noise`` in 8-bit units, drawn from ``rng`` after the phantom, so the anatomy is
    the one the same seed draws. ``pixels`` itself, byte for byte, at 1 and 0."""
    if contrast == 1 and noise == 0:
        return pixels
    image = pixels.astype(np.float64)
    image = (image - image.mean()) * contrast + image.mean()
    image += noise * rng.standard_normal(image.shape)
    return np.round(np.clip(image, 0, 255)).astype(np.uint8)


def expose(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random gamma, contrast, brightness and noise, then quantise to uint8.

    The mean brightness is set to a random target drawn the same way for every
    class, so mean intensity alone cannot tell the classes apart.
    """
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    contrast = rng.uniform(0.85, 1.25)
    image = (image - image.mean()) * contrast + rng.uniform(0.2, 0.42)
    image += rng.uniform(0.005, 0.03) * rng.standard_normal(image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
