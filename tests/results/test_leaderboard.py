"""The leaderboard over the session's two real sweeps (a Part 1 and a Part 2 run): groups,
each group's best epoch, re-scoring, the files and pictures, and what it imports. The
pieces that need no training are tested in test_rows.py and test_render.py."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from PIL import Image

from covid_tune.core.space_file import load_space
from covid_tune.errors import UserError
from covid_tune.results.leaderboard import param_importances, write_leaderboard
from covid_tune.results.render import SPLIT_COLUMNS
from covid_tune.runs.reader import RunInfo, read_run
from covid_tune.results.rows import frozen_name
from covid_tune.search.define_by_run import define_by_run
from helpers import can_mount_tmpfs, on_small_disk


@pytest.fixture(scope="module")
def board(swept, binary_data, tmp_path_factory):
    """One leaderboard over both shared sweeps, written from another working directory
    with relative paths (nothing may resolve against it): (runs, output folder, markdown).
    Two external collections (``--external``): ``same``, the Part 1 data itself, and
    ``site2``, phantoms drawn as another scanner would (``external_site``)."""
    out = tmp_path_factory.mktemp("board")
    external = {"same": str(binary_data), "site2": str(external_site(out / "site2"))}
    here = os.getcwd()
    os.chdir(out)
    try:
        runs = [os.path.relpath(swept.binary), os.path.relpath(swept.multilabel)]
        text = write_leaderboard(runs, "files", external=external)
    finally:
        os.chdir(here)
    return (swept.binary, swept.multilabel), out / "files", text


def external_site(folder: Path) -> Path:
    """A small Part 1 collection of phantoms at another seed, contrast and noise."""
    from covid_tune.data.synth import generate

    generate(folder, "binary", scale=0.006, size=48, seed=5, progress=False,
             layout="kaggle-pneumonia", contrast=0.5, noise=10)
    return folder


def section_rows(text: str, title: str) -> list[dict]:
    """Rows of the table right under ``title`` (stops at the first non-table line)."""
    lines = text[text.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    header = [c.strip("| ") for c in block[0]]
    return [dict(zip(header, row)) for row in block[2:]]


def all_recipes(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"trial": p.parent.parent.name.removeprefix("trial_")}
            for p in run_dir.glob("trial_*/checkpoint_*/recipe.json")]


def test_part1_groups_and_columns(board):
    runs, _, text = board
    rows = section_rows(text, "## Part 1")
    assert list(rows[0])[:7] == ["Backbone", "Frozen Layers", "Epochs", "Training Time",
                                 *(SPLIT_COLUMNS[s] for s in ("train", "validation", "test"))]
    expected = {(r["config"]["backbone"].upper(), frozen_name(r["config"]))
                for r in all_recipes(runs[0])}
    assert {(r["Backbone"], r["Frozen Layers"]) for r in rows} == expected
    assert {("VGG16", "All Layers except FC"), ("RESNET18", "All Layers except FC"),
            ("RESNET18", "None")} <= expected  # the three hand-grid rows
    backbones = [r["Backbone"] for r in rows]
    assert backbones == sorted(backbones, key=["VGG16", "RESNET18"].index)
    assert "Runs: `binary` (6 trials, 0 failed)." in text  # every trial Ray ran is counted
    assert all(set(r["AUROC (train/validation/test)"].split(" / ")) - {"n/a"} for r in rows)
    assert {r["Source"] for r in rows} <= {"hand grid", "searched"}
    assert "hand grid" in {r["Source"] for r in rows}
    assert all(r["Testing Set Accuracy/F1 Score"] != "n/a" for r in rows)
    notes = text.split("### Notes", 1)[1] if "### Notes" in text else ""
    assert "could not be found" not in notes and "moved" not in notes  # found where recorded


def test_each_row_is_its_groups_best_epoch(board):
    """The row's trial and epoch are the best checkpoint of its group (val_loss, min)."""
    runs, _, text = board
    recipes = all_recipes(runs[0])
    for row in section_rows(text, "## Part 1"):
        group = [r for r in recipes if (r["config"]["backbone"].upper(),
                                        frozen_name(r["config"])) == (row["Backbone"],
                                                                      row["Frozen Layers"])]
        best = min(r["metrics"]["val_loss"] for r in group)
        chosen = [r for r in group if r["trial"] == row["Trial"].split("/")[1]
                  and r["epoch"] == int(row["Epochs"])]
        assert chosen and chosen[0]["metrics"]["val_loss"] == best


