"""The exported model bundle: ``<out>/<task>/``, written by ``export``, read by ``predict``.

::

    model.onnx            logits for a batch of images (dynamic batch axis); its opset
                          is in model.json (onnx_opset)
    model.pt2             the same network as a torch.export program
                          (torch.export.load(...).module())
    model.safetensors     the weights (for covid_tune.nn.models.build_model)
    model.json            the card: labels and their order, thresholds and how they were
                          tuned, preprocessing, hyperparameters, metrics, source run
    README.md             a short model card in words

The card's thresholds are label -> number twice over: ``thresholds`` as probabilities,
for people to read, and ``threshold_logits`` as log-odds, exact, which ``predict``
compares with each image's log-odds (binary: ``logit_infected - logit_normal``;
multilabel: the label's logit), so a decision holds where a probability has rounded to
0 or 1. ``temperatures`` (label -> T, fitted on the choosing split; optional, 1 when
absent) calibrate the probabilities: P = sigmoid(log-odds / T). ``thresholds`` are on
that calibrated scale, so sigmoid(threshold_logits / T) must equal them. A card
without ``threshold_logits`` (written before they were recorded) is read with the
log-odds of its ``thresholds`` instead, so the keys are optional and the format did
not change for them. ``output.implies`` (optional) lists (label, implied label) pairs
that every decision applies: Part 2's covid implies pneumonia.

Format 2 (``covid-tune model 2``): ``model.pt2`` replaced the deprecated TorchScript
file, ``model.onnx`` gained a second output (``features``, the last feature maps, for
Grad-CAM), and the card gained ``onnx_opset``, ``threshold_rule`` and ``cam``. A bundle of format 1
is refused with how to export it again.

This module owns the names and ``model.json``'s shape; it imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.core.numeric import logit, sigmoid

ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
README_FILE = "README.md"
CARD_FORMAT = "covid-tune model 2"

CARD_KEYS = {"format": str, "task": str, "files": dict, "input": dict, "output": dict,
             "label_names": list, "thresholds": dict, "preprocessing": dict, "cam": dict}
"""What ``predict`` needs of ``model.json``, and the type of each."""


def write_card(folder: Path, card: dict) -> None:
    (folder / CARD_FILE).write_text(json.dumps({"format": CARD_FORMAT, **card}, indent=1))


def read_card(folder: Path) -> dict:
    """``model.json`` of a bundle, its shape checked; UserError naming what is wrong."""
    path = folder / CARD_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {CARD_FILE} here; pass a folder written by "
                        f"`covid-tune export` (OUT/binary or OUT/multilabel)")
    again = "export the model again with `covid-tune export`"
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: damaged, not readable JSON ({str(exc)[:120]}); {again}") from None
    if not isinstance(card, dict):
        raise UserError(f"{path}: not a model card; {again}")
    bad = [k for k, kind in CARD_KEYS.items() if not isinstance(card.get(k), kind)]
    if bad:
        raise UserError(f"{path}: missing or damaged keys {', '.join(bad)}; {again}")
    if card["format"] != CARD_FORMAT:
        raise UserError(f"{path}: format {card['format']!r} is not {CARD_FORMAT!r}; {again}")
    try:
        check_card(card)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"{path}: inconsistent model card ({exc}); {again}") from None
    return card


def check_card(card: dict) -> None:
    """Raise if the parts ``predict`` combines do not fit together."""
    prep, output = card["preprocessing"], card["output"]
    size = int(prep["size"])
    if size < 1 or len(prep["mean"]) != 3 or len(prep["std"]) != 3:
        raise ValueError("preprocessing needs a size and 3 means and stds")
    if not isinstance(card["input"]["name"], str) or not isinstance(card["files"]["onnx"], str):
        raise ValueError("no input name or onnx file")
    if card["task"] == "multilabel":
        labels = output["label_order"]
    elif card["task"] == "binary":
        labels = [output["positive_class"]]
        if len(output["class_order"]) != 2 or labels[0] not in output["class_order"]:
            raise ValueError("binary output needs two classes, one of them positive")
    else:
        raise ValueError(f"unknown task {card['task']!r}")
    logits = card.get("threshold_logits")
    if logits is not None and not isinstance(logits, dict):
        raise ValueError("threshold_logits is not a label -> log-odds mapping")
    scale = temperatures(card)
    for label in labels:
        probability = float(card["thresholds"][label])
        if not 0 <= probability <= 1:
            raise ValueError(f"threshold of {label} is not a probability")
        if not (math.isfinite(scale.get(label, 1.0)) and scale.get(label, 1.0) > 0):
            raise ValueError(f"temperature of {label} is not a positive number")
        if logits is not None:
            check_logit(label, float(logits[label]), probability, scale.get(label, 1.0))
    for pair in card["output"].get("implies", []):
        if len(pair) != 2 or not set(pair) <= set(card["label_names"]):
            raise ValueError(f"output.implies: {pair} is not a pair of labels")
    cam = card["cam"]
    if not (isinstance(cam.get("output"), str) and len(cam["pool"]) == 2
            and all(int(n) >= 1 for n in cam["pool"]) and len(cam["head"]) == 2
            and all(isinstance(name, str) for name in cam["head"])):
        raise ValueError("cam needs an output name, two pool cells and two head layers")


def check_logit(label: str, value: float, probability: float, temperature: float = 1.0) -> None:
    """Raise unless ``value`` is log-odds whose probability, after ``temperature``, is
    ``probability``."""
    if math.isnan(value):
        raise ValueError(f"threshold log-odds of {label} is not a number")
    if not math.isclose(float(sigmoid(value / temperature)), probability, rel_tol=1e-6):
        scaled = f" at temperature {temperature:g}" if temperature != 1.0 else ""
        raise ValueError(f"threshold of {label} ({probability:g}) disagrees with its "
                         f"log-odds ({value:g}){scaled}; edit both, or remove "
                         f"threshold_logits to apply thresholds")


def threshold_logits(card: dict) -> dict[str, float]:
    """A checked card's thresholds as raw log-odds: its ``threshold_logits``, or the
    log-odds of its ``thresholds`` (times the temperature) for a card written before
    those were recorded."""
    given = card.get("threshold_logits")
    if given is not None:
        return {label: float(value) for label, value in given.items()}
    scale = temperatures(card)
    return {label: float(logit(value)) * scale.get(label, 1.0)
            for label, value in card["thresholds"].items()}


def temperatures(card: dict) -> dict[str, float]:
    """Label -> temperature (``temperatures``; empty for a card without them: 1)."""
    given = card.get("temperatures") or {}
    if not isinstance(given, dict):
        raise ValueError("temperatures is not a label -> number mapping")
    return {label: float(value) for label, value in given.items()}
