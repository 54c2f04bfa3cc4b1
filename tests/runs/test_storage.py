"""Run folders on any storage: a local path and a ``file://`` URI take one code path."""

from __future__ import annotations

import pytest

from covid_tune.errors import UserError
from covid_tune.runs.storage import (exists, is_uri, join, list_dirs, list_files, move_dir,
                                read_bytes, write_bytes)


@pytest.fixture(params=["path", "uri"])
def base(request, tmp_path) -> str:
    """A storage path: a plain local folder, or the same kind of folder as a URI."""
    return str(tmp_path) if request.param == "path" else f"file://{tmp_path}"


def test_join_and_is_uri():
    assert join("s3://bucket/runs/", "r", "sweep.json") == "s3://bucket/runs/r/sweep.json"
    assert join("runs", "r") == "runs/r"
    assert is_uri("gs://b/runs") and not is_uri("/data/runs")


def test_write_read_and_list(base, tmp_path):
    write_bytes(join(base, "run", "sweep.json"), b"{}")
    write_bytes(join(base, "run", "trial_a", "result.json"), b"1")
    assert exists(join(base, "run", "sweep.json")) and not exists(join(base, "run", "nope"))
    assert read_bytes(join(base, "run", "sweep.json")) == b"{}"
    assert list_files(join(base, "run")) == ["sweep.json"]
    assert list_dirs(join(base, "run")) == ["trial_a"]
    assert list_dirs(join(base, "missing")) == [] == list_files(join(base, "missing"))
    assert (tmp_path / "run" / "trial_a" / "result.json").read_bytes() == b"1"


def test_a_rewrite_replaces_the_file_whole_and_leaves_no_partial_file(tmp_path):
    path = join(str(tmp_path), "optuna.db")
    write_bytes(path, b"old" * 1000)
    write_bytes(path, b"new")
    assert read_bytes(path) == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["optuna.db"]


def test_move_dir(base, tmp_path):
    write_bytes(join(base, "run", "trial_c", "checkpoint_000000", "recipe.json"), b"{}")
    move_dir(join(base, "run", "trial_c"), join(base, "run", "lost_trials", "trial_c"))
    assert list_dirs(join(base, "run")) == ["lost_trials"]
    assert (tmp_path / "run" / "lost_trials" / "trial_c" / "checkpoint_000000"
            / "recipe.json").read_bytes() == b"{}"


def test_an_unknown_scheme_is_a_user_error():
    with pytest.raises(UserError, match=r"nosuch://bucket/runs: cannot open this storage path"):
        exists("nosuch://bucket/runs")