def test_part2_groups_by_loss_and_has_no_test_column(board):
    runs, _, text = board
    rows = section_rows(text, "## Part 2")
    assert list(rows[0])[:7] == ["Backbone", "Loss Function", "Epochs", "Training Time",
                                 SPLIT_COLUMNS["train"], SPLIT_COLUMNS["selection"],
                                 SPLIT_COLUMNS["validation"]]
    assert SPLIT_COLUMNS["test"] not in rows[0]
    assert [r["Loss Function"] for r in rows] == ["BCE With Logits Loss", "Focal Loss"]


def test_each_table_states_the_split_that_chose_and_those_that_only_report(board):
    runs, out, text = board
    held = json.loads((runs[1] / "dataset.json").read_text())["selection"]
    assert (f"- `multilabel` chose on **selection**, {len(held)} images (15% of Train"
            in text)
    assert "all used `sel_f1` there, scored at the thresholds tuned there each epoch" in text
    assert "table reports. Reported only: validation; it chose nothing" in text
    assert "- `binary` chose on **validation**: " in text
    assert "all used `val_loss` there, scored at the thresholds" in text
    assert "table reports. Reported only: test; it chose nothing" in text
    records = pq.read_table(out / "leaderboard.parquet").to_pylist()
    assert {(r["task"], r["selected_on"]) for r in records} == {
        ("binary", "validation"), ("multilabel", "selection")}
    # the held-out images are Train images the trials never trained on
    assert held and all(name.startswith("Train/") for name in held)


def test_rescored_splits_match_what_training_recorded(board):
    """Same checkpoint, same deterministic transform, same tuned thresholds and, for the
    selection split, the same images held out again from the run's record: the figures
    the trial reported (at the thresholds tuned on the choosing split, what chose the
    row) come back to the last decimal, split by split."""
    _, out, _ = board
    for record in pq.read_table(out / "leaderboard.parquet").to_pylist():
        recipe = json.loads((Path(record["checkpoint"]) / "recipe.json").read_text())
        splits = {"validation": "val", "selection": "sel"}
        for split, prefix in splits.items():
            if record["task"] == "binary" and split == "selection":
                assert record["selection_f1"] is None
                continue
            for name in ("f1", "accuracy"):
                assert record[f"{split}_{name}"] == pytest.approx(
                    recipe["metrics"][f"{prefix}_{name}"], abs=1e-6), (split, name)
            assert record[f"{split}_auroc"] == pytest.approx(
                recipe["metrics"][f"{prefix}_auroc"], abs=1e-6, nan_ok=True)


def test_cells_apply_the_thresholds_tuned_on_the_split_that_chose(board):
    """Each row uses its checkpoint's thresholds (tuned by the default Youden rule on
    the choosing split), with its temperatures; the table shows 0.5 beside them."""
    _, out, text = board
    for record in pq.read_table(out / "leaderboard.parquet").to_pylist():
        recipe = json.loads((Path(record["checkpoint"]) / "recipe.json").read_text())
        chose = record["selected_on"]
        assert recipe["threshold_rule"]["split"] == chose
        assert record["threshold_rule"] == "youden"
        labels = ["infected"] if record["task"] == "binary" else ["covid", "normal", "pneumonia"]
        assert list(recipe["thresholds"]) == labels
        assert all(f"{label} {recipe['thresholds'][label]:.2f}" in record["thresholds"]
                   for label in labels)
        assert set(recipe["temperatures"]) == set(labels)
        assert record["temperatures"].startswith(labels[0])
    rows = section_rows(text, "## Part 2")
    assert all(r["At 0.5 (train/selection/validation)"].count("/") == 5 for r in rows)
    assert all(r["Thresholds"].startswith("covid ") for r in rows)


def test_hand_grid_and_importances_are_shown(board):
    _, _, text = board
    assert text.count("### Hand grid (start_with) beside the search") == 2
    assert "### Hyperparameter importances (Optuna, `binary`)" in text
    assert "### Hyperparameter importances (Optuna, `multilabel`)" in text
    hand = section_rows(text, "### Hand grid")
    vgg = next(r for r in hand if r["Backbone"] == "VGG16")
    assert vgg["Hand grid"] != "—"  # the hand-grid VGG16 row ran, scored on test
    assert vgg["Compared on"] == "test"  # Part 1 chose on validation: test only reports
    part2 = section_rows(text.split("## Part 2", 1)[1], "### Hand grid")
    assert {r["Compared on"] for r in part2} == {"validation"}  # chose on selection


