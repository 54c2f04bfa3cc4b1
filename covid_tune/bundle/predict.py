"""Run an exported model on images with ONNX Runtime alone: no torch, no Ray.

``predict(model_dir, input, out_csv)`` reads ``model.json`` (``covid_tune.bundle.format``)
for the labels, thresholds and preprocessing, decodes and normalises each image as
training did (``covid_tune.data.preprocess``), and writes one CSV row per readable
image: the file name, then the label bits in ``model.json``'s order and each label's
probability (multilabel), or the class and the probability of the positive class
(binary). Unreadable images are listed on stderr and skipped.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np

from covid_tune.data.dataset import IMAGE_SUFFIXES, is_junk
from covid_tune.errors import UserError
from covid_tune.bundle.format import read_card, temperatures, threshold_logits
from covid_tune.data.preprocess import normalize, try_read
from covid_tune.core.numeric import sigmoid

BATCH = 64
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a cell starting with one of these as a formula."""


def predict(model_dir: str, input: str, out_csv: str, cam_dir: str | None = None) -> str:
    """Predict every image of ``input`` (a file or a folder); with ``cam_dir``, also one
    Grad-CAM overlay PNG per image there. A one-line summary."""
    out = check_out(Path(out_csv))
    card = read_card(Path(model_dir))
    session = open_session(Path(model_dir) / card["files"]["onnx"])
    head = head_weights(Path(model_dir), card) if cam_dir else None
    root, files = find_images(Path(input))
    rows, skipped = [], []
    for start in range(0, len(files), BATCH):
        names, pixels = decode_batch(files[start:start + BATCH], root, card, skipped)
        if names:
            x = normalize(pixels, card["preprocessing"]["mean"], card["preprocessing"]["std"])
            logits, features = run_model(session, card, x, model_dir)
            rows += prediction_rows(card, names, logits)
            if head is not None:
                write_cams(Path(cam_dir), card, head, names, pixels, logits, features)
    write_csv(out, header(card), rows)
    for name, why in skipped:
        print(f"skipped {name}: {why}", file=sys.stderr)
    return (f"{len(rows)} image(s) predicted -> {out_csv}"
            + (f"; Grad-CAM overlays in {cam_dir}" if cam_dir and rows else "")
            + (f"; {len(skipped)} unreadable, skipped (listed above)" if skipped else ""))


def head_weights(model_dir: Path, card: dict) -> dict[str, np.ndarray]:
    """The head's weights from ``model.safetensors`` (as numpy, no torch), for Grad-CAM."""
    from safetensors import safe_open

    path = model_dir / card["files"]["weights"]
    layers = card["cam"]["head"] + ([card["cam"]["norm"]] if card["cam"].get("norm") else [])
    names = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    try:
        with safe_open(str(path), framework="np") as weights:
            return {name: weights.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors' own error types, or a missing file
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot read the head's weights for Grad-CAM ({reason}); "
                        f"export the model again with `covid-tune export`") from None


def write_cams(folder: Path, card: dict, head: dict, names: list[str], pixels: np.ndarray,
               logits: np.ndarray, features: np.ndarray) -> None:
    """One overlay per image: the heat map of its top label (Part 2) or of its
    predicted class (Part 1), the labels and probabilities in the title."""
    from covid_tune.bundle.cam import grad_cam, write_overlay

    folder.mkdir(parents=True, exist_ok=True)
    for name, image, row, maps in zip(names, pixels, logits, features):
        direction, title = cam_target(card, row)
        heat = grad_cam(maps, head, card["cam"], direction)
        write_overlay(image, heat, title, folder / (name.replace("/", "__") + ".cam.png"))


def cam_target(card: dict, logits: np.ndarray) -> tuple[np.ndarray, str]:
    """(which score the map explains, the title) for one image's logits."""
    from covid_tune.bundle.cam import explain

    output = card["output"]
    if card["task"] == "multilabel":
        return explain(logits, output["label_order"])
    positive = output["positive_class"]
    return explain(logits, output["class_order"], positive, threshold_logits(card)[positive])


