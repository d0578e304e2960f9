"""The detector adapter contract (DESIGN §3): one class per family around a torchvision detector.

A subclass only says how to build its torchvision model and which FPN levels it has; the shared code here
captures the multi-scale features of the training pass, runs inference and keeps the label convention
(labels ``0..num_classes-1`` everywhere, whatever the detector uses internally). A family whose model is not a
torchvision detector (Deformable DETR) overrides :meth:`~DetectorAdapter.training_pass` and
:meth:`~DetectorAdapter.extract_features`.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from unikd.config import ConfigError, DetectorConfig
from unikd.pyramid import Pyramid


class DetectorAdapter(nn.Module):
    """A torchvision detector (``self.model``) with the distillation contract.

    ``self.model`` must have ``transform`` (a :class:`~unikd.detectors.transform.PadOnlyTransform`),
    ``backbone`` (returning an ordered dict of FPN maps) and torchvision's train/eval ``forward``. Images are
    lists of ``[3, H, W]`` float tensors in ``[0, 1]`` of any size, already resized by the data loader
    (:mod:`unikd.data.resize`): the transform normalises and pads (to a multiple of 32) but never rescales.
    """

    family: ClassVar[str]
    feature_strides: ClassVar[list[int]]
    label_offset: ClassVar[int] = 0  # added to labels on the way in, subtracted on the way out
    has_anchors: ClassVar[bool] = True  # model.anchor_sizes gives one size per level
    predicts_masks: ClassVar[bool] = False  # trains on instance masks (targets["masks"]) and predicts them
    has_v2: ClassVar[bool] = False  # builds torchvision's v2 variant of the family under model.torchvision_v2

    def __init__(self, cfg: DetectorConfig, num_classes: int):
        super().__init__()
        if cfg.torchvision_v2 and not self.has_v2:
            raise ConfigError(f"model.torchvision_v2: family '{self.family}' has no torchvision v2 variant (those "
                              "that have: retinanet, faster_rcnn, mask_rcnn)")
        if self.has_anchors and len(cfg.anchor_sizes) != len(self.feature_strides):
            raise ConfigError(
                f"model.anchor_sizes: family '{self.family}' has {len(self.feature_strides)} FPN levels "
                f"(strides {self.feature_strides}), so it needs {len(self.feature_strides)} anchor sizes, "
                f"got {len(cfg.anchor_sizes)}: {cfg.anchor_sizes}"
            )
        self.num_classes = num_classes
        self.feature_channels = [cfg.fpn_channels] * len(self.feature_strides)
        self.model = self.build_model(cfg, num_classes)

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        """The torchvision detector for this family (implemented by each subclass)."""
        raise NotImplementedError

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Pyramid]:
        """One training pass: the detector's losses and the FPN features it computed on the way.

        Args:
            images: B tensors ``[3, H, W]`` in ``[0, 1]``.
            targets: B dicts with ``"boxes"`` float ``[n, 4]`` (xyxy, image pixels) and ``"labels"`` int64
                ``[n]`` in ``0..num_classes-1``; for a family that :attr:`predicts_masks`, also ``"masks"`` uint8
                ``[n, H, W]``.
        Returns:
            ``(losses, features)``: scalar loss tensors by name, and the :class:`~unikd.pyramid.Pyramid` of this
            pass: one ``[B, C, H_l, W_l]`` map per level in ``feature_strides`` order,
            ``C = feature_channels[l]``, ``H_l = ceil(H_pad / stride_l)`` where ``H_pad`` is the batch height
            padded to a multiple of 32, taken from the backbone call of this pass, with each image's size.
        """
        if not self.training:
            raise RuntimeError(f"{type(self).__name__}.forward computes losses and needs train mode; use predict()")
        return self.training_pass(images, targets)

    def training_pass(self, images: list[Tensor],
                      targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Pyramid]:
        """:meth:`forward` in train mode: torchvision's training forward, with the transform's and the backbone's
        outputs captured by hooks."""
        captured: list = []
        hooks = [self.model.transform.register_forward_hook(lambda _m, _i, output: captured.append(output[0])),
                 self.model.backbone.register_forward_hook(lambda _m, _i, output: captured.append(output))]
        try:
            losses = self.model(images, [self._to_model_labels(t) for t in targets])
        finally:
            for hook in hooks:
                hook.remove()
        batch, features = captured
        return losses, self._pyramid(images, batch.image_sizes, features)

    def extract_features(self, images: list[Tensor]) -> Pyramid:
        """Transform + backbone only: the :class:`~unikd.pyramid.Pyramid` of ``images``, as in :meth:`forward`."""
        batch, _ = self.model.transform(images)
        return self._pyramid(images, batch.image_sizes, self.model.backbone(batch.tensors))

    def _pyramid(self, images: list[Tensor], image_sizes: list[tuple[int, int]], features: dict) -> Pyramid:
        """The backbone's maps with each image's size, checked by :func:`input_sizes`."""
        return Pyramid(list(features.values()), list(self.feature_strides),
                       input_sizes(type(self).__name__, images, image_sizes))

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image, in eval mode (the previous mode is restored afterwards).

        Returns B dicts: ``"boxes"`` ``[n, 4]`` xyxy in the input image's pixels, ``"scores"`` ``[n]``,
        ``"labels"`` int64 ``[n]`` in ``0..num_classes-1``; ``n <= detections_per_img``. A family that
        :attr:`predicts_masks` adds ``"masks"`` ``[n, 1, H, W]``: probabilities in the input image's pixels.
        """
        was_training = self.training
        self.eval()
        try:
            detections = self.model(images)
        finally:
            self.train(was_training)
        return [{**d, "labels": d["labels"] - self.label_offset} for d in detections]

    def _to_model_labels(self, target: dict[str, Tensor]) -> dict[str, Tensor]:
        """A shallow copy of ``target`` with labels in the wrapped detector's convention."""
        return {**target, "labels": target["labels"] + self.label_offset}


def input_sizes(owner: str, images: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each image's ``(h, w)``, checked to be the size the transform kept (``image_sizes``): the transform must
    only normalise and pad (targets and the distillers work in input pixels). ``owner`` names the detector."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    if [tuple(s) for s in image_sizes] != sizes:
        raise ValueError(f"{owner}: the transform resized the images ({sizes} -> {list(image_sizes)}); the "
                         "detector's transform must be a PadOnlyTransform (the data loader resizes)")
    return sizes
