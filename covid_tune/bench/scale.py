"""``covid-tune bench``'s scale parts: what a sweep costs the driver as trials grow.

- ``driver``: the real searcher (``search.searcher.build_searcher``: TPE in ``SweepSearch``,
  the study persisted to ``optuna.db``) and the real scheduler (``search.sweep.build_scheduler``:
  ASHA) driven directly with simulated trials: no Ray, no training. Each simulated
  trial reports one score per epoch, drawn from its configuration plus noise, until ASHA
  stops it or it reaches ``max_epochs``. The bench times every call the driver makes
  (suggest, result, complete) and reports milliseconds per trial in windows of trials,
  so growth with the study's size shows.
- ``cluster``: a ``ray.cluster_utils.Cluster`` of several nodes advertising fake GPUs,
  and the real ``run_sweep`` with a stand-in trainable that only reports (it lives here,
  never in the user's path): trials per minute the driver sustains and its CPU share.

Nothing here trains a model.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from covid_tune.core.space import SearchSpace
from covid_tune.core.space_file import parse_space
from covid_tune.runs.folder import STUDY_FILE

SIM_SPACE = {
    "task": "binary", "metric": "val_f1", "mode": "max", "max_epochs": 9,
    "image_size": 64, "pretrained": "none", "num_samples": 1000,
    "asha": {"grace_period": 1, "reduction_factor": 3},
    "params": {
        "backbone": {"choices": ["vgg16", "resnet18"]},
        "frozen_layers": {"vgg16": {"low": 0, "high": 13}, "resnet18": {"low": 0, "high": 20}},
        "lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
        "momentum": {"low": 0.3, "high": 0.95},
        "batch_size": {"choices": [16, 32, 64]},
        "weight_decay": {"low": 1.0e-6, "high": 1.0e-3, "log": True},
        "hidden": {"low": 128, "high": 2048, "log": True},
        "dropout": {"low": 0.0, "high": 0.6},
    },
}
"""The shipped ``binary.yaml``'s search space, for 1000 trials with ASHA at every epoch."""


def sim_space(trials: int) -> SearchSpace:
    return parse_space({**SIM_SPACE, "num_samples": trials}, "bench-driver.yaml")


def quality(config: dict) -> float:
    """A smooth made-up score of a configuration, best near lr 3e-3 and momentum 0.9."""
    lr = math.log10(config["lr"]) + 2.5
    return 0.9 - 0.15 * lr * lr - 0.2 * (config["momentum"] - 0.9) ** 2 \
        - 0.01 * config.get("dropout", 0)


