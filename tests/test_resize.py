"""The loader's resize (data.size, or data.min_size / data.max_size with multi-scale), and detectors that keep it."""
import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from test_detectors import tiny_config
from unikd.config import ConfigError, DataConfig, ExperimentConfig, from_dict, to_dict
from unikd.data import CocoDetection, ImageResize
from unikd.detectors import build_detector
from unikd.detectors.transform import IMAGE_MEAN, IMAGE_STD, PadOnlyTransform
from unikd.errors import UserError

S, L = 64, 96  # the shorter side and the limit on the longer one (the paper's 800 / 1333, scaled down)


def expected_size(h0: int, w0: int, short_side: int, limit: int) -> tuple[int, int]:
    """(H, W) with the shorter side at ``short_side`` unless the longer would pass ``limit``; then the longer at
    ``limit`` and the shorter in proportion; fractions of a pixel floored."""
    short, long = min(h0, w0), max(h0, w0)
    if short_side * long / short <= limit:
        new_short, new_long = short_side, math.floor(short_side * long / short)
    else:
        new_short, new_long = math.floor(limit * short / long), limit
    return (new_short, new_long) if h0 <= w0 else (new_long, new_short)


def test_shorter_side_to_s_longer_at_most_l_boxes_with_it(shapes):
    ds = CocoDetection(shapes, "train", ImageResize(L, (S,)))
    for index, ((h, w), box) in enumerate([((64, 96), [20, 10, 80, 50]),    # landscape: 64 x 96 (not limited)
                                           ((85, 64), [10, 30, 60, 100]),   # portrait: 85.3 floored
                                           ((19, 96), [300, 20, 380, 60])]):  # 400x80: the longer side at 96
        image, target = ds[index]
        h0, w0 = target["orig_size"].tolist()
        assert (h, w) == expected_size(h0, w0, S, L) == tuple(image.shape[-2:])
        assert min(h, w) == S or max(h, w) == L
        assert min(h, w) <= S and max(h, w) <= L
        scale = torch.tensor([w / w0, h / h0] * 2)
        torch.testing.assert_close(target["boxes"], torch.tensor([box], dtype=torch.float32) * scale)
        x1, y1, x2, y2 = target["boxes"][0].round().int().tolist()  # the white box moved with it
        assert image[:, y1 + 1: y2 - 1, x1 + 1: x2 - 1].min() > 0.9


def test_the_longer_side_rule_is_data_size(shapes):
    """data.size = s: the longer side to s, whatever the shorter becomes (digits-det's rule, unchanged)."""
    ds = CocoDetection(shapes, "train", ImageResize.from_config(DataConfig(size=L), train=True))
    assert ds.resize == ImageResize(L) and ds.resize.choices == 1
    assert [tuple(ds[i][0].shape[-2:]) for i in range(3)] == [(64, 96), (96, 72), (19, 96)]
    assert [tuple(CocoDetection(shapes, "train", L)[i][0].shape[-2:]) for i in range(3)] == [(64, 96), (96, 72),
                                                                                             (19, 96)]


def test_multi_scale_draws_from_the_list_per_seed_epoch_index(shapes):
    sides = (32, 48, 64)
    ds = CocoDetection(shapes, "train", ImageResize(L, sides), hflip=0.5, seed=7)

    def draws(dataset, epoch, n=60):
        dataset.set_epoch(epoch)
        return [dataset.augmentation(i)[1] for i in range(n)]

    first = draws(ds, 0)
    assert set(first) == {0, 1, 2}  # uniform over the list: every side turns up in 60 draws
    assert draws(CocoDetection(shapes, "train", ImageResize(L, sides), hflip=0.5, seed=7), 0) == first
    assert draws(ds, 1) != first and draws(ds, 0) == first  # another epoch differs; going back repeats
    assert draws(CocoDetection(shapes, "train", ImageResize(L, sides), hflip=0.5, seed=8), 0) != first
    assert first == [second_draw(7, 0, i, 3) for i in range(60)]  # as documented
    ds.set_epoch(3)
    for index in range(3):  # the image is resized at the side drawn for it
        image, target = ds[index]
        h0, w0 = target["orig_size"].tolist()
        assert tuple(image.shape[-2:]) == expected_size(h0, w0, sides[ds.augmentation(index)[1]], L)
    single = CocoDetection(shapes, "train", ImageResize(L, (64,)), hflip=0.5, seed=7)
    ds.set_epoch(0)  # the flips do not depend on the number of scales
    assert [single.augmentation(i)[0] for i in range(60)] == [ds.augmentation(i)[0] for i in range(60)]


