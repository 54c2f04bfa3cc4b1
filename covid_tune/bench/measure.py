"""``covid-tune bench``: measure the fast paths against the plain ones, on this machine.

Three ratios of two measurements taken in the same run, then the scale parts
(``covid_tune.bench.scale``: the driver's cost per trial at 1000 trials, checkpoint
bytes, a simulated big cluster):

- ``loader_speedup``: images/s delivered to the model by covid-tune's path (a slice of
  the decoded uint8 cache, augmented as a batch on the device by
  :func:`covid_tune.nn.augment.to_model_input`) over images/s of the assignment's path
  (torchvision ``ImageFolder`` + PIL RandomRotation / RandomResizedCrop / flip +
  ToTensor / Normalize in a ``DataLoader`` with one worker per core). Both deliver
  ``[B, 3, 224, 224]`` float batches, from 1024 px PNGs and from 2048 px JPEGs
  (``LOADER_SOURCES``), taking turns over five repeats; the lower of the two median
  ratios counts. Building the cache is a one-off cost, reported apart.
- ``sweep_overhead``: wall seconds per epoch of a trial inside a Ray Tune sweep (Tune's
  ``time_this_iter_s``, the time between two reports: training, validation,
  checkpoint and report) over wall seconds per epoch of the same phase functions run
  bare (:func:`bare_epochs`), one torch thread each, at epochs of 20 s or more on a
  2-core CPU (``sweep_epoch_seconds``); both are means over the timed epochs, since a
  trial publishes each epoch while the next trains and only their sum is a wall time.
  ``sweep_outside_loop_seconds`` is what each epoch costs outside the training loop.
  The ratio of the trainable's own ``epoch_seconds`` (training and validation only) is
  reported too, as ``sweep_overhead_in_loop``.
- ``search_epochs_ratio``: epochs ASHA + TPE spends until a trial first reaches the best
  validation F1 of a grid like the assignment's (six backbone / frozen-layer rows, each
  run to the full epoch count), over the grid's epochs. Epochs are counted in the order
  results arrived; results in the same second as the match all count as spent.

Loader timings are medians over repeats; the first epoch of every training run is a warm-up
and is not timed. Everything runs on a GPU when there is one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from covid_tune.nn.augment import to_model_input
from covid_tune.bench.scale import SCALE_FULL, SCALE_QUICK, ScaleSizes, measure_scale
from covid_tune.core.space import PARAM_DEFAULTS, Augment, TrialConfig
from covid_tune.core.space_file import dump_space, load_space, parse_space
from covid_tune.data.dataset import Split, load_dataset
from covid_tune.nn.device import Device
from covid_tune.data.preprocess import MEAN, STD
from covid_tune.data.synth import generate
from covid_tune.training.trial import (batches, build_training, choose_thresholds,
                                      epoch_metrics, evaluate, to_device, train_one_epoch)
from covid_tune.core.tasks import TASKS

AUGMENT = {"rotation": 10.0, "scale": [0.8, 1.0], "ratio": [0.9, 1.1], "flip": True}
"""Training augmentation of every benchmark sweep (as the demo's)."""
RECIPE = {"lr": 0.01, "momentum": 0.9, "batch_size": 32, "hidden": 128, "dropout": 0.5}
"""The hand grid's fixed optimiser and head settings (the demo's start rows)."""
GRID_ROWS = (("vgg16", 13), ("vgg16", 7), ("vgg16", 4), ("vgg16", 0),
             ("resnet18", 20), ("resnet18", 0))
"""The assignment's six Part 1 rows: backbone and frozen conv layers."""
SEARCH_PARAMS = {
    "backbone": {"choices": ["vgg16", "resnet18"]},
    "frozen_layers": {"vgg16": {"low": 0, "high": 13}, "resnet18": {"low": 0, "high": 20}},
    "lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True},
    "momentum": {"low": 0.5, "high": 0.95},
    "batch_size": {"choices": [16, 32]},
    "hidden": {"choices": [64, 128, 256]},
    "dropout": {"low": 0.0, "high": 0.5},
}
"""What ASHA + TPE may try; the grid's rows lie inside it. No ``start_with``: the search
does not start from the grid's rows."""
LOADER_SOURCES = (("png", 1024), ("jpeg", 2048))
"""The kinds of source files the loaders read, as the public collections hold them:
1024 px PNGs and 2048 px JPEGs (``BenchSizes.loader_scale`` sets how many)."""


SCALE_TARGETS = {"driver_ms_per_trial_1000": ("<=", 50.0), "checkpoint_write_ratio": ("<=", 2.2)}
TARGETS = {"loader_speedup": (">=", 10.0), "sweep_overhead": ("<=", 1.05),
           "search_epochs_ratio": ("<=", 1 / 3)}


@dataclass(frozen=True)
class BenchSizes:
    """How much work each measurement does (see ``QUICK``, ``FULL`` and ``TINY``)."""

    loader_scale: float
    """Fraction of the assignment's image counts generated for the loader comparison."""
    overhead_scale: float
    """Fraction of the counts for the sweep-overhead dataset."""
    overhead_size: int
    """Image side (px) of the sweep-overhead runs."""
    overhead_epochs: int
    """Epochs of each overhead run; the first is a warm-up, the rest are timed."""
    search_scale: float
    """Fraction of the counts for the grid-versus-search dataset."""
    search_size: int
    """Image side (px) of the grid and the search."""
    search_epochs: int
    """The grid's full epoch count, and ASHA's largest."""
    search_samples: int
    """Trials ASHA + TPE may start."""
    loader_sources: tuple[tuple[str, int], ...] = LOADER_SOURCES
    """(kind, side in px) of the source files the loaders read."""
    loader_out: int = 224
    """Side (px) of the images both loaders deliver."""
    loader_seconds: float = 1.0
    """Least seconds of whole epochs in each timed loader repeat."""
    repeats: int = 5
    """Timed repeats of each loader, taking turns; the median counts."""
    batch_size: int = 32
    """Images per batch of both loaders."""
    overhead_backbone: str = "resnet18"
    """The model of the sweep-overhead runs."""
    grid_rows: int = len(GRID_ROWS)
    """How many of the assignment's grid rows the grid runs (all but in the tests)."""

    def __post_init__(self):
        if self.overhead_epochs < 2 or self.repeats < 1 or self.search_epochs < 1:
            raise ValueError("need overhead_epochs >= 2, repeats >= 1, search_epochs >= 1")


QUICK = BenchSizes(loader_scale=0.02, overhead_scale=0.022, overhead_size=224,
                   overhead_epochs=5, search_scale=0.02, search_size=32, search_epochs=6,
                   search_samples=16)
"""Minutes on 2 CPU cores."""
FULL = BenchSizes(loader_scale=0.1, overhead_scale=0.1, overhead_size=224,
                  overhead_epochs=6, search_scale=0.1, search_size=96, search_epochs=15,
                  search_samples=30, loader_seconds=3.0, repeats=5)
"""For a GPU machine: larger images and the assignment's 15 epochs."""
TINY = BenchSizes(loader_scale=0.004, overhead_scale=0.004, overhead_size=32,
                  overhead_epochs=2, search_scale=0.004, search_size=32, search_epochs=1,
                  search_samples=2, loader_sources=(("png", 64), ("jpeg", 96)),
                  loader_out=32, loader_seconds=0.0,
                  repeats=1, grid_rows=1)
"""For the test suite: checks that everything runs, measures nothing useful."""


def run_bench(quick: bool = False, json_path: str | None = None,
              sizes: BenchSizes | None = None, scale_sizes: ScaleSizes | None = None) -> dict:
    """Measure the three ratios, print a table, write ``json_path``; the report dict."""
    sizes = sizes or (QUICK if quick else FULL)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "sizes": asdict(sizes)}
    with tempfile.TemporaryDirectory(prefix="covid-tune-bench-") as folder, \
            decode_cache(Path(folder) / "cache"):
        work = Path(folder)
        report["loader"] = timed(measure_loader, work, sizes)
        with ray_session():
            report["overhead"] = timed(measure_overhead, work, sizes)
            report["search"] = timed(measure_search, work, sizes)
        started = time.perf_counter()  # after Ray: the cluster part starts its own
        report.update(measure_scale(work / "scale", scale_sizes or (
            SCALE_QUICK if quick else SCALE_FULL)))
        report["scale_seconds"] = time.perf_counter() - started
    report["machine"]["load_after"] = load_average()
    report["loader_speedup"] = report["loader"]["speedup"]
    report["sweep_overhead"] = report["overhead"]["ratio"]
    report["sweep_overhead_in_loop"] = report["overhead"]["ratio_in_loop"]
    report["sweep_epoch_seconds"] = report["overhead"]["bare_seconds"]
    report["sweep_outside_loop_seconds"] = report["overhead"]["sweep_outside_loop_seconds"]
    report["search_epochs_ratio"] = report["search"]["ratio"]
    print(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report


def timed(measure, work: Path, sizes: BenchSizes) -> dict:
    """``measure(work, sizes)`` with the wall seconds it took added as ``part_seconds``."""
    started = time.perf_counter()
    figures = measure(work, sizes)
    return {**figures, "part_seconds": time.perf_counter() - started}


def machine() -> dict:
    """What the figures were measured on."""
    device = Device.pick().torch
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else cpu_name()
    return {"cpus": os.cpu_count(), "cpu": cpu_name(), "torch": torch.__version__,
            "device": device.type, "device_name": name, "python": platform.python_version(),
            "load_before": load_average()}


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every timing."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def decode_cache(folder: Path):
    """Point the decode cache at ``folder`` for the duration (generated data only)."""
    before = os.environ.get("COVID_TUNE_CACHE")
    os.environ["COVID_TUNE_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COVID_TUNE_CACHE", None)
        else:
            os.environ["COVID_TUNE_CACHE"] = before


@contextlib.contextmanager
def ray_session():
    """Use the Ray this process is connected to, else start a private one on this
    machine for the duration (``address="local"``: never join another user's cluster
    that happens to run here, whose load would skew the timings)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def make_data(work: Path, name: str, scale: float, size: int) -> Path:
    """Generate a binary phantom dataset under ``work/name``."""
    root = work / name
    generate(root, "binary", scale=scale, size=size, seed=0, progress=False)
    return root


# --- loader: decoded cache + batched augmentation vs ImageFolder + PIL -------------------


def measure_loader(work: Path, sizes: BenchSizes) -> dict:
    """Both loaders on each kind of source (``LOADER_SOURCES``), taking turns over
    ``sizes.repeats`` repeats; per kind the images/s of each, the median ratio of the
    repeats and its spread (lowest and highest repeat), and the cache build time.
    ``speedup`` is the lower of the kinds' median ratios."""
    kinds = {}
    for kind, px in sizes.loader_sources:
        root = make_sources(work, kind, px, sizes)
        device = Device.pick()
        started = time.perf_counter()
        split = load_dataset(root, "binary", sizes.loader_out,
                             progress=False).splits["train"]
        cache_seconds = time.perf_counter() - started
        generator = torch.Generator().manual_seed(0)
        plain = plain_loader(root / "train", sizes, device)
        rates = images_per_second({
            "ours": lambda: fast_epoch(split, sizes, device, generator),
            "ours_one_thread": lambda: one_thread(fast_epoch, split, sizes, device, generator),
            "plain": lambda: plain_epoch(plain, device),
        }, len(split), sizes)
        plain = None  # lets its worker processes go
        ratios = [o / p for o, p in zip(rates["ours"], rates["plain"])]
        kinds[kind] = {
            "source_px": px, "images": len(split), "cache_build_seconds": cache_seconds,
            "ours_images_per_s": statistics.median(rates["ours"]),
            "ours_one_thread_images_per_s": statistics.median(rates["ours_one_thread"]),
            "plain_images_per_s": statistics.median(rates["plain"]),
            "speedup": statistics.median(ratios), "speedup_low": min(ratios),
            "speedup_high": max(ratios), "repeats": len(ratios)}
    worst = min(kinds, key=lambda k: kinds[k]["speedup"])
    return {"kinds": kinds, "out_px": sizes.loader_out, "plain_workers": os.cpu_count(),
            "worst_kind": worst, "speedup": kinds[worst]["speedup"],
            **{k: kinds[worst][k] for k in ("ours_images_per_s", "plain_images_per_s",
                                            "ours_one_thread_images_per_s",
                                            "cache_build_seconds", "images")}}


def make_sources(work: Path, kind: str, px: int, sizes: BenchSizes) -> Path:
    """A binary dataset whose training images are ``px`` px ``kind`` files: phantoms
    drawn at 512 px, enlarged, with a little sensor noise so they do not compress better
    than radiographs do. Validation and test stay small (only train is timed)."""
    import numpy as np
    from PIL import Image

    root = make_data(work, f"loader-{kind}", sizes.loader_scale, min(px, 512))
    rng = np.random.default_rng(0)
    for path in sorted((root / "train").rglob("*.png")):
        with Image.open(path) as image:
            big = np.asarray(image.convert("L").resize((px, px), Image.BICUBIC), np.float32)
        noisy = np.clip(big + rng.normal(0, 2.0, big.shape), 0, 255).astype(np.uint8)
        if kind == "png":
            Image.fromarray(noisy).save(path)
        else:
            Image.fromarray(noisy).save(path.with_suffix(".jpeg"), quality=90)
            path.unlink()
    return root


def fast_epoch(split: Split, sizes: BenchSizes, device: Device,
               generator: torch.Generator) -> None:
    """One shuffled pass as a trial makes it: cache slice -> device -> augmented batch."""
    augment = Augment.from_dict(AUGMENT)
    order = torch.randperm(len(split), generator=generator)
    for index in batches(len(split), sizes.batch_size, order):
        images, _ = to_device(split, index, device)
        to_model_input(images, augment=augment, generator=generator, out_size=sizes.loader_out,
                       channels_last=device.channels_last)
    synchronize(device)


def plain_loader(folder: Path, sizes: BenchSizes, device: Device):
    """The assignment's pipeline: ImageFolder + PIL transforms, one worker per core."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomRotation(AUGMENT["rotation"]), T.RandomResizedCrop(sizes.loader_out),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform=transform), batch_size=sizes.batch_size,
        shuffle=True, num_workers=os.cpu_count() or 1, persistent_workers=True,
        pin_memory=device.torch.type == "cuda")


def plain_epoch(loader, device: Device) -> None:
    """One pass of the plain loader, each batch moved to the device."""
    for images, _ in loader:
        images.to(device.torch, non_blocking=True)
    synchronize(device)


def synchronize(device: Device) -> None:
    if device.torch.type == "cuda":
        torch.cuda.synchronize()


def one_thread(function, *args):
    """Call ``function`` with torch limited to one thread, as in a one-CPU trial."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def images_per_second(epochs: dict, images: int, sizes: BenchSizes) -> dict[str, list[float]]:
    """Images/s of each epoch function in each of ``sizes.repeats`` timings.

    The functions take turns, repeat by repeat, so a change in the machine's load
    during the run falls on all of them alike. Each runs one untimed warm-up epoch.
    """
    for run_epoch in epochs.values():
        run_epoch()
    rates: dict[str, list[float]] = {name: [] for name in epochs}
    for _ in range(sizes.repeats):
        for name, run_epoch in epochs.items():
            started, delivered = time.perf_counter(), 0
            while delivered == 0 or time.perf_counter() - started < sizes.loader_seconds:
                run_epoch()
                delivered += images
            rates[name].append(delivered / (time.perf_counter() - started))
    return rates


# --- sweep overhead: a trial inside Ray Tune vs the same loop run bare -------------------


def measure_overhead(work: Path, sizes: BenchSizes) -> dict:
    """Per-epoch seconds of one fixed configuration, as a one-trial sweep and bare.

    The bare loop runs before and after the sweep, so load that comes and goes on a
    shared machine weighs on both sides; the first epoch of every run is not timed.
    """
    root = make_data(work, "overhead", sizes.overhead_scale, sizes.overhead_size)
    params = {"backbone": sizes.overhead_backbone, "frozen_layers": 0, **RECIPE}
    space_file = write_space(work / "overhead.yaml", sizes.overhead_size,
                             sizes.overhead_epochs, 1, sizes.overhead_epochs, params)
    cfg = trial_config(space_file, params)
    bundle = load_dataset(root, "binary", sizes.overhead_size, progress=False)
    bare = bare_epochs(cfg, bundle)[1:]
    rows = sweep_rows(sweep(space_file, root, work, "overhead"))
    bare += bare_epochs(cfg, bundle)[1:]
    kept = rows[rows["epoch"] > 1]
    bare_wall = statistics.mean(wall for _, wall in bare)
    bare_loop = statistics.mean(loop for loop, _ in bare)
    tune_wall = float(kept["time_this_iter_s"].mean())
    tune_loop = float(kept["epoch_seconds"].mean())
    return {"backbone": cfg.backbone, "image_px": cfg.image_size,
            "images": len(bundle.splits["train"]), "bare_epochs_timed": len(bare),
            "sweep_epochs_timed": len(kept), "bare_seconds": bare_wall,
            "sweep_seconds": tune_wall, "bare_loop_seconds": bare_loop,
            "sweep_loop_seconds": tune_loop, "sweep_outside_loop_seconds": tune_wall - tune_loop,
            "ratio": tune_wall / bare_wall, "ratio_in_loop": tune_loop / bare_loop}


def trial_config(space_file: Path, params: dict) -> TrialConfig:
    """The config a sweep of ``space_file`` hands its one trial."""
    space = load_space(space_file)
    return TrialConfig.from_dict({**PARAM_DEFAULTS, "loss": "ce", **params,
                                  **space.fixed_settings()})


def bare_epochs(cfg: TrialConfig, bundle) -> list[tuple[float, float]]:
    """The trainable's loop without Ray: (train + validation seconds as the trainable
    reports them, wall seconds of the whole epoch) for each epoch, on one torch thread.
    """
    device, threads = Device.pick(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, optimizer, scaler, loss_fn = build_training(cfg, device)
        timings = []
        for epoch in range(1, cfg.max_epochs + 1):
            started = time.perf_counter()
            train = train_one_epoch(model, bundle.splits["train"], loss_fn, optimizer, scaler,
                                    cfg, device, epoch)
            val = evaluate(model, bundle.splits["validation"], loss_fn, cfg, device)
            results = {"train": train, "validation": val}
            chosen = choose_thresholds(TASKS[cfg.task], results, cfg)
            epoch_metrics(TASKS[cfg.task], results, epoch, optimizer.param_groups[0]["lr"],
                          chosen["threshold_logits"])
            timings.append((train.seconds + val.seconds, time.perf_counter() - started))
        return timings
    finally:
        torch.set_num_threads(threads)


# --- search: ASHA + TPE vs the assignment's grid ------------------------------------------


def measure_search(work: Path, sizes: BenchSizes) -> dict:
    """Run the six-row grid to the end, then ASHA + TPE; compare epochs and best F1."""
    root = make_data(work, "search", sizes.search_scale, sizes.search_size)
    epochs = sizes.search_epochs
    grid_params = {**SEARCH_PARAMS, **RECIPE}
    rows = grid_start_rows()[:sizes.grid_rows]
    grid_file = write_space(work / "grid.yaml", sizes.search_size, epochs, len(rows),
                            epochs, grid_params, start_with=rows)
    search_file = write_space(work / "search.yaml", sizes.search_size, epochs,
                              sizes.search_samples, 1, SEARCH_PARAMS)
    grid = sweep_rows(sweep(grid_file, root, work, "grid"))
    search = sweep_rows(sweep(search_file, root, work, "search"))
    return compare_search(grid, search)


def grid_start_rows() -> list[dict]:
    return [{"backbone": backbone, "frozen_layers": frozen} for backbone, frozen in GRID_ROWS]


def compare_search(grid, search) -> dict:
    """Epochs until the search first matches the grid's best F1, and each best F1."""
    target, budget = float(grid["val_f1"].max()), len(grid)
    spent = epochs_until(search, target)
    in_budget = search.sort_values(["timestamp", "epoch"]).head(budget)
    return {"grid_trials": int(grid["trial_id"].nunique()), "grid_epochs": budget,
            "grid_best_f1": target, "search_trials": int(search["trial_id"].nunique()),
            "search_epochs": len(search), "search_best_f1": float(search["val_f1"].max()),
            "search_best_f1_in_grid_budget": float(in_budget["val_f1"].max()),
            "epochs_to_match": spent if spent is not None else len(search),
            "matched": spent is not None,
            "ratio": (spent if spent is not None else len(search)) / budget}


def epochs_until(rows, target: float) -> int | None:
    """Epochs reported up to the second the first ``val_f1 >= target`` arrived; ``None``
    when no epoch reached it (the ratio is then only a lower bound)."""
    hits = rows[rows["val_f1"] >= target]
    if hits.empty:
        return None
    return int((rows["timestamp"] <= hits["timestamp"].min()).sum())


# --- shared: search-space files and sweeps -------------------------------------------------


def write_space(path: Path, image_size: int, max_epochs: int, num_samples: int,
                grace_period: int, params: dict, start_with: list[dict] | None = None) -> Path:
    """A binary search-space YAML file; ``grace_period == max_epochs`` stops no trial."""
    doc = {"task": "binary", "metric": "val_f1", "mode": "max", "max_epochs": max_epochs,
           "image_size": image_size, "pretrained": "none", "num_samples": num_samples,
           "augment": AUGMENT,
           "asha": {"grace_period": grace_period, "reduction_factor": 3},
           "params": params, "start_with": start_with or []}
    path.write_text(dump_space(parse_space(doc, str(path))))
    return path


def sweep(space_file: Path, data: Path, work: Path, name: str):
    """The real ``run_sweep``: one CPU (and one GPU when there is one) per trial."""
    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep

    gpus = 1.0 if torch.cuda.is_available() else 0.0
    return run_sweep(SweepOptions(space_file=str(space_file), data=str(data), name=name,
                                  storage_path=str(work / "runs"), cpus_per_trial=1.0,
                                  gpus_per_trial=gpus, keep_checkpoints=1))


def sweep_rows(results):
    """Every reported epoch of every trial, one row each (a pandas DataFrame)."""
    import pandas as pd

    frames = [r.metrics_dataframe for r in results if r.metrics_dataframe is not None]
    frames = [f for f in frames if "val_f1" in f]
    if not frames:
        raise RuntimeError("no trial of the benchmark sweep reported a result; see above")
    return pd.concat(frames, ignore_index=True)


# --- the table ---------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The figures as a plain-text table, with notes and the machine they come from."""
    loader, overhead, search = report["loader"], report["overhead"], report["search"]
    rows = [
        ("loader images/s (ours/plain)", loader["ours_images_per_s"],
         loader["plain_images_per_s"], "loader_speedup"),
        ("s per epoch (sweep/bare)", overhead["sweep_seconds"], overhead["bare_seconds"],
         "sweep_overhead"),
        ("epochs to grid's best F1", search["epochs_to_match"], search["grid_epochs"],
         "search_epochs_ratio"),
    ]
    lines = [f"{'measure':<30}{'ours':>9}{'plain':>9}{'ratio':>8}  target", "-" * 70]
    for label, ours, plain, key in rows:
        sign, goal = TARGETS[key]
        lower_bound = key == "search_epochs_ratio" and not search["matched"]
        shown = f"{'>' if lower_bound else ''}{report[key]:.2f}"
        lines.append(f"{label:<30}{ours:>9.4g}{plain:>9.4g}{shown:>8}  {sign} {goal:.2f} "
                     f"{'met' if target_met(key, report) else 'NOT met'}")
    return "\n".join(lines + scale_lines(report) + table_notes(report))


def scale_lines(report: dict) -> list[str]:
    """The scale parts' figures, ours beside the plain way's."""
    driver, checkpoints = report.get("driver"), report.get("checkpoints")
    if not driver:
        return []
    key = f"driver_ms_per_trial_{driver['trials']}"
    rows = [(f"driver ms/completion @{driver['trials']}", report[key],
             driver["plain_ms_per_completion_at_end"], key),
            ("checkpoint bytes/epoch ÷ trainable", report["checkpoint_write_ratio"],
             checkpoints["plain_write_ratio"], "checkpoint_write_ratio"),
            ("kept bytes/trial ÷ trainable", report["kept_bytes_per_trial_ratio"],
             checkpoints["plain_kept_ratio"], "kept_bytes_per_trial_ratio")]
    lines = ["", f"{'scale':<36}{'ours':>9}{'plain':>9}  target", "-" * 70]
    for label, ours, plain, name in rows:
        sign, goal = SCALE_TARGETS.get(name, ("", None))
        verdict = "" if goal is None else (
            f"{sign} {goal:g} {'met' if (ours <= goal if sign == '<=' else ours >= goal) else 'NOT met'}")
        lines.append(f"{label:<36}{ours:>9.4g}{plain:>9.4g}  {verdict}")
    for run in (report.get("cluster") or {}).get("runs", []):
        lines.append(f"cluster, {run['trials']} trials, {run['concurrency']} at once: "
                     f"{run['trials_per_minute']:.0f} trials/min, driver CPU "
                     f"{100 * run['driver_cpu_share']:.0f}%")
    return lines


def target_met(key: str, report: dict) -> bool:
    """Whether ``report[key]`` meets its target (an unmatched search never does)."""
    sign, goal = TARGETS[key]
    if key == "search_epochs_ratio" and not report["search"]["matched"]:
        return False
    return report[key] >= goal if sign == ">=" else report[key] <= goal


def table_notes(report: dict) -> list[str]:
    loader, overhead, search = report["loader"], report["overhead"], report["search"]
    notes = [
        f"best val F1 within the grid's {search['grid_epochs']} epochs: search "
        f"{search['search_best_f1_in_grid_budget']:.3f}, grid {search['grid_best_f1']:.3f}",
        f"sweep: epochs of {overhead['bare_seconds']:.1f} s bare; "
        f"{overhead['sweep_outside_loop_seconds']:.2f} s per epoch outside the training loop "
        f"(checkpoint, report); in-loop ratio {report['sweep_overhead_in_loop']:.2f}",
        *[f"loader, {px} px {kind}: ratio {k['speedup']:.1f} (repeats {k['speedup_low']:.1f}"
          f"..{k['speedup_high']:.1f}), ours {k['ours_images_per_s']:.0f} images/s "
          f"({k['ours_one_thread_images_per_s']:.0f} on 1 thread), plain "
          f"{k['plain_images_per_s']:.0f}; cache built once in "
          f"{k['cache_build_seconds']:.1f} s for {k['images']} images"
          for kind, k in loader["kinds"].items() for px in [k["source_px"]]],
        "machine: {cpus} CPUs ({cpu}), torch {torch}, device {device} ({device_name}); "
        "load average {load_before} before, {load_after} after".format(**report["machine"]),
    ]
    if not search["matched"]:
        notes.append("the search never reached the grid's best F1: its ratio is a lower bound")
    return notes
