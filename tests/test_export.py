"""Export round trip from small real sweeps: ONNX and TorchScript against PyTorch,
safetensors reloaded, and predict (ONNX Runtime only) against the training code's own
evaluation of the same images."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from covid_tune.augment import normalize_numpy
from covid_tune.data import load_dataset, read_gray
from covid_tune.errors import UserError
from covid_tune.export import export_best
from covid_tune.models import build_model
from covid_tune.predict import normalize, predict, safe_cell
from covid_tune.runs import load_model, read_run
from covid_tune.sweep import SweepOptions, run_sweep
from covid_tune.tasks import TASKS
from covid_tune.train import Device, predict_logits

CPU = Device(torch.device("cpu"), None, False)

SPACE = """
task: {task}
metric: val_f1
mode: max
max_epochs: 2
image_size: 32
pretrained: none
num_samples: 2
augment: false
asha: {{grace_period: 1, reduction_factor: 2}}
params:
  backbone: resnet18
  frozen_layers: {{low: 0, high: 20}}
  lr: {{low: 1.0e-3, high: 5.0e-2, log: true}}
  momentum: 0.9
  batch_size: 16
  hidden: 32
  dropout: 0.2
"""


@pytest.fixture(scope="module")
def exported(ray_cluster, binary_data, multilabel_data, tmp_path_factory):
    """A binary and a multilabel sweep, exported together: (run dirs, export folder)."""
    tmp = tmp_path_factory.mktemp("export")
    runs = []
    for task, data in (("binary", binary_data), ("multilabel", multilabel_data)):
        space_file = tmp / f"{task}.yaml"
        space_file.write_text(SPACE.format(task=task))
        run_sweep(SweepOptions(space_file=str(space_file), data=str(data), name=task,
                               storage_path=str(tmp / "runs")))
        runs.append(tmp / "runs" / task)
    folders = export_best([str(r) for r in runs], str(tmp / "model"))
    return runs, tmp / "model", folders


def card(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def test_one_folder_per_task_with_every_file(exported):
    _, out, folders = exported
    assert folders == [out / "binary", out / "multilabel"]
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert {"model.onnx", "model.torchscript.pt", "model.safetensors", "model.json",
                "README.md"} <= names


def test_exports_the_best_checkpoint_of_all_trials(exported):
    runs, out, _ = exported
    for run_dir, folder in zip(runs, (out / "binary", out / "multilabel")):
        scores = [json.loads(p.read_text())["metrics"]["val_f1"]
                  for p in run_dir.glob("trial_*/checkpoint_*/recipe.json")]
        assert card(folder)["validation_metrics"]["f1"] == max(scores)


def test_model_json_documents_labels_and_preprocessing(exported):
    _, out, _ = exported
    binary, multilabel = card(out / "binary"), card(out / "multilabel")
    assert binary["label_names"] == ["normal", "infected"]
    assert binary["output"]["positive_class"] == "infected"
    assert binary["thresholds"] == {"infected": 0.5}
    assert multilabel["output"]["label_order"] == ["covid", "normal", "pneumonia"]
    assert multilabel["output"]["label_encoding"]["covid-19"] == [1, 0, 1]
    prep = multilabel["preprocessing"]
    assert prep["size"] == 32 and prep["grayscale_to_channels"] == 3
    assert "centre crop" in prep["steps"] and "shorter side" in prep["steps"]
    assert multilabel["source"]["trial_id"] and multilabel["hyperparameters"]["lr"] > 0
    readme = (out / "multilabel" / "README.md").read_text()
    assert "Not for clinical use" in readme and "say nothing clinically" in readme


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_onnx_torchscript_and_safetensors_agree_with_pytorch(exported):
    runs, out, _ = exported
    for run_dir, folder in zip(runs, (out / "binary", out / "multilabel")):
        info = card(folder)
        record = next(t for t in read_run(run_dir).trials if t.trial_id
                      == info["source"]["trial_id"])
        model = load_model(record)
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
            got = session.run(None, {"images": normalize_numpy(images[:batch])})[0]
            assert np.allclose(got, expected[:batch], rtol=1e-3, atol=1e-4)
        scripted = torch.jit.load(str(folder / "model.torchscript.pt"))
        with torch.no_grad():
            got = scripted(torch.from_numpy(normalize_numpy(images[:3]))).numpy()
        assert np.allclose(got, expected[:3], rtol=1e-3, atol=1e-4)


def test_predict_folder_matches_training_evaluation(exported, multilabel_data, tmp_path,
                                                    capsys):
    """Part 2's flat Test/: one row per readable image, bits as the torch model gives."""
    runs, out, _ = exported
    folder = tmp_path / "Test"
    folder.mkdir()
    sources = sorted((multilabel_data / "Test").iterdir())
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]")
    (folder / "=cmd.png").write_bytes(sources[0].read_bytes())
    csv_path = tmp_path / "nested" / "preds.csv"
    summary = predict(str(out / "multilabel"), str(folder), str(csv_path))
    assert "1 unreadable" in summary and "broken.png" in capsys.readouterr().err
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["file", "covid", "normal", "pneumonia"]
    assert len(rows) - 1 == len(sources) + 1  # the copies and the "=cmd.png" one
    assert "'=cmd.png" in [r[0] for r in rows]
    model = load_model(next(t for t in read_run(runs[1]).trials
                            if t.trial_id == card(out / "multilabel")["source"]["trial_id"]))
    by_name = {r[0]: [int(b) for b in r[1:]] for r in rows[1:]}
    for source in sources:
        pixels, _ = read_gray(source, 32)
        logits = predict_logits(model, pixels[None], 1, CPU)
        assert by_name[source.name] == [int(v > 0) for v in logits[0]]


