"""RepPoints (Yang et al., ICCV 2019): objects as sets of 9 points, refined once through deformable convolution.

torchvision's ``FCOS`` gives the skeleton (transform, backbone, one anchor per location, split per level);
the anchor of a location carries its centre (the point location) and its level's base scale (the config's
anchor size, the paper's ``4 x stride``). What is RepPoints' own lives here:

- :class:`RepPointsHead`: GroupNorm towers; init points from a plain conv; the classification and refine
  branches sample features at the init points with ``torchvision.ops.DeformConv2d``; refined points are
  offsets added to the (detached) init points;
- :func:`points_to_boxes_moment` / :func:`points_to_boxes_minmax`: the point set -> pseudo box conversion;
- :func:`point_assign` (init stage) and :func:`max_iou_assign` (refine stage);
- :class:`RepPoints`: ``compute_loss`` (focal + smooth L1 on the converted boxes of both stages) and inference.

Points are ``(x, y)`` offsets in units of the level's stride from their location; a location at grid cell
``(w, h)`` of a stride-``s`` level sits at ``(w * s, h * s)`` in the image (torchvision's anchor centres).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import DeformConv2d, batched_nms, box_iou, clip_boxes_to_image, sigmoid_focal_loss

from unikd.config import ConfigError, DetectorConfig
from unikd.detectors.heads import flatten_levels, gn_tower, init_normal, prior_bias
from unikd.detectors.one_stage import OneStageAdapter
from unikd.detectors.registry import register_family

NUM_POINTS = 9  # a 3x3 deformable kernel: one sampling position per point
POINT_TRANSFORMS = ("moment", "minmax")
GRADIENT_MUL = 0.1  # share of the init points' gradient that flows back through the deformable offsets
MOMENT_MUL = 0.01  # share of the moment transfer's gradient that is kept
SMOOTH_L1_BETA = 1 / 9
INIT_WEIGHT, REFINE_WEIGHT = 0.5, 1.0  # box-loss weights of the two stages
POS_IOU, NEG_IOU = 0.5, 0.4  # refine-stage max-IoU thresholds


def kernel_grid(kernel: int) -> Tensor:
    """The regular sampling positions of a ``kernel x kernel`` convolution, ``[kernel**2, 2]`` as ``(x, y)``
    offsets from the centre, in deformable convolution's kernel order (row-major)."""
    r = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def points_to_dcn_offset(points: Tensor) -> Tensor:
    """Deformable-convolution offsets that make a 3x3 kernel sample exactly at ``points``.

    Args:
        points: ``[B, 9, 2, H, W]``, ``(x, y)`` offsets of each point from its location, in grid units.
    Returns:
        ``[B, 18, H, W]``: ``(dy, dx)`` per kernel position, i.e. the point minus the kernel's regular position.
    """
    grid = kernel_grid(3).to(points)[None, :, :, None, None]  # [1, 9, 2, 1, 1]
    return (points - grid).flip(2).flatten(1, 2)


def points_to_boxes_minmax(points: Tensor) -> Tensor:
    """The tightest box around each point set: ``[..., P, 2] (x, y) -> [..., 4]`` xyxy."""
    return torch.cat([points.amin(dim=-2), points.amax(dim=-2)], dim=-1)


def points_to_boxes_moment(points: Tensor, transfer: Tensor) -> Tensor:
    """A box centred on the points' mean with half-size ``std * exp(transfer)`` per axis (unbiased std).

    Args: points ``[..., P, 2]`` (x, y); transfer ``[2]`` (log-scale of the half width, half height).
    Returns: ``[..., 4]`` xyxy.
    """
    mean = points.mean(dim=-2)
    half = points.std(dim=-2) * transfer.exp()
    return torch.cat([mean - half, mean + half], dim=-1)