def test_files_parquet_csv_and_pngs(board):
    _, out, text = board
    table = pq.read_table(out / "leaderboard.parquet")
    md_rows = len(section_rows(text, "## Part 1")) + len(section_rows(text, "## Part 2"))
    assert table.num_rows == md_rows
    records = table.to_pylist()
    assert {r["task"] for r in records} == {"binary", "multilabel"}
    assert all(r["scores"] == "re-scored" for r in records)
    assert all(r["test_f1"] is None for r in records if r["task"] == "multilabel")
    with open(out / "leaderboard.csv", newline="") as handle:
        assert [r["trial_id"] for r in csv.DictReader(handle)] == [r["trial_id"] for r in records]
    pictures = [out / r["confusion_png"] for r in records]
    pictures += [out / f"{kind}-{task}.png" for kind in ("comparison", "roc", "cam", "reliability")
                 for task in ("binary", "multilabel")]
    for path in pictures:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"


def test_intervals_only_on_splits_that_report_and_only_when_big_enough(board):
    """No interval on train or the choosing split (a score there is not inference); on
    a reporting split ``{split}_{metric}_ci_low``/``_ci_high`` hold the figure, or, with
    fewer than 10 images of a class (as this fixture's tiny test split has), the
    interval is left out and a note says why."""
    _, out, text = board
    for record in pq.read_table(out / "leaderboard.parquet").to_pylist():
        for split in ("train", "selection", "validation", "test"):
            reports = split not in ("train", record["selected_on"])
            for metric in ("accuracy", "f1", "auroc", "ece", "brier"):
                scaled = metric in ("ece", "brier")  # their intervals are after scaling
                value = record[f"{split}_{metric}" + ("_scaled" if scaled else "")]
                low, high = record[f"{split}_{metric}_ci_low"], record[f"{split}_{metric}_ci_high"]
                if value is None or not reports:
                    assert low is None and high is None, (split, metric)
                    continue
                if low is None:
                    assert f", {split}: no intervals: " in text, (split, metric)
                elif not math.isnan(value):
                    assert low <= value + 1e-9 and value - 1e-9 <= high, (split, metric)
    assert "95% percentile bootstrap intervals, on the splits that only report" in text
    assert "fewer than 10" in text
    assert "![ROC curves, test](roc-binary.png)" in text
    assert "](cam-binary.png)" in text and "](cam-multilabel.png)" in text


def test_reproduce_spaces_fix_the_rows_config(board):
    _, out, _ = board
    for record in pq.read_table(out / "leaderboard.parquet").to_pylist():
        assert "--cpus-per-trial 1 " in record["reproduce"] + " "
        space_file = record["reproduce"].split("--space ")[1].split(" ")[0]
        space = load_space(space_file)
        assert space.max_epochs == record["Epochs"] and space.num_samples == 1
        config = define_by_run(space)(optuna.create_study().ask())
        wanted = json.loads((Path(record["checkpoint"]) / "recipe.json").read_text())["config"]
        for key in ("backbone", "frozen_layers", "lr", "hidden", "loss", "focal_gamma",
                    "augment", "image_size", "seed"):
            assert config[key] == wanted[key], key


def test_a_rows_reproduce_command_trains_it_again_bit_for_bit(board, tmp_path):
    """A Part 1 row's command, run as printed (plus where to keep the run): the same
    hyperparameters, the trial's own seed and one thread, as the sweep had. Every
    train and validation figure of every epoch comes out the same, to the last bit."""
    import shlex

    from covid_tune.cli import main

    row = next(r for r in pq.read_table(board[1] / "leaderboard.parquet").to_pylist()
               if r["task"] == "binary")
    assert main([*shlex.split(row["reproduce"])[1:], "--storage-path", str(tmp_path)]) == 0
    trial = Path(row["checkpoint"]).parent
    again, = (tmp_path / f"reproduce-{row['trial_id']}").glob("trial_*")

    def figures(folder: Path) -> list[dict]:
        lines = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k.startswith(("train_", "val_"))
                 and "per_second" not in k} for line in lines][:row["Epochs"]]

    assert figures(again) == figures(trial) and len(figures(again)) == row["Epochs"]


