"""Every registered backbone through the deployable path at 32 px: exported to ONNX and
``.pt2`` (export's own checks against PyTorch), run by predict's ONNX Runtime path, and
explained by predict's numpy Grad-CAM (marker ``backbones``: ``make test-backbones``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from covid_tune.bundle.cam import grad_cam
from covid_tune.bundle.export import random_images, write_onnx, write_program
from covid_tune.bundle.predict import head_weights, open_session, run_model
from covid_tune.nn.models import BACKBONES, WithFeatures, build_model, cam_spec

pytestmark = pytest.mark.backbones
SIZE = 32
LABELS = ["covid", "normal", "pneumonia"]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_backbone_exports_predicts_and_explains(backbone, tmp_path):
    """One test per backbone (an export takes seconds): the files are written and
    checked against PyTorch by export's own functions, then read back as ``predict``
    reads them."""
    torch.manual_seed(0)
    model = build_model(backbone, len(LABELS), hidden=8, frozen_layers=1).eval()
    card = export(model, tmp_path)
    check_export(card, tmp_path)
    check_predict_path(model, card, tmp_path)
    check_grad_cam(card, tmp_path)


def export(model, folder: Path) -> dict:
    """model.pt2, model.onnx, model.safetensors and the card entries predict reads."""
    _, program = write_program(model, folder / "model.pt2", SIZE)
    onnx = write_onnx(model, folder / "model.onnx", SIZE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return {"files": {"onnx": "model.onnx", "weights": "model.safetensors"},
            "input": {"name": "images"}, "output": {"label_order": LABELS},
            "cam": cam_spec(model), "checks": {**program, **onnx}}


def check_export(card: dict, folder: Path) -> None:
    assert (folder / "model.pt2").is_file() and (folder / "model.onnx").is_file()
    assert card["checks"]["onnx_max_abs_diff"] < 1e-3
    assert card["checks"]["program_max_abs_diff"] < 1e-3
    assert card["checks"]["onnx_opset"] >= 17


def check_predict_path(model, card: dict, folder: Path) -> None:
    """predict's ONNX Runtime path gives PyTorch's logits and last feature maps."""
    x = random_images(5, SIZE, 7)
    logits, features = run_model(open_session(folder / "model.onnx"), card, x.numpy(), str(folder))
    with torch.no_grad():
        want_logits, want_features = WithFeatures(model)(x)
        plain = model(x)
    assert np.allclose(logits, plain.numpy(), rtol=1e-3, atol=1e-4)
    assert np.allclose(logits, want_logits.numpy(), rtol=1e-3, atol=1e-4)
    assert np.allclose(features, want_features.numpy(), rtol=1e-3, atol=1e-4)


def check_grad_cam(card: dict, folder: Path) -> None:
    """predict --cam's inputs: the ONNX feature maps, and the head (and ConvNeXt's
    LayerNorm) read from model.safetensors without torch, give a 0..1 heat map."""
    x = random_images(1, SIZE, 3)
    _, features = run_model(open_session(folder / "model.onnx"), card, x.numpy(), str(folder))
    weights = head_weights(folder, card)
    heat = grad_cam(features[0].astype(np.float64), weights, card["cam"], np.eye(3)[0])
    assert heat.shape == features.shape[2:]
    assert np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0
