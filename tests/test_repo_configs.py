from pathlib import Path

import pytest

from unikd.config import load_config
from unikd.detectors import build_detector

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_the_repo_has_a_teacher_and_a_student_per_family():
    names = {p.stem for p in CONFIGS}
    for family in ("retinanet", "fcos", "faster_rcnn"):
        assert {f"{family}_r50_teacher", f"{family}_r18_student"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_and_builds_its_detector(path):
    cfg = load_config(path)
    detector = build_detector(cfg.model, num_classes=10, image_size=cfg.data.size)
    assert detector.family == cfg.model.family
    assert detector.feature_channels == [cfg.model.fpn_channels] * len(detector.feature_strides)
    expected = {"teacher": "resnet50", "student": "resnet18"}[path.stem.rsplit("_", 1)[1]]
    assert cfg.model.backbone == expected