def test_predict_one_binary_image(exported, binary_data, tmp_path):
    runs, out, _ = exported
    image = sorted((binary_data / "test" / "infected").glob("*.png"))[0]
    predict(str(out / "binary"), str(image), str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv", newline="") as handle:
        header, row = list(csv.reader(handle))
    assert header == ["file", "class", "probability_infected"]
    model = load_model(next(t for t in read_run(runs[0]).trials
                            if t.trial_id == card(out / "binary")["source"]["trial_id"]))
    logits = predict_logits(model, read_gray(image, 32)[0][None], 1, CPU)[0]
    probability = 1 / (1 + np.exp(logits[0] - logits[1]))
    assert row[0] == image.name and float(row[2]) == pytest.approx(probability, abs=1e-4)
    assert row[1] == ("infected" if probability > 0.5 else "normal")


def test_predict_imports_neither_torch_nor_ray(exported, tmp_path):
    _, out, _ = exported
    image = tmp_path / "x.png"
    Image.new("L", (40, 50), 128).save(image)
    code = (f"import sys; from covid_tune.predict import predict; "
            f"predict({str(out / 'binary')!r}, {str(image)!r}, {str(tmp_path / 'o.csv')!r}); "
            f"print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_predict_normalisation_equals_training(exported):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    got = normalize(pixels, card(exported[1] / "binary"))
    assert np.allclose(got, normalize_numpy(pixels), atol=1e-6)


def test_predict_refuses_a_folder_as_csv(exported, tmp_path):
    _, out, _ = exported
    with pytest.raises(UserError, match="is a folder"):
        predict(str(out / "binary"), str(out / "binary"), str(tmp_path))


@pytest.mark.parametrize(("name", "safe"), [
    ("=1+1.png", "'=1+1.png"), ("+a.png", "'+a.png"), ("-a.png", "'-a.png"),
    ("@a.png", "'@a.png"), ("a=b.png", "a=b.png")])
def test_formula_names_are_neutralised(name, safe):
    assert safe_cell(name) == safe


def test_predict_with_model_files_missing(exported, tmp_path):
    _, out, _ = exported
    image = tmp_path / "x.png"
    Image.new("L", (40, 40), 100).save(image)
    with pytest.raises(UserError, match="model.json"):
        predict(str(tmp_path), str(image), str(tmp_path / "p.csv"))
    partial = tmp_path / "partial"
    shutil.copytree(out / "binary", partial)
    (partial / "model.onnx").unlink()
    with pytest.raises(UserError, match="model.onnx"):
        predict(str(partial), str(image), str(tmp_path / "p.csv"))


def test_leaderboard_and_export_refuse_a_folder_that_is_not_a_run(tmp_path):
    from covid_tune.leaderboard import write_leaderboard

    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="not a covid-tune run"):
        write_leaderboard([str(tmp_path)], str(tmp_path / "board"))
    with pytest.raises(UserError, match="not a covid-tune run"):
        export_best([str(tmp_path)], str(tmp_path / "model"))
