"""Adaptive Knowledge Extractors (paper §3.2.1, DESIGN §2).

An AKE turns a multi-scale feature pyramid into N knowledge embeddings ``z`` (Eq. 2):

- ``AKE_ct``:  learnable ``E`` [N, C]      --f_ct-->  ``q_ct``  --f_e(·, F*)-->  ``z_ct``
- ``AKE_pos``: query boxes ``B̂`` [N, 4] --FC--> ``E'`` --f_pos--> ``q_pos`` --f_e(·, F*)--> ``z_pos``

The query generator always reads the teacher pyramid ``F_T``; the knowledge extractor ``f_e`` reads either
``F_T`` or the adapted student pyramid ``φ(F_S)``. An FFN head on ``z`` predicts classes and boxes (stage 1,
and the positives of stage 2). Boxes and reference points are normalised ``(cx, cy, w, h)`` / ``(x, y)`` over
each image's own size (:mod:`unikd.pyramid`); the memory's valid ratios place them on every level, and its
padding mask keeps padded cells out of the attention.

The AKEs read the teacher in fixed units: each level divided by ``teacher_rms``, the teacher's root mean square
on that level over the training set (measured once before stage 1, stored with the AKE weights). A batch's own
statistics never enter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unikd.config import AKEConfig
from unikd.pyramid import Pyramid
from unikd.transformer import DeformableDecoderLayer, Memory


@dataclass
class Queries:
    """What the query generator gives ``f_e``: ``q`` [B, N, C] and its ``reference`` [B, N, 2 | 4]."""

    q: Tensor
    reference: Tensor


class BoxHead(nn.Module):
    """The FFN head: class logits [B, N, K] and boxes [B, N, 4] refined from the query's reference."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.cls = nn.Linear(d_model, num_classes)
        self.box = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(),
                                 nn.Linear(d_model, 4))
        nn.init.constant_(self.cls.bias, -4.6)  # prior probability 0.01, as in focal-loss detectors
        nn.init.zeros_(self.box[-1].weight)
        nn.init.zeros_(self.box[-1].bias)

    def forward(self, z: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` [B, N, C], ``reference`` [B, N, 2] (points) or [B, N, 4] (boxes) → (logits, cxcywh boxes)."""
        delta = self.box(z)
        ref = torch.logit(reference.clamp(1e-4, 1 - 1e-4))
        if reference.shape[-1] == 2:
            delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
        else:
            delta = delta + ref
        return self.cls(z), delta.sigmoid()


class AKE(nn.Module):
    """One extractor: ``kind`` "ct" (content queries) or "pos" (positional queries).

    Args:
        cfg: widths and counts (``d_model`` = C, ``n_queries`` = N, ...).
        n_levels: levels of the pyramid it reads (the teacher's).
        in_channels: channels of that pyramid (the teacher's FPN width; may differ from C).
        num_classes: K, for the FFN head.
    """

    def __init__(self, kind: str, cfg: AKEConfig, n_levels: int, in_channels: int, num_classes: int):
        super().__init__()
        if kind not in ("ct", "pos"):
            raise ValueError(f"AKE kind must be 'ct' or 'pos', got {kind!r}")
        self.kind, self.n_queries = kind, cfg.n_queries
        c = cfg.d_model
        if kind == "ct":
            self.embedding = nn.Parameter(torch.randn(cfg.n_queries, c))  # E
            self.reference_point = nn.Linear(c, 2)
        else:
            self.box_embed = nn.Linear(4, c)  # the FC of E' = FC(B̂)

        def layer() -> DeformableDecoderLayer:
            return DeformableDecoderLayer(c, n_levels, cfg.n_heads, cfg.n_points, cfg.d_ffn, d_value=in_channels)

        self.generator = layer()  # f_ct or f_pos
        self.extractor = nn.ModuleList(layer() for _ in range(cfg.extractor_layers))  # f_e
        self.head = BoxHead(c, num_classes)

    def queries(self, memory: Memory, boxes: Tensor | None = None) -> Queries:
        """The query generator on the teacher's ``memory`` (tokens ``[B, S, C_T]``); ``boxes`` ``[B, N, 4]``
        cxcywh (``B̂``, positional AKE only)."""
        batch = memory.tokens.shape[0]
        if self.kind == "ct":
            tgt = self.embedding.unsqueeze(0).expand(batch, -1, -1)
            reference = self.reference_point(tgt).sigmoid()
        else:
            if boxes is None or boxes.shape[:2] != (batch, self.n_queries):
                raise ValueError(f"the positional AKE needs query boxes [{batch}, {self.n_queries}, 4]")
            tgt, reference = self.box_embed(boxes), boxes
        return Queries(self._decode(self.generator, tgt, reference, memory), reference)

    def extract(self, queries: Queries, memory: Memory) -> Tensor:
        """``f_e``: knowledge embeddings ``z`` [B, N, C] of ``queries`` read out of ``memory`` (``F_T`` or
        ``φ(F_S)``)."""
        z = queries.q
        for layer in self.extractor:
            z = self._decode(layer, z, queries.reference, memory)
        return z

    @staticmethod
    def _decode(layer: DeformableDecoderLayer, tgt: Tensor, reference: Tensor, memory: Memory) -> Tensor:
        return layer(tgt, None, memory.level_reference(reference), memory.tokens, memory.spatial_shapes,
                     memory.padding_mask)

    def predict(self, z: Tensor, queries: Queries) -> tuple[Tensor, Tensor]:
        """The FFN head: logits [B, N, K] and boxes [B, N, 4] (normalised cxcywh)."""
        return self.head(z, queries.reference)


class KnowledgeExtractors(nn.Module):
    """``AKE_ct`` and ``AKE_pos`` (no weights shared): what stage 1 trains and stage 2 freezes, with
    ``teacher_rms`` ``[L]``, the fixed per-level scale of the teacher they read."""

    def __init__(self, cfg: AKEConfig, n_levels: int, in_channels: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.ct = AKE("ct", cfg, n_levels, in_channels, num_classes)
        self.pos = AKE("pos", cfg, n_levels, in_channels, num_classes)
        self.register_buffer("teacher_rms", torch.ones(n_levels))

    def teacher_memory(self, teacher: Pyramid) -> Memory:
        """``F_T`` as the AKEs read it: every level divided by its ``teacher_rms``."""
        return teacher.scaled(self.teacher_rms).memory()
