"""Grad-CAM with numpy alone: where the model looked, from the exported ONNX model.

The exported ONNX model gives, beside the logits, the last convolutional feature maps
``A`` (``C x h x w``). After them the network is fixed: an adaptive average pool to
``pool`` cells, a flatten, then the head ``Linear -> ReLU -> Dropout -> Linear``, whose
weights are in ``model.safetensors``. So the gradient of a class score with respect to
``A`` is a few lines of numpy, and Grad-CAM (Selvaraju et al., 2017) follows: each
channel is weighted by the mean of its gradient, the weighted sum is passed through a
ReLU and scaled to 0..1. ``model.json``'s ``cam`` entry names the output, the pool and
the head's two layers (and ConvNeXt's LayerNorm before the head). Nothing here imports
torch.
"""

from __future__ import annotations

import math

import numpy as np

from covid_tune.core.numeric import sigmoid


def pool_windows(size: int, cells: int) -> list[tuple[int, int]]:
    """(start, end) of each cell of an adaptive average pool from ``size`` to ``cells``,
    as PyTorch computes them (floor of the start, ceiling of the end)."""
    return [(math.floor(i * size / cells), math.ceil((i + 1) * size / cells))
            for i in range(cells)]


def adaptive_pool(features: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """``(C, h, w)`` -> ``(C, cells[0], cells[1])`` averages."""
    rows = pool_windows(features.shape[1], cells[0])
    cols = pool_windows(features.shape[2], cells[1])
    return np.array([[[features[c, r0:r1, c0:c1].mean() for c0, c1 in cols] for r0, r1 in rows]
                     for c in range(features.shape[0])])


def pool_backward(grad: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The gradient reaching ``(C, h, w)`` features from ``(C, ph, pw)`` pooled cells."""
    out = np.zeros((grad.shape[0], *shape))
    for i, (r0, r1) in enumerate(pool_windows(shape[0], grad.shape[1])):
        for j, (c0, c1) in enumerate(pool_windows(shape[1], grad.shape[2])):
            out[:, r0:r1, c0:c1] += grad[:, i, j, None, None] / ((r1 - r0) * (c1 - c0))
    return out


def score_gradient(features: np.ndarray, weights: dict[str, np.ndarray], cam: dict,
                   direction: np.ndarray) -> np.ndarray:
    """d(direction . logits) / d features, for one image's ``(C, h, w)`` features.

    ``direction`` picks the score: a one-hot row for one label's logit, or
    ``[-1, 1]`` for Part 1's log-odds of infected.
    """
    first, last = cam["head"]
    w1, b1 = weights[f"{first}.weight"], weights[f"{first}.bias"]
    w2 = weights[f"{last}.weight"]
    cells = tuple(cam["pool"])
    pooled = adaptive_pool(features, cells).reshape(-1)
    norm = cam.get("norm")
    if norm:  # ConvNeXt: a LayerNorm over the channels of the (1 x 1) pooled features
        gamma, beta = weights[f"{norm}.weight"], weights[f"{norm}.bias"]
        scale = 1.0 / np.sqrt(pooled.var() + cam["norm_eps"])
        unit = (pooled - pooled.mean()) * scale
        pooled = unit * gamma + beta
    active = (w1 @ pooled + b1) > 0  # ReLU; Dropout is the identity at inference
    grad_pooled = ((direction @ w2) * active) @ w1
    if norm:  # back through the LayerNorm
        g = grad_pooled * gamma
        grad_pooled = scale * (g - g.mean() - unit * (g * unit).mean())
    return pool_backward(grad_pooled.reshape(features.shape[0], *cells), features.shape[1:])


def grad_cam(features: np.ndarray, weights: dict[str, np.ndarray], cam: dict,
             direction: np.ndarray) -> np.ndarray:
    """The ``(h, w)`` Grad-CAM map of one image, scaled to 0..1 (all zeros when nothing
    in the image raised the score)."""
    grad = score_gradient(features, weights, cam, direction)
    alpha = grad.mean(axis=(1, 2))
    heat = np.maximum(np.tensordot(alpha, features, axes=1), 0.0)
    top = heat.max()
    return heat / top if top > 0 else heat


def explain(logits: np.ndarray, labels: list[str], positive: str | None = None,
            threshold_logit: float = 0.0) -> tuple[np.ndarray, str]:
    """(the score a map explains, as a direction over the logits; a title) for one
    image. Part 2 (``positive`` None): the most probable label (the highest logit).
    Part 1: the predicted class, ``positive`` when its log-odds are above
    ``threshold_logit`` (0 is P = 0.5), as the log-odds of that class."""
    if positive is None:
        top = int(np.argmax(logits))
        words = ", ".join(f"{label} {p:.2f}" for label, p in zip(labels, sigmoid(logits)))
        return np.eye(len(labels))[top], f"{words}; map: {labels[top]}"
    index = labels.index(positive)
    score = float(logits[index] - logits[1 - index])
    p = float(sigmoid(score))
    chosen = positive if score > threshold_logit else labels[1 - index]
    direction = np.zeros(2)
    direction[index] = 1.0 if chosen == positive else -1.0
    direction[1 - index] = -direction[index]
    return direction, f"{chosen} (P({positive}) {p:.2f}); map: {chosen}"


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
    """A ``(h, w)`` map stretched to ``size x size`` by bilinear interpolation."""
    from PIL import Image

    image = Image.fromarray(heat.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def write_overlay(pixels: np.ndarray, heat: np.ndarray, title: str, path) -> None:
    """The grayscale image with the heat map over it, and ``title`` above, as a PNG."""
    write_overlays([(pixels, heat, title)], path)


def write_overlays(items: list[tuple[np.ndarray, np.ndarray, str]], path,
                   heading: str = "") -> None:
    """Overlays side by side in one PNG (up to four in a row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(items), 4)
    rows = -(-len(items) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.3 * rows), dpi=100,
                                squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (pixels, heat, title) in zip(axes.ravel(), items):
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=255)
        ax.imshow(upsample(heat, pixels.shape[0]), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    if heading:
        figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
