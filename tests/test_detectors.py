"""Detector adapters: the DESIGN §3 contract on real (tiny, randomly initialised) torchvision detectors."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from unikd.config import DetectorConfig
from unikd.detectors import FAMILIES, DetectorAdapter, build_detector
from unikd.detectors.transform import IMAGE_MEAN, IMAGE_STD, PadOnlyTransform

NUM_CLASSES = 3
SIZE = 64
LOSS_KEYS = {
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    "atss": {"classification", "bbox_regression", "bbox_ctrness"},
    "reppoints": {"classification", "bbox_init", "bbox_refine"},
    # the last decoder layer's set loss, and the auxiliary ones of the 5 others (6 layers by default)
    "deformable_detr": {f"{name}{layer}" for name in ("loss_class", "loss_l1", "loss_giou")
                        for layer in ["", *(f"_{i}" for i in range(5))]},
}


def tiny_config(family: str, **overrides) -> DetectorConfig:
    """ResNet-18, 32-channel FPN, few proposals, every detection kept (score_thresh 0)."""
    values = dict(
        family=family,
        backbone="resnet18",
        fpn_channels=32,
        score_thresh=0.0,
        detections_per_img=20,
        rpn_pre_nms_top_n=100,
        rpn_post_nms_top_n=50,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
    )
    return DetectorConfig(**{**values, **overrides})


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[n, height, width]``: each box filled (the instance masks Mask R-CNN trains on)."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    return masks


def batch() -> tuple[list[torch.Tensor], list[dict]]:
    """Two images (one square, one non-square with longer side SIZE) and their targets (with masks, which only
    Mask R-CNN reads)."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=gen), torch.rand(3, 48, SIZE, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [32.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 5.0, 50.0, 40.0]]), "labels": torch.tensor([1])},
    ]
    for image, target in zip(images, targets):
        target["masks"] = box_masks(target["boxes"], *image.shape[-2:])
    return images, targets


@pytest.fixture(scope="module", params=sorted(LOSS_KEYS))
def detector(request) -> DetectorAdapter:
    torch.manual_seed(0)
    return build_detector(tiny_config(request.param), NUM_CLASSES).train()


