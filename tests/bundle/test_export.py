"""Export from the shared real sweeps: the best trial of each task, ONNX and torch.export
checked against PyTorch, safetensors reloaded, and a model card that carries its recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from covid_tune.data.dataset import load_dataset
from covid_tune.errors import UserError
from covid_tune.bundle.export import export_best
from covid_tune.nn.weights import load_model
from covid_tune.nn.logits import predict_logits
from covid_tune.nn.device import Device
from covid_tune.nn.models import WithFeatures, build_model, cam_spec
from covid_tune.data.preprocess import normalize
from covid_tune.core.numeric import sigmoid
from covid_tune.runs.reader import read_run
from covid_tune.core.tasks import TASKS

CPU = Device(torch.device("cpu"), None, False)


def card(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def test_one_folder_per_task_with_every_file(exported):
    for task in ("binary", "multilabel"):
        names = {p.name for p in (exported / task).iterdir()}
        assert {"model.onnx", "model.pt2", "model.safetensors", "model.json",
                "README.md"} <= names


def test_exports_the_best_checkpoint_of_all_trials(swept, exported):
    for run_dir, task, metric, best in ((swept.binary, "binary", "val_loss", min),
                                        (swept.multilabel, "multilabel", "sel_f1", max)):
        scores = [json.loads(p.read_text())["metrics"][metric]
                  for p in run_dir.glob("trial_*/checkpoint_*/recipe.json")]
        info = card(exported / task)
        recipe = json.loads((Path(info["source"]["checkpoint"]) / "recipe.json").read_text())
        assert recipe["metrics"][metric] == best(scores)
        assert info["validation_metrics"]["f1"] == recipe["metrics"]["val_f1"]
        assert info["selected_by"]["metric"] == metric


def test_model_json_documents_labels_preprocessing_and_provenance(swept, exported, binary_data):
    binary, multilabel = card(exported / "binary"), card(exported / "multilabel")
    assert binary["label_names"] == ["normal", "infected"]
    assert binary["output"]["positive_class"] == "infected"
    for info in (binary, multilabel):  # the checkpoint's own tuned thresholds
        recipe = json.loads((Path(info["source"]["checkpoint"]) / "recipe.json").read_text())
        assert info["thresholds"] == recipe["thresholds"] != {}
        assert info["threshold_logits"] == recipe["threshold_logits"]  # exact log-odds
        assert info["threshold_logits"].keys() == info["thresholds"].keys()
        assert info["temperatures"] == recipe["temperatures"]  # fitted on the choosing split
        for label, value in info["threshold_logits"].items():
            temperature = info["temperatures"][label]
            assert sigmoid(value / temperature) == pytest.approx(info["thresholds"][label])
        assert info["threshold_rule"] == recipe["threshold_rule"]
    assert list(binary["thresholds"]) == ["infected"]
    assert binary["threshold_rule"]["split"] == binary["selected_by"]["split"] == "validation"
    assert multilabel["threshold_rule"]["split"] == "selection"
    assert "tuned by the `youden` rule on selection" in (exported / "multilabel" /
                                                      "README.md").read_text()
    assert multilabel["output"]["label_order"] == ["covid", "normal", "pneumonia"]
    assert multilabel["output"]["label_encoding"]["covid-19"] == [1, 0, 1]
    prep = multilabel["preprocessing"]
    assert prep["size"] == 32 and prep["grayscale_to_channels"] == 3
    assert "centre crop" in prep["steps"] and "shorter side" in prep["steps"]
    assert multilabel["source"]["trial_id"] and multilabel["hyperparameters"]["lr"] > 0
    source = binary["source"]
    assert source["data"] == str(binary_data.resolve())
    assert source["data_fingerprint"] == read_run(swept.binary).record.provenance.data_fingerprint
    assert {"covid-tune", "torch", "ray", "optuna"} <= set(source["versions"])
    readme = (exported / "multilabel" / "README.md").read_text()
    assert "Not for clinical use" in readme and "say nothing clinically" in readme
    assert "- train: " in (exported / "binary" / "README.md").read_text()  # data counts


def test_onnx_program_and_safetensors_agree_with_pytorch(exported):
    for task in ("binary", "multilabel"):
        folder = exported / task
        info = card(folder)
        model = load_model(info["source"]["checkpoint"])
        hp = info["hyperparameters"]
        reloaded = build_model(hp["backbone"], TASKS[hp["task"]].outputs, hp["hidden"],
                               hp["dropout"], hp["frozen_layers"])
        reloaded.load_state_dict(load_file(folder / "model.safetensors"))
        reloaded.eval()
        images = load_dataset(info["source"]["data"], hp["task"], 32).splits["validation"].images
        expected = predict_logits(model, images, 64, CPU)
        assert np.allclose(predict_logits(reloaded, images, 64, CPU), expected)
        session = ort.InferenceSession(str(folder / "model.onnx"))
        for batch in (1, 5):  # the batch axis is dynamic
            got, features = session.run(None, {"images": normalize(images[:batch])})
            assert np.allclose(got, expected[:batch], rtol=1e-3, atol=1e-4)
        with torch.no_grad():  # the second output: the last feature maps, for Grad-CAM
            _, want = WithFeatures(model)(torch.from_numpy(normalize(images[:5])))
        assert np.allclose(features, want.numpy(), rtol=1e-3, atol=1e-4)
        assert info["cam"] == cam_spec(model)
        program = torch.export.load(str(folder / "model.pt2")).module()
        for batch in (1, 3):
            with torch.no_grad():
                got = program(torch.from_numpy(normalize(images[:batch]))).numpy()
            assert np.allclose(got, expected[:batch], rtol=1e-3, atol=1e-4)
        opsets = {o.domain: o.version for o in onnx.load(str(folder / "model.onnx")).opset_import}
        assert info["onnx_opset"] == opsets.get("", opsets.get("ai.onnx")) >= 17
        assert info["format"] == "covid-tune model 2" and info["files"]["program"] == "model.pt2"


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="not a covid-tune run"):
        export_best([str(tmp_path)], str(tmp_path / "model"))
