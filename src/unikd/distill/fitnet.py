"""The modified FitNet the paper compares against (§4, Tab. 8, DESIGN §2): foreground-only feature MSE on every
teacher level, through a deformable self-attention adaptor ``φ`` (one layer, as the paper's).

The teacher is read in the same fixed units as UniKD's AKEs read it: each level divided by the teacher's
per-level RMS (:mod:`unikd.distill.teacher_scale`). FPN outputs of teachers trained from scratch differ in scale
by two orders of magnitude, so a plain MSE on raw features with one weight would vanish beside the detection
losses for one teacher and swamp them for another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unikd.config import DistillConfig
from unikd.pyramid import Pyramid

from .base import Distiller, Levels
from .registry import register_method


def foreground_mask(targets: list[dict[str, Tensor]], shape: tuple[int, int], stride: int) -> Tensor:
    """[B, H, W] bool: True where the centre of a feature cell (``stride`` pixels) lies inside a ground-truth box
    (boxes xyxy in image pixels)."""
    h, w = shape
    device = targets[0]["boxes"].device
    ys = (torch.arange(h, device=device) + 0.5) * stride
    xs = (torch.arange(w, device=device) + 0.5) * stride
    masks = []
    for t in targets:
        b = t["boxes"].float()[:, :, None, None]  # [M, 4, 1, 1]
        inside = ((xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys[:, None] >= b[:, 1]) & (ys[:, None] <= b[:, 3]))
        masks.append(inside.any(0))  # [H, W]; all False for an image without boxes
    return torch.stack(masks)


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


@register_method("fitnet")
class FitNet(Distiller):
    """``loss(F_T, F_S, targets)`` = {weight · Σ over levels of the MSE between ``φ(F_S)`` and ``F_T / rms``
    over the foreground cells of the level}, per image. A level without foreground adds 0.

    ``φ(F_S)`` levels that keep a student stride or size different from the teacher's are read at the teacher's
    cell centres (:func:`resample_level`); their padded cells count as zeros.
    """

    default_adaptor_layers = 1

    def __init__(self, student: Levels, teacher: Levels, cfg: DistillConfig, teacher_rms: Tensor):
        super().__init__(student, teacher, cfg, teacher_rms)
        self.register_buffer("teacher_rms", teacher_rms.detach().clone().float())

    def per_image_losses(self, teacher: Pyramid, student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        adapted = self.adaptor(student)
        teacher = teacher.scaled(self.teacher_rms)
        total = 0
        for level, (f_t, f_s, padded) in enumerate(zip(teacher.levels, adapted.levels, adapted.padding_masks())):
            f_s = resample_level(f_s.masked_fill(padded[:, None], 0.0), adapted.strides[level], f_t.shape[-2:],
                                 teacher.strides[level])
            foreground = foreground_mask(targets, f_t.shape[-2:], teacher.strides[level]).to(f_t.dtype)
            error = (f_s - f_t).pow(2).mean(1)  # [B, H, W]
            total = total + (error * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp(min=1)
        return {"loss_fitnet": self.cfg.fitnet_weight * total}
