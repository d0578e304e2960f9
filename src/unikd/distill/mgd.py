"""MGD, masked generative distillation (Yang et al., ECCV 2022), a baseline beside FitNet, on every teacher level
through the same adaptor ``φ``.

Per level, with ``F_T`` the teacher in its fixed units and ``F_S = φ(student)`` on the teacher's grid
(:class:`~unikd.distill.feature_kd.LevelPair`): a random mask ``M`` drops each cell of ``F_S`` (all channels at
once) with probability ``λ``; a generation block ``G`` (3×3 conv, ReLU, 3×3 conv) turns the masked feature into
the teacher's; the loss is ``α Σ (F_T − G(F_S · M))²`` over channels and the image's cells (Eq. 3–4).

Where this departs from the paper: ``φ`` stands for its 1×1 alignment conv, and ``G`` sees zeros outside the
image (its input and its hidden map are zeroed on padded cells), so a cell's output depends only on the image's
own cells. The mask is drawn for the padded batch from the global RNG: its distribution per image does not
depend on the batch-mates, the draw does.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.config import DistillConfig
from unikd.pyramid import Pyramid

from .base import Levels
from .feature_kd import FeatureDistiller
from .registry import register_method


class Generation(nn.Module):
    """MGD's generation block ``G``: 3×3 conv, ReLU, 3×3 conv at the teacher's width, blind to padded cells."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, f: Tensor, valid: Tensor) -> Tensor:
        """``f`` [B, C, H, W], ``valid`` [B, 1, H, W] → [B, C, H, W]."""
        return self.conv2(self.conv1(f * valid).relu() * valid)


@register_method("mgd")
class MGD(FeatureDistiller):
    """``loss(F_T, F_S, targets)`` = {``loss_mgd``: ``[B]`` ``distill.mgd_alpha`` · the sum over the teacher's
    levels, channels and valid cells of ``(F_T − G(F_S · M))²``}; ``M`` drops cells at ratio ``distill.mgd_lambda``
    (:meth:`random_keep`). One ``G`` per teacher level trains with ``φ`` and the student."""

    def __init__(self, student: Levels, teacher: Levels, cfg: DistillConfig, teacher_rms: Tensor):
        super().__init__(student, teacher, cfg, teacher_rms)
        self.generators = nn.ModuleList(Generation(c) for c in teacher.channels)

    def random_keep(self, f: Tensor) -> Tensor:
        """[B, 1, H, W] bool for ``f`` [B, C, H, W]: False (masked) where a uniform draw is below ``mgd_lambda``."""
        return torch.rand(len(f), 1, *f.shape[-2:], device=f.device) >= self.cfg.mgd_lambda

    def per_image_losses(self, teacher: Pyramid, student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        total = 0
        for pair, generate in zip(self.level_pairs(teacher, student), self.generators):
            valid = pair.valid[:, None]
            generated = generate(pair.student * self.random_keep(pair.student), valid)
            total = total + ((generated - pair.teacher).pow(2) * valid).sum((1, 2, 3))
        return {"loss_mgd": self.cfg.mgd_alpha * total}
