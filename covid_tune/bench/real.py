"""``covid-tune bench --real``: both shipped search spaces, unchanged, through the real
CLI, on phantoms large enough that an epoch takes seconds.

The other parts of ``covid-tune bench`` time one thing each on spaces made for the
purpose. This one runs ``python -m covid_tune sweep`` in a subprocess, as a user
would, once per shipped space (``binary`` on phantoms in the Kaggle layout,
``multilabel`` in the assignment's), overriding only the trial count, the epochs, the
image size, ``--pretrained none`` (nothing to download) and ``--max-concurrent``. With
epochs of several seconds and ASHA stopping trials at its first rung (epoch 2 of the
shipped spaces), it shows what happens around a stop: a stopped trial that goes on
training, an actor Ray cannot re-use, a trial process that dies, a search that stalls.

Per space it reports the trials, those that finished, those ASHA stopped and those
that failed (with the last line of each first failure in ``error.txt``, where Ray puts
the exception), the epochs a trial trained after its stop (the TensorBoard steps a
trial wrote beyond the last epoch Tune recorded for it, ``epochs_after_stop``), the
sweep's stall lines ("nothing running for ...") and exit code, the trial processes that
died and the actors Ray could not re-use (from its output), its wall time, and the
trials' epoch seconds (training and validation, as the trainable times them). A sweep
still running after ``SoakSizes.time_limit_s`` is stopped (SIGTERM, then SIGKILL) and
counted as stalled. The sweep's output is kept in ``<run>.log`` beside its run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import covid_tune
from covid_tune.bench.measure import decode_cache, load_average, machine
from covid_tune.core.space_file import find_space, load_space
from covid_tune.data.synth import generate
from covid_tune.runs.folder import RESULT_FILE
from covid_tune.runs.ray_state import trial_states

STALL_NOTE = "nothing running for"
"""What the sweep's status line says while nothing runs (``covid_tune.search.status``)."""
REUSE_FAILURE = "Could not re-use actor"
"""Ray Tune's log line when a stopped trial's actor is still busy (its training thread
has not ended) and the next trial cannot start on it."""
ABORT = "Fatal Python error"
"""A trial process that died (Python's own line): for instance a stopped trial still
training when the sweep ends and Ray shuts its actors down."""


@dataclass(frozen=True)
class SoakSpace:
    """One shipped space and the phantoms it runs on."""

    name: str
    """The shipped space (``binary``, ``multilabel``), read as ``--space NAME`` reads it."""
    layout: str | None
    """The layout ``covid_tune.data.synth`` writes (``None``: the task's assignment layout)."""
    scale: float
    """Fraction of the assignment's image counts."""


@dataclass(frozen=True)
class SoakSizes:
    """How big the realistic tier is (``REAL``; the tests use none of it)."""

    spaces: tuple[SoakSpace, ...]
    samples: int = 12
    """Trials of each space (``--num-samples``)."""
    max_epochs: int = 4
    """``--max-epochs``: past the shipped spaces' first ASHA rung (grace period 2)."""
    image_size: int = 32
    """``--image-size``, and the side of the phantoms written."""
    max_concurrent: int = 2
    """``--max-concurrent``."""
    time_limit_s: float = 25 * 60
    """A sweep still running after this long is stopped and counted as stalled."""


REAL = SoakSizes(spaces=(SoakSpace("binary", "kaggle-pneumonia", 0.2),
                         SoakSpace("multilabel", None, 0.4)))
"""Calibrated on 2 CPU cores, one torch thread per trial. Many small images rather than
a few larger ones: from random weights, at 64 px and 600 training images 9 of 12 binary
trials still scored F1 0 at epoch 2 (ASHA's rung), level with ASHA's cutoff, so it
stopped none (and one of 12 multilabel trials). 2400 images of 32 px give the same work
per epoch four times the SGD steps: the trials that learn reach F1 0.6 to 0.9 by epoch
2, the others stay at 0, and ASHA stops some. Epochs here: ResNet-18 about 10 s (2.5 s
with every conv layer frozen), VGG-16 16 to 47 s; a median near 11 s."""


