"""``covid-tune bench``: measure the fast paths against the plain ones, on this machine.

Three figures, each a ratio of two measurements taken in the same run:

- ``loader_speedup``: images/s delivered to the model by covid-tune's path (a slice of
  the decoded uint8 cache, augmented as a batch on the device by
  :func:`covid_tune.augment.to_model_input`) over images/s of the assignment's path
  (torchvision ``ImageFolder`` + PIL RandomRotation / RandomResizedCrop / flip +
  ToTensor / Normalize in a ``DataLoader`` with one worker per core). Both deliver
  ``[B, 3, 224, 224]`` float batches from generated 512 px PNGs. Building the cache is
  a one-off cost, reported apart.
- ``sweep_overhead``: wall seconds per epoch of a trial inside a Ray Tune sweep (Tune's
  ``time_this_iter_s``: training, validation, checkpoint and report) over wall seconds
  per epoch of the same phase functions run bare (:func:`bare_epochs`), one torch
  thread each. The ratio of the trainable's own ``epoch_seconds`` (training and
  validation only) is reported too, as ``sweep_overhead_in_loop``.
- ``search_epochs_ratio``: epochs ASHA + TPE spends until a trial first reaches the best
  validation F1 of a grid like the assignment's (six backbone / frozen-layer rows, each
  run to the full epoch count), over the grid's epochs. Epochs are counted in the order
  results arrived; results in the same second as the match all count as spent.

Timings are medians over repeats; the first epoch of every training run is a warm-up
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

from covid_tune.augment import to_model_input
from covid_tune.config import (PARAM_DEFAULTS, Augment, TrialConfig, dump_space, load_space,
                               parse_space)
from covid_tune.data import Split, load_dataset
from covid_tune.inference import Device
from covid_tune.preprocess import MEAN, STD
from covid_tune.synth import generate
from covid_tune.train import (batches, build_training, epoch_metrics, evaluate, to_device,
                              train_one_epoch)
from covid_tune.tasks import TASKS

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
TARGETS = {"loader_speedup": (">=", 10.0), "sweep_overhead": ("<=", 1.10),
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
    loader_stored: int = 512
    """Side (px) of the generated PNGs the loaders read."""
    loader_out: int = 224
    """Side (px) of the images both loaders deliver."""
    loader_seconds: float = 1.0
    """Least seconds of whole epochs in each timed loader repeat."""
    repeats: int = 3
    """Timed repeats of each loader; the median counts."""
    batch_size: int = 32
    """Images per batch of both loaders."""
    overhead_backbone: str = "resnet18"
    """The model of the sweep-overhead runs."""
    grid_rows: int = len(GRID_ROWS)
    """How many of the assignment's grid rows the grid runs (all but in the tests)."""

    def __post_init__(self):
        if self.overhead_epochs < 2 or self.repeats < 1 or self.search_epochs < 1:
            raise ValueError("need overhead_epochs >= 2, repeats >= 1, search_epochs >= 1")


QUICK = BenchSizes(loader_scale=0.02, overhead_scale=0.02, overhead_size=64,
                   overhead_epochs=4, search_scale=0.02, search_size=32, search_epochs=6,
                   search_samples=16)
"""Minutes on 2 CPU cores."""
FULL = BenchSizes(loader_scale=0.1, overhead_scale=0.1, overhead_size=224,
                  overhead_epochs=6, search_scale=0.1, search_size=96, search_epochs=15,
                  search_samples=30, loader_seconds=3.0, repeats=5)
"""For a GPU machine: larger images and the assignment's 15 epochs."""
TINY = BenchSizes(loader_scale=0.004, overhead_scale=0.004, overhead_size=32,
                  overhead_epochs=2, search_scale=0.004, search_size=32, search_epochs=2,
                  search_samples=2, loader_stored=64, loader_out=32, loader_seconds=0.0,
                  repeats=1, grid_rows=1)
"""For the test suite: checks that everything runs, measures nothing useful."""


def run_bench(quick: bool = False, json_path: str | None = None,
              sizes: BenchSizes | None = None) -> dict:
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
    report["machine"]["load_after"] = load_average()
    report["loader_speedup"] = report["loader"]["speedup"]
    report["sweep_overhead"] = report["overhead"]["ratio"]
    report["sweep_overhead_in_loop"] = report["overhead"]["ratio_in_loop"]
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
    """Images/s of both loaders on the same generated PNGs, and the cache build time."""
    root = make_data(work, "loader", sizes.loader_scale, sizes.loader_stored)
    device = Device.pick()
    started = time.perf_counter()
    split = load_dataset(root, "binary", sizes.loader_out, progress=False).splits["train"]
    cache_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    loader = plain_loader(root / "train", sizes, device)
    rates = images_per_second({
        "ours": lambda: fast_epoch(split, sizes, device, generator),
        "ours_one_thread": lambda: one_thread(fast_epoch, split, sizes, device, generator),
        "plain": lambda: plain_epoch(loader, device),
    }, len(split), sizes)
    del loader
    return {"images": len(split), "stored_px": sizes.loader_stored, "out_px": sizes.loader_out,
            "cache_build_seconds": cache_seconds, "ours_images_per_s": rates["ours"],
            "ours_one_thread_images_per_s": rates["ours_one_thread"],
            "plain_images_per_s": rates["plain"], "plain_workers": os.cpu_count(),
            "speedup": rates["ours"] / rates["plain"]}


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


def images_per_second(epochs: dict, images: int, sizes: BenchSizes) -> dict[str, float]:
    """Median images/s of each epoch function over ``sizes.repeats`` timings.

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
    return {name: statistics.median(values) for name, values in rates.items()}


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
    bare_wall = statistics.median(wall for _, wall in bare)
    bare_loop = statistics.median(loop for loop, _ in bare)
    tune_wall = float(kept["time_this_iter_s"].median())
    tune_loop = float(kept["epoch_seconds"].median())
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
            epoch_metrics(TASKS[cfg.task], {"train": train, "validation": val}, epoch,
                          optimizer.param_groups[0]["lr"])
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
    from covid_tune.runs import SweepOptions
    from covid_tune.sweep import run_sweep

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
    return "\n".join(lines + table_notes(report))


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
        f"sweep: {overhead['sweep_outside_loop_seconds']:.2f} s per epoch outside the loop "
        f"(checkpoint, report); in-loop ratio {report['sweep_overhead_in_loop']:.2f}",
        f"loader: cache built once in {loader['cache_build_seconds']:.2f} s for "
        f"{loader['images']} images; ours on 1 thread "
        f"{loader['ours_one_thread_images_per_s']:.0f} images/s",
        "machine: {cpus} CPUs ({cpu}), torch {torch}, device {device} ({device_name}); "
        "load average {load_before} before, {load_after} after".format(**report["machine"]),
    ]
    if not search["matched"]:
        notes.append("the search never reached the grid's best F1: its ratio is a lower bound")
    return notes
