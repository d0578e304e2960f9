"""The positional-query boxes B-hat of Eq. 3: counts, IoU constraints, validity and seeding."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from unikd.distill.box_sampler import sample_query_boxes, sample_query_boxes_batch

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


def check_sample(gt, n, boxes, gt_index):
    """All the promises of ``sample_query_boxes`` for one image."""
    num_pos = min(len(gt), n)
    assert boxes.shape == (n, 4) and boxes.dtype == gt.dtype
    assert gt_index.shape == (n,) and gt_index.dtype == torch.int64
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()

    positives, pos_index = boxes[:num_pos], gt_index[:num_pos]
    assert (pos_index >= 0).all() and len(set(pos_index.tolist())) == num_pos
    if num_pos:
        assert (box_iou(positives, gt[pos_index]).diag() > ALPHA).all()

    assert (gt_index[num_pos:] == -1).all()
    if len(gt) and n > num_pos:
        assert (box_iou(boxes[num_pos:], gt).amax(dim=1) < BETA).all()


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


def test_impossible_background_raises():
    with pytest.raises(RuntimeError, match="background boxes"):
        sample_query_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 5, beta=1e-9, generator=seeded(0))
