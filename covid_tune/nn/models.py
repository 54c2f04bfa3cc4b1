"""Backbones, classification heads, layer freezing and pretrained weights.

``build_model`` is the one factory: it builds a torchvision net, loads its weights
(``none``, ``imagenet`` from torch hub's cache, or a local state dict), replaces the
classifier with ``Linear(in, hidden) -> ReLU -> Dropout -> Linear(hidden, outputs)``
and freezes the first N units: conv layers for VGG-16 and ResNet-18, as the assignment's
"Frozen Layers" column did, blocks for the other backbones (``BACKBONES``, one entry
each; ``docs/search-spaces.md`` lists their units).

No download ever happens: ``imagenet`` weights must already be in
``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from safetensors.torch import load_file
from torch import nn
from torchvision.models import WeightsEnum

from covid_tune.core.space import BACKBONE_UNITS
from covid_tune.errors import UserError

_PREFIXES = ("module.", "net.")
"""Key prefixes stripped from a local state dict (DataParallel, a saved Classifier)."""


@dataclass(frozen=True)
class Backbone:
    """One registry entry: everything ``build_model``, freezing, loading and Grad-CAM
    need to know of a torchvision net (timm's ``_registry.py`` style)."""

    name: str
    factory: Callable[..., nn.Module]
    """torchvision constructor, called with ``weights=None``."""
    weights: WeightsEnum
    """The ImageNet weights used for ``pretrained="imagenet"``."""
    head_attr: str
    """Dotted path of the torchvision module that the new head replaces."""
    head_in: int
    """Input features of the head (the width of the pooled features)."""
    units: Callable[[nn.Module], list[list[nn.Module]]]
    """The freezable units in forward order, each a list of modules frozen together."""
    body: Callable[[nn.Module], nn.Module]
    """The part of the net that gives the last feature maps before pooling (Grad-CAM's
    target layer)."""
    pooled: Callable[[nn.Module], nn.Module]
    """From those feature maps to the head's input: an adaptive average pool, a flatten
    (and ConvNeXt's LayerNorm)."""
    state_key: Callable[[str], str] = lambda key: key
    """Renames a key of a saved state dict (DenseNet's files use pre-0.4 names)."""

    @property
    def unit_count(self) -> int:
        """Number of freezable units: the largest valid ``frozen_layers``."""
        return BACKBONE_UNITS[self.name]


def _conv_units(net: nn.Module) -> list[list[nn.Module]]:
    """Every ``nn.Conv2d`` in registration order, with the BatchNorm registered right
    after it (resnet18 registers every conv's norm next): the assignment's layers."""
    modules = list(net.modules())
    return [[m, *([after] if isinstance(after, nn.BatchNorm2d) else [])]
            for m, after in zip(modules, modules[1:] + [None]) if isinstance(m, nn.Conv2d)]


def _resnet_body(net: nn.Module) -> nn.Module:
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                         net.layer1, net.layer2, net.layer3, net.layer4)


def _resnet50_units(net: nn.Module) -> list[list[nn.Module]]:
    """The stem, then each bottleneck block of layer1..layer4 (3 + 4 + 6 + 3)."""
    blocks = [[b] for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    return [[net.conv1, net.bn1], *blocks]


def _densenet_units(net: nn.Module) -> list[list[nn.Module]]:
    """The stem (conv0, norm0), then dense blocks and transitions in turn; the last
    dense block carries the final norm5."""
    f = net.features
    return [[f.conv0, f.norm0], [f.denseblock1], [f.transition1], [f.denseblock2],
            [f.transition2], [f.denseblock3], [f.transition3], [f.denseblock4, f.norm5]]


def _features_units(net: nn.Module) -> list[list[nn.Module]]:
    """Each entry of ``features`` (EfficientNet and MobileNetV3: the stem, the
    inverted-residual stages or blocks, the last 1x1 conv)."""
    return [[m] for m in net.features]


def _convnext_units(net: nn.Module) -> list[list[nn.Module]]:
    """The stem, then stages and downsamplers in turn (``features``); the last stage
    carries the classifier's LayerNorm."""
    units = _features_units(net)
    units[-1].append(net.classifier[0])
    return units


def _densenet_key(key: str) -> str:
    """``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight`` (torchvision's own
    fix for its ImageNet file)."""
    return re.sub(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
                  lambda m: m.group(1) + m.group(2), key)


def _pool_flatten(net: nn.Module) -> nn.Module:
    return nn.Sequential(net.avgpool, nn.Flatten(1))


def _global_pool(net: nn.Module) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _features(net: nn.Module) -> nn.Module:
    return net.features


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, "classifier", 512 * 7 * 7,
                 _conv_units, _features, _pool_flatten),
        Backbone("resnet18", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc", 512,
                 _conv_units, _resnet_body, _pool_flatten),
        Backbone("densenet121", tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1,
                 "classifier", 1024, _densenet_units,
                 lambda net: nn.Sequential(net.features, nn.ReLU()), _global_pool, _densenet_key),
        Backbone("resnet50", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc", 2048,
                 _resnet50_units, _resnet_body, _pool_flatten),
        Backbone("efficientnet_b0", tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
                 "classifier", 1280, _features_units, _features, _pool_flatten),
        Backbone("convnext_tiny", tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
                 "classifier.2", 768, _convnext_units, _features,
                 lambda net: nn.Sequential(net.avgpool, net.classifier[0], nn.Flatten(1))),
        Backbone("mobilenet_v3_large", tvm.mobilenet_v3_large,
                 tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2, "classifier", 960,
                 _features_units, _features, _pool_flatten),
    )
}
"""The backbones, in the leaderboard's order (``covid_tune.core.space.BACKBONE_UNITS``
holds the same names and unit counts without torch; a test compares them)."""


