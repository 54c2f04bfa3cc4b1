"""One trial per task, picked on the Pareto front of the sweep's metric and a deploy cost
(``export --pick``; the leaderboard's Pareto section shows the same front).

The costs are what each trial reports with every epoch (``COSTS`` in
``covid_tune.core.space``: ``latency_ms``, ``params``), read from the metrics of its
best epoch. A run lists the ones its search minimised in its space's ``objectives``;
``trial_costs`` says which of them the trials report. The front and the rules are
``covid_tune.core.pareto``'s; ``cheapest-within-interval`` also needs the best
trial's bootstrap interval of the metric, re-scored here on the split that chose
(``metric_interval``, with torch: only when a rule or a card asks for it).

Nothing here imports Ray or the training code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from covid_tune.core import pareto
from covid_tune.core.metrics import INTERVAL_METRICS, bootstrap_intervals, interval_note
from covid_tune.core.space import COSTS, SPLIT_PREFIXES
from covid_tune.core.tasks import TASKS
from covid_tune.data.dataset import (
    DataBundle,
    check_memory,
    load_dataset,
    patient_groups,
    patient_map,
    with_selection,
)
from covid_tune.errors import UserError
from covid_tune.runs.reader import RunInfo, TrialRecord, best_overall

SPACE_FIX = "add `objectives: [latency_ms]` to the space and run the sweep again"


def cost_value(record: TrialRecord, cost: str) -> float | None:
    """The cost a trial reported at its best epoch; None when it reported none."""
    value = record.metrics.get(cost)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def trial_costs(runs: list[RunInfo]) -> tuple[str, ...]:
    """The costs to show for one task's runs: those the spaces' ``objectives`` name that
    some trial reports, else any cost a trial reports; none when no space names any
    (a run from before Pareto searches, or one that did not ask for them)."""
    named = tuple(dict.fromkeys(c for run in runs for c in run.space.objectives))
    if not named:
        return ()
    trials = [t for run in runs for t in run.trials]
    reported = [c for c in (*named, *COSTS) if any(cost_value(t, c) is not None for t in trials)]
    return tuple(c for c in named if c in reported) or tuple(dict.fromkeys(reported))


def trial_key(record: TrialRecord) -> str:
    """``run/trial_id``: a point's id."""
    return f"{record.run}/{record.trial_id}"


def points(trials: list[TrialRecord], metric: str, cost: str) -> list[pareto.Point]:
    """Each trial at its best epoch as a point on the metric-cost plane."""
    return [pareto.Point(trial_key(t), t.score(metric), cost_value(t, cost)) for t in trials]


@dataclass
class Pick:
    """The trial a rule chose on one task's front, and what the model card says of it."""

    rule: str
    """The rule as asked (``fastest`` stays ``fastest``)."""
    cost: str
    """The cost the front was drawn on."""
    record: TrialRecord
    best: TrialRecord
    """The best trial by the metric, for comparison."""
    metric: str
    mode: str
    interval: tuple[float, float] | None = None
    """The chosen trial's bootstrap interval of the metric, where it was computed."""
    best_interval: tuple[float, float] | None = None
    interval_note: str = ""
    """Why there is no interval, where there is none."""


def choose(runs: list[RunInfo], name: str,
           load_data: Callable[[], DataBundle | None]) -> Pick:
    """The trial of one task's runs that the rule (or alias) ``name`` picks on the front
    of the first run's metric and the first cost the trials report (``fastest``:
    latency). ``load_data`` gives the run's dataset (the selection split held out) for
    the intervals, None when it is not there; it is called after the checks. UserError
    when the rule needs what the run does not have."""
    rule, cost = pareto.resolve(name, None)
    run, best = best_overall(runs)
    costs = trial_costs(runs)
    cost = cost or (costs[0] if costs else None)
    if cost not in costs and rule != "best":
        raise UserError(no_costs_message(run, name, cost))
    if cost is None:
        return Pick(name, "", best, best, run.metric, run.mode)
    trials, data = [t for r in runs for t in r.trials], load_data()
    best_interval, note = metric_interval(best, data, run.metric)
    if rule == "cheapest-within-interval" and best_interval is None:
        raise UserError(f"{run.path}: --pick {name} needs the bootstrap interval of the best "
                        f"trial's `{run.metric}`, and there is none ({note}); use --pick "
                        f"cheapest or --pick best")
    chosen = pick_record(trials, run, rule, cost, best_interval) if rule != "best" else best
    interval = best_interval
    if chosen is not best:
        interval, note = metric_interval(chosen, data, run.metric)
    return Pick(name, cost, chosen, best, run.metric, run.mode, interval, best_interval, note)


