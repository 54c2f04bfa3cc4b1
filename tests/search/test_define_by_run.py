"""The define-by-run function only samples, obeys the conditional structure, and the
start_with rows come out first; driven through Optuna's ask/tell without training."""

from __future__ import annotations

import time
from dataclasses import replace

import optuna
import pytest

from covid_tune.core.space_file import load_space, parse_space
from covid_tune.search.define_by_run import define_by_run, start_points


@pytest.fixture(scope="module")
def multilabel():
    return load_space("search_spaces/multilabel.yaml")


def ask_many(space, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    sample = define_by_run(space)
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(sample(trial))
        study.tell(trial, 0.5)
    return configs


def test_samples_are_inside_the_space_and_conditional(multilabel):
    configs = ask_many(multilabel, 60)
    for config in configs:
        assert config["backbone"] in ("vgg16", "resnet18")
        most = 13 if config["backbone"] == "vgg16" else 20
        assert 0 <= config["frozen_layers"] <= most
        assert 1e-4 <= config["lr"] <= 3e-2
        assert config["task"] == "multilabel" and config["max_epochs"] == 20
        if config["loss"] == "bce":
            assert (config["focal_alpha"], config["focal_gamma"]) == (0.25, 2.0)
    assert {c["backbone"] for c in configs} == {"vgg16", "resnet18"}
    assert {c["loss"] for c in configs} == {"bce", "focal"}
    assert any(c["frozen_layers"] > 13 for c in configs if c["backbone"] == "resnet18")


def test_focal_parameters_only_sampled_for_focal(multilabel):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    sample = define_by_run(multilabel)
    for _ in range(30):
        trial = study.ask()
        config = sample(trial)
        sampled = set(trial.params)
        assert ("focal_alpha" in sampled) == (config["loss"] == "focal")
        assert f"frozen_layers_{config['backbone']}" in sampled
        study.tell(trial, 0.1)


def test_sampling_is_cheap(multilabel):
    started = time.perf_counter()
    ask_many(multilabel, 20)
    assert time.perf_counter() - started < 5  # no I/O, no computation inside


def test_start_with_rows_come_first(multilabel):
    study = optuna.create_study(direction="maximize")
    for point in start_points(multilabel):
        study.enqueue_trial(point)
    sample = define_by_run(multilabel)
    first = [sample(study.ask()) for _ in multilabel.start_with]
    for row, config in zip(multilabel.start_with, first):
        assert {k: config[k] for k in row} == row


def test_tpe_learns_from_tell(multilabel):
    """With TPE and a score that rewards resnet18, later asks favour it."""
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=8, multivariate=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    sample = define_by_run(multilabel)
    picks = []
    for _ in range(40):
        trial = study.ask()
        config = sample(trial)
        picks.append(config["backbone"])
        study.tell(trial, 1.0 if config["backbone"] == "resnet18" else 0.0)
    assert picks[-15:].count("resnet18") >= 11


def test_every_trial_has_its_own_seed_from_the_sweeps_seed():
    """Seeds differ between trials, repeat with the sweep's --seed, and a space's
    trial_seed (what reproduce files set) fixes them."""
    space = parse_space({"task": "binary", "params": {"backbone": "resnet18"}}, "s.yaml")

    def seeds(sweep_seed: int, fixed: int | None = None) -> list[int]:
        sample = define_by_run(replace(space, trial_seed=fixed), sweep_seed)
        study = optuna.create_study()
        return [sample(study.ask())["seed"] for _ in range(4)]

    assert len(set(seeds(0))) == 4 and seeds(7) == seeds(7) != seeds(0)
    assert seeds(7, fixed=123) == [123] * 4


def test_the_backbones_space_samples_every_backbone_within_its_own_units():
    """search_spaces/backbones.yaml: each backbone's frozen_layers range is its own, up to
    all its units (the registry's counts, kept torch-free in core.space)."""
    from covid_tune.core.space import BACKBONE_UNITS

    space = load_space("search_spaces/backbones.yaml")
    configs = ask_many(space, 300)
    assert {c["backbone"] for c in configs} == set(BACKBONE_UNITS)
    for config in configs:
        assert 0 <= config["frozen_layers"] <= BACKBONE_UNITS[config["backbone"]]
    tops = {c["backbone"] for c in configs if c["frozen_layers"] == BACKBONE_UNITS[c["backbone"]]}
    assert {c["backbone"] for c in configs if c["frozen_layers"] > 9} == {
        "vgg16", "resnet18", "resnet50", "mobilenet_v3_large"}
    assert len(tops) >= 5
