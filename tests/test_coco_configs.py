"""configs/coco/: the paper's COCO setting (§4.1), every config loaded and its models built (no 800-px pass)."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from unikd.config import load_config
from unikd.data import CocoDetection, ImageResize, collate
from unikd.detectors import build_detector
from unikd.distill import DistillationModel, KnowledgeExtractors, build_distiller

COCO = Path(__file__).parents[1] / "configs" / "coco"
TEACHERS = ["retinanet", "fcos", "atss", "reppoints", "faster_rcnn", "mask_rcnn", "deformable_detr"]
STUDENTS = [f for f in TEACHERS if f != "mask_rcnn"]
TWO_STAGE = {"faster_rcnn", "mask_rcnn"}
NUM_CLASSES = 80


def config(name: str, *overrides: str):
    return load_config(COCO / f"{name}.yaml", list(overrides))


def detector(cfg):
    """The config's detector, its backbone randomly initialised (the ImageNet files are not in the repository)."""
    return build_detector(dataclasses.replace(cfg.model, backbone_weights=None), NUM_CLASSES)


def test_the_folder_holds_the_papers_pairs():
    assert {p.stem for p in COCO.glob("*.yaml")} == {
        "ake", *(f"{f}_r50_teacher" for f in TEACHERS), *(f"{f}_r18_student" for f in STUDENTS),
        *(f"distill_{f}_r18" for f in STUDENTS)}


@pytest.mark.parametrize("name", [f"{f}_r50_teacher" for f in TEACHERS] + [f"{f}_r18_student" for f in STUDENTS])
def test_detector_configs_are_the_papers(name):
    cfg = config(name)
    family, tag = cfg.model.family, name.split("_")[-2]
    assert cfg.model.backbone == {"r50": "resnet50", "r18": "resnet18"}[tag]
    assert f"{cfg.model.backbone}-" in Path(cfg.model.backbone_weights).name  # ImageNet-pretrained
    assert cfg.model.fpn_channels == 256 and cfg.model.trainable_layers == 3
    assert (cfg.data.min_size[-1], cfg.data.max_size) == (800, 1333)  # evaluated at shorter side 800, longer ≤ 1333
    assert ImageResize.from_config(cfg.data, train=False) == ImageResize(1333, (800,))
    if family == "deformable_detr":  # its own recipe: multi-scale, AdamW 2e-4, 50 epochs, batch 32
        assert cfg.data.min_size == list(range(480, 801, 32))
        assert (cfg.train.optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.lr_steps) == ("adamw", 2e-4, 50, [0.8])
        assert cfg.data.batch_size * 8 == 32 and cfg.train.grad_clip == 0.1
        assert (cfg.model.num_queries, cfg.model.encoder_layers, cfg.model.decoder_layers) == (300, 6, 6)
        return
    assert cfg.data.min_size == [800] and cfg.data.batch_size * 8 == 16 and cfg.data.hflip == 0.5
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.weight_decay) == ("sgd", 0.9, 1e-4)
    assert cfg.train.lr == (0.02 if family in TWO_STAGE else 0.01)
    assert cfg.train.epochs == 12 and [round(s * 12, 9) for s in cfg.train.lr_steps] == [8, 11]
    assert cfg.train.lr_gamma == 0.1 and cfg.train.warmup_iters == 500
    stride_multiple = {"retinanet": 4, "fcos": 1, "atss": 8, "reppoints": 4, "faster_rcnn": 8, "mask_rcnn": 8}
    strides = [4, 8, 16, 32, 64] if family in TWO_STAGE else [8, 16, 32, 64, 128]
    assert cfg.model.anchor_sizes == [stride_multiple[family] * s for s in strides]  # mmdetection's anchors


def test_stage_configs_are_the_papers():
    ake = config("ake")
    assert (ake.ake.n_queries, ake.ake.d_model, ake.ake.extractor_layers, ake.train.epochs) == (200, 256, 1, 15)
    assert ImageResize.from_config(ake.data, train=False) == ImageResize(1333, (800,))
    for family in STUDENTS:
        distill, student = config(f"distill_{family}_r18"), config(f"{family}_r18_student")
        assert (distill.data, distill.model, distill.train) == (student.data, student.model, student.train)
        assert (distill.distill.method, distill.distill.queries) == ("unikd", "both")
        assert distill.distill.lambda_ct == distill.distill.lambda_pos == 10
        assert distill.distill.adaptor_layers is None  # UniKD's own: 2 layers


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return {family: detector(config(f"{family}_r50_teacher")) for family in TEACHERS}


@pytest.fixture(scope="module")
def akes(teachers):
    """Stage-1 AKEs of ake.yaml for each teacher (256 channels, N = 200)."""
    cfg = config("ake").ake
    return {family: KnowledgeExtractors(cfg, len(t.feature_strides), t.feature_channels[0], NUM_CLASSES)
            for family, t in teachers.items()}


@pytest.mark.parametrize("student_family", STUDENTS)
def test_every_student_builds_with_every_teacher(student_family, teachers, akes):
    cfg = config(f"distill_{student_family}_r18")
    student = detector(cfg)
    assert student.family == student_family and student.feature_channels[0] == 256
    for family, teacher in teachers.items():
        distiller = build_distiller(cfg.distill.method, cfg.distill, student, teacher, akes=akes[family])
        assert len(distiller.adaptor.layers) == 2  # φ: two deformable self-attention layers


def test_a_coco_pair_trains_a_step_at_a_small_shorter_side(shapes):
    """distill_retinanet_r18 from the Faster R-CNN teacher, its resize scaled down to shorter side 64, longer ≤ 96."""
    small = ("data.min_size=64", "data.max_size=96")
    cfg, tcfg = config("distill_retinanet_r18", *small), config("faster_rcnn_r50_teacher", *small)
    data = CocoDetection(shapes, "train", ImageResize.from_config(cfg.data, train=True))
    images, targets = collate([data[0], data[1]])
    assert [tuple(i.shape[-2:]) for i in images] == [(64, 96), (85, 64)]
    torch.manual_seed(0)
    student, teacher = detector(cfg), detector(tcfg)
    akes = KnowledgeExtractors(config("ake").ake, len(teacher.feature_strides), 256, NUM_CLASSES)
    distiller = build_distiller("unikd", cfg.distill, student, teacher, akes=akes)
    model = DistillationModel(student, teacher, distiller).train()
    losses = model(images, targets)
    assert {"loss_kd_ct", "loss_kd_pos"} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
