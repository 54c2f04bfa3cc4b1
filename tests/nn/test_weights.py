"""Inference with PyTorch alone: a model rebuilt from a checkpoint gives the logits the
trial's own model gave, whatever the batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_tune.core.space import TrialConfig
from covid_tune.nn.weights import build_for, load_model
from covid_tune.nn.logits import predict_logits
from covid_tune.nn.device import Device
from covid_tune.runs.checkpoint import DamagedCheckpoint
from covid_tune.training.trial import build_optimizer, write_checkpoint

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_checkpoint_cut_short_is_refused(tmp_path):
    model = build_for(CONFIG)
    write_checkpoint(tmp_path, model, build_optimizer(model, CONFIG), 1, CONFIG, {})
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:100])
    with pytest.raises(DamagedCheckpoint, match="cut short"):
        load_model(tmp_path)


def trained_with_base(folder, cfg: TrialConfig):
    """A trial's start as the trainable makes it (seeded, from ``cfg.pretrained``), one
    step of training, and its checkpoint written with its base."""
    from covid_tune.nn.weights import Base

    torch.manual_seed(cfg.seed)
    model = build_for(cfg, cfg.pretrained)
    base = Base.of(model, cfg)
    optimizer = build_optimizer(model, cfg)
    model.train()(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, model, optimizer, 1, cfg, {}, base=base)
    return model


def same_weights(a, b) -> bool:
    one, two = a.state_dict(), b.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [20, 7])
def test_frozen_layers_are_stored_by_reference_to_the_pretrained_file(tmp_path, frozen):
    """Tensors still as the pretrained file had them are not stored: the recipe names
    the file and its SHA-256; ``load_model`` rebuilds the very weights from it, and
    refuses clearly when the file is gone or changed."""
    from dataclasses import replace

    from torchvision.models import resnet18

    from covid_tune.errors import UserError
    from covid_tune.runs.checkpoint import CHECKPOINT_FILE, read_recipe

    weights = tmp_path / "resnet18-local.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    cfg = replace(CONFIG, pretrained=str(weights), frozen_layers=frozen)
    model = trained_with_base(tmp_path / "ckpt", cfg)
    recipe = read_recipe(tmp_path / "ckpt")
    stored = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert recipe["base"]["kind"] == "pretrained" and recipe["base"]["path"] == str(weights)
    assert set(recipe["base"]["tensors"]).isdisjoint(stored)
    assert set(recipe["base"]["tensors"]) | set(stored) == set(model.state_dict())
    assert all(k.startswith("net.fc.") or not k.startswith("net.conv1.")
               for k in stored)  # the first conv is frozen in both cases
    assert same_weights(load_model(tmp_path / "ckpt"), model)
    weights.rename(tmp_path / "elsewhere.pth")
    with pytest.raises(UserError, match=r"pretrained file .*resnet18-local.pth .*which is not "
                                        r"there; put that file back"):
        load_model(tmp_path / "ckpt")
    changed = resnet18(weights=None).state_dict()
    torch.save(changed, weights)
    with pytest.raises(UserError, match="differs from the file it was trained from"):
        load_model(tmp_path / "ckpt")


@pytest.mark.slow
def test_untrained_layers_of_a_random_start_are_stored_by_seed(tmp_path):
    """``pretrained: none``: frozen layers are the trial's seeded initialisation,
    recorded by seed and SHA-256 and rebuilt on load."""
    from dataclasses import replace

    from covid_tune.runs.checkpoint import CHECKPOINT_FILE, read_recipe

    cfg = replace(CONFIG, frozen_layers=20, seed=7)
    model = trained_with_base(tmp_path / "ckpt", cfg)
    recipe = read_recipe(tmp_path / "ckpt")
    assert recipe["base"]["kind"] == "init" and recipe["base"]["seed"] == 7
    stored = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert sorted(stored) == sorted(k for k in model.state_dict() if k.startswith("net.fc."))
    assert same_weights(load_model(tmp_path / "ckpt"), model)


@pytest.mark.backbones
@pytest.mark.parametrize("backbone", ["densenet121", "resnet50", "efficientnet_b0",
                                      "convnext_tiny", "mobilenet_v3_large"])
def test_every_backbone_round_trips_through_a_checkpoint(tmp_path, backbone):
    """Half the units frozen from a seeded start: the frozen tensors are recorded by seed
    and left out of the file, and ``load_model`` rebuilds the very model."""
    from dataclasses import replace

    from covid_tune.core.space import unit_count
    from covid_tune.runs.checkpoint import CHECKPOINT_FILE, read_recipe

    cfg = replace(CONFIG, backbone=backbone, frozen_layers=unit_count(backbone) // 2, seed=3)
    model = trained_with_base(tmp_path / "ckpt", cfg)
    recipe = read_recipe(tmp_path / "ckpt")
    stored = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)["model"]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen <= set(recipe["base"]["tensors"]) and frozen.isdisjoint(stored)
    assert same_weights(load_model(tmp_path / "ckpt"), model)
