"""Pictures: a confusion image per label, and PNG files that open."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covid_tune.core.plots import confusion_image, write_chart, write_confusion


def test_confusion_image_has_one_panel_per_label():
    one = confusion_image([[3, 1], [0, 4]])
    three = confusion_image({name: [[3, 1], [0, 4]] for name in ("covid", "normal", "pneumonia")})
    assert one.ndim == 3 and one.shape[2] == 3 and one.dtype.name == "uint8"
    assert three.shape[0] == one.shape[0] and three.shape[1] > 2.5 * one.shape[1]


def test_png_files_open(tmp_path):
    write_confusion(None, "not scored", tmp_path / "c.png")
    write_chart(["A", "B"], [{"test": {"accuracy": 0.5, "f1": 0.4}}, {}], ["test"],
                tmp_path / "chart.png")
    for name in ("c.png", "chart.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG"


def test_roc_chart_with_curves_and_with_none(tmp_path):
    from covid_tune.core.plots import write_roc

    write_roc(["a\nb", "c"], [([0, 0.2, 1], [0, 0.8, 1]), None], "ROC", tmp_path / "roc.png")
    write_roc(["a"], [None], "ROC", tmp_path / "empty.png")
    for name in ("roc.png", "empty.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size == (500, 500)


def test_reliability_diagram_with_curves_and_with_none(tmp_path):
    from covid_tune.core.plots import write_reliability

    points = [(0.1, 0.2, 5), (0.8, 0.7, 9)]
    write_reliability({"as trained": points, "temperature-scaled": points[:1]}, "R",
                      tmp_path / "rel.png")
    write_reliability({}, "R", tmp_path / "empty.png")
    drawn, empty = (np.asarray(Image.open(tmp_path / n).convert("L")) for n in
                    ("rel.png", "empty.png"))
    assert drawn.shape == empty.shape == (500, 500)
    assert (drawn != empty).any()  # the curves and legend are on it
