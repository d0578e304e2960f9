"""Dense one-stage detectors on P3-P7: torchvision RetinaNet and FCOS, both with GroupNorm heads."""
from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from unikd.config import ConfigError, DetectorConfig
from unikd.detectors.backbone import backbone_fpn, frozen_batch_norm
from unikd.detectors.base import DetectorAdapter
from unikd.detectors.registry import register_family
from unikd.detectors.transform import PadOnlyTransform


class OneStageAdapter(DetectorAdapter):
    """P3-P5 from the FPN over the backbone's C3-C5, P6-P7 by strided convolutions from P5 (5 levels).

    Both heads normalise with ``GroupNorm(32, C)``, so ``fpn_channels`` must be a multiple of 32.
    """

    feature_strides = [8, 16, 32, 64, 128]
    detector_class: type[nn.Module]

    def anchor_generator(self, anchor_sizes: list[int]) -> AnchorGenerator:
        """Anchors for each level from the config's base size per level."""
        raise NotImplementedError

    def head(self, channels: int, num_anchors: int, num_classes: int) -> nn.Module | None:
        """The detection head, or None for the torchvision class's default."""
        return None

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        if cfg.fpn_channels % 32:
            raise ConfigError(
                f"model.fpn_channels: the {self.family} head uses GroupNorm with 32 groups, so it needs a multiple "
                f"of 32, got {cfg.fpn_channels}"
            )
        anchors = self.anchor_generator(cfg.anchor_sizes)
        backbone = backbone_fpn(
            cfg.backbone,
            cfg.fpn_channels,
            cfg.trainable_layers,
            stages=dict(zip(("c3", "c4", "c5"), self.feature_strides)),
            extra_blocks=LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels),
            frozen_bn=frozen_batch_norm(cfg),
        )
        model = self.detector_class(
            backbone,
            num_classes,
            anchor_generator=anchors,
            head=self.head(cfg.fpn_channels, anchors.num_anchors_per_location()[0], num_classes),
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
        )
        model.transform = PadOnlyTransform()
        return model


@register_family("retinanet")
class RetinaNetAdapter(OneStageAdapter):
    """RetinaNet: 9 anchors per location, sizes ``s * 2**(k/3)`` (k = 0, 1, 2) x ratios 0.5, 1, 2.

    The head is torchvision's "v2" RetinaNet head: GroupNorm in the towers and a GIoU box loss. Trained from
    scratch on digits-det, the original head (no normalisation, L1 box loss) reached 3.9 AP where FCOS, which
    has GroupNorm, reached 41.8 with the same R50 backbone and schedule (docs/results.md, "Notes").

    With ``model.torchvision_v2`` it is torchvision's ``retinanet_resnet50_fpn_v2`` whole: P6 from C5 instead of
    P5, and the anchor sizes truncated to integers.
    """

    detector_class = RetinaNet
    has_v2 = True

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        model = super().build_model(cfg, num_classes)
        if cfg.torchvision_v2:
            p6 = LastLevelP6P7(model.backbone.body.channels[-1], cfg.fpn_channels)
            p6.use_P5 = False  # from C5 even where its width is the FPN's
            model.backbone.fpn.extra_blocks = p6
            model.anchor_generator = self.anchor_generator(cfg.anchor_sizes, truncate=True)
        return model

    def head(self, channels: int, num_anchors: int, num_classes: int) -> nn.Module:
        head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"  # what torchvision's retinanet_resnet50_fpn_v2 sets
        return head

    def anchor_generator(self, anchor_sizes: list[int], truncate: bool = False) -> AnchorGenerator:
        """``truncate``: each size cut to an integer, as torchvision's own RetinaNet anchors are."""
        sizes = tuple(tuple(int(s * 2 ** (k / 3)) if truncate else s * 2 ** (k / 3) for k in range(3))
                      for s in anchor_sizes)
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


@register_family("fcos")
class FCOSAdapter(OneStageAdapter):
    """FCOS: one square anchor per location; its size ``s`` sets the level's regression range [4s, 8s]."""

    detector_class = FCOS

    def anchor_generator(self, anchor_sizes: list[int]) -> AnchorGenerator:
        return AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
