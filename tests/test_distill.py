"""UniKD stage 1 and stage 2, FitNet and the adaptor, on real (tiny, randomly initialised) detectors."""
from __future__ import annotations

import pytest
import torch

from unikd.config import AKEConfig, DetectorConfig, DistillConfig
from unikd.detectors import build_detector
from unikd.transformer import flatten_levels
from unikd.distill import (AbsorbModel, Adaptor, AKEMismatchError, DistillationModel, FitNet, KnowledgeExtractors,
                           UniKD, build_distiller, foreground_mask, knowledge_distance, load_ake, nearest_levels,
                           save_ake, teacher_fingerprint)

NUM_CLASSES = 3
SIZE = 64
SMALL_AKE = AKEConfig(d_model=32, n_queries=12, n_heads=4, n_points=2, d_ffn=64)


def detector(family: str, channels: int) -> torch.nn.Module:
    cfg = DetectorConfig(family=family, backbone="resnet18", fpn_channels=channels, rpn_pre_nms_top_n=100,
                         rpn_post_nms_top_n=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64)
    return build_detector(cfg, NUM_CLASSES, SIZE)


def batch():
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=gen) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 10.0, 60.0, 28.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 58.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


@pytest.fixture(scope="module")
def pair():
    """A Faster R-CNN teacher (P2–P6, 64 channels) and a RetinaNet student (P3–P7, 32 channels)."""
    torch.manual_seed(0)
    teacher = detector("faster_rcnn", 64).eval()
    student = detector("retinanet", 32)
    akes = KnowledgeExtractors(SMALL_AKE, len(teacher.feature_strides), 64, NUM_CLASSES)
    return teacher, student, akes


def expected_decoder_layer_params(c: int, c_in: int, levels: int, heads: int, points: int, ffn: int) -> int:
    """Parameters of one deformable decoder layer, counted from its parts."""
    self_attention = 3 * c * c + 3 * c + c * c + c
    samples = heads * levels * points
    cross_attention = (c * 2 * samples + 2 * samples) + (c * samples + samples) + (c_in * c + c) + (c * c + c)
    feed_forward = c * ffn + ffn + ffn * c + c
    return self_attention + cross_attention + feed_forward + 3 * 2 * c


def test_ake_parameter_count_at_c256_matches_its_parts():
    cfg = AKEConfig(d_model=256, n_queries=200, n_heads=8, n_points=4, d_ffn=1024, extractor_layers=1)
    akes = KnowledgeExtractors(cfg, n_levels=5, in_channels=256, num_classes=80)
    layer = expected_decoder_layer_params(256, 256, 5, 8, 4, 1024)
    head = (256 * 80 + 80) + 2 * (256 * 256 + 256) + (256 * 4 + 4)
    ct = 200 * 256 + (256 * 2 + 2) + 2 * layer + head
    pos = (4 * 256 + 256) + 2 * layer + head
    assert sum(p.numel() for p in akes.ct.parameters()) == ct
    assert sum(p.numel() for p in akes.pos.parameters()) == pos
    decoders_only = sum(p.numel() for n, p in akes.named_parameters() if ".head." not in n)
    assert 4 * layer <= decoders_only < 4 * layer + 60_000


def test_extractor_depth_and_query_count_are_config_switches():
    cfg = AKEConfig(d_model=32, n_queries=7, n_heads=4, n_points=2, d_ffn=64, extractor_layers=3)
    ake = KnowledgeExtractors(cfg, n_levels=2, in_channels=16, num_classes=NUM_CLASSES).pos
    assert len(ake.extractor) == 3
    features = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    memory, shapes = flatten_levels(features)
    boxes = torch.rand(2, 7, 4) * 0.5 + 0.25
    queries = ake.queries(memory, shapes, boxes)
    z = ake.extract(queries, memory, shapes)
    assert z.shape == (2, 7, 32)
    logits, predicted = ake.predict(z, queries)
    assert logits.shape == (2, 7, NUM_CLASSES) and predicted.shape == (2, 7, 4)
    with pytest.raises(ValueError, match="query boxes"):
        ake.queries(memory, shapes, boxes[:, :5])


