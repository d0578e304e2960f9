"""PKD, distillation by the Pearson correlation coefficient (Cao et al., NeurIPS 2022), a baseline beside FitNet,
on every teacher level through the same adaptor ``φ``.

Per level, with ``F_T`` the teacher in its fixed units and ``F_S = φ(student)`` on the teacher's grid
(:class:`~unikd.distill.feature_kd.LevelPair`): each channel of each is standardised to zero mean and unit
variance over the image's cells (:func:`standardise`), and the loss is half the mean squared difference of the
two, ``1 − r`` averaged over the channels, with ``r`` the Pearson correlation of a channel of ``F_S`` with the
same channel of ``F_T`` over the image. A per-channel affine change of ``F_S`` (positive scale) leaves it as it is,
so the student learns the teacher's relations, not its magnitudes.

Where this departs from the paper: the mean and variance are each image's, over its valid cells (the paper's
code standardises each channel over the whole batch), with the population variance, so that the loss is
exactly ``1 − r``. A level on which the image covers one cell has nothing to correlate and adds 0.
"""
from __future__ import annotations

from torch import Tensor

from unikd.pyramid import Pyramid

from .feature_kd import FeatureDistiller
from .registry import register_method

EPS = 1e-6  # added to the variance before the square root, as a layer norm does


def standardise(f: Tensor, valid: Tensor) -> Tensor:
    """``f`` [B, C, H, W] with each channel at zero mean and unit variance over the valid cells (``valid``
    [B, 1, H, W] bool) of its image; zero on padded cells."""
    cells = valid.sum((2, 3), keepdim=True)
    mean = (f * valid).sum((2, 3), keepdim=True) / cells
    variance = ((f - mean).pow(2) * valid).sum((2, 3), keepdim=True) / cells
    return (f - mean) / (variance + EPS).sqrt() * valid


@register_method("pkd")
class PKD(FeatureDistiller):
    """``loss(F_T, F_S, targets)`` = {``loss_pkd``: ``[B]`` ``distill.pkd_weight`` · the sum over the teacher's
    levels of ``mean((standardise(F_S) − standardise(F_T))²) / 2`` over channels and valid cells}."""

    def per_image_losses(self, teacher: Pyramid, student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        total = 0
        for pair in self.level_pairs(teacher, student):
            valid = pair.valid[:, None]
            difference = (standardise(pair.student, valid) - standardise(pair.teacher, valid)).pow(2)
            total = total + difference.sum((1, 2, 3)) / (2 * valid.sum((1, 2, 3)) * pair.teacher.shape[1])
        return {"loss_pkd": self.cfg.pkd_weight * total}
