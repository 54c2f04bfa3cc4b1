"""Backbones, heads, freezing and offline weight loading (all without ImageNet)."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from covid_tune.core.space import BACKBONE_CONVS, conv_count
from covid_tune.errors import UserError
from covid_tune.nn.models import (
    BACKBONES,
    build_model,
    check_pretrained,
    imagenet_cache_path,
    trainable_parameters,
)

HEAD_256_2 = 256 + 256 * 2 + 2  # second Linear, and the first Linear's bias


def params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def vgg_free():
    return build_model("vgg16", outputs=2)


@pytest.fixture(scope="module")
def vgg_first7():
    return build_model("vgg16", outputs=2, frozen_layers=7)


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub dir; download attempts fail the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def resnet_state():
    return torchvision.models.resnet18(weights=None).state_dict()


def assert_backbone_equal(model, state):
    loaded = model.net.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


@pytest.mark.slow
def test_config_conv_counts_match_the_built_nets():
    """The space validator's limits on frozen_layers (config, torch-free) are the
    Conv2d modules of the nets models.py builds."""
    assert set(BACKBONE_CONVS) == set(BACKBONES)
    for backbone, convs in BACKBONE_CONVS.items():
        net = build_model(backbone, outputs=2)
        assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == convs, backbone
        assert BACKBONES[backbone].convs == convs == conv_count(backbone)
    assert BACKBONE_CONVS == {"vgg16": 13, "resnet18": 20}


@pytest.mark.slow
def test_vgg_head_and_trainable_counts(vgg_free, vgg_first7):
    features = vgg_free.net.features
    head = 25088 * 256 + HEAD_256_2
    assert [m.in_features for m in vgg_free.head if isinstance(m, nn.Linear)] == [25088, 256]
    assert trainable_parameters(vgg_free) == params(features) + head
    assert trainable_parameters(vgg_first7) == params(features) - params(vgg_first7.net.features[:17]) + head


def test_vgg_first7_freezes_exactly_features_17(vgg_first7):
    expected = {f"net.features.{name}" for name, _ in vgg_first7.net.features[:17].named_parameters()}
    assert frozen_names(vgg_first7) == expected


@pytest.mark.slow
@pytest.mark.parametrize("frozen, block", [(4, 10), (13, 31)])
def test_vgg_first_n_convs_are_features_prefix(frozen, block):
    model = build_model("vgg16", outputs=2, frozen_layers=frozen)
    expected = {f"net.features.{name}" for name, _ in model.net.features[:block].named_parameters()}
    assert frozen_names(model) == expected
    if frozen == 13:  # "All layers except FC"
        assert trainable_parameters(model) == 25088 * 256 + HEAD_256_2


def resnet_frozen_modules(net, frozen):
    """The modules the assignment's freezing means, written out by hand."""
    l2 = net.layer2[0]
    return {
        0: [],
        1: [net.conv1, net.bn1],
        5: [net.conv1, net.bn1, net.layer1],
        7: [net.conv1, net.bn1, net.layer1, l2.conv1, l2.bn1, l2.conv2, l2.bn2],
        8: [net.conv1, net.bn1, net.layer1, l2],
        20: [m for m in net.children() if m is not net.fc],
    }[frozen]


@pytest.mark.parametrize("frozen", [0, 1, 5, 7, 8, 20])
def test_resnet_trainable_counts(frozen):
    model = build_model("resnet18", outputs=3, frozen_layers=frozen)
    total = params(model)
    assert trainable_parameters(model) == total - params(*resnet_frozen_modules(model.net, frozen))
    if frozen == 20:
        assert trainable_parameters(model) == 512 * 256 + 256 + 256 * 3 + 3


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18"])
def test_frozen_layers_out_of_range(backbone):
    for frozen in (-1, conv_count(backbone) + 1):
        with pytest.raises(ValueError, match="frozen_layers"):
            build_model(backbone, outputs=2, frozen_layers=frozen)


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape(vgg_free, size):
    resnet = build_model("resnet18", outputs=3, hidden=16)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert vgg_free.eval()(x).shape == (2, 2)
        assert resnet.eval()(x).shape == (2, 3)
    assert resnet.head[0].in_features == 512 and resnet.head[-1].out_features == 3


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model("resnet18", outputs=2, frozen_layers=5)
    model.eval()
    model.train()
    net = model.net
    frozen_bns = [net.bn1, *(m for m in net.layer1.modules() if isinstance(m, nn.BatchNorm2d))]
    free_bns = [m for layer in (net.layer2, net.layer3, net.layer4) for m in layer.modules()
                if isinstance(m, nn.BatchNorm2d)]
    assert len(frozen_bns) == 5 and len(free_bns) == 15
    assert not any(bn.training for bn in frozen_bns)
    assert all(bn.training for bn in free_bns)
    assert model.head.training