def run_soak(json_path: str | None = None, sizes: SoakSizes = REAL,
             out: str | Path = "soak-out") -> dict:
    """Sweep each space of ``sizes`` through the CLI, print a table, write ``json_path``;
    the report dict. Data, runs and logs stay under ``out``."""
    out = Path(out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "sizes": asdict(sizes), "code": str(package_root()), "spaces": {}}
    started = time.perf_counter()
    with decode_cache(out / "cache"):
        for space in sizes.spaces:
            data = make_phantoms(out / "data", space, sizes.image_size)
            report["spaces"][space.name] = soak_space(space, data, out / "runs",
                                                      f"{space.name}-{stamp}", sizes)
    report["wall_seconds"] = time.perf_counter() - started
    report["machine"]["load_after"] = load_average()
    print(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report


def package_root() -> Path:
    """The folder the running ``covid_tune`` package is imported from (a checkout or
    site-packages): the sweep subprocess imports the same code."""
    return Path(covid_tune.__file__).resolve().parent.parent


def make_phantoms(folder: Path, space: SoakSpace, size: int) -> Path:
    """The space's phantoms under ``folder``, written once per (space, scale, size)."""
    root = folder / f"{space.name}-{space.scale:g}-{size}px"
    if not root.is_dir():
        partial = root.with_name(root.name + ".partial")  # left by an interrupted run
        shutil.rmtree(partial, ignore_errors=True)
        generate(partial, load_space(space.name).task, scale=space.scale, size=size, seed=0,
                 progress=False, layout=space.layout)
        partial.rename(root)
    return root


# --- one sweep through the CLI ------------------------------------------------------------


def soak_space(space: SoakSpace, data: Path, runs: Path, name: str,
               sizes: SoakSizes) -> dict:
    """Run the sweep, then read its run folder and its output."""
    space_file = find_space(space.name)
    command = sweep_command(space_file, data, runs, name, sizes)
    log = runs / f"{name}.log"
    print(f"{space.name}: {sizes.samples} trials; output in {log}", flush=True)
    sweep = run_logged(command, log, sizes.time_limit_s)
    figures = {"space_file": str(space_file),
               "space_sha256": hashlib.sha256(space_file.read_bytes()).hexdigest(),
               "data": str(data), "scale": space.scale, "layout": space.layout,
               "command": command, **sweep, **scan_log(log.read_text(errors="replace"),
                                                       sweep["exit_code"])}
    figures.update(read_outcomes(runs / name, sizes.max_epochs))
    figures["stalled"] = bool(figures["stall_lines"] or figures["exit_stalled"]
                              or sweep["timed_out"])
    return figures


def sweep_command(space_file: Path, data: Path, runs: Path, name: str,
                  sizes: SoakSizes) -> list[str]:
    """``python -m covid_tune sweep`` of the space file as shipped; only the size flags."""
    return [sys.executable, "-m", "covid_tune", "sweep", "--space", str(space_file),
            "--data", str(data), "--storage-path", str(runs), "--name", name,
            "--num-samples", str(sizes.samples), "--max-epochs", str(sizes.max_epochs),
            "--image-size", str(sizes.image_size), "--pretrained", "none",
            "--max-concurrent", str(sizes.max_concurrent)]


def run_logged(command: list[str], log: Path, limit_s: float) -> dict:
    """Run ``command`` with its output in ``log``; stop it after ``limit_s`` seconds
    (SIGTERM, which lets the sweep save its state, then SIGKILL to its process group a
    minute later). Exit code, whether it was stopped, wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root()),
                                                       os.environ.get("PYTHONPATH")]))}
    started, timed_out = time.perf_counter(), False
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out, code = True, stop(process)
        except BaseException:  # Ctrl-C: the sweep, in a session of its own, would go on
            stop(process)
            raise
    if timed_out:
        with log.open("a") as sink:
            print(f"covid-tune bench --real: stopped after {limit_s:.0f} s", file=sink)
    return {"log": str(log), "exit_code": code, "timed_out": timed_out,
            "wall_seconds": time.perf_counter() - started}


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL to the process group (Ray's processes too); the exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


# --- reading what the sweep left -------------------------------------------------------------


def scan_log(text: str, exit_code: int | None) -> dict:
    """The sweep's stall lines, whether it ended on a stall (exit 1 saying "stalled"),
    how often Ray could not re-use a stopped trial's actor and how many trial processes
    died."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    stalls = [line for line in lines if STALL_NOTE in line]
    return {"stall_lines": stalls,
            "exit_stalled": exit_code == 1 and any("stalled" in line for line in lines),
            "reuse_failures": sum(REUSE_FAILURE in line for line in lines),
            "trial_processes_aborted": sum(ABORT in line for line in lines)}


@dataclass
class TrialOutcome:
    """How one trial of the sweep ended."""

    trial_id: str
    outcome: str
    """``finished`` (every epoch), ``stopped`` (by ASHA), ``failed``, or ``unfinished``
    (still running or waiting when the sweep ended)."""
    backbone: str | None
    reported: int
    """The last epoch Tune recorded (``result.json``)."""
    logged: int
    """The last epoch the trial wrote to TensorBoard itself (before reporting it)."""
    epoch_seconds: list[float]
    """Training and validation seconds of each reported epoch (the trainable's own)."""
    wall_seconds: list[float]
    """Wall seconds of each reported epoch (``time_this_iter_s``)."""
    error: str | None = None
    """The first failure's exception line in ``error.txt`` (a retried trial may have
    one and still finish)."""

    @property
    def after_stop(self) -> int:
        """Epochs the trial trained and logged after Tune's last result, once it ended;
        a lower bound (an epoch cut off before its TensorBoard write is not seen)."""
        return max(0, self.logged - self.reported) if self.outcome != "unfinished" else 0


def read_outcomes(run_dir: Path, max_epochs: int) -> dict:
    """Counts of the run's trials by outcome, the failed trials' errors, the epochs
    trained after a stop and the epoch seconds (all zero without a run folder)."""
    states = trial_states(str(run_dir)) if run_dir.is_dir() else {}
    folders = {p.name.removeprefix("trial_"): p for p in sorted(run_dir.glob("trial_*"))}
    trials = [read_trial(trial_id, folders.get(trial_id), states.get(trial_id), max_epochs)
              for trial_id in sorted(set(states) | set(folders))]
    counts = Counter(t.outcome for t in trials)
    errors = Counter(t.error or "(no error.txt)" for t in trials if t.outcome == "failed")
    backbones = sorted({t.backbone for t in trials if t.backbone})
    return {"run_dir": str(run_dir), "trials": len(trials),
            **{k: counts[k] for k in ("finished", "stopped", "failed", "unfinished")},
            "errors": dict(errors.most_common()),
            "epochs_after_stop": sum(t.after_stop for t in trials),
            "trials_trained_after_stop": sum(t.after_stop > 0 for t in trials),
            "epoch_seconds": spread([s for t in trials for s in t.epoch_seconds]),
            "epoch_wall_seconds": spread([s for t in trials for s in t.wall_seconds]),
            "epoch_seconds_by_backbone": {
                b: spread([s for t in trials if t.backbone == b for s in t.epoch_seconds])
                for b in backbones},
            "trial_details": [{**asdict(t), "after_stop": t.after_stop} for t in trials]}


def read_trial(trial_id: str, folder: Path | None, state: str | None,
               max_epochs: int) -> TrialOutcome:
    """One trial from its folder (results, error, TensorBoard) and Ray's status in the
    run's snapshot (``None``: not in it; the folder decides)."""
    results = read_results(folder / RESULT_FILE) if folder else []
    reported = max((r["epoch"] for r in results if isinstance(r.get("epoch"), int)),
                   default=0)
    error = first_error(folder / "error.txt") if folder else None
    if state == "ERROR" or (state is None and error is not None):
        outcome = "failed"
    elif state == "TERMINATED" or (state is None and reported):
        outcome = "finished" if reported >= max_epochs else "stopped"
    else:
        outcome = "unfinished"
    config = next((r["config"] for r in results if isinstance(r.get("config"), dict)), {})
    return TrialOutcome(trial_id, outcome, config.get("backbone"), reported,
                        tensorboard_epochs(folder) if folder else 0,
                        numbers(results, "epoch_seconds"), numbers(results, "time_this_iter_s"),
                        error)


def numbers(results: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in results if isinstance(r.get(key), (int, float))]


def read_results(path: Path) -> list[dict]:
    """The results Tune recorded for a trial, one JSON object a line; damaged lines
    (one being written as the sweep was killed) are skipped."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    results = []
    for line in lines:
        with contextlib.suppress(ValueError):
            result = json.loads(line)
            if isinstance(result, dict):
                results.append(result)
    return results


def first_error(path: Path) -> str | None:
    """The exception line of the first failure in a trial's ``error.txt`` (the last
    non-empty line before the next ``Failure #``), or None without one."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    blocks = [b for b in re.split(r"^Failure # \d+.*$", text, flags=re.M) if b.strip()]
    if not blocks:
        return None
    lines = [line.strip() for line in blocks[0].splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def tensorboard_epochs(folder: Path) -> int:
    """The largest step of any scalar the trial wrote to TensorBoard (its epochs)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    if not any(folder.glob("events.out.tfevents.*")):
        return 0
    events = ea.EventAccumulator(str(folder), size_guidance={
        ea.SCALARS: 0, ea.IMAGES: 1, ea.TENSORS: 1, ea.HISTOGRAMS: 1})
    with contextlib.suppress(Exception):  # a file cut off by a kill: keep what was read
        events.Reload()
    return max((e.step for tag in events.Tags().get("scalars", [])
                for e in events.Scalars(tag)), default=0)


def spread(values: list[float]) -> dict:
    """Least, median and greatest of ``values``, and how many (None when empty)."""
    if not values:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


# --- the table ---------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """One row per space, then what went wrong, and the machine."""
    header = (f"{'space':<11}{'trials':>7}{'finished':>9}{'stopped':>8}{'failed':>7}"
              f"{'stalled':>8}{'exit':>5}{'ep. after stop':>15}{'wall s':>8}"
              f"  epoch s min/median/max")
    lines = [header, "-" * (len(header) + 10)]
    for name, s in report["spaces"].items():
        epochs = f"{shown(s['epoch_seconds'])} ({s['epoch_seconds']['n']} epochs)"
        lines.append(f"{name:<11}{s['trials']:>7}{s['finished']:>9}{s['stopped']:>8}"
                     f"{s['failed']:>7}{'yes' if s['stalled'] else 'no':>8}"
                     f"{exit_shown(s):>5}{s['epochs_after_stop']:>15}"
                     f"{s['wall_seconds']:>8.0f}  {epochs}")
    return "\n".join(lines + table_notes(report))


def shown(seconds: dict) -> str:
    """``min / median / max`` of a ``spread``, or ``-``."""
    if not seconds["n"]:
        return "-"
    return f"{seconds['min']:.1f} / {seconds['median']:.1f} / {seconds['max']:.1f}"


def exit_shown(space: dict) -> str:
    return "kill" if space["timed_out"] else str(space["exit_code"])


def table_notes(report: dict) -> list[str]:
    notes = []
    for name, s in report["spaces"].items():
        for error, count in s["errors"].items():
            notes.append(f"{name}: {count} failed: {error}")
        if s["reuse_failures"]:
            notes.append(f"{name}: Ray could not re-use a stopped trial's actor "
                         f"{s['reuse_failures']} time(s)")
        if s["trial_processes_aborted"]:
            notes.append(f"{name}: {s['trial_processes_aborted']} trial process(es) died "
                         f"(\"{ABORT}\" in the log)")
        if s["trials"] < report["sizes"]["samples"]:
            notes.append(f"{name}: {s['trials']} of {report['sizes']['samples']} trials "
                         f"started")
        if s["stall_lines"]:
            notes.append(f"{name}: {len(s['stall_lines'])} stall line(s), the first: "
                         f"{s['stall_lines'][0][:200]}")
        if s["timed_out"]:
            notes.append(f"{name}: still running after {report['sizes']['time_limit_s']:.0f} s;"
                         f" stopped (exit code {s['exit_code']}; -9: SIGTERM did not end it "
                         f"within a minute)")
        if s["unfinished"]:
            notes.append(f"{name}: {s['unfinished']} trial(s) unfinished when the sweep ended")
        by = ", ".join(f"{b} {v['median']:.1f} s" for b, v in
                       s["epoch_seconds_by_backbone"].items() if v["n"])
        notes.append(f"{name}: median epoch by backbone: {by or '-'}; wall s per epoch "
                     f"(time_this_iter_s) {shown(s['epoch_wall_seconds'])}; "
                     f"{s['trials_trained_after_stop']} trial(s) trained after their stop; "
                     f"log {s['log']}")
    notes.append("machine: {cpus} CPUs ({cpu}), torch {torch}, device {device}; load average "
                 "{load_before} before, {load_after} after".format(**report["machine"]))
    notes.append(f"total wall time {report['wall_seconds']:.0f} s; code from {report['code']}")
    return notes
