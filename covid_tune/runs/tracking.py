"""A run's MLflow tracking: ``mlflow.json`` (where the sweep is tracked, and its parent
run, so a resumed sweep logs to the same runs) and ``connect``, the client every MLflow
writer of covid-tune opens (the sweep's ``covid_tune.search.tracking``, export's
``covid_tune.bundle.registry``).

MLflow is imported inside ``connect``: a run read without tracking never loads it.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from covid_tune.runs.folder import TRACKING_FILE, RunFolder

QUIET_CLIENT = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # covid-tune prints one line itself
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # MLflow's default, 7 with doubling waits,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # holds a call to a dead server for minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
"""MLflow client settings covid-tune starts from; a user's own environment wins."""
PROBE_SECONDS = 5.0


class Unreachable(Exception):
    """The tracking store does not answer; its message says where and why, in a line."""


@dataclass(frozen=True)
class TrackingRecord:
    """``mlflow.json``: where a sweep is tracked."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    """The sweep's own MLflow run; each trial's run is nested under it."""


def read_tracking(run_dir: str | RunFolder) -> TrackingRecord | None:
    """The run's tracking record; None when it was never tracked (or the file is not
    one this version wrote: tracking then starts a new parent run)."""
    run = RunFolder(run_dir)
    try:
        raw = json.loads(run.read_bytes(TRACKING_FILE))
        return TrackingRecord(**{k: str(raw[k]) for k in TrackingRecord.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_tracking(run_dir: str | RunFolder, record: TrackingRecord) -> None:
    RunFolder(run_dir).write_bytes(TRACKING_FILE, data=json.dumps(asdict(record), indent=1)
                                   .encode())


def connect(uri: str):
    """An ``MlflowClient`` of the store at ``uri``, once a tracking server there has
    answered (``/health``, within ``PROBE_SECONDS``); ``Unreachable`` otherwise. Sets
    ``QUIET_CLIENT`` where the environment does not."""
    for key, value in QUIET_CLIENT.items():
        os.environ.setdefault(key, value)
    if uri.startswith(("http://", "https://")):
        probe(uri)
    try:
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # an INFO line per call
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # a store that cannot be opened fails here
    except Exception as exc:  # MLflow's own errors, SQLAlchemy's, OSError: all say "no"
        raise Unreachable(f"MLflow at {uri} cannot be used ({one_line(exc)})") from None
    return client


def probe(uri: str) -> None:
    """Ask a tracking server's ``/health``; any HTTP answer counts (401/403: the client
    logs in with ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or ``_TOKEN``)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"MLflow at {uri} does not answer ({one_line(reason)})") from None


def one_line(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens the run in the MLflow UI (the URI itself for a store that
    has no UI address)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {experiment_id}, run {run_id})"