def test_knowledge_distance_equals_a_hand_computation():
    z_s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]])
    z_t = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    positive = torch.tensor([[True, False, False]])
    # positives: mse of query 0 = (1 + 4) / 2 = 2.5; negatives: mean of (1 + 1) / 2 = 1 and (4 + 0) / 2 = 2 → 1.5
    assert knowledge_distance(z_s, z_t, positive).item() == pytest.approx(2.5 + 1.5)
    no_positive = torch.zeros(1, 3, dtype=torch.bool)
    assert knowledge_distance(z_s, z_t, no_positive).item() == pytest.approx((2.5 + 1 + 2) / 3)
    batch2 = knowledge_distance(torch.cat([z_s, z_t]), torch.cat([z_t, z_t]), torch.cat([positive, positive]))
    assert batch2.item() == pytest.approx(4.0 / 2)


def test_adaptor_maps_student_levels_to_the_teachers_by_nearest_stride():
    assert nearest_levels([8, 16, 32, 64, 128], [4, 8, 16, 32, 64]) == [0, 0, 1, 2, 3]
    assert nearest_levels([4, 8, 16, 32, 64], [8, 16, 32, 64, 128]) == [1, 2, 3, 4, 4]
    assert nearest_levels([8, 32], [16]) == [0]  # a tie takes the finer level
    student = [torch.randn(2, 32, 64 // s, 64 // s) for s in (8, 16, 32, 64, 128)[:4]] + [torch.randn(2, 32, 1, 1)]
    teacher = [torch.randn(2, 64, 64 // s, 64 // s) * scale for s, scale in zip((4, 8, 16, 32, 64), (1, 5, 50, 200, 9))]
    for layers in (0, 2):
        phi = Adaptor([8, 16, 32, 64, 128], [32] * 5, [4, 8, 16, 32, 64], [64] * 5, layers=layers, n_heads=4)
        out = phi(student, teacher)
        assert [tuple(f.shape) for f in out] == [(2, 64, 8, 8), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2),
                                                 (2, 64, 1, 1)]
        for o, t in zip(out, teacher):  # in the teacher's units, level by level
            assert o.pow(2).mean().sqrt().item() == pytest.approx(t.pow(2).mean().sqrt().item(), rel=1e-3)
    with pytest.raises(ValueError, match="one channel count"):
        Adaptor([8], [32], [8, 16], [64, 128], layers=1)
    teacher_mixed = [torch.randn(2, 64, 8, 8), torch.randn(2, 128, 4, 4)]
    mixed = Adaptor([8], [32], [8, 16], [64, 128], layers=0)(student[:1], teacher_mixed)
    assert [tuple(f.shape) for f in mixed] == [(2, 64, 8, 8), (2, 128, 8, 8)]


def test_foreground_mask_equals_a_per_cell_check():
    targets = [{"boxes": torch.tensor([[3.0, 5.0, 20.0, 11.0], [30.0, 30.0, 31.0, 31.0]])},
               {"boxes": torch.zeros(0, 4)}]
    mask = foreground_mask(targets, (8, 8), 4.0)
    for b, t in enumerate(targets):
        for i in range(8):
            for j in range(8):
                x, y = (j + 0.5) * 4, (i + 0.5) * 4
                inside = any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in t["boxes"].tolist())
                assert mask[b, i, j].item() == float(inside)
    assert mask[0].sum() > 0 and mask[1].sum() == 0


def test_fitnet_loss_is_the_foreground_mse_of_every_level(pair):
    teacher, student, _ = pair
    fitnet = build_distiller("fitnet", DistillConfig(adaptor_layers=0, fitnet_weight=2.0), student, teacher)
    assert isinstance(fitnet, FitNet)
    images, targets = batch()
    with torch.no_grad():
        f_t = teacher.extract_features(images)
        f_s = student.extract_features(images)
        loss = fitnet.loss(f_t, f_s, targets)["loss_fitnet"]
        adapted = fitnet.adaptor(f_s, f_t)
    expected = 0.0
    for t, s in zip(f_t, adapted):
        s = torch.nn.functional.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        cells = foreground_mask(targets, t.shape[-2:], SIZE / t.shape[-2]).bool()
        student_cells = s.permute(0, 2, 3, 1)[cells]  # [n_cells, C]
        teacher_cells = t.permute(0, 2, 3, 1)[cells]
        if len(teacher_cells):
            expected += ((student_cells - teacher_cells).pow(2).sum() / teacher_cells.pow(2).sum()).item()
    assert expected > 0
    assert loss.item() == pytest.approx(2.0 * expected / len(f_t), rel=1e-5)
    with torch.no_grad():
        louder = fitnet.loss([100 * f for f in f_t], f_s, targets)["loss_fitnet"]
    assert louder.item() == pytest.approx(loss.item(), rel=1e-4)  # the same for a teacher 100x louder


def test_stage1_trains_only_the_akes_and_predicts_in_pixels(pair):
    teacher, _, akes = pair
    model = AbsorbModel(teacher, akes)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"akes"}  # the teacher is not registered
    model.train()
    assert not teacher.training
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) == {f"{k}_loss_{t}" for k in ("ct", "pos") for t in ("class", "l1", "giou")}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in akes.named_parameters():
        assert p.grad is not None, name
    assert akes.ct.generator.cross_attn.value_proj.weight.grad.abs().sum() > 0
    model.to(torch.float64)  # the teacher, held outside the registry, follows its owner
    assert next(teacher.parameters()).dtype == torch.float64 and next(akes.parameters()).dtype == torch.float64
    model.to(torch.float32)
    dets = model.predict(images)
    assert len(dets) == 2 and dets[0]["boxes"].shape == (36, 4)  # N queries × K classes = 36 < 100
    assert dets[0]["boxes"].min() >= 0 and dets[0]["boxes"].max() <= SIZE
    assert dets[0]["labels"].max() < NUM_CLASSES
    akes.zero_grad(set_to_none=True)


