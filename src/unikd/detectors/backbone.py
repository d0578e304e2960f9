"""ResNet-family backbones with a feature pyramid, built from torchvision parts.

Any torchvision ResNet / ResNeXt / Wide-ResNet classification model can serve: its stem and four stages are
kept, the classifier is dropped, and an FPN of ``fpn_channels`` channels is put on top of the chosen stages.
"""
from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from unikd.config import ConfigError

STAGES = ("layer1", "layer2", "layer3", "layer4")  # C2..C5, strides 4, 8, 16, 32
_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")


def backbone_names() -> list[str]:
    """The torchvision classification models usable as a backbone (ResNet, ResNeXt, Wide-ResNet)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if n.startswith(_RESNET_PREFIXES))


def stage_channels(resnet: torchvision.models.ResNet, stage: str) -> int:
    """Output channels of one ResNet stage, read from its last convolution."""
    convs = [m for m in getattr(resnet, stage).modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def freeze_stages(resnet: torchvision.models.ResNet, trainable_layers: int) -> None:
    """Set ``requires_grad=False`` on all but the last ``trainable_layers`` of (stem, layer1..layer4)."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers: expected 0..5, got {trainable_layers}")
    groups = [("conv1", "bn1"), *((s,) for s in STAGES)]
    frozen = [name for group in groups[: 5 - trainable_layers] for name in group]
    for name, param in resnet.named_parameters():
        if name.split(".")[0] in frozen:
            param.requires_grad_(False)


def resnet_trunk(name: str, trainable_layers: int) -> torchvision.models.ResNet:
    """A randomly initialised ResNet-family classification model, all but its last ``trainable_layers`` of
    (stem, layer1..layer4) frozen. BatchNorm stays ordinary (trainable, batch statistics): no pretrained
    statistics exist offline."""
    if name not in backbone_names():
        raise ConfigError(f"model.backbone: unknown backbone '{name}' (valid: {', '.join(backbone_names())})")
    resnet = torchvision.models.get_model(name, weights=None)
    freeze_stages(resnet, trainable_layers)
    return resnet


def resnet_fpn(
    name: str,
    fpn_channels: int,
    trainable_layers: int,
    returned_stages: list[str],
    extra_blocks: ExtraFPNBlock,
) -> BackboneWithFPN:
    """A :func:`resnet_trunk` + FPN.

    Input ``[B, 3, H, W]``; output an ordered dict of ``[B, fpn_channels, H / s, W / s]`` maps, one per
    returned stage (stride 4 for layer1 ... 32 for layer4) followed by the ``extra_blocks`` levels.
    """
    resnet = resnet_trunk(name, trainable_layers)
    return BackboneWithFPN(
        resnet,
        return_layers={stage: str(i) for i, stage in enumerate(returned_stages)},
        in_channels_list=[stage_channels(resnet, s) for s in returned_stages],
        out_channels=fpn_channels,
        extra_blocks=extra_blocks,
    )
