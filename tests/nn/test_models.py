"""Backbones, heads, freezing and offline weight loading (all without ImageNet)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from covid_tune.core.space import BACKBONE_UNITS, unit_count
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


def test_config_unit_counts_match_the_registry():
    """The space validator's limits on frozen_layers (config, torch-free) are the units
    the registry declares, in the same (leaderboard) order; vgg16 and resnet18 keep the
    assignment's conv counts."""
    assert list(BACKBONE_UNITS) == list(BACKBONES)
    for backbone, units in BACKBONE_UNITS.items():
        with torch.device("meta"):
            net = BACKBONES[backbone].factory(weights=None)
        assert len(BACKBONES[backbone].units(net)) == units == unit_count(backbone), backbone
        if backbone in ("vgg16", "resnet18"):
            assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == units
    assert {k: BACKBONE_UNITS[k] for k in ("vgg16", "resnet18")} == {"vgg16": 13, "resnet18": 20}


NEW_BACKBONES = ["densenet121", "resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_large"]


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_freezing_n_blocks_freezes_exactly_those(backbone):
    """The first N units' parameters, and nothing else, stop requiring grad; their
    BatchNorms stay in eval mode after train(), every other one trains."""
    spec = BACKBONES[backbone]
    frozen = unit_count(backbone) // 2
    model = build_model(backbone, outputs=2, hidden=8, frozen_layers=frozen)
    units = spec.units(model.net)
    expected = {id(p) for unit in units[:frozen] for m in unit for p in m.parameters()}
    assert {id(p) for p in model.parameters() if not p.requires_grad} == expected
    assert trainable_parameters(model) == params(model) - params(*(m for u in units[:frozen] for m in u))
    model.eval().train()
    frozen_norms = {id(m) for u in units[:frozen] for n in u for m in n.modules()
                    if isinstance(m, nn.BatchNorm2d)}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training == (id(m) not in frozen_norms) for m in norms)
    assert bool(frozen_norms) == (backbone != "convnext_tiny")  # ConvNeXt: LayerNorms only
    assert model.head.training


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_freezing_all_blocks_trains_only_the_head(backbone):
    model = build_model(backbone, outputs=3, hidden=8, frozen_layers=unit_count(backbone))
    width = BACKBONES[backbone].head_in
    assert [m.in_features for m in model.head if isinstance(m, nn.Linear)] == [width, 8]
    assert trainable_parameters(model) == params(model.head) == width * 8 + 8 + 8 * 3 + 3


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


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18", "densenet121"])
def test_frozen_layers_out_of_range(backbone):
    for frozen in (-1, unit_count(backbone) + 1):
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
    with pytest.raises(UserError, match="valid: vgg16, resnet18, densenet121"):
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


@pytest.mark.backbones
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_trains_a_step_at_32px(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, outputs=3, hidden=8, frozen_layers=1, pretrained="none")
    logits = model.train()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), name
    assert model.head[0].weight.grad.abs().sum() > 0


@pytest.mark.backbones
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_every_backbone_loads_a_local_state_dict(tmp_path, backbone, suffix):
    """A randomly initialised torchvision net saved by the test, as a user's file would be."""
    torch.manual_seed(1)
    state = BACKBONES[backbone].factory(weights=None).state_dict()
    path = str(tmp_path / f"{backbone}{suffix}")
    (torch.save if suffix == ".pth" else save_file)({k: v.contiguous() for k, v in state.items()}, path)
    check_pretrained(backbone, path)
    model = build_model(backbone, outputs=2, hidden=8, pretrained=path)
    head = BACKBONES[backbone].head_attr + "."
    loaded = model.net.state_dict()
    for key, value in state.items():
        if not key.startswith(head):
            assert torch.equal(loaded[key], value), key


@pytest.mark.backbones
def test_densenet_imagenet_file_with_old_key_names_loads(hub_dir):
    """torchvision's densenet121 ImageNet file names ``denselayer1.norm.1``, not ``norm1``,
    and predates BatchNorm's ``num_batches_tracked``."""
    state = torchvision.models.densenet121(weights=None).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in state.items() if "num_batches_tracked" not in k}  # a 2017 file
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = imagenet_cache_path("densenet121")
    os.makedirs(os.path.dirname(path))
    torch.save(old, path)
    check_pretrained("densenet121", "imagenet")
    loaded = build_model("densenet121", outputs=2, pretrained="imagenet").net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("classifier."))