def simulate_driver(trials: int, concurrency: int, folder: Path, window: int = 100,
                    seed: int = 0) -> dict:
    """Drive ``trials`` simulated trials, ``concurrency`` at a time, through the real
    searcher and scheduler; the driver's milliseconds per trial in each ``window``."""
    from ray.tune.schedulers import TrialScheduler

    from covid_tune.search.searcher import build_searcher, study_as_sqlite
    from covid_tune.search.sweep import build_scheduler

    space = sim_space(trials)
    folder.mkdir(parents=True, exist_ok=True)
    study_file = str(folder / STUDY_FILE)
    searcher = build_searcher(space, study_file, "sim", seed, None)
    scheduler = build_scheduler(space, searcher)
    rng = np.random.default_rng(seed)
    running: dict[str, tuple[SimpleNamespace, dict, float, int]] = {}
    costs = {"suggest": [], "result": [], "complete": []}
    per_trial: dict[str, float] = {}
    started, done, made = time.perf_counter(), [], 0
    while len(done) < trials:
        while len(running) < concurrency and made < trials:
            trial_id = f"t{made:05d}"
            tick = time.perf_counter()
            config = searcher.suggest(trial_id)
            if config is None:  # TPE's start-up hold: wait for a running trial
                break
            trial = SimpleNamespace(trial_id=trial_id, config=config, status="PENDING",
                                    TERMINATED="TERMINATED", latest_checkpoint_result=None,
                                    is_finished=lambda: False)
            scheduler.on_trial_add(None, trial)
            spent = time.perf_counter() - tick
            costs["suggest"].append(spent)
            per_trial[trial_id] = spent
            running[trial_id] = (trial, config, quality(config), 0)
            made += 1
        trial_id = next(iter(running))  # round robin: the longest-waiting trial reports
        trial, config, mean, epoch = running.pop(trial_id)
        epoch += 1
        result = {"epoch": epoch, "training_iteration": epoch, "trial_id": trial_id,
                  "val_f1": float(mean - 0.3 / epoch + rng.normal(0, 0.02))}
        tick = time.perf_counter()
        decision = scheduler.on_trial_result(None, trial, result)
        searcher.on_trial_result(trial_id, result)
        spent = time.perf_counter() - tick
        costs["result"].append(spent)
        per_trial[trial_id] += spent
        if decision == TrialScheduler.STOP or epoch >= space.max_epochs:
            tick = time.perf_counter()
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial_id, result)
            spent = time.perf_counter() - tick
            costs["complete"].append(spent)
            per_trial[trial_id] += spent
            done.append(trial_id)
        else:
            running[trial_id] = (trial, config, mean, epoch)
    wall = time.perf_counter() - started
    tick = time.perf_counter()  # what the plain way paid per completion by now: a full copy
    study_as_sqlite(searcher.study)
    plain = time.perf_counter() - tick
    windows = []
    for start in range(0, trials, window):
        part = done[start:start + window]
        completes = costs["complete"][start:start + window]
        windows.append({"trials": f"{start + 1}-{start + len(part)}",
                        "ms_per_trial": 1000 * statistics.mean(per_trial[t] for t in part),
                        "ms_per_completion": 1000 * statistics.mean(completes)})
    return {"trials": trials, "concurrency": concurrency, "wall_seconds": wall,
            "windows": windows,
            "ms_per_trial_last_window": windows[-1]["ms_per_trial"],
            "ms_per_completion_last_window": windows[-1]["ms_per_completion"],
            "suggest_ms_last_window": 1000 * statistics.mean(
                costs["suggest"][-window:]),
            "plain_ms_per_completion_at_end": 1000 * plain,
            "study_bytes": Path(study_file).stat().st_size
            if Path(study_file).is_file() else 0}




# --- a simulated big cluster: fake GPUs, the real sweep, a stand-in trainable ----------

EPOCH_SECONDS = 0.5
"""How long the stand-in trainable waits between its reports: an 'epoch'."""


def stand_in(config: dict, data=None) -> None:
    """A trial that only reports: one made-up score per epoch, ``EPOCH_SECONDS`` apart,
    no model, no checkpoint. For the bench only; never a user's trainable."""
    from ray import tune

    rng = np.random.default_rng(config.get("seed", 0))
    mean = quality(config)
    for epoch in range(1, int(config["max_epochs"]) + 1):
        time.sleep(EPOCH_SECONDS)
        score = float(mean - 0.3 / epoch + rng.normal(0, 0.02))
        tune.report({"epoch": epoch, "val_f1": score, "val_loss": 1 - score,
                     "train_loss": 1 - score, "epoch_seconds": EPOCH_SECONDS})


