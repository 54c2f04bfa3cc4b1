"""The two tasks' labels: output order, the positive class, and COVID-19 as a pneumonia."""

from __future__ import annotations

import numpy as np

from covid_tune.core.tasks import BINARY, MULTILABEL, POSITIVE_CLASS, TASKS


def test_binary_outputs_normal_then_infected_and_infected_is_positive():
    assert BINARY.label_names == ("normal", "infected") and BINARY.outputs == 2
    assert POSITIVE_CLASS == "infected" and BINARY.label_names.index(POSITIVE_CLASS) == 1
    assert BINARY.target_of("Infected").tolist() == [1.0]
    assert BINARY.target_of("NORMAL").tolist() == [0.0]


def test_covid_sets_the_pneumonia_bit_too():
    assert MULTILABEL.label_names == ("covid", "normal", "pneumonia")
    assert MULTILABEL.multilabel and not BINARY.multilabel
    bits = {name: MULTILABEL.target_of(name) for name in MULTILABEL.class_dirs}
    assert bits["covid-19"].tolist() == [1, 0, 1]
    assert bits["pneumonia"].tolist() == [0, 0, 1] and bits["normal"].tolist() == [0, 1, 0]
    assert all(b.dtype == np.float32 for b in bits.values())


def test_test_is_labelled_for_part1_only():
    assert "test" in TASKS["binary"].labelled_splits
    assert "test" not in TASKS["multilabel"].labelled_splits


def test_each_task_declares_exactly_the_metrics_compute_metrics_returns():
    from covid_tune.core.metrics import compute_metrics

    rng = np.random.default_rng(0)
    targets = {"binary": np.array([0, 1, 1, 0]),
               "multilabel": np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]])}
    for name, task in TASKS.items():
        returned = compute_metrics(task, targets[name], rng.normal(size=(4, task.outputs)))
        assert list(returned) != [] and "confusion" in returned
        assert set(returned) - {"confusion"} == set(task.metrics) - {"loss"}, name
        assert task.metrics[0] == "loss" and len(set(task.metrics)) == len(task.metrics)
        assert task.default_metric.removeprefix("val_") in task.metrics


def test_per_label_metrics_follow_the_label_names():
    assert "f1_pneumonia" in MULTILABEL.metrics and "auroc_covid" in MULTILABEL.metrics
    assert not any(m.endswith("_infected") for m in BINARY.metrics)
    assert BINARY.losses == ("ce",) and MULTILABEL.losses == ("bce", "focal")
