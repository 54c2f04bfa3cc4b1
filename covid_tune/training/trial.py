"""One trial: build the model, train epoch by epoch, report metrics and a checkpoint.

``train_trial(config, data)`` is the Ray Tune trainable. Its data arrives through
``tune.with_parameters`` (one copy in the object store, shared by the trials of a
node). Each epoch it reports the metrics of every split it sees (``train_*``, ``sel_*``
when the sweep holds a selection split out of Train, ``val_*``) and the id of the Ray
node it ran on, and a checkpoint holding the weights, the optimizer, the epoch and the
recipe (resolved config, label names, the decision thresholds tuned on the split that
chooses), so a retried or restored trial continues from its last epoch.

Each epoch is published (TensorBoard, thresholds, checkpoint, ``tune.report``) by a
thread of its own while the next epoch trains (``Publisher``), from a CPU copy of the
epoch's state. Checkpoints are written whole into a temporary folder that Ray then
copies to storage and registers only once the copy is complete (their format belongs
to ``covid_tune.runs.record``); ``restore`` falls back to the trial's newest intact checkpoint
when the last one was cut short.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from covid_tune.nn.augment import to_model_input
from covid_tune.core.space import INTERVAL_OF, SPLIT_PREFIXES, TrialConfig
from covid_tune.data.dataset import SELECTION, DataBundle, Split
from covid_tune.nn.weights import Base, build_for, put_weights
from covid_tune.nn.logits import predict_logits
from covid_tune.nn.device import Device
from covid_tune.nn.losses import build_loss
from covid_tune.core.metrics import (bootstrap_intervals, compute_metrics, degenerate_labels,
                                     fit_temperatures, tune_thresholds)
from covid_tune.core.numeric import sigmoid
from covid_tune.runs.reader import CHECKPOINT_SCORE, tie_broken
from covid_tune.runs.folder import DIVERGED_FILE
from covid_tune.runs.checkpoint import DamagedCheckpoint, load_checkpoint, load_optimizer, save_checkpoint
from covid_tune.runs.retention import checkpoint_folders
from covid_tune.search._internals import RAY_STORAGE_LOGGER, asked_to_stop, trial_session
from covid_tune.core.tasks import TASKS, Task
from covid_tune.training.cost import trial_costs
from covid_tune.training.tensorboard import TrialWriter


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed, the sweep goes on."""


@contextlib.contextmanager
def not_retried_once_diverged():
    """Ray retries every failed trial (``max_failures``); a diverged one would only
    diverge again from its last checkpoint, so its retries fail at once, same reason."""
    marker = diverged_marker()
    if marker is not None and marker.is_file():
        raise TrialDiverged(f"{marker.read_text()} (diverged before; not trained again)")
    try:
        yield
    except TrialDiverged as exc:
        if marker is not None:
            marker.write_text(str(exc))
        raise


def diverged_marker() -> Path | None:
    """``diverged.txt`` in this trial's folder; ``None`` outside a Ray Tune trial."""
    folder = tune.get_context().get_trial_dir()
    return Path(folder) / DIVERGED_FILE if folder and Path(folder).is_dir() else None


@dataclass
class EpochResult:
    loss: float
    outputs: np.ndarray
    targets: np.ndarray
    images: int
    seconds: float


