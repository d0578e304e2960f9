"""The loader's resize: the data loader gives every image the size the detector sees; the detectors' own
transforms only normalise and pad (:class:`unikd.detectors.transform.PadOnlyTransform`).

Two rules (``docs/data.md``, "Resize"), both ``torchvision.transforms.v2.Resize`` with the aspect ratio kept:

- the longer side to ``max_size`` (``data.size``): ``Resize(size=None, max_size=max_size)``;
- the shorter side to ``S``, the longer at most ``max_size`` (``data.min_size``, ``data.max_size``, the paper's
  800 / 1333): ``Resize(size=S, max_size=max_size)``. Several ``S`` make multi-scale training: the dataset draws
  one per image (:meth:`~unikd.data.CocoDetection.augmentation`); evaluation uses the largest.
"""
from __future__ import annotations

from dataclasses import dataclass

from torchvision.transforms import v2

from ..config import DataConfig


@dataclass(frozen=True)
class ImageResize:
    """A resize rule: ``min_sizes`` empty, the longer side to ``max_size``; else the shorter side to one of
    ``min_sizes`` (chosen by index), the longer at most ``max_size``."""

    max_size: int
    min_sizes: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, data: DataConfig, train: bool) -> ImageResize:
        """The rule of ``data`` for the train split (every ``data.min_size``) or for evaluation (the largest)."""
        if data.size is not None:
            return cls(data.size)
        return cls(data.max_size, tuple(data.min_size) if train else (max(data.min_size),))

    @property
    def choices(self) -> int:
        """How many scales an image may be drawn at (1 for a single-scale rule)."""
        return max(len(self.min_sizes), 1)

    def transform(self, choice: int = 0) -> v2.Resize:
        """The v2 transform of scale ``choice`` (in ``0..choices-1``): an image ``[3, H0, W0]`` to ``[3, H, W]``,
        with its ``BoundingBoxes`` ``[n, 4]`` and ``Mask`` ``[n, H0, W0]`` moved along."""
        if not self.min_sizes:
            return v2.Resize(size=None, max_size=self.max_size, antialias=True)
        return v2.Resize(size=self.min_sizes[choice], max_size=self.max_size, antialias=True)
