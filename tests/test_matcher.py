"""Hungarian matcher against brute force, and the set loss against a by-hand computation."""
import itertools
import math

import pytest
import torch

from unikd.transformer.criterion import set_loss
from unikd.transformer.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0


def random_boxes(n, generator):
    """``[n, 4]`` normalised cxcywh boxes well inside the image."""
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
    return torch.cat([centre, size], dim=1)


def random_targets(sizes, num_classes, generator):
    return [{"labels": torch.randint(num_classes, (m,), generator=generator), "boxes": random_boxes(m, generator)}
            for m in sizes]


def giou_by_hand(a, b):
    """GIoU of two cxcywh boxes given as lists of floats."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def focal_by_hand(logit, target, alpha=ALPHA, gamma=GAMMA):
    """Sigmoid focal loss of one logit (RetinaNet's formula)."""
    p = 1 / (1 + math.exp(-logit))
    ce = -math.log(p) if target else -math.log(1 - p)
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return alpha_t * (1 - p_t) ** gamma * ce


def brute_force_min_cost(cost):
    """Minimum total cost over all one-to-one assignments of ``min(N, M)`` pairs of an ``[N, M]`` matrix."""
    n, m = cost.shape
    if m == 0:
        return 0.0
    if m <= n:
        return min(sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(n), m))
    return min(sum(cost[q, t].item() for q, t in enumerate(perm)) for perm in itertools.permutations(range(m), n))


