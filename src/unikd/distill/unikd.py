"""Stage 2, injecting knowledge into the student (paper §3.2.3, Eq. 7–8): the UniKD distiller."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.config import ConfigError, DistillConfig
from unikd.transformer import HungarianMatcher, flatten_levels

from .adaptor import Adaptor
from .ake import AKE, KnowledgeExtractors, Queries
from .common import normalise_targets, pyramid_image_size, query_boxes

QUERY_SETS = {"both": ("ct", "pos"), "content": ("ct",), "positional": ("pos",)}


def knowledge_distance(z_s: Tensor, z_t: Tensor, positive: Tensor) -> Tensor:
    """``D`` of Eq. 8, averaged over the batch: per image, the mean over positive queries of the MSE
    (averaged over channels) plus the mean over negative queries. An empty set adds 0.

    ``z_s``, ``z_t`` [B, N, C]; ``positive`` bool [B, N]. Returns a scalar.
    """
    mse = (z_s - z_t).pow(2).mean(-1)
    pos = positive.to(mse.dtype)
    neg = 1 - pos
    per_image = (mse * pos).sum(1) / pos.sum(1).clamp(min=1) + (mse * neg).sum(1) / neg.sum(1).clamp(min=1)
    return per_image.mean()


class UniKD(nn.Module):
    """``loss(F_T, F_S, targets)`` = {λ1·D(z_ct_S, z_ct_T), λ2·D(z_pos_S, z_pos_T)}.

    The AKEs are frozen (eval mode, no parameter gradients; gradients flow through them into ``φ`` and the
    student). The queries always come from the teacher pyramid; ``f_e`` reads ``F_T`` for ``z_T`` and
    ``φ(F_S)`` for ``z_S``. Positives: the Hungarian match of the frozen content head's predictions (content
    queries), the jittered ground-truth boxes of ``B̂`` (positional queries).
    """

    def __init__(self, akes: KnowledgeExtractors, student_strides: list[int], student_channels: list[int],
                 teacher_strides: list[int], teacher_channels: list[int], cfg: DistillConfig):
        super().__init__()
        if cfg.queries not in QUERY_SETS:
            raise ConfigError(f"distill.queries: unknown value '{cfg.queries}' (choose {', '.join(QUERY_SETS)})")
        self.cfg = cfg
        self.akes = akes.eval().requires_grad_(False)
        self.adaptor = Adaptor(student_strides, student_channels, teacher_strides, teacher_channels,
                               layers=cfg.adaptor_layers, n_heads=akes.cfg.n_heads, n_points=akes.cfg.n_points)
        self.teacher_strides = teacher_strides
        self.matcher = HungarianMatcher()

    def train(self, mode: bool = True) -> UniKD:
        super().train(mode)
        self.akes.eval()
        return self

    def _teacher_side(self, ake: AKE, memory: Tensor, shapes: Tensor,
                      gts: list[dict]) -> tuple[Queries, Tensor, Tensor]:
        """Queries, ``z_T`` [B, N, C] and the positive mask [B, N] of one AKE on the teacher (no gradients)."""
        with torch.no_grad():
            if ake.kind == "ct":
                queries = ake.queries(memory, shapes)
                z_t = ake.extract(queries, memory, shapes)
                logits, boxes = ake.predict(z_t, queries)
                positive = torch.zeros(z_t.shape[:2], dtype=torch.bool, device=z_t.device)
                for i, (query, _) in enumerate(self.matcher(logits, boxes, gts)):
                    positive[i, query] = True
            else:
                b_hat, gt_index = query_boxes(gts, ake.n_queries, self.akes.cfg.alpha, self.akes.cfg.beta)
                queries = ake.queries(memory, shapes, b_hat)
                z_t = ake.extract(queries, memory, shapes)
                positive = gt_index >= 0
        return queries, z_t, positive

    def loss(self, teacher_features: list[Tensor], student_features: list[Tensor],
             targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``teacher_features``: the teacher's levels [B, C_T, H_l, W_l]; ``student_features``: the student's;
        ``targets`` in image pixels (as the detectors take them). Returns ``loss_kd_ct`` / ``loss_kd_pos``."""
        memory_t, shapes_t = flatten_levels(teacher_features)
        memory_s, shapes_s = flatten_levels(self.adaptor(student_features, teacher_features))
        gts = normalise_targets(targets, pyramid_image_size(teacher_features, self.teacher_strides))
        weights = {"ct": self.cfg.lambda_ct, "pos": self.cfg.lambda_pos}
        losses = {}
        for kind in QUERY_SETS[self.cfg.queries]:
            ake = getattr(self.akes, kind)
            queries, z_t, positive = self._teacher_side(ake, memory_t, shapes_t, gts)
            z_s = ake.extract(queries, memory_s, shapes_s)
            losses[f"loss_kd_{kind}"] = weights[kind] * knowledge_distance(z_s, z_t, positive)
        return losses
