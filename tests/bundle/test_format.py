"""The exported model bundle's card (``model.json``) and what ``predict`` makes of a
damaged bundle, on bundles written by hand: a card with ``write_card`` and a tiny ONNX
graph built with ``onnx.helper``, so no sweep, no torch and no export is needed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from covid_tune.cli import main
from covid_tune.errors import UserError
from covid_tune.bundle.format import (CARD_FILE, CARD_FORMAT, ONNX_FILE, read_card,
                                     threshold_logits, write_card)
from covid_tune.data.preprocess import describe

SIZE = 32


def binary_card() -> dict:
    """What ``export`` writes for a binary model, less what ``predict`` does not read."""
    return {
        "task": "binary", "backbone": "resnet18",
        "files": {"onnx": ONNX_FILE},
        "input": {"name": "images", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"},
        "output": {"name": "logits", "activation": "softmax",
                   "class_order": ["normal", "infected"], "positive_class": "infected"},
        "label_names": ["normal", "infected"],
        "thresholds": {"infected": 0.5},
        "threshold_logits": {"infected": 0.0},
        "preprocessing": describe(SIZE),
        "cam": {"output": "features", "pool": [1, 1], "head": ["net.fc.0", "net.fc.3"]},
    }


def multilabel_card() -> dict:
    labels = ["covid", "normal", "pneumonia"]
    return {**binary_card(), "task": "multilabel", "label_names": labels,
            "output": {"name": "logits", "activation": "sigmoid per label",
                       "label_order": labels},
            "thresholds": {label: 0.5 for label in labels},
            "threshold_logits": {label: 0.0 for label in labels}}


def tiny_onnx(path: Path, outputs: int = 2) -> None:
    """images [batch, 3, S, S] -> global average pool -> linear -> logits [batch, outputs]."""
    weight = np.arange(3 * outputs, dtype=np.float32).reshape(3, outputs) / 10 - 0.2
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])],
        [numpy_helper.from_array(weight, "weight"),
         numpy_helper.from_array(np.zeros(outputs, np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=8)  # one every ONNX Runtime since 1.10 reads
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A whole binary bundle: card and ONNX graph."""
    folder = tmp_path / "binary"
    folder.mkdir()
    write_card(folder, binary_card())
    tiny_onnx(folder / ONNX_FILE)
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, shade in enumerate((30, 220)):
        Image.new("L", (40, 48), shade).save(folder / f"{i}.png")
    return folder


