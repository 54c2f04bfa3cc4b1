"""The run folder (``covid_tune.runs.record``): the record and its provenance, the run's own
search space, the dataset check, the best checkpoint of a trial, and damaged files,
which give one ``covid-tune: error:`` line and exit 2 or a note in the output, never a
traceback.

Record, dataset and best-checkpoint logic is tested on folders written by hand; what
``leaderboard``, ``export`` and ``resume`` make of a run is tested on copies of the
session's shared binary sweep (``swept.binary``, never changed in place).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import BINARY_SPACE, write_space
from helpers import can_mount_tmpfs, on_small_disk
from covid_tune.cli import main
from covid_tune.core.space_file import load_space, parse_space, parse_space_text
from covid_tune.data.dataset import manifest, scan
from covid_tune.errors import UserError
from covid_tune.bundle.format import read_card
from covid_tune.runs.checkpoint import CHECKPOINT_FILE, RECIPE_FILE
from covid_tune.runs.folder import (DATASET_FILE, RAY_STATE_GLOB, RESULT_FILE, SNAPSHOT_FILE,
                                    SPACE_FILE, STUDY_FILE, SWEEP_FILE)
from covid_tune.runs.record import SweepOptions, manifest_fingerprint, read_manifest, read_record, read_space, write_record
from covid_tune.runs.reader import TrialRecord, best_recipe, best_trial, choose_data, read_run, read_trial

FILES = {"train/normal/a.png": 1000, "train/infected/b.png": 1200,
         "validation/normal/c.png": 700, "validation/infected/d.png": 900}


def one_line_error(capsys, rc: int) -> str:
    """Exit 2 and one ``covid-tune: error:`` line on stderr, no traceback; the line."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("covid-tune: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run folder to damage or read elsewhere. The large ``checkpoint.pt``
    files are hard links: the commands only read them and ``damage`` replaces a file
    instead of writing into it. The rest are copies (SQLite may write to optuna.db)."""
    def link_or_copy(src: str, dst: str) -> None:
        if Path(src).name == CHECKPOINT_FILE:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


def notes_of(markdown: str) -> list[str]:
    """The bullet lines under the leaderboard's ``### Notes`` headings."""
    notes, inside = [], False
    for line in markdown.splitlines():
        if line.startswith("#"):
            inside = line == "### Notes"
        elif inside and line.startswith("- "):
            notes.append(line[2:])
    return notes


def table_rows(csv_file: Path) -> list[dict]:
    with open(csv_file, newline="") as handle:
        return list(csv.DictReader(handle))


# --- the record: sweep.json, space.yaml, dataset.json ---------------------------------

def test_record_round_trip_and_provenance(tmp_path, monkeypatch):
    space_file = write_space(tmp_path, BINARY_SPACE, "original.yaml")
    space = load_space(space_file)
    data = tmp_path / "data"
    opts = SweepOptions(space_file=str(space_file), data=str(data), name="r",
                        storage_path=str(tmp_path / "runs"), num_samples=4, seed=7)
    argv = ["covid-tune", "sweep", "--space", str(space_file), "--data", str(data)]
    monkeypatch.setattr(sys, "argv", argv)
    written = write_record(opts, space, str(data), FILES)

    record = read_record(opts.run_dir())
    assert record == written and record.options == opts
    provenance = record.provenance
    assert provenance.data == str(data) and Path(provenance.data).is_absolute()
    assert provenance.data_fingerprint == manifest_fingerprint(FILES)
    assert provenance.data_files == len(FILES)
    assert provenance.command == argv
    for package in ("covid-tune", "torch", "ray", "optuna"):
        assert provenance.versions[package] not in ("", "not installed"), package
    own = read_space(opts.run_dir(), record)
    assert own.source == str(Path(opts.run_dir()) / SPACE_FILE)
    assert replace(own, source=space.source) == space
    assert read_manifest(opts.run_dir()) == FILES


def test_fingerprint_is_of_relative_paths_and_sizes():
    """A moved copy matches (no absolute path, any order); a resized file does not."""
    reordered = dict(reversed(list(FILES.items())))
    assert manifest_fingerprint(reordered) == manifest_fingerprint(FILES)
    assert manifest_fingerprint({**FILES, "train/normal/a.png": 1001}) != \
        manifest_fingerprint(FILES)
    assert manifest_fingerprint({"x/" + k: v for k, v in FILES.items()}) != \
        manifest_fingerprint(FILES)


