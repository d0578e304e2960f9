"""COCO loader: resize and flip move the boxes with the image, deterministic flips, every bad-input case."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from unikd.data import CocoDetection, DatasetError, build_digits_det, collate

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def write_dataset(root, images, annotations, categories=CATEGORIES, split="train"):
    """Write COCO JSON plus black PNGs whose annotated boxes are painted white. images: (id, W, H)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for image_id, w, h in images:
        pixels = np.zeros((h, w, 3), np.uint8)
        for a in annotations:
            if a["image_id"] == image_id:
                x, y, bw, bh = (int(v) for v in a["bbox"])
                pixels[max(y, 0) : max(y + bh, 0), max(x, 0) : max(x + bw, 0)] = 255
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
    data = {"images": entries, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def ann(ann_id, image_id, bbox, category_id=3, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@pytest.fixture
def basic(tmp_path):
    """Image 1: 60x40 (W x H) with two boxes; image 2: 30x50 with one; image 3: 20x20 with none."""
    return write_dataset(tmp_path, [(1, 60, 40), (2, 30, 50), (3, 20, 20)], [
        ann(1, 1, [10, 5, 20, 10]), ann(2, 1, [40, 20, 12, 16], category_id=7), ann(3, 2, [4, 10, 10, 20]),
    ])


def test_item_format_and_resize_scales_boxes(basic):
    ds = CocoDetection(basic, "train", size=128)
    assert (len(ds), ds.num_classes, ds.category_ids, ds.image_ids) == (3, 2, [3, 7], [1, 2, 3])
    expected = {  # (H', W') = longer side 128, shorter side floor(128 * short / long)
        0: ((85, 128), [[10, 5, 30, 15], [40, 20, 52, 36]], [0, 1], (40, 60)),
        1: ((128, 76), [[4, 10, 14, 30]], [0], (50, 30)),
    }
    for index, ((h, w), boxes, labels, orig) in expected.items():
        image, target = ds[index]
        assert image.dtype == torch.float32 and image.shape == (3, h, w)
        assert 0 <= image.min() and image.max() <= 1
        scale = torch.tensor([w / orig[1], h / orig[0]] * 2)
        torch.testing.assert_close(target["boxes"], torch.tensor(boxes, dtype=torch.float32) * scale)
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == labels
        assert target["orig_size"].tolist() == list(orig) and target["orig_size"].dtype == torch.int64
        assert target["image_id"] == ds.image_ids[index] and target["flipped"] is False
        near_a_box = torch.zeros(h, w, dtype=torch.bool)
        for x1, y1, x2, y2 in target["boxes"].round().int().tolist():  # the painted boxes moved with the boxes
            assert image[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() > 0.9
            near_a_box[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = True
        assert image[:, ~near_a_box].max() < 0.05


def test_image_without_annotations(basic):
    image, target = CocoDetection(basic, "train", size=32)[2]
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_flip_moves_boxes_and_pixels(basic):
    plain = CocoDetection(basic, "train", size=128, hflip=0.0)
    flipped = CocoDetection(basic, "train", size=128, hflip=1.0)
    for index in range(3):
        (img0, t0), (img1, t1) = plain[index], flipped[index]
        width = img0.shape[-1]
        assert t1["flipped"] is True
        torch.testing.assert_close(img1, img0.flip(-1))
        expected = torch.stack([width - t0["boxes"][:, 2], t0["boxes"][:, 1], width - t0["boxes"][:, 0],
                                t0["boxes"][:, 3]], dim=1)
        torch.testing.assert_close(t1["boxes"], expected)


def decisions(ds, epoch, n=64):
    ds.set_epoch(epoch)
    return [ds.augmentation(i)[0] for i in range(n)]


def test_flip_decision_depends_only_on_seed_epoch_index(basic):
    a = CocoDetection(basic, "train", size=32, hflip=0.5, seed=3)
    b = CocoDetection(basic, "train", size=32, hflip=0.5, seed=3)
    torch.manual_seed(123)
    np.random.seed(123)
    first = decisions(a, 0)
    torch.manual_seed(999)  # global RNG state must not matter
    np.random.seed(999)
    assert decisions(b, 0) == first
    assert decisions(a, 1) != first
    assert decisions(a, 0) == first  # going back to an epoch (resume) repeats it
    assert decisions(CocoDetection(basic, "train", size=32, hflip=0.5, seed=4), 0) != first
    assert 16 < sum(first) < 48
    assert first == [np.random.default_rng([3, 0, i]).random() < 0.5 for i in range(64)]  # as documented
    b.set_epoch(5)
    assert [b[i][1]["flipped"] for i in range(3)] == decisions(a, 5, n=3)


def test_collate_keeps_lists(basic):
    ds = CocoDetection(basic, "train", size=64)
    images, targets = collate([ds[0], ds[1]])
    assert [i.shape for i in images] == [(3, 42, 64), (3, 64, 38)]
    assert [t["image_id"] for t in targets] == [1, 2]


def test_digits_det_loads_and_evaluates(tmp_path):
    root = build_digits_det(tmp_path / "dd", n_train=2, n_val=6)
    ds = CocoDetection(root, "val", size=128)
    results = []
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.shape == (3, 128, 128)
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            results.append({"image_id": target["image_id"], "category_id": ds.category_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})
    evaluator = COCOeval(ds.coco, ds.coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


# --- bad input -------------------------------------------------------------------------------------------


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val.json"):
        CocoDetection(tmp_path, "val", size=32)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level must be an object"),
    ('{"images": [], "categories": []}', "missing key 'annotations'"),
    ('{"images": [{"id": 1, "width": 5, "height": 5}], "annotations": [], "categories": []}',
     r"images\[0\] is missing key 'file_name'"),
])
def test_json_that_is_not_coco(basic, content, message):
    (basic / "annotations" / "instances_train.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(basic, "train", size=32)
    assert "instances_train.json" in str(err.value)


def test_missing_image_file_fails_at_construction(basic):
    (basic / "images" / "2.png").unlink()
    with pytest.raises(DatasetError, match=r"1 image file\(s\) missing, first: .*2\.png"):
        CocoDetection(basic, "train", size=32)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_image_fails_when_loaded_naming_the_file(basic, damage):
    path = basic / "images" / "1.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an image at all")
    ds = CocoDetection(basic, "train", size=32)
    ds[1]  # the other images still load
    with pytest.raises(DatasetError, match=r"cannot read image .*1\.png"):
        ds[0]


def test_image_size_disagreeing_with_json(basic):
    Image.new("RGB", (7, 9)).save(basic / "images" / "3.png")
    with pytest.raises(DatasetError, match=r"3\.png: image is 7x9 but .* says 20x20"):
        CocoDetection(basic, "train", size=32)[2]


def test_unknown_category_names_the_annotation(tmp_path):
    write_dataset(tmp_path, [(1, 20, 20)], [ann(1, 1, [1, 1, 5, 5]), ann(42, 1, [2, 2, 5, 5], category_id=5)])
    with pytest.raises(DatasetError, match="annotation id 42 has category_id 5"):
        CocoDetection(tmp_path, "train", size=32)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "3", 4], [1, 2, float("nan"), 4], None])
