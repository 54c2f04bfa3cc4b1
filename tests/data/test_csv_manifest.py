"""CSV manifests: the rows read, the labels mapped to a task's classes, the splits kept
or drawn, and one clear line for every mistake in the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from covid_tune.core.space import DataSpec
from covid_tune.data.csv_manifest import class_of, guess_task, read
from covid_tune.data.dataset import assignment, load_dataset, scan
from covid_tune.errors import UserError
from covid_tune.core.tasks import TASKS
from helpers import refused, save


def listed(root: Path, rows: list[tuple[str, str, str]], header: str = "path,labels,split",
           images: bool = True) -> Path:
    """``root/manifest.csv`` with ``rows`` (path, labels, split), each image written."""
    lines = [header]
    for k, (name, labels, split) in enumerate(rows):
        if images:
            save(root / name, value=k)
        lines.append(",".join(c for c in (name, labels, split) if c is not None))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


PART_2 = [(f"img/{split}{cls}{i}.png", labels, split)
          for split in ("train", "validation", "test")
          for cls, labels in (("c", "covid|pneumonia"), ("n", "normal"), ("p", "pneumonia"))
          for i in range(3)]


def test_part_2_rows_become_the_tasks_classes_with_a_labelled_test_split(tmp_path):
    """``covid|pneumonia`` is COVID-19 (both bits); the test rows are labelled, so the
    test split has targets; the CSV's own size is part of what a run records."""
    from covid_tune.data.dataset import manifest

    path = listed(tmp_path, PART_2)
    layout = scan(path)
    assert (layout.kind.name, layout.task.name, layout.root) == ("csv-manifest", "multilabel",
                                                                 tmp_path)
    assert {s: len(r) for s, r in layout.files.items()} == {"train": 9, "validation": 9,
                                                           "test": 9}
    bundle = load_dataset(layout, image_size=32, use_cache=False, progress=False)
    bits = {n.split("/")[1][-6]: tuple(t) for n, t in zip(bundle.splits["test"].names,
                                                          bundle.splits["test"].targets)}
    assert bits == {"c": (1, 0, 1), "n": (0, 1, 0), "p": (0, 0, 1)}
    assert manifest(layout)["manifest.csv"] == path.stat().st_size
    assert "covid|pneumonia -> covid-19" in layout.kind.mapping()


def test_without_a_split_column_validation_is_drawn_and_recorded(tmp_path):
    rows = [(f"a/{cls}{i}.png", cls, None) for cls in ("normal", "infected") for i in range(10)]
    path = listed(tmp_path, rows, header="path,labels")
    layout = scan(path)
    assert layout.task.name == "binary"
    assert {s: len(r) for s, r in layout.files.items()} == {"train": 16, "validation": 4}
    record = assignment(layout)
    assert sorted(record.values()).count("validation") == 4
    # a reader given the run's record gets the same split, whatever the draw would say
    moved = dict(record, **{"a/normal0.png": "validation", "a/normal1.png": "train"})
    again = scan(path, assigned=moved)
    assert assignment(again) == moved
    wider = scan(path, spec=DataSpec(split=(("validation", 0.2), ("test", 0.2))))
    assert {s: len(r) for s, r in wider.files.items()} == {"train": 12, "validation": 4,
                                                          "test": 4}


def test_a_spaces_classes_map_other_words_and_leave_rows_out(tmp_path):
    rows = [(f"x/{s}{w}{i}.png", w, s) for s in ("train", "val") for w in
            ("normal", "pneumonia", "opacity") for i in range(2)]
    path = listed(tmp_path, rows)
    layout = scan(path, "binary", spec=DataSpec(classes=(("pneumonia", "infected"),
                                                         ("opacity", None))))
    assert sorted(r.class_dir for r in layout.files["train"]) == ["infected", "infected",
                                                                 "normal", "normal"]
    assert "opacity left out" in layout.kind.mapping()
    with pytest.raises(UserError, match=r"manifest.csv:6: label 'opacity' is not a binary "
                                        r"class; use one of normal, infected, or map it"):
        scan(path, "binary", spec=DataSpec(classes=(("pneumonia", "infected"),)))
    with pytest.raises(UserError, match="data.classes names the label lung, which no row has"):
        scan(path, "binary", spec=DataSpec(classes=(("lung", None),)))


