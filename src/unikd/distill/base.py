"""The distiller interface (DESIGN §3): every method is one class behind it, registered by name.

A distiller owns its adaptor ``φ`` (built the same way for every method) and whatever it learns or freezes;
``loss(teacher, student, targets)`` gives its weighted losses for a training batch. Each loss is the mean
over the batch of per-image losses (``per_image_losses``), so a sample's loss never depends on its batch-mates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from unikd.config import DistillConfig
from unikd.pyramid import Pyramid

from .adaptor import Adaptor


@dataclass(frozen=True)
class Levels:
    """The level structure of a detector's pyramid: strides and channels, finest first."""

    strides: list[int]
    channels: list[int]


class Distiller(nn.Module):
    """Base class of the distillation methods.

    Args:
        student, teacher: their level structures.
        cfg: the ``distill`` config section.
        teacher_rms: ``[L]`` the teacher's fixed per-level scale (:mod:`unikd.distill.teacher_scale`).

    A method with ``needs_akes`` takes the frozen stage-1 extractors as a fifth argument, ``akes``.
    """

    method: ClassVar[str]
    needs_akes: ClassVar[bool] = False
    default_adaptor_layers: ClassVar[int] = 2

    def __init__(self, student: Levels, teacher: Levels, cfg: DistillConfig, teacher_rms: Tensor):
        super().__init__()
        if len(teacher_rms) != len(teacher.strides):
            raise ValueError(f"teacher_rms has {len(teacher_rms)} levels, the teacher {len(teacher.strides)}")
        self.cfg = cfg
        layers = self.default_adaptor_layers if cfg.adaptor_layers is None else cfg.adaptor_layers
        self.adaptor = Adaptor(student.strides, student.channels, teacher.strides, teacher.channels, layers=layers,
                               n_heads=cfg.adaptor_heads, n_points=cfg.adaptor_points)

    def per_image_losses(self, teacher: Pyramid, student: Pyramid,
                         targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Weighted losses ``[B]`` by name. ``teacher``, ``student``: the two pyramids of the same images;
        ``targets`` in image pixels (as the detectors take them)."""
        raise NotImplementedError

    def loss(self, teacher: Pyramid, student: Pyramid, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Scalar losses: the batch mean of :meth:`per_image_losses`."""
        return {name: value.mean() for name, value in self.per_image_losses(teacher, student, targets).items()}
