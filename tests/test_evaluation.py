import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unikd.evaluation import METRICS, coco_eval, to_coco_results

CATEGORY_IDS = [3, 7, 11]  # deliberately not contiguous


def make_gt(seed=0, n_images=6, size=(120, 160)):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "height": size[0], "width": size[1]})
        for _ in range(rng.integers(1, 5)):
            w, h = rng.uniform(4, 90, size=2)  # small, medium and large areas
            x, y = rng.uniform(0, size[1] - w), rng.uniform(0, size[0] - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice(CATEGORY_IDS)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": str(c)} for c in CATEGORY_IDS]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_ground_truth_as_detections_scores_ap_one():
    gt = make_gt()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    metrics = coco_eval(gt, results)
    assert set(metrics) == set(METRICS)
    for k in ("AP", "AP50", "AP75"):
        assert metrics[k] == pytest.approx(1.0)


def test_no_detections_scores_zero():
    assert coco_eval(make_gt(), []) == {k: 0.0 for k in METRICS}


def test_perturbed_detections_in_resized_pixels_score_what_pycocotools_gives_directly():
    """Predictions made on a resized input come back to file pixels and score exactly like a direct call."""
    gt = make_gt(seed=1)
    rng = np.random.default_rng(2)
    h0, w0 = 120, 160
    h, w = 96, 128  # the input the detector saw (scale 0.8)
    ours, direct = [], []
    for img_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img_id))
        xywh = np.array([a["bbox"] for a in anns]) + rng.normal(0, 3, size=(len(anns), 4))
        xywh[:, 2:] = np.abs(xywh[:, 2:]) + 1
        scores = rng.uniform(0.1, 1, len(anns))
        labels = np.array([CATEGORY_IDS.index(a["category_id"]) for a in anns])
        labels[0] = (labels[0] + 1) % 3  # one wrong class per image
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * [w / w0, h / h0, w / w0, h / h0]
        pred = {"boxes": torch.tensor(xyxy, dtype=torch.float32), "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels)}
        target = {"image_id": img_id, "orig_size": torch.tensor([h0, w0])}
        ours += to_coco_results(pred, target, (h, w), CATEGORY_IDS)
        direct += [{"image_id": img_id, "category_id": CATEGORY_IDS[l], "bbox": b.tolist(), "score": float(s)}
                   for b, l, s in zip(xywh, labels, scores.astype(np.float32))]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(direct), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    expected = dict(zip(METRICS, ev.stats[:6]))
    got = coco_eval(gt, ours)
    assert 0.05 < expected["AP"] < 0.95  # a real, imperfect score
    for k in METRICS:
        assert got[k] == pytest.approx(expected[k], abs=1e-4)
