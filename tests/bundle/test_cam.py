"""Grad-CAM in numpy (what ``predict --cam`` runs) against Grad-CAM in torch, on both
backbones, with feature maps that the adaptive pool has to stretch (VGG) or average
(ResNet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_tune.bundle.cam import adaptive_pool, grad_cam, pool_backward, write_overlay
from covid_tune.nn.models import WithFeatures, build_model, cam_spec


def torch_grad_cam(model, x: torch.Tensor, direction: np.ndarray) -> np.ndarray:
    """The textbook way: autograd to the last feature maps, channel weights = mean
    gradient, ReLU of the weighted sum, scaled to 0..1."""
    wrapped = WithFeatures(model).eval()
    logits, features = wrapped(x)
    features.retain_grad()
    (logits[0] @ torch.as_tensor(direction, dtype=logits.dtype)).backward()
    alpha = features.grad[0].mean(dim=(1, 2))
    heat = torch.relu((alpha[:, None, None] * features[0]).sum(0)).detach().numpy()
    return heat / heat.max() if heat.max() > 0 else heat


NEW_BACKBONES = [("densenet121", 96, 3), ("resnet50", 96, 2), ("efficientnet_b0", 96, 3),
                 ("convnext_tiny", 96, 3), ("mobilenet_v3_large", 96, 2)]
"""3 x 3 feature maps each; ConvNeXt's gradient also passes its LayerNorm."""


@pytest.mark.slow
@pytest.mark.parametrize("backbone, size, outputs", [
    ("vgg16", 96, 3), ("resnet18", 128, 2),
    *(pytest.param(*case, marks=pytest.mark.backbones) for case in NEW_BACKBONES)])
def test_numpy_grad_cam_matches_torch(backbone, size, outputs):
    torch.manual_seed(0)
    model = build_model(backbone, outputs, hidden=32, dropout=0.5).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _, features = WithFeatures(model)(x)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    spec = cam_spec(model)
    maps = features[0].numpy().astype(np.float64)
    assert maps.shape[1:] == ((4, 4) if backbone == "resnet18" else (3, 3))
    for k in range(outputs):
        direction = np.eye(outputs)[k] if outputs > 2 else np.array([-1.0, 1.0]) * (1 - 2 * k)
        ours = grad_cam(maps, weights, spec, direction)
        theirs = torch_grad_cam(model, x, direction)
        assert ours.shape == theirs.shape
        assert np.allclose(ours, theirs, atol=1e-4), (backbone, k)
        assert ours.max() in (0.0, pytest.approx(1.0))


def test_the_pools_gradient_is_the_adjoint_of_the_pool():
    """<pool(A), G> == <A, pool_backward(G)> for random A and G: the backward pass is
    exactly the transpose of the forward one, for stretching and for shrinking."""
    rng = np.random.default_rng(0)
    for shape, cells in (((2, 3, 3), (7, 7)), ((2, 5, 4), (2, 3)), ((1, 4, 4), (1, 1))):
        a, g = rng.normal(size=shape), rng.normal(size=(shape[0], *cells))
        assert np.isclose((adaptive_pool(a, cells) * g).sum(),
                          (a * pool_backward(g, shape[1:])).sum())
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(a[None]), (1, 1))
    assert np.allclose(adaptive_pool(a, (1, 1)), pooled[0].numpy())


def test_an_overlay_is_a_png_with_the_image_underneath(tmp_path):
    from PIL import Image

    pixels = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    heat = np.array([[0.0, 1.0], [0.5, 0.0]])
    write_overlay(pixels, heat, "covid 0.91; map: covid", tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as image:
        assert image.format == "PNG" and image.size == (400, 430)


def test_explain_decides_on_log_odds_past_saturation():
    """Part 1's class for the map: infected when its log-odds are above the threshold's,
    also hundreds below zero, where the probability is tiny but the classes still differ;
    no overflow on the way."""
    from covid_tune.bundle.cam import explain

    labels = ["normal", "infected"]
    with np.errstate(all="raise"):
        below, title = explain(np.array([0.0, -250.0]), labels, "infected", -200.0)
        above, _ = explain(np.array([0.0, -250.0]), labels, "infected", -300.0)
        deep, _ = explain(np.array([0.0, -800.0]), labels, "infected", -900.0)
    assert title.startswith("normal (P(infected) 0.00)") and list(below) == [1.0, -1.0]
    assert list(above) == list(deep) == [-1.0, 1.0]
    direction, title = explain(np.array([-300.0, 40.0, 400.0]), ["covid", "normal", "pneumonia"])
    assert list(direction) == [0.0, 0.0, 1.0] and title.endswith("map: pneumonia")
