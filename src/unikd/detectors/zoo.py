"""torchvision's COCO detection zoo as teachers: the zoo models a family holds exactly, and how a zoo state dict
becomes the state dict of that family's detector for a dataset's categories.

:data:`ZOO` gives, for each importable zoo model, the :class:`~unikd.config.DetectorConfig` values that build
its architecture (backbone, FPN width, anchors, ``torchvision_v2``, post-processing). The adapters wrap the same
torchvision classes, so a zoo key ``k`` is the detector's ``model.k``. Only the class-indexed rows of the heads
change (:data:`CLASS_TENSORS`): the zoo scores torchvision's 91 COCO indices (the COCO category id; 0 is the
background, the ``N/A`` ids are unused), the detector its dataset's categories, matched by name
(:func:`zoo_rows`).
"""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from unikd.config import ConfigError, DetectorConfig
from unikd.detectors import build_detector
from unikd.detectors.base import DetectorAdapter
from unikd.detectors.weights import WeightsError, check_keys, shapes

_R50 = dict(backbone="resnet50", fpn_channels=256, trainable_layers=3, backbone_weights=None)
_COARSE = [32, 64, 128, 256, 512]  # torchvision's anchor sizes of RetinaNet and the R-CNNs; FCOS's are the default

ZOO: dict[str, dict] = {
    "retinanet_resnet50_fpn_v2": dict(family="retinanet", anchor_sizes=_COARSE, torchvision_v2=True,
                                      detections_per_img=300, **_R50),
    "fcos_resnet50_fpn": dict(family="fcos", anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.2, nms_thresh=0.6,
                              **_R50),
    "fasterrcnn_resnet50_fpn": dict(family="faster_rcnn", anchor_sizes=_COARSE, **_R50),
    "fasterrcnn_resnet50_fpn_v2": dict(family="faster_rcnn", anchor_sizes=_COARSE, torchvision_v2=True, **_R50),
    "maskrcnn_resnet50_fpn": dict(family="mask_rcnn", anchor_sizes=_COARSE, **_R50),
    "maskrcnn_resnet50_fpn_v2": dict(family="mask_rcnn", anchor_sizes=_COARSE, torchvision_v2=True, **_R50),
}
NOT_HELD = {"retinanet_resnet50_fpn": "its head has no GroupNorm, and the retinanet family builds torchvision's v2 "
                                      "head: import retinanet_resnet50_fpn_v2"}

# Zoo modules whose weight and bias run over the classes (anchors outermost, then classes, then this many
# entries per class): the one-stage classifiers, the R-CNN box classifier, box regressor and mask logits.
CLASS_TENSORS = {
    "head.classification_head.cls_logits": 1,
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_predictor.mask_fcn_logits": 1,
}


def zoo_names() -> list[str]:
    """The importable zoo models."""
    return sorted(ZOO)


def zoo_config(name: str) -> DetectorConfig:
    """The default detector config with the architecture of zoo model ``name``; a ConfigError for a name that is
    not importable, saying why where a family cannot hold it."""
    if name not in ZOO:
        why = f": {NOT_HELD[name]}" if name in NOT_HELD else ""
        raise ConfigError(f"--family: zoo model '{name}' cannot be imported{why} "
                          f"(importable: {', '.join(zoo_names())})")
    return DetectorConfig(**ZOO[name])


def coco_categories() -> list[str]:
    """torchvision's COCO class names by zoo index (91, index = COCO category id), from its weights' metadata."""
    return torchvision.models.get_model_weights("retinanet_resnet50_fpn_v2").DEFAULT.meta["categories"]


def zoo_rows(categories: list[dict], label_offset: int) -> list[int]:
    """The zoo index of each of the detector's classes: ``label_offset`` background rows (index 0), then each
    dataset category (``{"id", "name"}`` in label order) by its name among the COCO names, ignoring case.

    A WeightsError lists the categories with no COCO name.
    """
    names = coco_categories()
    index = {n.lower(): i for i, n in enumerate(names) if n not in ("__background__", "N/A")}
    unmatched = [f"{c['name']!r} (id {c['id']})" for c in categories if c["name"].lower() not in index]
    if unmatched:
        raise WeightsError(f"the dataset's categories {', '.join(unmatched)} are not COCO categories, so the zoo "
                           f"teacher has no scores for them (COCO's: {', '.join(sorted(index))})")
    return [0] * label_offset + [index[c["name"].lower()] for c in categories]


def select_classes(state: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """``state`` with the class-indexed tensors (:data:`CLASS_TENSORS`) cut to ``rows``, in that order.

    A class tensor ``[A * K * e, ...]`` (A anchors, K zoo classes, e entries per class) becomes
    ``[A * len(rows) * e, ...]``; every other tensor is kept as it is.
    """
    cut, zoo_classes = {}, len(coco_categories())
    for key, value in state.items():
        per_class = CLASS_TENSORS.get(key.rsplit(".", 1)[0])
        if per_class is not None:
            grouped = value.unflatten(0, (-1, zoo_classes, per_class))
            value = grouped[:, rows].flatten(0, 2)
        cut[key] = value
    return cut


def zoo_detector(name: str, cfg: DetectorConfig, state: dict[str, Tensor], categories: list[dict]) -> DetectorAdapter:
    """The detector of ``cfg`` (:func:`zoo_config` of ``name``, possibly with other post-processing) for
    ``categories`` (the dataset's ``{"id", "name"}`` in label order), holding the zoo state dict ``state``.

    ``state`` must have exactly the keys and shapes of this family's detector for the 91 zoo classes (built on
    the meta device), which are the zoo model's when ``cfg`` is its architecture; a WeightsError names every
    difference.
    """
    detector = build_detector(cfg, len(categories))
    with torch.device("meta"):
        twin = build_detector(cfg, len(coco_categories()) - detector.label_offset)
    expected = {k.removeprefix("model."): v for k, v in shapes(twin).items()}
    check_keys(f"the weights of zoo model {name}", expected, state)
    selected = select_classes(state, zoo_rows(categories, detector.label_offset))
    detector.load_state_dict({**detector.state_dict(), **{f"model.{k}": v for k, v in selected.items()}})
    return detector.eval()
