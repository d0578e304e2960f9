"""The modified FitNet the paper compares against (§4, DESIGN §2): foreground-only feature MSE on every
teacher level, through the same deformable self-attention adaptor ``φ`` as UniKD.

The squared error of a level is divided by the teacher's own mean squared feature on the same cells. The
FPN outputs of teachers trained from scratch differ in scale by two orders of magnitude (measured on
digits-det: RMS 6 to 9 for Faster R-CNN, 30 to 540 for RetinaNet and FCOS), so a plain MSE with one weight
would either vanish beside the detection losses or swamp them, depending on the teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unikd.config import DistillConfig

from .adaptor import Adaptor
from .common import pyramid_image_size


def foreground_mask(targets: list[dict[str, Tensor]], shape: tuple[int, int], stride: float) -> Tensor:
    """[B, H, W] float: 1 where the centre of a feature cell (``stride`` pixels) lies inside a ground-truth box."""
    h, w = shape
    device = targets[0]["boxes"].device
    ys = (torch.arange(h, device=device) + 0.5) * stride
    xs = (torch.arange(w, device=device) + 0.5) * stride
    masks = []
    for t in targets:
        b = t["boxes"].float()[:, :, None, None]  # [M, 4, 1, 1]
        inside = ((xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys[:, None] >= b[:, 1]) & (ys[:, None] <= b[:, 3]))
        masks.append(inside.any(0) if len(b) else torch.zeros(h, w, dtype=torch.bool, device=device))
    return torch.stack(masks).float()


class FitNet(nn.Module):
    """``loss(F_T, F_S, targets)`` = {weight · mean over levels of ``‖φ(F_S)_l − F_T_l‖² / ‖F_T_l‖²`` on the
    foreground cells}: a relative squared error, 1 for ``φ(F_S) = 0``. A level without foreground adds 0.

    ``φ(F_S)`` levels that keep a student size different from the teacher's are resized bilinearly to it.
    """

    def __init__(self, student_strides: list[int], student_channels: list[int], teacher_strides: list[int],
                 teacher_channels: list[int], cfg: DistillConfig, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.weight = cfg.fitnet_weight
        self.adaptor = Adaptor(student_strides, student_channels, teacher_strides, teacher_channels,
                               layers=cfg.adaptor_layers, n_heads=n_heads, n_points=n_points)
        self.teacher_strides = teacher_strides

    def loss(self, teacher_features: list[Tensor], student_features: list[Tensor],
             targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        height, _ = pyramid_image_size(teacher_features, self.teacher_strides)
        total = teacher_features[0].new_zeros(())
        for f_t, f_s in zip(teacher_features, self.adaptor(student_features, teacher_features)):
            if f_s.shape[-2:] != f_t.shape[-2:]:
                f_s = F.interpolate(f_s, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
            mask = foreground_mask(targets, f_t.shape[-2:], height / f_t.shape[-2]).unsqueeze(1)
            error = ((f_s - f_t).pow(2) * mask).sum()
            total = total + error / (f_t.pow(2) * mask).sum().clamp(min=1e-6)
        return {"loss_fitnet": self.weight * total / len(teacher_features)}