def measure_cluster(work: Path, runs: tuple[tuple[int, int], ...], nodes: int = 4,
                    gpus_per_node: int = 8, gpus_per_trial: float = 0.25,
                    max_epochs: int = 3) -> dict:
    """Start a ``Cluster`` of ``nodes`` nodes advertising ``gpus_per_node`` fake GPUs
    each, then for each (trials, concurrency) of ``runs`` sweep with the real
    ``run_sweep`` and the stand-in trainable: trials per minute and the driver's CPU
    share (this process's CPU seconds over the sweep's wall seconds)."""
    import ray
    from ray.cluster_utils import Cluster

    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep
    from covid_tune.data.synth import generate

    work.mkdir(parents=True, exist_ok=True)
    data = work / "cluster-data"
    generate(data, "binary", scale=0.002, size=32, seed=0, progress=False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
        "_system_config": {"metrics_report_interval_ms": 10_000}})
    per_node_cpus = int(gpus_per_node / gpus_per_trial)
    for _ in range(nodes):
        cluster.add_node(num_cpus=per_node_cpus, num_gpus=gpus_per_node)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    figures = []
    try:
        for trials, concurrency in runs:
            space = work / f"cluster-{trials}-{concurrency}.yaml"
            space.write_text(_space_text(trials, max_epochs))
            cpu, wall = time.process_time(), time.perf_counter()
            results = run_sweep(SweepOptions(
                space_file=str(space), data=str(data), name=f"cluster-{trials}-{concurrency}",
                storage_path=str(work / "runs"), cpus_per_trial=1.0,
                gpus_per_trial=gpus_per_trial, max_concurrent=concurrency,
                keep_checkpoints=1), trainable=stand_in)
            wall = time.perf_counter() - wall
            cpu = time.process_time() - cpu
            figures.append({
                "trials": trials, "concurrency": concurrency, "finished": len(results),
                "errors": sum(1 for r in results if r.error), "wall_seconds": wall,
                "trials_per_minute": 60 * len(results) / wall,
                "driver_cpu_share": cpu / wall,
                "ideal_trials_per_minute": 60 * concurrency / (max_epochs * EPOCH_SECONDS)})
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpus_per_trial": gpus_per_trial,
            "slots": int(nodes * gpus_per_node / gpus_per_trial), "max_epochs": max_epochs,
            "epoch_seconds": EPOCH_SECONDS, "runs": figures}


def _space_text(trials: int, max_epochs: int) -> str:
    import yaml

    doc = {**SIM_SPACE, "num_samples": trials, "max_epochs": max_epochs, "image_size": 32,
           "augment": False}
    return yaml.safe_dump(doc, sort_keys=False)


# --- checkpoint bytes: what a trial writes per epoch and keeps at its end --------------

CHECKPOINT_ROWS = (("vgg16", 13), ("vgg16", 7), ("vgg16", 0), ("resnet18", 20),
                   ("resnet18", 0))
"""The assignment's rows: all but the head frozen, part frozen, nothing frozen."""


