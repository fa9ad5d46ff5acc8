"""Backbones: torchvision ResNet + FPN, or a tiny CNN + FPN for tests and the synthetic demo."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import CfgNode

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def norm_layer_for(name: str) -> type[nn.Module]:
    """Map a config norm name to a layer; SyncBN starts as BN and is converted when DDP wraps the model."""
    if name == "FrozenBN":
        return FrozenBatchNorm2d
    if name in ("BN", "SyncBN"):
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm {name!r}: use FrozenBN, BN or SyncBN")


class TinyCNN(nn.Sequential):
    """A four-stage CNN (strides 4..32) cheap enough for CPU tests and the synthetic world."""

    def __init__(self, width: int = 32, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True),
            )

        w = width
        super().__init__(OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), norm_layer(w), nn.ReLU(inplace=True)),
            layer1=block(w, w, 2),
            layer2=block(w, 2 * w, 2),
            layer3=block(2 * w, 4 * w, 2),
            layer4=block(4 * w, 8 * w, 2),
        ))
        self.channels = [w, 2 * w, 4 * w, 8 * w]


def build_backbone(cfg: CfgNode, load_pretrained: bool = True) -> BackboneWithFPN:
    """Build the FPN backbone the config names; output levels P2..P6 ('0'..'3', 'pool').

    ``load_pretrained=False`` builds the same structure (frozen stages included) without reading
    MODEL.BACKBONE.PRETRAINED, for a model whose trained weights are loaded next.
    """
    bcfg = cfg.MODEL.BACKBONE
    if bcfg.NORM == "FrozenBN" and not bcfg.PRETRAINED and load_pretrained:
        raise ValueError("MODEL.BACKBONE.NORM FrozenBN keeps BatchNorm at its identity init, which only makes sense "
                         "over pretrained weights: set MODEL.BACKBONE.PRETRAINED to a ResNet state-dict file, or use "
                         "NORM SyncBN (the paper's from-scratch setting) or BN")
    norm = norm_layer_for(bcfg.NORM)
    returned = list(bcfg.RETURNED_LAYERS)
    if bcfg.NAME == "tiny":
        body = TinyCNN(bcfg.TINY_WIDTH, norm)
        if bcfg.PRETRAINED and load_pretrained:
            load_tiny_weights(body, bcfg.PRETRAINED)
        return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
        in_channels = [body.channels[k - 1] for k in returned]
        return BackboneWithFPN(body, return_layers, in_channels, bcfg.OUT_CHANNELS, extra_blocks=LastLevelMaxPool())
    if bcfg.NAME not in _RESNETS:
        raise ValueError(f"unknown backbone {bcfg.NAME!r}: use one of {', '.join(_RESNETS)} or 'tiny'")
    net = getattr(resnet, bcfg.NAME)(weights=None, norm_layer=norm)
    if bcfg.PRETRAINED and load_pretrained:
        load_resnet_weights(net, bcfg.PRETRAINED)
    trainable = bcfg.TRAINABLE_LAYERS if bcfg.PRETRAINED else 5  # a random init must train every stage
    backbone = resnet_fpn(net, trainable, returned, bcfg.OUT_CHANNELS)
    freeze_batchnorm(backbone.body)
    return backbone


def resnet_fpn(net: resnet.ResNet, trainable_layers: int, returned_layers: list[int], out_channels: int = 256
               ) -> BackboneWithFPN:
    """An FPN (with a max-pooled extra level) on stages ``returned_layers`` (1..4) of ``net``, whose last
    ``trainable_layers`` (0..5: layer4, layer3, layer2, layer1, then the stem) train and the rest are frozen."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"MODEL.BACKBONE.TRAINABLE_LAYERS must be 0 to 5 (stages that train), got {trainable_layers}")
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"MODEL.BACKBONE.RETURNED_LAYERS must be ResNet stages 1 to 4, got {returned_layers}")
    training = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        training.append("bn1")  # the stem's BatchNorm trains with its conv
    for name, p in net.named_parameters():
        if not any(name.startswith(prefix) for prefix in training):
            p.requires_grad_(False)
    # stage k's width: the last stage's (net.inplanes once built) halved per stage before it
    widths = [net.inplanes // 2 ** (4 - k) for k in returned_layers]
    return BackboneWithFPN(net, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}, widths, out_channels,
                           extra_blocks=LastLevelMaxPool())


def freeze_batchnorm(module: nn.Module) -> None:
    """Turn BatchNorm layers whose parameters are frozen into FrozenBatchNorm2d with the same statistics.

    A frozen stage must not move either: a BatchNorm in train mode would still update its running
    statistics (detectron2 converts frozen stages the same way).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine \
                and not any(p.requires_grad for p in child.parameters()):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def load_tiny_weights(body: TinyCNN, path: str) -> None:
    """Load a ``TinyCNN``'s weights (a state dict with its keys: ``stem.*``, ``layer1.*`` …); every tensor must fit."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"backbone weights {p} not found: set MODEL.BACKBONE.PRETRAINED to a TinyCNN "
                                f"state-dict file, or to '' for random init")
    try:
        body.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ValueError(f"backbone weights {p} do not fit MODEL.BACKBONE.NAME tiny with TINY_WIDTH "
                         f"{body.channels[0]}: {str(e).splitlines()[0]}") from None


def load_resnet_weights(net: nn.Module, path: str) -> None:
    """Load ImageNet weights from a torchvision-format state-dict file (no download here)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"backbone weights {p} not found: download torchvision's ResNet weights on a machine with internet, "
            f"or set MODEL.BACKBONE.PRETRAINED '' to start from random init")
    state = torch.load(p, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ValueError(f"backbone weights {p} miss {len(missing)} tensors, e.g. {missing[:3]}: is it a {type(net).__name__}?")
