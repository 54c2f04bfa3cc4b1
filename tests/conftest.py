"""Shared fixtures: one Ray instance per test session, small generated datasets, and the
one pair of real sweeps (``swept``) that every reader of a run folder is tested on.

The Ray instance is a real two-node cluster on this machine
(``ray.cluster_utils.Cluster``, on this machine's own address; the sandbox has no
other host): a head node and one worker node, one CPU each, so
end-to-end sweeps really spread over nodes and cluster tests can add or remove nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two pytest processes (pytest-xdist, -n 2), each with its own Ray
    # cluster (``ray_cluster``, started once, by the first test that needs it): one torch
    # thread each, so neither starves the other (a trial uses one thread per CPU it
    # reserves).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """A test that uses the Ray cluster, directly or through a fixture (``swept``,
    ``exported``), is marked ``cluster``: ``make test-fast`` leaves these out.

    The tests that read the shared sweeps run last (in file order otherwise): the first
    pytest process to reach one makes the sweeps (``made_once``) while the other goes on
    with the rest, instead of waiting for them."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
    items.sort(key=lambda item: "swept" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def decode_cache(tmp_path_factory):
    """Keep the decode cache inside the test session's temp folder."""
    folder = tmp_path_factory.mktemp("decode-cache")
    os.environ["COVID_TUNE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine, shared by the whole session."""
    import ray
    from ray.cluster_utils import Cluster

    # A removed node is declared dead after 2 missed health checks 0.5 s apart (Ray's
    # default waits 5 x 3 s), so the node-loss tests do not sit out a quarter minute.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": {
            "health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
            "health_check_failure_threshold": 2}})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, with its own SQLite store and artifact
    folder, for the session (started by the first test that asks: about 7 s here); its
    URI. Its log is printed if it does not come up."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT,
        # no job runner: MLflow 3 would start about ten more processes of 230 MB each
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the MLflow server did not start:\n"
                            f"{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield uri
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def made_once(tmp_path_factory, name: str, make) -> tuple[Path, object]:
    """A folder ``make(folder)`` fills once for the whole ``make test``, however many
    pytest processes run it, and what ``make`` returned (None in a process that found
    the folder made): the first process to ask makes it under a file lock, the others
    wait and then read the same folder (pytest-xdist's recipe for session fixtures).
    What is made this way is read only, by every test."""
    import shutil

    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        return folder, make(folder)
    root = tmp_path_factory.getbasetemp().parent  # shared by the processes of one run
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if done.exists():
            return folder, None
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        made = make(folder)
        done.touch()
    return folder, made


@pytest.fixture(scope="session")
def binary_data(tmp_path_factory):
    """A tiny Part 1 dataset of phantoms (48 px), in the layout of the public Kaggle
    "Chest X-Ray Images (Pneumonia)" collection (``train/val/test``, ``normal`` and
    ``pneumonia``), so every real sweep of Part 1 reads a public layout."""
    from covid_tune.data.synth import generate

    folder, _ = made_once(tmp_path_factory, "binary", lambda folder: generate(
        folder / "chest_xray", "binary", scale=0.006, size=48, seed=1, progress=False,
        layout="kaggle-pneumonia"))
    return folder / "chest_xray"


@pytest.fixture(scope="session")
def multilabel_data(tmp_path_factory):
    """A tiny Part 2 dataset of phantoms (48 px), with the flat unlabelled Test/."""
    from covid_tune.data.synth import generate

    folder, _ = made_once(tmp_path_factory, "multilabel", lambda folder: generate(
        folder / "data", "multilabel", scale=0.01, size=48, seed=2, progress=False))
    return folder / "data"


