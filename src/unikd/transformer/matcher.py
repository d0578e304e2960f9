"""Hungarian matching of set predictions to ground truth (DETR, with Deformable DETR's focal class cost).

Used by stage 1 to split the content queries ``z_ct`` into positives and negatives (paper §3.2.2), by
stage 2 to pick the positive content queries, and by Deformable DETR itself.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth boxes that minimises a weighted cost.

    The cost of query ``i`` for target ``j`` is
    ``cost_class * focal(i, label_j) + cost_bbox * |box_i - box_j|_1 - cost_giou * GIoU(box_i, box_j)``,
    where the focal class cost is ``α(1-p)^γ(-log p) - (1-α)p^γ(-log(1-p))`` at ``p = sigmoid(logit)``
    of the target's class. Boxes are normalised ``cxcywh``; the GIoU is taken on their ``xyxy`` form.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Matching cost of every prediction against every target.

        Args:
            logits: ``[N, K]`` sigmoid class logits.
            boxes: ``[N, 4]`` predicted boxes, normalised ``cxcywh``.
            labels: int64 ``[M]`` target classes in ``0..K-1``.
            tgt_boxes: ``[M, 4]`` target boxes, normalised ``cxcywh``.
        Returns:
            ``[N, M]`` float32 cost (lower is a better match).
        """
        prob = logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        class_cost = pos[:, labels] - neg[:, labels]

        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        l1_cost = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return self.cost_class * class_cost + self.cost_bbox * l1_cost - self.cost_giou * giou

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            logits: ``[B, N, K]`` sigmoid class logits.
            boxes: ``[B, N, 4]`` predicted boxes, normalised ``cxcywh``.
            targets: B dicts with ``"labels"`` int64 ``[M_b]`` in ``0..K-1`` and ``"boxes"`` ``[M_b, 4]``
                normalised ``cxcywh``.
        Returns:
            Per image ``(query_idx, target_idx)``: int64 CPU tensors ``[m]``, ``m = min(N, M_b)``, sorted by
            ``query_idx``; empty when the image has no targets.
        """
        batch, num_queries = logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, tgt_boxes)
        cost = cost.view(batch, num_queries, len(tgt_boxes)).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for b, image_cost in enumerate(cost.split(sizes, dim=-1)):
            query_idx, target_idx = linear_sum_assignment(image_cost[b].numpy())
            indices.append((torch.as_tensor(query_idx, dtype=torch.int64),
                            torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices
