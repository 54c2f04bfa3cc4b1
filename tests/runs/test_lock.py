"""One driver per run folder: the lock refuses a second holder, naming the first, takes
over the lock of a driver that died, and lets exactly one of many racing drivers in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import time

import pytest

from covid_tune.errors import UserError
from covid_tune.runs.lock import Holder, hold
from covid_tune.runs.folder import LOCK_FILE


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def lock_text(pid: int, host: str | None = None) -> str:
    return json.dumps({"host": host or platform.node(), "pid": pid,
                       "started": "2026-11-01 10:00:00 UTC", "command": "covid-tune sweep"})


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    with hold(str(run_dir)):
        holder = Holder.parse((run_dir / LOCK_FILE).read_bytes())
        assert holder.pid == os.getpid() and holder.host == platform.node()
        with pytest.raises(UserError) as refused:
            with hold(str(run_dir)):
                pass
    message = str(refused.value)
    assert f"pid {os.getpid()} on {platform.node()}" in message
    assert f"covid-tune resume {run_dir}" in message
    assert not (run_dir / LOCK_FILE).exists()
    assert not run_dir.exists()  # created for the lock, nothing written: removed again


def test_a_folder_with_a_run_keeps_it_after_the_lock_ends(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with hold(str(run_dir)):
        (run_dir / "sweep.json").write_text("{}")
    assert sorted(p.name for p in run_dir.iterdir()) == ["sweep.json"]


def test_the_lock_of_a_driver_that_died_is_taken_over_with_a_notice(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = dead_pid()
    (run_dir / LOCK_FILE).write_text(lock_text(pid))
    with hold(str(run_dir)):
        assert Holder.parse((run_dir / LOCK_FILE).read_bytes()).pid == os.getpid()
    out = capsys.readouterr().out
    assert f"taking over the lock of pid {pid} on {platform.node()}" in out


def test_object_store_lock_is_a_marker_checked_then_written(tmp_path, capsys):
    """URIs have no flock: a live holder is refused, a dead one on this host is taken
    over, one on another host is refused with the way out (file:// stands in for s3://)."""
    run_dir = tmp_path / "run"
    uri = f"file://{run_dir}"
    with hold(uri):
        with pytest.raises(UserError, match=f"pid {os.getpid()} on"):
            with hold(uri):
                pass
    assert not (run_dir / LOCK_FILE).exists()
    (run_dir / LOCK_FILE).write_text(lock_text(dead_pid()))
    with hold(uri):
        pass
    assert "taking over the lock" in capsys.readouterr().out
    (run_dir / LOCK_FILE).write_text(lock_text(1, host="another-host"))
    with pytest.raises(UserError, match=f"if that driver is gone, delete {uri}/{LOCK_FILE}"):
        with hold(uri):
            pass


RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from covid_tune.errors import UserError
    from covid_tune.runs.lock import hold
    run_dir, start, racers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    said = Path(sys.argv[4])
    while time.time() < start:
        pass
    try:
        with hold(run_dir):
            (said / f"held-{os.getpid()}").touch()
            deadline = time.time() + 60  # hold on until every racer has tried
            while len(list(said.iterdir())) < racers and time.time() < deadline:
                time.sleep(0.05)
    except UserError:
        (said / f"refused-{os.getpid()}").touch()
""")


@pytest.mark.slow
def test_of_drivers_started_at_the_same_moment_exactly_one_holds_the_folder(tmp_path):
    """Six processes released at the same instant; the one that gets the folder holds it
    until every other has tried."""
    run_dir, said = tmp_path / "run", tmp_path / "said"
    said.mkdir()
    start = time.time() + 2  # most racers have imported covid_tune by then
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(run_dir), str(start), "6",
                                str(said)]) for _ in range(6)]
    assert all(r.wait(timeout=120) == 0 for r in racers)
    outcomes = sorted(p.name.split("-")[0] for p in said.iterdir())
    assert outcomes == ["held"] + ["refused"] * 5
