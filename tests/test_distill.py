"""UniKD stage 1 and stage 2, FitNet and the adaptor: tests that pin the method (issue "Trustworthy method core").

Real (tiny, randomly initialised) detectors and AKEs; expected values from independent computations.
"""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from unikd.config import AKEConfig, DetectorConfig, DistillConfig
from unikd.detectors import build_detector
from unikd.distill import (METHODS, AbsorbModel, Adaptor, AKEMismatchError, DistillationModel, Distiller, FitNet,
                           KnowledgeExtractors, Levels, UniKD, build_distiller, foreground_mask, knowledge_distance,
                           load_ake, nearest_levels, register_method, resample_level, save_ake, teacher_fingerprint)
from unikd.distill.common import B_HAT, known_assignment, normalise_targets, query_boxes
from unikd.pyramid import Pyramid
from unikd.transformer import HungarianMatcher, Memory, sine_position_embedding

NUM_CLASSES = 3
SIZE = 64
SMALL_AKE = AKEConfig(d_model=32, n_queries=12, n_heads=4, n_points=2, d_ffn=64)
SMALL_DISTILL = dict(adaptor_heads=4, adaptor_points=2)
TEACHER_STRIDES, STUDENT_STRIDES = [4, 8, 16, 32, 64], [8, 16, 32, 64, 128]


def detector(family: str, channels: int) -> torch.nn.Module:
    cfg = DetectorConfig(family=family, backbone="resnet18", fpn_channels=channels, rpn_pre_nms_top_n=100,
                         rpn_post_nms_top_n=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64)
    return build_detector(cfg, NUM_CLASSES)


def batch():
    """Two images of different aspect ratios (40×64 and 64×48, h×w) and their targets in pixels."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, SIZE, generator=gen), torch.rand(3, SIZE, 48, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 38.0], [34.0, 10.0, 60.0, 28.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 44.0, 58.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


@pytest.fixture(scope="module")
def pair():
    """A Faster R-CNN teacher (P2–P6, 64 channels), a RetinaNet student (P3–P7, 32 channels), and AKEs for the
    teacher whose stored teacher scale is not 1 (so a side that forgets it is caught)."""
    torch.manual_seed(0)
    teacher = detector("faster_rcnn", 64).eval()
    student = detector("retinanet", 32)
    akes = KnowledgeExtractors(SMALL_AKE, len(teacher.feature_strides), 64, NUM_CLASSES)
    akes.teacher_rms.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]))
    return teacher, student, akes


def unikd(pair, **cfg) -> UniKD:
    teacher, student, akes = pair
    return build_distiller("unikd", DistillConfig(**{**SMALL_DISTILL, **cfg}), student, teacher, akes=akes)


def fitnet(pair, teacher_rms=(0.5, 1.0, 2.0, 3.0, 4.0), **cfg) -> FitNet:
    teacher, student, _ = pair
    return build_distiller("fitnet", DistillConfig(**{**SMALL_DISTILL, **cfg}), student, teacher,
                           teacher_rms=torch.tensor(teacher_rms))


def random_pyramid(sizes: list[tuple[int, int]], strides: list[int], channels: int, seed: int) -> Pyramid:
    """Random features on each image's cells, the batch padded to the largest height and width and the padding
    filled with loud noise (every consumer must ignore it)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    levels = []
    for s in strides:
        level = 100 * torch.randn(len(sizes), channels, math.ceil(height / s), math.ceil(width / s), generator=gen)
        for b, (h, w) in enumerate(sizes):
            level[b, :, :math.ceil(h / s), :math.ceil(w / s)] = torch.randn(channels, math.ceil(h / s),
                                                                            math.ceil(w / s), generator=gen)
        levels.append(level)
    return Pyramid(levels, strides, sizes)


def crop(pyramid: Pyramid, index: int) -> Pyramid:
    """Image ``index`` alone, with no padding at all."""
    cells = pyramid.valid_cells()[index]
    levels = [f[index:index + 1, :, :h, :w] for f, (h, w) in zip(pyramid.levels, cells)]
    return Pyramid(levels, pyramid.strides, [pyramid.image_sizes[index]])


