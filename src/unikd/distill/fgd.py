"""FGD, focal and global distillation (Yang et al., CVPR 2022), a baseline beside FitNet, on every teacher level
through the same adaptor ``φ``.

Per level, with ``F_T`` the teacher in its fixed units and ``F_S = φ(student)`` on the teacher's grid
(:class:`~unikd.distill.feature_kd.LevelPair`), over the image's own cells only:

- *Focal* (Eq. 9): ``α Σ M S A_S A_C (F_T − F_S)² + β Σ (1 − M) S A_S A_C (F_T − F_S)²`` summed over channels
  and cells, with ``M`` the ground-truth mask, ``S`` its scale mask (:func:`scale_masks`) and ``A_S``, ``A_C`` the
  teacher's spatial and channel attention at temperature ``T`` (:func:`spatial_attention`,
  :func:`channel_attention`); plus ``γ (‖A_S^T − A_S^S‖₁ + ‖A_C^T − A_C^S‖₁)``, the student's attention taken from
  ``F_S``.
- *Global* (Eq. 10): ``λ Σ (R(F_T) − R(F_S))²`` with ``R`` a GcBlock (:class:`GcBlock`).

Where this departs from the paper: the masks and both softmaxes run over the image's valid cells (the paper has
no padding to speak of); ``R`` is one block per level applied to both sides, as Eq. 10 writes it (the authors'
code trains a second block for the teacher's side), with the GcBlock's bottleneck ``C / 2`` of that code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.config import DistillConfig
from unikd.pyramid import Pyramid

from .base import Levels
from .feature_kd import FeatureDistiller, LevelPair, box_cells
from .registry import register_method


def scale_masks(targets: list[dict[str, Tensor]], valid: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """FGD's ``M · S`` and ``(1 − M) · S`` on one level: ``valid`` [B, H, W] bool → two [B, H, W] float32.

    A cell is foreground when its centre lies inside a ground-truth box; its weight is ``1 / (H_r W_r)``, the
    number of the level's cells inside the smallest such box (so each box weighs 1 in all). A background cell
    (valid, in no box) weighs ``1 / N_bg``, the number of background cells of the image."""
    foreground = []
    for t, v in zip(targets, valid):
        cells = box_cells(t["boxes"], v.shape, stride).float()  # [M, H, W]
        weight = cells / cells.sum((1, 2), keepdim=True).clamp(min=1)
        foreground.append(torch.cat([torch.zeros_like(v, dtype=torch.float32)[None], weight]).amax(0))
    foreground = torch.stack(foreground)
    background = (valid & (foreground == 0)).float()
    return foreground, background / background.sum((1, 2), keepdim=True).clamp(min=1)


def spatial_attention(f: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """``G_S(F) = H W · softmax(mean_c |F| / T)`` over the image's ``H W`` valid cells: ``f`` [B, C, H, W],
    ``valid`` [B, H, W] bool → [B, H, W], zero on padded cells."""
    logits = (f.abs().mean(1) / temperature).masked_fill(~valid, float("-inf"))
    weights = logits.flatten(1).softmax(1).view_as(logits)
    return valid.sum((1, 2), keepdim=True) * weights


def channel_attention(f: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """``G_C(F) = C · softmax(mean over valid cells of |F| / T)`` over the channels: ``f`` [B, C, H, W] → [B, C]."""
    mean = (f.abs() * valid[:, None]).sum((2, 3)) / valid.sum((1, 2))[:, None]
    return f.shape[1] * (mean / temperature).softmax(1)


class GcBlock(nn.Module):
    """FGD's relation module ``R(F) = F + W_v2(ReLU(LN(W_v1(Σ_j softmax_j(W_k F_j) F_j))))``, the attention
    pooling over the image's valid cells. ``W_v2`` starts at zero (as GCNet's fusion), so ``R`` starts as the
    identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.key = nn.Conv2d(channels, 1, 1)  # W_k
        self.transform = nn.Sequential(nn.Linear(channels, channels // 2), nn.LayerNorm(channels // 2), nn.ReLU(),
                                       nn.Linear(channels // 2, channels))  # W_v1, LN, ReLU, W_v2
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, f: Tensor, valid: Tensor) -> Tensor:
        """``f`` [B, C, H, W], ``valid`` [B, H, W] bool → [B, C, H, W]."""
        logits = self.key(f)[:, 0].masked_fill(~valid, float("-inf"))
        weights = logits.flatten(1).softmax(1)  # [B, H W]
        context = torch.einsum("bn,bcn->bc", weights, f.flatten(2))
        return f + self.transform(context)[:, :, None, None]


@register_method("fgd")
class FGD(FeatureDistiller):
    """``loss(F_T, F_S, targets)`` = {``loss_fgd_feature``, ``loss_fgd_attention``, ``loss_fgd_global``}, each
    ``[B]`` summed over the teacher's levels, weighted by ``distill.fgd_alpha``/``fgd_beta``, ``fgd_gamma`` and
    ``fgd_lambda``. The GcBlocks train with ``φ`` and the student."""

    def __init__(self, student: Levels, teacher: Levels, cfg: DistillConfig, teacher_rms: Tensor):
        super().__init__(student, teacher, cfg, teacher_rms)
        self.relations = nn.ModuleList(GcBlock(c) for c in teacher.channels)

    def per_image_losses(self, teacher: Pyramid, student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        feature = attention = relation = 0
        for pair, gc in zip(self.level_pairs(teacher, student), self.relations):
            f, a, r = self.level_losses(pair, targets, gc)
            feature, attention, relation = feature + f, attention + a, relation + r
        return {"loss_fgd_feature": feature, "loss_fgd_attention": self.cfg.fgd_gamma * attention,
                "loss_fgd_global": self.cfg.fgd_lambda * relation}

    def level_losses(self, pair: LevelPair, targets: list[dict[str, Tensor]],
                     gc: GcBlock) -> tuple[Tensor, Tensor, Tensor]:
        """One level's ``[B]`` focal feature loss (weighted by α and β), attention L1 and global sum of squares
        (both unweighted)."""
        cfg, valid = self.cfg, pair.valid
        foreground, background = scale_masks(targets, valid, pair.stride)
        spatial_t, channel_t = (spatial_attention(pair.teacher, valid, cfg.fgd_temperature),
                                channel_attention(pair.teacher, valid, cfg.fgd_temperature))
        spatial_s, channel_s = (spatial_attention(pair.student, valid, cfg.fgd_temperature),
                                channel_attention(pair.student, valid, cfg.fgd_temperature))
        error = ((pair.student - pair.teacher).pow(2) * channel_t[:, :, None, None]).sum(1) * spatial_t  # [B, H, W]
        feature = (error * (cfg.fgd_alpha * foreground + cfg.fgd_beta * background)).sum((1, 2))
        attention = (spatial_s - spatial_t).abs().sum((1, 2)) + (channel_s - channel_t).abs().sum(1)
        relation = ((gc(pair.student, valid) - gc(pair.teacher, valid)).pow(2) * valid[:, None]).sum((1, 2, 3))
        return feature, attention, relation
