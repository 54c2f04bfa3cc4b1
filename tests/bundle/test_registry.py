"""Exported bundles in the MLflow model registry (``covid_tune/bundle/registry.py``,
``export --mlflow``), against a real tracking server (``mlflow_server``), read back
through MLflow's client and served by MLflow's own ONNX flavour."""

from __future__ import annotations

import json
import socket

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow import MlflowClient

from covid_tune.bundle.format import read_card
from covid_tune.bundle.registry import open_registry, register_bundle
from covid_tune.cli import main


def test_each_bundle_is_a_registered_onnx_model_version_tagged_and_served_as_exported(
        exported, mlflow_server):
    """Both tasks' bundles: a version each, tagged with the task, the thresholds and the
    run; MLflow serves the very ONNX model (same logits as ONNX Runtime on the bundle),
    with ``model.json`` and the README beside it; registering again adds a version. The
    shared sweep was not tracked: the model goes in a run of its own."""
    client = open_registry(mlflow_server)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype("float32")
    for task in ("binary", "multilabel"):
        folder, name = exported / task, f"registry-test-{task}"
        card = read_card(folder)
        line = register_bundle(client, folder, name)
        assert line.startswith(f"registered {folder} as {name} version 1 (run ")
        version = MlflowClient(mlflow_server).get_model_version(name, "1")
        assert version.tags["task"] == task
        assert json.loads(version.tags["thresholds"]) == card["thresholds"]
        assert version.tags["run"] == card["source"]["run_dir"]
        assert version.tags["trial_id"] == card["source"]["trial_id"]
        assert MlflowClient(mlflow_server).get_run(version.run_id).info.run_name == \
            f"export-{task}"

        mlflow.set_tracking_uri(mlflow_server)
        served = mlflow.pyfunc.load_model(f"models:/{name}/1").predict({"images": x})
        expected = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"images": x})[0]
        np.testing.assert_array_equal(np.asarray(served["logits"]), expected)
        files = mlflow.artifacts.download_artifacts(f"models:/{name}/1")
        shipped = {p.name for p in __import__("pathlib").Path(files).rglob("*")}
        assert {"model.onnx", "model.json", "README.md", "MLmodel"} <= shipped

    assert register_bundle(client, exported / "binary", "registry-test-binary") \
        .split(" version ")[1].startswith("2 ")


def test_a_registration_mlflow_refuses_is_one_line_and_the_bundle_stays(
        exported, mlflow_server, capsys):
    from covid_tune.errors import UserError

    before = sorted(p.name for p in (exported / "binary").iterdir())
    try:
        register_bundle(open_registry(mlflow_server), exported / "binary", "a/b")
    except UserError as exc:
        message = str(exc)
    assert f"--mlflow {mlflow_server}: MLflow did not register {exported / 'binary'} (" in message
    assert "Names cannot contain '/'" in message and "the bundle is kept as it is" in message
    assert sorted(p.name for p in (exported / "binary").iterdir()) == before


def test_export_with_a_registry_that_does_not_answer_refuses_before_exporting(
        swept, tmp_path, capsys):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = tmp_path / "model"
    assert main(["export", str(swept.binary), "--out", str(out),
                 "--mlflow", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--mlflow http://127.0.0.1:{port}: MLflow at " in err
    assert "start the tracking server (or fix the URI) and export again" in err
    assert not out.exists()
