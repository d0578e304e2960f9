"""COCO evaluation with pycocotools' COCOeval: the numbers everybody quotes, computed the usual way."""
from __future__ import annotations

import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .engine import distributed as D
from .engine.progress import progress

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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


def coco_eval(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None, verbose: bool = False) -> dict:
    """Bounding-box AP, AP50, AP75, APs, APm, APl (in [0, 1]; -1 where the split has no such object).

    ``image_ids`` restricts the evaluation to those images (default: every image of ``coco_gt``).
    No detections at all scores 0 everywhere objects exist.
    """
    if not results:
        return {k: 0.0 for k in METRICS}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
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

    Every rank returns the same metrics. ``dataset`` is a :class:`unikd.data.CocoDetection`.
    ``category_ids`` maps the detector's labels to COCO ids (default: the dataset's); detections of a
    category the dataset does not have are dropped.
    """
    indices = list(range(D.rank(), len(dataset), D.world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate_fn)
    was_training = detector.training
    detector.eval()
    results = []
    for images, targets in progress(loader, desc="eval"):
        preds = detector.predict([im.to(device) for im in images])
        for im, pred, target in zip(images, preds, targets):
            results += to_coco_results(pred, target, tuple(im.shape[-2:]), category_ids or dataset.category_ids)
    detector.train(was_training)
    known = set(dataset.category_ids)
    results = [r for part in D.gather_objects(results) for r in part if r["category_id"] in known]
    return coco_eval(dataset.coco, results, image_ids=dataset.image_ids, verbose=verbose and D.is_main())