# --------------------------------------------------------------------------- per-image geometry (item 1)
def test_each_images_knowledge_and_losses_equal_those_of_the_image_alone(pair):
    """A batch of a landscape and a portrait image, padded with noise: each image's queries, z_T, positives, D and
    FitNet loss equal those computed for the image alone with no padding."""
    teacher_model, student_model, akes = pair
    _, targets = batch()
    sizes = [(40, 64), (64, 48)]
    teacher = random_pyramid(sizes, TEACHER_STRIDES, 64, seed=1)
    student = random_pyramid(sizes, STUDENT_STRIDES, 32, seed=2)
    distiller, baseline = unikd(pair, adaptor_layers=1), fitnet(pair)
    with torch.no_grad():  # as after training: φ's queries (and so its position embedding) steer its sampling
        for layer in [*distiller.adaptor.layers, *baseline.adaptor.layers]:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.05)
            layer.self_attn.attention_weights.weight.normal_(std=0.5)
    torch.manual_seed(0)
    knowledge = distiller.teacher_knowledge(teacher, targets)
    d_batch = distiller.distances(knowledge, distiller.adaptor(student))
    fit_batch = baseline.per_image_losses(teacher, student, targets)["loss_fitnet"]
    for i in range(2):
        t_alone, s_alone = crop(teacher, i), crop(student, i)
        b_hat = (knowledge["pos"].queries.reference[i:i + 1], torch.where(knowledge["pos"].positive[i:i + 1],
                                                                          0, -1))
        alone = distiller.teacher_knowledge(t_alone, targets[i:i + 1], b_hat=b_hat)
        for kind in ("ct", "pos"):
            torch.testing.assert_close(alone[kind].queries.q[0], knowledge[kind].queries.q[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone[kind].queries.reference[0], knowledge[kind].queries.reference[i])
            torch.testing.assert_close(alone[kind].z[0], knowledge[kind].z[i], atol=1e-5, rtol=1e-5)
            assert torch.equal(alone[kind].positive[0], knowledge[kind].positive[i])
        d_alone = distiller.distances(alone, distiller.adaptor(s_alone))
        for name, value in d_alone.items():
            assert value.item() == pytest.approx(d_batch[name][i].item(), rel=1e-4)
        fit_alone = baseline.per_image_losses(t_alone, s_alone, targets[i:i + 1])["loss_fitnet"]
        assert fit_alone.item() == pytest.approx(fit_batch[i].item(), rel=1e-4)
    assert knowledge["ct"].positive.sum(1).tolist() == [2, 1]


def test_targets_are_normalised_by_each_images_own_size():
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 38.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[8.0, 16.0, 24.0, 48.0]]), "labels": torch.tensor([1])}]
    gts = normalise_targets(targets, [(40, 64), (64, 32)])  # (h, w)
    torch.testing.assert_close(gts[0]["boxes_xyxy"], torch.tensor([[4 / 64, 6 / 40, 30 / 64, 38 / 40]]))
    torch.testing.assert_close(gts[1]["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5]]))  # cxcywh
    assert torch.equal(gts[1]["labels"], targets[1]["labels"])
    # a box reaching past the image (an augmentation's crop) is clipped to it
    over = normalise_targets([{"boxes": torch.tensor([[-8.0, 10.0, 80.0, 50.0]]), "labels": torch.tensor([2])}],
                             [(40, 64)])
    torch.testing.assert_close(over[0]["boxes_xyxy"], torch.tensor([[0.0, 0.25, 1.0, 1.0]]))
    # one image alone: B̂ and its ground-truth indices for it
    boxes, gt_index = query_boxes(gts[:1], 6, 0.9, 0.05)
    assert boxes.shape == (1, 6, 4) and gt_index.shape == (1, 6) and set(gt_index.tolist()[0]) <= {-1, 0}


def test_query_boxes_come_from_the_generator_given_and_leave_the_global_rng_alone():
    """With a generator (the knowledge store's seeded draws), B̂ is that generator's draw: the same seed gives the
    same boxes, another seed others, and the global RNG is neither read nor advanced."""
    gts = normalise_targets([{"boxes": torch.tensor([[4.0, 6.0, 30.0, 38.0], [40.0, 2.0, 60.0, 20.0]]),
                              "labels": torch.tensor([0, 1])}], [(40, 64)])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = query_boxes(gts, 8, 0.6, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1)
    again = query_boxes(gts, 8, 0.6, 0.4, torch.Generator().manual_seed(5))
    other = query_boxes(gts, 8, 0.6, 0.4, torch.Generator().manual_seed(6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def with_loaders_b_hat(targets: list[dict], sizes: list[tuple[int, int]], n: int, seed: int) -> list[dict]:
    """``targets`` carrying a ``B̂`` of ``n`` boxes per image as the data loader puts it there (B_HAT keys, each
    image's from its own generator)."""
    out = []
    for i, (t, size) in enumerate(zip(targets, sizes)):
        boxes, gt_index = query_boxes(normalise_targets([t], [size]), n, 0.6, 0.4,
                                      torch.Generator().manual_seed(seed + i))
        out.append({**t, B_HAT[0]: boxes[0], B_HAT[1]: gt_index[0]})
    return out


def test_a_b_hat_the_loader_drew_is_used_as_it_is_in_both_stages_and_the_global_rng_is_not_read(pair):
    """Targets that carry ``B̂`` (the data loader's, :mod:`unikd.knowledge.seeded_boxes`) give the positional
    queries exactly those boxes and positives, in stage 2 and stage 1, whatever the global RNG; targets without
    it draw from the global RNG (so the losses move with it); a ``B̂`` of another size than the AKE's N is refused."""
    teacher, student, _ = pair
    images, targets = batch()
    sizes = [tuple(im.shape[-2:]) for im in images]
    drawn = with_loaders_b_hat(targets, sizes, SMALL_AKE.n_queries, seed=3)
    distiller = unikd(pair)
    with torch.no_grad():
        pyramid, student_pyramid = teacher.extract_features(images), student.extract_features(images)
    knowledge = distiller.teacher_knowledge(pyramid, drawn)["pos"]
    torch.testing.assert_close(knowledge.queries.reference, torch.stack([t[B_HAT[0]] for t in drawn]))
    assert torch.equal(knowledge.positive, torch.stack([t[B_HAT[1]] for t in drawn]) >= 0)

    def stage2(targets, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return distiller.loss(pyramid, student_pyramid, targets)["loss_kd_pos"]

    fresh = KnowledgeExtractors(SMALL_AKE, len(teacher.feature_strides), 64, NUM_CLASSES)

    def stage1(targets, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses = AbsorbModel(teacher, fresh).train()(images, targets)
        return torch.stack([v for k, v in losses.items() if k.startswith("pos_")])

    for losses in (stage2, stage1):
        assert torch.equal(losses(drawn, 0), losses(drawn, 1)), losses.__name__
        assert not torch.equal(losses(targets, 0), losses(targets, 1)), losses.__name__
    with pytest.raises(ValueError, match="the data loader drew 5 query boxes per image; the AKE has 12 queries"):
        distiller.teacher_knowledge(pyramid, with_loaders_b_hat(targets, sizes, 5, seed=3))


def test_query_boxes_lie_in_the_images_own_region_at_the_configured_alpha_and_beta(pair):
    """B̂ is drawn in normalised image coordinates (inside the image, never in the padding), and the α and β of
    the AKE config reach the sampler."""
    teacher_model, _, akes = pair
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=1)
    for alpha, beta in ((0.9, 0.05), (0.6, 0.4)):
        akes.cfg.alpha, akes.cfg.beta = alpha, beta
        try:
            torch.manual_seed(0)
            pos = unikd(pair, queries="positional").teacher_knowledge(teacher, targets)["pos"]
        finally:
            akes.cfg.alpha, akes.cfg.beta = 0.6, 0.4
        boxes = box_convert(pos.queries.reference, "cxcywh", "xyxy")
        assert boxes.min() >= 0 and boxes.max() <= 1
        for i, gt in enumerate(normalise_targets(targets, teacher.image_sizes)):
            iou = box_iou(boxes[i], gt["boxes_xyxy"])  # [N, M]
            m = len(gt["labels"])
            assert pos.positive[i].tolist() == [True] * m + [False] * (SMALL_AKE.n_queries - m)
            assert (iou[torch.arange(m), torch.arange(m)] > alpha).all()  # jittered copies of their own gt
            assert (iou[m:].amax(1) < beta).all()


# --------------------------------------------------------------------------- the method (item 3)
def test_d_is_zero_when_phi_reproduces_the_teacher_and_grows_with_the_difference(pair):
    _, _, akes = pair
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=3)
    distiller = unikd(pair)
    torch.manual_seed(0)
    knowledge = distiller.teacher_knowledge(teacher, targets)
    same = distiller.distances(knowledge, teacher.scaled(akes.teacher_rms))  # φ(F_S) = F_T in the AKEs' units
    assert all(torch.equal(v, torch.zeros(2)) for v in same.values())
    raw = distiller.distances(knowledge, teacher)  # the teacher without its scale is another pyramid
    assert all((v > 0).all() for v in raw.values())
    nudged = teacher.scaled(akes.teacher_rms)
    nudged = nudged.with_levels([f + 0.1 * torch.randn_like(f) for f in nudged.levels])
    small = distiller.distances(knowledge, nudged)
    assert all((0 < small[k]).all() and (small[k] < raw[k]).all() for k in small)


def test_queries_come_from_the_teacher_and_z_s_from_phi_of_the_student(pair):
    """The loss equals D computed by hand from the teacher's queries and φ(F_S); changing F_S changes z_S and the
    loss, never the queries or z_T."""
    _, _, akes = pair
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=4)
    distiller = unikd(pair, lambda_ct=1.0, lambda_pos=1.0)
    losses = {}
    for seed in (5, 6):
        student = random_pyramid([(40, 64), (64, 48)], STUDENT_STRIDES, 32, seed=seed)
        torch.manual_seed(0)
        knowledge = distiller.teacher_knowledge(teacher, targets)
        torch.manual_seed(0)
        losses[seed] = distiller.per_image_losses(teacher, student, targets)
        memory_s = distiller.adaptor(student).memory()
        memory_t = akes.teacher_memory(teacher)
        for kind in ("ct", "pos"):
            ake = getattr(akes, kind)
            queries = knowledge[kind].queries
            expected_queries = ake.queries(memory_t, None if kind == "ct" else queries.reference)
            torch.testing.assert_close(queries.q, expected_queries.q)
            torch.testing.assert_close(knowledge[kind].z, ake.extract(queries, memory_t))
            z_s = ake.extract(queries, memory_s)
            expected = knowledge_distance(z_s, knowledge[kind].z, knowledge[kind].positive)
            torch.testing.assert_close(losses[seed][f"loss_kd_{kind}"], expected)
    for kind in ("ct", "pos"):
        assert not torch.allclose(losses[5][f"loss_kd_{kind}"], losses[6][f"loss_kd_{kind}"])


def test_content_positives_are_the_hungarian_matches_of_the_frozen_head(pair):
    _, _, akes = pair
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=7)
    knowledge = unikd(pair, queries="content").teacher_knowledge(teacher, targets)["ct"]
    memory = akes.teacher_memory(teacher)
    queries = akes.ct.queries(memory)
    logits, boxes = akes.ct.predict(akes.ct.extract(queries, memory), queries)
    matches = HungarianMatcher()(logits, boxes, normalise_targets(targets, teacher.image_sizes))
    for i, (query, _) in enumerate(matches):
        assert torch.nonzero(knowledge.positive[i]).flatten().tolist() == sorted(query.tolist())
    assert knowledge.positive.sum().item() == 3


def test_lambda1_weights_the_content_term_and_lambda2_the_positional_one(pair):
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=8)
    student = random_pyramid([(40, 64), (64, 48)], STUDENT_STRIDES, 32, seed=9)
    distiller = unikd(pair, lambda_ct=1.0, lambda_pos=1.0)
    torch.manual_seed(1)
    unit = distiller.distances(distiller.teacher_knowledge(teacher, targets), distiller.adaptor(student))
    distiller.cfg.lambda_ct, distiller.cfg.lambda_pos = 3.0, 0.5
    torch.manual_seed(1)
    weighted = distiller.per_image_losses(teacher, student, targets)
    torch.testing.assert_close(weighted["loss_kd_ct"], 3.0 * unit["loss_kd_ct"])
    torch.testing.assert_close(weighted["loss_kd_pos"], 0.5 * unit["loss_kd_pos"])
    assert unit["loss_kd_ct"].ne(unit["loss_kd_pos"]).all()
    assert set(distiller.loss(teacher, student, targets)) == {"loss_kd_ct", "loss_kd_pos"}


def test_query_switches_select_the_terms(pair):
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=8)
    student = random_pyramid([(40, 64), (64, 48)], STUDENT_STRIDES, 32, seed=9)
    for queries, keys in {"content": {"loss_kd_ct"}, "positional": {"loss_kd_pos"}}.items():
        assert set(unikd(pair, queries=queries).loss(teacher, student, targets)) == keys
    with pytest.raises(ValueError, match=r"^distill\.queries: unknown value 'all' \(choose both, content, "
                                         r"positional\)$"):
        unikd(pair, queries="all")
    teacher, student, _ = pair
    levels = (Levels(student.feature_strides, student.feature_channels),
              Levels(teacher.feature_strides, teacher.feature_channels))
    with pytest.raises(ValueError, match="^UniKD needs the stage-1 AKEs$"):
        UniKD(*levels, DistillConfig(**SMALL_DISTILL), torch.ones(5))
    with pytest.raises(ValueError, match="^teacher_rms has 4 levels, the teacher 5$"):
        FitNet(*levels, DistillConfig(**SMALL_DISTILL), torch.ones(4))


