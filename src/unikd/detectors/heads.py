"""Building blocks shared by the dense heads written here (ATSS, RepPoints)."""
from __future__ import annotations

import math

from torch import Tensor, nn


def gn_tower(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, GroupNorm(32), ReLU); convolutions initialised N(0, 0.01), bias 0.

    ``[B, C, H, W] -> [B, C, H, W]``.
    """
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        init_normal(conv)
        layers += [conv, nn.GroupNorm(32, channels), nn.ReLU()]
    return nn.Sequential(*layers)


def init_normal(conv: nn.Module, bias: float = 0.0) -> None:
    """Weights N(0, 0.01), bias constant."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)


def prior_bias(probability: float = 0.01) -> float:
    """The classification bias that makes every initial sigmoid score ``probability`` (RetinaNet's prior)."""
    return -math.log((1 - probability) / probability)


def flatten_levels(maps: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` (locations in row-major order, as the anchors)."""
    return maps.flatten(2).transpose(1, 2)
