"""``predict``: ONNX Runtime alone (no torch, no Ray) on an exported model, against the
training code's own evaluation of the same images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_tune.errors import UserError
from covid_tune.nn.weights import load_model
from covid_tune.nn.logits import predict_logits
from covid_tune.nn.device import Device
from covid_tune.bundle.predict import predict, prediction_rows, safe_cell
from covid_tune.data.preprocess import read_gray
from helpers import loaded_after

CPU = Device(torch.device("cpu"), None, False)


def source_model(folder: Path):
    return load_model(json.loads((folder / "model.json").read_text())["source"]["checkpoint"])


def test_predict_folder_matches_training_evaluation(exported, multilabel_data, tmp_path,
                                                    capsys):
    """Part 2's flat Test/: one row per readable image, bits as the torch model gives."""
    folder = tmp_path / "Test"
    folder.mkdir()
    sources = sorted((multilabel_data / "Test").iterdir())
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]")
    (folder / "=cmd.png").write_bytes(sources[0].read_bytes())
    csv_path = tmp_path / "nested" / "preds.csv"
    summary = predict(str(exported / "multilabel"), str(folder), str(csv_path))
    assert "1 unreadable" in summary and "broken.png" in capsys.readouterr().err
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["file", "covid", "normal", "pneumonia", "p_covid", "p_normal",
                       "p_pneumonia"]
    assert len(rows) - 1 == len(sources) + 1  # the copies and the "=cmd.png" one
    assert "'=cmd.png" in [r[0] for r in rows]
    model = source_model(exported / "multilabel")
    by_name = {r[0]: [int(b) for b in r[1:4]] for r in rows[1:]}
    card = json.loads((exported / "multilabel" / "model.json").read_text())
    order = ("covid", "normal", "pneumonia")
    limits = np.array([card["thresholds"][label] for label in order])
    scale = np.array([card["temperatures"][label] for label in order])
    for source in sources:
        logits = predict_logits(model, read_gray(source, 32)[0][None], 1, CPU)
        probs = 1 / (1 + np.exp(-logits[0] / scale))  # calibrated by the card's temperatures
        bits = [int(p) for p in probs > limits]
        bits[2] |= bits[0]  # covid implies pneumonia
        assert by_name[source.name][:3] == bits
        row = next(r for r in rows if r[0] == source.name)
        assert np.allclose([float(v) for v in row[4:]], probs, atol=1e-4)