def test_known_assignment_matches_each_positional_query_to_its_ground_truth():
    pairs = known_assignment(torch.tensor([[0, -1, 2, 0], [-1, -1, -1, -1]]))
    assert [q.tolist() for q, _ in pairs] == [[0, 2, 3], []]
    assert [g.tolist() for _, g in pairs] == [[0, 2, 0], []]


def test_knowledge_distance_equals_a_hand_computation():
    z_s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]])
    z_t = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    positive = torch.tensor([[True, False, False]])
    # positives: mse of query 0 = (1 + 4) / 2 = 2.5; negatives: mean of (1 + 1) / 2 = 1 and (4 + 0) / 2 = 2 → 1.5
    assert knowledge_distance(z_s, z_t, positive).tolist() == pytest.approx([2.5 + 1.5])
    no_positive = torch.zeros(1, 3, dtype=torch.bool)
    assert knowledge_distance(z_s, z_t, no_positive).tolist() == pytest.approx([(2.5 + 1 + 2) / 3])
    all_positive = torch.ones(1, 3, dtype=torch.bool)
    assert knowledge_distance(z_s, z_t, all_positive).tolist() == pytest.approx([(2.5 + 1 + 2) / 3])
    one_each = knowledge_distance(z_s[:, :2], z_t[:, :2], positive[:, :2])  # one positive, one negative
    assert one_each.tolist() == pytest.approx([2.5 + 1.0])
    two = knowledge_distance(torch.cat([z_s, z_t]), torch.cat([z_t, z_t]), torch.cat([positive, positive]))
    assert two.tolist() == pytest.approx([4.0, 0.0])  # one value per image


