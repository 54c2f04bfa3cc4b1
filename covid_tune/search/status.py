"""The sweep's console: one compact status line whenever something changes.

``SweepStatus`` is a Ray Tune callback. It replaces Ray's per-trial tables (which
``covid-tune sweep --verbose`` brings back) with lines such as::

    [1min 5s] 2 running, 1 stopped early, 3 finished, 0 failed, 2 to start (of 8) | best
    val_f1 0.9600: resnet18, frozen 11, lr 0.0496 (trial 4fceb224, epoch 4) | about 1min
    10s left

A line is printed when a trial starts or ends and when the best so far improves, at
most one every ``MIN_GAP_SECONDS`` (news that came sooner is printed once the gap has
passed, so a 1000-trial sweep prints a readable trickle, not a line per event, and the
trials are counted only when a line is due), and at least once a minute while nothing
changes. The time left is the time per ended trial
so far times the trials still to end: rough, and said to be.

It also watches for a stall: nothing running while trials are left to start. After a
minute (or half the limit, if that is shorter) the line says so and why (trials wait
for resources the cluster does not have free, or the search suggests nothing); after
``stall_limit`` seconds (``COVID_TUNE_STALL_LIMIT``, 15 minutes unless set) it raises
``covid_tune.errors.Stalled``, which ends the sweep with exit code 1 and the resume command
(``covid_tune.search.sweep.fit``). The trials are counted for this every
``STALL_CHECK_SECONDS`` at most.
"""

from __future__ import annotations

import math
import os
import sys
import time

from ray import tune

from covid_tune.errors import Stalled
from covid_tune.core.units import duration
from covid_tune.core.ranking import better
from covid_tune.core.tasks import MULTILABEL

HEARTBEAT_SECONDS = 60.0
MIN_GAP_SECONDS = 2.0
STALL_NOTE_SECONDS = 60.0
STALL_CHECK_SECONDS = 2.0
STALL_LIMIT_SECONDS = 900.0
"""A sweep with nothing running for this long while trials are left to start ends
(exit 1); ``COVID_TUNE_STALL_LIMIT`` (seconds) sets another limit."""


def stall_limit() -> float:
    """``COVID_TUNE_STALL_LIMIT`` in seconds, else ``STALL_LIMIT_SECONDS``."""
    raw = os.environ.get("COVID_TUNE_STALL_LIMIT", "")
    try:
        value = float(raw)
    except ValueError:
        return STALL_LIMIT_SECONDS
    return value if value > 0 else STALL_LIMIT_SECONDS


