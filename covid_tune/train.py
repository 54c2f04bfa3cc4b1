"""One trial: build the model, train epoch by epoch, report metrics and a checkpoint.

``train_trial(config, data)`` is the Ray Tune trainable. Its data arrives through
``tune.with_parameters`` (one copy in the object store, shared by the trials of a
node). Each epoch it reports the train and validation metrics and a checkpoint holding
the weights, the optimizer, the epoch and the recipe (resolved config, label names), so
a retried or restored trial continues from its last epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import tune

from covid_tune.augment import Augment, to_model_input
from covid_tune.config import TrialConfig
from covid_tune.data import DataBundle, Split
from covid_tune.losses import build_loss
from covid_tune.metrics import compute_metrics
from covid_tune.models import build_model
from covid_tune.tasks import TASKS, Task
from covid_tune.tensorboard import TrialWriter

CHECKPOINT_FILE = "checkpoint.pt"
RECIPE_FILE = "recipe.json"


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed, the sweep goes on."""


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


def train_trial(config: dict, data: DataBundle) -> None:
    """The Ray Tune trainable: a function of (config, data handle)."""
    cfg = TrialConfig.from_dict(config)
    task = TASKS[cfg.task]
    device = Device.pick()
    _set_threads()
    torch.manual_seed(cfg.seed)  # the same config starts from the same weights
    model = build_model(cfg.backbone, task.outputs, cfg.hidden, cfg.dropout,
                        cfg.frozen_layers, cfg.pretrained).to(device.torch)
    if device.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(enabled=device.amp_dtype == torch.float16)
    loss_fn = build_loss(cfg.loss, cfg.focal_alpha, cfg.focal_gamma)
    start = restore(model, optimizer, tune.get_checkpoint())
    writer = TrialWriter.open(cfg)
    for epoch in range(start + 1, cfg.max_epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, data.splits["train"], loss_fn, optimizer, scaler,
                                cfg, device, epoch)
        val = evaluate(model, data.splits["validation"], loss_fn, cfg, device)
        metrics = epoch_metrics(task, train, val, epoch, lr)
        writer.log_epoch(epoch, metrics, val_confusion(task, val))
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), model, optimizer, epoch, cfg, metrics)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    writer.close()


def _set_threads() -> None:
    """Use as many threads as the CPUs Ray gave this trial."""
    with contextlib.suppress(Exception):
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))


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
                  lr: float) -> dict:
    """The flat dict reported to Tune: ``train_*`` and ``val_*`` scalars and timings."""
    metrics = {"epoch": epoch, "lr": lr, "epoch_seconds": train.seconds + val.seconds,
               "train_images_per_second": train.images / max(train.seconds, 1e-9)}
    for prefix, result in (("train", train), ("val", val)):
        metrics[f"{prefix}_loss"] = result.loss
        scores = compute_metrics(task, result.targets, result.outputs)
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items() if k != "confusion"})
    if not math.isfinite(metrics["val_loss"]):
        raise TrialDiverged(f"validation loss became {metrics['val_loss']} at epoch {epoch}")
    return metrics


def val_confusion(task: Task, val: EpochResult):
    return compute_metrics(task, val.targets, val.outputs)["confusion"]


def save_checkpoint(folder: Path, model, optimizer, epoch: int, cfg: TrialConfig,
                    metrics: dict) -> None:
    """Weights + optimizer (``checkpoint.pt``) and the recipe (``recipe.json``)."""
    task = TASKS[cfg.task]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
    torch.save(state, folder / CHECKPOINT_FILE)
    recipe = {"epoch": epoch, "config": cfg.to_dict(), "label_names": list(task.label_names),
              "metrics": metrics}
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))


def load_checkpoint(folder: str | Path) -> tuple[dict, dict]:
    """(state, recipe) of a checkpoint folder, read without unpickling code."""
    folder = Path(folder)
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    return state, recipe


def restore(model, optimizer, checkpoint: tune.Checkpoint | None) -> int:
    """Load the last checkpoint of a retried/restored trial; the epoch it reached."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state, _ = load_checkpoint(folder)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])