def count_calls(module: torch.nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    calls: list = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_registry_lists_every_family():
    assert set(FAMILIES) == set(LOSS_KEYS)
    assert all(FAMILIES[name].family == name for name in FAMILIES)


def test_forward_returns_losses_and_features_of_the_same_pass(detector):
    images, targets = batch()
    calls, handle = count_calls(detector.model.backbone)
    losses, pyramid = detector(images, targets)
    handle.remove()
    features = pyramid.levels
    assert pyramid.strides == detector.feature_strides
    assert pyramid.image_sizes == [tuple(image.shape[-2:]) for image in images]

    assert len(calls) == 1, "the backbone must run exactly once per training forward"
    assert set(losses) == LOSS_KEYS[detector.family]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert len(features) == len(detector.feature_strides) == len(detector.feature_channels)
    for feature, stride, channels in zip(features, detector.feature_strides, detector.feature_channels):
        assert feature.shape == (2, channels, math.ceil(SIZE / stride), math.ceil(SIZE / stride))
    # The heads consumed these very tensors: autograd.grad raises if any level is not in the loss's graph.
    # (Some levels may get an all-zero gradient at 64 px: 1x1 maps under GroupNorm, or no sampled anchors.)
    grads = torch.autograd.grad(sum(losses.values()), features)
    assert any(g.abs().sum() > 0 for g in grads)

    separate = detector.extract_features(images)
    assert separate.image_sizes == pyramid.image_sizes
    for f, s in zip(features, separate.levels):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_backbone(detector):
    detector.zero_grad()
    losses, _ = detector(*batch())
    sum(losses.values()).backward()
    stem = detector.model.backbone.body.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_forward_refuses_eval_mode(detector):
    detector.eval()
    try:
        with pytest.raises(RuntimeError, match="predict"):
            detector(*batch())
    finally:
        detector.train()


def test_predict_gives_coco_ready_detections(detector):
    images, _ = batch()
    detections = detector.predict(images)
    assert detector.training, "predict must restore the previous mode"
    assert len(detections) == len(images)
    for det, image in zip(detections, images):
        height, width = image.shape[-2:]
        n = len(det["boxes"])
        assert 0 < n <= 20
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["labels"].dtype == torch.int64
        assert det["labels"].min() >= 0 and det["labels"].max() < NUM_CLASSES
        boxes = det["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        if detector.predicts_masks:  # probabilities in the input image's pixels
            assert det["masks"].shape == (n, 1, height, width)
            assert det["masks"].min() >= 0 and det["masks"].max() <= 1
        else:
            assert "masks" not in det


def test_predict_keeps_eval_mode(detector):
    detector.eval()
    try:
        detector.predict(batch()[0])
        assert not detector.training and not any(m.training for m in detector.modules())
    finally:
        detector.train()


def test_transform_keeps_the_loader_scale(detector):
    """The loader resizes: images of any size, COCO's 800x1333 of both orientations included, are normalised and
    padded to a multiple of 32, never resized, in training and in inference."""
    assert isinstance(detector.model.transform, PadOnlyTransform)
    images = [torch.rand(3, 800, 1333), torch.rand(3, 1333, 800), torch.rand(3, 32, 32), torch.rand(3, 45, 71)]
    transform = detector.model.transform
    for training in (True, False):
        transform.train(training)
        batched, _ = transform(images)
        assert batched.image_sizes == [tuple(im.shape[-2:]) for im in images]
        assert batched.tensors.shape == (4, 3, 1344, 1344)
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            torch.testing.assert_close(batched.tensors[i, :, :h, :w], transform.normalize(image), rtol=0, atol=0)
    transform.train(True)


def test_images_of_any_size_keep_it_through_the_detector(detector):
    """Landscape and portrait images of odd sizes: the pass's pyramid and the predictions are in their pixels."""
    sizes = [(40, 70), (75, 36)]
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in sizes]
    targets = [{"boxes": torch.tensor([[4.0, 5.0, 30.0, 33.0]]), "labels": torch.tensor([1])} for _ in sizes]
    for image, target in zip(images, targets):
        target["masks"] = box_masks(target["boxes"], *image.shape[-2:])
    _, features = detector(images, targets)
    assert features.image_sizes == sizes
    for det, (h, w) in zip(detector.predict(images), sizes):
        assert len(det["boxes"]) and (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()


def test_faster_rcnn_shifts_labels_for_its_background_class():
    torch.manual_seed(0)
    detector = build_detector(tiny_config("faster_rcnn"), NUM_CLASSES).train()
    images, targets = batch()
    seen: dict[str, list] = {"in": [], "out": []}
    pre = detector.model.roi_heads.register_forward_pre_hook(
        lambda _m, args: seen["in"].extend(t["labels"].clone() for t in args[3] or [])
    )
    post = detector.model.roi_heads.register_forward_hook(
        lambda _m, _args, out: seen["out"].extend(d["labels"].clone() for d in out[0])
    )
    detector(images, targets)
    assert [t.tolist() for t in seen["in"]] == [(t["labels"] + 1).tolist() for t in targets]
    assert detector.model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1

    seen["out"].clear()
    detections = detector.predict(images)
    pre.remove()
    post.remove()
    for raw, det in zip(seen["out"], detections):
        assert raw.min() >= 1, "torchvision's class 0 is background and is never predicted"
        assert det["labels"].tolist() == (raw - 1).tolist()


def test_builder_honours_fpn_channels_and_trainable_layers():
    detector = build_detector(tiny_config("faster_rcnn", fpn_channels=16, trainable_layers=2), NUM_CLASSES)
    assert detector.feature_channels == [16] * 5
    assert all(block[0].out_channels == 16 for block in detector.model.backbone.fpn.layer_blocks)
    trunk = detector.model.backbone.body
    for name, param in trunk.named_parameters():
        assert param.requires_grad == name.startswith(("layer3", "layer4")), name
    assert all(p.requires_grad for p in detector.model.backbone.fpn.parameters())

    frozen = build_detector(tiny_config("faster_rcnn", trainable_layers=0), NUM_CLASSES)
    assert not any(p.requires_grad for p in frozen.model.backbone.body.parameters())
    everything = build_detector(tiny_config("fcos", trainable_layers=5), NUM_CLASSES)
    assert all(p.requires_grad for p in everything.model.backbone.body.parameters())


def test_builder_derives_stage_channels_from_the_backbone():
    detector = build_detector(tiny_config("faster_rcnn", backbone="resnet50"), NUM_CLASSES)
    trunk = detector.model.backbone.body
    assert trunk.channels == [256, 512, 1024, 2048] and trunk.strides == [4, 8, 16, 32]
    assert [block[0].in_channels for block in detector.model.backbone.fpn.inner_blocks] == [256, 512, 1024, 2048]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"family": "yolo"}, "model.family"),
        ({"backbone": "vgg16"}, "model.backbone"),
        ({"anchor_sizes": [8, 16, 32]}, "model.anchor_sizes"),
        ({"family": "faster_rcnn", "anchor_sizes": [8, 16, 32, 64]}, "model.anchor_sizes"),
        ({"trainable_layers": 6}, "model.trainable_layers"),
        ({"family": "fcos", "fpn_channels": 16}, "model.fpn_channels"),
        ({"family": "retinanet", "fpn_channels": 48}, "model.fpn_channels"),
    ],
)
def test_builder_rejects_bad_config(overrides, key):
    with pytest.raises(ValueError, match=key) as err:
        build_detector(tiny_config(**{"family": "retinanet", **overrides}), NUM_CLASSES)
    if key in ("model.family", "model.backbone"):
        assert "valid:" in str(err.value) and ("retinanet" in str(err.value) or "resnet50" in str(err.value))


def test_retinanet_has_torchvisions_v2_head():
    """GroupNorm in the head towers and a GIoU box loss (the original head did not train from scratch)."""
    detector = build_detector(tiny_config("retinanet"), NUM_CLASSES)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in detector.model.head.modules()) == 8
    assert detector.model.head.regression_head._loss_type == "giou"


def test_a_transform_that_rescales_is_refused(detector, monkeypatch):
    """The adapters check that the transform kept every image's size (here torchvision's own, which upscales)."""
    monkeypatch.setattr(detector.model, "transform", GeneralizedRCNNTransform(64, 64, IMAGE_MEAN, IMAGE_STD))
    with pytest.raises(ValueError, match="resized .* PadOnlyTransform"):
        detector.extract_features([torch.rand(3, 32, 32)])
