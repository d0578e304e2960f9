"""Instance masks in COCO's run-length encoding (pycocotools), as the datasets and the evaluation store them."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_masks(masks: np.ndarray) -> list[dict]:
    """COCO compressed RLEs of masks bool or uint8 ``[n, h, w]``: n dicts ``{"size": [h, w], "counts": str}``,
    ready for JSON and for ``COCO.loadRes``."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def segmentation_problem(segmentation, height: int, width: int) -> str | None:
    """What is wrong with a COCO ``segmentation`` of an image of ``height`` x ``width``, or None if it is valid:
    a non-empty list of polygons (flat lists of at least 3 x, y pairs) or an RLE dict whose ``size`` is
    ``[height, width]``."""
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or segmentation.get("size") != [height, width]:
            return f"an RLE needs 'counts' and size [{height}, {width}], got size {segmentation.get('size')!r}"
        return None
    if isinstance(segmentation, list) and segmentation and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in segmentation):
        return None
    return "expected a list of polygons [x1, y1, x2, y2, ...] (at least 3 points each) or an RLE dict"