def point_assign(locations: Tensor, levels: Tensor, level_scales: Tensor, gt_boxes: Tensor,
                 pos_num: int = 1) -> Tensor:
    """RepPoints' init-stage assigner for one image.

    A ground truth of size ``sqrt(w * h)`` belongs to the highest level whose base scale is at most that size
    (the lowest level if none is); on that level, its ``pos_num`` locations nearest to its centre (distance
    divided by the box's width and height) are positive for it. A location chosen by several ground truths
    keeps the nearest (the first on a tie).

    Args:
        locations: ``[A, 2]`` (x, y) in pixels; levels: ``[A]`` int64 level index of each location;
        level_scales: ``[L]`` increasing base scale per level (pixels); gt_boxes: ``[M, 4]`` xyxy.
    Returns:
        ``[A]`` int64, the matched ground truth or -1.
    """
    matched = torch.full((locations.shape[0],), -1, dtype=torch.int64, device=locations.device)
    if gt_boxes.numel() == 0:
        return matched
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    size = wh.prod(dim=1).sqrt()
    gt_levels = (torch.searchsorted(level_scales.contiguous(), size.contiguous(), right=True) - 1)
    gt_levels = gt_levels.clamp(min=0)  # [M]; searchsorted gives at most L, so at most L - 1 here
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distance = ((locations[:, None, :] - centres[None]) / wh[None]).norm(dim=2)  # [A, M]
    distance = distance.masked_fill(levels[:, None] != gt_levels[None, :], float("inf"))
    k = min(pos_num, locations.shape[0])
    nearest = distance.topk(k, dim=0, largest=False).indices  # [k, M]
    chosen = torch.full_like(distance, float("inf")).scatter_(0, nearest, distance.gather(0, nearest))
    best, gt = chosen.min(dim=1)
    matched[torch.isfinite(best)] = gt[torch.isfinite(best)]
    return matched


def max_iou_assign(boxes: Tensor, gt_boxes: Tensor, pos_iou: float = POS_IOU, neg_iou: float = NEG_IOU) -> Tensor:
    """RepPoints' refine-stage assigner for one image: each box takes its highest-IoU ground truth.

    IoU >= ``pos_iou``: positive; < ``neg_iou``: background (-1); in between: ignored (-2). Then every box
    that has a ground truth's highest IoU (ties included, the IoU above 0) is positive for its own best
    ground truth, so that each ground truth gets at least one positive.

    Args: boxes ``[A, 4]``, gt_boxes ``[M, 4]``, xyxy. Returns ``[A]`` int64: gt index, -1 or -2.
    """
    if gt_boxes.numel() == 0:
        return torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=boxes.device)
    ious = box_iou(boxes, gt_boxes)  # [A, M]
    best_iou, best_gt = ious.max(dim=1)
    matched = best_gt.clone()
    matched[best_iou < pos_iou] = -2
    matched[best_iou < neg_iou] = -1
    gt_best = ious.max(dim=0).values  # [M]
    low_quality = ((ious == gt_best[None]) & (gt_best[None] > 0)).any(dim=1)
    matched[low_quality] = best_gt[low_quality]
    return matched


def deform_float32(dcn: DeformConv2d, x: Tensor, offset: Tensor) -> Tensor:
    """``dcn(x, offset)`` in float32 whatever autocast says (torchvision's CPU kernel has no half types)."""
    with torch.autocast(x.device.type, enabled=False):
        return dcn(x.float(), offset.float())