def refused(capsys, argv: list[str]) -> str:
    """``covid-tune ...`` exits 2 with one ``covid-tune: error:`` line; the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("covid-tune: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def refusal(folder: Path) -> str:
    with pytest.raises(UserError) as caught:
        read_card(folder)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- model.json -----------------------------------------------------------------------

@pytest.mark.parametrize("card", [binary_card(), multilabel_card()], ids=["binary", "multilabel"])
def test_card_round_trip(tmp_path, card):
    write_card(tmp_path, card)
    assert read_card(tmp_path) == {"format": CARD_FORMAT, **card}


def test_a_folder_without_model_json(tmp_path):
    message = refusal(tmp_path)
    assert f"{tmp_path}: no {CARD_FILE} here" in message and "covid-tune export" in message


@pytest.mark.parametrize("text", ["", '{"format": "covid-tune model 1", "task": "bin',
                                  "\x00\xff garbage"], ids=["empty", "cut-short", "garbage"])
def test_model_json_that_is_not_json(tmp_path, text):
    (tmp_path / CARD_FILE).write_text(text)
    message = refusal(tmp_path)
    assert f"{tmp_path / CARD_FILE}: damaged, not readable JSON" in message
    assert "export the model again" in message


@pytest.mark.parametrize("text", ["[1, 2]", '"a card"', "null"])
def test_model_json_that_is_not_an_object(tmp_path, text):
    (tmp_path / CARD_FILE).write_text(text)
    assert "not a model card" in refusal(tmp_path)


def test_missing_and_mistyped_keys_are_named(tmp_path):
    card = binary_card()
    del card["thresholds"]
    card["preprocessing"] = "resize to 32"
    write_card(tmp_path, card)
    message = refusal(tmp_path)
    assert "missing or damaged keys thresholds, preprocessing" in message


def test_another_format_is_refused(tmp_path):
    (tmp_path / CARD_FILE).write_text(json.dumps({**binary_card(), "format": "covid-tune model 1"}))
    message = refusal(tmp_path)
    assert f"format 'covid-tune model 1' is not '{CARD_FORMAT}'" in message


@pytest.mark.parametrize(("change", "why"), [
    ({"output": {**binary_card()["output"], "positive_class": "covid"}},
     "binary output needs two classes, one of them positive"),
    ({"output": {**binary_card()["output"], "class_order": ["infected"]}},
     "binary output needs two classes, one of them positive"),
    ({"thresholds": {"normal": 0.5}}, "'infected'"),
    ({"thresholds": {"infected": "high"}}, "could not convert"),
    ({"threshold_logits": [0.0]}, "threshold_logits is not a label -> log-odds mapping"),
    ({"threshold_logits": {"normal": 0.0}}, "'infected'"),
    ({"threshold_logits": {"infected": float("nan")}}, "log-odds of infected is not a number"),
    ({"threshold_logits": {"infected": 2.0}},
     "threshold of infected (0.5) disagrees with its log-odds (2); edit both, or remove "
     "threshold_logits"),
    ({"task": "segmentation"}, "unknown task 'segmentation'"),
    ({"preprocessing": {**describe(SIZE), "mean": [0.5]}}, "3 means and stds"),
    ({"cam": {"output": "features", "pool": [7], "head": ["a", "b"]}}, "two pool cells"),
], ids=["positive-not-a-class", "one-class", "no-positive-threshold", "threshold-not-a-number",
        "logits-not-a-mapping", "no-positive-logit", "logit-nan", "logit-disagrees",
        "unknown-task", "one-mean", "one-pool-cell"])
def test_inconsistent_binary_cards(tmp_path, change, why):
    write_card(tmp_path, {**binary_card(), **change})
    message = refusal(tmp_path)
    assert "inconsistent model card" in message and why in message


def test_threshold_logits_are_exact_and_optional(tmp_path):
    """The card's log-odds are what decisions use, also where the probability is 0.0
    (log-odds -800: far below float64's smallest probability); a card written before
    they were recorded is read with the log-odds of its probabilities."""
    card = {**binary_card(), "thresholds": {"infected": 0.0},
            "threshold_logits": {"infected": -800.0}}
    write_card(tmp_path, card)
    assert threshold_logits(read_card(tmp_path)) == {"infected": -800.0}
    del card["threshold_logits"]
    card["thresholds"] = {"infected": 0.25}
    write_card(tmp_path, card)
    assert threshold_logits(read_card(tmp_path)) == {"infected": pytest.approx(np.log(1 / 3))}


def test_multilabel_card_without_a_labels_threshold(tmp_path):
    card = multilabel_card()
    del card["thresholds"]["pneumonia"]
    write_card(tmp_path, card)
    assert "inconsistent model card ('pneumonia')" in refusal(tmp_path)


# --- predict on a bundle --------------------------------------------------------------

def test_predict_on_a_whole_bundle(bundle, images, tmp_path, capsys):
    """The hand-written bundle is valid, so the refusals below are the damage's doing."""
    out = tmp_path / "preds.csv"
    assert main(["predict", str(bundle), str(images), "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "class", "p_infected"]
    assert [r[0] for r in rows[1:]] == ["0.png", "1.png"]
    assert all(r[1] in ("normal", "infected") and 0 <= float(r[2]) <= 1 for r in rows[1:])


@pytest.mark.parametrize("damage", ["cut-short", "random-bytes", "empty"])
def test_predict_with_a_damaged_model_onnx(bundle, images, tmp_path, capsys, damage):
    onnx_file = bundle / ONNX_FILE
    data = onnx_file.read_bytes()
    onnx_file.write_bytes({"cut-short": data[:len(data) // 2],
                           "random-bytes": np.random.default_rng(0).bytes(len(data)),
                           "empty": b""}[damage])
    message = refused(capsys, ["predict", str(bundle), str(images),
                               "--out", str(tmp_path / "p.csv")])
    assert f"{onnx_file}: ONNX Runtime cannot load it" in message
    assert "export the model again" in message
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_model_onnx_missing(bundle, images, tmp_path, capsys):
    (bundle / ONNX_FILE).unlink()
    message = refused(capsys, ["predict", str(bundle), str(images),
                               "--out", str(tmp_path / "p.csv")])
    assert f"{bundle / ONNX_FILE}: missing" in message


def test_predict_with_a_card_that_does_not_fit_the_graph(bundle, images, tmp_path, capsys):
    """model.json names three outputs, model.onnx gives two."""
    write_card(bundle, multilabel_card())
    message = refused(capsys, ["predict", str(bundle), str(images),
                               "--out", str(tmp_path / "p.csv")])
    assert "model.onnx gives (2,) outputs per image, model.json names 3" in message


def test_predict_with_a_damaged_card(bundle, images, tmp_path, capsys):
    (bundle / CARD_FILE).write_text((bundle / CARD_FILE).read_text()[:40])
    message = refused(capsys, ["predict", str(bundle), str(images),
                               "--out", str(tmp_path / "p.csv")])
    assert f"{bundle / CARD_FILE}: damaged, not readable JSON" in message
