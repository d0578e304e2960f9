"""Transformer blocks shared by the AKEs, the adaptor and Deformable DETR (DESIGN §3): multi-scale
deformable attention, the deformable encoder / decoder layers built on it and Deformable DETR's stacks of them,
the Hungarian matcher, the set criterion and the top-k post-processing of set predictions."""
from __future__ import annotations

from unikd.transformer.layers import (
    DeformableDecoderLayer,
    DeformableEncoderLayer,
    Memory,
    encoder_reference_points,
    flatten_levels,
    sine_position_embedding,
    unflatten_levels,
)
from unikd.transformer.criterion import set_loss
from unikd.transformer.decoder import DeformableDecoder, refine_boxes
from unikd.transformer.encoder import DeformableEncoder
from unikd.transformer.matcher import HungarianMatcher
from unikd.transformer.msda import MSDeformAttn, ms_deform_attn
from unikd.transformer.postprocess import topk_detections

__all__ = [
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "HungarianMatcher",
    "Memory",
    "MSDeformAttn",
    "encoder_reference_points",
    "flatten_levels",
    "ms_deform_attn",
    "refine_boxes",
    "set_loss",
    "sine_position_embedding",
    "topk_detections",
    "unflatten_levels",
]
