"""Stage 1, absorbing knowledge from the teacher (paper §3.2.2): only the AKEs train, on frozen ``F_T``."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

from unikd.detectors import DetectorAdapter
from unikd.engine import distributed as D
from unikd.pyramid import Pyramid
from unikd.transformer import HungarianMatcher, set_loss

from .ake import KnowledgeExtractors
from .common import Frozen, WithFrozenTeacher, batch_query_boxes, known_assignment, normalise_targets


class AbsorbModel(WithFrozenTeacher):
    """The trainer's model for stage 1: ``forward(images, targets)`` gives the Eq. 6 losses of both AKEs.

    Content queries are matched to the ground truth by the Hungarian matcher; positional queries use the
    known assignment of ``B̂`` (jittered box ``i`` ↔ its ground truth). Each loss is normalised by the number
    of boxes averaged over the DDP ranks, as DETR does. ``predict`` gives the content AKE's own detections
    (the AKE mAP of the paper's Tab. 6f).
    """

    def __init__(self, teacher: DetectorAdapter, akes: KnowledgeExtractors, detections_per_img: int = 100):
        super().__init__()
        self.teacher = Frozen(teacher)
        self.akes = akes
        self.matcher = HungarianMatcher()
        self.detections_per_img = detections_per_img

    def _teacher(self, images: list[Tensor]) -> Pyramid:
        with torch.no_grad():
            return self.teacher.module.extract_features(images)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        teacher = self._teacher(images)
        memory = self.akes.teacher_memory(teacher)
        gts = normalise_targets(targets, teacher.image_sizes)
        device = memory.tokens.device
        losses = {}

        ct = self.akes.ct
        queries = ct.queries(memory)
        logits, boxes = ct.predict(ct.extract(queries, memory), queries)
        indices = self.matcher(logits, boxes, gts)
        num_boxes = D.mean_over_ranks(sum(len(t["labels"]) for t in gts), device)
        losses.update({f"ct_{k}": v for k, v in set_loss(logits, boxes, gts, indices, num_boxes).items()})

        pos = self.akes.pos
        b_hat, gt_index = batch_query_boxes(targets, gts, pos.n_queries, self.akes.cfg.alpha, self.akes.cfg.beta)
        queries = pos.queries(memory, b_hat)
        logits, boxes = pos.predict(pos.extract(queries, memory), queries)
        num_pos = D.mean_over_ranks(sum(min(len(t["labels"]), pos.n_queries) for t in gts), device)  # B̂ keeps ≤ N
        losses.update({f"pos_{k}": v for k, v in
                       set_loss(logits, boxes, gts, known_assignment(gt_index), num_pos).items()})
        return losses

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of the content AKE's FFN head: per image the top ``detections_per_img`` (query, class)
        scores, boxes xyxy in input pixels (clipped to the image), labels ``0..K-1``."""
        teacher = self._teacher(images)
        memory = self.akes.teacher_memory(teacher)
        ct = self.akes.ct
        queries = ct.queries(memory)
        logits, boxes = ct.predict(ct.extract(queries, memory), queries)
        num_classes = logits.shape[-1]
        k = min(self.detections_per_img, logits.shape[1] * num_classes)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)
        query, labels = flat // num_classes, flat % num_classes
        scale = boxes.new_tensor([[w, h, w, h] for h, w in teacher.image_sizes])[:, None]  # [B, 1, 4]
        xyxy = box_convert(boxes, "cxcywh", "xyxy").clamp(0, 1) * scale
        picked = torch.gather(xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(picked, scores, labels)]
