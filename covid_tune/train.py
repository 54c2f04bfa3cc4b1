"""One trial: build the model, train epoch by epoch, report metrics and a checkpoint.

``train_trial(config, data)`` is the Ray Tune trainable. Its data arrives through
``tune.with_parameters`` (one copy in the object store, shared by the trials of a
node). Each epoch it reports the train and validation metrics (and the id of the Ray
node it ran on) and a checkpoint holding the weights, the optimizer, the epoch and the
recipe (resolved config, label names), so a retried or restored trial continues from
its last epoch.

Checkpoints are written whole into a temporary folder that Ray then copies to storage
and registers only once the copy is complete. The recipe records the size and SHA-256
of ``checkpoint.pt``, so ``load_checkpoint`` refuses a copy cut short (on shared
storage, say) and ``restore`` falls back to the trial's newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray
import torch
from ray import tune

from covid_tune.augment import Augment, to_model_input
from covid_tune.config import TrialConfig
from covid_tune.data import DataBundle, Split
from covid_tune.errors import UserError
from covid_tune.losses import build_loss
from covid_tune.metrics import compute_metrics
from covid_tune.models import build_model
from covid_tune.tasks import TASKS, Task
from covid_tune.tensorboard import TrialWriter

CHECKPOINT_FILE = "checkpoint.pt"
RECIPE_FILE = "recipe.json"
CRASH_ENV = "COVID_TUNE_TEST_CRASH_AT_EPOCH"
"""Test-only (tests/test_cluster.py): a trial that started from scratch exits its
process at this epoch, as a crash would, to prove it is retried from its checkpoint."""


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed, the sweep goes on."""


DIVERGED_FILE = "diverged.txt"
"""Written in the trial folder when the trial diverges: its retries then fail at once."""


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


class DamagedCheckpoint(UserError):
    """A checkpoint folder whose files are missing, cut short or altered."""


@dataclass
class Device:
    """Where a trial runs and the GPU-only speed-ups that apply there."""

    torch: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def pick(cls) -> Device:
        if not torch.cuda.is_available():
            return cls(torch.device("cpu"), None, False)
        torch.backends.cudnn.benchmark = True
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cls(torch.device("cuda"), amp, True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch.type, dtype=self.amp_dtype)


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
    cfg = TrialConfig.from_dict(config)
    task = TASKS[cfg.task]
    device = Device.pick()
    _set_threads()
    model, optimizer, scaler, loss_fn = build_training(cfg, device)
    start = restore(model, optimizer, tune.get_checkpoint())
    node_id = ray.get_runtime_context().get_node_id()
    writer = TrialWriter.open(cfg)
    for epoch in range(start + 1, cfg.max_epochs + 1):
        crash_if_asked(epoch, start)
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, data.splits["train"], loss_fn, optimizer, scaler,
                                cfg, device, epoch)
        val = evaluate(model, data.splits["validation"], loss_fn, cfg, device)
        metrics, confusion = epoch_metrics(task, train, val, epoch, lr)
        metrics["node_id"] = node_id
        writer.log_epoch(epoch, metrics, confusion)
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), model, optimizer, epoch, cfg, metrics)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    writer.close()


def crash_if_asked(epoch: int, start: int) -> None:
    """Test-only: see ``CRASH_ENV``. Never set outside the tests."""
    if start == 0 and os.environ.get(CRASH_ENV) == str(epoch):
        os._exit(1)


def _set_threads() -> None:
    """Use as many threads as the CPUs Ray gave this trial."""
    with contextlib.suppress(Exception):
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))


def build_training(cfg: TrialConfig, device: Device):
    """(model, optimizer, grad scaler, loss) for a trial; the same config starts from
    the same weights."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.backbone, TASKS[cfg.task].outputs, cfg.hidden, cfg.dropout,
                        cfg.frozen_layers, cfg.pretrained).to(device.torch)
    if device.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(enabled=device.amp_dtype == torch.float16)
    loss_fn = build_loss(cfg.loss, cfg.focal_alpha, cfg.focal_gamma)
    return model, build_optimizer(model, cfg), scaler, loss_fn


def build_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def batches(n: int, batch_size: int, order: torch.Tensor | None = None):
    """Index arrays of one pass over ``n`` samples."""
    indices = order.numpy() if order is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield np.sort(indices[start:start + batch_size])


def to_device(split: Split, index: np.ndarray, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(split.images[index])
    targets = torch.from_numpy(split.targets[index])
    if device.torch.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    return (images.to(device.torch, non_blocking=True),
            targets.to(device.torch, non_blocking=True))


def train_one_epoch(model, split: Split, loss_fn, optimizer, scaler, cfg: TrialConfig,
                    device: Device, epoch: int) -> EpochResult:
    """One pass over the training split with augmentation on the trial's device."""
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    augment = Augment(**_augment_args(cfg.augment)) if cfg.augment else None
    started, total, outputs, targets = time.perf_counter(), 0.0, [], []
    order = torch.randperm(len(split), generator=generator)
    for index in batches(len(split), cfg.batch_size, order):
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