def test_stage2_gradients_are_nonzero_where_they_flow_and_exactly_zero_elsewhere(pair):
    teacher, student, akes = pair
    distiller = unikd(pair)
    model = DistillationModel(student, teacher, distiller)
    model.train()
    assert not teacher.training and not akes.training and student.training
    distiller.eval()
    distiller.train()  # the default mode trains φ; the AKEs stay in eval mode
    assert distiller.adaptor.training and not akes.training
    assert not any(p.requires_grad for p in akes.parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] != "student"} == {"distiller"}
    with torch.no_grad():  # as after some training: the queries steer φ's sampling (zero at init)
        for layer in distiller.adaptor.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.01)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    images, targets = batch()
    _, features = student(images, targets)
    with torch.no_grad():
        teacher_features = teacher.extract_features(images)
    for kind in ("ct", "pos"):
        student.zero_grad(set_to_none=True)
        distiller.zero_grad(set_to_none=True)
        loss = distiller.loss(teacher_features, features, targets)[f"loss_kd_{kind}"]
        grads = torch.autograd.grad(loss, features.levels, retain_graph=True, allow_unused=True)
        for level, (g, padded) in enumerate(zip(grads, features.padding_masks())):
            if g is None:  # a student level no teacher level maps to
                assert level not in distiller.adaptor.source
                continue
            assert torch.equal(g.permute(0, 2, 3, 1)[padded], torch.zeros_like(g.permute(0, 2, 3, 1)[padded]))
            assert g.permute(0, 2, 3, 1)[~padded].abs().sum() > 0
        loss.backward(retain_graph=True)
        assert student.model.backbone.body.conv1.weight.grad.abs().sum() > 0
        assert student.model.head.classification_head.cls_logits.weight.grad is None  # D does not touch the head
        for name, p in distiller.adaptor.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is None for p in akes.parameters())
    student.zero_grad(set_to_none=True)
    distiller.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- FitNet, the adaptor, the registry
def test_fitnet_is_the_foreground_mse_of_every_level_in_teacher_units(pair):
    _, targets = batch()
    teacher = random_pyramid([(40, 64), (64, 48)], TEACHER_STRIDES, 64, seed=10)
    student = random_pyramid([(40, 64), (64, 48)], STUDENT_STRIDES, 32, seed=11)
    rms = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    baseline = fitnet(pair, teacher_rms=tuple(rms.tolist()), fitnet_weight=2.0)
    assert len(baseline.adaptor.layers) == 1  # the paper's FitNet adaptor: one self-attention layer
    loss = baseline.per_image_losses(teacher, student, targets)["loss_fitnet"]
    with torch.no_grad():
        adapted = baseline.adaptor(student)
    for i, target in enumerate(targets):
        expected = 0.0
        for level, (f_t, f_s) in enumerate(zip(teacher.levels, adapted.levels)):
            stride_t, stride_s = teacher.strides[level], adapted.strides[level]
            errors = []
            for r in range(f_t.shape[-2]):
                for c in range(f_t.shape[-1]):
                    x, y = (c + 0.5) * stride_t, (r + 0.5) * stride_t
                    if not any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in target["boxes"].tolist()):
                        continue
                    # the student cell under that pixel, bilinearly (strides here are powers of two)
                    u, v = x / stride_s - 0.5, y / stride_s - 0.5
                    value = torch.zeros(f_s.shape[1])
                    fv, fu = math.floor(v), math.floor(u)
                    for rr, wy in ((fv, 1 - (v - fv)), (fv + 1, v - fv)):
                        for cc, wx in ((fu, 1 - (u - fu)), (fu + 1, u - fu)):
                            inside = 0 <= rr < math.ceil(student.image_sizes[i][0] / stride_s) and \
                                0 <= cc < math.ceil(student.image_sizes[i][1] / stride_s)
                            if inside and wx * wy:
                                value += wx * wy * f_s[i, :, rr, cc]
                    errors.append((value - f_t[i, :, r, c] / rms[level]).pow(2).mean().item())
            expected += sum(errors) / len(errors) if errors else 0.0
        assert loss[i].item() == pytest.approx(2.0 * expected, rel=1e-4)
    assert loss.shape == (2,) and (loss > 0).all()


