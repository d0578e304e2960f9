"""Stage 2, injecting knowledge into the student (paper §3.2.3, Eq. 7–8): the UniKD distiller."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unikd.config import ConfigError, DistillConfig
from unikd.host_copy import to_device
from unikd.pyramid import Pyramid
from unikd.transformer import HungarianMatcher

from .ake import AKE, KnowledgeExtractors, Queries
from .base import Distiller, Levels
from .common import batch_query_boxes, normalise_targets
from .registry import register_method

QUERY_SETS = {"both": ("ct", "pos"), "content": ("ct",), "positional": ("pos",)}


def knowledge_distance(z_s: Tensor, z_t: Tensor, positive: Tensor) -> Tensor:
    """``D`` of Eq. 8 per image: the mean over positive queries of the MSE (averaged over channels) plus the
    mean over negative queries. An empty set adds 0.

    ``z_s``, ``z_t`` [B, N, C]; ``positive`` bool [B, N]. Returns [B].
    """
    mse = (z_s - z_t).pow(2).mean(-1)
    pos = positive.to(mse.dtype)
    neg = 1 - pos
    return (mse * pos).sum(1) / pos.sum(1).clamp(min=1) + (mse * neg).sum(1) / neg.sum(1).clamp(min=1)


@dataclass
class TeacherKnowledge:
    """The teacher's side of stage 2 for one AKE: what an offline store holds for it.

    Attributes:
        queries: ``q`` [B, N, C] and its reference (points [B, N, 2], or the boxes ``B̂`` [B, N, 4]).
        z: ``z_T`` [B, N, C].
        positive: [B, N] bool, the queries that stand for an object.
    """

    queries: Queries
    z: Tensor
    positive: Tensor


@torch.no_grad()
def teacher_knowledge(akes: KnowledgeExtractors, teacher: Pyramid, targets: list[dict[str, Tensor]],
                      kinds: tuple[str, ...], matcher: HungarianMatcher,
                      b_hat: tuple[Tensor, Tensor] | None = None) -> dict[str, TeacherKnowledge]:
    """The teacher's side of stage 2: queries, ``z_T`` and positives of each AKE in ``kinds`` ("ct", "pos"), from
    the teacher pyramid and the targets (image pixels), with the frozen ``akes``. ``b_hat``: ``(boxes [B, N, 4]
    cxcywh, gt_index [B, N])`` to use as ``B̂`` instead of the targets' (:func:`batch_query_boxes`). Per image: a
    sample's knowledge does not depend on its batch-mates (what ``unikd dump`` stores is this, image by image)."""
    memory = akes.teacher_memory(teacher)
    gts = normalise_targets(targets, teacher.image_sizes)
    knowledge = {}
    for kind in kinds:
        ake: AKE = getattr(akes, kind)
        if kind == "ct":
            queries = ake.queries(memory)
            z_t = ake.extract(queries, memory)
            logits, boxes = ake.predict(z_t, queries)
            positive = torch.zeros(z_t.shape[:2], dtype=torch.bool)
            for i, (query, _) in enumerate(matcher(logits, boxes, gts)):
                positive[i, query] = True
            positive = to_device(positive, z_t.device)
        else:
            boxes, gt_index = b_hat or batch_query_boxes(targets, gts, ake.n_queries, akes.cfg.alpha, akes.cfg.beta)
            queries = ake.queries(memory, boxes)
            z_t = ake.extract(queries, memory)
            positive = gt_index >= 0
        knowledge[kind] = TeacherKnowledge(queries, z_t, positive)
    return knowledge


@register_method("unikd")
class UniKD(Distiller):
    """``loss(F_T, F_S, targets)`` = {λ1·D(z_ct_S, z_ct_T), λ2·D(z_pos_S, z_pos_T)}.

    The AKEs are frozen (eval mode, no parameter gradients; gradients flow through them into ``φ`` and the
    student). The queries always come from the teacher pyramid; ``f_e`` reads ``F_T`` for ``z_T`` and
    ``φ(F_S)`` for ``z_S``. Positives: the Hungarian match of the frozen content head's predictions (content
    queries), the jittered ground-truth boxes of ``B̂`` (positional queries).
    """

    needs_akes = True

    def __init__(self, student: Levels, teacher: Levels, cfg: DistillConfig, teacher_rms: Tensor,
                 akes: KnowledgeExtractors | None = None):
        if cfg.queries not in QUERY_SETS:
            raise ConfigError(f"distill.queries: unknown value '{cfg.queries}' (choose {', '.join(QUERY_SETS)})")
        if akes is None:
            raise ValueError("UniKD needs the stage-1 AKEs")
        super().__init__(student, teacher, cfg, teacher_rms)
        self.akes = akes.eval().requires_grad_(False)
        self.matcher = HungarianMatcher()

    def train(self, mode: bool = True) -> UniKD:
        super().train(mode)
        self.akes.eval()
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        return QUERY_SETS[self.cfg.queries]

    def teacher_knowledge(self, teacher: Pyramid, targets: list[dict[str, Tensor]],
                          b_hat: tuple[Tensor, Tensor] | None = None) -> dict[str, TeacherKnowledge]:
        """:func:`teacher_knowledge` of each AKE in use (``distill.queries``)."""
        return teacher_knowledge(self.akes, teacher, targets, self.kinds, self.matcher, b_hat)

    def distances(self, knowledge: dict[str, TeacherKnowledge], adapted: Pyramid) -> dict[str, Tensor]:
        """``λ·D(z_S, z_T)`` per image [B] for each AKE in ``knowledge``; ``z_S`` is read out of ``adapted``
        (``φ(F_S)``) with the teacher's queries."""
        memory = adapted.memory()
        weights = {"ct": self.cfg.lambda_ct, "pos": self.cfg.lambda_pos}
        out = {}
        for kind, k in knowledge.items():
            z_s = getattr(self.akes, kind).extract(k.queries, memory)
            out[f"loss_kd_{kind}"] = weights[kind] * knowledge_distance(z_s, k.z, k.positive)
        return out

    def per_image_losses(self, teacher: Pyramid | dict[str, TeacherKnowledge], student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``teacher``: the teacher pyramid (online), or the teacher's knowledge of every AKE as a knowledge store
        serves it (offline, :mod:`unikd.knowledge`): then no teacher is needed at all."""
        if isinstance(teacher, Pyramid):
            knowledge = self.teacher_knowledge(teacher, targets)
        else:
            knowledge = {kind: teacher[kind] for kind in self.kinds}
        return self.distances(knowledge, self.adaptor(student))