class Classifier(nn.Module):
    """A torchvision backbone (``net``) whose classifier is the new head.

    Frozen BatchNorm layers (those whose parameters do not require grad) stay in
    eval mode after ``train()``, so their running statistics do not drift either.
    """

    def __init__(self, net: nn.Module, backbone: str):
        super().__init__()
        self.net = net
        self.backbone = backbone

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(BACKBONES[self.backbone].head_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (H, W >= 32) -> logits ``[B, outputs]``."""
        return self.net(x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for norm in _frozen_norms(self.net):
            norm.eval()
        return self


class WithFeatures(nn.Module):
    """A classifier that also gives its last feature maps before pooling (for Grad-CAM,
    ``covid_tune.bundle.cam``): the registry's ``body``, ``pooled`` and the head, sharing
    the classifier's modules."""

    def __init__(self, model: Classifier):
        super().__init__()
        spec = BACKBONES[model.backbone]
        self.body, self.pool, self.head = spec.body(model.net), spec.pooled(model.net), model.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(self.pool(features)), features


def cam_spec(model: Classifier) -> dict:
    """What ``covid_tune.bundle.cam`` needs to know of the network after its feature maps: the
    pool's cells, the state-dict names of the head's two linear layers and, for ConvNeXt,
    of the LayerNorm between pool and head (with its epsilon)."""
    pooled = WithFeatures(model).pool
    cells = next(m for m in pooled if isinstance(m, nn.AdaptiveAvgPool2d)).output_size
    cells = [cells, cells] if isinstance(cells, int) else list(cells)
    head = f"net.{BACKBONES[model.backbone].head_attr}"
    spec = {"output": "features", "pool": cells, "head": [f"{head}.0", f"{head}.3"]}
    norms = [m for m in pooled if isinstance(m, nn.LayerNorm)]
    if norms:
        names = {id(m): name for name, m in model.named_modules()}
        spec["norm"], spec["norm_eps"] = names[id(norms[0])], norms[0].eps
    return spec


def build_model(
    backbone: str,
    outputs: int,
    hidden: int = 256,
    dropout: float = 0.5,
    frozen_layers: int = 0,
    pretrained: str = "none",
) -> Classifier:
    """Build a classifier with a new head and the first ``frozen_layers`` units frozen
    (convs for vgg16 and resnet18, blocks for the others: ``Backbone.units``).

    ``frozen_layers`` 0 trains everything; ``unit_count(backbone)`` trains only the head.
    ``pretrained`` is ``"none"``, ``"imagenet"`` or a path to a ``.pth``/``.pt`` or
    ``.safetensors`` state dict of the plain torchvision model; its classifier
    weights, if any, are ignored.
    """
    spec = _spec(backbone)
    if not 0 <= frozen_layers <= spec.unit_count:
        raise ValueError(
            f"frozen_layers for {backbone} must be in [0, {spec.unit_count}], got {frozen_layers}"
        )
    state, source = _pretrained_state(spec, pretrained)
    net = spec.factory(weights=None)
    if state is not None:
        _load_backbone(net, spec, state, source)
    parent, _, attr = spec.head_attr.rpartition(".")
    setattr(net.get_submodule(parent), attr, _head(spec.head_in, hidden, dropout, outputs))
    _freeze_units(spec.units(net), frozen_layers)
    return Classifier(net, spec.name).train()


def check_pretrained(backbone: str, pretrained: str) -> None:
    """Fail fast, before any trial starts, if ``pretrained`` cannot be loaded offline.

    ``imagenet``: the weight file must be in torch hub's cache (see
    ``imagenet_cache_path``). A local path must exist and hold a state dict whose
    keys and shapes match the backbone.
    """
    spec = _spec(backbone)
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        _require_cached(spec)
        return
    with torch.device("meta"):
        net = spec.factory(weights=None)
    _check_backbone_keys(net, spec, _renamed(spec, _read_state_dict(pretrained)), pretrained)


def imagenet_cache_path(backbone: str) -> str:
    """Where torch hub caches ``backbone``'s ImageNet weights (the URL's file name)."""
    url = _spec(backbone).weights.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _spec(backbone: str) -> Backbone:
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[backbone]


def _head(features: int, hidden: int, dropout: float, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, outputs),
    )


