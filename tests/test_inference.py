"""Inference with PyTorch alone: a model rebuilt from a checkpoint gives the logits the
trial's own model gave, whatever the batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_tune.config import TrialConfig
from covid_tune.inference import Device, build_for, load_model, predict_logits
from covid_tune.runs import DamagedCheckpoint
from covid_tune.train import build_optimizer, write_checkpoint

CPU = Device(torch.device("cpu"), None, False)
CONFIG = TrialConfig(task="multilabel", backbone="resnet18", frozen_layers=5, lr=0.01,
                     momentum=0.9, batch_size=8, weight_decay=0.0, hidden=8, dropout=0.0,
                     loss="bce", focal_alpha=0.25, focal_gamma=2.0, max_epochs=1,
                     image_size=32, augment=None, pretrained="none", metric="val_f1",
                     mode="max")


def test_cpu_device_uses_no_gpu_only_speedups():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    device = Device.pick()
    assert device.torch.type == "cpu" and device.amp_dtype is None
    assert not device.channels_last


def test_a_model_from_its_checkpoint_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = build_for(CONFIG)
    write_checkpoint(tmp_path, model, build_optimizer(model, CONFIG), 1, CONFIG, {})
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    expected = predict_logits(model, images, 5, CPU)
    loaded = load_model(tmp_path)
    assert not loaded.training and expected.shape == (5, 3)
    for batch in (1, 2, 5):
        assert np.allclose(predict_logits(loaded, images, batch, CPU), expected, atol=1e-5)


def test_a_checkpoint_cut_short_is_refused(tmp_path):
    model = build_for(CONFIG)
    write_checkpoint(tmp_path, model, build_optimizer(model, CONFIG), 1, CONFIG, {})
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:100])
    with pytest.raises(DamagedCheckpoint, match="cut short"):
        load_model(tmp_path)
