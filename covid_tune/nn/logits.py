"""Running a model over decoded images with PyTorch (no Ray): logits, and the feature
maps Grad-CAM needs. The deterministic evaluation transform (``covid_tune.nn.augment.
to_model_input`` with nothing augmented) is applied on the device. ``covid-tune predict``
does the same with ONNX Runtime and no torch (``covid_tune.bundle.predict``)."""

from __future__ import annotations

import numpy as np
import torch

from covid_tune.nn.augment import to_model_input
from covid_tune.nn.device import Device
from covid_tune.nn.models import Classifier, WithFeatures


@torch.no_grad()
def predict_logits(model, images: np.ndarray, batch_size: int, device: Device,
                   before_batch=None) -> np.ndarray:
    """Logits for uint8 (N, S, S) images with the deterministic evaluation transform;
    ``before_batch`` (if given) is called before each batch (a trial's stop check)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        if before_batch is not None:
            before_batch()
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
