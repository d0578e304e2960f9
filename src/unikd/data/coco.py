"""COCO-format detection dataset with ``torchvision.transforms.v2`` resizing and a deterministic flip and scale.

Bad input is either an error that names the file or the annotation id (:class:`DatasetError`), or a
counted skip logged once at construction; ``docs/data.md`` lists the decision for every case.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..errors import DatasetError
from .images import load_image
from .masks import segmentation_problem
from .resize import ImageResize

log = logging.getLogger(__name__)

REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
INTEGER_KEYS = {"images": ("id", "width", "height"), "annotations": ("id", "image_id", "category_id"),
                "categories": ("id",)}


def read_coco_json(path: Path) -> dict:
    """Load a COCO annotation file and check that every required key is present."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not COCO: the top level must be an object, got {type(data).__name__}")
    for section, keys in REQUIRED_KEYS.items():
        if not isinstance(data.get(section), list):
            raise DatasetError(f"{path}: not COCO: missing key '{section}' (a list)")
        for i, entry in enumerate(data[section]):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DatasetError(f"{path}: not COCO: {section}[{i}] is missing key '{missing[0]}'")
    for section, keys in INTEGER_KEYS.items():
        for i, entry in enumerate(data[section]):
            wrong = [k for k in keys if isinstance(entry[k], bool) or not isinstance(entry[k], int)]
            if wrong:
                raise DatasetError(f"{path}: {section}[{i}] has {wrong[0]} {entry[wrong[0]]!r}, expected an integer")
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is empty: a detection dataset needs at least one category")
    return data


def check_unique(path: Path, section: str, ids: np.ndarray) -> None:
    """Raise if ``ids`` (int [n]) of ``section`` holds a duplicate."""
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DatasetError(f"{path}: {section} id {values[counts > 1][0]} occurs more than once")


