"""ATSS (Zhang et al., CVPR 2020): one square anchor per location, adaptive training sample selection.

Built from torchvision parts: ``FCOS`` gives the transform / backbone / anchors / post-processing skeleton,
its GroupNorm classification tower is reused, and the losses are ``sigmoid_focal_loss``,
``generalized_box_iou_loss`` and BCE. What is ATSS's own lives here:

- :func:`atss_assign`: the assigner (paper, Algorithm 1) that replaces FCOS's scale ranges;
- :class:`ATSSRegressionHead`: box deltas from the anchor and the centerness branch, one learnable scale per level;
- :class:`ATSS`: ``compute_loss`` = assigner + focal, centerness-weighted GIoU (weight 2) and centerness BCE.

The box is regressed as deltas from the anchor box (``BoxCoder`` weights 10, 10, 5, 5), ATSS's default
"BOX" regression type; the ATSS paper shows that anchor-box and point regression are equivalent once the
positives are selected the same way.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from unikd.detectors.heads import flatten_levels, gn_tower, init_normal
from unikd.detectors.one_stage import OneStageAdapter
from unikd.detectors.registry import register_family

ATSS_TOPK = 9  # candidates per level and ground truth (the paper's k)
GIOU_WEIGHT = 2.0  # ATSS's REG_LOSS_WEIGHT


def atss_assign(anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = ATSS_TOPK) -> Tensor:
    """Adaptive training sample selection for one image.

    For each ground truth g: the ``topk`` anchors of each level whose centres are closest (L2) to g's centre
    are its candidates; the IoU threshold is ``mean + std`` (unbiased std) of the candidates' IoUs with g; a
    candidate is positive when its IoU reaches the threshold and its centre lies inside g (by more than 0.01
    px on every side). An anchor positive for several ground truths takes the one of highest IoU.

    Args:
        anchors: ``[A, 4]`` xyxy, levels concatenated in order.
        num_anchors_per_level: L counts summing to A.
        gt_boxes: ``[M, 4]`` xyxy.
    Returns:
        ``[A]`` int64: the index of the matched ground truth, or -1 for background.
    """
    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)  # [A, M]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = torch.cdist(anchor_centres, gt_centres)  # [A, M]

    candidates = []
    start = 0
    for count in num_anchors_per_level:
        k = min(topk, count)
        _, nearest = distances[start:start + count].topk(k, dim=0, largest=False)  # [k, M]
        candidates.append(nearest + start)
        start += count
    candidates = torch.cat(candidates)  # [C, M], anchor indices
    candidate_ious = ious.gather(0, candidates)  # [C, M]
    threshold = candidate_ious.mean(0)  # [M]
    if candidates.shape[0] > 1:  # the std of a single candidate is taken as 0
        threshold = threshold + candidate_ious.std(0)

    is_candidate = torch.zeros_like(ious, dtype=torch.bool).scatter_(0, candidates, True)
    x, y = anchor_centres[:, :1], anchor_centres[:, 1:]  # [A, 1]
    inside = torch.stack([x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x, gt_boxes[:, 3] - y])
    positive = is_candidate & (ious >= threshold) & (inside.amin(0) > 0.01)  # [A, M]

    best_iou, matched = ious.masked_fill(~positive, -1.0).max(dim=1)
    matched[best_iou < 0] = -1
    return matched


def centerness_target(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS/ATSS centerness of each anchor centre in its box: ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``.

    Args: anchors ``[P, 4]``, gt_boxes ``[P, 4]`` (pairs), centres inside their boxes. Returns ``[P]`` in [0, 1].
    """
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    left_top = centres - gt_boxes[:, :2]
    right_bottom = gt_boxes[:, 2:] - centres
    ratio = torch.minimum(left_top, right_bottom) / torch.maximum(left_top, right_bottom).clamp(min=1e-6)
    return ratio.clamp(min=0).prod(dim=1).sqrt()


class DeltaCoder:
    """``decode(deltas [N, 4], anchors [N, 4]) -> boxes [N, 4]``: torchvision's ``BoxCoder`` with ATSS's weights
    (10, 10, 5, 5), in the one-tensor call that FCOS's post-processing makes."""

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)):
        self.coder = BoxCoder(weights)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        return self.coder.decode_single(deltas, anchors)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level on the box branch), initialised to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ATSSRegressionHead(nn.Module):
    """GroupNorm tower, then box deltas (times a learnable per-level scale) and a centerness logit.

    Input: L maps ``[B, C, H_l, W_l]``. Output: ``([B, A, 4], [B, A, 1])`` with ``A = sum_l H_l * W_l``.
    """

    def __init__(self, channels: int, num_levels: int, num_convs: int):
        super().__init__()
        self.conv = gn_tower(channels, num_convs)
        self.bbox_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(channels, 1, 3, padding=1)
        for layer in (self.bbox_reg, self.bbox_ctrness):
            init_normal(layer)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        deltas, ctrness = [], []
        for x, scale in zip(features, self.scales):
            x = self.conv(x)
            deltas.append(flatten_levels(scale(self.bbox_reg(x))))
            ctrness.append(flatten_levels(self.bbox_ctrness(x)))
        return torch.cat(deltas, dim=1), torch.cat(ctrness, dim=1)


