"""The command line: subcommands run, and mistakes exit 2 with one line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def covid_tune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_tune", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("covid-tune: error: ")
    for fragment in fragments:
        assert fragment in result.stderr


def test_help_lists_every_command():
    result = covid_tune("--help")
    for command in ("check", "synth", "sweep", "resume", "leaderboard", "export", "predict",
                    "bench", "demo"):
        assert command in result.stdout


def test_synth_then_check(tmp_path):
    out = tmp_path / "data"
    result = covid_tune("synth", str(out), "--task", "multilabel", "--scale", "0.005",
                        "--size", "40", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "synthetic" in result.stdout
    result = covid_tune("check", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "multilabel layout" in result.stdout and "unreadable files: 0" in result.stdout


def test_check_missing_folder(tmp_path):
    assert_refused(covid_tune("check", str(tmp_path / "nowhere")), "no such folder")


def test_check_strict_refuses_corrupt_file(tmp_path, binary_data):
    result = covid_tune("check", str(binary_data), "--strict", "--quiet")
    assert result.returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(binary_data, copy)
    (copy / "train" / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    assert_refused(covid_tune("check", str(copy), "--strict", "--quiet"), "broken.png")


def test_synth_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert_refused(covid_tune("synth", str(tmp_path / "x"), "--task", "binary"), "empty folder")


def test_sweep_with_bad_space_fails_before_ray(tmp_path, binary_data):
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({"task": "binary", "params": {
        "backbone": {"choices": ["vgg16", "alexnet"]}, "lr": {"low": 1, "high": 0.1}}}))
    result = covid_tune("sweep", "--space", str(space), "--data", str(binary_data),
                        "--storage-path", str(tmp_path / "runs"))
    assert_refused(result, "2 problems", "bad.yaml: params.backbone: unknown backbone",
                   "bad.yaml: params.lr: low (1) must be less than high (0.1)")
    assert not (tmp_path / "runs").exists()


def test_sweep_with_uncached_imagenet_weights_says_what_to_do(tmp_path, binary_data):
    result = subprocess.run(
        [sys.executable, "-m", "covid_tune", "sweep", "--space", "search_spaces/demo.yaml",
         "--data", str(binary_data), "--pretrained", "imagenet",
         "--storage-path", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "TORCH_HOME": str(tmp_path / "torch")},
        cwd=Path(__file__).resolve().parent.parent)
    assert_refused(result, "--pretrained")


def test_sweep_with_wrong_layout(tmp_path, multilabel_data):
    result = covid_tune("sweep", "--space", "search_spaces/demo.yaml", "--data",
                        str(multilabel_data), "--storage-path", str(tmp_path / "runs"),
                        cwd=Path(__file__).resolve().parent.parent)
    assert_refused(result, "multilabel layout, not binary")


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    assert_refused(covid_tune("resume", str(tmp_path)), "not a covid-tune run")


@pytest.mark.parametrize("argv", [["--debug", "check", "/nonexistent/x"]])
def test_debug_shows_the_traceback(argv):
    result = covid_tune(*argv)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_resume_of_a_damaged_sweep_record(tmp_path):
    (tmp_path / "sweep.json").write_text('{"name": "r"}')
    assert_refused(covid_tune("resume", str(tmp_path)), "sweep.json: not a sweep record")
