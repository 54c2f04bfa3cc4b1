"""A search space turned into what Optuna runs: a define-by-run function that only samples.

The function asks Optuna for each hyperparameter in a fixed order (backbone first, so
``frozen_layers`` can depend on it; focal alpha/gamma only when the loss is focal) and
returns the whole trial config: the sampled values, the study's fixed settings and the
trial's own seed (from the sweep's seed and the trial's number). It does no I/O and no
computation, as Ray's OptunaSearch expects.

``frozen_layers`` is asked under a per-backbone name (``frozen_layers_vgg16``) because
13 frozen layers of VGG-16 and of ResNet-18 are different things to TPE; the config
carries the plain ``frozen_layers`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from covid_tune.core.space import FOCAL_PARAMS, PARAM_DEFAULTS, PARAM_TYPES, Choice, Fixed, Param, Range, SearchSpace


@dataclass(frozen=True)
class DefineByRun:
    """The Optuna define-by-run function for a search space (a picklable callable, so
    Ray can save the searcher's state with the run)."""

    space: SearchSpace
    sweep_seed: int = 0

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in PARAM_TYPES:
            param = self.space.params.get(name)
            if name in FOCAL_PARAMS and values.get("loss") != "focal":
                values[name] = PARAM_DEFAULTS[name]
            elif name == "frozen_layers":
                backbone = values["backbone"]
                values[name] = suggest(trial, optuna_name(name, backbone), param[backbone])
            elif param is None:
                values[name] = PARAM_DEFAULTS[name]
            else:
                values[name] = suggest(trial, name, param)
        seed = self.space.trial_seed
        if seed is None:
            seed = trial_seed(self.sweep_seed, trial.number)
        return {**values, **self.space.fixed_settings(), "seed": seed}


def define_by_run(space: SearchSpace, sweep_seed: int = 0) -> DefineByRun:
    """The Optuna define-by-run function for ``space`` in a sweep seeded ``sweep_seed``."""
    return DefineByRun(space, sweep_seed)


def trial_seed(sweep_seed: int, number: int) -> int:
    """Trial ``number``'s own seed (initial weights, batch order, augmentation, dropout),
    different for every trial and the same whenever the sweep's seed is."""
    return (sweep_seed * 1_000_003 + number) % (2**31 - 1)


def suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    """Ask Optuna for one value; a fixed value is not asked at all."""
    if isinstance(param, Fixed):
        return param.value
    if isinstance(param, Choice):
        return trial.suggest_categorical(name, list(param.choices))
    assert isinstance(param, Range)
    if param.integer:
        return trial.suggest_int(name, int(param.low), int(param.high),
                                 step=int(param.step or 1), log=param.log)
    return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)


def optuna_name(name: str, backbone: str) -> str:
    return f"{name}_{backbone}" if name == "frozen_layers" else name


def start_points(space: SearchSpace) -> list[dict[str, Any]]:
    """``start_with`` rows as Optuna parameter names, for ``enqueue_trial``."""
    points = []
    for row in space.start_with:
        backbone = row.get("backbone")
        if backbone is None and isinstance(space.params["backbone"], Fixed):
            backbone = space.params["backbone"].value
        point = {}
        for key, value in row.items():
            if key == "frozen_layers":
                point[optuna_name(key, backbone)] = value
            elif not isinstance(space.params.get(key), Fixed):
                point[key] = value
        points.append(point)
    return points