@not_retried_once_diverged()
def train_trial(config: dict, data: DataBundle) -> None:
    """The Ray Tune trainable: a function of (config, data handle)."""
    started = time.perf_counter()
    cfg = TrialConfig.from_dict(config)
    task = TASKS[cfg.task]
    device = Device.pick()
    _set_threads()
    # Ray logs a line for every checkpoint saved; the run folder says as much.
    logging.getLogger(RAY_STORAGE_LOGGER).setLevel(logging.WARNING)
    model, optimizer, scaler, loss_fn = build_training(cfg, device)
    costs = trial_costs(model, cfg)
    base = Base.of(model, cfg)
    start, reached = restore(model, optimizer, tune.get_checkpoint(), base)
    if reached:
        # The epoch it goes on from, reported again: a driver killed before its next
        # snapshot of the run has not heard it (ASHA's rung, the study, or the trial's
        # end), and hears it now as it did before; one that heard it takes nothing new.
        tune.report(reached)
    node_id = ray.get_runtime_context().get_node_id()
    writer = TrialWriter.open(cfg)
    scored = [s for s in (SELECTION, "validation") if s in data.splits]
    publisher = Publisher()
    stop = publisher.end_if_stopped
    TRAINING_THREADS.add(threading.current_thread())
    try:
        for epoch in range(start + 1, cfg.max_epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            results = {"train": train_one_epoch(model, data.splits["train"], loss_fn,
                                                optimizer, scaler, cfg, device, epoch, stop)}
            results.update({s: evaluate(model, data.splits[s], loss_fn, cfg, device, stop)
                            for s in scored})
            thresholds = choose_thresholds(task, results, cfg)
            metrics, confusion = epoch_metrics(task, results, epoch, lr,
                                               thresholds["threshold_logits"])
            metrics["node_id"], metrics["started_from"] = node_id, start
            metrics.update(costs)
            if cfg.report_interval:
                metrics[f"{cfg.metric}_half_width"] = half_width(task, results, cfg,
                                                                 thresholds)
            metrics[CHECKPOINT_SCORE] = tie_broken(metrics.get(cfg.metric), epoch, cfg.mode)
            # Tune would time an epoch from one report to the next, which the publisher
            # thread makes; the training thread's own spacing is the trial's wall time.
            now = time.perf_counter()
            metrics["time_this_iter_s"], started = now - started, now
            state = EpochState.take(model, optimizer, base)
            publisher.submit(functools.partial(publish, writer, metrics, confusion, thresholds,
                                               state, epoch, cfg, base, stop))
    finally:
        try:
            publisher.wait()
        finally:
            writer.close()


def publish(writer: TrialWriter, metrics: dict, confusion, thresholds: dict,
            state: EpochState, epoch: int, cfg: TrialConfig, base: Base, stop) -> None:
    """Log an epoch to TensorBoard, write its checkpoint (with its thresholds and
    temperatures) and report both to Tune; ``stop`` first (stopped while the epoch
    trained: Tune takes no more results)."""
    writer.log_epoch(epoch, metrics, confusion)
    stop()
    with tempfile.TemporaryDirectory() as folder:
        save_epoch(Path(folder), state, epoch, cfg, metrics, thresholds, base)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class Publisher:
    """Publishes each epoch on a thread of its own while the next epoch trains.

    Tune's function trainable holds ``tune.report`` until the driver has taken the
    result and asked for the next one (a round trip through ASHA, the searcher and
    the callbacks); writing and hashing the checkpoint before it takes about as long.
    Here the training thread only copies the epoch's state (``EpochState``) and goes
    on. One epoch is in flight at most: a hand-over first waits for the one before and
    raises what it raised, a storage error or the ``SystemExit`` with which Tune ends a
    stopped trial's thread. The trial waits for its last epoch before it returns, so
    a trial that fails still reports the epochs it finished. The thread is a daemon,
    not a ``ThreadPoolExecutor``'s worker: a report cut off by a stop may never
    return, and Python joins an executor's threads before the worker process exits.

    A stop (ASHA's, Ctrl-C's, the sweep's end) reaches the trial while the next epoch
    trains: Tune wakes the blocked report with ``SystemExit``. The training thread
    calls ``end_if_stopped`` before every batch, so it ends within one batch, the epoch
    it was on is never published, and Tune can hand the actor to the next trial
    (Tune gives a stopped trial's thread ``TUNE_FUNCTION_THREAD_TIMEOUT_S``, 2 s, to
    end before it reuses the actor, and fails the next trial otherwise).
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.stopped = threading.Event()
        """Tune ended a report with ``SystemExit``: the trial was stopped."""
        self.session = trial_session()
        """The trial's own Ray session, whose stop event Tune sets (looked up once, at
        the start: Tune drops the worker's session when it stops the trial)."""

    def submit(self, work) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True,
                                        name="covid-tune-publish")
        self._thread.start()

    def _run(self, work) -> None:
        try:
            work()
        except BaseException as exc:  # SystemExit too: the training thread re-raises it
            if isinstance(exc, SystemExit):
                self.stopped.set()
            self._failure = exc

    def end_if_stopped(self) -> None:
        """End the training thread the way Tune ends it (``SystemExit(0)``) once Tune
        has asked the trial to stop."""
        if self.stopped.is_set() or asked_to_stop(self.session):
            raise SystemExit(0)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