def test_cost_matrix_entry_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=g)
    boxes = random_boxes(3, g)
    labels = torch.tensor([2, 0])
    tgt_boxes = random_boxes(2, g)
    cost = HungarianMatcher().cost_matrix(logits, boxes, labels, tgt_boxes)
    assert cost.shape == (3, 2)
    for i, j in [(0, 0), (2, 1)]:
        p = torch.sigmoid(logits[i, labels[j]]).item()
        pos = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
        neg = (1 - ALPHA) * p ** GAMMA * -math.log(1 - p + 1e-8)
        l1 = sum(abs(a - b) for a, b in zip(boxes[i].tolist(), tgt_boxes[j].tolist()))
        expected = 2 * (pos - neg) + 5 * l1 - 2 * giou_by_hand(boxes[i].tolist(), tgt_boxes[j].tolist())
        assert cost[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_cost_matrix_stays_finite_where_the_sigmoid_saturates():
    # float32 sigmoid(-40) is 4e-18 and sigmoid(40) is exactly 1: the 1e-8 inside each log keeps it finite
    logits = torch.tensor([[-40.0, 40.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = HungarianMatcher().cost_matrix(logits, boxes, torch.tensor([0, 1]), boxes.repeat(2, 1))
    assert torch.isfinite(cost).all()
    # same box: L1 0, GIoU 1; class 0 (p ~ 0) costs alpha * -log(1e-8), class 1 (p = 1) -(1 - alpha) * -log(1e-8)
    expected = [2 * ALPHA * -math.log(1e-8) - 2, -2 * (1 - ALPHA) * -math.log(1e-8) - 2]
    assert cost[0].tolist() == pytest.approx(expected, rel=1e-5)
    (query_idx, target_idx), = HungarianMatcher()(logits[None].repeat(1, 2, 1), boxes[None].repeat(1, 2, 1),
                                                  [{"labels": torch.tensor([1]), "boxes": boxes}])
    assert len(query_idx) == len(target_idx) == 1


@pytest.mark.parametrize("seed", range(10))
def test_matcher_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = seed % 5 + 1, 3
    # M = 0, M = N, M = N + 1 and a random M, the largest 6
    sizes = [0, 1, num_queries, num_queries + 1, int(torch.randint(6, (1,), generator=g)) + 1]
    logits = torch.randn(len(sizes), num_queries, num_classes, generator=g)
    boxes = random_boxes(len(sizes) * num_queries, g).view(len(sizes), num_queries, 4)
    targets = random_targets(sizes, num_classes, g)
    matcher = HungarianMatcher()
    indices = matcher(logits, boxes, targets)
    assert len(indices) == len(sizes)
    for b, (query_idx, target_idx) in enumerate(indices):
        m = min(num_queries, sizes[b])
        assert query_idx.dtype == target_idx.dtype == torch.int64
        assert len(query_idx) == len(target_idx) == m
        assert torch.equal(query_idx, query_idx.sort().values)
        assert len(set(query_idx.tolist())) == len(set(target_idx.tolist())) == m
        cost = matcher.cost_matrix(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        assert cost[query_idx, target_idx].sum().item() == pytest.approx(brute_force_min_cost(cost), abs=1e-4)


def test_matcher_with_more_targets_than_queries():
    g = torch.Generator().manual_seed(7)
    logits, boxes = torch.randn(1, 3, 2, generator=g), random_boxes(3, g)[None]
    targets = random_targets([4], 2, g)
    matcher = HungarianMatcher()
    (query_idx, target_idx), = matcher(logits, boxes, targets)
    assert query_idx.tolist() == [0, 1, 2]
    cost = matcher.cost_matrix(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
    assert cost[query_idx, target_idx].sum().item() == pytest.approx(brute_force_min_cost(cost), abs=1e-4)


def test_matcher_without_any_target():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    indices = HungarianMatcher()(torch.randn(2, 4, 3), random_boxes(8, None).view(2, 4, 4), targets)
    assert all(len(q) == len(t) == 0 and q.dtype == torch.int64 for q, t in indices)


def test_set_loss_against_by_hand_computation():
    g = torch.Generator().manual_seed(1)
    batch, num_queries, num_classes = 2, 4, 3
    logits = torch.randn(batch, num_queries, num_classes, generator=g)
    boxes = random_boxes(batch * num_queries, g).view(batch, num_queries, 4)
    targets = random_targets([2, 1], num_classes, g)
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([0]), torch.tensor([0]))]
    losses = set_loss(logits, boxes, targets, indices, num_boxes=3)

    matched = {(b, q.item()): t.item() for b, (qs, ts) in enumerate(indices) for q, t in zip(qs, ts)}
    focal = l1 = giou = 0.0
    for b, q in itertools.product(range(batch), range(num_queries)):
        label = targets[b]["labels"][matched[b, q]].item() if (b, q) in matched else None
        focal += sum(focal_by_hand(logits[b, q, k].item(), k == label) for k in range(num_classes))
        if (b, q) in matched:
            pred, tgt = boxes[b, q].tolist(), targets[b]["boxes"][matched[b, q]].tolist()
            l1 += sum(abs(x - y) for x, y in zip(pred, tgt))
            giou += 1 - giou_by_hand(pred, tgt)
    assert set(losses) == {"loss_class", "loss_l1", "loss_giou"}
    assert losses["loss_class"].item() == pytest.approx(2 * focal / 3, rel=1e-5)
    assert losses["loss_l1"].item() == pytest.approx(5 * l1 / 3, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * giou / 3, rel=1e-5)


def test_set_loss_box_terms_vanish_on_perfect_boxes_and_gradients_flow():
    g = torch.Generator().manual_seed(2)
    targets = random_targets([3, 0], 4, g)
    boxes = random_boxes(10, g).view(2, 5, 4)
    boxes[0, [4, 0, 2]] = targets[0]["boxes"]
    boxes.requires_grad_(True)
    logits = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    indices = [(torch.tensor([0, 2, 4]), torch.tensor([1, 2, 0])), (torch.zeros(0, dtype=torch.int64),) * 2]
    losses = set_loss(logits, boxes, targets, indices, num_boxes=3)
    assert losses["loss_l1"].item() == 0
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-4)  # float32 rounding and the loss eps
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
    unmatched = torch.ones(2, 5, dtype=torch.bool)
    unmatched[0, [0, 2, 4]] = False
    assert (boxes.grad[unmatched] == 0).all()

    boxes.grad = None
    set_loss(logits, boxes + 0.01, targets, indices, num_boxes=3)["loss_giou"].backward()
    assert boxes.grad[~unmatched].abs().sum() > 0


def test_set_loss_without_positives_clamps_the_normaliser():
    logits = torch.randn(1, 3, 2, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    indices = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]
    losses = set_loss(logits, random_boxes(3, None)[None], targets, indices, num_boxes=0)
    expected = 2 * sum(focal_by_hand(x, False) for x in logits.flatten().tolist())
    assert losses["loss_class"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_l1"].item() == losses["loss_giou"].item() == 0


def test_set_loss_uses_the_given_focal_alpha_and_gamma():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 2, generator=g)
    targets = random_targets([2], 2, g)
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    losses = set_loss(logits, random_boxes(3, g)[None], targets, indices, num_boxes=2, focal_alpha=0.6,
                      focal_gamma=1.0)
    labels = {0: targets[0]["labels"][1].item(), 2: targets[0]["labels"][0].item()}
    focal = sum(focal_by_hand(logits[0, q, k].item(), labels.get(q) == k, alpha=0.6, gamma=1.0)
                for q in range(3) for k in range(2))
    assert losses["loss_class"].item() == pytest.approx(2 * focal / 2, rel=1e-5)


@pytest.mark.parametrize("num_boxes", [3, 3.0, torch.tensor(3), torch.tensor(3.0, dtype=torch.float64)])
def test_set_loss_is_float32_whatever_the_type_of_num_boxes(num_boxes):
    g = torch.Generator().manual_seed(4)
    logits, boxes = torch.randn(1, 4, 3, generator=g), random_boxes(4, g)[None]
    targets = random_targets([3], 3, g)
    indices = [(torch.tensor([0, 1, 3]), torch.tensor([2, 0, 1]))]
    losses = set_loss(logits, boxes, targets, indices, num_boxes=num_boxes)
    reference = set_loss(logits, boxes, targets, indices, num_boxes=3.0)
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, name
        assert loss.item() == pytest.approx(reference[name].item(), rel=1e-6)