class RepPointsHead(nn.Module):
    """The RepPoints head on L levels of ``C`` channels.

    ``forward(features)`` returns ``cls_logits [B, A, K]``, ``points_init [B, A, 9, 2]`` and
    ``points_refine [B, A, 9, 2]`` (``A = sum_l H_l * W_l``; points as in the module docstring).
    ``to_boxes(points [..., 9, 2]) -> [..., 4]`` is the point-to-box conversion, in the same units.
    """

    def __init__(self, channels: int, num_classes: int, strides: list[int], point_transform: str,
                 num_convs: int = 3, point_channels: int | None = None):
        super().__init__()
        if point_transform not in POINT_TRANSFORMS:
            raise ValueError(f"point_transform: expected one of {POINT_TRANSFORMS}, got '{point_transform}'")
        point_channels = point_channels or channels
        self.strides = list(strides)
        self.point_transform = point_transform
        self.cls_tower = gn_tower(channels, num_convs)
        self.pts_tower = gn_tower(channels, num_convs)
        self.init_conv = nn.Conv2d(channels, point_channels, 3, padding=1)
        self.init_out = nn.Conv2d(point_channels, 2 * NUM_POINTS, 1)
        self.cls_dcn = DeformConv2d(channels, point_channels, 3, padding=1)
        self.cls_out = nn.Conv2d(point_channels, num_classes, 1)
        self.refine_dcn = DeformConv2d(channels, point_channels, 3, padding=1)
        self.refine_out = nn.Conv2d(point_channels, 2 * NUM_POINTS, 1)
        for layer in (self.init_conv, self.init_out, self.cls_dcn, self.refine_dcn, self.refine_out):
            init_normal(layer)
        init_normal(self.cls_out, prior_bias())
        self.moment_transfer = nn.Parameter(torch.zeros(2))  # used by the "moment" conversion only

    def to_boxes(self, points: Tensor) -> Tensor:
        """``[..., 9, 2] -> [..., 4]`` by the configured conversion (the moment transfer keeps MOMENT_MUL of its
        gradient)."""
        if self.point_transform == "minmax":
            return points_to_boxes_minmax(points)
        transfer = self.moment_transfer.detach() * (1 - MOMENT_MUL) + self.moment_transfer * MOMENT_MUL
        return points_to_boxes_moment(points, transfer)

    def forward_level(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One level ``[B, C, H, W]`` -> cls ``[B, K, H, W]``, init and refine points ``[B, 9, 2, H, W]``."""
        b, _, h, w = x.shape
        pts_feature = self.pts_tower(x)
        init = self.init_out(F.relu(self.init_conv(pts_feature))).view(b, NUM_POINTS, 2, h, w)
        # The offsets pass only GRADIENT_MUL of their gradient back to the init points.
        offset = points_to_dcn_offset((1 - GRADIENT_MUL) * init.detach() + GRADIENT_MUL * init)
        cls = self.cls_out(F.relu(deform_float32(self.cls_dcn, self.cls_tower(x), offset)))
        refine = self.refine_out(F.relu(deform_float32(self.refine_dcn, pts_feature, offset)))
        refine = refine.view(b, NUM_POINTS, 2, h, w)
        return cls, init, refine + init.detach()

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        cls_logits, points_init, points_refine = [], [], []
        for x in features:
            cls, init, refine = self.forward_level(x)
            cls_logits.append(flatten_levels(cls))
            points_init.append(flatten_levels(init.flatten(1, 2)).unflatten(2, (NUM_POINTS, 2)))
            points_refine.append(flatten_levels(refine.flatten(1, 2)).unflatten(2, (NUM_POINTS, 2)))
        return {"cls_logits": torch.cat(cls_logits, 1), "points_init": torch.cat(points_init, 1),
                "points_refine": torch.cat(points_refine, 1)}


def points_to_image_boxes(to_boxes: Callable[[Tensor], Tensor], points: Tensor, anchors: Tensor,
                          strides: Tensor) -> Tensor:
    """Boxes in image pixels from point sets: ``centre + to_boxes(points) * stride``.

    Args: points ``[A, 9, 2]``, anchors ``[A, 4]`` (their centres are the locations), strides ``[A]``.
    Returns ``[A, 4]`` xyxy.
    """
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).repeat(1, 2)
    return centres + to_boxes(points) * strides[:, None]


def smooth_l1_sum(pred: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """Smooth L1 (beta 1/9) of boxes ``[P, 4]`` divided by their level's base scale ``[P]``, summed."""
    return F.smooth_l1_loss(pred / scale[:, None], target / scale[:, None], beta=SMOOTH_L1_BETA, reduction="sum")


class RepPoints(FCOS):
    """torchvision's FCOS skeleton with the RepPoints head, assigners, losses and inference.

    The anchor generator makes one square anchor per location whose size is the level's base scale (the
    point assigner's level sizes and the box loss's normaliser). Losses: ``classification`` (focal, from the
    refine-stage assignment, ignored boxes left out), ``bbox_init`` and ``bbox_refine`` (smooth L1 on the
    converted boxes, normalised by the base scale; weights 0.5 and 1). Each is divided by its stage's number
    of positives.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: RepPointsHead, **kwargs):
        super().__init__(backbone, num_classes, head=head, **kwargs)

    def level_strides(self, num_anchors_per_level: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """``([A] level index, [A] stride)`` of the concatenated locations."""
        counts = torch.tensor(num_anchors_per_level, device=device)
        levels = torch.repeat_interleave(counts)  # [A]: 0 counts[0] times, then 1 ...
        return levels, torch.tensor(self.head.strides, dtype=torch.float32, device=device)[levels]

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     num_anchors_per_level: list[int]) -> dict[str, Tensor]:
        # Losses and assignment in float32 under mixed precision.
        cls_logits = head_outputs["cls_logits"].float()
        points_init, points_refine = head_outputs["points_init"].float(), head_outputs["points_refine"].float()
        levels, strides = self.level_strides(num_anchors_per_level, cls_logits.device)
        level_scales = torch.tensor([s[0] for s in self.anchor_generator.sizes], dtype=torch.float32,
                                    device=cls_logits.device)
        scales = level_scales[levels]  # [A] base scale of each location's level

        loss_init, loss_refine, loss_cls = cls_logits.new_zeros(()), cls_logits.new_zeros(()), cls_logits.new_zeros(())
        num_init, num_refine = 0, 0
        for i, target in enumerate(targets):
            gt = target["boxes"]
            init_boxes = points_to_image_boxes(self.head.to_boxes, points_init[i], anchors[i], strides)
            locations = (anchors[i][:, :2] + anchors[i][:, 2:]) / 2
            matched = point_assign(locations, levels, level_scales, gt)
            pos = matched >= 0
            loss_init = loss_init + smooth_l1_sum(init_boxes[pos], gt[matched[pos]], scales[pos])
            num_init += int(pos.sum())

            matched = max_iou_assign(init_boxes.detach(), gt)
            pos = matched >= 0
            refine_boxes = points_to_image_boxes(self.head.to_boxes, points_refine[i][pos],
                                                 anchors[i][pos], strides[pos])
            loss_refine = loss_refine + smooth_l1_sum(refine_boxes, gt[matched[pos]], scales[pos])
            num_refine += int(pos.sum())

            gt_classes = torch.zeros_like(cls_logits[i])
            gt_classes[pos, target["labels"][matched[pos]]] = 1.0
            valid = matched != -2
            loss_cls = loss_cls + sigmoid_focal_loss(cls_logits[i][valid], gt_classes[valid], reduction="sum")
        return {
            "classification": loss_cls / max(1, num_refine),
            "bbox_init": INIT_WEIGHT * loss_init / max(1, num_init),
            "bbox_refine": REFINE_WEIGHT * loss_refine / max(1, num_refine),
        }

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image: sigmoid scores above ``score_thresh``, the top ``topk_candidates`` per level, boxes from
        the refined points, clipped, class-wise NMS, the best ``detections_per_img``.

        ``head_outputs`` and ``anchors`` come split per level (``[B, A_l, ...]`` and B lists of ``[A_l, 4]``).
        """
        detections = []
        for index, image_shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            for level, stride in enumerate(self.head.strides):
                logits = head_outputs["cls_logits"][level][index]  # [A_l, K]
                points = head_outputs["points_refine"][level][index].float()  # [A_l, 9, 2]
                level_scores = logits.sigmoid().flatten()
                candidates = torch.where(level_scores > self.score_thresh)[0]
                level_scores, order = level_scores[candidates].topk(min(self.topk_candidates, len(candidates)))
                candidates = candidates[order]
                location = torch.div(candidates, logits.shape[1], rounding_mode="floor")
                level_anchors = anchors[index][level]
                level_strides = torch.full((len(level_anchors),), float(stride), device=logits.device)
                level_boxes = points_to_image_boxes(self.head.to_boxes, points, level_anchors, level_strides)
                boxes.append(clip_boxes_to_image(level_boxes[location], image_shape))
                scores.append(level_scores)
                labels.append(candidates % logits.shape[1])
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections


@register_family("reppoints")
class RepPointsAdapter(OneStageAdapter):
    """RepPoints on P3-P7. ``model.anchor_sizes`` are the levels' base scales (the paper: 4 x stride);
    ``model.point_transform`` picks the point-to-box conversion (moment | minmax)."""

    detector_class = RepPoints

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        if cfg.point_transform not in POINT_TRANSFORMS:
            raise ConfigError(f"model.point_transform: expected one of {', '.join(POINT_TRANSFORMS)}, "
                              f"got '{cfg.point_transform}'")
        if sorted(cfg.anchor_sizes) != list(cfg.anchor_sizes) or len(set(cfg.anchor_sizes)) != len(cfg.anchor_sizes):
            raise ConfigError(f"model.anchor_sizes: RepPoints' level scales must increase, got {cfg.anchor_sizes}")
        self.point_transform = cfg.point_transform
        return super().build_model(cfg, num_classes)

    def anchor_generator(self, anchor_sizes: list[int]) -> AnchorGenerator:
        return AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))

    def head(self, channels: int, num_anchors: int, num_classes: int) -> nn.Module:
        return RepPointsHead(channels, num_classes, self.feature_strides, self.point_transform)
