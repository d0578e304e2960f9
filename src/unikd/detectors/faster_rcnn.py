"""Two-stage detectors on P2-P6: torchvision Faster R-CNN, and Mask R-CNN (its mask branch added)."""
from __future__ import annotations

from typing import ClassVar

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from unikd.config import DetectorConfig
from unikd.detectors.backbone import STAGE_NAMES, backbone_fpn, frozen_batch_norm
from unikd.detectors.base import DetectorAdapter
from unikd.detectors.registry import register_family
from unikd.detectors.transform import PadOnlyTransform


@register_family("faster_rcnn")
class FasterRCNNAdapter(DetectorAdapter):
    """Faster R-CNN: FPN over the backbone's C2-C5 (P2-P5) plus a max-pooled P6 used by the RPN only.

    Its softmax classifier reserves class 0 for background, so labels are shifted by one internally.
    RPN anchors: one size per level x ratios 0.5, 1, 2.

    With ``model.torchvision_v2`` it is torchvision's ``fasterrcnn_resnet50_fpn_v2`` whole: BatchNorm after the
    FPN's convolutions, a two-convolution RPN head and a box head of four 3x3 convolutions with BatchNorm and one
    fully connected layer (torchvision's v1 has two fully connected layers).
    """

    feature_strides = [4, 8, 16, 32, 64]
    label_offset = 1
    has_v2 = True
    detector_class: ClassVar[type[nn.Module]] = FasterRCNN

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        backbone = backbone_fpn(
            cfg.backbone,
            cfg.fpn_channels,
            cfg.trainable_layers,
            stages=dict(zip(STAGE_NAMES, self.feature_strides)),
            extra_blocks=LastLevelMaxPool(),
            frozen_bn=frozen_batch_norm(cfg),
            fpn_norm=nn.BatchNorm2d if cfg.torchvision_v2 else None,
        )
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
        heads = self.v2_heads(cfg.fpn_channels, anchors.num_anchors_per_location()[0]) if cfg.torchvision_v2 else {}
        model = self.detector_class(
            backbone,
            num_classes + self.label_offset,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_score_thresh=cfg.score_thresh,
            box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img,
            **heads,
        )
        model.transform = PadOnlyTransform()
        return model

    @staticmethod
    def v2_heads(width: int, num_anchors: int) -> dict[str, nn.Module]:
        """torchvision's v2 ``rpn_head`` and ``box_head`` for FPN maps of ``width`` channels (the box head maps
        RoI features ``[R, width, 7, 7]`` to ``[R, 1024]``, as the v1 head does)."""
        return dict(rpn_head=RPNHead(width, num_anchors, conv_depth=2),
                    box_head=FastRCNNConvFCHead((width, 7, 7), [width] * 4, [1024], norm_layer=nn.BatchNorm2d))


@register_family("mask_rcnn")
class MaskRCNNAdapter(FasterRCNNAdapter):
    """Mask R-CNN: Faster R-CNN plus torchvision's mask branch (RoIAlign 14x14 on P2-P5, four 3x3 convolutions,
    a 2x deconvolution, one 28x28 mask logit map per class, per-pixel BCE on the matched class).

    The mask head is ``fpn_channels`` wide (torchvision's: 256), with BatchNorm under ``model.torchvision_v2``
    (``maskrcnn_resnet50_fpn_v2``). It trains on ``targets["masks"]`` and :meth:`predict` adds ``"masks"``
    ``[n, 1, H, W]`` (probabilities, input pixels). Its features for distillation are the FPN levels, as for
    Faster R-CNN.
    """

    detector_class = MaskRCNN
    predicts_masks = True

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        model = super().build_model(cfg, num_classes)
        # torchvision takes a custom mask predictor only without num_classes (and then a box predictor too):
        # replace its 256-wide mask branch after construction instead.
        width = cfg.fpn_channels
        norm = nn.BatchNorm2d if cfg.torchvision_v2 else None
        model.roi_heads.mask_head = MaskRCNNHeads(width, [width] * 4, dilation=1, norm_layer=norm)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(width, width, num_classes + self.label_offset)
        return model
