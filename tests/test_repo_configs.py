from pathlib import Path

import pytest

from unikd.config import load_config
from unikd.detectors import build_detector

# configs/digits/; configs/coco/ (ImageNet backbones from files not in the repository) is tests/test_coco_configs.py
ALL_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "digits").glob("*.yaml"))
CONFIGS = [p for p in ALL_CONFIGS if p.stem.endswith(("_teacher", "_student"))]  # detector training
BACKBONES = {"r18": "resnet18", "r50": "resnet50", "convnext_t": "convnext_tiny", "swin_t": "swin_t"}  # name tags


def test_the_repo_has_a_teacher_and_a_student_per_family():
    names = {p.stem for p in CONFIGS}
    for family in ("retinanet", "fcos", "faster_rcnn", "atss", "reppoints", "deformable_detr"):
        assert {f"{family}_r50_teacher", f"{family}_r18_student"} <= names
    assert "mask_rcnn_r50_teacher" in names
    assert {"retinanet_convnext_t_teacher", "retinanet_swin_t_teacher"} & names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_and_builds_its_detector(path):
    cfg = load_config(path)
    detector = build_detector(cfg.model, num_classes=10)
    assert detector.family == cfg.model.family
    assert detector.feature_channels == [cfg.model.fpn_channels] * len(detector.feature_strides)
    tag = path.stem[len(cfg.model.family) + 1: path.stem.rindex("_")]  # <family>_<backbone tag>_<role>
    assert cfg.model.backbone == BACKBONES[tag]


@pytest.mark.parametrize("student", ["retinanet", "atss", "faster_rcnn", "fcos", "reppoints", "deformable_detr"])
def test_stage_configs_validate_and_match_the_student_baseline(student):
    names = {p.stem for p in ALL_CONFIGS}
    assert {"ake", f"distill_{student}_r18"} <= names
    root = Path(__file__).parents[1] / "configs" / "digits"
    distill = load_config(root / f"distill_{student}_r18.yaml")
    baseline = load_config(root / f"{student}_r18_student.yaml")
    assert distill.distill.method == "unikd"
    assert (distill.model, distill.train, distill.data) == (baseline.model, baseline.train, baseline.data)
    ake = load_config(root / "ake.yaml").ake
    teachers = [load_config(p) for p in root.glob("*_r50_teacher.yaml")]  # one ake.yaml for every R50 teacher
    assert ake.d_model % ake.n_heads == 0 and {t.model.fpn_channels for t in teachers} == {ake.d_model}
