"""The trainer's model for stage 2: the student, the frozen teacher and a distiller, one loss dict."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.config import ConfigError, DistillConfig
from unikd.detectors import DetectorAdapter

from .ake import KnowledgeExtractors
from .base import Distiller, Levels
from .common import Frozen, WithFrozenTeacher
from .registry import METHODS


def method_names() -> list[str]:
    """Every valid ``distill.method``: the registered distillers and ``none``."""
    return sorted([*METHODS, "none"])


def method_class(method: str) -> type[Distiller] | None:
    """The registered distiller class for ``distill.method``, None for ``none``; a ConfigError otherwise."""
    if method == "none":
        return None
    if method not in METHODS:
        raise ConfigError(f"distill.method: unknown method '{method}' (choose {', '.join(method_names())})")
    return METHODS[method]


def build_distiller(method: str, cfg: DistillConfig, student: DetectorAdapter, teacher: DetectorAdapter | Levels,
                    teacher_rms: Tensor | None = None, akes: KnowledgeExtractors | None = None) -> Distiller | None:
    """The registered distiller ``method`` between ``student`` and ``teacher``, or None for ``none``. ``teacher``
    may be its level structure alone (offline stage 2: from the fingerprint a knowledge store records).

    ``teacher_rms`` ``[L]``: the teacher's fixed per-level scale; a method with ``needs_akes`` takes the one
    stored with its ``akes`` (then ``teacher_rms`` must be None or equal)."""
    cls = method_class(method)
    if cls is None:
        return None
    if cls.needs_akes:
        if akes is None:
            raise ConfigError(f"distill.method {method} needs the stage-1 AKEs (--ake)")
        if teacher_rms is not None and not torch.equal(teacher_rms.cpu(), akes.teacher_rms.cpu()):
            raise ValueError("teacher_rms differs from the one stored with the AKEs")
        teacher_rms = akes.teacher_rms
    elif teacher_rms is None:
        raise ValueError(f"distill.method {method} needs the teacher's per-level scale (teacher_rms)")
    args = (Levels(student.feature_strides, student.feature_channels),
            teacher if isinstance(teacher, Levels) else Levels(teacher.feature_strides, teacher.feature_channels),
            cfg, teacher_rms)
    return cls(*args, akes) if cls.needs_akes else cls(*args)


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