def measure_checkpoints(work: Path, hidden: int = 256, image_size: int = 64,
                        rows_of: tuple[tuple[str, int], ...] = CHECKPOINT_ROWS) -> dict:
    """For each row of ``CHECKPOINT_ROWS``, started from a local pretrained file (a
    torchvision state dict the bench writes) with SGD momentum: the bytes of a running
    trial's checkpoint (``train.write_checkpoint``) and of what a finished trial keeps
    (the same folder without ``optimizer.pt``), over the trainable parameters' bytes.
    The plain way, for comparison: every tensor and the whole optimizer state each
    epoch (``torch.save`` of both state dicts), two such folders kept per trial."""
    import torch
    from torchvision import models as tv

    from covid_tune.core.space import PARAM_DEFAULTS, TrialConfig
    from covid_tune.nn.weights import Base, build_for
    from covid_tune.runs.checkpoint import OPTIMIZER_FILE
    from covid_tune.training.trial import build_optimizer, write_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for backbone, frozen in rows_of:
        weights = work / f"{backbone}-pretrained.pth"
        if not weights.exists():
            torch.save(getattr(tv, backbone)(weights=None).state_dict(), weights)
        cfg = TrialConfig.from_dict({**PARAM_DEFAULTS, "task": "binary", "loss": "ce",
                                     "backbone": backbone, "frozen_layers": frozen,
                                     "hidden": hidden, "lr": 0.01, "momentum": 0.9,
                                     "image_size": image_size, "max_epochs": 1,
                                     "pretrained": str(weights), "metric": "val_f1",
                                     "mode": "max"})
        torch.manual_seed(cfg.seed)
        model = build_for(cfg, cfg.pretrained)
        base = Base.of(model, cfg)
        optimizer = build_optimizer(model, cfg)
        model.train()(torch.randn(2, 3, image_size, image_size)).sum().backward()
        optimizer.step()
        trainable = sum(p.numel() * p.element_size() for p in model.parameters()
                        if p.requires_grad)
        folder = work / f"ckpt-{backbone}-{frozen}"
        folder.mkdir()
        write_checkpoint(folder, model, optimizer, 1, cfg, {"val_f1": 0.5}, base=base)
        written = sum(f.stat().st_size for f in folder.iterdir())
        kept = written - (folder / OPTIMIZER_FILE).stat().st_size
        plain = work / f"plain-{backbone}-{frozen}.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, plain)
        plain_bytes = plain.stat().st_size
        rows.append({"backbone": backbone, "frozen_layers": frozen,
                     "trainable_bytes": trainable, "written_bytes": written,
                     "kept_bytes": kept, "plain_written_bytes": plain_bytes,
                     "plain_kept_bytes": 2 * plain_bytes,
                     "write_ratio": written / trainable, "kept_ratio": kept / trainable,
                     "plain_write_ratio": plain_bytes / trainable,
                     "plain_kept_ratio": 2 * plain_bytes / trainable})
    return {"hidden": hidden, "rows": rows,
            "checkpoint_write_ratio": max(r["write_ratio"] for r in rows),
            "kept_bytes_per_trial_ratio": max(r["kept_ratio"] for r in rows),
            "plain_write_ratio": max(r["plain_write_ratio"] for r in rows),
            "plain_kept_ratio": max(r["plain_kept_ratio"] for r in rows)}


# --- the scale parts of ``covid-tune bench`` --------------------------------------------

@dataclass(frozen=True)
class ScaleSizes:
    """How much work each scale part does (``SCALE_QUICK``, ``SCALE_FULL``, ``SCALE_TINY``)."""

    driver_trials: int
    """Simulated trials driven through the searcher and scheduler (the key is named
    after 1000)."""
    driver_concurrency: int
    cluster_runs: tuple[tuple[int, int], ...]
    """(trials, concurrency) of each stand-in sweep on the fake-GPU cluster."""
    cluster_nodes: int = 4
    checkpoint_rows: tuple[tuple[str, int], ...] = CHECKPOINT_ROWS


SCALE_QUICK = ScaleSizes(driver_trials=1000, driver_concurrency=32,
                         cluster_runs=((10, 32), (100, 8), (100, 128)))
SCALE_FULL = ScaleSizes(driver_trials=1000, driver_concurrency=128,
                        cluster_runs=((10, 128), (100, 128), (1000, 128), (300, 8), (300, 32)))
SCALE_TINY = ScaleSizes(driver_trials=20, driver_concurrency=4, cluster_runs=(),
                        checkpoint_rows=(("resnet18", 20),))
"""For the test suite: no cluster (the session's Ray is already up), one small model."""


def measure_scale(work: Path, sizes: ScaleSizes) -> dict:
    """The driver, checkpoint and cluster parts; the figures the bench's JSON holds."""
    driver = simulate_driver(sizes.driver_trials, sizes.driver_concurrency, work / "driver")
    checkpoints = measure_checkpoints(work / "checkpoints", rows_of=sizes.checkpoint_rows)
    report = {"driver": driver, "checkpoints": checkpoints,
              f"driver_ms_per_trial_{sizes.driver_trials}":
                  driver["ms_per_completion_last_window"],
              "checkpoint_write_ratio": checkpoints["checkpoint_write_ratio"],
              "kept_bytes_per_trial_ratio": checkpoints["kept_bytes_per_trial_ratio"]}
    if sizes.cluster_runs:
        report["cluster"] = measure_cluster(work / "cluster", sizes.cluster_runs,
                                            nodes=sizes.cluster_nodes)
    return report
