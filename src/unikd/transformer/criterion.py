"""Set-prediction loss (paper Eq. 6 with DETR-style weights): focal classification over all queries,
L1 and GIoU box losses over the matched ones, all normalised by the number of positives."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss


def set_loss(logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], indices: list[tuple[Tensor, Tensor]],
             num_boxes: float | Tensor, weight_class: float = 2.0, weight_l1: float = 5.0, weight_giou: float = 2.0,
             focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> dict[str, Tensor]:
    """Weighted losses of a set of predictions under a given assignment to the targets.

    Args:
        logits: ``[B, N, K]`` sigmoid class logits.
        boxes: ``[B, N, 4]`` predicted boxes, normalised ``cxcywh``.
        targets: B dicts with ``"labels"`` int64 ``[M_b]`` in ``0..K-1`` and ``"boxes"`` ``[M_b, 4]``
            normalised ``cxcywh``, on the device of ``logits``.
        indices: per image ``(query_idx, target_idx)``, int64 ``[m_b]`` each, on any device: the
            :class:`~unikd.transformer.matcher.HungarianMatcher` output, or a known assignment.
        num_boxes: total number of positives to normalise by (e.g. summed over all DDP ranks); clamped to >= 1.
    Returns:
        Scalars ``"loss_class"`` (sigmoid focal loss summed over all ``B*N*K`` entries, one-hot targets, unmatched
        queries all zeros), ``"loss_l1"`` (summed ``|box - target|`` over matched pairs) and ``"loss_giou"``
        (summed ``1 - GIoU`` over matched pairs), each times its weight and divided by ``num_boxes``.
    """
    device = logits.device
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    normaliser = torch.as_tensor(num_boxes, dtype=torch.float32, device=device).clamp(min=1)

    onehot = torch.zeros_like(logits)
    onehot[batch_idx, query_idx, tgt_labels] = 1
    loss_class = sigmoid_focal_loss(logits, onehot, alpha=focal_alpha, gamma=focal_gamma, reduction="sum")

    matched = boxes[batch_idx, query_idx]
    loss_l1 = (matched - tgt_boxes).abs().sum()
    loss_giou = generalized_box_iou_loss(box_convert(matched, "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="sum")
    return {
        "loss_class": weight_class * loss_class / normaliser,
        "loss_l1": weight_l1 * loss_l1 / normaliser,
        "loss_giou": weight_giou * loss_giou / normaliser,
    }
