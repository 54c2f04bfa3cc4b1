"""The sweep's status line, from trials in every state (no Ray needed to make them)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from covid_tune.core.space_file import parse_space
from covid_tune.runs.record import SweepOptions
from covid_tune.search.status import SweepStatus, key_params
from covid_tune.search.sweep import run_config

CONFIG = {"backbone": "resnet18", "frozen_layers": 11, "lr": 0.0496, "loss": "ce"}


def trial(trial_id: str, status: str, epoch: int | None = None, **config):
    return SimpleNamespace(trial_id=trial_id, status=status, config={**CONFIG, **config},
                           last_result={"epoch": epoch} if epoch else {})


def test_one_line_per_change_with_counts_the_best_so_far_and_the_time_left(monkeypatch):
    monkeypatch.setattr("covid_tune.search.status.MIN_GAP_SECONDS", 0.0)
    out = io.StringIO()
    status = SweepStatus("val_f1", "max", max_epochs=4, stream=out)
    status.setup(num_samples=8, total_num_samples=8)
    trials = [trial("a", "RUNNING"), trial("b", "PENDING")]
    status.on_trial_start(0, trials, trials[0])
    status.on_trial_start(0, trials, trials[0])  # nothing new: no second line
    status.on_trial_result(0, trials, trials[0], {"val_f1": 0.5, "epoch": 1})
    status.on_trial_result(0, trials, trials[0], {"val_f1": 0.4, "epoch": 2})  # not better
    trials = [trial("a", "TERMINATED", 4), trial("b", "TERMINATED", 1),
              trial("c", "ERROR"), trial("d", "RUNNING", 2, backbone="vgg16")]
    status.on_trial_result(0, trials, trials[3], {"val_f1": 0.9, "epoch": 2})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("] 1 running, 0 stopped early, 0 finished, 0 failed, "
                             "7 to start (of 8)")
    assert "best val_f1 0.5000: resnet18, frozen 11, lr 0.0496 (trial a, epoch 1)" in lines[1]
    last = lines[2]
    assert "1 running, 1 stopped early, 1 finished, 1 failed, 4 to start (of 8)" in last
    assert "best val_f1 0.9000: vgg16, frozen 11, lr 0.0496 (trial d, epoch 2)" in last
    assert last.endswith(" left") and "about " in last
    status.on_experiment_end(trials)  # the last state is always printed
    assert len(out.getvalue().splitlines()) == 4


def test_news_sooner_than_the_gap_waits_for_it_and_is_printed_once(monkeypatch):
    """A burst of events (a big sweep) prints one line, then the latest state once the
    gap has passed; the trials are not even counted for the lines held back."""
    monkeypatch.setattr("covid_tune.search.status.MIN_GAP_SECONDS", 30.0)
    out = io.StringIO()
    status = SweepStatus("val_f1", "max", max_epochs=4, stream=out)
    status.setup(num_samples=100)
    trials = []
    for i in range(50):
        trials.append(trial(f"t{i}", "RUNNING"))
        status.on_trial_start(0, trials, trials[-1])
    assert len(out.getvalue().splitlines()) == 1 and "1 running" in out.getvalue()
    status.on_step_end(0, trials)  # the gap has not passed
    assert len(out.getvalue().splitlines()) == 1
    status.last_time -= 31.0
    status.on_step_end(0, trials)
    status.on_step_end(0, trials)  # nothing new since
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "50 running" in lines[1]


def test_lower_is_better_and_the_loss_shown_where_chosen():
    status = SweepStatus("val_loss", "min", max_epochs=2, stream=io.StringIO())
    status.setup(num_samples=2)
    one = [trial("a", "RUNNING")]
    status.on_trial_result(0, one, one[0], {"val_loss": 0.7, "epoch": 1})
    status.on_trial_result(0, one, one[0], {"val_loss": 0.9, "epoch": 2})
    assert status.best[0] == 0.7
    assert key_params({**CONFIG, "loss": "focal"}) == "resnet18, frozen 11, lr 0.0496, focal"


def test_rays_own_tables_only_with_verbose():
    space = parse_space({"task": "binary", "params": {"backbone": "resnet18"}}, "s.yaml")
    quiet = run_config(space, SweepOptions(space_file="s.yaml", data="d", name="n"), None)
    loud = run_config(space, SweepOptions(space_file="s.yaml", data="d", name="n",
                                          verbose=True), None)
    assert (quiet.verbose, loud.verbose) == (0, 1)
    assert any(isinstance(c, SweepStatus) for c in quiet.callbacks)


def test_nothing_running_is_said_after_a_minute_and_ends_the_sweep_at_the_limit(monkeypatch):
    """Trials left to start and none running: after a minute the line says why; a
    trial running again clears it; at the limit ``Stalled`` ends the sweep."""
    import pytest

    from covid_tune.search import status as status_module
    from covid_tune.errors import Stalled

    clock = [1000.0]
    monkeypatch.setattr(status_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(status_module, "free_resources", lambda: "0 CPU")
    out = io.StringIO()
    status = SweepStatus("val_f1", "max", max_epochs=4, stream=out, stall_limit=600)
    status.setup(num_samples=3, total_num_samples=3)
    waiting = [trial("a", "TERMINATED", 4), trial("b", "PENDING")]
    waiting[1].placement_group_factory = SimpleNamespace(required_resources={"CPU": 1.0})

    def step(seconds, trials):
        clock[0] += seconds
        status.on_step_end(0, trials)
        return out.getvalue().splitlines()

    step(0, waiting)
    assert not any("nothing running" in line for line in step(59, waiting))
    line = step(2, waiting)[-1]
    assert line.endswith("| nothing running for 1min 1s: 1 trial(s) wait for resources: "
                         "each needs 1 CPU, the cluster has 0 CPU free"), line
    step(5, [trial("a", "TERMINATED", 4), trial("b", "RUNNING")])  # it started after all
    assert status.stall == "" and status.idle_since is None
    step(5, waiting)
    with pytest.raises(Stalled, match=r"stalled: nothing ran for 10min .*2 trial\(s\) "
                                           r"were left to start \(1 trial\(s\) wait"):
        for _ in range(700):
            step(1, waiting)
    held = [trial("a", "TERMINATED", 4), trial("b", "RUNNING")]
    assert status_module.stall_reason(held[:1], pending=0) == "the search suggests no new trial"


def test_the_stall_limit_comes_from_the_environment(monkeypatch):
    from covid_tune.search.status import STALL_LIMIT_SECONDS, stall_limit

    monkeypatch.setenv("COVID_TUNE_STALL_LIMIT", "90")
    assert stall_limit() == 90
    for bad in ("soon", "-1", ""):
        monkeypatch.setenv("COVID_TUNE_STALL_LIMIT", bad)
        assert stall_limit() == STALL_LIMIT_SECONDS
