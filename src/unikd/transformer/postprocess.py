"""From set predictions to detections: the top-k (query, class) pairs by sigmoid score, as Deformable DETR does."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def topk_detections(logits: Tensor, boxes: Tensor, image_sizes: list[tuple[int, int]],
                    k: int) -> list[dict[str, Tensor]]:
    """Per image the ``k`` highest ``sigmoid(logit)`` over all queries and classes (a query may appear with
    several classes), no NMS.

    Args:
        logits: ``[B, N, K]`` sigmoid class logits; boxes: ``[B, N, 4]`` normalised ``cxcywh`` over each image.
        image_sizes: B pairs ``(h, w)`` in pixels.
    Returns:
        B dicts: ``"boxes"`` ``[k', 4]`` xyxy in the image's pixels (clipped to it), ``"scores"`` ``[k']``,
        ``"labels"`` int64 ``[k']`` in ``0..K-1``, ``k' = min(k, N * K)``, by decreasing score.
    """
    num_classes = logits.shape[-1]
    scores, flat = logits.sigmoid().flatten(1).topk(min(k, logits.shape[1] * num_classes), dim=1)
    query, labels = flat // num_classes, flat % num_classes
    scale = boxes.new_tensor([[w, h, w, h] for h, w in image_sizes])[:, None]  # [B, 1, 4]
    xyxy = box_convert(boxes, "cxcywh", "xyxy").clamp(0, 1) * scale
    picked = torch.gather(xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(picked, scores, labels)]
