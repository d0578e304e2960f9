"""Pieces both stages share: the frozen teacher, targets in the AKE's coordinates, the query boxes ``B̂``."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from unikd.host_copy import to_device

from .box_sampler import sample_query_boxes_batch


class Frozen:
    """A module held outside its owner's registry: it is not among the owner's parameters, not in its
    ``state_dict`` (checkpoints stay small) and not switched by the owner's ``train()``. It is put in eval
    mode with ``requires_grad=False`` once, here."""

    def __init__(self, module: nn.Module):
        self.module = module.eval().requires_grad_(False)


class WithFrozenTeacher(nn.Module):
    """A module whose ``self.teacher`` is a :class:`Frozen` (or None) that still follows ``.to()``,
    ``.cuda()``, ``.double()``... of its owner, as a registered submodule would."""

    teacher: Frozen | None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher.module._apply(fn, recurse)
        return self


def normalise_targets(targets: list[dict[str, Tensor]],
                      image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Targets with ``"boxes"`` as cxcywh normalised over each image's own ``(h, w)`` (the matcher's and the
    FFN head's frame) and ``"boxes_xyxy"`` normalised xyxy; ``"labels"`` unchanged."""
    out = []
    for t, (h, w) in zip(targets, image_sizes):
        xyxy = (t["boxes"].float() / to_device(torch.tensor([w, h, w, h], dtype=torch.float32), t["boxes"].device)
                ).clamp(0, 1)
        out.append({"labels": t["labels"], "boxes": box_convert(xyxy, "xyxy", "cxcywh"), "boxes_xyxy": xyxy})
    return out


B_HAT = ("b_hat_boxes", "b_hat_gt_index")  # target keys of a B̂ the data loader drew (unikd.knowledge.seeded_boxes)


def query_boxes(targets: list[dict[str, Tensor]], n: int, alpha: float, beta: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``B̂`` for a batch of normalised targets: boxes [B, N, 4] cxcywh in each image's normalised coordinates
    (so inside the image, never in the padding) and ``gt_index`` [B, N] (the ground truth each jittered box
    copies, -1 for background). Drawn from ``generator`` (a CPU one), or else from the global RNG, which the
    trainer seeds. The sampler runs on the host: all images' ground truth comes over in one copy (one device
    sync per batch)."""
    gt = torch.cat([t["boxes_xyxy"] for t in targets]).cpu().split([len(t["boxes_xyxy"]) for t in targets])
    boxes, gt_index = sample_query_boxes_batch(list(gt), n, alpha, beta, generator)
    device = targets[0]["labels"].device
    return to_device(box_convert(boxes, "xyxy", "cxcywh"), device), to_device(gt_index, device)


def batch_query_boxes(targets: list[dict[str, Tensor]], gts: list[dict[str, Tensor]], n: int, alpha: float,
                      beta: float) -> tuple[Tensor, Tensor]:
    """``B̂`` of a batch (boxes [B, N, 4] cxcywh normalised, gt_index [B, N]): the one the data loader drew when
    every target carries it (:data:`B_HAT`, nothing read back from the device), else drawn here from the
    normalised ``gts`` with the global RNG (:func:`query_boxes`, one read back)."""
    if all(B_HAT[0] in t for t in targets):
        boxes, gt_index = (torch.stack([t[key] for t in targets]) for key in B_HAT)
        if boxes.shape[1] != n:
            raise ValueError(f"the data loader drew {boxes.shape[1]} query boxes per image; the AKE has {n} queries")
        return boxes, gt_index
    return query_boxes(gts, n, alpha, beta)


def known_assignment(gt_index: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Matcher-style indices for positional queries: query ``i`` is matched to ground truth ``gt_index[i]``."""
    out = []
    for row in gt_index:
        query = torch.nonzero(row >= 0).flatten()
        out.append((query, row[query]))
    return out