def test_a_space_yaml_cut_at_a_line_end_is_refused(tmp_path):
    """Cut after a whole ``start_with`` row, the YAML still parses, to another space: a
    leaderboard would silently lose a hand-grid row. sweep.json's digest catches it."""
    opts = SweepOptions(space_file="s.yaml", data=str(tmp_path), name="r",
                        storage_path=str(tmp_path / "runs"))
    space = parse_space(BINARY_SPACE, "s.yaml")
    record = write_record(opts, space, str(tmp_path), FILES)
    path = Path(opts.run_dir()) / SPACE_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]))  # the last start_with row is 3 lines
    assert len(parse_space_text(path.read_text(), "cut.yaml").start_with) == 2
    with pytest.raises(UserError, match="cut short or altered"):
        read_space(opts.run_dir(), record)


def test_the_shared_sweep_records_where_it_came_from(swept, binary_data):
    record = read_record(str(swept.binary))
    assert record.provenance.data == str(binary_data.resolve())
    assert record.options.data == str(binary_data.resolve())
    assert record.options.space_file == str(swept.binary_space.resolve())
    files = manifest(scan(binary_data, "binary"))
    assert record.provenance.data_fingerprint == manifest_fingerprint(files)
    assert read_manifest(str(swept.binary)) == files
    assert (swept.binary / SPACE_FILE).is_file()


def test_hand_grid_comes_from_the_runs_own_space(swept, tmp_path):
    """The YAML file the sweep started from may change or go: the run keeps its own."""
    run = copy_run(swept.binary, tmp_path / "run")
    record = json.loads((run / SWEEP_FILE).read_text())
    record["options"]["space_file"] = str(tmp_path / "gone.yaml")
    (run / SWEEP_FILE).write_text(json.dumps(record))

    info = read_run(run)
    assert info.space.source == str(run / SPACE_FILE)
    assert list(info.space.start_with) == BINARY_SPACE["start_with"]
    hand = [t for t in info.trials if t.hand_grid]
    assert 0 < len(hand) < len(info.trials)
    keys = ("backbone", "frozen_layers", "lr")
    assert sorted(tuple(t.config[k] for k in keys) for t in hand) == \
        sorted(tuple(row[k] for k in keys) for row in BINARY_SPACE["start_with"])


# --- which dataset a run is scored on -------------------------------------------------

@pytest.fixture(scope="module")
def changed_data(binary_data, tmp_path_factory) -> Path:
    """A copy of the binary dataset with one file removed, one added, one resized."""
    root = tmp_path_factory.mktemp("changed") / "data"
    shutil.copytree(binary_data, root)
    images = sorted((root / "train").rglob("*.png"))
    images[0].unlink()
    shutil.copy(images[1], images[1].with_name("added.png"))
    Image.new("L", (48, 48), 77).save(images[2])  # a plain image: far fewer bytes
    return root


CHANGE = "1 file(s) added, 1 removed, 1 changed"


def test_a_moved_copy_of_the_dataset_matches(swept, binary_data, tmp_path):
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(binary_data, moved)
    choice = choose_data(str(swept.binary), read_record(str(swept.binary)), "binary",
                         str(moved))
    assert choice.root == moved.resolve() and choice.notes == ()
    recorded = choose_data(str(swept.binary), read_record(str(swept.binary)), "binary")
    assert recorded.root == binary_data.resolve() and recorded.notes == ()


def test_a_changed_dataset_is_refused_or_noted(swept, changed_data):
    record = read_record(str(swept.binary))
    with pytest.raises(UserError) as caught:
        choose_data(str(swept.binary), record, "binary", str(changed_data))
    message = str(caught.value)
    assert CHANGE in message and "--allow-changed-data" in message and "\n" not in message
    choice = choose_data(str(swept.binary), record, "binary", str(changed_data),
                         allow_changed=True)
    assert choice.root == changed_data.resolve()
    assert len(choice.notes) == 1 and CHANGE in choice.notes[0]
    assert "--allow-changed-data" in choice.notes[0]


def test_a_dataset_that_is_gone(swept, tmp_path):
    record = read_record(str(swept.binary))
    gone = replace(record, provenance=replace(record.provenance, data=str(tmp_path / "gone")))
    choice = choose_data(str(swept.binary), gone, "binary")
    assert choice.root is None and "was not found" in choice.notes[0]
    with pytest.raises(UserError, match="not there any more; pass --data DIR"):
        choose_data(str(swept.binary), gone, "binary", required=True)
    with pytest.raises(UserError, match="--data .*: no such folder"):
        choose_data(str(swept.binary), record, "binary", str(tmp_path / "gone"))


