"""The trainer's model for stage 2: the student, the frozen teacher and a distiller, one loss dict."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.config import DISTILL_METHODS, ConfigError, DistillConfig
from unikd.detectors import DetectorAdapter

from .ake import KnowledgeExtractors
from .common import Frozen, WithFrozenTeacher
from .fitnet import FitNet
from .unikd import UniKD


def build_distiller(method: str, cfg: DistillConfig, student: DetectorAdapter, teacher: DetectorAdapter,
                    akes: KnowledgeExtractors | None = None) -> nn.Module | None:
    """``UniKD`` (needs the stage-1 ``akes``), ``FitNet``, or None for ``method == "none"``."""
    levels = (student.feature_strides, student.feature_channels, teacher.feature_strides, teacher.feature_channels)
    if method == "unikd":
        if akes is None:
            raise ValueError("--method unikd needs the stage-1 AKEs (--ake)")
        return UniKD(akes, *levels, cfg)
    if method == "fitnet":
        return FitNet(*levels, cfg)
    if method == "none":
        return None
    raise ConfigError(f"distill.method: unknown method '{method}' (choose {', '.join(DISTILL_METHODS)})")


class DistillationModel(WithFrozenTeacher):
    """``forward(images, targets)`` = the student's detection losses + the distiller's losses.

    The teacher is held frozen outside the module registry (its weights are in no checkpoint and receive no
    gradient); its features are computed without gradients. ``predict`` is the student's.
    """

    def __init__(self, student: DetectorAdapter, teacher: DetectorAdapter | None, distiller: nn.Module | None):
        super().__init__()
        if distiller is not None and teacher is None:
            raise ValueError("a distiller needs a teacher")
        self.student = student
        self.teacher = Frozen(teacher) if teacher is not None else None
        self.distiller = distiller

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses, student_features = self.student(images, targets)
        if self.distiller is not None:
            with torch.no_grad():
                teacher_features = self.teacher.module.extract_features(images)
            losses.update(self.distiller.loss(teacher_features, student_features, targets))
        return losses

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.student.predict(images)