def _augment_args(augment: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()}


@torch.no_grad()
def predict_logits(model, images: np.ndarray, batch_size: int, device: Device,
                   channels_last: bool = False) -> np.ndarray:
    """Logits for uint8 (N, S, S) images with the deterministic evaluation transform."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size].copy()).to(device.torch)
        x = to_model_input(x, augment=None, channels_last=channels_last)
        with device.autocast():
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs).numpy()


@torch.no_grad()
def evaluate(model, split: Split, loss_fn, cfg: TrialConfig, device: Device) -> EpochResult:
    """Loss and logits on a labelled split, no augmentation."""
    started = time.perf_counter()
    outputs = predict_logits(model, split.images, max(cfg.batch_size, 64), device,
                             device.channels_last)
    loss = loss_fn(torch.from_numpy(outputs), torch.from_numpy(split.targets)).item()
    return EpochResult(loss, outputs, split.targets, len(split), time.perf_counter() - started)


def epoch_metrics(task: Task, train: EpochResult, val: EpochResult, epoch: int,
                  lr: float) -> tuple[dict, object]:
    """The flat dict reported to Tune (``train_*`` and ``val_*`` scalars and timings),
    and the validation confusion matrix (or matrices) for TensorBoard."""
    metrics = {"epoch": epoch, "lr": lr, "epoch_seconds": train.seconds + val.seconds,
               "train_images_per_second": train.images / max(train.seconds, 1e-9)}
    confusion = None
    for prefix, result in (("train", train), ("val", val)):
        metrics[f"{prefix}_loss"] = result.loss
        scores = compute_metrics(task, result.targets, result.outputs)
        confusion = scores.pop("confusion")
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    if not math.isfinite(metrics["val_loss"]):
        raise TrialDiverged(f"validation loss became {metrics['val_loss']} at epoch {epoch}")
    return metrics, confusion


def save_checkpoint(folder: Path, model, optimizer, epoch: int, cfg: TrialConfig,
                    metrics: dict) -> None:
    """Weights + optimizer (``checkpoint.pt``) and the recipe (``recipe.json``), which
    also records the size and SHA-256 of ``checkpoint.pt``."""
    task = TASKS[cfg.task]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
    torch.save(state, folder / CHECKPOINT_FILE)
    recipe = {"epoch": epoch, "config": cfg.to_dict(), "label_names": list(task.label_names),
              "metrics": metrics,
              "files": {CHECKPOINT_FILE: file_digest(folder / CHECKPOINT_FILE)}}
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))


def file_digest(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_recipe(folder: str | Path) -> dict:
    """A checkpoint's recipe, after checking its files against it; DamagedCheckpoint if not."""
    folder = Path(folder)
    try:
        recipe = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{folder}: no readable {RECIPE_FILE} ({exc})") from None
    for name, expected in recipe.get("files", {}).items():
        path = folder / name
        if not path.is_file() or file_digest(path) != expected:
            raise DamagedCheckpoint(f"{folder}: {name} is missing, cut short or altered "
                                    f"(its size or SHA-256 differs from {RECIPE_FILE})")
    return recipe


def is_intact(folder: str | Path) -> bool:
    """Whether a checkpoint folder's files match its recipe (a copy cut short does not)."""
    try:
        read_recipe(folder)
    except DamagedCheckpoint:
        return False
    return True


def load_checkpoint(folder: str | Path) -> tuple[dict, dict]:
    """(state, recipe) of an intact checkpoint folder, read without unpickling code."""
    folder = Path(folder)
    recipe = read_recipe(folder)
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state, recipe


def restore(model, optimizer, checkpoint: tune.Checkpoint | None) -> int:
    """Load the newest intact checkpoint of a retried/restored trial; the epoch it reached.

    Ray hands over the last checkpoint it registered; should that one be damaged, the
    trial goes back to its newest intact older checkpoint (or to epoch 0) instead of
    failing again on every retry.
    """
    for candidate in fallbacks(checkpoint):
        try:
            with candidate.as_directory() as folder:
                state, _ = load_checkpoint(folder)
        except DamagedCheckpoint as exc:
            warnings.warn(f"{exc}; trying an older checkpoint")
            continue
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"])
    return 0


def fallbacks(checkpoint: tune.Checkpoint | None) -> list[tune.Checkpoint]:
    """``checkpoint``, then the older ``checkpoint_*`` folders beside it, newest first."""
    if checkpoint is None:
        return []
    fs = checkpoint.filesystem
    parent, name = os.path.split(checkpoint.path.rstrip("/"))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    older = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name),
                   reverse=True)
    return [checkpoint, *(tune.Checkpoint(path, filesystem=fs) for path in older)]