def test_a_run_without_its_dataset_shows_recorded_scores(swept, tmp_path, monkeypatch):
    """The recorded folder is gone: recorded scores, a note saying so and how to re-score."""
    import shutil

    from covid_tune.runs.record import read_record

    copy = tmp_path / "run"
    shutil.copytree(swept.multilabel, copy)
    sweep_json = json.loads((copy / "sweep.json").read_text())
    sweep_json["provenance"]["data"] = str(tmp_path / "gone")
    (copy / "sweep.json").write_text(json.dumps(sweep_json))
    assert read_record(str(copy)).provenance.data.endswith("gone")
    text = write_leaderboard([str(copy)], str(tmp_path / "board"))
    assert "was not found" in text and "pass --data DIR" in text
    table = pq.read_table(tmp_path / "board" / "leaderboard.parquet").to_pylist()
    assert {r["scores"] for r in table} == {"recorded"}


def test_too_few_trials_for_importances(swept, tmp_path):
    study = optuna.create_study(study_name="r", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)})
    study.tell(trial, 0.5)
    run = read_run(swept.binary)
    importances, note = param_importances(RunInfo(tmp_path, "r", run.record, run.space, []))
    assert importances == {} and "Too few trials" in note


def test_importances_leave_optunas_log_level_as_they_found_it(swept):
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        importances, _ = param_importances(read_run(swept.binary))
        assert importances and optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(optuna.logging.INFO)


def test_leaderboard_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="not a covid-tune run"):
        write_leaderboard([str(tmp_path)], str(tmp_path / "board"))


def test_a_dataset_too_big_for_memory_is_refused_before_re_scoring(swept, tmp_path,
                                                                   monkeypatch):
    """The leaderboard decodes the dataset again: with (pretend) 1000 bytes free it
    refuses before decoding, naming both numbers, and writes nothing."""
    monkeypatch.setattr("covid_tune.data.dataset.available_memory", lambda: 1000)
    with pytest.raises(UserError, match=r"images at 32 px decode to .* more than the 1000 "
                                        r"bytes of memory available; the largest image size "
                                        r"that fits is \d+ px; free memory"):
        write_leaderboard([str(swept.binary)], str(tmp_path / "board"))
    assert list(tmp_path.iterdir()) == []


BOARD_ON_FULL_DISK = '''
import hashlib, pathlib, shutil
from covid_tune.cli import main
board = pathlib.Path(DISK, "board")
shutil.copytree(OLD, board)
def digests():
    return {str(p.relative_to(board)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(board.rglob("*")) if p.is_file()}
before = digests()
fill_disk(0)
full = main(["leaderboard", RUN, "--out", str(board)])
same = digests() == before
stray = [p.name for p in pathlib.Path(DISK).iterdir() if p.name not in ("board", ".filler")]
free_disk()
from covid_tune.bundle.export import export_best
exported = [p.name for p in export_best([RUN], MODEL)]
loaded = sorted(m for m in ("ray", "covid_tune.training.trial", "covid_tune.search.sweep") if m in sys.modules)
print(json.dumps({"full": full, "same": same, "stray": stray,
                  "exported": exported, "loaded": loaded}))
'''


@pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a tmpfs here (unshare -Urm)")
def test_the_read_side_on_a_full_disk_then_with_space_and_without_ray(board, swept,
                                                                       tmp_path):
    """In a fresh interpreter, --out on a real full tmpfs holding an earlier leaderboard:
    exit 2 with one line, every earlier file byte for byte the same, no half-written
    folder left. With space freed, export writes its bundle; neither command has loaded
    Ray or the training code."""
    code = (f"OLD, RUN, MODEL = {str(board[1])!r}, {str(swept.binary)!r}, "
            f"{str(tmp_path / 'model')!r}\n"
            f"sys.stderr = sys.stdout\n" + BOARD_ON_FULL_DISK)
    outcome, printed = on_small_disk(code, tmp_path / "disk", size_kib=4096)
    assert outcome == {"full": 2, "same": True, "stray": [],
                       "exported": ["binary"], "loaded": []}
    errors = [line for line in printed.splitlines() if line.startswith("covid-tune:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert "cannot write the leaderboard" in errors[0] and "unchanged" in errors[0]


def test_cam_images_show_each_label_combination_first():
    import numpy as np

    from covid_tune.results.leaderboard import cam_picks

    assert cam_picks(np.array([0, 0, 1, 1, 0]), 4) == [0, 2, 1, 3]
    bits = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])
    assert cam_picks(bits, 3) == [0, 2, 3]