def test_the_cli_refuses_a_changed_dataset_in_one_line(swept, changed_data, tmp_path,
                                                        capsys):
    rc = main(["leaderboard", str(swept.binary), "--data", str(changed_data),
               "--out", str(tmp_path / "board")])
    assert CHANGE in one_line_error(capsys, rc)


def test_the_leaderboard_notes_a_changed_dataset(swept, changed_data, tmp_path,
                                                 monkeypatch):
    from covid_tune.results.leaderboard import write_leaderboard

    stand_in_arithmetic(monkeypatch)
    text = write_leaderboard([str(swept.binary)], str(tmp_path / "board"),
                             data=[str(changed_data)], allow_changed_data=True)
    assert any(CHANGE in note and "--allow-changed-data" in note for note in notes_of(text))


# --- best checkpoints, on trial folders written by hand -------------------------------

SPACE = parse_space(BINARY_SPACE, "space.yaml")  # val_loss, min
F1_SPACE = replace(SPACE, metric="val_f1", mode="max")
CONFIG = {"task": "binary", "backbone": "resnet18", "frozen_layers": 20, "lr": 0.01,
          "loss": "ce", "metric": "val_loss", "mode": "min", "image_size": 32}


def checkpoint(trial: Path, index: int, epoch: int, config: dict | None = None,
               **metrics: float) -> Path:
    folder = trial / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    (folder / RECIPE_FILE).write_text(json.dumps(
        {"epoch": epoch, "config": config or CONFIG, "label_names": ["normal", "infected"],
         "metrics": metrics}))
    return folder


def results(trial: Path, *seconds: float) -> None:
    (trial / RESULT_FILE).write_text("\n".join(json.dumps(
        {"epoch": e, "time_total_s": s}) for e, s in enumerate(seconds, 1)) + "\n")


def test_the_best_epoch_by_the_runs_metric_and_mode_not_the_last(tmp_path):
    trial = tmp_path / "trial_abc"
    for index, (loss, f1) in enumerate([(0.6, 0.7), (0.3, 0.5), (0.45, 0.6)]):
        checkpoint(trial, index, index + 1, val_loss=loss, val_f1=f1)
    results(trial, 10.0, 20.0, 30.0)
    by_loss, why = read_trial(trial, "run", SPACE)
    assert why == "" and (by_loss.epoch, by_loss.seconds, by_loss.trial_id) == (2, 20.0, "abc")
    assert by_loss.checkpoint == trial / "checkpoint_000001"
    by_f1, _ = read_trial(trial, "run", F1_SPACE)
    assert (by_f1.epoch, by_f1.seconds) == (1, 10.0)


@pytest.mark.parametrize(("recorded", "probabilities", "log_odds"), [
    ({"thresholds": {"infected": 0.0}, "threshold_logits": {"infected": -259.5}},
     {"infected": 0.0}, {"infected": -259.5}),
    ({"thresholds": {"infected": 0.5}}, {"infected": 0.5}, {"infected": 0.0}),
    ({"thresholds": {"infected": 0.2}, "threshold_logits": {"covid": 1.0}},
     {"infected": 0.2}, {"infected": pytest.approx(math.log(0.25))}),
    ({"thresholds": {"infected": 1.5}, "threshold_logits": {"infected": 1.0}}, {}, {}),
    ({}, {}, {}),
], ids=["both", "probabilities-only", "logits-of-other-labels", "damaged", "untuned"])
def test_a_checkpoints_thresholds_are_read_in_both_scales(tmp_path, recorded, probabilities,
                                                          log_odds):
    """The exact log-odds a recipe records; a recipe from before them (or whose log-odds
    name other labels) gets the log-odds of its probabilities; damaged ones are not used."""
    folder = checkpoint(tmp_path / "trial_abc", 0, 1, val_loss=0.5)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    (folder / RECIPE_FILE).write_text(json.dumps({**recipe, **recorded}))
    record, _ = read_trial(tmp_path / "trial_abc", "run", SPACE)
    assert record.thresholds == probabilities and record.threshold_logits == log_odds