def open_session(path: Path):
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"{path}: missing; export the model again with `covid-tune export`")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own types for a damaged file
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: ONNX Runtime cannot load it ({reason}); export the model "
                        f"again with `covid-tune export`") from None


def run_model(session, card: dict, x: np.ndarray, model_dir: str):
    """(logits, last feature maps) of one batch; UserError when ``model.json`` does not
    fit ``model.onnx``."""
    outputs = len(card["output"].get("label_order") or card["output"].get("class_order"))
    try:
        logits, *rest = session.run(None, {card["input"]["name"]: x})
    except Exception as exc:  # ONNX Runtime's own error types
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{model_dir}: model.json does not fit model.onnx ({reason}); export "
                        f"the model again with `covid-tune export`") from None
    if logits.ndim != 2 or logits.shape[1] != outputs:
        raise UserError(f"{model_dir}: model.onnx gives {logits.shape[1:]} outputs per image, "
                        f"model.json names {outputs}; export the model again")
    return logits, (rest[0] if rest else None)


def find_images(path: Path) -> tuple[Path, list[Path]]:
    """(the folder names are relative to, the image files), in natural name order."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    files = [p for p in path.rglob("*") if p.is_file() and not is_junk(p)]
    if not files:
        raise UserError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
    return path, sorted(files, key=lambda p: natural_key(p.relative_to(path).as_posix()))


def natural_key(name: str) -> list:
    """``2.png`` before ``10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def decode_batch(files: list[Path], root: Path, card: dict,
                 skipped: list) -> tuple[list[str], np.ndarray]:
    """Names and uint8 pixels of the readable files; the others go to ``skipped``."""
    size = int(card["preprocessing"]["size"])
    names, pixels = [], []
    for path in files:
        image, _, why = try_read(path, size)
        name = path.relative_to(root).as_posix()
        if image is None:
            skipped.append((name, why))
        else:
            names.append(name)
            pixels.append(image)
    return names, np.stack(pixels) if pixels else np.zeros((0, size, size), np.uint8)


def header(card: dict) -> list[str]:
    """``file``, the decisions, then ``p_<label>`` probabilities."""
    if card["task"] == "multilabel":
        order = card["output"]["label_order"]
        return ["file", *order, *(f"p_{label}" for label in order)]
    return ["file", "class", f"p_{card['output']['positive_class']}"]


def prediction_rows(card: dict, names: list[str], logits: np.ndarray) -> list[list]:
    """One CSV row per image: label bits (multilabel) or class and probability (binary).

    Decisions compare log-odds with the card's threshold log-odds, so they hold for
    logits far past where a probability rounds to 0 or 1; probabilities are written
    with 6 significant digits (``1.2e-50``, not ``0.000000``)."""
    limits, scale = threshold_logits(card), temperatures(card)
    if card["task"] == "multilabel":
        order = card["output"]["label_order"]
        bits = logits > np.asarray([limits[label] for label in order])
        for source, target in card["output"].get("implies", []):
            bits[:, order.index(target)] |= bits[:, order.index(source)]
        calibrated = logits / np.asarray([scale.get(label, 1.0) for label in order])
        return [[n, *(int(b) for b in row), *(f"{v:.6g}" for v in p)]
                for n, row, p in zip(names, bits, sigmoid(calibrated))]
    classes = card["output"]["class_order"]
    positive = card["output"]["positive_class"]
    index = classes.index(positive)
    other = classes[1 - index]
    odds = logits[:, index].astype(np.float64) - logits[:, 1 - index]  # softmax of two logits
    calibrated = odds / scale.get(positive, 1.0)
    return [[n, positive if score > limits[positive] else other, f"{p:.6g}"]
            for n, score, p in zip(names, odds, sigmoid(calibrated))]


def safe_cell(value: str) -> str:
    """Prefix ``'`` to text a spreadsheet would run as a formula."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def check_out(path: Path) -> Path:
    """The CSV goes exactly where asked; refuse a folder before any work is done."""
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; give a file name such as preds.csv")
    return path


def write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    """Write at ``path`` (its folder is created); names made formula-safe."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[safe_cell(row[0]), *row[1:]] for row in rows])
