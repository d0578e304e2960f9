"""Detector adapters (DESIGN §3): torchvision detectors with one contract for distillation.

``build_detector(cfg.model, num_classes)`` returns a :class:`DetectorAdapter`;
``FAMILIES`` maps each ``model.family`` name to its adapter class.
"""
from __future__ import annotations

from unikd.config import ConfigError, DetectorConfig
from unikd.detectors.atss import ATSSAdapter
from unikd.detectors.base import DetectorAdapter
from unikd.detectors.deformable_detr import DeformableDETRAdapter
from unikd.detectors.faster_rcnn import FasterRCNNAdapter, MaskRCNNAdapter
from unikd.detectors.one_stage import FCOSAdapter, RetinaNetAdapter
from unikd.detectors.registry import FAMILIES, register_family
from unikd.detectors.reppoints import RepPointsAdapter

__all__ = [
    "ATSSAdapter",
    "FAMILIES",
    "DeformableDETRAdapter",
    "DetectorAdapter",
    "FCOSAdapter",
    "FasterRCNNAdapter",
    "MaskRCNNAdapter",
    "RepPointsAdapter",
    "RetinaNetAdapter",
    "build_detector",
    "register_family",
]


def build_detector(cfg: DetectorConfig, num_classes: int) -> DetectorAdapter:
    """The adapter for ``cfg.family``, randomly initialised, for ``num_classes`` classes; it takes images of any
    size and never rescales them (the data loader resizes, :mod:`unikd.data.resize`)."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family '{cfg.family}' (valid: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[cfg.family](cfg, num_classes)
