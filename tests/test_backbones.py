"""The backbone builder: every torchvision ResNet / ResNeXt / Wide-ResNet, ConvNeXt and Swin, stages by name with
measured strides, an FPN on top, and every family on ConvNeXt-T and Swin-T (tiny images)."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from unikd.config import ConfigError, DetectorConfig
from unikd.detectors import FAMILIES, build_detector
from unikd.detectors.backbone import (STAGE_NAMES, backbone_fpn, backbone_names, classification_body, layout_of,
                                     measure, trunk)

# Output channels of C2..C5, from the torchvision model definitions (stage widths).
CHANNELS = {
    "resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
    **{n: [256, 512, 1024, 2048] for n in ("resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                                            "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
                                            "wide_resnet101_2")},
    **{n: [96, 192, 384, 768] for n in ("convnext_tiny", "swin_t", "swin_v2_t")},
    "convnext_small": [96, 192, 384, 768], "swin_s": [96, 192, 384, 768], "swin_v2_s": [96, 192, 384, 768],
    "convnext_base": [128, 256, 512, 1024], "swin_b": [128, 256, 512, 1024], "swin_v2_b": [128, 256, 512, 1024],
    "convnext_large": [192, 384, 768, 1536],
}
ALL_STAGES = dict(zip(STAGE_NAMES, (4, 8, 16, 32)))
TESTED = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "convnext_tiny", "swin_t", "swin_v2_t"]


def check_stages(names: list[str]) -> None:
    """C2..C5 of each backbone measured on the meta device (shapes only): strides 4..32 and the known widths."""
    for name in names:
        layout = layout_of(name)
        strides, channels = measure(name, list(layout.stages.values()), layout.channels_last)
        assert strides == [4, 8, 16, 32] and channels == CHANNELS[name], name


def test_the_tiny_and_resnet_family_backbones_have_c2_to_c5_at_strides_4_to_32():
    assert set(backbone_names()) == set(CHANNELS)
    check_stages(TESTED)


@pytest.mark.slow
def test_every_supported_backbone_has_c2_to_c5_at_strides_4_to_32():
    """The large ones too (5 s: building them takes time even on the meta device)."""
    check_stages(backbone_names())


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "swin_t", "swin_v2_t"])
def test_trunk_and_fpn_shapes_on_a_non_square_input(name):
    torch.manual_seed(0)
    backbone = backbone_fpn(name, 32, 5, {"c3": 8, "c4": 16, "c5": 32}, LastLevelP6P7(32, 32))
    assert backbone.body.strides == [8, 16, 32] and backbone.body.channels == CHANNELS[name][1:]
    x = torch.rand(2, 3, 64, 96)
    stages = backbone.body(x)
    assert [tuple(v.shape) for v in stages.values()] == [(2, c, 64 // s, 96 // s)
                                                        for c, s in zip(CHANNELS[name][1:], (8, 16, 32))]
    levels = backbone(x)
    assert list(levels) == ["0", "1", "2", "p6", "p7"]
    assert [tuple(v.shape) for v in levels.values()] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2),
                                                        (2, 32, 1, 1)]


def test_swin_stages_are_permuted_from_channels_last_and_normalised():
    """C3 of Swin-T is torchvision's features[0..3] output ([B, H, W, C]) through the stage's LayerNorm, as NCHW."""
    torch.manual_seed(0)
    body = trunk("swin_t", {"c3": 8}, 5)
    x = torch.rand(1, 3, 64, 32)
    nhwc = torch.nn.Sequential(*(getattr(body, str(i)) for i in range(4)))(x)
    expected = body.output_norms[0](nhwc).permute(0, 3, 1, 2)
    torch.testing.assert_close(body(x)["0"], expected)
    assert expected.shape == (1, 192, 8, 4) and list(body.order) == ["0", "1", "2", "3"]


def test_resnet_backbones_keep_torchvisions_parameter_names():
    """A ResNet FPN backbone has the parameter names (and shapes) of torchvision's BackboneWithFPN, so checkpoints
    written before the builder existed still load."""
    ours = backbone_fpn("resnet18", 32, 5, ALL_STAGES, LastLevelMaxPool())
    body = classification_body("resnet18")
    theirs = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, CHANNELS["resnet18"], 32,
                             extra_blocks=LastLevelMaxPool())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize(("name", "trainable"), [("convnext_tiny", 2), ("swin_t", 0)])
def test_trainable_layers_freeze_the_stem_and_the_first_stages(name, trainable):
    """Groups (stem, stage 1 .. 4): ConvNeXt and Swin stages 2-4 include the downsampling that opens them. (ResNets:
    test_detectors.py::test_builder_honours_fpn_channels_and_trainable_layers.)"""
    body = trunk(name, {"c3": 8, "c4": 16, "c5": 32}, trainable)
    first = {"convnext_tiny": "4", "swin_t": None}[name]
    for param_name, param in body.named_parameters():
        child = param_name.split(".")[0]
        frozen = child != "output_norms" and (first is None or body.order.index(child) < body.order.index(first))
        assert param.requires_grad != frozen, param_name
    assert all(p.requires_grad for p in body.output_norms.parameters())


def test_a_wrong_stage_name_stride_or_backbone_is_refused():
    with pytest.raises(ConfigError, match="model.backbone: convnext_tiny has no stage 'c6'.*c2, c3, c4, c5"):
        trunk("convnext_tiny", {"c5": 32, "c6": 64}, 5)
    with pytest.raises(ConfigError, match="model.backbone: stage c4 of swin_t has stride 16, the detector expects "
                                          "32"):
        trunk("swin_t", {"c3": 8, "c4": 32}, 5)
    with pytest.raises(ConfigError, match="unknown backbone 'vit_b_16'.*convnext_tiny.*swin_v2_t"):
        trunk("vit_b_16", {"c3": 8}, 5)
    with pytest.raises(ConfigError, match="model.trainable_layers"):
        trunk("swin_t", {"c3": 8}, 6)


def test_an_input_that_is_not_a_multiple_of_the_largest_stride_is_refused():
    """ConvNeXt would silently drop border pixels (Swin pads): the detection transform pads to 32, anything else
    must pad too."""
    body = trunk("convnext_tiny", {"c4": 16}, 5)
    assert body(torch.rand(1, 3, 48, 32))["0"].shape == (1, 384, 3, 2)
    with pytest.raises(ValueError, match="multiples of 16"):
        body(torch.rand(1, 3, 40, 32))


# ---------------------------------------------------------------- every family on ConvNeXt-T and Swin-T

# Each family on one of the two backbones in `make test` (about 1 s a case on one core), the other pairs marked
# slow: a family meets the backbone only through the trunk, in one of three ways (FPN on C3-C5: the dense
# families; FPN on C2-C5: the two-stage ones; C3-C5 projections: Deformable DETR), and each way runs with both
# backbones here. Swin-V2-T shares Swin-T's trunk code (its blocks differ inside torchvision only) and is covered
# by the builder tests above.
FAST = {("retinanet", "convnext_tiny"), ("atss", "convnext_tiny"), ("faster_rcnn", "convnext_tiny"),
        ("deformable_detr", "convnext_tiny"), ("fcos", "swin_t"), ("reppoints", "swin_t"), ("mask_rcnn", "swin_t"),
        ("deformable_detr", "swin_t")}
SMALL = dict(fpn_channels=32, score_thresh=0.0, detections_per_img=10, rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20,
             rpn_batch_size_per_image=32, box_batch_size_per_image=32, num_queries=10, encoder_layers=1,
             decoder_layers=1, ffn_channels=64)


@pytest.mark.parametrize(("family", "backbone"), [
    pytest.param(f, b, marks=() if (f, b) in FAST else pytest.mark.slow)
    for f in sorted(FAMILIES) for b in ("convnext_tiny", "swin_t")])
def test_every_family_trains_on_the_backbone(family, backbone):
    """Build, one training step (losses finite, gradient into the trunk's stem), the pyramid of that pass equal to
    extract_features in train mode (so stochastic depth is off), and predictions in the image's pixels."""
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(family=family, backbone=backbone, **SMALL), 3).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 5.0, 50.0, 35.0]]), "labels": torch.tensor([2])}]
    for image, target in zip(images, targets):
        mask = torch.zeros(1, *image.shape[-2:], dtype=torch.uint8)
        mask[0, 8:30, 12:28] = 1
        target["masks"] = mask
    losses, pyramid = detector(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem = next(detector.model.backbone.body.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert pyramid.strides == detector.feature_strides
    assert [tuple(f.shape) for f in pyramid.levels] == [(2, 32, -(-64 // s), -(-64 // s))
                                                        for s in detector.feature_strides]
    for a, b in zip(pyramid.levels, detector.extract_features(images).levels):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for det, image in zip(detector.predict(images), images):
        assert (det["boxes"][:, 2] <= image.shape[-1]).all() and (det["boxes"][:, 3] <= image.shape[-2]).all()