def test_nan_and_missing_metrics_rank_last_in_either_mode(tmp_path):
    folders = [tmp_path / f"c{i}" for i in range(4)]
    recipes = [({"epoch": 1, "metrics": {"val_loss": math.nan}}, folders[0]),
               ({"epoch": 2, "metrics": {}}, folders[1]),
               ({"epoch": 3, "metrics": {"val_loss": 0.9}}, folders[2]),
               ({"epoch": 4, "metrics": {"val_loss": "n/a"}}, folders[3])]
    for mode in ("min", "max"):
        assert best_recipe(recipes, "val_loss", mode)[1] == folders[2]
    tie = [({"epoch": 3, "metrics": {"val_loss": 0.5}}, folders[0]),
           ({"epoch": 1, "metrics": {"val_loss": 0.5}}, folders[1])]
    assert best_recipe(tie, "val_loss", "min")[1] == folders[1]


def test_best_trial_ranks_nan_last_and_ties_to_fewer_epochs():
    def trial(trial_id: str, epoch: int, value: float) -> TrialRecord:
        return TrialRecord("run", trial_id, CONFIG, Path(trial_id), epoch,
                           {"val_loss": value}, None)

    trials = [trial("a", 3, 0.5), trial("b", 1, 0.5), trial("c", 1, math.nan),
              trial("d", 2, 0.2)]
    assert best_trial(trials, "val_loss", "min").trial_id == "d"
    assert best_trial(trials, "val_loss", "max").trial_id == "b"
    assert best_trial([trials[2], trials[0]], "val_loss", "max").trial_id == "a"


def test_damaged_recipes_are_passed_over_and_noted(tmp_path):
    opts = SweepOptions(space_file="s.yaml", data=str(tmp_path), name="r",
                        storage_path=str(tmp_path))
    write_record(opts, SPACE, str(tmp_path), FILES)
    run = Path(opts.run_dir())
    good = checkpoint(run / "trial_good", 0, 1, val_loss=0.5)
    results(run / "trial_good", 4.0)
    mixed = run / "trial_mixed"
    checkpoint(mixed, 0, 1, val_loss=0.7)
    (checkpoint(mixed, 1, 2, val_loss=0.1) / RECIPE_FILE).write_text('{"epoch": 2, "con')
    bad = run / "trial_bad"
    (checkpoint(bad, 0, 1, val_loss=0.2) / RECIPE_FILE).write_text(
        json.dumps({"epoch": 1, "config": {"task": "binary"}, "metrics": {}}))
    (bad / "checkpoint_000001").mkdir()  # its recipe.json never written
    (run / "trial_empty").mkdir()

    record, why = read_trial(bad, "r", SPACE)
    assert record is None and why == "2 checkpoint(s), none with a readable recipe.json"
    record, why = read_trial(mixed, "r", SPACE)
    assert record.epoch == 1 and why == "1 checkpoint(s) without a readable recipe.json passed over"

    info = read_run(run)
    assert [t.trial_id for t in info.trials] == ["good", "mixed"]
    assert info.trials[0].checkpoint == good and info.trials[0].seconds == 4.0
    assert info.notes == [
        "trial_bad: 2 checkpoint(s), none with a readable recipe.json; left out",
        "trial_empty: no checkpoint (the trial failed before its first epoch ended); left out",
        "trial_mixed: 1 checkpoint(s) without a readable recipe.json passed over",
        "Ray Tune's snapshot of the run (experiment_state-*.json) is missing or cannot be "
        "read, so failed trials are not counted"]  # a hand-made run has none
    for folder in ("trial_good", "trial_mixed"):
        shutil.rmtree(run / folder)
    with pytest.raises(UserError, match="no trial of this run has a usable checkpoint"):
        read_run(run)


def test_hand_grid_rows_are_matched_on_the_keys_they_give(tmp_path):
    opts = SweepOptions(space_file="s.yaml", data=str(tmp_path), name="r",
                        storage_path=str(tmp_path))
    write_record(opts, SPACE, str(tmp_path), FILES)
    run = Path(opts.run_dir())
    checkpoint(run / "trial_row", 0, 1, val_loss=0.5)  # resnet18, 20 frozen, lr 0.01
    checkpoint(run / "trial_searched", 0, 1, {**CONFIG, "lr": 0.0100001}, val_loss=0.5)
    info = read_run(run)
    assert {t.trial_id: t.hand_grid for t in info.trials} == {"row": True, "searched": False}


# --- damaged run files: one line and exit 2, or a note; never a traceback -------------

