"""The adaptor φ (paper §3.2.3, DESIGN §2): the student pyramid in the teacher's level structure.

For each teacher level, the student level of nearest stride (in log scale) is taken. With self-attention
(``layers > 0``), each student level that some teacher level takes is linearly projected to the teacher's
channels once, and ``layers`` deformable self-attention (encoder) layers run over the tokens of those levels
at once, with each image's own positions, valid ratios and padding mask; a teacher level gets the output of
its student level, so two teacher levels that take the same student level (a Faster R-CNN teacher's P2 and
P3 over a RetinaNet student's P3) share its tokens instead of holding them twice. Without self-attention,
each teacher level has its own projection (teacher levels may then differ in channels). Each teacher level
ends in its own affine layer norm. A level keeps the student's spatial size and stride: the AKE's deformable
attention finds points by each level's valid ratio, so the sizes need not match the teacher's. Trained with
the student, discarded at inference.

The output has the unit scale of the teacher as the AKEs and FitNet read it (the teacher divided by its fixed
per-level RMS, :mod:`unikd.distill.teacher_scale`): φ needs nothing from the teacher at run time.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from unikd.host_copy import to_device
from unikd.pyramid import Pyramid
from unikd.transformer import DeformableEncoderLayer, sine_position_embedding, unflatten_levels


def nearest_levels(source_strides: list[int], target_strides: list[int]) -> list[int]:
    """For each target stride, the index of the source level whose stride is nearest in log scale
    (the finer one on a tie)."""
    return [min(range(len(source_strides)), key=lambda i: (abs(math.log2(source_strides[i] / t)), source_strides[i]))
            for t in target_strides]


class Adaptor(nn.Module):
    """φ: student features (``student_strides``, ``student_channels``) → teacher levels (``teacher_strides``,
    ``teacher_channels``). ``layers`` encoder layers need equal teacher channels on every level.

    ``source[k]``: the student level of teacher level ``k``. ``inputs``: the student levels φ projects, one
    map each (with self-attention each distinct level of ``source`` once, in order; without, ``source``
    itself); ``pick[k]``: the position in ``inputs`` that teacher level ``k`` reads."""

    def __init__(self, student_strides: list[int], student_channels: list[int], teacher_strides: list[int],
                 teacher_channels: list[int], *, layers: int, n_heads: int, n_points: int):
        super().__init__()
        if layers and len(set(teacher_channels)) != 1:
            raise ValueError(f"the adaptor's self-attention needs one channel count on all teacher levels, "
                             f"got {teacher_channels}; use adaptor_layers=0")
        self.source = nearest_levels(student_strides, teacher_strides)
        self.inputs = sorted(set(self.source)) if layers else list(self.source)
        self.pick = [self.inputs.index(s) for s in self.source] if layers else list(range(len(self.source)))
        channels = [teacher_channels[0]] * len(self.inputs) if layers else teacher_channels
        self.proj = nn.ModuleList(nn.Conv2d(student_channels[s], c, 1) for s, c in zip(self.inputs, channels))
        c = teacher_channels[0]
        heads = math.gcd(n_heads, c)
        n_levels = len(self.inputs)
        self.layers = nn.ModuleList(DeformableEncoderLayer(c, n_levels, heads, n_points, 4 * c) for _ in range(layers))
        self.level_embed = nn.Parameter(torch.randn(n_levels, c)) if layers else None
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in teacher_channels)

    def forward(self, student: Pyramid) -> Pyramid:
        """``student``: one ``[B, C_S_l, H_l, W_l]`` map per student level. Returns one ``[B, C_T_k, H, W]`` map
        per teacher level ``k`` (``H, W`` and the stride those of the student level mapped to it)."""
        adapted = student.with_levels([proj(student.levels[s]) for s, proj in zip(self.inputs, self.proj)],
                                      [student.strides[s] for s in self.inputs])
        out = adapted.levels
        if self.layers:
            memory = adapted.memory()
            tokens, shapes = memory.tokens, memory.spatial_shapes
            pos = sine_position_embedding(shapes, tokens.shape[-1], tokens.device, memory.valid_ratios)
            sizes = to_device(shapes.prod(1), tokens.device)
            pos = pos + self.level_embed.repeat_interleave(sizes, dim=0, output_size=tokens.shape[1])
            for layer in self.layers:
                tokens = layer(tokens, pos, shapes, memory.padding_mask, memory.valid_ratios)
            out = unflatten_levels(tokens, shapes)
        levels = [norm(out[i].movedim(1, -1)).movedim(-1, 1) for i, norm in zip(self.pick, self.norms)]
        return student.with_levels(levels, [student.strides[s] for s in self.source])
