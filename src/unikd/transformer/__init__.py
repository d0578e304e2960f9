"""Transformer blocks shared by the AKEs, the adaptor and Deformable DETR (DESIGN §3): multi-scale
deformable attention, the deformable encoder / decoder layers built on it, the Hungarian matcher and the
set criterion."""
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
from unikd.transformer.matcher import HungarianMatcher
from unikd.transformer.msda import MSDeformAttn, ms_deform_attn

__all__ = [
    "DeformableDecoderLayer",
    "DeformableEncoderLayer",
    "HungarianMatcher",
    "Memory",
    "MSDeformAttn",
    "encoder_reference_points",
    "flatten_levels",
    "ms_deform_attn",
    "set_loss",
    "sine_position_embedding",
    "unflatten_levels",
]
