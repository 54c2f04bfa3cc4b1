"""The command line: subcommands run, and mistakes exit 2 with one line, no traceback.

Every command runs in this process through ``covid_tune.cli.main`` (a subprocess costs
seconds of imports); one test runs the real ``python -m covid_tune`` entry point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from covid_tune.cli import main
from helpers import refused
from covid_tune.runs.record import SweepOptions, write_record

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPACE = ROOT / "search_spaces" / "demo.yaml"
COMMANDS = ("check", "synth", "sweep", "resume", "leaderboard", "export", "predict", "evaluate",
            "bench", "demo")


def no_ray(monkeypatch) -> None:
    """Fail the test if the command gets as far as starting or joining Ray."""
    import covid_tune.search.sweep

    def start_ray(address):
        raise AssertionError("Ray was started before the mistake was found")

    monkeypatch.setattr(covid_tune.search.sweep, "start_ray", start_ray)


def test_python_m_covid_tune_help_lists_every_command():
    """The entry point itself, in a real process."""
    result = subprocess.run([sys.executable, "-m", "covid_tune", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth", str(out), "--task", "multilabel", "--scale", "0.005", "--size", "40",
                 "--quiet"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert main(["check", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "multilabel task, the assignment's Part 2 layout" in text
    assert "unreadable files: 0" in text


def test_check_missing_folder(tmp_path, capsys):
    assert "no such folder" in refused(capsys, "check", str(tmp_path / "nowhere"))


def test_synth_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert "empty folder" in refused(capsys, "synth", str(tmp_path / "x"), "--task", "binary")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "check", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError" in err
    assert err.splitlines()[-1].startswith("covid-tune: error: /nonexistent/x: no such folder")


# --- sweep: refused before any work -----------------------------------------------------

def test_sweep_with_bad_space_fails_before_ray(tmp_path, capsys, binary_data, monkeypatch):
    no_ray(monkeypatch)
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({"task": "binary", "params": {
        "backbone": {"choices": ["vgg16", "alexnet"]}, "lr": {"low": 1, "high": 0.1}}}))
    assert main(["sweep", "--space", str(space), "--data", str(binary_data),
                 "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covid-tune: error: 2 problems:") and "Traceback" not in err
    assert "bad.yaml: params.backbone: unknown backbone" in err
    assert "bad.yaml: params.lr: low (1) must be less than high (0.1)" in err
    assert not (tmp_path / "runs").exists()


def test_sweep_with_uncached_imagenet_weights_says_what_to_do(tmp_path, capsys, binary_data,
                                                               monkeypatch):
    import torch

    no_ray(monkeypatch)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty cache
    message = refused(capsys, "sweep", "--space", str(DEMO_SPACE), "--data", str(binary_data),
                      "--pretrained", "imagenet", "--storage-path", str(tmp_path / "runs"))
    assert "--pretrained PATH" in message and "--pretrained none" in message
    assert str(tmp_path / "hub") in message


def test_sweep_with_wrong_layout(tmp_path, capsys, multilabel_data, monkeypatch):
    """``--space demo`` names the shipped space, from any folder."""
    no_ray(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert "multilabel layout, not binary" in refused(
        capsys, "sweep", "--space", "demo", "--data", str(multilabel_data),
        "--storage-path", str(tmp_path / "runs"))


def test_a_tracking_uri_mlflow_cannot_read_is_refused_before_anything_runs(
        tmp_path, capsys, binary_data, monkeypatch):
    no_ray(monkeypatch)
    err = refused(capsys, "sweep", "--space", "demo", "--data", str(binary_data),
                  "--storage-path", str(tmp_path / "runs"), "--mlflow", "ftp://host/x")
    assert "--mlflow ftp://host/x: ftp:// is not a tracking store MLflow reads" in err
    assert not (tmp_path / "runs").exists()
    err = refused(capsys, "resume", str(tmp_path / "runs" / "x"), "--mlflow", "http://")
    assert "--mlflow http://: no host; give http://HOST:PORT" in err


@pytest.mark.parametrize("flag, value, expected", [
    ("--num-samples", "0", "--num-samples 0: out of range; use at least 1"),
    ("--max-epochs", "-3", "--max-epochs -3: out of range; use at least 1"),
    ("--image-size", "8", "--image-size 8: out of range; use at least 32"),
    ("--cpus-per-trial", "0", "--cpus-per-trial 0.0: out of range; use more than 0"),
    ("--cpus-per-trial", "-1", "--cpus-per-trial -1.0: out of range; use more than 0"),
    ("--cpus-per-trial", "nan", "--cpus-per-trial nan: out of range"),
    ("--gpus-per-trial", "-0.5", "--gpus-per-trial -0.5: out of range; use at least 0"),
    ("--max-concurrent", "0", "--max-concurrent 0: out of range; use at least 1"),
    ("--max-failures", "-2", "--max-failures -2: out of range; use at least -1"),
    ("--keep-checkpoints", "0", "--keep-checkpoints 0: out of range; use at least 1"),
    ("--seed", "-1", "--seed -1: out of range; use at least 0"),
])
def test_out_of_range_sweep_flags(capsys, flag, value, expected):
    assert expected in refused(capsys, "sweep", "--space", "x.yaml", "--data", "d", flag, value)


def test_every_sweep_option_is_a_flag_with_the_field_default_and_docstring(capsys):
    """The flags are made from ``SweepOptions``: a new field is a new flag, its default
    and help those of the field, with no second list to keep in step."""
    from dataclasses import fields

    from covid_tune.cli import build_parser, sweep_options

    parse = build_parser().parse_args
    assert sweep_options(parse(["sweep", "--space", "s.yaml", "--data", "d"])) == \
        SweepOptions(space_file="s.yaml", data="d")
    given = {"--space": "s.yaml", "--data": "d", "--name": "r", "--storage-path": "out",
             "--num-samples": "3", "--max-epochs": "4", "--image-size": "64",
             "--pretrained": "none", "--max-concurrent": "2", "--address": "auto",
             "--cpus-per-trial": "0.5", "--gpus-per-trial": "0.25", "--seed": "7",
             "--max-failures": "-1", "--keep-checkpoints": "3",
             "--mlflow": "http://127.0.0.1:5000", "--time-budget": "2h",
             "--warm-start": "runs/a"}
    switches = ["--strict", "--shared-storage", "--verbose"]
    opts = sweep_options(parse(["sweep", *(w for kv in given.items() for w in kv), *switches]))
    assert len(given) + len(switches) == len(fields(SweepOptions))
    assert opts == SweepOptions(
        space_file="s.yaml", data="d", name="r", storage_path="out", num_samples=3,
        max_epochs=4, image_size=64, pretrained="none", max_concurrent=2, address="auto",
        cpus_per_trial=0.5, gpus_per_trial=0.25, seed=7, max_failures=-1,
        keep_checkpoints=3, strict=True, shared_storage=True, verbose=True,
        mlflow="http://127.0.0.1:5000", time_budget="2h", warm_start=["runs/a"])
    with pytest.raises(SystemExit):
        parse(["sweep", "--help"])
    assert "Checkpoints Ray keeps per running trial" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, expected", [
    (["synth", "out", "--task", "binary", "--scale", "0"], "--scale 0.0: out of range"),
    (["synth", "out", "--task", "binary", "--size", "16"], "--size 16: out of range"),
    (["synth", "out", "--task", "binary", "--contrast", "0"], "--contrast 0.0: out of range"),
    (["synth", "out", "--task", "binary", "--noise", "-1"], "--noise -1.0: out of range"),
    (["leaderboard", "run", "--external", "site2"], "--external site2: expected NAME=DIR"),
    (["leaderboard", "run", "--external", "a b=x"], "--external a b=x: expected NAME=DIR"),
    (["leaderboard", "run", "--external", "s=x", "--external", "s=y"],
     "--external s=y: the name s is given twice"),
    (["demo", "--seed", "-1"], "--seed -1: out of range; use at least 0"),
])
def test_out_of_range_flags_of_other_commands(capsys, argv, expected):
    assert expected in refused(capsys, *argv)


def test_a_flag_of_the_wrong_type_exits_2_without_traceback(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["sweep", "--space", "x", "--data", "y", "--num-samples", "many"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: covid-tune sweep")
    assert "argument --num-samples: invalid int value: 'many'" in err


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder nobody here may create files in: chmod 555, or /sys when root."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        yield locked
        locked.chmod(0o755)
    elif Path("/sys").is_dir():
        yield Path("/sys")
    else:
        pytest.skip("no folder that root may not write to")


@pytest.mark.parametrize("argv, flag", [
    (["synth", "{out}", "--task", "binary"], "out {out}: "),
    (["sweep", "--space", "x", "--data", "y", "--storage-path", "{out}"], "--storage-path {out}: "),
    (["export", "run", "--out", "{out}"], "--out {out}: "),
    (["leaderboard", "run", "--out", "{out}"], "--out {out}: "),
    (["predict", "model", "x.png", "--out", "{out}/preds.csv"], "--out {out}/preds.csv: "),
    (["evaluate", "model", "--data", "x", "--out", "{out}"], "--out {out}: "),
    (["demo", "--out", "{out}"], "--out {out}: "),
], ids=["synth", "sweep", "export", "leaderboard", "predict", "evaluate", "demo"])
def test_output_folder_that_cannot_be_written(capsys, read_only_folder, tmp_path, argv, flag):
    out = str(read_only_folder / "runs")
    message = refused(capsys, *[a.format(out=out) for a in argv])
    assert flag.format(out=out) in message
    assert f"cannot write in {read_only_folder}" in message
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    message = refused(capsys, *[a.format(out=blocked / "runs") for a in argv])
    assert f"{blocked} is a file, not a folder" in message


# --- resume: refused before Ray ---------------------------------------------------------

def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "not a covid-tune run (no sweep.json)" in refused(capsys, "resume", str(tmp_path))


@pytest.mark.parametrize("record, expected", [
    ('{"name": "r"}', "sweep.json: not a run record this version reads (format 'none'"),
    ('{"format": "covid-tune run 2", "opt', "sweep.json: damaged, not readable JSON"),
], ids=["old-format", "cut-short"])
def test_resume_of_a_damaged_sweep_record(tmp_path, capsys, record, expected):
    (tmp_path / "sweep.json").write_text(record)
    message = refused(capsys, "resume", str(tmp_path))
    assert expected in message and "start the sweep again" in message


def test_resume_of_a_run_that_never_started(tmp_path, capsys, monkeypatch):
    """The driver stopped after recording the run, before Ray Tune saved any state."""
    no_ray(monkeypatch)
    opts = SweepOptions(space_file=str(DEMO_SPACE), data=str(tmp_path / "data"), name="r",
                        storage_path=str(tmp_path / "runs"), image_size=32)
    write_record(opts, opts.space(), opts.data, {"train/normal/0.png": 10})
    message = refused(capsys, "resume", opts.run_dir())
    assert f"{opts.run_dir()}: the sweep stopped before Ray Tune saved any state" in message
    assert "start it again with `covid-tune sweep`" in message


@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGTERM, 143, "covid-tune: stopped by SIGTERM"),
    (signal.SIGINT, 130, "covid-tune: interrupted"),
])
def test_a_signal_outside_the_search_exits_with_the_shells_code(tmp_path, signum, code, said):
    """SIGTERM or Ctrl-C while a command works (here synth, writing images) ends it
    with one line and 128 + the signal's number, no traceback (the search's own
    handling is in test_cluster.py)."""
    out = tmp_path / "phantoms"
    # As a shell starts a command in the foreground: a shell script's background job
    # (CI's, say) would hand down SIGINT ignored, and Python then keeps ignoring it.
    command = subprocess.Popen([sys.executable, "-m", "covid_tune", "synth", str(out),
                                "--task", "binary", "--scale", "1", "--quiet"],
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(out.rglob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.1)
    command.send_signal(signum)
    _, err = command.communicate(timeout=60)
    assert command.returncode == code and err.strip() == said, err


def test_a_time_budget_that_is_not_a_duration_is_refused_before_anything(tmp_path, capsys,
                                                                       monkeypatch):
    no_ray(monkeypatch)
    message = refused(capsys, "sweep", "--space", str(DEMO_SPACE), "--data", str(tmp_path),
                      "--storage-path", str(tmp_path / "runs"), "--time-budget", "2x")
    assert "--time-budget 2x: not a duration; give one such as 90m, 2h or 1h30m" in message
    assert not (tmp_path / "runs").exists()


def test_growing_a_sweep_to_no_more_trials_than_it_has_is_refused(swept, tmp_path, capsys,
                                                                 monkeypatch):
    import shutil

    from covid_tune.runs.ray_state import trial_states

    no_ray(monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(swept.binary, run)
    have = len(trial_states(run))
    message = refused(capsys, "resume", str(run), "--num-samples", str(have))
    assert f"--num-samples {have}: {run} already has {have} trials; give more than {have}" \
        in message


def test_warm_start_flags_and_a_run_without_a_study(tmp_path, capsys, monkeypatch):
    from covid_tune.cli import build_parser

    args = build_parser().parse_args(["sweep", "--space", "demo", "--data", "d",
                                      "--warm-start", "runs/a", "runs/b"])
    assert args.warm_start == ["runs/a", "runs/b"]
    assert build_parser().parse_args(["sweep", "--space", "demo", "--data", "d"]).warm_start == []
    no_ray(monkeypatch)
    opts = SweepOptions(space_file=str(DEMO_SPACE), data=str(tmp_path / "data"), name="early",
                        storage_path=str(tmp_path / "runs"))
    write_record(opts, opts.space(), opts.data, {"train/normal/0.png": 10})
    message = refused(capsys, "sweep", "--space", str(DEMO_SPACE), "--data", str(tmp_path),
                      "--storage-path", str(tmp_path / "runs"), "--warm-start", opts.run_dir())
    assert f"--warm-start {opts.run_dir()}: no optuna.db (the run stopped before its first " \
           f"trial); pick a run with finished trials" in message