TRAINING_THREADS: weakref.WeakSet = weakref.WeakSet()
"""The threads that run a trial in this worker process."""
EXIT_WAIT_SECONDS = 5.0


@atexit.register
def let_training_threads_end() -> None:
    """When a stopped trial's worker exits, give its training thread (a daemon, asked to
    stop, ending at its next batch) up to ``EXIT_WAIT_SECONDS`` to end: a daemon thread
    still inside torch when Python shuts down aborts the process ("Fatal Python error:
    Aborted") and fills the sweep's console with a stack dump."""
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    for thread in list(TRAINING_THREADS):
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _set_threads() -> None:
    """Use as many threads as the CPUs Ray gave this trial."""
    with contextlib.suppress(Exception):
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))


def build_training(cfg: TrialConfig, device: Device):
    """(model, optimizer, grad scaler, loss) for a trial; the same config starts from
    the same weights."""
    torch.manual_seed(cfg.seed)
    model = build_for(cfg, cfg.pretrained).to(device.torch)
    if device.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(enabled=device.amp_dtype == torch.float16)
    loss_fn = build_loss(cfg.loss, cfg.focal_alpha, cfg.focal_gamma)
    return model, build_optimizer(model, cfg), scaler, loss_fn


def build_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def batches(n: int, batch_size: int, order: torch.Tensor | None = None,
            no_single: bool = False):
    """Index arrays of one pass over ``n`` samples. With ``no_single`` a last batch of
    one sample joins the batch before it: BatchNorm cannot train on one sample (17
    images in batches of 8 would crash ResNet-18 in its last step)."""
    indices = order.numpy() if order is not None else np.arange(n)
    starts = list(range(0, n, batch_size))
    if no_single and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for start, end in zip(starts, [*starts[1:], n]):
        yield np.sort(indices[start:end])


