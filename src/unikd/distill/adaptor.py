"""The adaptor φ (paper §3.2.3, DESIGN §2): the student pyramid in the teacher's level structure.

For each teacher level, the student level of nearest stride (in log scale) is taken and linearly projected
to the teacher's channels; then ``layers`` deformable self-attention (encoder) layers run over the tokens of
all levels at once. A level keeps the student's spatial size: the AKE's deformable attention samples in
normalised coordinates, so the sizes need not match the teacher's. Trained with the student, discarded at
inference.

The output is in the teacher's units: every token is layer-normalised and each level multiplied by the root
mean square of the teacher's level in the same batch (a constant, no gradient). FPN outputs of detectors
trained from scratch differ in scale by two orders of magnitude (digits-det R50 teachers: RMS 6 to 540), more
than a learnt projection can bridge in a short schedule, and the frozen AKEs read the teacher's scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unikd.transformer import DeformableEncoderLayer, flatten_levels, sine_position_embedding, unflatten_levels


def nearest_levels(source_strides: list[int], target_strides: list[int]) -> list[int]:
    """For each target stride, the index of the source level whose stride is nearest in log scale
    (the finer one on a tie)."""
    return [min(range(len(source_strides)), key=lambda i: (abs(math.log2(source_strides[i] / t)), source_strides[i]))
            for t in target_strides]


class Adaptor(nn.Module):
    """φ: student features (``student_strides``, ``student_channels``) → teacher levels (``teacher_strides``,
    ``teacher_channels``). ``layers`` encoder layers need equal teacher channels on every level."""

    def __init__(self, student_strides: list[int], student_channels: list[int], teacher_strides: list[int],
                 teacher_channels: list[int], layers: int = 2, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.source = nearest_levels(student_strides, teacher_strides)
        self.proj = nn.ModuleList(nn.Conv2d(student_channels[s], c, 1) for s, c in zip(self.source, teacher_channels))
        if layers and len(set(teacher_channels)) != 1:
            raise ValueError(f"the adaptor's self-attention needs one channel count on all teacher levels, "
                             f"got {teacher_channels}; use adaptor_layers=0")
        c = teacher_channels[0]
        n_levels = len(teacher_strides)
        heads = math.gcd(n_heads, c)
        self.layers = nn.ModuleList(DeformableEncoderLayer(c, n_levels, heads, n_points, 4 * c) for _ in range(layers))
        self.level_embed = nn.Parameter(torch.randn(n_levels, c)) if layers else None

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> list[Tensor]:
        """``student_features``: one [B, C_S_l, H_l, W_l] per student level; ``teacher_features``: one
        [B, C_T_k, H_k, W_k] per teacher level (only their scale is used). Returns one [B, C_T_k, H, W] per
        teacher level ``k`` (H, W those of the student level mapped to it)."""
        out = [proj(student_features[s]) for s, proj in zip(self.source, self.proj)]
        if self.layers:
            tokens, shapes = flatten_levels(out)
            pos = sine_position_embedding(shapes, tokens.shape[-1], device=tokens.device)
            sizes = shapes.prod(1).to(tokens.device)
            pos = pos + self.level_embed.repeat_interleave(sizes, dim=0, output_size=tokens.shape[1])
            for layer in self.layers:
                tokens = layer(tokens, pos, shapes)
            out = unflatten_levels(tokens, shapes)
        scales = [f.detach().pow(2).mean().sqrt() for f in teacher_features]
        return [F.layer_norm(level.movedim(1, -1), level.shape[1:2]).movedim(-1, 1) * scale
                for level, scale in zip(out, scales)]
