"""Deformable DETR (family ``deformable_detr``): its backbone and transformer, per-image geometry, the Hungarian
loss on every decoder layer, box refinement, post-processing, and distillation in both directions through the
command line. (The adapter contract is in test_detectors.py, the two-image overfit in test_families.py.)"""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torchvision.ops import box_convert

from unikd import cli
from unikd.config import ConfigError, DetectorConfig, load_config, to_dict
from unikd.detectors import build_detector
from unikd.pyramid import Pyramid
from unikd.transformer import (DeformableDecoder, DeformableEncoder, HungarianMatcher, refine_boxes, set_loss,
                               sine_position_embedding, topk_detections)

from conftest import AKE_SET, tiny_config
from test_distill import batch, crop, random_pyramid  # batch: a landscape and a portrait image

NUM_CLASSES = 3
SIZE = 64


def detr(**overrides) -> torch.nn.Module:
    """A small Deformable DETR: R18, d_model 32, 2 encoder and 3 decoder layers, 12 queries."""
    values = dict(family="deformable_detr", backbone="resnet18", fpn_channels=32, num_queries=12, encoder_layers=2,
                  decoder_layers=3, attention_heads=4, attention_points=2, ffn_channels=64, detections_per_img=10)
    return build_detector(DetectorConfig(**{**values, **overrides}), NUM_CLASSES)