def test_foreground_mask_uses_the_levels_real_stride():
    targets = [{"boxes": torch.tensor([[3.0, 5.0, 20.0, 11.0], [30.0, 30.0, 31.0, 31.0]])},
               {"boxes": torch.zeros(0, 4)}]
    mask = foreground_mask(targets, (3, 3), 16)  # a coarse level: cell centres at 8, 24, 40
    assert mask.dtype == torch.bool
    for b, t in enumerate(targets):
        for i in range(3):
            for j in range(3):
                x, y = (j + 0.5) * 16, (i + 0.5) * 16
                inside = any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in t["boxes"].tolist())
                assert mask[b, i, j].item() == inside
    assert mask[0].sum() == 1 and mask[1].sum() == 0


def test_resample_level_reads_the_same_pixels():
    source = (4 * torch.arange(4.0)[:, None] + torch.arange(4.0)).view(1, 1, 4, 4)  # value 4 r + c at cell (r, c)
    assert resample_level(source, 8, (4, 4), 8) is source
    # A finer level (stride 4): cell (r, c) has its centre at pixel 4 c + 2, i.e. at source cell (4 c + 2) / 8 - 0.5;
    # bilinear reading of a linear map is exact inside the source.
    fine = resample_level(source, 8, (8, 8), 4)
    centre = (torch.arange(8.0) * 4 + 2) / 8 - 0.5
    expected = 4 * centre[:, None] + centre[None, :]
    torch.testing.assert_close(fine[0, 0, 1:7, 1:7], expected[1:7, 1:7])
    torch.testing.assert_close(resample_level(source, 8, (3, 3), 8), source[..., :3, :3])  # same stride, smaller
    same_size = resample_level(source, 8, (4, 4), 16)  # stride 16 centres at pixels 8, 24, 40, 56: cells 0.5, ...
    torch.testing.assert_close(same_size[0, 0, :2, :2], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    coarse = resample_level(source, 8, (2, 2), 16)  # stride 16 centres at pixels 8 and 24: source cells 0.5, 2.5
    torch.testing.assert_close(coarse[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_fitnet_helpers_keep_the_inputs_device_and_dtype():
    # On the meta device a tensor made on the CPU inside raises; float64 features stay float64 (grid_sample
    # refuses a grid of another dtype).
    targets = [{"boxes": torch.zeros(2, 4, device="meta")}, {"boxes": torch.zeros(0, 4, device="meta")}]
    mask = foreground_mask(targets, (3, 5), 8)
    assert mask.device.type == "meta" and mask.shape == (2, 3, 5) and mask.dtype == torch.bool
    resampled = resample_level(torch.zeros(2, 4, 6, 6, device="meta"), 8, (3, 3), 16)
    assert resampled.device.type == "meta" and resampled.shape == (2, 4, 3, 3)
    source = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    fine = resample_level(source, 8, (8, 8), 4)
    assert fine.dtype == torch.float64
    torch.testing.assert_close(fine.float(), resample_level(source.float(), 8, (8, 8), 4))


def test_adaptor_maps_levels_by_nearest_stride_and_ends_in_an_affine_norm():
    assert nearest_levels([8, 16, 32, 64, 128], [4, 8, 16, 32, 64]) == [0, 0, 1, 2, 3]
    assert nearest_levels([4, 8, 16, 32, 64], [8, 16, 32, 64, 128]) == [1, 2, 3, 4, 4]
    assert nearest_levels([8, 32], [16]) == [0]  # a tie takes the finer level
    student = random_pyramid([(64, 64), (64, 40)], STUDENT_STRIDES, 32, seed=12)
    for layers in (0, 2):
        phi = Adaptor(STUDENT_STRIDES, [32] * 5, TEACHER_STRIDES, [64] * 5, layers=layers, n_heads=6, n_points=4)
        assert all(layer.self_attn.n_heads == 2 for layer in phi.layers)  # gcd(6, 64): heads that divide C
        out = phi(student)
        assert [tuple(f.shape) for f in out.levels] == [(2, 64, 8, 8), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2),
                                                        (2, 64, 1, 1)]
        assert out.strides == [8, 8, 16, 32, 64] and out.image_sizes == student.image_sizes
        for level in out.levels:  # layer norm at init: every cell has channel mean 0 and variance 1
            torch.testing.assert_close(level.mean(1), torch.zeros_like(level[:, 0]), atol=1e-5, rtol=0)
            torch.testing.assert_close(level.var(1, unbiased=False), torch.ones_like(level[:, 0]), atol=1e-3, rtol=0)
        with torch.no_grad():
            phi.norms[2].weight.fill_(3.0)
            phi.norms[2].bias.fill_(1.0)
        torch.testing.assert_close(phi(student).levels[2], 3 * out.levels[2] + 1, atol=1e-5, rtol=1e-5)
        assert all(layer.ffn.ffn[0].out_features == 4 * 64 for layer in phi.layers)  # FFN width 4 C, as the AKEs'
        assert (phi.level_embed is None) == (layers == 0)
    with pytest.raises(ValueError, match="one channel count"):
        Adaptor([8], [32], [8, 16], [64, 128], layers=1, n_heads=8, n_points=4)
    for layers in (0, 1):  # one teacher level
        single = Adaptor([8], [32], [8], [64], layers=layers, n_heads=8, n_points=4)
        assert single(Pyramid(student.levels[:1], [8], student.image_sizes)).levels[0].shape == (2, 64, 8, 8)
    mixed = Adaptor([8], [32], [8, 16], [64, 128], layers=0, n_heads=8, n_points=4)
    mixed = mixed(Pyramid(student.levels[:1], [8], student.image_sizes))
    assert [tuple(f.shape) for f in mixed.levels] == [(2, 64, 8, 8), (2, 128, 8, 8)]


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter of ``module`` drawn anew (at init the deformable attention ignores its query: its offset
    and weight projections start at zero, so positions and level embeddings would not show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def phi_by_hand(phi: Adaptor, student: Pyramid, levels: list[int]) -> list[torch.Tensor]:
    """φ's self-attention over student ``levels`` computed from its parts: each level projected, all levels'
    tokens with sine positions plus their level's embedding through every encoder layer, then cut back into
    maps (before the norms). Returns one ``[B, C, H, W]`` map per entry of ``levels``."""
    projected = student.with_levels([proj(student.levels[s]) for s, proj in zip(levels, phi.proj)],
                                    [student.strides[s] for s in levels])
    memory = projected.memory()
    shapes = memory.spatial_shapes
    level_pos = torch.cat([phi.level_embed[i].expand(h * w, -1) for i, (h, w) in enumerate(shapes.tolist())])
    pos = sine_position_embedding(shapes, memory.tokens.shape[-1], "cpu", memory.valid_ratios) + level_pos
    tokens = memory.tokens
    for layer in phi.layers:
        tokens = layer(tokens, pos, shapes, memory.padding_mask, memory.valid_ratios)
    return [t.transpose(1, 2).reshape(len(student.image_sizes), -1, h, w)
            for t, (h, w) in zip(tokens.split(shapes.prod(1).tolist(), dim=1), shapes.tolist())]


def test_phi_over_distinct_levels_is_the_encoder_over_the_projected_levels():
    student = random_pyramid([(64, 64), (48, 40)], [8, 16, 32], 16, seed=21)
    torch.manual_seed(0)
    phi = Adaptor([8, 16, 32], [16] * 3, [8, 16, 32], [32] * 3, layers=2, n_heads=4, n_points=2).eval()
    randomise(phi, seed=23)
    with torch.no_grad():
        expected = [norm(f.movedim(1, -1)).movedim(-1, 1) for f, norm in zip(phi_by_hand(phi, student, [0, 1, 2]),
                                                                             phi.norms)]
        torch.testing.assert_close(phi(student).levels, expected)


def test_phi_runs_a_student_level_once_for_the_teacher_levels_that_share_it():
    # A Faster R-CNN teacher (P2-P6) over a RetinaNet student (P3-P7): teacher P2 and P3 both take student P3.
    student = random_pyramid([(64, 64), (48, 40)], STUDENT_STRIDES, 16, seed=22)
    torch.manual_seed(0)
    phi = Adaptor(STUDENT_STRIDES, [16] * 5, TEACHER_STRIDES, [32] * 5, layers=2, n_heads=4, n_points=2).eval()
    assert phi.inputs == [0, 1, 2, 3] and phi.pick == [0, 0, 1, 2, 3] and len(phi.proj) == 4
    assert all(layer.self_attn.n_levels == 4 for layer in phi.layers) and phi.level_embed.shape == (4, 32)
    seen = []
    hook = phi.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    randomise(phi, seed=24)
    with torch.no_grad():
        out = phi(student)
        hook.remove()
        maps = phi_by_hand(phi, student, [0, 1, 2, 3])
    # tokens of student P3-P6 once (8x8 + 4x4 + 2x2 + 1x1), not of the five teacher levels (8x8 twice + ...)
    assert seen == [64 + 16 + 4 + 1]
    assert out.strides == [8, 8, 16, 32, 64] and [tuple(f.shape[-2:]) for f in out.levels] == [
        (8, 8), (8, 8), (4, 4), (2, 2), (1, 1)]
    for k, i in enumerate([0, 0, 1, 2, 3]):  # each teacher level: its own norm of its student level's output
        torch.testing.assert_close(out.levels[k], phi.norms[k](maps[i].movedim(1, -1)).movedim(-1, 1))
    assert not torch.allclose(out.levels[0], out.levels[1])  # the two norms differ


def test_phi_makes_every_tensor_on_the_features_device():
    # On the meta device any tensor made on the CPU inside (positions, level sizes) raises.
    phi = Adaptor(STUDENT_STRIDES, [32] * 5, TEACHER_STRIDES, [64] * 5, layers=1, n_heads=4, n_points=2).to("meta")
    student = random_pyramid([(64, 64), (64, 40)], STUDENT_STRIDES, 32, seed=12)
    out = phi(student.with_levels([level.to("meta") for level in student.levels]))
    assert all(level.device.type == "meta" for level in out.levels)
    assert [tuple(f.shape) for f in out.levels] == [(2, 64, 8, 8), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2),
                                                    (2, 64, 1, 1)]


def test_build_distiller_checks_the_teacher_scale_and_passes_the_adaptor_settings(pair):
    teacher, student, akes = pair
    with pytest.raises(ValueError, match="^teacher_rms differs from the one stored with the AKEs$"):
        build_distiller("unikd", DistillConfig(), student, teacher, torch.full((5,), 7.0), akes)
    same = build_distiller("unikd", DistillConfig(**SMALL_DISTILL), student, teacher, akes.teacher_rms.clone(), akes)
    assert same.akes is akes
    with pytest.raises(ValueError, match=r"^distill.method fitnet needs the teacher's per-level scale \(teacher_rms\)$"):
        build_distiller("fitnet", DistillConfig(), student, teacher)
    for method, default in (("unikd", 2), ("fitnet", 1)):
        cfg = DistillConfig(adaptor_heads=2, adaptor_points=3)
        extra = (None, akes) if method == "unikd" else (torch.ones(5),)
        made = build_distiller(method, cfg, student, teacher, *extra)
        assert len(made.adaptor.layers) == default
        attention = made.adaptor.layers[0].self_attn
        assert (attention.n_heads, attention.n_points) == (2, 3)
        cfg.adaptor_layers = 0
        made = build_distiller(method, cfg, student, teacher, *extra)
        assert len(made.adaptor.layers) == 0


def test_distillation_model_adds_the_distillers_losses_to_the_students(pair):
    teacher, student, _ = pair
    images, targets = batch()
    with pytest.raises(ValueError, match="^a distiller needs a teacher$"):
        DistillationModel(student, None, fitnet(pair))
    alone = DistillationModel(student, None, None).train()
    assert alone.teacher is None and set(alone(images, targets)) == {"classification", "bbox_regression"}
    model = DistillationModel(student, teacher, fitnet(pair)).train()
    assert model.teacher.module is teacher and model.student is student
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "loss_fitnet"} and losses["loss_fitnet"] > 0
    assert len(model.predict(images)) == 2 and student.training  # predict is the student's, mode restored


def test_methods_are_registered_and_a_new_one_is_one_class(pair):
    assert {"unikd", "fitnet"} <= set(METHODS) and METHODS["fitnet"] is FitNet
    teacher, student, _ = pair
    assert build_distiller("none", DistillConfig(), student, teacher) is None
    with pytest.raises(ValueError, match="distill.method: unknown method 'kd'.*fgd, fitnet, mgd, none, pkd, unikd"):
        build_distiller("kd", DistillConfig(), student, teacher)
    with pytest.raises(ValueError, match="needs the stage-1 AKEs"):
        build_distiller("unikd", DistillConfig(), student, teacher)

    @register_method("zero-test")
    class Zero(Distiller):
        def per_image_losses(self, teacher, student, targets):
            return {"loss_zero": sum(f.sum() for f in self.adaptor(student).levels) * 0 + torch.zeros(2)}

    try:
        made = build_distiller("zero-test", DistillConfig(**SMALL_DISTILL), student, teacher,
                               teacher_rms=torch.ones(5))
        assert isinstance(made, Zero) and made.method == "zero-test" and len(made.adaptor.layers) == 2
        with pytest.raises(ValueError, match="already registered"):
            register_method("zero-test")(Zero)
    finally:
        del METHODS["zero-test"]


# --------------------------------------------------------------------------- stage 1 and the AKE file
def test_stage1_trains_only_the_akes_and_predicts_in_each_images_pixels(pair):
    teacher, _, _ = pair
    akes = KnowledgeExtractors(SMALL_AKE, len(teacher.feature_strides), 64, NUM_CLASSES)
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
        # the box FFN's last layer starts at zero, so no gradient reaches the layers before it at the first step
        assert p.grad is not None and (p.grad.abs().sum() > 0) != (".head.box.0." in name or ".head.box.2." in name), \
            name
    model.to(torch.float64)  # the teacher, held outside the registry, follows its owner
    assert next(teacher.parameters()).dtype == torch.float64 and next(akes.parameters()).dtype == torch.float64
    model.to(torch.float32)
    dets = model.predict(images)
    assert len(dets) == 2 and dets[0]["boxes"].shape == (36, 4)  # N queries × K classes = 36 < 100
    for det, image in zip(dets, images):
        h, w = image.shape[-2:]
        assert det["boxes"][:, 0::2].max() <= w and det["boxes"][:, 1::2].max() <= h and det["boxes"].min() >= 0
    assert dets[1]["boxes"][:, 0::2].max() > 40  # the portrait image's boxes reach past the landscape one's
    assert dets[0]["labels"].max() < NUM_CLASSES
    many = KnowledgeExtractors(AKEConfig(d_model=32, n_queries=40, n_heads=4, n_points=2, d_ffn=64),
                               len(teacher.feature_strides), 64, NUM_CLASSES)
    assert AbsorbModel(teacher, many).predict(images)[0]["boxes"].shape == (100, 4)  # COCO's 100 per image of 120
    akes.zero_grad(set_to_none=True)


def test_stage1_passes_alpha_and_beta_to_the_sampler(pair, monkeypatch):
    teacher, _, _ = pair
    akes = KnowledgeExtractors(SMALL_AKE, len(teacher.feature_strides), 64, NUM_CLASSES)
    import unikd.distill.absorb as absorb

    seen = []
    original = absorb.batch_query_boxes
    monkeypatch.setattr(absorb, "batch_query_boxes", lambda *a: seen.append(a[3:]) or original(*a))
    akes.cfg.alpha, akes.cfg.beta = 0.7, 0.2
    try:
        AbsorbModel(teacher, akes).train()(*batch())
    finally:
        akes.cfg.alpha, akes.cfg.beta = 0.6, 0.4
        akes.zero_grad(set_to_none=True)
    assert seen == [(0.7, 0.2)]


def test_ake_file_keeps_the_teacher_scale_and_refuses_another_teacher(pair, tmp_path):
    teacher, _, akes = pair
    cfg = DetectorConfig(family="faster_rcnn", backbone="resnet18", fpn_channels=64)
    fingerprint = teacher_fingerprint(teacher, cfg)
    assert set(fingerprint) == {"family", "backbone", "strides", "channels", "weights_sha256"}
    assert fingerprint["family"] == "faster_rcnn" and fingerprint["backbone"] == "resnet18"
    assert fingerprint["strides"] == [4, 8, 16, 32, 64] and fingerprint["channels"] == [64] * 5
    path = save_ake(tmp_path / "new" / "folder" / "ake.safetensors", akes, fingerprint, NUM_CLASSES, [1, 2, 3])
    loaded, info = load_ake(path, fingerprint)
    assert info["category_ids"] == [1, 2, 3]
    assert loaded.teacher_rms.tolist() == [0.5, 1.0, 2.0, 3.0, 4.0]
    for (name, a), b in zip(akes.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    other = detector("faster_rcnn", 64)  # same architecture, other weights
    with pytest.raises(AKEMismatchError, match=r"was trained for another teacher \(weights_sha256: AKE trained for "
                                               r"'[0-9a-f]{64}', teacher has '[0-9a-f]{64}'\); run 'unikd "
                                               r"pretrain-ake' with this teacher first$"):
        load_ake(path, teacher_fingerprint(other, cfg))
    retina = detector("retinanet", 64)
    with pytest.raises(AKEMismatchError, match=r"\(family: AKE trained for 'faster_rcnn', teacher has 'retinanet'; "):
        load_ake(path, teacher_fingerprint(retina, DetectorConfig(family="retinanet", fpn_channels=64)))
    not_ake = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, not_ake)
    with pytest.raises(AKEMismatchError, match="not an AKE file"):
        load_ake(not_ake, fingerprint)
    with pytest.raises(FileNotFoundError, match="AKE file not found: .*missing.safetensors"):
        load_ake(tmp_path / "missing.safetensors", fingerprint)


def test_box_head_is_a_three_layer_mlp_on_the_references_logit_and_starts_at_the_focal_prior():
    from unikd.distill.ake import AKE, BoxHead

    torch.manual_seed(3)
    head = BoxHead(8, NUM_CLASSES)
    assert torch.sigmoid(head.cls.bias).tolist() == pytest.approx([0.01] * NUM_CLASSES, abs=1e-4)
    for p in head.box[-1].parameters():  # zero at init: the boxes start at the references
        torch.nn.init.normal_(p)
    z, points, boxes = torch.randn(2, 5, 8), torch.rand(2, 5, 2), torch.rand(2, 5, 4)
    boxes[0, 0], points[0, 0] = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0])  # at the edges
    lin = [m for m in head.box if isinstance(m, torch.nn.Linear)]
    delta = lin[2](lin[1](lin[0](z).relu()).relu())
    logits, out = head(z, boxes)
    torch.testing.assert_close(logits, head.cls(z))
    torch.testing.assert_close(out, (delta + torch.logit(boxes, eps=1e-4)).sigmoid())  # logit of [1e-4, 1 - 1e-4]
    _, out = head(z, points)  # a point reference moves the centre only
    expected = torch.cat([delta[..., :2] + torch.logit(points, eps=1e-4), delta[..., 2:]], -1).sigmoid()
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="AKE kind must be 'ct' or 'pos', got 'box'"):
        AKE("box", SMALL_AKE, 5, 64, NUM_CLASSES)


