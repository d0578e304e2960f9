"""The boxes ``B̂`` that feed the positional AKE (paper Eq. 3).

Per image: one jittered copy of each ground truth with ``IoU(jittered, gt) > α``, then background boxes with
``max IoU(box, all gts) < β`` until there are ``n``. Candidates are drawn in batches and filtered, so the
only Python loop is over rounds of candidates, never over boxes.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

JITTER_CANDIDATES = 32  # candidates drawn per ground truth; the first valid one is kept
JITTER_SHIFT = 0.15  # centre shift, as a fraction of the gt's width / height
JITTER_LOG_SCALE = 0.25  # sides scaled by exp(uniform(-s, s))
BACKGROUND_SHIFT = 1.5  # centre of "near" background boxes: gt centre ± this many gt sizes
BACKGROUND_LOG_SCALE = 1.0  # sides of "near" background boxes: gt sides times exp(uniform(-s, s))
BACKGROUND_MIN_SIDE = 1e-3  # clipped background candidates with a thinner side are dropped
BACKGROUND_MAX_ROUNDS = 50


def sample_query_boxes(gt_boxes: Tensor, n: int, alpha: float = 0.6, beta: float = 0.4,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``B̂`` of Eq. 3 for one image.

    Args:
        gt_boxes: ``[M, 4]`` ground truths, ``xyxy`` normalised to ``[0, 1]``, positive width and height.
        n: number of boxes to return.
        alpha: IoU that each jittered box must exceed with its ground truth.
        beta: IoU that each background box must stay below with every ground truth.
        generator: source of randomness (on ``gt_boxes.device``); the same seed gives the same boxes.
    Returns:
        ``(boxes, gt_index)``: ``[n, 4]`` ``xyxy`` boxes inside ``[0, 1]`` with positive width and height, and
        int64 ``[n]``. The first ``min(M, n)`` rows are jittered ground truths, ``gt_index`` their row in
        ``gt_boxes`` (a random subset of ``n`` ground truths, in order, when ``M > n``); the rest are background
        with ``gt_index = -1``.
    Raises:
        RuntimeError: if not enough background boxes are found in ``BACKGROUND_MAX_ROUNDS`` rounds.
    """
    if not (0 <= alpha < 1 and 0 < beta <= 1):
        raise ValueError(f"need 0 <= alpha < 1 and 0 < beta <= 1, got alpha={alpha}, beta={beta}")
    num_gt = len(gt_boxes)
    if num_gt > n:
        keep = torch.randperm(num_gt, generator=generator, device=gt_boxes.device)[:n].sort().values
    else:
        keep = torch.arange(num_gt, device=gt_boxes.device)
    positives = _jitter(gt_boxes[keep], alpha, generator)
    background = _background(gt_boxes, n - len(keep), beta, generator)
    gt_index = torch.cat([keep, keep.new_full((len(background),), -1)])
    return torch.cat([positives, background]), gt_index


