"""What the report's pictures show, computed from trained models on a few val images (CPU, no gradients).

All coordinates are in the input image's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

from ..config import DistillConfig
from ..distill import KnowledgeExtractors, build_distiller
from ..transformer import Memory

QUERIES_SHOWN = 3  # per kind and image


@torch.no_grad()
def activation_maps(detector, images: list[Tensor]) -> list[dict[int, np.ndarray]]:
    """Per image, per stride: the channel mean of ``|F|`` over the cells that hold the image, ``[h_l, w_l]``
    (the paper's Fig. 1, "feature density")."""
    pyramid = detector.extract_features(images)
    cells = pyramid.valid_cells()
    return [{stride: level[i].abs().mean(0)[:h, :w].numpy()
             for level, stride, (h, w) in zip(pyramid.levels, pyramid.strides, cells[i])}
            for i in range(len(images))]


@dataclass
class SampledQueries:
    """A few queries of one AKE on one image and where ``f_e``'s first cross-attention samples for them.

    Attributes:
        boxes: ``[Q, 4]`` xyxy: the reference box ``B̂`` (positional queries) or the box the FFN head predicts
            from the query's reference point (content queries).
        points: ``[Q, K, 2]`` ``(x, y)``, ``K = heads × levels × points``.
        weights: ``[Q, K]`` attention weights (each head's sum to 1).
    """

    boxes: np.ndarray
    points: np.ndarray
    weights: np.ndarray


@torch.no_grad()
def sampled_queries(teacher, akes: KnowledgeExtractors, images: list[Tensor],
                    targets: list[dict[str, Tensor]]) -> list[dict[str, SampledQueries]]:
    """Per image, for ``"ct"`` and ``"pos"``: up to ``QUERIES_SHOWN`` positive queries (matched to an object)
    of the teacher's side of stage 2 (paper Fig. 4). ``B̂`` is drawn from the global RNG: seed it first."""
    pyramid = teacher.extract_features(images)
    unikd = build_distiller("unikd", DistillConfig(), teacher, teacher, akes=akes)  # its adaptor goes unused
    knowledge = unikd.teacher_knowledge(pyramid, targets)
    memory = akes.teacher_memory(pyramid)
    sizes = torch.tensor([[w, h] for h, w in pyramid.image_sizes], dtype=torch.float32)  # [B, 2]
    out: list[dict[str, SampledQueries]] = [{} for _ in images]
    for kind, k in knowledge.items():
        ake = getattr(akes, kind)
        locations, weights = _first_extractor_samples(ake, k.queries, memory)
        # level-normalised (x, y) → pixels: the level's map spans W_l × stride_l pixels
        extent = torch.tensor([[w * s, h * s] for (h, w), s in zip(memory.spatial_shapes.tolist(), pyramid.strides)],
                              dtype=torch.float32)  # [L, 2]
        pixels = locations * extent[None, None, None, :, None]
        if kind == "pos":
            boxes = k.queries.reference
        else:
            boxes = ake.predict(k.z, k.queries)[1]
        boxes = box_convert(boxes, "cxcywh", "xyxy") * sizes.repeat(1, 2)[:, None]
        for i in range(len(images)):
            shown = torch.nonzero(k.positive[i]).flatten()[:QUERIES_SHOWN]
            out[i][kind] = SampledQueries(boxes[i, shown].numpy(), pixels[i, shown].flatten(1, -2).numpy(),
                                          weights[i, shown].flatten(1).numpy())
    return out


def _first_extractor_samples(ake, queries, memory: Memory) -> tuple[Tensor, Tensor]:
    """Run ``f_e`` on ``queries`` and return the sampling locations and weights of its first layer's
    cross-attention (``MSDeformAttn.sampling_locations``), from the inputs that layer received."""
    attn = ake.extractor[0].cross_attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda _m, args: seen.update(query=args[0], reference=args[1]))
    try:
        ake.extract(queries, memory)
    finally:
        handle.remove()
    return attn.sampling_locations(seen["query"], seen["reference"], memory.spatial_shapes)


@torch.no_grad()
def detections(detector, images: list[Tensor], min_score: float) -> list[dict[str, np.ndarray]]:
    """Per image: ``boxes`` ``[n, 4]`` xyxy, ``labels`` ``[n]``, ``scores`` ``[n]`` of the detections scoring at
    least ``min_score``."""
    return [{k: v[d["scores"] >= min_score].numpy() for k, v in d.items()} for d in detector.predict(images)]