def to_device(split: Split, index: np.ndarray, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(split.images[index])
    targets = torch.from_numpy(split.targets[index])
    if device.torch.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    return (images.to(device.torch, non_blocking=True),
            targets.to(device.torch, non_blocking=True))


def train_one_epoch(model, split: Split, loss_fn, optimizer, scaler, cfg: TrialConfig,
                    device: Device, epoch: int, stop=None) -> EpochResult:
    """One pass over the training split with augmentation on the trial's device;
    ``stop`` is called before every batch (it raises to end the trial)."""
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    augment = cfg.augment
    started, total, outputs, targets = time.perf_counter(), 0.0, [], []
    order = torch.randperm(len(split), generator=generator)
    for index in batches(len(split), cfg.batch_size, order, no_single=True):
        if stop is not None:
            stop()
        images, target = to_device(split, index, device)
        x = to_model_input(images, augment=augment, generator=generator,
                           channels_last=device.channels_last)
        with device.autocast():
            logits = model(x)
            loss = loss_fn(logits.float(), target)
        if not torch.isfinite(loss):
            raise TrialDiverged(f"loss became {loss.item()} at epoch {epoch}: lr {cfg.lr} is "
                                f"probably too high")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(index)
        outputs.append(logits.detach().float().cpu())
        targets.append(split.targets[index])
    return EpochResult(total / len(split), torch.cat(outputs).numpy(), np.concatenate(targets),
                       len(split), time.perf_counter() - started)


@torch.no_grad()
def evaluate(model, split: Split, loss_fn, cfg: TrialConfig, device: Device,
             stop=None) -> EpochResult:
    """Loss and logits on a labelled split, no augmentation; ``stop`` as in
    ``train_one_epoch``."""
    started = time.perf_counter()
    outputs = predict_logits(model, split.images, max(cfg.batch_size, 64), device, stop)
    targets = torch.tensor(split.targets)  # a copy: the object store's arrays are read-only
    loss = loss_fn(torch.from_numpy(outputs), targets).item()
    return EpochResult(loss, outputs, split.targets, len(split), time.perf_counter() - started)


def epoch_metrics(task: Task, results: dict[str, EpochResult], epoch: int, lr: float,
                  threshold_logits: dict[str, float]) -> tuple[dict, object]:
    """The flat dict reported to Tune (``train_*``, ``sel_*``, ``val_*`` scalars and
    timings, at the epoch's thresholds tuned on the choosing split, so what chooses
    epochs, trials and rows is what the leaderboard reports), and the validation
    confusion matrix (or matrices) for TensorBoard."""
    train = results["train"]
    metrics = {"epoch": epoch, "lr": lr,
               "epoch_seconds": sum(r.seconds for r in results.values()),
               "train_images_per_second": train.images / max(train.seconds, 1e-9)}
    confusion = {}
    for split, result in results.items():
        prefix = SPLIT_PREFIXES[split]
        metrics[f"{prefix}_loss"] = result.loss
        scores = compute_metrics(task, result.targets, result.outputs, threshold_logits)
        confusion[split] = scores.pop("confusion")
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    if not math.isfinite(metrics["val_loss"]):
        raise TrialDiverged(f"validation loss became {metrics['val_loss']} at epoch {epoch}")
    return metrics, confusion["validation"]


def half_width(task: Task, results: dict[str, EpochResult], cfg: TrialConfig,
               thresholds: dict) -> float:
    """Half the width of the 95% bootstrap interval of the sweep's metric at this epoch,
    on the split it is measured on (200 resamples: a tenth of a second for 2,000
    images): the noise a gain must beat for ``stop: {converged: K}``."""
    prefix, name = cfg.metric.split("_", 1)
    split = next(s for s, p in SPLIT_PREFIXES.items() if p == prefix)
    result = results[split]
    low, high = bootstrap_intervals(task, result.targets, result.outputs, resamples=200,
                                    seed=cfg.seed,
                                    threshold_logits=thresholds["threshold_logits"]
                                    )[INTERVAL_OF[name]]
    return (high - low) / 2 if math.isfinite(high - low) else math.nan


def choose_thresholds(task: Task, results: dict[str, EpochResult], cfg: TrialConfig) -> dict:
    """Each label's decision threshold, tuned by the space's rule on the split that
    chooses (the selection split, else validation), and its temperature fitted there,
    for the checkpoint's recipe: thresholds as log-odds (``threshold_logits``, exact,
    what the metrics and ``predict`` apply) and as probabilities after the temperature
    (``thresholds``, for people to read); labels whose threshold calls every image of
    that split positive (or none) under ``degenerate``."""
    split = SELECTION if SELECTION in results else "validation"
    result = results[split]
    chosen, untuned = tune_thresholds(task, result.targets, result.outputs,
                                      cfg.threshold.rule, cfg.threshold.target)
    temperatures = fit_temperatures(task, result.targets, result.outputs)
    return {"thresholds": {label: float(sigmoid(value / temperatures[label]))
                           for label, value in chosen.items()},
            "threshold_logits": chosen,
            "temperatures": temperatures,
            "threshold_rule": {"rule": cfg.threshold.rule, "target": cfg.threshold.target,
                               "split": split, "untuned": untuned,
                               "degenerate": degenerate_labels(task, result.targets,
                                                               result.outputs, chosen)}}


@dataclass
class EpochState:
    """A copy on the CPU of what an epoch's checkpoint stores: the weights that differ
    from the base, the names of those that do not, and the optimizer's state."""

    weights: dict[str, torch.Tensor]
    unchanged: list[str]
    optimizer: dict

    @classmethod
    def take(cls, model, optimizer, base: Base | None = None) -> EpochState:
        weights = model.state_dict()
        unchanged = base.unchanged(weights) if base is not None else []
        return cls({k: cpu_copy(v) for k, v in weights.items() if k not in unchanged},
                   unchanged, cpu_copy(optimizer.state_dict()))


def cpu_copy(value):
    """``value`` with every tensor in it copied to the CPU (lists and dicts followed)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


def write_checkpoint(folder: Path, model, optimizer, epoch: int, cfg: TrialConfig,
                     metrics: dict, thresholds: dict | None = None,
                     base: Base | None = None) -> None:
    """``save_epoch`` of the model and optimizer as they are now."""
    save_epoch(folder, EpochState.take(model, optimizer, base), epoch, cfg, metrics,
               thresholds, base)


def save_epoch(folder: Path, state: EpochState, epoch: int, cfg: TrialConfig, metrics: dict,
               thresholds: dict | None = None, base: Base | None = None) -> None:
    """The weights that differ from the trial's ``base`` (the base recorded instead),
    the optimizer and the epoch, with the recipe (resolved config, label names,
    metrics, tuned thresholds) that lets a reader rebuild and use the model without
    the search session."""
    recipe = {"epoch": epoch, "config": cfg.to_dict(),
              "label_names": list(TASKS[cfg.task].label_names), "metrics": metrics,
              **(thresholds or {}), **({"base": base.entry(state.unchanged)} if base else {})}
    save_checkpoint(folder, {"model": state.weights, "epoch": epoch}, recipe, state.optimizer)


def restore(model, optimizer, checkpoint: tune.Checkpoint | None,
            base: Base) -> tuple[int, dict]:
    """Load the newest intact checkpoint of a retried/restored trial; the epoch it
    reached and that epoch's metrics (0 and {} when there is none).

    Ray hands over the last checkpoint it registered; should that one be damaged or
    gone (a finished trial keeps only its best), the trial goes back to its newest
    intact older checkpoint (or to epoch 0) instead of failing again on every retry.
    A checkpoint without optimizer state (not the trial's newest) starts the optimizer
    afresh, with a warning.
    """
    for candidate in fallbacks(checkpoint):
        try:
            with candidate.as_directory() as folder:
                state, recipe = load_checkpoint(folder)
                moments = load_optimizer(folder)
        except (DamagedCheckpoint, OSError) as exc:
            warnings.warn(f"{exc}; trying an older checkpoint")
            continue
        if not base.matches(recipe.get("base")):
            raise DamagedCheckpoint(f"{candidate.path}: the trial's base (its pretrained "
                                    f"file or initialisation) is not the one the checkpoint "
                                    f"was trained from; it cannot go on from there")
        put_weights(model, state["model"], recipe.get("base"), candidate.path)
        if moments is None:
            warnings.warn(f"{candidate.path}: no optimizer state (not the trial's newest "
                          f"checkpoint); the optimizer starts afresh")
        else:
            optimizer.load_state_dict(moments)
        metrics = recipe.get("metrics")
        return int(state["epoch"]), metrics if isinstance(metrics, dict) else {}
    return 0, {}


def fallbacks(checkpoint: tune.Checkpoint | None) -> list[tune.Checkpoint]:
    """``checkpoint``, then the older ``checkpoint_*`` folders beside it, newest first."""
    if checkpoint is None:
        return []
    fs = checkpoint.filesystem
    parent, name = os.path.split(checkpoint.path.rstrip("/"))
    older = [path for path in reversed(checkpoint_folders(fs, parent))
             if os.path.basename(path) < name]
    return [checkpoint, *(tune.Checkpoint(path, filesystem=fs) for path in older)]
