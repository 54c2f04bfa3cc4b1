"""Running a trained model with PyTorch, and no Ray: where trials, re-scoring and export meet.

``Device`` picks the CPU or a GPU and the GPU-only speed-ups (mixed precision,
channels-last). ``predict_logits`` runs a model over decoded uint8 images with the
deterministic evaluation transform. ``load_model`` rebuilds a trial's model from a
checkpoint folder (through ``covid_tune.runs``, which owns that format).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covid_tune.augment import to_model_input
from covid_tune.config import TrialConfig
from covid_tune.models import Classifier, WithFeatures, build_model
from covid_tune.runs import load_checkpoint
from covid_tune.tasks import TASKS


@dataclass
class Device:
    """Where a model runs and the GPU-only speed-ups that apply there."""

    torch: torch.device
    amp_dtype: torch.dtype | None
    """bf16 (or fp16 where bf16 is not supported) on a GPU; ``None`` on the CPU."""
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


@torch.no_grad()
def predict_logits(model, images: np.ndarray, batch_size: int, device: Device) -> np.ndarray:
    """Logits for uint8 (N, S, S) images with the deterministic evaluation transform."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size].copy()).to(device.torch)
        x = to_model_input(x, augment=None, channels_last=device.channels_last)
        with device.autocast():
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs).numpy()


@torch.no_grad()
def logits_and_features(model: Classifier, images: np.ndarray,
                        device: Device) -> tuple[np.ndarray, np.ndarray]:
    """Logits and last feature maps (for Grad-CAM) of a few uint8 images."""
    wrapped = WithFeatures(model).eval()
    x = torch.from_numpy(images.copy()).to(device.torch)
    logits, features = wrapped(to_model_input(x, augment=None))
    return logits.float().cpu().numpy(), features.float().cpu().numpy().astype(np.float64)


def build_for(cfg: TrialConfig, pretrained: str = "none") -> Classifier:
    """The network a trial config describes (random head; backbone from ``pretrained``)."""
    return build_model(cfg.backbone, TASKS[cfg.task].outputs, cfg.hidden, cfg.dropout,
                       cfg.frozen_layers, pretrained)


def load_model(checkpoint: str | Path) -> Classifier:
    """A trial's model from one of its checkpoint folders, in eval mode, on the CPU."""
    state, recipe = load_checkpoint(checkpoint)
    model = build_for(TrialConfig.from_dict(recipe["config"]))
    model.load_state_dict(state["model"])
    return model.eval()
