"""An exported model bundle in the MLflow model registry (``export --mlflow URI``).

Each bundle is logged as an MLflow ONNX model (``model.onnx``, which executes no code,
with ``model.json`` and the bundle's ``README.md`` as extra files) and registered as a
new version of ``covid-tune-<task>`` (or ``--registered-name``). The version is tagged
with the task, the thresholds and temperatures (JSON), the backbone, and the run and
trial it came from. When the sweep was tracked in the same MLflow, the model is logged
into the chosen trial's own run, so the version links back to the trial's curves;
otherwise into a new run named ``export-<task>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from covid_tune.bundle.format import CARD_FILE, ONNX_FILE, README_FILE, read_card
from covid_tune.errors import UserError
from covid_tune.runs.tracking import Unreachable, connect, one_line, read_tracking

DEFAULT_EXPERIMENT = "covid-tune"


def open_registry(uri: str):
    """The MLflow client for ``--mlflow URI``; UserError (exit 2) when it cannot be used,
    before anything is exported."""
    try:
        return connect(uri)
    except Unreachable as exc:
        raise UserError(f"--mlflow {uri}: {exc}; start the tracking server (or fix the URI) "
                        f"and export again") from None


def register_bundle(client, folder: Path, name: str | None = None) -> str:
    """Log the bundle in ``folder`` as an MLflow ONNX model and register it as a new
    version of ``name`` (default ``covid-tune-<task>``); a line saying which version.
    UserError if MLflow refuses (the bundle on disk stays as it is)."""
    import mlflow
    import onnx

    card = read_card(folder)
    name = name or f"covid-tune-{card['task']}"
    uri = client.tracking_uri
    run_id = source_run(client, card) or export_run(client, card)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(folder / ONNX_FILE)), name=f"model-{card['task']}",
                registered_model_name=name, save_as_external_data=False,
                extra_files=[str(folder / CARD_FILE), str(folder / README_FILE)],
                pip_requirements=["onnxruntime", "numpy"], await_registration_for=60)
        version = str(info.registered_model_version)
        for key, value in version_tags(card).items():
            client.set_model_version_tag(name, version, key, value)
    except Exception as exc:
        raise UserError(f"--mlflow {uri}: MLflow did not register {folder} "
                        f"({one_line(exc)}); the bundle is kept as it is") from None
    finally:
        mlflow.set_tracking_uri(previous)
    return f"registered {folder} as {name} version {version} (run {run_id})"


def version_tags(card: dict) -> dict[str, str]:
    """What a model version carries about its bundle, as MLflow tags (strings)."""
    source = card["source"]
    return {
        "task": card["task"],
        "backbone": card["backbone"],
        "thresholds": json.dumps(card["thresholds"]),
        "threshold_rule": str(card["threshold_rule"].get("rule")),
        "temperatures": json.dumps(card.get("temperatures", {})),
        "run": source["run_dir"],
        "run_name": source["run"],
        "trial_id": source["trial_id"],
        "epoch": str(card["epoch"]),
        "selected_by": f"{card['selected_by']['metric']} ({card['selected_by']['mode']})",
    }


def source_run(client, card: dict) -> str | None:
    """The trial's own MLflow run, when its sweep was tracked in this MLflow."""
    tracked = read_tracking(card["source"]["run_dir"])
    if tracked is None or tracked.tracking_uri != client.tracking_uri:
        return None
    found = client.search_runs(
        [tracked.experiment_id], max_results=1,
        filter_string=f"tags.mlflow.parentRunId = '{tracked.parent_run_id}' and "
                      f"tags.covid_tune.trial_id = '{card['source']['trial_id']}'")
    return found[0].info.run_id if found else None


def export_run(client, card: dict) -> str:
    """A new finished run for the export, in the experiment ``covid-tune``."""
    found = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    experiment = (found.experiment_id if found is not None
                  else client.create_experiment(DEFAULT_EXPERIMENT))
    run = client.create_run(experiment, run_name=f"export-{card['task']}", tags={
        "covid_tune.run": card["source"]["run_dir"],
        "covid_tune.trial_id": card["source"]["trial_id"], "covid_tune.task": card["task"]})
    client.set_terminated(run.info.run_id)
    return run.info.run_id
