"""Batched augmentation and normalisation: cached uint8 pixels -> model input.

A training batch is a slice of the decoded cache, ``uint8 [B, S, S]``, already on the
trial's device. :func:`to_model_input` turns it into the normalised ``[B, 3, out, out]``
float tensor a backbone eats, on that same device. With an :class:`Augment` it first
applies random resized crop, rotation and horizontal flip as one affine warp per
sample (a single ``grid_sample`` call for the whole batch, no loop over images).

Without augmentation it equals ``covid_tune.data.preprocess.normalize``, the torch-free
path that export and predict use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from covid_tune.core.space import Augment
from covid_tune.data.preprocess import MEAN, STD


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
    ``out_size`` equal to S (the default) the result is ``(x / 255 - MEAN) / STD`` (to
    float rounding); another ``out_size`` is an antialiased bilinear resize.
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
    x = images.to(torch.float32)  # 0..255: the /255 is folded into the normalisation
    if augment is not None and augment != Augment.off():
        theta = _random_theta(augment, len(x), generator).to(x.device)
        x = F.grid_sample(x, _sampling_grid(theta, out_size), mode="bilinear",
                          padding_mode="zeros", align_corners=False)
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
    """Gray 0..255 -> ``(x / 255 - MEAN) / STD`` per channel, the gray broadcast into
    the three channels by one ``addcmul`` (one pass that writes the output, instead of a
    divide, a subtract and a divide)."""
    std = torch.tensor(STD, dtype=torch.float32, device=x.device)
    scale = (1 / (255 * std)).view(shape)
    bias = (-torch.tensor(MEAN, dtype=torch.float32, device=x.device) / std).view(shape)
    return torch.addcmul(bias, x, scale).to(dtype)


def _sampling_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, 1, size, size], align_corners=False)`` (to float
    rounding), built by broadcasting: a term per output column ``[n, 1, size, 2]`` plus
    a term per output row ``[n, size, 1, 2]``, so only their sum is written at full
    size. ``affine_grid`` multiplies a full base grid by every theta instead, which on
    a CPU took about as long as the ``grid_sample`` itself."""
    base = torch.linspace(-1, 1, size, device=theta.device) * ((size - 1) / size)
    columns = (base.view(1, 1, size, 1) * theta[:, None, None, :, 0]
               + theta[:, None, None, :, 2])
    rows = base.view(1, size, 1, 1) * theta[:, None, None, :, 1]
    return columns + rows


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
