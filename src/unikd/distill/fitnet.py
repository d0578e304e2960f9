"""The modified FitNet the paper compares against (§4, Tab. 8, DESIGN §2): foreground-only feature MSE on every
teacher level, through a deformable self-attention adaptor ``φ`` (one layer, as the paper's).

The teacher is read in the same fixed units as UniKD's AKEs read it: each level divided by the teacher's
per-level RMS (:mod:`unikd.distill.teacher_scale`). FPN outputs of teachers trained from scratch differ in scale
by two orders of magnitude, so a plain MSE on raw features with one weight would vanish beside the detection
losses for one teacher and swamp them for another.
"""
from __future__ import annotations

from torch import Tensor

from unikd.pyramid import Pyramid

from .feature_kd import FeatureDistiller, foreground_mask
from .registry import register_method


@register_method("fitnet")
class FitNet(FeatureDistiller):
    """``loss(F_T, F_S, targets)`` = {weight · Σ over levels of the MSE between ``φ(F_S)`` and ``F_T / rms``
    over the foreground cells of the level}, per image. A level without foreground adds 0.

    ``φ(F_S)`` levels that keep a student stride or size different from the teacher's are read at the teacher's
    cell centres (:class:`~unikd.distill.feature_kd.LevelPair`); their padded cells count as zeros.
    """

    def per_image_losses(self, teacher: Pyramid, student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        total = 0
        for pair in self.level_pairs(teacher, student):
            foreground = foreground_mask(targets, pair.teacher.shape[-2:], pair.stride).to(pair.teacher.dtype)
            error = (pair.student - pair.teacher).pow(2).mean(1)  # [B, H, W]
            total = total + (error * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp(min=1)
        return {"loss_fitnet": self.cfg.fitnet_weight * total}
