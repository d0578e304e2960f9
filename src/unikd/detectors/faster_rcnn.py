"""Two-stage detector on P2-P6: torchvision Faster R-CNN."""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from unikd.config import DetectorConfig
from unikd.detectors.backbone import resnet_fpn
from unikd.detectors.base import DetectorAdapter
from unikd.detectors.registry import register_family


@register_family("faster_rcnn")
class FasterRCNNAdapter(DetectorAdapter):
    """Faster R-CNN: FPN over layer1-layer4 (P2-P5) plus a max-pooled P6 used by the RPN only.

    Its softmax classifier reserves class 0 for background, so labels are shifted by one internally.
    RPN anchors: one size per level x ratios 0.5, 1, 2.
    """

    feature_strides = [4, 8, 16, 32, 64]
    label_offset = 1

    def build_model(self, cfg: DetectorConfig, num_classes: int, image_size: int) -> nn.Module:
        backbone = resnet_fpn(
            cfg.backbone,
            cfg.fpn_channels,
            cfg.trainable_layers,
            returned_stages=["layer1", "layer2", "layer3", "layer4"],
            extra_blocks=LastLevelMaxPool(),
        )
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
        return FasterRCNN(
            backbone,
            num_classes + self.label_offset,
            min_size=image_size,
            max_size=image_size,
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
        )