def pick_record(trials: list[TrialRecord], run: RunInfo, rule: str, cost: str,
                interval: tuple[float, float] | None) -> TrialRecord:
    """The trial ``rule`` picks among ``trials`` on the front of ``cost``."""
    found = points(trials, run.metric, cost)
    if not any(pareto.usable(p) for p in found):
        raise UserError(f"{run.path}: no trial reports both `{run.metric}` and `{cost}`; "
                        f"{SPACE_FIX}")
    chosen = pareto.pick(found, run.mode, rule, interval)
    return next(t for t in trials if trial_key(t) == chosen.id)


def no_costs_message(run: RunInfo, name: str, cost: str | None) -> str:
    """Why ``--pick name`` cannot work on the run, and the fix."""
    what = f"`{cost}`" if cost else "a deploy cost (latency_ms or params)"
    return (f"{run.path}: --pick {name} needs {what}, which the trials of run {run.name} do "
            f"not report; {SPACE_FIX}, or use --pick best")


def split_metric(metric: str) -> tuple[str | None, str]:
    """``val_f1`` -> (``validation``, ``f1``); (None, metric) for a metric of no split."""
    prefix, _, name = metric.partition("_")
    split = next((s for s, p in SPLIT_PREFIXES.items() if p == prefix), None)
    return (split, name) if split else (None, metric)


def metric_interval(record: TrialRecord, data: DataBundle | None,
                    metric: str) -> tuple[tuple[float, float] | None, str]:
    """The trial's 95% bootstrap interval of ``metric``, re-scored with its checkpoint on
    the metric's split (at its thresholds and temperatures, by patient where patients
    repeat), as the leaderboard bootstraps; (None, why) when there is none."""
    split, name = split_metric(metric)
    if name not in INTERVAL_METRICS or split is None:
        return None, (f"`{metric}` has no bootstrap interval; only "
                      f"{', '.join(INTERVAL_METRICS)} of a split have one")
    part = data.splits.get(split) if data is not None else None
    if part is None or not part.targets.size:
        return None, (f"the {split} split is not there to re-score (pass --data with the "
                      f"run's dataset)")
    task = TASKS[record.task]
    note = interval_note(task, part.targets)
    if note:
        return None, f"{split}: {note}"
    logits = checkpoint_logits(record, part.images)
    found = bootstrap_intervals(task, part.targets, logits,
                                threshold_logits=record.threshold_logits,
                                temperatures=record.temperatures,
                                groups=patient_groups(data, split))
    return tuple(float(v) for v in found[name]), ""


def checkpoint_logits(record: TrialRecord, images):
    """The trial's checkpoint run on ``images`` (uint8), as the leaderboard re-scores."""
    from covid_tune.nn.device import Device
    from covid_tune.nn.logits import predict_logits
    from covid_tune.nn.weights import load_model

    device = Device.pick()
    model = load_model(record.local_checkpoint()).to(device.torch)
    return predict_logits(model, images, 128, device)


def front_keys(trials: list[TrialRecord], metric: str, mode: str,
               costs: tuple[str, ...]) -> dict[str, list[str]]:
    """Cost -> the ``trial_key`` of each trial on the front of ``metric`` and that cost,
    cheapest first."""
    return {cost: [p.id for p in pareto.front(points(trials, metric, cost), mode)]
            for cost in costs}


def run_data(run: RunInfo, choice) -> DataBundle | None:
    """The run's dataset at its image size, its selection split held out of Train as the
    sweep held it, patients grouped (for the intervals); None when it is not there."""
    if choice.layout is None:
        return None
    size = run.space.image_size
    check_memory(choice.layout, size, copies=1,
                 fix="free memory, or export on a machine with more")
    data = load_dataset(choice.layout, run.task, size, progress=False)
    data.groups = patient_map(choice.layout)
    return with_selection(data, run.selection)
