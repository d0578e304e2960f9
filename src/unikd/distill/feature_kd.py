"""What the feature-imitation methods (FitNet, FGD, MGD, PKD) share: the teacher's and the adapted student's
features side by side on each teacher level, with each image's own cells.

The teacher is read in fixed per-level units (each level divided by its RMS, :mod:`unikd.distill.teacher_scale`),
as the AKEs read it; ``φ(F_S)`` is read at the teacher's cell centres, so a student level of another stride or
size (a Faster R-CNN teacher's P2 reads the student's P3) lands on the teacher's grid by pixel position. Cells
that lie wholly in the batch's padding are zero on both sides and marked invalid: a method that reads a level
only on its valid cells gives each image the loss it would have alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unikd.config import DistillConfig
from unikd.pyramid import Pyramid

from .base import Distiller, Levels


def box_cells(boxes: Tensor, shape: tuple[int, int], stride: int) -> Tensor:
    """``boxes`` [M, 4] xyxy in image pixels → [M, H, W] bool: True where the centre of a feature cell
    (``stride`` pixels) lies inside the box."""
    h, w = shape
    ys = (torch.arange(h, device=boxes.device) + 0.5) * stride
    xs = (torch.arange(w, device=boxes.device) + 0.5) * stride
    b = boxes.float()[:, :, None, None]  # [M, 4, 1, 1]
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys[:, None] >= b[:, 1]) & (ys[:, None] <= b[:, 3])


def foreground_mask(targets: list[dict[str, Tensor]], shape: tuple[int, int], stride: int) -> Tensor:
    """[B, H, W] bool: True where the centre of a feature cell (``stride`` pixels) lies inside a ground-truth box
    (boxes xyxy in image pixels); all False for an image without boxes."""
    return torch.stack([box_cells(t["boxes"], shape, stride).any(0) for t in targets])


def resample_level(source: Tensor, source_stride: int, shape: tuple[int, int], stride: int) -> Tensor:
    """``source`` [B, C, h, w] (cells of ``source_stride`` pixels) read bilinearly at the cell centres of a map of
    ``shape`` with ``stride``: the same pixel positions, whatever the padding. Returns [B, C, *shape]; the
    identity when the strides and sizes are equal."""
    if source_stride == stride and tuple(source.shape[-2:]) == tuple(shape):
        return source
    h, w = shape
    rows, cols = source.shape[-2:]
    # a pixel p sits at grid coordinate 2 p / (stride * size) - 1 (align_corners=False)
    ys = (torch.arange(h, device=source.device, dtype=source.dtype) + 0.5) * stride * 2 / (source_stride * rows) - 1
    xs = (torch.arange(w, device=source.device, dtype=source.dtype) + 0.5) * stride * 2 / (source_stride * cols) - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)  # [h, w, (x, y)]
    return F.grid_sample(source, grid.expand(len(source), -1, -1, -1), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


@dataclass
class LevelPair:
    """One teacher level and the adapted student on its grid.

    Attributes:
        teacher: [B, C, H, W] ``F_T / rms`` (no gradient), zero on padded cells.
        student: [B, C, H, W] ``φ(F_S)`` at the teacher's cell centres (the student's padded cells read as zeros),
            zero on padded cells.
        valid: [B, H, W] bool, True on the cells that hold some of the image.
        stride: pixels per cell.
    """

    teacher: Tensor
    student: Tensor
    valid: Tensor
    stride: int


class FeatureDistiller(Distiller):
    """Base of the methods that imitate the teacher's features level by level. Their adaptor ``φ`` has one
    deformable self-attention layer by default, the paper's FitNet adaptor, so that they compare on equal terms."""

    default_adaptor_layers = 1

    def __init__(self, student: Levels, teacher: Levels, cfg: DistillConfig, teacher_rms: Tensor):
        super().__init__(student, teacher, cfg, teacher_rms)
        self.register_buffer("teacher_rms", teacher_rms.detach().clone().float())

    def level_pairs(self, teacher: Pyramid, student: Pyramid) -> list[LevelPair]:
        """For each teacher level, the teacher in its fixed units and ``φ(student)`` on its grid."""
        adapted = self.adaptor(student)
        pairs = []
        for level, (f_t, f_s, padded_s, padded_t) in enumerate(zip(
                teacher.levels, adapted.levels, adapted.padding_masks(), teacher.padding_masks())):
            stride = teacher.strides[level]
            f_s = resample_level(f_s.masked_fill(padded_s[:, None], 0.0), adapted.strides[level], f_t.shape[-2:],
                                 stride)
            f_t = f_t.detach() / self.teacher_rms[level]
            pairs.append(LevelPair(f_t.masked_fill(padded_t[:, None], 0.0), f_s.masked_fill(padded_t[:, None], 0.0),
                                   ~padded_t, stride))
        return pairs