def as_trained(model: torch.nn.Module) -> None:
    """Give every deformable attention and box head non-trivial weights, as after training: sampling points then
    depend on the query, and box deltas are not zero."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("sampling_offsets", "attention_weights")):
                module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=gen))
        for head in model.bbox_embed:
            head[-1].weight.copy_(0.1 * torch.randn(head[-1].weight.shape, generator=gen))


def test_backbone_is_c3_to_c5_and_a_stride_64_level_projected_to_d_model_with_groupnorm():
    detector = detr(backbone="resnet50", fpn_channels=64)
    proj = detector.model.backbone.input_proj
    assert [p[0].in_channels for p in proj] == [512, 1024, 2048, 2048]  # C3, C4, C5, and C5 again for the extra
    assert [(p[0].kernel_size, p[0].stride) for p in proj] == [((1, 1), (1, 1))] * 3 + [((3, 3), (2, 2))]
    assert all(p[0].out_channels == 64 and isinstance(p[1], torch.nn.GroupNorm) for p in proj)
    assert detector.feature_strides == [8, 16, 32, 64] and detector.feature_channels == [64] * 4
    levels = detector.model.backbone(torch.rand(1, 3, 96, 128))
    assert [tuple(f.shape) for f in levels] == [(1, 64, 12, 16), (1, 64, 6, 8), (1, 64, 3, 4), (1, 64, 2, 2)]
    model = detector.model
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 3 and model.query_embed.num_embeddings == 12


def test_bad_config_is_refused_naming_the_key():
    for overrides in ({"fpn_channels": 48}, {"fpn_channels": 32, "attention_heads": 3}):
        with pytest.raises(ConfigError, match="model.fpn_channels"):
            detr(**overrides)
    for key in ("num_queries", "encoder_layers", "decoder_layers", "attention_heads", "attention_points",
                "ffn_channels"):
        with pytest.raises(ConfigError, match=f"model.{key}: 0 is out of range"):
            load_config(None, [f"model.{key}=0"])
    detr(anchor_sizes=[8, 16])  # no anchors: their sizes are not checked


def test_the_pyramid_is_the_encoders_output_memory_of_the_one_pass():
    torch.manual_seed(0)
    detector = detr().train()
    model = detector.model
    calls = {"backbone": 0, "encoder": []}
    hooks = [model.backbone.register_forward_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1)),
             model.encoder.register_forward_hook(lambda _m, _i, out: calls["encoder"].append(out))]
    losses, pyramid = detector(*batch())
    for hook in hooks:
        hook.remove()
    assert calls["backbone"] == 1 and len(calls["encoder"]) == 1
    assert pyramid.strides == [8, 16, 32, 64] and pyramid.image_sizes == [(40, 64), (64, 48)]
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in pyramid.levels], dim=1)
    assert torch.equal(tokens, calls["encoder"][0])
    # the decoder read these very maps: every level gets a gradient from the detection loss
    grads = torch.autograd.grad(sum(losses.values()), pyramid.levels)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("box_refine", [False, True])
def test_each_images_memory_predictions_and_loss_equal_those_of_the_image_alone(box_refine):
    """Projected levels of a landscape and a portrait image, the batch padded with loud noise: the encoder's memory
    on each image's cells, every decoder layer's predictions, and the loss equal those of each image alone with
    no padding (the padding masks and valid ratios at work). Without the padding mask the noise leaks in."""
    torch.manual_seed(0)
    model = detr(box_refine=box_refine).model.eval()
    as_trained(model)
    _, targets = batch()
    sizes = [(40, 64), (64, 48)]
    inputs = random_pyramid(sizes, [8, 16, 32, 64], 32, seed=3)
    with torch.no_grad():
        memory = model.encode(inputs)
        predictions = model.decode(memory)
        loss = model.loss(predictions, targets, sizes)
        weighted = {name: 0.0 for name in loss}
        for i in range(2):
            alone = model.encode(crop(inputs, i))
            for f_alone, f_batch in zip(alone.levels, crop(memory, i).levels):
                torch.testing.assert_close(f_alone, f_batch, atol=1e-5, rtol=1e-5)
            alone_predictions = model.decode(alone)
            torch.testing.assert_close(alone_predictions.logits[:, 0], predictions.logits[:, i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone_predictions.boxes[:, 0], predictions.boxes[:, i], atol=1e-5, rtol=1e-5)
            for name, value in model.loss(alone_predictions, targets[i:i + 1], sizes[i:i + 1]).items():
                weighted[name] += value * len(targets[i]["labels"])
        for name, value in loss.items():  # the batch's loss is normalised by all its boxes, 3
            assert value.item() == pytest.approx(weighted[name].item() / 3, rel=1e-4), name

        unmasked = inputs.memory()
        unmasked.padding_mask = None
        leaked = model.encoder(unmasked)
        assert not torch.allclose(leaked, model.encoder(inputs.memory()), atol=1e-3)


def test_every_decoder_layer_has_its_loss_and_layer_0s_equals_the_criterions():
    torch.manual_seed(0)
    detector = detr(decoder_layers=3).train()
    as_trained(detector.model)
    images, targets = batch()
    losses, _ = detector(images, targets)
    names = ("loss_class", "loss_l1", "loss_giou")
    assert set(losses) == {f"{n}{suffix}" for n in names for suffix in ("", "_0", "_1")}

    with torch.no_grad():  # the same pass again (train mode, same batch: the same BatchNorm statistics)
        predictions = detector.model.decode(detector.model.features(images))
    gts = []
    for t, (h, w) in zip(targets, [(40, 64), (64, 48)]):
        gts.append({"labels": t["labels"], "boxes": box_convert(t["boxes"] / torch.tensor([w, h, w, h]), "xyxy",
                                                               "cxcywh")})
    for layer, suffix in [(0, "_0"), (2, "")]:
        logits, boxes = predictions.logits[layer], predictions.boxes[layer]
        indices = HungarianMatcher(2.0, 5.0, 2.0)(logits, boxes, gts)
        expected = set_loss(logits, boxes, gts, indices, num_boxes=3)
        for name in names:
            assert losses[name + suffix].item() == pytest.approx(expected[name].item(), rel=1e-5), name + suffix
    assert losses["loss_l1_0"].item() != pytest.approx(losses["loss_l1"].item(), rel=1e-3)


def test_refine_boxes_by_hand():
    point, box = torch.tensor([0.25, 0.5]), torch.tensor([0.2, 0.3, 0.4, 0.1])
    torch.testing.assert_close(refine_boxes(torch.zeros(4), point), torch.tensor([0.25, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(refine_boxes(torch.zeros(4), box), box)
    delta = torch.tensor([1.0, -1.0, 0.5, 2.0])
    expected = torch.sigmoid(torch.logit(box) + delta)
    torch.testing.assert_close(refine_boxes(delta, box), expected)
    expected = torch.sigmoid(torch.tensor([torch.logit(point[0]) + 1, torch.logit(point[1]) - 1, 0.5, 2.0]))
    torch.testing.assert_close(refine_boxes(delta, point), expected)


@pytest.mark.parametrize("box_refine", [False, True])
def test_box_refinement_moves_the_reference_from_layer_to_layer_only_when_enabled(box_refine):
    torch.manual_seed(0)
    model = detr(box_refine=box_refine, decoder_layers=3).model.eval()
    as_trained(model)
    images, _ = batch()
    predictions = model.decode(model.features(images))
    refs = predictions.references
    points = model.reference_point(model.query_embed.weight[:, :32]).sigmoid().expand(2, -1, -1)
    torch.testing.assert_close(refs[0], points)
    assert len(model.class_embed) == len(model.bbox_embed) == (3 if box_refine else 1)
    if box_refine:  # layer l + 1 reads around the (detached) box layer l predicted
        for layer in (1, 2):
            assert refs[layer].shape == (2, 12, 4) and not refs[layer].requires_grad
            torch.testing.assert_close(refs[layer], predictions.boxes[layer - 1])
        assert not torch.allclose(refs[1], refs[2])
    else:  # every layer reads around the same points, with one shared head
        assert all(ref is refs[0] for ref in refs)
        assert not torch.allclose(predictions.boxes[0], predictions.boxes[2])


def test_topk_detections_by_hand():
    """2 queries × 3 classes, k = 4: the four best (query, class) pairs, a query may come twice; boxes in pixels,
    clipped to the image (h 40, w 64)."""
    logits = torch.tensor([[[2.0, -1.0, 1.0], [0.0, 3.0, -2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.9, 0.2, 0.4, 0.2]]])  # cxcywh
    [det] = topk_detections(logits, boxes, [(40, 64)], k=4)
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 0.0])))
    assert det["labels"].tolist() == [1, 0, 2, 0] and det["labels"].dtype == torch.int64
    first = torch.tensor([0.7 * 64, 0.1 * 40, 64, 0.3 * 40])  # x1 = 1.1 * 64 clipped to 64
    middle = torch.tensor([0.25 * 64, 0.25 * 40, 0.75 * 64, 0.75 * 40])
    torch.testing.assert_close(det["boxes"], torch.stack([first, middle, middle, first]))
    assert len(topk_detections(logits, boxes, [(40, 64)], k=100)[0]["scores"]) == 6


def test_predict_gives_the_top_k_of_the_last_layer_in_each_images_pixels():
    torch.manual_seed(0)
    detector = detr().train()
    images, _ = batch()
    detections = detector.predict(images)
    assert detector.training
    detector.eval()
    predictions = detector.model.decode(detector.model.features(images))
    expected = topk_detections(predictions.logits[-1], predictions.boxes[-1], [(40, 64), (64, 48)], k=10)
    for det, exp in zip(detections, expected):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(det[key], exp[key])


# --------------------------------------------------------------------------- distillation in both directions

DETR_SET = {"family": "deformable_detr", "fpn_channels": 32, "num_queries": 10, "encoder_layers": 1,
            "decoder_layers": 2, "attention_heads": 4, "attention_points": 2, "ffn_channels": 64}


def write_config(path, root, model: dict) -> str:
    values = to_dict(tiny_config(root, "retinanet", max_iters=1))
    values["model"].update(model)
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize(("teacher", "student"), [("deformable_detr", "retinanet"), ("retinanet", "deformable_detr")])
def test_distill_between_deformable_detr_and_retinanet_both_ways(teacher, student, tiny_digits, tmp_path):
    """Teacher training, stage 1 and stage 2 (UniKD and FitNet), one iteration each, through the command line."""
    family = {"deformable_detr": DETR_SET, "retinanet": {"family": "retinanet"}}
    teacher_yaml = write_config(tmp_path / "teacher.yaml", tiny_digits, family[teacher])
    student_yaml = write_config(tmp_path / "student.yaml", tiny_digits, family[student])
    assert cli.main(["train", teacher_yaml, "--out", str(tmp_path / "teacher")]) == 0
    ckpt = str(tmp_path / "teacher" / "last.pt")
    assert cli.main(["pretrain-ake", student_yaml, "--teacher", ckpt, "--out", str(tmp_path / "ake"), *AKE_SET]) == 0
    for method, key in (("unikd", "loss_kd_ct"), ("fitnet", "loss_fitnet")):
        out = tmp_path / method
        assert cli.main(["distill", student_yaml, "--teacher", ckpt, "--ake", str(tmp_path / "ake" / "ake.safetensors"),
                         "--method", method, "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert metrics[key] > 0 and all(v == v for v in metrics.values() if isinstance(v, float))
        assert ("loss_giou_0" in metrics) == (student == "deformable_detr")


def two_image_memory(channels: int = 8):
    """A 2-level memory of a landscape and a smaller portrait image (padding, valid ratios below 1)."""
    torch.manual_seed(3)
    levels = [torch.randn(2, channels, 4, 6), torch.randn(2, channels, 2, 3)]
    return Pyramid(levels, [8, 16], [(32, 48), (30, 20)]).memory()


def test_encoder_stack_is_its_layers_with_sine_plus_level_positions_by_hand():
    encoder = DeformableEncoder(d_model=8, n_levels=2, n_heads=2, n_points=2, d_ffn=16, layers=2, dropout=0.3)
    assert [m.p for m in encoder.modules() if isinstance(m, torch.nn.Dropout)] == [0.3] * 6
    encoder.eval()
    memory = two_image_memory()
    with torch.no_grad():
        for layer in encoder.layers:  # let the position steer the sampling (zero at init)
            layer.self_attn.sampling_offsets.weight.normal_(std=0.3)
    pos = sine_position_embedding(memory.spatial_shapes, 8, valid_ratios=memory.valid_ratios)
    pos = pos + torch.cat([encoder.level_embed[0].expand(24, 8), encoder.level_embed[1].expand(6, 8)])
    tokens = memory.tokens
    for layer in encoder.layers:
        tokens = layer(tokens, pos, memory.spatial_shapes, memory.padding_mask, memory.valid_ratios)
    torch.testing.assert_close(encoder(memory), tokens)


def test_decoder_stack_is_its_layers_with_the_query_positions_by_hand():
    decoder = DeformableDecoder(d_model=8, n_levels=2, n_heads=2, n_points=2, d_ffn=16, layers=2, dropout=0.3)
    assert [m.p for m in decoder.modules() if isinstance(m, torch.nn.Dropout)] == [0.3] * 6
    assert [layer.self_attn.dropout for layer in decoder.layers] == [0.3, 0.3]
    decoder.eval()
    memory = two_image_memory()
    tgt, query_pos, reference = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.rand(2, 5, 2)
    expected, x = [], tgt
    for layer in decoder.layers:
        x = layer(x, query_pos, memory.level_reference(reference), memory.tokens, memory.spatial_shapes,
                  memory.padding_mask)
        expected.append(x)
    hs, references = decoder(tgt, query_pos, reference, memory)
    torch.testing.assert_close(hs, torch.stack(expected))
    assert all(ref is reference for ref in references)


def test_refine_boxes_keeps_references_on_the_image_edges_finite():
    """A reference at exactly 0 or 1 reads as 1e-5 or 1 - 1e-5 (logit of 0 or 1 is infinite)."""
    edges = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([1e-5, 1 - 1e-5, 1e-5, 1 - 1e-5], dtype=torch.float64)
    torch.testing.assert_close(refine_boxes(torch.zeros(4, dtype=torch.float64), edges), expected, rtol=0, atol=1e-12)


def test_topk_detections_clip_boxes_at_the_left_and_top_edges():
    logits, boxes = torch.tensor([[[1.0]]]), torch.tensor([[[0.1, 0.05, 0.4, 0.3]]])  # x1 = -0.1, y1 = -0.1
    [det] = topk_detections(logits, boxes, [(40, 64)], k=1)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 0.3 * 64, 0.2 * 40]]))
