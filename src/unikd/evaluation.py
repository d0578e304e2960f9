"""COCO evaluation with pycocotools' COCOeval: the numbers everybody quotes, computed the usual way.

Boxes always; masks too (``iouType="segm"``, RLE-encoded) when the detector predicts them and the dataset has them.
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data.masks import encode_masks
from .engine import distributed as D
from .engine.progress import progress

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SEGM_METRICS = tuple(f"segm_{k}" for k in METRICS)


def to_coco_results(pred: dict, target: dict, image_size: tuple[int, int], category_ids: list[int]) -> list[dict]:
    """Detections of one image as COCO result records in the original file's pixel coordinates.

    Args:
        pred: ``boxes`` [n, 4] xyxy in the pixels of the (resized) input image, ``scores`` [n],
            ``labels`` [n] contiguous 0..K-1.
        target: the loader's target of that image (``image_id``, ``orig_size`` = (H0, W0)).
        image_size: (H, W) of the input image the boxes refer to.
        category_ids: label -> COCO category id.
    """
    h, w = image_size
    h0, w0 = (int(v) for v in target["orig_size"])
    boxes = pred["boxes"].detach().float().cpu() * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    cats = torch.as_tensor(category_ids)[pred["labels"].cpu()].tolist()
    image_id = int(target["image_id"])
    return [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for b, c, s in zip(xywh, cats, pred["scores"].cpu().tolist())]


def to_segm_results(pred: dict, target: dict, category_ids: list[int]) -> list[dict]:
    """Masks of one image as COCO ``segm`` result records (RLE) at the original file's size.

    Args:
        pred: ``masks`` [n, 1, H, W] probabilities in the (resized) input image's pixels, ``scores`` [n],
            ``labels`` [n] contiguous 0..K-1.
        target: the loader's target of that image (``image_id``, ``orig_size`` = (H0, W0)).
        category_ids: label -> COCO category id.
    Each mask is resized bilinearly to (H0, W0) and thresholded at 0.5.
    """
    h0, w0 = (int(v) for v in target["orig_size"])
    probabilities = pred["masks"].detach().float().cpu()
    if probabilities.shape[-2:] != (h0, w0) and len(probabilities):
        probabilities = F.interpolate(probabilities, size=(h0, w0), mode="bilinear", align_corners=False)
    rles = encode_masks((probabilities[:, 0] > 0.5).numpy())
    cats = torch.as_tensor(category_ids)[pred["labels"].cpu()].tolist()
    image_id = int(target["image_id"])
    return [{"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
            for r, c, s in zip(rles, cats, pred["scores"].cpu().tolist())]


def coco_eval(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None, verbose: bool = False,
              iou_type: str = "bbox") -> dict:
    """AP, AP50, AP75, APs, APm, APl (in [0, 1]; -1 where the split has no such object) of ``iou_type``
    ``bbox`` (results with ``bbox``) or ``segm`` (results with an RLE ``segmentation``), under the names of
    :data:`METRICS`.

    ``image_ids`` restricts the evaluation to those images (default: every image of ``coco_gt``).
    No detections at all scores 0 everywhere objects exist.
    """
    if not results:
        return {k: 0.0 for k in METRICS}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(out.getvalue(), end="")
    return {k: float(v) for k, v in zip(METRICS, ev.stats[:6])}


@torch.no_grad()
def evaluate_detector(detector, dataset, collate_fn, device, batch_size: int = 8, workers: int = 0,
                      verbose: bool = False, category_ids: list[int] | None = None) -> dict:
    """Run ``detector.predict`` over ``dataset`` (sharded across DDP ranks) and score it with COCOeval.

    Every rank returns the same metrics: :data:`METRICS` for the boxes, and :data:`SEGM_METRICS` for the masks
    when the detector predicts masks (``detector.predicts_masks``) and the dataset has them (``dataset.has_masks``).
    ``dataset`` is a :class:`unikd.data.CocoDetection`. ``category_ids`` maps the detector's labels to COCO ids
    (default: the dataset's); detections of a category the dataset does not have are dropped.
    """
    indices = list(range(D.rank(), len(dataset), D.world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate_fn)
    was_training = detector.training
    detector.eval()
    category_ids = category_ids or dataset.category_ids
    with_masks = dataset.has_masks and getattr(detector, "predicts_masks", False)
    results, segm_results = [], []
    for images, targets in progress(loader, desc="eval"):
        preds = detector.predict([im.to(device) for im in images])
        for im, pred, target in zip(images, preds, targets):
            results += to_coco_results(pred, target, tuple(im.shape[-2:]), category_ids)
            if with_masks:
                segm_results += to_segm_results(pred, target, category_ids)
    detector.train(was_training)
    known = set(dataset.category_ids)

    def gathered(records: list[dict]) -> list[dict]:
        return [r for part in D.gather_objects(records) for r in part if r["category_id"] in known]

    metrics = coco_eval(dataset.coco, gathered(results), image_ids=dataset.image_ids, verbose=verbose and D.is_main())
    if with_masks:
        segm = coco_eval(dataset.coco, gathered(segm_results), image_ids=dataset.image_ids,
                         verbose=verbose and D.is_main(), iou_type="segm")
        metrics.update({f"segm_{k}": v for k, v in segm.items()})
    return metrics