@pytest.mark.parametrize("header, rows, message", [
    ("file,label", [("a.png", "normal", None)],
     "the header must be path,labels, then any of split,patient,view,source; found file,label"),
    ("path,labels,split", [("a.png", "normal", "holdout")],
     "manifest.csv:2: split 'holdout' is not one of train, validation, val, test"),
    ("path,labels,split", [("a.png", "normal", "train"), ("./a.png", "infected", "val")],
     r"manifest.csv:3: ./a.png is listed twice \(also on line 2\)"),
    ("path,labels,split", [("a.png", "", "train")],
     "manifest.csv:2: no labels; only test images may be unlabelled"),
    ("path,labels,split", [("a.png", "covid", "train")],
     r"labels covid are not a class of Part 2 \(COVID-19 is a pneumonia: write "
     r"covid\|pneumonia\)"),
    ("path,labels,split", [("a.png", "normal", "train"), ("b.png", "pneumonia", "test"),
                           ("c.png", "", "test"), ("d.png", "pneumonia", "val")],
     "some test rows have labels and some do not"),
    ("path,labels,split", [("a.png", "normal", "train"), ("b.png", "infected", "test")],
     "no validation rows; add some, or leave out the split column"),
    ("path,labels,split", [("a.png", "normal", "train"), ("b.png", "infected", "val")],
     "no train row is labelled infected; a binary dataset needs every class"),
])
def test_mistakes_in_a_manifest_get_one_line_naming_the_row(tmp_path, header, rows, message):
    path = listed(tmp_path, rows, header=header)
    with pytest.raises(UserError, match=message):
        scan(path)


def test_paths_must_exist_and_lie_inside_the_manifests_folder(tmp_path):
    save(tmp_path / "outside.png")
    inner = tmp_path / "set"
    path = listed(inner, [("a.png", "normal", "train"), ("../outside.png", "normal", "train")])
    with pytest.raises(UserError, match=r"manifest.csv:3: ../outside.png is outside the "
                                        r"manifest's folder"):
        read(path)
    path = listed(inner, [("a.png", "normal", "train"), ("gone.png", "normal", "train"),
                          ("gone2.png", "normal", "train")], images=False)
    save(inner / "a.png")
    with pytest.raises(UserError, match=r"manifest.csv:3: gone.png: no such file \(2 such "
                                        r"row\(s\) in all\)"):
        read(path)


def test_guess_task_and_class_of():
    binary, multilabel = TASKS["binary"], TASKS["multilabel"]
    assert class_of(("infected",), binary, {}) == "infected"
    assert class_of(("covid", "pneumonia"), multilabel, {}) == "covid-19"
    assert class_of(("covid-19",), multilabel, {}) == "covid-19"
    assert class_of(("opacity",), multilabel, {"opacity": None}) is None
    with pytest.raises(ValueError, match="not a class of Part 2"):
        class_of(("normal", "pneumonia"), multilabel, {})
    rows = [type("R", (), {"words": w})() for w in (("normal",), ("infected",))]
    assert guess_task(type("M", (), {"rows": rows})()) == "binary"


def test_check_reads_a_manifest_and_refuses_a_bad_one_in_one_line(tmp_path, capsys):
    from covid_tune.cli import main

    path = listed(tmp_path / "ok", PART_2)
    assert main(["check", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "multilabel task, a CSV manifest (manifest.csv) (splits train, validation, test" in out
    assert "test: 9 readable (covid-19 3, normal 3, pneumonia 3)" in out
    bad = listed(tmp_path / "bad", [("a.png", "normal", "someday")])
    assert "manifest.csv:2: split 'someday'" in refused(capsys, "check", str(bad))