def second_draw(seed: int, epoch: int, index: int, n: int) -> int:
    """The scale of item ``index``: the second draw of ``default_rng([seed, epoch, index])``, uniform in 0..n-1."""
    rng = np.random.default_rng([seed, epoch, index])
    rng.random()  # the flip's
    return int(rng.integers(n))


def test_evaluation_uses_the_largest_shorter_side():
    data = DataConfig(min_size=[48, 64, 56], max_size=L)
    assert ImageResize.from_config(data, train=True) == ImageResize(L, (48, 64, 56))
    assert ImageResize.from_config(data, train=False) == ImageResize(L, (64,))


@pytest.mark.parametrize("values, message", [
    ({"size": 128, "min_size": 800, "max_size": 1333}, "two ways to resize"),
    ({"min_size": 800}, "go together"),
    ({"max_size": 1333}, "go together"),
    ({"min_size": [640, 1400], "max_size": 1333}, "each below data.max_size"),
    ({"min_size": 1333, "max_size": 1333}, "each below data.max_size"),
    ({"min_size": [], "max_size": 1333}, "one or more"),
    ({"min_size": [800, 0], "max_size": 1333}, r"data.min_size\[1\]"),
])
def test_resize_keys_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"data": values})


def test_resize_keys_defaults_and_round_trip():
    assert (DataConfig().size, DataConfig().min_size, DataConfig().max_size) == (128, None, None)
    coco = from_dict({"data": {"min_size": 800, "max_size": 1333}})
    assert (coco.data.size, coco.data.min_size, coco.data.max_size) == (None, [800], 1333)
    assert from_dict(to_dict(coco)) == coco  # a checkpoint's stored config reloads
    assert from_dict(to_dict(ExperimentConfig())) == ExperimentConfig()


def test_the_detector_gets_the_loaders_size(shapes):
    """Loader at S / L, then a detector: its pass's image sizes are the loader's, portrait and landscape."""
    ds = CocoDetection(shapes, "train", ImageResize(L, (S,)))
    images, targets = zip(*(ds[i] for i in range(3)))
    detector = build_detector(tiny_config("retinanet"), ds.num_classes).train()
    _, features = detector(list(images), list(targets))
    assert features.image_sizes == [(64, 96), (85, 64), (19, 96)]
    assert features.levels[0].shape[-2:] == (96 // 8, 96 // 8)  # padded to 96 x 96, stride 8


def test_the_transform_equals_torchvisions_at_the_digits_det_size():
    """Where torchvision's transform kept scale 1 (min = max = the longer side), it and PadOnlyTransform agree to
    the bit: digits-det results do not change."""
    images = [torch.rand(3, 128, 128), torch.rand(3, 85, 128)]
    ours, theirs = PadOnlyTransform(), GeneralizedRCNNTransform(128, 128, IMAGE_MEAN, IMAGE_STD)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        (a, _), (b, _) = ours(images), theirs(images)
        assert a.image_sizes == b.image_sizes
        assert torch.equal(a.tensors, b.tensors)



@pytest.mark.parametrize("teacher, job, accepted", [
    ({"min_size": [32, 48, 64], "max_size": 96}, {"min_size": 64, "max_size": 96}, True),  # multi-scale teacher
    ({"min_size": 64, "max_size": 96}, {"min_size": [32, 48, 64], "max_size": 96}, True),  # multi-scale student
    ({"min_size": 64, "max_size": 96}, {"min_size": 48, "max_size": 96}, False),
    ({"min_size": 64, "max_size": 96}, {"min_size": 64, "max_size": 128}, False),
    ({"size": 64}, {"min_size": 32, "max_size": 64}, False),  # the same size, but not the same rule
    ({"size": 64}, {"size": 64}, True),
])
def test_teacher_and_job_must_evaluate_at_the_same_scale(tiny_digits, monkeypatch, teacher, job, accepted):
    """As the paper's Deformable DETR (shorter sides 480-800) and the others (800): one scale at evaluation."""
    import unikd.jobs

    tcfg, cfg = (from_dict({"data": {"root": str(tiny_digits), **d}}) for d in (teacher, job))
    monkeypatch.setattr(unikd.jobs, "load_detector", lambda *a, **k: (None, tcfg, {"meta": {
        "category_ids": list(range(1, 11))}}))
    train_set = CocoDetection(tiny_digits, "train", 64)
    if accepted:
        unikd.jobs._load_teacher("t.pt", cfg, train_set, "cpu")
    else:
        with pytest.raises(UserError, match="must evaluate at the same scale"):
            unikd.jobs._load_teacher("t.pt", cfg, train_set, "cpu")