def test_ake_parameter_count_at_c256_matches_its_parts():
    cfg = AKEConfig(d_model=256, n_queries=200, n_heads=8, n_points=4, d_ffn=1024, extractor_layers=1)
    akes = KnowledgeExtractors(cfg, n_levels=5, in_channels=256, num_classes=80)
    self_attention = 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256
    samples = 8 * 5 * 4
    cross = (256 * 2 * samples + 2 * samples) + (256 * samples + samples) + 2 * (256 * 256 + 256)
    layer = self_attention + cross + (256 * 1024 + 1024 + 1024 * 256 + 256) + 3 * 2 * 256
    head = (256 * 80 + 80) + 2 * (256 * 256 + 256) + (256 * 4 + 4)
    assert sum(p.numel() for p in akes.ct.parameters()) == 200 * 256 + (256 * 2 + 2) + 2 * layer + head
    assert sum(p.numel() for p in akes.pos.parameters()) == (4 * 256 + 256) + 2 * layer + head


def test_extractor_depth_and_query_count_are_config_switches():
    cfg = AKEConfig(d_model=32, n_queries=7, n_heads=4, n_points=2, d_ffn=64, extractor_layers=3)
    ake = KnowledgeExtractors(cfg, n_levels=2, in_channels=16, num_classes=NUM_CLASSES).pos
    assert len(ake.extractor) == 3
    memory = Memory.from_levels([torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)])
    boxes = torch.rand(2, 7, 4) * 0.5 + 0.25
    queries = ake.queries(memory, boxes)
    z = ake.extract(queries, memory)
    assert z.shape == (2, 7, 32)
    one_layer = ake.extractor[0](queries.q, None, memory.level_reference(queries.reference), memory.tokens,
                                 memory.spatial_shapes)
    assert not torch.allclose(z, one_layer)  # all three layers run
    logits, predicted = ake.predict(z, queries)
    assert logits.shape == (2, 7, NUM_CLASSES) and predicted.shape == (2, 7, 4)
    with pytest.raises(ValueError, match="query boxes"):
        ake.queries(memory, boxes[:, :5])