def test_stage2_gradients_reach_the_student_and_phi_only(pair):
    teacher, student, akes = pair
    distiller = build_distiller("unikd", DistillConfig(), student, teacher, akes)
    model = DistillationModel(student, teacher, distiller)
    model.train()
    assert not teacher.training and not akes.training and student.training
    assert not any(p.requires_grad for p in akes.parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] != "student"} == {"distiller"}
    images, targets = batch()
    losses = model(images, targets)
    assert {"loss_kd_ct", "loss_kd_pos"} <= set(losses)
    losses["loss_kd_ct"].backward(retain_graph=True)
    assert student.model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert student.model.head.classification_head.cls_logits.weight.grad is None  # D does not touch the head
    for name, p in distiller.adaptor.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in akes.parameters())
    student.zero_grad(set_to_none=True)
    distiller.zero_grad(set_to_none=True)


def test_stage2_query_switches_and_zero_lambdas(pair):
    teacher, student, akes = pair
    images, targets = batch()
    with torch.no_grad():
        f_t = teacher.extract_features(images)
        f_s = student.extract_features(images)
    switches = {"content": {"loss_kd_ct"}, "positional": {"loss_kd_pos"}, "both": {"loss_kd_ct", "loss_kd_pos"}}
    for queries, keys in switches.items():
        distiller = UniKD(akes, student.feature_strides, student.feature_channels, teacher.feature_strides,
                          teacher.feature_channels, DistillConfig(queries=queries, adaptor_layers=1))
        assert set(distiller.loss(f_t, f_s, targets)) == keys
    zero = UniKD(akes, student.feature_strides, student.feature_channels, teacher.feature_strides,
                 teacher.feature_channels, DistillConfig(lambda_ct=0.0, lambda_pos=0.0, adaptor_layers=0))
    assert all(v.item() == 0 for v in zero.loss(f_t, f_s, targets).values())
    with pytest.raises(ValueError, match="distill.queries"):
        UniKD(akes, [8], [32], [8], [64], DistillConfig(queries="all"))
    with pytest.raises(ValueError, match="distill.method"):
        build_distiller("kd", DistillConfig(), student, teacher)


def test_ake_file_records_its_teacher_and_refuses_another(pair, tmp_path):
    teacher, _, akes = pair
    cfg = DetectorConfig(family="faster_rcnn", backbone="resnet18", fpn_channels=64)
    fingerprint = teacher_fingerprint(teacher, cfg)
    assert fingerprint["strides"] == [4, 8, 16, 32, 64] and fingerprint["channels"] == [64] * 5
    path = save_ake(tmp_path / "ake.safetensors", akes, fingerprint, NUM_CLASSES, [1, 2, 3])
    loaded, info = load_ake(path, fingerprint)
    assert info["category_ids"] == [1, 2, 3]
    for (name, a), b in zip(akes.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    other = detector("faster_rcnn", 64)  # same architecture, other weights
    with pytest.raises(AKEMismatchError, match="another teacher.*weights_sha256"):
        load_ake(path, teacher_fingerprint(other, cfg))
    retina = detector("retinanet", 64)
    with pytest.raises(AKEMismatchError, match="family"):
        load_ake(path, teacher_fingerprint(retina, DetectorConfig(family="retinanet", fpn_channels=64)))
    not_ake = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, not_ake)
    with pytest.raises(AKEMismatchError, match="not an AKE file"):
        load_ake(not_ake, fingerprint)