@pytest.mark.slow
def test_frozen_running_stats_do_not_move():
    model = build_model("resnet18", outputs=2, frozen_layers=1)
    before = model.net.bn1.running_mean.clone()
    model.train()(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.net.bn1.running_mean, before)
    assert not torch.equal(model.net.layer1[0].bn1.running_mean, torch.zeros(64))


@pytest.mark.slow
def test_frozen_parameters_get_no_grad():
    model = build_model("resnet18", outputs=2, frozen_layers=5)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), name
    assert model.net.conv1.weight.grad is None
    assert model.net.layer2[0].conv1.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_state_dict_loads(tmp_path, resnet_state, suffix):
    path = str(tmp_path / f"resnet18{suffix}")
    (torch.save if suffix == ".pth" else save_file)(resnet_state, path)
    check_pretrained("resnet18", path)
    model = build_model("resnet18", outputs=2, pretrained=path)
    assert_backbone_equal(model, resnet_state)
    assert model.head[-1].out_features == 2


@pytest.mark.slow
def test_prefixed_state_dicts_load(tmp_path, resnet_state):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in resnet_state.items()}, path)
    assert_backbone_equal(build_model("resnet18", outputs=2, pretrained=str(path)), resnet_state)

    saved = build_model("resnet18", outputs=3, hidden=8)  # a Classifier: "net." keys, other head
    torch.save(saved.state_dict(), path)
    assert_backbone_equal(build_model("resnet18", outputs=2, pretrained=str(path)), saved.net.state_dict())


def test_wrong_state_dict_is_a_user_error(tmp_path, resnet_state):
    path = tmp_path / "bad.pth"
    bad = dict(resnet_state)
    del bad["layer1.0.conv1.weight"]
    bad["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(bad, path)
    for call in (lambda: check_pretrained("resnet18", str(path)),
                 lambda: build_model("resnet18", outputs=2, pretrained=str(path))):
        with pytest.raises(UserError, match="bad.pth") as error:
            call()
        assert "missing 1 (layer1.0.conv1.weight)" in str(error.value)
        assert "wrong shape 1 (conv1.weight (64, 1, 7, 7) vs (64, 3, 7, 7))" in str(error.value)


def test_unreadable_or_missing_file_is_a_user_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: cannot read"):
        check_pretrained("resnet18", str(junk))
    with pytest.raises(UserError, match="nope.pth: no such file"):
        check_pretrained("resnet18", str(tmp_path / "nope.pth"))


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(UserError, match="valid: vgg16, resnet18"):
        check_pretrained("vgg19", "none")
    with pytest.raises(UserError, match="valid"):
        build_model("alexnet", outputs=2)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_imagenet_not_cached_says_how_to_fix(hub_dir, backbone):
    expected = os.path.join(str(hub_dir), "checkpoints", os.path.basename(BACKBONES[backbone].weights.url))
    assert imagenet_cache_path(backbone) == expected
    with pytest.raises(UserError) as error:
        check_pretrained(backbone, "imagenet")
    message = str(error.value)
    assert "\n" not in message and backbone in message and expected in message
    assert "--pretrained PATH" in message and "--pretrained none" in message
    with pytest.raises(UserError, match="--pretrained"):
        build_model(backbone, outputs=2, pretrained="imagenet")


def test_imagenet_loads_from_the_hub_cache(hub_dir, resnet_state):
    """The real torchvision weights path, offline: a test-made file under the expected name."""
    path = imagenet_cache_path("resnet18")
    os.makedirs(os.path.dirname(path))
    torch.save(resnet_state, path)
    check_pretrained("resnet18", "imagenet")
    assert_backbone_equal(build_model("resnet18", outputs=2, pretrained="imagenet"), resnet_state)


@pytest.mark.slow
def test_old_checkpoints_without_num_batches_tracked_load(tmp_path, resnet_state):
    """Pre-2018 torchvision files lack BatchNorm's num_batches_tracked."""
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in resnet_state.items() if "num_batches_tracked" not in k}, path)
    assert_backbone_equal(build_model("resnet18", outputs=2, pretrained=str(path)), resnet_state)