def test_stage1_overfits_a_few_images_far_above_chance(tiny_digits):
    """The content AKE alone, trained on the frozen features of an untrained teacher, learns to detect the 8
    digits-det images it is trained on: AP from chance (about 0.001) to above 0.3 in 100 steps."""
    from unikd.data import CocoDetection, collate
    from unikd.distill import measure_teacher_rms
    from unikd.evaluation import evaluate_detector

    torch.manual_seed(0)
    data = CocoDetection(tiny_digits, "train", 64)
    teacher = build_detector(DetectorConfig(family="retinanet", backbone="resnet18", fpn_channels=32),
                             data.num_classes).eval()
    akes = KnowledgeExtractors(AKEConfig(d_model=32, n_queries=10, n_heads=4, n_points=2, d_ffn=64), 5, 32,
                               data.num_classes)
    akes.teacher_rms.copy_(measure_teacher_rms(teacher, data, collate))
    model = AbsorbModel(teacher, akes).train()
    chance = evaluate_detector(model, data, collate, "cpu", batch_size=8)["AP"]
    images, targets = collate([data[i] for i in range(len(data))])
    optimizer = torch.optim.AdamW(akes.parameters(), lr=4e-3)
    for _ in range(100):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = evaluate_detector(model, data, collate, "cpu", batch_size=8)["AP"]
    assert chance < 0.05 and trained > 0.3, (chance, trained)