def stand_in_arithmetic(monkeypatch) -> None:
    """Keep the arithmetic that reads no run file out of the damage tests, so each
    example takes a second or two: the forward passes (zero logits), the plots, and the
    ONNX and torch.export captures. Every checkpoint a command loads is still read and
    checked by ``runs.load_checkpoint``; the real paths are tested in
    test_leaderboard.py and test_export.py."""
    import torch

    import covid_tune.bundle.export
    import covid_tune.nn.logits
    import covid_tune.nn.weights
    import covid_tune.results.leaderboard
    from covid_tune.runs.checkpoint import load_checkpoint
    from covid_tune.core.tasks import TASKS

    def load_model(folder):
        _, recipe = load_checkpoint(folder)
        return torch.nn.Linear(1, TASKS[recipe["config"]["task"]].outputs)

    def predict_logits(model, images, batch_size, device):
        return np.zeros((len(images), model.out_features), np.float32)

    monkeypatch.setattr(covid_tune.nn.weights, "load_model", load_model)
    monkeypatch.setattr(covid_tune.nn.logits, "predict_logits", predict_logits)
    monkeypatch.setattr(covid_tune.bundle.export, "load_model", load_model)
    for name in ("write_chart", "write_confusion", "write_cams"):
        monkeypatch.setattr(covid_tune.results.leaderboard, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(covid_tune.bundle.export, "write_program",
                        lambda *args, **kwargs: (None, {"program_max_abs_diff": 0.0}))
    monkeypatch.setattr(covid_tune.bundle.export, "write_onnx", lambda *args, **kwargs: {
        "onnx_max_abs_diff": 0.0, "onnx_opset": 18})
    monkeypatch.setattr(covid_tune.bundle.export, "cam_spec", lambda model: {
        "output": "features", "pool": [1, 1], "head": ["net.fc.0", "net.fc.3"]})


DAMAGEABLE = {
    "sweep.json": SWEEP_FILE, "space.yaml": SPACE_FILE, "dataset.json": DATASET_FILE,
    "recipe.json": f"trial_*/checkpoint_*/{RECIPE_FILE}",
    "checkpoint.pt": f"trial_*/checkpoint_*/{CHECKPOINT_FILE}",
    "result.json": f"trial_*/{RESULT_FILE}", "experiment state": RAY_STATE_GLOB,
    "optuna.db": STUDY_FILE,
}
"""The run files a damage test picks from: what covid-tune writes and reads, and Ray's
snapshot, which only ``resume`` reads."""


def damage(path: Path, how: str, cut: float = 0.5, noise: bytes = b"\x00garbage") -> None:
    """Cut ``path`` short (at ``cut`` of its length), overwrite it with ``noise``, or
    delete it. The file is replaced, never written into: it may be a hard link."""
    data = path.read_bytes()
    path.unlink()
    if how == "truncate":
        path.write_bytes(data[:int(cut * len(data))])
    elif how == "overwrite":
        path.write_bytes(noise)


class Fuzz:
    """Where the damage tests work: one run copy and output folders at fixed paths, so
    the output of a damaged copy compares with that of the whole one."""

    def __init__(self, folder: Path, source: Path):
        self.folder, self.source = folder, source
        self.run, self.board, self.model = folder / "run", folder / "board", folder / "model"
        self.markdown, self.rows, self.card = "", [], {}
        """The whole run's leaderboard.md, leaderboard.csv rows and model.json."""

    def fresh(self) -> None:
        """A new copy of the run; no output yet."""
        for path in (self.run, self.board, self.model):
            shutil.rmtree(path, ignore_errors=True)
        copy_run(self.source, self.run)

    def pick(self, kind: str, index: int) -> Path:
        """The file of ``kind`` (one of ``DAMAGEABLE``) that ``index`` picks."""
        candidates = sorted(self.run.glob(DAMAGEABLE[kind]))
        assert candidates, kind
        return candidates[index % len(candidates)]


@pytest.fixture(scope="module")
def fuzz(swept, tmp_path_factory):
    """The fuzz area, and the leaderboard and exported card of the whole run there."""
    area = Fuzz(tmp_path_factory.mktemp("fuzz"), swept.binary)
    area.fresh()
    with pytest.MonkeyPatch.context() as patch:
        stand_in_arithmetic(patch)
        assert main(["leaderboard", str(area.run), "--out", str(area.board)]) == 0
        assert main(["export", str(area.run), "--out", str(area.model)]) == 0
    area.markdown = (area.board / "leaderboard.md").read_text()
    area.rows = table_rows(area.board / "leaderboard.csv")
    area.card = read_card(area.model / "binary")
    # a clean run's only notes are the tiny test split's: too few images for intervals
    assert all("no intervals" in note for note in notes_of(area.markdown))
    assert "cannot be read" not in area.markdown
    return area


DAMAGES = {"kind": st.sampled_from(sorted(DAMAGEABLE)), "index": st.integers(0, 99),
           "how": st.sampled_from(["truncate", "overwrite", "delete"]),
           "cut": st.floats(0, 1, exclude_max=True),
           "noise": st.binary(min_size=1, max_size=512)}
"""A file to damage (its kind, then which one), how, where to cut, what to write."""
NO_REFUSAL_OF = {"dataset.json", "experiment state"}
"""Files the leaderboard and export do not read when the dataset matches its record."""


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def run_damaged(fuzz, monkeypatch, capsys, how: tuple, argv: list[str]) -> Path | None:
    """Damage one file of a fresh copy of the run (``how``: kind, index, how, cut,
    noise) and run the command: the damaged file if it went on (exit 0, nothing on
    stderr), ``None`` if it refused in one line, as it must for sweep.json/space.yaml."""
    kind, index, how_, cut, noise = how
    stand_in_arithmetic(monkeypatch)
    fuzz.fresh()
    target = fuzz.pick(kind, index)
    damage(target, how_, cut, noise)
    capsys.readouterr()
    rc = main(argv)
    if kind in ("sweep.json", "space.yaml"):
        assert DAMAGEABLE[kind] in one_line_error(capsys, rc)
        return None
    if rc == 2:
        assert kind not in NO_REFUSAL_OF
        one_line_error(capsys, rc)
        return None
    assert rc == 0 and capsys.readouterr().err == ""
    return target


@fuzz_settings(20)
@given(**DAMAGES)
def test_a_damaged_run_gives_a_leaderboard_that_says_so_or_one_line(
        fuzz, monkeypatch, capsys, kind, index, how, cut, noise):
    """A damaged sweep.json or space.yaml is refused; any other damaged file leaves the
    leaderboard as it was, or stops it in one line, or changes it and says why."""
    target = run_damaged(fuzz, monkeypatch, capsys, (kind, index, how, cut, noise),
                         ["leaderboard", str(fuzz.run), "--out", str(fuzz.board)])
    if target is None:
        return
    markdown = (fuzz.board / "leaderboard.md").read_text()
    if markdown == fuzz.markdown:
        return  # the damage is in a part nothing read, or in a file nothing reads
    rows = table_rows(fuzz.board / "leaderboard.csv")
    trial = target.relative_to(fuzz.run).parts[0]  # trial_<id>, for the files of a trial
    if kind == "recipe.json":
        assert any(note.startswith(f"`binary`: {trial}: ") and
                   ("left out" in note or "passed over" in note)
                   for note in notes_of(markdown)), markdown
    elif kind == "experiment state":  # read only to count the failed trials
        assert "so failed trials are not counted" in markdown
        assert rows == fuzz.rows
    elif kind == "optuna.db":
        assert ("The Optuna study optuna.db cannot be read" in markdown
                or "No Optuna study found (optuna.db is missing)" in markdown)
        assert rows == fuzz.rows
    elif kind == "result.json":  # the trial's training time is unknown, never wrong
        assert len(rows) == len(fuzz.rows)
        for row, whole in zip(rows, fuzz.rows):
            changed = {k for k in row if row[k] != whole[k]}
            assert changed <= {"Training Time", "training_seconds"}
            assert not changed or (row["trial_id"] == trial.removeprefix("trial_")
                                   and row["Training Time"] == "?")
    else:
        pytest.fail(f"a damaged {kind} changed the leaderboard without a note:\n{markdown}")


@fuzz_settings(20)
@given(**DAMAGES)
def test_a_damaged_run_exports_an_intact_checkpoint_or_one_line(
        fuzz, monkeypatch, capsys, kind, index, how, cut, noise):
    """Export stops in one line, or exports the checkpoint the whole run would, or, when
    that checkpoint's recipe is the damaged file, another one."""
    target = run_damaged(fuzz, monkeypatch, capsys, (kind, index, how, cut, noise),
                         ["export", str(fuzz.run), "--out", str(fuzz.model)])
    if target is None:
        return
    card = read_card(fuzz.model / "binary")
    if card != fuzz.card:  # only a damaged recipe may make another checkpoint the best
        assert kind == "recipe.json"
        assert card["source"]["checkpoint"] != str(target.parent)
        assert fuzz.card["source"]["checkpoint"] == str(target.parent)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test, rather than start Ray work, if ``resume`` gets that far."""
    import covid_tune.search.sweep

    def start_ray(address):
        raise AssertionError("resume got as far as starting Ray")

    monkeypatch.setattr(covid_tune.search.sweep, "start_ray", start_ray)


@pytest.mark.parametrize("how", ["truncate", "overwrite", "delete"])
@pytest.mark.parametrize("kind", ["sweep.json", "space.yaml", "dataset.json",
                                  "experiment state"])
def test_resume_refuses_a_damaged_run_before_ray_starts(swept, changed_data, tmp_path,
                                                        no_ray, capsys, kind, how):
    """``dataset.json`` is only read when the dataset differs from the record (here
    ``--data`` a changed copy): its file counts make the message."""
    run = copy_run(swept.binary, tmp_path / "run")
    damage(next(run.glob(DAMAGEABLE[kind])), how)
    if kind == "experiment state":  # with its whole copy it would go on (test_ray_state)
        (run / SNAPSHOT_FILE).unlink()
    extra = ["--data", str(changed_data)] if kind == "dataset.json" else []
    message = one_line_error(capsys, main(["resume", str(run), *extra]))
    assert (DAMAGEABLE[kind] if kind != "experiment state" else "Ray Tune") in message


def test_a_space_yaml_cut_at_a_line_end_stops_every_reader(swept, tmp_path, no_ray,
                                                           capsys):
    run = copy_run(swept.binary, tmp_path / "run")
    lines = (run / SPACE_FILE).read_text().splitlines(keepends=True)
    (run / SPACE_FILE).write_text("".join(lines[:-3]))
    for argv in (["leaderboard", str(run), "--out", str(tmp_path / "board")],
                 ["export", str(run), "--out", str(tmp_path / "model")],
                 ["resume", str(run)]):
        assert "space.yaml: cut short or altered" in one_line_error(capsys, main(argv))


# --- import weight --------------------------------------------------------------------

def test_reading_a_run_imports_neither_torch_nor_ray_nor_optuna():
    code = ("import sys, covid_tune.runs.record; "
            "print(sorted(m for m in ('torch', 'ray', 'optuna') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# --- a full disk on the driver's side ---------------------------------------------------

RECORD_ON_FULL_DISK = '''
from covid_tune.cli import main
results = []
for free in range(12):  # each page more lets the record get one file further
    fill_disk(free)
    rc = main(["sweep", "--space", SPACE, "--data", DATA, "--storage-path", DISK + "/runs",
               "--name", "full", "--address", ADDRESS, "--shared-storage"])
    free_disk()
    left = sorted(str(p) for p in __import__("pathlib").Path(DISK, "runs").rglob("*"))
    results.append({"free": free, "rc": rc, "left": left})
    if rc != 2 or results[-1]["left"]:
        break
    if "sweep.json" in open(LOG).read():
        break
print(json.dumps(results))
'''


@pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a tmpfs here (unshare -Urm)")
def test_a_full_disk_while_recording_the_run_leaves_nothing_behind(ray_cluster, binary_data,
                                                                   tmp_path):
    """The run folder on a real full tmpfs, the disk filled a page further each time:
    the lock, then space.yaml, dataset.json and sweep.json meet ENOSPC in turn. Each
    time: exit 2, one line naming the file, and no file, part or lock left behind."""
    space = tmp_path / "space.yaml"
    space.write_text("task: binary\npretrained: none\nimage_size: 32\nnum_samples: 1\n"
                     "max_epochs: 1\nasha: {grace_period: 1}\nparams: {backbone: resnet18}\n")
    log = tmp_path / "errors.log"
    code = (f"SPACE, DATA, ADDRESS, LOG = {str(space)!r}, {str(binary_data)!r}, "
            f"{ray_cluster.address!r}, {str(log)!r}\n"
            f"sys.stderr = open(LOG, 'a', buffering=1)\n" + RECORD_ON_FULL_DISK)
    results, _ = on_small_disk(code, tmp_path / "disk", size_kib=256)
    assert all(r["rc"] == 2 and r["left"] == [] for r in results), results
    errors = [line for line in log.read_text().splitlines() if line.startswith("covid-tune:")]
    assert len(errors) == len(results) and all("No space left on device" in e for e in errors)
    failed_at = [e.split(": ")[2].rsplit("/", 1)[1] for e in errors]
    assert failed_at[0] == "sweep.lock" and failed_at[-1] == "sweep.json"
    assert {"space.yaml", "dataset.json"} <= set(failed_at)
    assert "nothing of the run was kept" in errors[-1]


def test_failed_trials_are_counted_from_rays_snapshot(tmp_path):
    """Ray Tune's snapshot lists every trial with its status: a trial that failed before
    any checkpoint has no row, but it is counted."""
    from covid_tune.runs.ray_state import trial_states

    entries = [[json.dumps({"trial_id": i, "status": status}), "{}"]
               for i, status in (("a", "TERMINATED"), ("b", "ERROR"), ("c", "TERMINATED"))]
    (tmp_path / "experiment_state-2026-11-22_07-00-00.json").write_text(
        json.dumps({"trial_data": entries, "runner_data": {}}))
    states = trial_states(str(tmp_path))
    assert states == {"a": "TERMINATED", "b": "ERROR", "c": "TERMINATED"}
    from covid_tune.runs.reader import RunInfo

    info = RunInfo(tmp_path, "r", None, None, [], states=states)
    assert info.summary() == "3 trials, 1 failed"


def test_a_collection_the_sweep_split_is_split_the_same_way_by_every_reader(tmp_path):
    """A collection without split folders: the run records each image's split, and the
    readers (leaderboard, export, resume all go through ``choose_data``) use the
    record, not a new draw."""
    from covid_tune.data.dataset import assignment, manifest, scan
    from covid_tune.runs.reader import choose_data
    from covid_tune.runs.record import read_splits, write_record
    from covid_tune.data.synth import generate

    root = tmp_path / "COVID-19_Radiography_Dataset"
    generate(root, "multilabel", scale=0.005, size=32, progress=False, layout="covid-radiography")
    layout = scan(root)
    split = assignment(layout)
    moved = next(name for name, s in split.items() if s == "validation")
    recorded = {**split, moved: "train"}  # as if the run had drawn otherwise
    opts = SweepOptions(space_file="multilabel", data=str(root), name="r",
                        storage_path=str(tmp_path / "runs"))
    record = write_record(opts, opts.space(), str(root), manifest(layout), splits=recorded)
    assert read_splits(opts.run_dir()) == recorded
    choice = choose_data(opts.run_dir(), record, "multilabel")
    assert assignment(choice.layout) == recorded


def test_the_run_records_how_its_drawn_splits_grouped_patients(tmp_path):
    """``dataset.json`` keeps the grouping of the drawn splits (which rule gave the
    patient keys, how many groups, how many near-duplicate merges); the leaderboard's
    notes say it in one line; a run that drew nothing says nothing of it."""
    from helpers import save
    from covid_tune.data.dataset import assignment
    from covid_tune.runs.record import read_grouping

    lines = ["path,labels,patient"]
    for i in range(24):
        save(tmp_path / "d" / f"{i}.png", size=(24, 24), value=i)
        lines.append(f"{i}.png,{('normal', 'infected')[i % 2]},p{i // 4}")
    (tmp_path / "d" / "list.csv").write_text("\n".join(lines) + "\n")
    layout = scan(tmp_path / "d" / "list.csv", "binary")
    opts = SweepOptions(space_file="s.yaml", data=str(tmp_path / "d"), name="r",
                        storage_path=str(tmp_path / "runs"))
    write_record(opts, SPACE, opts.data, manifest(layout), splits=assignment(layout),
                 grouping=layout.grouping.record())
    recorded = read_grouping(opts.run_dir())
    assert recorded["keyed"] == {"manifest": 24} and recorded["groups"] == 6
    assert recorded["near_merges"] == 0 and recorded["near_bits"] == 12
    checkpoint(Path(opts.run_dir()) / "trial_a", 0, 1, val_loss=0.5)
    notes = read_run(opts.run_dir()).notes
    assert ("Patients: 24 images in 6 patient groups (keys: the manifest's patient column 24; "
            "0 near-duplicate merge(s)); a split drawn from them keeps each group on one "
            "side.") in notes
    opts = replace(opts, name="plain")
    write_record(opts, SPACE, opts.data, FILES)
    assert read_grouping(opts.run_dir()) == {}
