"""Batched augmentation and normalisation: cached uint8 pixels -> model input.

A training batch is a slice of the decoded cache, ``uint8 [B, S, S]``, already on the
trial's device. :func:`to_model_input` turns it into the normalised ``[B, 3, out, out]``
float tensor a backbone eats, on that same device. With an :class:`Augment` it first
applies random resized crop, rotation and horizontal flip as one affine warp per
sample (a single ``grid_sample`` call for the whole batch, no loop over images).

:func:`normalize_numpy` is the evaluation path (no augmentation, no resize) in plain
numpy, for ONNX prediction without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
"""ImageNet per-channel mean of [0, 1] pixels; gray is repeated to three channels."""
STD = (0.229, 0.224, 0.225)
"""ImageNet per-channel standard deviation of [0, 1] pixels."""


@dataclass(frozen=True)
class Augment:
    """Random geometry for each training image; ``None`` or :meth:`off` means none."""

    rotation: float = 15.0
    """Largest rotation in degrees; each sample turns uniformly within ±rotation."""
    scale: tuple[float, float] = (0.7, 1.0)
    """Range of the fraction of the image area the crop keeps, as in torchvision's
    ``RandomResizedCrop``; the crop is then stretched to the output size."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's width / height, sampled log-uniformly. A side that would
    exceed the image is clipped to it, so extreme ratios keep less area than asked."""
    flip: bool = True
    """Mirror left-right with probability 0.5."""

    def __post_init__(self) -> None:
        problems = []
        if not self.rotation >= 0:
            problems.append(f"rotation must be >= 0 degrees, got {self.rotation}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            problems.append(f"scale must be 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def off(cls) -> Augment:
        """The identity: no rotation, the whole image, no flip."""
        return cls(rotation=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)


def to_model_input(
    images: torch.Tensor,
    *,
    augment: Augment | None,
    generator: torch.Generator | None = None,
    out_size: int | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``uint8 [B, S, S]`` or ``[B, 1, S, S]`` -> normalised float ``[B, 3, out, out]``.

    Everything runs on ``images.device``. Random numbers are drawn on the CPU from
    ``generator`` (a CPU generator; ``None`` uses torch's global one) and then moved,
    so a seeded run repeats on CPU and GPU alike. Without augmentation and with
    ``out_size`` equal to S (the default) the result is exactly
    ``(x / 255 - MEAN) / STD``; another ``out_size`` is an antialiased bilinear resize.
    The augmenting warp samples bilinearly straight at ``out_size`` (no antialiasing)
    and fills what rotation brings in from outside the image with black.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected [B, S, S] or [B, 1, S, S], got {images.shape}")
    size = images.shape[-1]
    out_size = out_size or size
    x = images.to(torch.float32) / 255
    if augment is not None and augment != Augment.off():
        theta = _random_theta(augment, len(x), generator).to(x.device)
        grid = F.affine_grid(theta, [len(x), 1, out_size, out_size],
                             align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    elif out_size != size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True,
                          align_corners=False)
    if channels_last:  # broadcast gray into [B, H, W, 3]: channels_last with no copy
        x = _normalize(x.permute(0, 2, 3, 1), (1, 1, 1, 3), dtype)
        return x.permute(0, 3, 1, 2)
    return _normalize(x, (1, 3, 1, 1), dtype)


def _normalize(
    x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(shape)
    std = torch.tensor(STD, device=x.device).view(shape)
    return ((x - mean) / std).to(dtype)


def _random_theta(
    augment: Augment, n: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample ``n`` warps as ``affine_grid`` thetas ``[n, 2, 3]`` (CPU, float32).

    A theta maps output coordinates in [-1, 1] to input coordinates: the output square
    is scaled to the crop's half-sizes (x negated to flip), rotated, and moved to the
    crop centre, which is drawn so the unrotated crop stays inside the image.
    Always draws ``6 * n`` numbers, whatever the settings.
    """
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * augment.rotation)
    area = augment.scale[0] + u[:, 1] * (augment.scale[1] - augment.scale[0])
    log_lo, log_hi = math.log(augment.ratio[0]), math.log(augment.ratio[1])
    ratio = torch.exp(log_lo + u[:, 2] * (log_hi - log_lo))
    width = torch.sqrt(area * ratio).clamp(max=1)  # fraction of the image width
    height = torch.sqrt(area / ratio).clamp(max=1)
    centre_x = (2 * u[:, 3] - 1) * (1 - width)
    centre_y = (2 * u[:, 4] - 1) * (1 - height)
    flip = (u[:, 5] < 0.5) & augment.flip
    sx = torch.where(flip, -width, width)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx, -sin * height, centre_x], dim=1),
        torch.stack([sin * sx, cos * height, centre_y], dim=1),
    ], dim=1)
    return theta.to(torch.float32)


def normalize_numpy(images: np.ndarray) -> np.ndarray:
    """Evaluation path without torch: ``uint8 (B, S, S)`` -> ``float32 (B, 3, S, S)``.

    Equal to ``to_model_input(torch.from_numpy(images), augment=None)``.
    """
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 (B, S, S), got {images.dtype} {images.shape}")
    x = images[:, None].astype(np.float32) / np.float32(255)
    mean = np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std
