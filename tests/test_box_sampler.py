"""The positional-query boxes B-hat of Eq. 3: counts, IoU constraints, validity and seeding."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from unikd.distill.box_sampler import (_background, _background_candidates, sample_query_boxes,
                                      sample_query_boxes_batch)

ALPHA, BETA = 0.6, 0.4


@st.composite
def gt_box_sets(draw):
    """``[M, 4]`` float32 xyxy boxes in ``[0, 1]`` with sides of at least 1e-3, M in 0..12."""
    boxes = []
    for _ in range(draw(st.integers(0, 12))):
        x1, y1 = draw(st.floats(0, 0.999)), draw(st.floats(0, 0.999))
        w, h = draw(st.floats(1e-3, 1 - x1)), draw(st.floats(1e-3, 1 - y1))
        boxes.append([x1, y1, x1 + w, y1 + h])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def check_sample(gt, n, boxes, gt_index, alpha=ALPHA, beta=BETA):
    """All the promises of ``sample_query_boxes`` for one image."""
    num_pos = min(len(gt), n)
    assert boxes.shape == (n, 4) and boxes.dtype == gt.dtype
    assert gt_index.shape == (n,) and gt_index.dtype == torch.int64
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()

    positives, pos_index = boxes[:num_pos], gt_index[:num_pos]
    assert (pos_index >= 0).all() and len(set(pos_index.tolist())) == num_pos
    if num_pos:
        assert (box_iou(positives, gt[pos_index]).diag() > alpha).all()

    assert (gt_index[num_pos:] == -1).all()
    if len(gt) and n > num_pos:
        assert (box_iou(boxes[num_pos:], gt).amax(dim=1) < beta).all()


@settings(max_examples=50, deadline=None)
@given(gt=gt_box_sets(), n=st.integers(1, 30), seed=st.integers(0, 2**31))
def test_sampled_boxes_keep_every_promise(gt, n, seed):
    boxes, gt_index = sample_query_boxes(gt, n, ALPHA, BETA, generator=seeded(seed))
    check_sample(gt, n, boxes, gt_index)

    again = sample_query_boxes(gt, n, ALPHA, BETA, generator=seeded(seed))
    assert torch.equal(again[0], boxes) and torch.equal(again[1], gt_index)
    if n > len(gt):  # background boxes are continuous random draws
        other, _ = sample_query_boxes(gt, n, ALPHA, BETA, generator=seeded(seed + 1))
        assert not torch.equal(other, boxes)


def test_more_ground_truths_than_queries_keeps_a_random_subset():
    gt = torch.tensor([[0.1 * i, 0.1 * i, 0.1 * i + 0.08, 0.1 * i + 0.08] for i in range(10)])
    boxes, gt_index = sample_query_boxes(gt, 4, generator=seeded(0))
    check_sample(gt, 4, boxes, gt_index)
    subsets = {tuple(sample_query_boxes(gt, 4, generator=seeded(s))[1].tolist()) for s in range(10)}
    assert len(subsets) > 1


def test_ground_truth_covering_the_whole_image():
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    boxes, gt_index = sample_query_boxes(gt, 20, generator=seeded(3))
    check_sample(gt, 20, boxes, gt_index)
    assert gt_index[0] == 0


def test_no_ground_truth_gives_only_background():
    boxes, gt_index = sample_query_boxes(torch.zeros(0, 4), 7, generator=seeded(0))
    check_sample(torch.zeros(0, 4), 7, boxes, gt_index)
    assert (gt_index == -1).all()


def test_jitter_moves_the_boxes():
    gt = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.8], [0.3, 0.1, 0.35, 0.2]]).repeat(4, 1)
    boxes, _ = sample_query_boxes(gt, 12, generator=seeded(0))
    iou = box_iou(boxes, gt).diag()
    assert (iou > ALPHA).all() and (iou < 1).float().mean() > 0.9


def test_batch_stacks_the_per_image_samples():
    crowd = torch.rand(40, 2, 2, generator=seeded(1)).sort(dim=1).values.flatten(1)  # 40 > n ground truths
    gts = [torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.zeros(0, 4), crowd]
    boxes, gt_index = sample_query_boxes_batch(gts, 30, generator=seeded(5))
    assert boxes.shape == (3, 30, 4) and gt_index.shape == (3, 30)
    g = seeded(5)
    for b, gt in enumerate(gts):
        expected_boxes, expected_index = sample_query_boxes(gt, 30, generator=g)
        assert torch.equal(boxes[b], expected_boxes) and torch.equal(gt_index[b], expected_index)
    assert (gt_index[2] >= 0).all()


@pytest.mark.parametrize("n", [2, 5])
def test_impossible_background_raises(n):
    with pytest.raises(RuntimeError, match=f"found only 0 of {n - 1} background boxes"):
        sample_query_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), n, beta=1e-9, generator=seeded(0))


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.4), (-0.1, 0.4), (0.6, 0.0), (0.6, 1.5)])
def test_thresholds_out_of_range_raise(alpha, beta):
    with pytest.raises(ValueError, match=rf"need 0 <= alpha < 1 and 0 < beta <= 1, got alpha={alpha}, beta={beta}"):
        sample_query_boxes(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), 4, alpha, beta, generator=seeded(0))


@pytest.mark.parametrize("gt", [[[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.7]], [[0.0, 0.0, 1.0, 1.0]]])
def test_thresholds_at_the_edges_of_their_ranges(gt):
    # beta = 1 still keeps out boxes equal to a ground truth (clipped "near" boxes of a whole-image gt are)
    gt = torch.tensor(gt)
    boxes, gt_index = sample_query_boxes(gt, 100, alpha=0.0, beta=1.0, generator=seeded(0))
    check_sample(gt, 100, boxes, gt_index, alpha=0.0, beta=1.0)


def test_more_queries_only_append_background():
    gt = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.8], [0.3, 0.1, 0.35, 0.2]])
    exact, index = sample_query_boxes(gt, 3, generator=seeded(2))
    assert index.tolist() == [0, 1, 2]
    for n in (4, 10):
        more, _ = sample_query_boxes(gt, n, generator=seeded(2))
        assert torch.equal(more[:3], exact)


def test_jitter_shifts_and_scales_both_ways():
    gt = torch.tensor([[0.4, 0.4, 0.6, 0.6]]).repeat(30, 1)  # well inside: no clipping
    boxes, _ = sample_query_boxes(gt, 30, generator=seeded(1))
    centre_shift = (boxes[:, :2] + boxes[:, 2:]) / 2 - 0.5
    size_ratio = (boxes[:, 2:] - boxes[:, :2]) / 0.2
    assert (centre_shift < -0.005).any() and (centre_shift > 0.005).any()
    assert (size_ratio < 0.97).any() and (size_ratio > 1.03).any()


def test_background_candidates_half_near_a_ground_truth_half_anywhere():
    gt = torch.tensor([[0.49, 0.49, 0.51, 0.51]])
    candidates = _background_candidates(gt, 64, seeded(0))
    assert candidates.shape == (64, 4)
    # near: centre within 1.5 gt sizes (0.03) of the gt's, sides at most e times the gt's (0.054)
    near = ((candidates - 0.5).abs() <= 0.03 + 0.054 / 2).all(dim=1)
    assert near[:32].all() and not near[32:].all()
    anywhere = candidates[32:]
    assert (anywhere[:, 2:] >= anywhere[:, :2]).all()  # corners sorted per axis: (x1, y1, x2, y2)
    assert anywhere.min() < 0.2 and anywhere.max() > 0.8


def test_sample_stays_on_the_device_of_the_ground_truths():
    # The meta device stands in for a GPU. Without background boxes no step needs the values; the background
    # search filters by value, so only its candidates are checked.
    gt = torch.empty(5, 4, device="meta")
    for n in (3, 5):
        boxes, gt_index = sample_query_boxes(gt, n)
        assert boxes.device.type == gt_index.device.type == "meta"
        assert boxes.shape == (n, 4) and gt_index.shape == (n,)
    for gt in (gt, gt[:0]):
        candidates = _background_candidates(gt, 64, None)
        assert candidates.device.type == "meta" and candidates.shape == (64, 4)


def test_ground_truth_itself_when_no_jitter_is_close_enough():
    gt = torch.rand(12, 2, 2, generator=seeded(3)).sort(dim=1).values.flatten(1)
    boxes, gt_index = sample_query_boxes(gt, 12, alpha=0.9, generator=seeded(3))
    check_sample(gt, 12, boxes, gt_index, alpha=0.9)
    unchanged = (boxes == gt).all(dim=1)
    assert unchanged.any() and not unchanged.all()  # both cases occur in this draw


def test_no_background_asked_draws_nothing():
    g = seeded(4)
    state = g.get_state()
    background = _background(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), 0, BETA, g)
    assert background.shape == (0, 4) and torch.equal(g.get_state(), state)


def test_many_background_boxes_in_one_request():
    boxes, gt_index = sample_query_boxes(torch.tensor([[0.2, 0.2, 0.4, 0.5]]), 4001, generator=seeded(5))
    check_sample(torch.tensor([[0.2, 0.2, 0.4, 0.5]]), 4001, boxes, gt_index)
