"""Annotation files the loader must refuse by name (ids of the wrong type, no categories) or clean up
(a box that vanishes in float32), rather than crash later inside numpy or torchvision."""
import json

import pytest
import torch

from unikd.data import CocoDetection, DatasetError
from unikd.detectors import build_detector
from unikd.config import DetectorConfig

from test_coco_data import ann, write_dataset


def edited(root, section, index, **changes):
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data[section][index].update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("section, key, value", [
    ("images", "id", "1"), ("annotations", "image_id", "1"), ("annotations", "category_id", 3.0),
    ("categories", "id", 3.5), ("annotations", "id", True), ("images", "width", 20.5),
])
def test_ids_of_the_wrong_type_are_named(tmp_path, section, key, value):
    write_dataset(tmp_path, [(1, 20, 20)], [ann(1, 1, [1, 1, 5, 5])])
    path = edited(tmp_path, section, 0, **{key: value})
    with pytest.raises(DatasetError, match=rf"{path}: {section}\[0\] has {key} {value!r}, expected an integer"):
        CocoDetection(tmp_path, "train", size=32)


def test_no_categories_is_an_error(tmp_path):
    write_dataset(tmp_path, [(1, 20, 20)], [], categories=[])
    with pytest.raises(DatasetError, match="'categories' is empty"):
        CocoDetection(tmp_path, "train", size=32)


def test_a_width_that_vanishes_in_float32_is_skipped_and_training_runs(tmp_path):
    write_dataset(tmp_path, [(1, 2000, 40)], [ann(1, 1, [1000, 5, 1e-5, 10]), ann(2, 1, [20, 5, 600, 20])])
    ds = CocoDetection(tmp_path, "train", size=64)
    assert ds.counts["degenerate_skipped"] == 1
    image, target = ds[0]
    assert target["boxes"].shape == (1, 4) and (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    detector = build_detector(DetectorConfig(family="faster_rcnn", backbone="resnet18", fpn_channels=32,
                                             rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20,
                                             box_batch_size_per_image=16), ds.num_classes)
    losses, _ = detector.train()([image], [target])  # torchvision refuses a zero-width box
    assert all(torch.isfinite(v) for v in losses.values())