class ATSSHead(nn.Module):
    """Classification (torchvision's FCOS tower: GroupNorm, prior 0.01) + :class:`ATSSRegressionHead`, and the
    ATSS losses for given matches.

    ``forward(features)`` returns ``cls_logits [B, A, K]``, ``bbox_regression [B, A, 4]`` (deltas),
    ``bbox_ctrness [B, A, 1]``: the keys FCOS's post-processing reads.
    """

    def __init__(self, channels: int, num_classes: int, num_levels: int, num_convs: int = 4):
        super().__init__()
        self.box_coder = DeltaCoder()
        self.classification_head = FCOSClassificationHead(channels, 1, num_classes, num_convs,
                                                          norm_layer=partial(nn.GroupNorm, 32))
        self.regression_head = ATSSRegressionHead(channels, num_levels, num_convs)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        bbox_regression, bbox_ctrness = self.regression_head(features)
        return {"cls_logits": self.classification_head(features), "bbox_regression": bbox_regression,
                "bbox_ctrness": bbox_ctrness}

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        """Focal loss over all anchors, GIoU (weighted by the centerness target, weight 2) and centerness BCE
        over positives. Classification and centerness are normalised by the number of positives, the box loss
        by the sum of the positives' centerness targets.

        Args: B targets (``boxes [M, 4]``, ``labels [M]``), the head's outputs, B anchors ``[A, 4]``, B matches ``[A]``.
        """
        cls_logits = head_outputs["cls_logits"].float()  # losses in float32 under mixed precision
        foreground = torch.stack(matched_idxs) >= 0  # [B, A]
        gt_classes = torch.zeros_like(cls_logits)
        gt_boxes = []
        for i, (target, matched) in enumerate(zip(targets, matched_idxs)):
            positive = matched >= 0
            gt_classes[i, positive, target["labels"][matched[positive]]] = 1.0
            gt_boxes.append(target["boxes"][matched[positive]])
        gt_boxes = torch.cat(gt_boxes)  # [P, 4]
        positive_anchors = torch.stack(anchors)[foreground]  # [P, 4]
        num_positive = max(1, int(foreground.sum()))

        loss_cls = sigmoid_focal_loss(cls_logits, gt_classes, reduction="sum") / num_positive
        pred_boxes = self.box_coder.decode(head_outputs["bbox_regression"][foreground].float(), positive_anchors)
        ctrness_target = centerness_target(positive_anchors, gt_boxes)
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
        loss_box = GIOU_WEIGHT * (giou * ctrness_target).sum() / ctrness_target.sum().clamp(min=1e-6)
        loss_ctrness = F.binary_cross_entropy_with_logits(
            head_outputs["bbox_ctrness"][foreground].squeeze(-1).float(), ctrness_target, reduction="sum")
        loss_ctrness = loss_ctrness / num_positive
        return {"classification": loss_cls, "bbox_regression": loss_box, "bbox_ctrness": loss_ctrness}


class ATSS(FCOS):
    """torchvision's FCOS skeleton with ATSS's head, assigner and losses.

    One square anchor per location (the anchor generator's size per level; the paper uses 8 x stride); the
    assigner takes the paper's k = 9 candidates per level.
    Inference is FCOS's: score ``sqrt(sigmoid(cls) * sigmoid(centerness))``, top-k per level, batched NMS;
    boxes decoded from the anchor with :class:`DeltaCoder`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: ATSSHead, **kwargs):
        super().__init__(backbone, num_classes, head=head, **kwargs)
        self.box_coder = head.box_coder

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     num_anchors_per_level: list[int]) -> dict[str, Tensor]:
        matched_idxs = [atss_assign(a, num_anchors_per_level, t["boxes"]) for a, t in zip(anchors, targets)]
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


@register_family("atss")
class ATSSAdapter(OneStageAdapter):
    """ATSS on P3-P7: one square anchor per location of the config's size per level (the paper: 8 x stride)."""

    detector_class = ATSS

    def anchor_generator(self, anchor_sizes: list[int]) -> AnchorGenerator:
        return AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))

    def head(self, channels: int, num_anchors: int, num_classes: int) -> nn.Module:
        return ATSSHead(channels, num_classes, num_levels=len(self.feature_strides))
