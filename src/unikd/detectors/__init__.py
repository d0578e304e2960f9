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
from unikd.detectors.weights import load_backbone_weights

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


def build_detector(cfg: DetectorConfig, num_classes: int, backbone_weights: bool = True) -> DetectorAdapter:
    """The adapter for ``cfg.family``, randomly initialised, for ``num_classes`` classes; it takes images of any
    size and never rescales them (the data loader resizes, :mod:`unikd.data.resize`).

    Its backbone starts from ``cfg.backbone_weights`` where that is set, unless ``backbone_weights`` is False (a
    detector whose weights come next from a checkpoint); the architecture (FrozenBatchNorm2d) is the same.
    """
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family '{cfg.family}' (valid: {', '.join(sorted(FAMILIES))})")
    detector = FAMILIES[cfg.family](cfg, num_classes)
    if backbone_weights and cfg.backbone_weights is not None:
        load_backbone_weights(detector, cfg)
    return detector