BINARY_SPACE = {
    "task": "binary", "metric": "val_loss", "mode": "min", "max_epochs": 3,
    "image_size": 32, "pretrained": "none", "num_samples": 6,
    "augment": {"rotation": 10, "scale": [0.8, 1.0], "flip": True},
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "params": {"backbone": {"choices": ["vgg16", "resnet18"]},
               "frozen_layers": {"vgg16": {"low": 0, "high": 13},
                                 "resnet18": {"low": 0, "high": 20}},
               "lr": {"low": 1e-3, "high": 5e-2, "log": True}, "momentum": 0.9,
               "batch_size": 16, "hidden": 32, "dropout": 0.2},
    "start_with": [{"backbone": "vgg16", "frozen_layers": 13, "lr": 0.01},
                   {"backbone": "resnet18", "frozen_layers": 20, "lr": 0.01},
                   {"backbone": "resnet18", "frozen_layers": 0, "lr": 0.01}],
}
"""The shared Part 1 sweep: both backbones, three hand-grid rows, ASHA at every epoch."""

MULTILABEL_SPACE = {
    "task": "multilabel", "metric": "sel_f1", "mode": "max", "max_epochs": 2,
    "selection": {"holdout": 0.15},
    "image_size": 32, "pretrained": "none", "num_samples": 4, "augment": False,
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "params": {"backbone": "resnet18", "frozen_layers": {"low": 0, "high": 20},
               "lr": {"low": 1e-3, "high": 5e-2, "log": True}, "momentum": 0.9,
               "batch_size": 16, "hidden": 32, "dropout": 0.2,
               "loss": {"choices": ["bce", "focal"]},
               "focal_gamma": {"low": 0.5, "high": 3.0}},
    "start_with": [{"frozen_layers": 0, "loss": "bce", "lr": 0.01},
                   {"frozen_layers": 0, "loss": "focal", "focal_gamma": 2.0, "lr": 0.01}],
}
"""The shared Part 2 sweep: BCE and focal loss, two hand-grid rows, chosen on a
selection split held out of Train (as the shipped ``multilabel.yaml``)."""


@dataclass
class Swept:
    """The session's two real sweeps (Ray Tune + Optuna + ASHA on the two-node cluster)."""

    binary: Path
    multilabel: Path
    binary_results: object
    multilabel_results: object
    binary_space: Path
    """The YAML file the binary sweep was started from."""


def write_space(folder: Path, doc: dict, name: str = "space.yaml") -> Path:
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def swept(ray_cluster, binary_data, multilabel_data, tmp_path_factory) -> Swept:
    """One Part 1 and one Part 2 sweep shared by every test that reads a run folder
    (runs, leaderboard, export, TensorBoard, predict), run once for the whole ``make
    test`` (``made_once``: the other pytest process reads Ray's results back from the
    run folders). Tests must not change them: copy a run folder first
    (``shutil.copytree``) to damage it."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep

    def sweep(tmp: Path) -> dict:
        results = {}
        for task, doc, data in (("binary", BINARY_SPACE, binary_data),
                                ("multilabel", MULTILABEL_SPACE, multilabel_data)):
            space = write_space(tmp, doc, f"{task}.yaml")
            results[task] = run_sweep(SweepOptions(
                space_file=str(space), data=str(data), name=task,
                storage_path=str(tmp / "runs"), seed=3))
        return results

    tmp, results = made_once(tmp_path_factory, "swept", sweep)
    results = results or {task: ResultGrid(ExperimentAnalysis(str(tmp / "runs" / task)))
                          for task in ("binary", "multilabel")}
    return Swept(tmp / "runs" / "binary", tmp / "runs" / "multilabel", results["binary"],
                 results["multilabel"], tmp / "binary.yaml")


@pytest.fixture(scope="session")
def exported(swept, tmp_path_factory) -> Path:
    """The best model of each shared sweep, exported: ``<folder>/binary``, ``/multilabel``."""
    from covid_tune.bundle.export import export_best

    out = tmp_path_factory.mktemp("exported")
    export_best([str(swept.binary), str(swept.multilabel)], str(out))
    return out

