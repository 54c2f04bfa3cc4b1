"""A run on object storage (``covid_tune.runs.folder.RunFolder``): a sweep writes it to an
S3 bucket, and ``leaderboard``, ``export`` and ``resume`` read it there.

The bucket is a real S3-compatible server, moto's, started on 127.0.0.1 for this module.
The run's URI carries everything pyarrow needs to reach it (credentials, endpoint,
scheme, region), so Ray's trial workers, started before this test by the session's
cluster, reach it too: Ray hands them the run's pyarrow filesystem, credentials in it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BINARY_SPACE, write_space

from covid_tune.runs.checkpoint import CHECKPOINT_FILE, RECIPE_FILE, DamagedCheckpoint
from covid_tune.runs.folder import LOCK_FILE, SWEEP_FILE, RunFolder
from covid_tune.runs.storage import join, shown

KEY = SECRET = "testing"
"""moto takes any credentials; these must never show in a message or a file."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def bucket():
    """The URI of an empty folder in a new bucket on a moto S3 server on 127.0.0.1."""
    pytest.importorskip("moto", reason="moto[server] (the dev extra) is not installed")
    import pyarrow.fs

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start on port {port}")
                time.sleep(0.1)
        endpoint = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        pyarrow.fs.S3FileSystem(access_key=KEY, secret_key=SECRET, region="us-east-1",
                                endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                allow_bucket_creation=True).create_dir("covid")
        yield f"s3://{KEY}:{SECRET}@covid/runs?{endpoint}"
    finally:
        server.terminate()
        server.wait(10)


def test_a_uri_keeps_its_query_last_and_messages_show_neither_query_nor_credentials():
    uri = "s3://k:s@bucket/runs?endpoint_override=h:1&scheme=http"
    assert join(uri, "r", SWEEP_FILE) == f"s3://k:s@bucket/runs/r/{SWEEP_FILE}?endpoint_override=h:1&scheme=http"
    assert shown(join(uri, "r")) == "s3://bucket/runs/r"
    assert shown("/data/runs/r") == "/data/runs/r"


def test_a_local_path_and_a_file_uri_are_the_same_folder(tmp_path):
    RunFolder(tmp_path).write_bytes("trial_a", "checkpoint_000001", RECIPE_FILE, data=b"{}")
    for where in (str(tmp_path), f"file://{tmp_path}"):
        run = RunFolder(where)
        assert run.is_local and run.where() == str(tmp_path)
        assert run.trial_folders() == ["trial_a"]
        assert run.checkpoint_folders("trial_a") == ["checkpoint_000001"]
        assert run.local_checkpoint("trial_a", "checkpoint_000001") == \
            tmp_path / "trial_a" / "checkpoint_000001"  # no copy on this machine


def test_a_checkpoint_on_s3_is_copied_here_checked_and_reused(bucket, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("COVID_TUNE_CACHE", str(tmp_path / "cache"))
    run = RunFolder(join(bucket, "copied"))
    weights = b"weights" * 100
    recipe = {"epoch": 1, "config": {"task": "binary", "metric": "val_loss", "mode": "min",
                                     "backbone": "resnet18"}, "metrics": {},
              "files": {CHECKPOINT_FILE: {"bytes": len(weights),
                                          "sha256": hashlib.sha256(weights).hexdigest()}}}
    run.write_bytes("trial_a", "checkpoint_000001", CHECKPOINT_FILE, data=weights)
    run.write_bytes("trial_a", "checkpoint_000001", RECIPE_FILE, data=json.dumps(recipe).encode())
    assert run.where() == "s3://covid/runs/copied" and not run.is_local
    assert run.trial_folders() == ["trial_a"] and run.exists("trial_a", "checkpoint_000001")

    local = run.local_checkpoint("trial_a", "checkpoint_000001")
    assert local.is_relative_to(tmp_path / "cache" / "checkpoints")
    assert (local / CHECKPOINT_FILE).read_bytes() == weights
    assert run.local_checkpoint("trial_a", "checkpoint_000001") == local  # cached

    run.write_bytes("trial_a", "checkpoint_000002", CHECKPOINT_FILE, data=weights[:-1])
    run.write_bytes("trial_a", "checkpoint_000002", RECIPE_FILE, data=json.dumps(recipe).encode())
    with pytest.raises(DamagedCheckpoint,
                       match=r"^s3://covid/runs/copied/trial_a/checkpoint_000002: "
                             r"checkpoint.pt is missing, cut short or altered") as caught:
        run.local_checkpoint("trial_a", "checkpoint_000002")
    assert SECRET not in str(caught.value).replace("s3://covid", "")


FAST_SPACE = {**BINARY_SPACE, "num_samples": 2, "max_epochs": 2,
              "params": {**BINARY_SPACE["params"], "backbone": "resnet18", "frozen_layers": 20},
              "start_with": [{"lr": 0.01}, {"lr": 0.03}]}
"""The shared Part 1 space cut to two short trials of the faster backbone."""


@pytest.mark.cluster
def test_a_sweep_on_s3_gives_a_leaderboard_an_export_and_a_resume_from_there(
        ray_cluster, binary_data, bucket, tmp_path, capsys):
    from covid_tune.bundle.export import export_best
    from covid_tune.results.leaderboard import write_leaderboard
    from covid_tune.runs.reader import read_run
    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import resume_sweep, run_sweep

    space = write_space(tmp_path, FAST_SPACE)
    run_sweep(SweepOptions(space_file=str(space), data=str(binary_data), name="onS3",
                           storage_path=bucket, seed=3))
    run_dir = join(bucket, "onS3")
    run = RunFolder(run_dir)
    assert run.exists(SWEEP_FILE) and not run.exists(LOCK_FILE) and len(run.trial_folders()) == 2
    assert all(run.checkpoint_folders(trial) for trial in run.trial_folders())

    info = read_run(run_dir)
    assert info.path == "s3://covid/runs/onS3" and len(info.trials) == 2
    assert all(str(t.checkpoint).startswith("s3://covid/runs/onS3/trial_") for t in info.trials)

    text = write_leaderboard([run_dir], str(tmp_path / "board"))
    assert "# Leaderboard" in text
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.parquet"} <= {
        p.name for p in (tmp_path / "board").iterdir()}
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "No Optuna study found" not in board and "cannot be read" not in board  # copied
    assert any((Path(os.environ["COVID_TUNE_CACHE"]) / "checkpoints").iterdir())  # checked copies

    [model] = export_best([run_dir], str(tmp_path / "model"))
    card = json.loads((model / "model.json").read_text())
    assert card["source"]["run_dir"] == "s3://covid/runs/onS3"
    assert (model / "model.onnx").is_file()
    assert f"{KEY}:{SECRET}@" not in (model / "README.md").read_text() + json.dumps(card)

    results = resume_sweep(run_dir)  # every trial ended: Ray restores them, runs none
    assert len(results) == 2 and len(run.trial_folders()) == 2
    assert "covid/runs/onS3" in capsys.readouterr().out