def test_external_collections_are_columns_of_every_row_of_their_task(board, binary_data):
    """``--external``: two columns per collection in Part 1's table, none in Part 2's
    (the collections are Part 1's), numbers in the CSV/parquet rows and a note each.
    ``same`` is the Part 1 data itself: its pooled accuracy is the image-weighted mean
    of the row's own train, validation and test accuracies, scored the same way."""
    from covid_tune.data.dataset import scan

    _, out, text = board
    part1 = section_rows(text, "## Part 1")
    part2 = section_rows(text, "## Part 2")
    for name in ("same", "site2"):
        assert all(r[f"External {name} Acc/F1"] != "n/a" for r in part1)
        assert all(r[f"External {name} AUROC [CI]"] != "n/a" for r in part1)
        assert all(f"External {name} Acc/F1" not in r for r in part2)
        assert f"External `{name}`: `" in text
    assert "trained and chose on**, so these are not external figures" in text  # same
    assert "so the drop from the row's test (or validation) figures" in text  # site2
    counts = {split: len(refs) for split, refs in scan(binary_data, "binary").files.items()}
    records = pq.read_table(out / "leaderboard.parquet").to_pylist()
    for record in records:
        if record["task"] == "multilabel":
            assert record.get("external_same_accuracy") is None
            continue
        assert record["external_same_images"] == sum(counts.values()) == 90
        pooled = sum(record[f"{split}_accuracy"] * n for split, n in counts.items()) / 90
        assert record["external_same_accuracy"] == pytest.approx(pooled, abs=1e-9)
        low, high = record["external_site2_auroc_ci_low"], record["external_site2_auroc_ci_high"]
        assert 0 <= low < high <= 1 and 0 <= record["external_site2_auroc"] <= 1
        assert record["external_site2_ece_scaled"] is not None


def test_an_external_collection_of_another_task_is_refused(swept, multilabel_data, tmp_path):
    with pytest.raises(UserError, match=r"--external x=.*: a multilabel collection, but the "
                                        r"runs are binary; pass a collection of their task"):
        write_leaderboard([str(swept.binary)], str(tmp_path / "board"),
                          external={"x": str(multilabel_data)})
    assert not (tmp_path / "board").exists()


def test_a_pareto_run_gets_its_front_as_a_table_a_csv_and_a_chart(tmp_path):
    """objectives: [latency_ms]: every trial with its cost, the front marked (not the
    trial that is both worse and slower), the chart, and what each pick rule exports."""
    from helpers import PARETO_TRIALS, pareto_run

    run = pareto_run(tmp_path / "run", PARETO_TRIALS)
    text = write_leaderboard([str(run)], str(tmp_path / "board"))
    rows = section_rows(text, "### Pareto front")
    on_front = {r["Trial"].split("/")[1]: r["On front (latency_ms)"] for r in rows}
    assert on_front == {"best": "yes", "front": "yes", "fastest": "yes", "slower": ""}
    assert [r["val_loss"] for r in rows] == ["0.6", "0.62", "0.65", "0.7"]  # best first
    assert rows[0]["latency_ms"] == "40" and rows[0]["Backbone"] == "RESNET18"
    with open(tmp_path / "board" / "pareto-binary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert {r["Trial"].split("/")[1]: float(r["latency_ms"]) for r in table} == {
        name: reported["latency_ms"] for name, reported in PARETO_TRIALS.items()}
    assert "`--pick cheapest` exports `before-0.2/fastest`" in text
    assert "`--pick best` exports `before-0.2/best`" in text
    with Image.open(tmp_path / "board" / "pareto-binary.png") as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        assert len(set(image.convert("L").getdata())) > 20  # drawn, not blank


def test_two_objectives_give_a_front_per_cost(tmp_path):
    from helpers import PARETO_TRIALS, pareto_run

    trials = {**PARETO_TRIALS, "slower": {**PARETO_TRIALS["slower"], "params": 900_000}}
    run = pareto_run(tmp_path / "run", trials, objectives=("latency_ms", "params"))
    rows = section_rows(write_leaderboard([str(run)], str(tmp_path / "board")),
                        "### Pareto front")
    slower = next(r for r in rows if r["Trial"].endswith("/slower"))
    assert slower["On front (latency_ms)"] == "" and slower["On front (params)"] == "yes"
    assert slower["params"] == "900,000"


def test_runs_without_objectives_get_no_pareto_section(tmp_path):
    """A run from before Pareto searches (no objectives, no costs): the leaderboard as it
    was, even where the trials report params (which every trial now does)."""
    from helpers import PARETO_TRIALS, pareto_run

    run = pareto_run(tmp_path / "run", PARETO_TRIALS, objectives=())
    text = write_leaderboard([str(run)], str(tmp_path / "board"))
    assert "Pareto" not in text and not list((tmp_path / "board").glob("pareto-*"))
