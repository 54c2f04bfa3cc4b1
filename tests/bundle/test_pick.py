"""``export --pick RULE``: the trial each rule takes on the Pareto front of a run whose
space names objectives, what the model card says of it, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
from helpers import PARETO_TRIALS, pareto_run, refused

from covid_tune.bundle import pick
from covid_tune.bundle.export import pick_card, pick_lines, pick_trial
from covid_tune.cli import main
from covid_tune.runs.reader import choose_datasets, read_run


def picked(run_dir, rule: str):
    """(run, trial, pick) that ``export --pick rule`` would export, without exporting."""
    runs = [read_run(run_dir)]
    return pick_trial(runs, rule, choose_datasets(runs, []))


def test_fastest_exports_the_cheapest_trial_and_its_card_states_the_pick(tmp_path):
    run = pareto_run(tmp_path / "run", PARETO_TRIALS)
    assert main(["export", str(run), "--out", str(tmp_path / "model"), "--pick", "fastest"]) == 0
    folder = tmp_path / "model" / "binary"
    card = json.loads((folder / "model.json").read_text())
    assert card["source"]["trial_id"] == "fastest"
    chosen = card["pick"]
    assert (chosen["rule"], chosen["front_cost"], chosen["value"]) == ("fastest", "latency_ms", 0.7)
    assert chosen["costs"]["latency_ms"]["value"] == 2.0
    assert "ONNX Runtime CPU latency" in chosen["costs"]["latency_ms"]["measured"]
    assert chosen["costs"]["params"]["value"] == 1_000_000
    assert (chosen["best"]["trial_id"], chosen["best"]["value"]) == ("best", 0.6)
    assert "no bootstrap interval" in chosen["interval_note"]
    readme = (folder / "README.md").read_text()
    assert "## Picked by `fastest`" in readme
    assert "- latency_ms: 2 ms (ONNX Runtime CPU latency per image at batch 1" in readme
    assert "- params: 1,000,000 parameters" in readme
    assert "for comparison: `best` of run `before-0.2`, 0.6000, latency_ms 40 ms" in readme


def test_cheapest_within_interval_takes_the_cheapest_the_data_cannot_tell_from_the_best(
        tmp_path, monkeypatch):
    """val_loss 0.62 at 10 ms is inside the best's interval [0.55, 0.63]; 0.65 and 0.70
    are not (and 0.65 is off the front anyway)."""
    run = pareto_run(tmp_path / "run", PARETO_TRIALS)
    intervals = {"best": (0.55, 0.63), "front": (0.57, 0.66), "fastest": (0.6, 0.8)}
    monkeypatch.setattr(pick, "metric_interval",
                        lambda record, data, metric: (intervals[record.trial_id], ""))
    _, record, chosen = picked(run, "cheapest-within-interval")
    assert record.trial_id == "front"
    assert (chosen.interval, chosen.best_interval) == ((0.57, 0.66), (0.55, 0.63))
    lines = "\n".join(pick_lines(pick_card(chosen)))
    assert "- val_loss: 0.6200 [0.5700, 0.6600] (95% bootstrap interval)" in lines
    assert "`best` of run `before-0.2`, 0.6000 [0.5500, 0.6300]" in lines
    assert picked(run, "cheapest")[1].trial_id == "fastest"
    assert picked(run, "best")[1].trial_id == "best"


def test_best_on_a_run_without_costs_is_todays_choice_and_card(tmp_path):
    run = pareto_run(tmp_path / "run", {k: {"val_loss": v["val_loss"]}
                                        for k, v in PARETO_TRIALS.items()}, objectives=())
    _, record, chosen = picked(run, "best")
    assert record.trial_id == "best" and chosen is None


@pytest.mark.parametrize("objectives, costs, rule, says", [
    ((), (), "cheapest", ("needs a deploy cost (latency_ms or params), which the trials of "
                          "run before-0.2 do not report; add `objectives: [latency_ms]`")),
    (("params",), ("params",), "fastest", ("needs `latency_ms`, which the trials of run "
                                           "before-0.2 do not report")),
    (("latency_ms",), ("latency_ms",), "cheapest-within-interval",
     ("needs the bootstrap interval of the best trial's `val_loss`, and there is none "
      "(`val_loss` has no bootstrap interval")),
])
def test_a_pick_the_run_cannot_answer_is_refused_in_one_line(tmp_path, capsys, objectives,
                                                             costs, rule, says):
    trials = {k: {"val_loss": v["val_loss"], **{c: v[c] for c in costs}}
              for k, v in PARETO_TRIALS.items()}
    run = pareto_run(tmp_path / "run", trials, objectives=objectives)
    err = refused(capsys, "export", str(run), "--out", str(tmp_path / "model"), "--pick", rule)
    assert str(run) in err and says in err
    assert not (tmp_path / "model" / "binary").exists()