def sample_query_boxes_batch(gt_boxes_list: list[Tensor], n: int, alpha: float = 0.6, beta: float = 0.4,
                             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sample_query_boxes` for each of B images, stacked: ``([B, n, 4], int64 [B, n])``."""
    samples = [sample_query_boxes(gt, n, alpha, beta, generator) for gt in gt_boxes_list]
    return torch.stack([boxes for boxes, _ in samples]), torch.stack([index for _, index in samples])


def _uniform(shape: tuple[int, ...], low: float, high: float, like: Tensor,
             generator: torch.Generator | None) -> Tensor:
    """Uniform samples in ``[low, high)`` with the dtype and device of ``like``."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)


def _perturb(gt: Tensor, shift: float, log_scale: float, generator: torch.Generator | None) -> Tensor:
    """Random boxes around ``gt`` (``[..., 4]`` xyxy): centre moved by up to ``shift`` times the gt's size,
    sides scaled by ``exp(uniform(-log_scale, log_scale))``, clipped to ``[0, 1]``. Same shape as ``gt``."""
    cxcywh = box_convert(gt, "xyxy", "cxcywh")
    centre, size = cxcywh[..., :2], cxcywh[..., 2:]
    centre = centre + size * _uniform(size.shape, -shift, shift, gt, generator)
    size = size * _uniform(size.shape, -log_scale, log_scale, gt, generator).exp()
    return box_convert(torch.cat([centre, size], dim=-1), "cxcywh", "xyxy").clamp(0, 1)


def _jitter(gt_boxes: Tensor, alpha: float, generator: torch.Generator | None) -> Tensor:
    """One jittered copy of each of ``gt_boxes`` (``[M, 4]`` xyxy) with IoU above ``alpha``: the first valid
    of ``JITTER_CANDIDATES`` candidates, or the gt itself if none is valid. Returns ``[M, 4]``."""
    num_gt = len(gt_boxes)
    expanded = gt_boxes[:, None].expand(num_gt, JITTER_CANDIDATES, 4)
    candidates = _perturb(expanded, JITTER_SHIFT, JITTER_LOG_SCALE, generator)  # [M, K, 4]
    rows = torch.arange(num_gt, device=gt_boxes.device)
    # IoU of each candidate with its own gt: pairwise [M*K, M], then the gt's own column.
    iou = box_iou(candidates.reshape(-1, 4), gt_boxes).view(num_gt, JITTER_CANDIDATES, num_gt)[rows, :, rows]
    valid = iou > alpha  # [M, K]
    first = valid.int().argmax(dim=1)
    chosen = candidates[rows, first]
    return torch.where(valid.any(dim=1, keepdim=True), chosen, gt_boxes)


def _background(gt_boxes: Tensor, count: int, beta: float, generator: torch.Generator | None) -> Tensor:
    """``count`` boxes (``[count, 4]`` xyxy, sides >= ``BACKGROUND_MIN_SIDE``) whose IoU with every one of
    ``gt_boxes`` (``[M, 4]``) is below ``beta``; half of each round's candidates lie near a random gt, half
    anywhere in the image."""
    found: list[Tensor] = []
    remaining = count
    for _ in range(BACKGROUND_MAX_ROUNDS):
        if remaining <= 0:
            break
        candidates = _background_candidates(gt_boxes, max(64, 2 * remaining), generator)
        sides = candidates[:, 2:] - candidates[:, :2]
        candidates = candidates[(sides >= BACKGROUND_MIN_SIDE).all(dim=1)]
        if len(gt_boxes):
            candidates = candidates[box_iou(candidates, gt_boxes).amax(dim=1) < beta]
        found.append(candidates[:remaining])
        remaining -= len(found[-1])
    if remaining > 0:
        raise RuntimeError(f"found only {count - remaining} of {count} background boxes with IoU < {beta} "
                           f"against {len(gt_boxes)} ground truths in {BACKGROUND_MAX_ROUNDS} rounds")
    return torch.cat([gt_boxes.new_zeros(0, 4), *found])


def _background_candidates(gt_boxes: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``[count, 4]`` clipped xyxy candidates: the first half around random ground truths (all uniform when
    there are none), the rest with corners drawn uniformly over the image."""
    near = gt_boxes.new_zeros(0, 4)
    if len(gt_boxes):
        pick = torch.randint(len(gt_boxes), (count // 2,), generator=generator, device=gt_boxes.device)
        near = _perturb(gt_boxes[pick], BACKGROUND_SHIFT, BACKGROUND_LOG_SCALE, generator)
    corners = torch.rand((count - len(near), 2, 2), generator=generator, dtype=gt_boxes.dtype,
                         device=gt_boxes.device).sort(dim=1).values  # [R, (two draws), (x, y)]
    anywhere = corners.flatten(1)  # sorted draws: (x1, y1, x2, y2)
    return torch.cat([near, anywhere])
