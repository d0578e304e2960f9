"""Backbones for every family, built from torchvision classification models, with an optional FPN on top.

A torchvision ResNet / ResNeXt / Wide-ResNet, ConvNeXt or Swin (v1 or v2) model, randomly initialised
(``weights=None``), is cut into a :class:`Trunk`: its stem and four stages, the classifier dropped. Whatever the
model, the stages are named ``c2`` .. ``c5`` (:data:`STAGE_NAMES`); a family asks for stages by name together with
the stride its pyramid expects of each, and the builder measures the strides (a forward pass of a twin on the
``meta`` device, which computes shapes only) and refuses a mismatch. :func:`backbone_fpn` puts torchvision's
``FeaturePyramidNetwork`` on the trunk.

Trunks start randomly initialised, with ordinary (trainable) BatchNorm. A detector whose config names
``model.backbone_weights`` is built with :class:`~torchvision.ops.FrozenBatchNorm2d` in its ResNet instead
(:func:`frozen_batch_norm`), as torchvision's detection builders do when they are given weights; the weights
themselves are read by :func:`unikd.detectors.weights.load_backbone_weights`.

ConvNeXt and Swin outputs get one LayerNorm per returned stage (as their detection backbones have); Swin's
stages are channels-last and are permuted to ``[B, C, H, W]``. Stochastic depth is turned off (torchvision's
defaults are 0.1 for ConvNeXt-T, 0.2 for Swin-T): the training pass's features must be those that
``extract_features`` gives for the same images.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops import FrozenBatchNorm2d, StochasticDepth
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from unikd.config import ConfigError, DetectorConfig

STAGE_NAMES = ("c2", "c3", "c4", "c5")  # nominal strides 4, 8, 16, 32 in every layout
MEASURE_SIZE = 512  # side of the meta-device input the strides are measured with (a multiple of any stride)


@dataclass(frozen=True)
class Layout:
    """Where the parts of one kind of torchvision classification model are.

    Attributes:
        body: attribute of the model whose children run in order from the image to the last stage ("" = the model).
        stages: ``c2`` .. ``c5`` -> name of the body's child that outputs that stage.
        groups: the five freezing groups (stem, stage 1 .. stage 4), as names of the body's children.
        channels_last: the stages output ``[B, H, W, C]`` (Swin).
        output_norm: a LayerNorm on each returned stage.
        batch_norm: the model normalises with BatchNorm (its builder takes ``norm_layer``).
    """

    body: str
    stages: dict[str, str]
    groups: tuple[tuple[str, ...], ...]
    channels_last: bool
    output_norm: bool
    batch_norm: bool = False


_RESNET = Layout("", dict(zip(STAGE_NAMES, ("layer1", "layer2", "layer3", "layer4"))),
                 (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)), False, False, True)
_FEATURES = dict(body="features", stages=dict(zip(STAGE_NAMES, ("1", "3", "5", "7"))),
                 groups=(("0",), ("1",), ("2", "3"), ("4", "5"), ("6", "7")), output_norm=True)
LAYOUTS = {"resnet": _RESNET, "resnext": _RESNET, "wide_resnet": _RESNET,
           "convnext": Layout(**_FEATURES, channels_last=False), "swin": Layout(**_FEATURES, channels_last=True)}


def backbone_names() -> list[str]:
    """The torchvision classification models usable as a backbone."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if n.startswith(tuple(LAYOUTS)))


def layout_of(name: str) -> Layout:
    """The :class:`Layout` of backbone ``name``; a ConfigError naming the valid backbones for another name."""
    if name not in backbone_names():
        raise ConfigError(f"model.backbone: unknown backbone '{name}' (valid: {', '.join(backbone_names())})")
    return next(layout for prefix, layout in LAYOUTS.items() if name.startswith(prefix))


def frozen_batch_norm(cfg: DetectorConfig) -> bool:
    """Whether the backbone of ``cfg`` gets FrozenBatchNorm2d: with ``backbone_weights``, as torchvision's detection
    builders choose it when given weights, except their v2 variants, which keep ordinary BatchNorm."""
    return cfg.backbone_weights is not None and not cfg.torchvision_v2


def classification_body(name: str, frozen_bn: bool = False) -> nn.Module:
    """The body (see :class:`Layout`) of a randomly initialised ``name``, stochastic depth off; with ``frozen_bn``,
    its BatchNorm layers (if it has any) are FrozenBatchNorm2d."""
    norm = {"norm_layer": FrozenBatchNorm2d} if frozen_bn and layout_of(name).batch_norm else {}
    model = torchvision.models.get_model(name, weights=None, **norm)
    for module in model.modules():
        if isinstance(module, StochasticDepth):
            module.p = 0.0
    body = layout_of(name).body
    return getattr(model, body) if body else model