def test_predict_one_binary_image(exported, binary_data, tmp_path):
    image = sorted((binary_data / "test" / "pneumonia").glob("*.png"))[0]
    predict(str(exported / "binary"), str(image), str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv", newline="") as handle:
        header, row = list(csv.reader(handle))
    assert header == ["file", "class", "p_infected"]
    logits = predict_logits(source_model(exported / "binary"), read_gray(image, 32)[0][None],
                            1, CPU)[0]
    card = json.loads((exported / "binary" / "model.json").read_text())
    probability = 1 / (1 + np.exp((logits[0] - logits[1]) / card["temperatures"]["infected"]))
    assert row[0] == image.name and float(row[2]) == pytest.approx(probability, abs=1e-4)
    assert row[1] == ("infected" if probability > card["thresholds"]["infected"] else "normal")


def test_predict_applies_the_cards_thresholds(exported, binary_data, tmp_path):
    """The same image and model, with infected's threshold set below and above its
    probability: the class follows the threshold, given as log-odds beside the
    probability, or as a probability alone (a card from before the log-odds)."""
    image = sorted((binary_data / "test" / "normal").glob("*.png"))[0]
    model = tmp_path / "model"
    shutil.copytree(exported / "binary", model)
    info = json.loads((model / "model.json").read_text())
    assert info["threshold_logits"].keys() == info["thresholds"].keys() == {"infected"}

    def predicted(thresholds: dict, logits: dict | None) -> str:
        info.pop("threshold_logits", None)
        (model / "model.json").write_text(json.dumps(
            {**info, "thresholds": thresholds, **({"threshold_logits": logits} if logits else {})}))
        predict(str(model), str(image), str(tmp_path / "p.csv"))
        with open(tmp_path / "p.csv", newline="") as handle:
            return list(csv.reader(handle))[1][1]

    assert predicted({"infected": 0.0}, {"infected": -1000.0}) == "infected"
    assert predicted({"infected": 1.0}, {"infected": 1000.0}) == "normal"
    assert predicted({"infected": 0.0}, None) == "infected"
    assert predicted({"infected": 1.0}, None) == "normal"
    with pytest.raises(UserError, match="threshold of infected is not a probability"):
        predicted({"infected": 1.5}, None)
    with pytest.raises(UserError, match=r"threshold of infected \(0\.3\) disagrees with its "
                                        r"log-odds \(3\)( at temperature [0-9.]+)?; edit both, or remove "
                                        r"threshold_logits"):
        predicted({"infected": 0.3}, {"infected": 3.0})


def test_prediction_rows_decide_on_log_odds_far_past_saturation():
    """Logits of a few hundred, where every probability rounds to 0 or 1 (the old
    sigmoid gave 0.000000 from -37 on): the card's threshold log-odds still part them,
    and the probabilities are written with their digits, not as 0.000000."""
    card = {"task": "binary", "thresholds": {"infected": 0.0},
            "threshold_logits": {"infected": -250.0},
            "output": {"class_order": ["normal", "infected"], "positive_class": "infected"}}
    logits = np.array([[0.0, -200.0], [100.0, -150.0], [-60.0, -300.0], [5.0, -400.0]],
                      dtype=np.float32)  # log-odds -200, -250, -240, -405
    rows = prediction_rows(card, ["a", "b", "c", "d"], logits)
    assert [r[1] for r in rows] == ["infected", "normal", "infected", "normal"]
    assert [float(r[2]) for r in rows] == pytest.approx(np.exp([-200.0, -250.0, -240.0, -405.0]),
                                                        rel=1e-5)
    # a card without log-odds: its probability 0.0 is log-odds -inf, every image infected
    old = {key: value for key, value in card.items() if key != "threshold_logits"}
    assert {r[1] for r in prediction_rows(old, ["a", "b", "c", "d"], logits)} == {"infected"}
    # multilabel: each label's logit against its own log-odds, either side of +-40..+-400
    labels = ["covid", "normal", "pneumonia"]
    card = {"task": "multilabel", "output": {"label_order": labels},
            "thresholds": {"covid": 0.0, "normal": 1.0, "pneumonia": 0.5},
            "threshold_logits": {"covid": -300.0, "normal": 60.0, "pneumonia": 0.0}}
    logits = np.array([[-250.0, 80.0, -40.0], [-350.0, 50.0, 400.0]], dtype=np.float32)
    rows = prediction_rows(card, ["x", "y"], logits)
    assert [r[1:4] for r in rows] == [[1, 1, 0], [0, 0, 1]]
    assert float(rows[0][4]) == pytest.approx(np.exp(-250.0), rel=1e-5) and rows[1][6] == "1"


def test_predict_imports_neither_torch_nor_ray(exported, tmp_path):
    image = tmp_path / "x.png"
    Image.new("L", (40, 50), 128).save(image)
    code = (f"from covid_tune.bundle.predict import predict\n"
            f"predict({str(exported / 'binary')!r}, {str(image)!r}, {str(tmp_path / 'o.csv')!r})")
    assert loaded_after(code, ("torch", "ray", "torchvision")) == []
    assert (tmp_path / "o.csv").is_file()


def test_predict_refuses_a_folder_as_csv(exported, tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        predict(str(exported / "binary"), str(exported / "binary"), str(tmp_path))


@pytest.mark.parametrize(("name", "safe"), [
    ("=1+1.png", "'=1+1.png"), ("+a.png", "'+a.png"), ("-a.png", "'-a.png"),
    ("@a.png", "'@a.png"), ("a=b.png", "a=b.png")])
def test_formula_names_are_neutralised(name, safe):
    assert safe_cell(name) == safe


def test_predict_with_model_files_missing_or_not_fitting(exported, tmp_path):
    image = tmp_path / "x.png"
    Image.new("L", (40, 40), 100).save(image)
    with pytest.raises(UserError, match="model.json"):
        predict(str(tmp_path), str(image), str(tmp_path / "p.csv"))
    partial = tmp_path / "partial"
    shutil.copytree(exported / "binary", partial)
    (partial / "model.onnx").unlink()
    with pytest.raises(UserError, match="model.onnx"):
        predict(str(partial), str(image), str(tmp_path / "p.csv"))
    shutil.copy(exported / "multilabel" / "model.onnx", partial / "model.onnx")
    with pytest.raises(UserError, match="model.onnx gives"):  # 3 outputs, card says 2
        predict(str(partial), str(image), str(tmp_path / "p.csv"))


def test_predict_writes_a_grad_cam_overlay_per_image(exported, multilabel_data, tmp_path,
                                                     capsys):
    """``--cam DIR``: one PNG per readable image, named after it, from ONNX Runtime and
    numpy alone (no torch, no Ray in the process that made them)."""
    from covid_tune.cli import main

    folder = tmp_path / "in"
    sources = sorted((multilabel_data / "Test").iterdir())[:3]
    for source in sources:
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "sub" / source.name).write_bytes(source.read_bytes())
    code = (f"from covid_tune.cli import main\n"
            f"rc = main(['predict', {str(exported / 'multilabel')!r}, {str(folder)!r}, "
            f"'--out', {str(tmp_path / 'p.csv')!r}, '--cam', {str(tmp_path / 'cams')!r}])\n"
            f"assert rc == 0")
    assert loaded_after(code, ("torch", "ray")) == []
    pngs = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert pngs == sorted(f"sub__{s.name}.cam.png" for s in sources)
    for name in pngs:
        with Image.open(tmp_path / "cams" / name) as image:
            image.verify()
    assert main(["predict", str(exported / "binary"), str(folder), "--out",
                 str(tmp_path / "b.csv"), "--cam", str(tmp_path / "bcams")]) == 0
    assert "Grad-CAM overlays in" in capsys.readouterr().out
    assert len(list((tmp_path / "bcams").iterdir())) == 3