def test_malformed_bbox_names_the_annotation(tmp_path, bbox):
    write_dataset(tmp_path, [(1, 20, 20)], [ann(1, 1, [1, 1, 5, 5])])
    path = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"].append(ann(9, 1, bbox))
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="annotation id 9 has bbox"):
        CocoDetection(tmp_path, "train", size=32)


def test_unknown_image_and_duplicate_ids(tmp_path):
    write_dataset(tmp_path, [(1, 20, 20)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 8, [1, 1, 5, 5])])
    with pytest.raises(DatasetError, match="annotation id 2 refers to image_id 8"):
        CocoDetection(tmp_path, "train", size=32)
    write_dataset(tmp_path, [(1, 20, 20)], [ann(1, 1, [1, 1, 5, 5]), ann(1, 1, [2, 2, 5, 5])])
    with pytest.raises(DatasetError, match="annotation id 1 occurs more than once"):
        CocoDetection(tmp_path, "train", size=32)


def test_skips_and_clips_are_counted_and_logged(tmp_path, caplog):
    write_dataset(tmp_path, [(1, 40, 20)], [
        ann(1, 1, [1, 1, 5, 5]),
        ann(2, 1, [3, 3, 0, 5]),  # zero width: skipped
        ann(3, 1, [3, 3, 4, -2]),  # negative height: skipped
        ann(4, 1, [50, 2, 5, 5]),  # entirely right of the image: skipped
        ann(5, 1, [30, -4, 20, 10]),  # partly outside: clipped to [30, 0, 40, 6]
        ann(6, 1, [10, 10, 6, 6], iscrowd=1),  # crowd: evaluation only
    ])
    with caplog.at_level(logging.WARNING, logger="unikd.data.coco"):
        ds = CocoDetection(tmp_path, "train", size=40)
    assert ds.counts == {"degenerate_skipped": 2, "outside_skipped": 1, "clipped": 1, "crowd_ignored": 1}
    assert "degenerate_skipped=2" in caplog.text and "instances_train.json" in caplog.text
    _, target = ds[0]
    assert target["boxes"].tolist() == [[1, 1, 6, 6], [30, 0, 40, 6]]
    assert sorted(ds.coco.getAnnIds()) == [1, 5, 6]  # evaluation sees the same cleaned ground truth
    assert ds.coco.anns[5]["bbox"] == [30, 0, 10, 6] and ds.coco.anns[5]["area"] == 60
    assert ds.coco.anns[6]["iscrowd"] == 1


def test_clean_dataset_logs_nothing(basic, caplog):
    with caplog.at_level(logging.WARNING, logger="unikd.data.coco"):
        CocoDetection(basic, "train", size=32)
    assert caplog.text == ""