class SweepStatus(tune.Callback):
    """Counts of trials by state, the best result so far and an estimate of the rest."""

    def __init__(self, metric: str, mode: str, max_epochs: int, stream=None,
                 stall_limit: float | None = None):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.stream = stream
        self.stall_limit = stall_limit
        """Seconds with nothing running before the sweep ends (None: ``stall_limit()``
        when the sweep starts)."""
        self.idle_since: float | None = None
        """When the sweep last went from running something to running nothing."""
        self.last_check = -math.inf
        self.stall = ""
        """Why nothing runs, once that has lasted the note's time; else ''."""
        self.started = time.monotonic()
        self.total: int | None = None
        self.best: tuple[float, str, int, dict] | None = None
        self.last_line, self.last_time = "", -math.inf
        self.news = False
        """Something changed since the last line was printed."""

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self.started = time.monotonic()  # a resumed sweep counts from its own start
        self.total = total_num_samples or num_samples
        if self.stall_limit is None:
            self.stall_limit = stall_limit()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if self.improves(value):
            self.best = (float(value), trial.trial_id, int(result.get("epoch", 0)),
                         trial.config)
            self.show(trials)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.show(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.show(trials)

    def on_step_end(self, iteration, trials, **info) -> None:
        self.watch_for_stall(trials)
        since = time.monotonic() - self.last_time
        if since >= HEARTBEAT_SECONDS:
            self.show(trials, always=True)
        elif self.news and since >= MIN_GAP_SECONDS:
            self.show(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self.show(trials, always=True)

    def watch_for_stall(self, trials) -> None:
        """Note a stall on the line after ``STALL_NOTE_SECONDS`` (or half the limit);
        raise ``Stalled`` after the limit."""
        now = time.monotonic()
        if now - self.last_check < STALL_CHECK_SECONDS:
            return
        self.last_check = now
        counts = self.counts(trials)
        waiting = max(self.total or 0, len(trials)) - len(trials) + counts["pending"]
        if counts["running"] or not waiting:
            self.idle_since, self.stall = None, ""
            return
        self.idle_since = self.idle_since or now
        idle = now - self.idle_since
        limit = self.stall_limit or STALL_LIMIT_SECONDS
        if idle >= min(STALL_NOTE_SECONDS, limit / 2) and not self.stall:
            self.stall = stall_reason(trials, counts["pending"])
            self.news = True
        if idle >= limit:
            self.show(trials, always=True)
            raise Stalled(f"stalled: nothing ran for {duration(idle)} while {waiting} "
                               f"trial(s) were left to start ({self.stall}); the limit is "
                               f"{duration(limit)} (COVID_TUNE_STALL_LIMIT, in seconds)")

    def improves(self, value) -> bool:
        """Whether ``value`` is a number better than the best so far (``core.ranking``)."""
        return better(value, math.nan if self.best is None else self.best[0], self.mode)

    def show(self, trials, always: bool = False) -> None:
        """Print the line if more than its clock changed (or ``always``), and if the
        last line is ``MIN_GAP_SECONDS`` old; else keep the news for ``on_step_end``."""
        if not always and time.monotonic() - self.last_time < MIN_GAP_SECONDS:
            self.news = True
            return
        line = self.line(trials)
        news = line.split("] ", 1)[1]
        self.news = False
        if always or news != self.last_line:
            print(line, file=self.stream or sys.stdout, flush=True)
            self.last_line, self.last_time = news, time.monotonic()

    def line(self, trials) -> str:
        """The status line for these trials, now."""
        counts = self.counts(trials)
        total = max(self.total or 0, len(trials))
        waiting = total - len(trials) + counts["pending"]
        elapsed = time.monotonic() - self.started
        parts = [f"[{duration(elapsed)}] {counts['running']} running, "
                 f"{counts['stopped']} stopped early, {counts['finished']} finished, "
                 f"{counts['failed']} failed, {waiting} to start (of {total})"]
        if self.best is not None:
            value, trial_id, epoch, config = self.best
            parts.append(f"best {self.metric} {value:.4f}: {key_params(config)} "
                         f"(trial {trial_id}, epoch {epoch})")
        ended = counts["stopped"] + counts["finished"] + counts["failed"]
        if self.stall and self.idle_since is not None:
            parts.append(f"nothing running for {duration(time.monotonic() - self.idle_since)}: "
                         f"{self.stall}")
        elif 0 < ended < total:
            parts.append(f"about {duration(elapsed / ended * (total - ended))} left")
        return " | ".join(parts)

    def counts(self, trials) -> dict[str, int]:
        counts = dict.fromkeys(("running", "pending", "stopped", "finished", "failed"), 0)
        for trial in trials:
            if trial.status == "RUNNING":
                counts["running"] += 1
            elif trial.status == "ERROR":
                counts["failed"] += 1
            elif trial.status == "TERMINATED":
                epoch = (trial.last_result or {}).get("epoch", 0)  # none: never ran
                counts["finished" if epoch >= self.max_epochs else "stopped"] += 1
            else:
                counts["pending"] += 1
        return counts


def key_params(config: dict) -> str:
    """``resnet18, frozen 11, lr 0.0496`` (and the loss where there is a choice)."""
    words = [str(config.get("backbone", "?")), f"frozen {config.get('frozen_layers', '?')}"]
    if isinstance(config.get("lr"), float):
        words.append(f"lr {config['lr']:.3g}")
    if config.get("loss") in MULTILABEL.losses:
        words.append(config["loss"])
    return ", ".join(words)



def stall_reason(trials, pending: int) -> str:
    """Why nothing runs: trials wait for resources (what one needs, what is free), or
    the search suggests no trial."""
    if not pending:
        return "the search suggests no new trial"
    waiting = next(t for t in trials if t.status not in ("RUNNING", "ERROR", "TERMINATED"))
    try:
        need = waiting.placement_group_factory.required_resources
    except AttributeError:
        need = {}
    wants = ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()) if v) or "resources"
    return (f"{pending} trial(s) wait for resources: each needs {wants}, the cluster has "
            f"{free_resources()} free")


def free_resources() -> str:
    """The cluster's free CPUs and GPUs, in words ('?' when Ray cannot say)."""
    try:
        import ray

        free = ray.available_resources()
    except Exception:  # Ray not started, or its GCS not answering
        return "?"
    gpus = f", {free['GPU']:g} GPU" if "GPU" in free else ""
    return f"{free.get('CPU', 0):g} CPU{gpus}"
