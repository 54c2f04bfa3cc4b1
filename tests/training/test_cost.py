"""Deploy costs a trial reports: the parameter count, and ONNX Runtime's CPU latency
per image at batch 1, measured once per architecture in a process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from covid_tune.nn.models import build_model
from covid_tune.training import cost


def config(backbone: str, objectives=("latency_ms",)) -> SimpleNamespace:
    return SimpleNamespace(objectives=objectives, task="binary", backbone=backbone,
                           image_size=32, hidden=256)


def test_a_larger_backbone_costs_more_and_the_model_is_left_as_it_was():
    small, large = build_model("resnet18", 1), build_model("vgg16", 1, frozen_layers=13)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    small_costs = cost.trial_costs(small, config("resnet18"))
    large_costs = cost.trial_costs(large, config("vgg16"))
    assert small_costs["params"] == sum(p.numel() for p in small.parameters()) == 11_308_097
    assert large_costs["params"] > small_costs["params"]  # frozen parameters count too
    assert large_costs["latency_ms"] > 2 * small_costs["latency_ms"] > 0
    assert small.training and all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    again = cost.trial_costs(build_model("resnet18", 1), config("resnet18"))
    assert again["latency_ms"] == small_costs["latency_ms"]  # measured once per architecture


def test_latency_is_measured_only_when_the_sweep_searches_it():
    assert set(cost.trial_costs(build_model("resnet18", 1), config("resnet18", ()))) == {"params"}


def test_an_architecture_is_timed_once_per_node_and_every_trial_reports_that(tmp_path,
                                                                              monkeypatch):
    """The first trial of an architecture keeps its figure in the node's cache; a trial
    in another process (the in-process figures cleared) reads it back without timing,
    so trials of one architecture never differ by the timing's noise."""
    monkeypatch.setenv("COVID_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "measured", {})
    first = cost.trial_costs(build_model("resnet18", 1), config("resnet18"))["latency_ms"]
    assert (tmp_path / cost.LATENCY_FILE).exists()
    monkeypatch.setattr(cost, "measured", {})

    def no_timing(*args):
        raise AssertionError("timed again")

    monkeypatch.setattr(cost, "_measure", no_timing)
    assert cost.trial_costs(build_model("resnet18", 1), config("resnet18"))["latency_ms"] == first
    wider = SimpleNamespace(**{**vars(config("resnet18")), "hidden": 64})
    with pytest.raises(AssertionError, match="timed again"):  # another architecture is timed
        cost.trial_costs(build_model("resnet18", 1, hidden=64), wider)