class Trunk(nn.Module):
    """The body's children up to the last returned stage, run in order; each returned stage as an NCHW map.

    Its children are the body's own (``conv1``, ``layer1``, ... for a ResNet; ``0`` .. ``7`` for ConvNeXt and
    Swin), so parameter names are the classification model's, plus ``output_norms`` where the layout has them.

    ``forward``: ``[B, 3, H, W]``, H and W multiples of the largest returned stride -> an ordered dict
    ``"0", "1", ...`` (the returned stages in order) of ``[B, channels[i], H / strides[i], W / strides[i]]``.
    """

    def __init__(self, body: nn.Module, returned: list[str], channels_last: bool, norm_channels: list[int] | None):
        super().__init__()
        children = list(body.named_children())
        last = max(i for i, (child, _) in enumerate(children) if child in returned)
        for child, module in children[:last + 1]:
            self.add_module(child, module)
        self.order = [child for child, _ in children[:last + 1]]
        self.returned = returned
        self.channels_last = channels_last
        self.output_norms = None
        if norm_channels is not None:
            norm = nn.LayerNorm if channels_last else LayerNorm2d
            self.output_norms = nn.ModuleList(norm(c) for c in norm_channels)
        # Set by trunk() from the measurement, in the order of ``returned``.
        self.strides: list[int] = []
        self.channels: list[int] = []

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        largest = max(self.strides, default=1)
        if x.shape[-2] % largest or x.shape[-1] % largest:
            raise ValueError(f"the backbone needs an input whose height and width are multiples of {largest} (its "
                             f"largest stride), got {tuple(x.shape[-2:])}; torchvision's detection transform pads "
                             "batches to a multiple of 32")
        outputs = []
        for child in self.order:
            x = getattr(self, child)(x)
            if child in self.returned:
                outputs.append(x)
        if self.output_norms is not None:
            outputs = [norm(y) for norm, y in zip(self.output_norms, outputs)]
        if self.channels_last:
            outputs = [y.permute(0, 3, 1, 2) for y in outputs]
        return OrderedDict((str(i), y) for i, y in enumerate(outputs))


def freeze(trunk: Trunk, layout: Layout, trainable_layers: int) -> None:
    """``requires_grad=False`` on all but the last ``trainable_layers`` of the layout's five groups (stem, stage
    1 .. 4). The output norms stay trainable."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers: expected 0..5, got {trainable_layers}")
    frozen = {child for group in layout.groups[: 5 - trainable_layers] for child in group}
    for name, param in trunk.named_parameters():
        if name.split(".")[0] in frozen:
            param.requires_grad_(False)


def measure(name: str, returned: list[str], channels_last: bool) -> tuple[list[int], list[int]]:
    """``(strides, channels)`` of the ``returned`` children of ``name``'s body, from one forward pass of a twin
    built on the meta device (shapes only: no weights are initialised, nothing is computed)."""
    with torch.device("meta"):
        twin = Trunk(classification_body(name), returned, channels_last, None)
        outputs = twin(torch.empty(1, 3, MEASURE_SIZE, MEASURE_SIZE)).values()
    return [MEASURE_SIZE // y.shape[-1] for y in outputs], [y.shape[1] for y in outputs]


def trunk(name: str, stages: dict[str, int], trainable_layers: int, frozen_bn: bool = False) -> Trunk:
    """The trunk of backbone ``name`` returning ``stages`` (name -> the stride the caller expects, in output
    order), all but its last ``trainable_layers`` groups frozen.

    BatchNorm (ResNets) is ordinary (trainable, batch statistics), or FrozenBatchNorm2d with ``frozen_bn``.
    Raises a ConfigError for an unknown backbone or stage name, or a stage whose measured stride is not the
    expected one.
    """
    layout = layout_of(name)
    unknown = [s for s in stages if s not in layout.stages]
    if unknown:
        raise ConfigError(f"model.backbone: {name} has no stage '{unknown[0]}' (stages: {', '.join(STAGE_NAMES)})")
    returned = [layout.stages[s] for s in stages]
    strides, channels = measure(name, returned, layout.channels_last)
    wrong = [(s, want, got) for (s, want), got in zip(stages.items(), strides) if want != got]
    if wrong:
        stage, want, got = wrong[0]
        raise ConfigError(f"model.backbone: stage {stage} of {name} has stride {got}, the detector expects {want} "
                          f"(strides of {', '.join(stages)}: {strides}, expected {list(stages.values())})")
    body = Trunk(classification_body(name, frozen_bn), returned, layout.channels_last,
                 channels if layout.output_norm else None)
    body.strides, body.channels = strides, channels
    freeze(body, layout, trainable_layers)
    return body


class FPNBackbone(nn.Module):
    """A :class:`Trunk` (``body``) with torchvision's ``FeaturePyramidNetwork`` (``fpn``, its convolutions followed by
    ``norm_layer`` if one is given) on top: the backbone torchvision's detectors take (``out_channels``).

    ``[B, 3, H, W]`` -> an ordered dict of ``[B, out_channels, H / s, W / s]`` maps: one per returned stage
    (``"0"``, ``"1"``, ...), then the ``extra_blocks`` levels.
    """

    def __init__(self, body: Trunk, out_channels: int, extra_blocks: ExtraFPNBlock | None,
                 norm_layer: type[nn.Module] | None = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def backbone_fpn(name: str, fpn_channels: int, trainable_layers: int, stages: dict[str, int],
                 extra_blocks: ExtraFPNBlock | None, frozen_bn: bool = False,
                 fpn_norm: type[nn.Module] | None = None) -> FPNBackbone:
    """A :func:`trunk` returning ``stages`` (name -> expected stride) with an FPN of ``fpn_channels`` channels
    (normalised by ``fpn_norm`` if given)."""
    return FPNBackbone(trunk(name, stages, trainable_layers, frozen_bn), fpn_channels, extra_blocks, fpn_norm)