def sanitise(path: Path, data: dict) -> tuple[dict, dict[str, int]]:
    """Validate the annotations of ``data`` against its images and categories, vectorised.

    Errors: unknown category or image id, bbox not 4 finite numbers, duplicate ids.
    Skipped (dropped from ``data``): width or height <= 0 (also when it is positive but vanishes in float32,
    as ``x + w == x``), box entirely outside its image.
    Clipped to the image (in ``data``): box partly outside. Missing ``iscrowd`` defaults to 0 and
    missing ``area`` to w*h. Returns the cleaned ``data`` and the counts.
    """
    images, anns = data["images"], data["annotations"]
    image_ids = np.array([im["id"] for im in images], dtype=np.int64)
    ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
    check_unique(path, "image", image_ids)
    check_unique(path, "annotation", ann_ids)
    cat_ids = np.array([c["id"] for c in data["categories"]], dtype=np.int64)
    ann_cats = np.array([a["category_id"] for a in anns], dtype=np.int64)
    unknown = ~np.isin(ann_cats, cat_ids)
    if unknown.any():
        i = np.flatnonzero(unknown)[0]
        raise DatasetError(f"{path}: annotation id {ann_ids[i]} has category_id {ann_cats[i]}, "
                           f"not in categories {sorted(cat_ids.tolist())}")
    ann_images = np.array([a["image_id"] for a in anns], dtype=np.int64)
    orphan = ~np.isin(ann_images, image_ids)
    if orphan.any():
        i = np.flatnonzero(orphan)[0]
        raise DatasetError(f"{path}: annotation id {ann_ids[i]} refers to image_id {ann_images[i]}, not in images")
    xywh = bbox_array(path, anns, ann_ids)
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    wh = np.array([sizes[i] for i in ann_images.tolist()], dtype=np.float64).reshape(-1, 2)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    clipped = np.concatenate([np.clip(xyxy[:, :2], 0, wh), np.clip(xyxy[:, 2:], 0, wh)], axis=1)
    xyxy32 = xyxy.astype(np.float32)  # a positive width can vanish in the float32 the model computes in
    empty = (xywh[:, 2:] <= 0).any(axis=1) | (xyxy32[:, 2:] <= xyxy32[:, :2]).any(axis=1)
    outside = ~empty & (clipped[:, 2:] <= clipped[:, :2]).any(axis=1)
    was_clipped = ~empty & ~outside & (clipped != xyxy).any(axis=1)
    for i in np.flatnonzero(was_clipped).tolist():
        x0, y0, x1, y1 = clipped[i].tolist()
        anns[i]["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        anns[i]["area"] = (x1 - x0) * (y1 - y0)
    keep = ~(empty | outside)
    data["annotations"] = [a for a, k in zip(anns, keep.tolist()) if k]
    for a in data["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    counts = {
        "degenerate_skipped": int(empty.sum()),
        "outside_skipped": int(outside.sum()),
        "clipped": int(was_clipped.sum()),
        "crowd_ignored": sum(1 for a in data["annotations"] if a["iscrowd"]),
    }
    return data, counts


def check_segmentations(path: Path, data: dict) -> bool:
    """Raise naming the first annotation whose ``segmentation`` is malformed (:func:`segmentation_problem`);
    return whether the dataset has masks: annotations, every one with a ``segmentation``."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for a in data["annotations"]:
        if "segmentation" in a:
            problem = segmentation_problem(a["segmentation"], *sizes[a["image_id"]])
            if problem:
                raise DatasetError(f"{path}: annotation id {a['id']} has a malformed segmentation: {problem}")
    return bool(data["annotations"]) and all("segmentation" in a for a in data["annotations"])


def bbox_array(path: Path, anns: list[dict], ann_ids: np.ndarray) -> np.ndarray:
    """Boxes of ``anns`` as float64 [n, 4] xywh; raise naming the first annotation whose bbox is malformed."""
    good = [isinstance(a["bbox"], list) and len(a["bbox"]) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a["bbox"]) for a in anns]
    boxes = np.array([a["bbox"] if g else [np.nan] * 4 for a, g in zip(anns, good)], dtype=np.float64)
    bad = ~np.isfinite(boxes.reshape(-1, 4)).all(axis=1)
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise DatasetError(f"{path}: annotation id {ann_ids[i]} has bbox {anns[i]['bbox']!r}, "
                           "expected 4 finite numbers [x, y, w, h]")
    return boxes.reshape(-1, 4)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split: ``root/annotations/instances_{split}.json`` and images under ``root/images/``.

    Items are ``(image, target)``: image float32 [3, H, W] in [0, 1], resized by ``size``: an
    :class:`~unikd.data.resize.ImageResize`, or an int for the longer side to ``size`` (aspect kept);
    target ``boxes`` float32 [n, 4] xyxy in resized pixels, ``labels`` int64 [n] in 0..num_classes-1,
    ``image_id`` int, ``orig_size`` int64 [2] = (H0, W0), ``flipped`` bool; with ``masks=True`` also ``masks``
    uint8 [n, H, W] (instance masks resized and flipped with the image; every annotation must have a
    ``segmentation``). The horizontal flip (probability
    ``hflip``) and, with several shorter sides, the scale are decided from (seed, epoch, index) alone
    (:meth:`augmentation`), so resumed runs and any number of workers see the same augmentation; call
    :meth:`set_epoch` once per epoch.

    Attributes: ``coco`` (pycocotools ground truth, after the skips and clips), ``category_ids`` (label ->
    COCO category id), ``num_classes``, ``image_ids`` (index -> COCO image id), ``counts`` (skipped,
    clipped and crowd annotations), ``has_masks`` (every annotation has a ``segmentation``).
    """

    def __init__(self, root, split: str, size: int | ImageResize, hflip: float = 0.0, seed: int = 0,
                 masks: bool = False):
        self.root = Path(root)
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        data, self.counts = sanitise(self.ann_file, read_coco_json(self.ann_file))
        self.has_masks = check_segmentations(self.ann_file, data)
        if masks and not self.has_masks:
            missing = next((a["id"] for a in data["annotations"] if "segmentation" not in a), None)
            raise DatasetError(f"{self.ann_file}: instance masks are needed, but "
                               + (f"annotation id {missing} has no 'segmentation'" if missing is not None
                                  else "there are no annotations")
                               + " (digits-det: build it with 'unikd data build digits-det --masks')")
        self.masks = masks
        self.check_files(data["images"])
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self.category_ids = sorted(c["id"] for c in data["categories"])
        self.num_classes = len(self.category_ids)
        self.image_ids = [im["id"] for im in data["images"]]
        self.targets = self.build_targets(data)
        self.resize = size if isinstance(size, ImageResize) else ImageResize(size)
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        if any(self.counts.values()):
            log.warning("%s: %s", self.ann_file, ", ".join(f"{k}={v}" for k, v in self.counts.items()))

    def check_files(self, images: list[dict]) -> None:
        """Raise a DatasetError naming the first image file that does not exist (and how many are missing)."""
        missing = [self.root / "images" / im["file_name"] for im in images
                   if not (self.root / "images" / im["file_name"]).is_file()]
        if missing:
            raise DatasetError(f"{self.ann_file}: {len(missing)} image file(s) missing, first: {missing[0]}")

    def build_targets(self, data: dict) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image index: (boxes float32 [n, 4] xyxy in original pixels, labels int64 [n]), crowds left out."""
        label_of = {c: i for i, c in enumerate(self.category_ids)}
        per_image: dict[int, list[dict]] = {i: [] for i in self.image_ids}
        for a in data["annotations"]:
            if not a["iscrowd"]:
                per_image[a["image_id"]].append(a)
        targets = []
        for image_id in self.image_ids:
            anns = per_image[image_id]
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
            targets.append((boxes, labels))
        return targets

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation __getitem__ uses."""
        self.epoch = epoch

    def augmentation(self, index: int) -> tuple[bool, int]:
        """(whether item ``index`` is flipped, which of the resize's scales it gets) this epoch: a pure function
        of (seed, epoch, index, hflip, the number of scales); the first draw decides the flip, the second the
        scale (uniform)."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        flipped = bool(rng.random() < self.hflip)
        return flipped, int(rng.integers(self.resize.choices))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return self.load(index, *self.augmentation(index))

    def load(self, index: int, flipped: bool, scale: int) -> tuple[torch.Tensor, dict]:
        """Item ``index`` under a given augmentation: flipped or not, at the resize's scale ``scale`` (in
        ``0..resize.choices-1``), whatever the epoch would draw. Returns ``(image [3, H, W], target)``."""
        info = self.coco.imgs[self.image_ids[index]]
        path = self.root / "images" / info["file_name"]
        image = load_image(path)
        h0, w0 = image.shape[-2:]
        if (w0, h0) != (info["width"], info["height"]):
            raise DatasetError(f"{path}: image is {w0}x{h0} but {self.ann_file} says "
                               f"{info['width']}x{info['height']} (image id {info['id']})")
        boxes, labels = self.targets[index]
        inputs = [tv_tensors.Image(image),
                  tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(h0, w0))]
        if self.masks:
            inputs.append(tv_tensors.Mask(self.instance_masks(info["id"], h0, w0)))
        outputs = self.resize.transform(scale)(*inputs)
        if flipped:
            outputs = [F.horizontal_flip(x) for x in outputs]
        image, boxes = outputs[:2]
        target = {
            "boxes": boxes.as_subclass(torch.Tensor).float(),
            "labels": torch.tensor(labels),
            "image_id": int(info["id"]),
            "orig_size": torch.tensor([h0, w0], dtype=torch.int64),
            "flipped": flipped,
        }
        if self.masks:
            target["masks"] = outputs[2].as_subclass(torch.Tensor)
        return F.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor), target

    def instance_masks(self, image_id: int, height: int, width: int) -> torch.Tensor:
        """uint8 [n, height, width]: the masks of the image's non-crowd annotations, in the order of its targets."""
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        masks = [self.coco.annToMask(a) for a in anns]
        return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Batch of (image [3, H, W], target) pairs -> (list of images, list of targets); sizes may differ."""
    images, targets = zip(*batch)
    return list(images), list(targets)