def _freeze_units(units: list[list[nn.Module]], count: int) -> None:
    """Freeze every parameter of the first ``count`` units (their BatchNorms then stay in
    eval mode: ``Classifier.train``)."""
    for unit in units[:count]:
        for module in unit:
            module.requires_grad_(False)


def _frozen_norms(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [
        m
        for m in net.modules()
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad
    ]


def _pretrained_state(spec: Backbone, pretrained: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state dict named by ``pretrained`` and a description of where it came from."""
    if pretrained == "none":
        return None, "none"
    if pretrained == "imagenet":
        return _renamed(spec, _imagenet_state(spec)), imagenet_cache_path(spec.name)
    return _renamed(spec, _read_state_dict(pretrained)), pretrained


def _renamed(spec: Backbone, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {spec.state_key(key): value for key, value in state.items()}


def _imagenet_state(spec: Backbone) -> dict[str, torch.Tensor]:
    """Read the ImageNet weights through torchvision's weights API, cache only.

    ``get_state_dict`` is ``torch.hub.load_state_dict_from_url``: it downloads only
    when the cached file is missing, which ``_require_cached`` rules out first, and
    it checks a file's hash only while downloading, so a cached file is read as is.
    """
    _require_cached(spec)
    return spec.weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)


def _require_cached(spec: Backbone) -> None:
    path = imagenet_cache_path(spec.name)
    if not os.path.isfile(path):
        name = os.path.basename(path)
        raise UserError(
            f"--pretrained imagenet: no {spec.name} ImageNet weights at {path} and no network to "
            f"download them; copy {name} there from a connected machine, or pass "
            f"--pretrained PATH to a local state dict, or --pretrained none"
        )


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file or a ``torch.save``d state dict, prefixes stripped."""
    if not os.path.isfile(path):
        raise UserError(
            f"--pretrained {path}: no such file (use imagenet, none or a path to a state dict)"
        )
    try:
        if path.endswith(".safetensors"):
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign files fail in many ways
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"--pretrained {path}: cannot read a state dict: {reason}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise UserError(f"--pretrained {path}: expected a flat state dict of tensors, got a {kind}")
    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _is_head_key(spec: Backbone, key: str) -> bool:
    return key.startswith(spec.head_attr + ".")


def _check_backbone_keys(net: nn.Module, spec: Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise UserError unless ``state`` holds exactly the backbone's (non-head) tensors."""
    expected = {k: v.shape for k, v in net.state_dict().items() if not _is_head_key(spec, k)}
    given = {k: v.shape for k, v in state.items() if not _is_head_key(spec, k)}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {tuple(given[k])} vs {tuple(expected[k])}"
        for k in expected
        if k in given and given[k] != expected[k]
    ]
    problems = [
        f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise UserError(f"--pretrained {source}: not a {spec.name} state dict: {'; '.join(problems)}")


def _load_backbone(net: nn.Module, spec: Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every backbone tensor strictly; the file's classifier, if any, is ignored."""
    _check_backbone_keys(net, spec, state, source)
    backbone_state = {k: v for k, v in state.items() if not _is_head_key(spec, k)}
    result = net.load_state_dict(backbone_state, strict=False)
    assert all(_is_head_key(spec, k) for k in result.missing_keys), result.missing_keys
