"""Weights from local files: ``model.backbone_weights`` and ``unikd import-teacher``.

Every file is a freshly built torchvision model saved with random values (same keys as the real downloads,
which nothing here fetches). The imported teachers are checked against torchvision's own model on the same
images: an independent computation of the same detections.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
import yaml
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from unikd import cli
from unikd.config import ConfigError, DetectorConfig, to_dict
from unikd.detectors import build_detector
from unikd.detectors.weights import WeightsError, backbone_trunk, read_state_dict
from unikd.detectors.zoo import zoo_config, zoo_detector, zoo_rows
from unikd.jobs import load_detector

from conftest import AKE_SET, tiny_config

SIZE = 64
# digits-det's categories "0" .. "9" (ids 1 .. 10) renamed: COCO indices 18, 1, 3, 6, 17, 7, 9, 16, 8, 2
COCO_NAMES = ["dog", "person", "car", "bus", "cat", "train", "boat", "bird", "truck", "bicycle"]
COCO_INDEX = [18, 1, 3, 6, 17, 7, 9, 16, 8, 2]


def scramble_batch_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random affine parameters and running statistics in every BatchNorm (a trained model's are not 1 and 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=generator) * 0.1 + (1.0 if t is m.weight else 0.0))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    model = scramble_batch_norms(torchvision.models.resnet18(weights=None), torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


def retinanet_r18(path, **model) -> DetectorConfig:
    return DetectorConfig(family="retinanet", backbone="resnet18", fpn_channels=32, backbone_weights=str(path),
                          **model)


def batch(n=2):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])} for _ in range(n)]
    return images, targets


# ---------------------------------------------------------------- model.backbone_weights


def test_backbone_weights_are_loaded_with_frozen_batch_norm_and_frozen_early_stages(resnet18_file):
    file = torch.load(resnet18_file, weights_only=True)
    detector = build_detector(retinanet_r18(resnet18_file, trainable_layers=3), 3)
    trunk = backbone_trunk(detector)
    loaded = trunk.state_dict()
    assert set(loaded) == {k for k in file if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    for key, value in loaded.items():
        assert torch.equal(value, file[key]), key
    assert not any(isinstance(m, nn.BatchNorm2d) for m in detector.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules()) == 20  # every BatchNorm of ResNet-18
    assert not any(p.requires_grad for m in trunk.modules() if isinstance(m, FrozenBatchNorm2d)
                   for p in m.parameters(recurse=False))
    for name, param in trunk.named_parameters():  # torchvision's rule for 3 trainable layers: layer2-4 train
        assert param.requires_grad == name.startswith(("layer2", "layer3", "layer4")), name

    detector.train()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.1)
    losses, _ = detector(*batch())
    sum(losses.values()).backward()
    optimizer.step()
    after = trunk.state_dict()
    for key in after:
        if key.startswith(("conv1", "bn1", "layer1")) or ".bn" in key or "downsample.1" in key:
            assert torch.equal(after[key], file[key]), key  # frozen stages and every BatchNorm are unchanged
    assert not torch.equal(after["layer4.1.conv2.weight"], file["layer4.1.conv2.weight"])  # the rest trains


def test_without_backbone_weights_batch_norm_stays_trainable_and_v2_keeps_it(resnet18_file):
    plain = backbone_trunk(build_detector(DetectorConfig(backbone="resnet18", fpn_channels=32), 3))
    assert isinstance(plain.bn1, nn.BatchNorm2d) and plain.bn1.weight.requires_grad
    assert all(p.requires_grad for p in plain.parameters())
    # torchvision's v2 builders keep ordinary BatchNorm even when given weights
    v2 = build_detector(DetectorConfig(family="faster_rcnn", backbone="resnet18", fpn_channels=32,
                                       backbone_weights=str(resnet18_file), torchvision_v2=True), 3)
    trunk = backbone_trunk(v2)
    assert isinstance(trunk.bn1, nn.BatchNorm2d)
    assert torch.equal(trunk.bn1.running_var, torch.load(resnet18_file, weights_only=True)["bn1.running_var"])


def test_backbone_weights_of_a_convnext_map_its_features_to_the_trunk(tmp_path):
    model = torchvision.models.convnext_tiny(weights=None)
    path = tmp_path / "convnext_tiny.safetensors"
    from safetensors.torch import save_file
    save_file(model.state_dict(), path)
    cfg = DetectorConfig(family="fcos", backbone="convnext_tiny", fpn_channels=32, backbone_weights=str(path))
    trunk = backbone_trunk(build_detector(cfg, 3))
    for key, value in trunk.state_dict().items():
        if not key.startswith("output_norms."):
            assert torch.equal(value, model.state_dict()[f"features.{key}"]), key


def test_backbone_weights_that_do_not_fit_name_every_bad_key(resnet18_file, tmp_path):
    state = torch.load(resnet18_file, weights_only=True)
    del state["fc.bias"], state["layer2.0.bn1.running_var"]
    state["head.weight"] = torch.zeros(3)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError) as err:
        build_detector(retinanet_r18(bad), 3)
    message = str(err.value)
    assert str(bad) in message and "resnet18" in message
    assert "2 missing: fc.bias, layer2.0.bn1.running_var" in message
    assert "1 unexpected: head.weight" in message
    assert "1 of the wrong shape: layer1.0.conv1.weight (file [64, 64, 1, 1], model [64, 64, 3, 3])" in message

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="is not a state dict"):
        read_state_dict(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_detector(retinanet_r18(tmp_path / "nowhere.pth"), 3)


def test_unikd_train_starts_from_backbone_weights_and_its_checkpoint_loads_without_them(
        resnet18_file, tiny_digits, tmp_path):
    weights = tmp_path / "r18.pth"
    shutil.copy(resnet18_file, weights)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_digits, max_iters=1))))
    assert cli.main(["train", str(config), "--out", str(tmp_path / "run"), "--set",
                     f"model.backbone_weights={weights}", "--set", "model.trainable_layers=3"]) == 0
    weights.unlink()  # the checkpoint holds the weights: the file is read only when a training starts
    detector, cfg = load_detector(tmp_path / "run" / "last.pt")
    trunk = backbone_trunk(detector)
    assert cfg.model.backbone_weights == str(weights) and isinstance(trunk.bn1, FrozenBatchNorm2d)
    file = torch.load(resnet18_file, weights_only=True)
    assert torch.equal(trunk.layer1[0].conv1.weight, file["layer1.0.conv1.weight"])  # frozen: as loaded
    assert torch.equal(trunk.layer3[0].bn1.running_mean, file["layer3.0.bn1.running_mean"])


# ---------------------------------------------------------------- unikd import-teacher


@pytest.fixture(scope="module")
def coco_named(tiny_digits, tmp_path_factory):
    """tiny digits-det with COCO names for its categories (ids unchanged: the map goes by name)."""
    root = tmp_path_factory.mktemp("coco-named")
    (root / "images").symlink_to(tiny_digits / "images")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        data = json.loads((tiny_digits / "annotations" / f"instances_{split}.json").read_text())
        for category in data["categories"]:
            category["name"] = COCO_NAMES[category["id"] - 1]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


ZOO_FILES: dict = {}


def zoo_model(name: str) -> nn.Module:
    """torchvision's zoo model ``name`` (random values) whose classes outside :data:`COCO_INDEX` never fire and
    whose mapped ones often do, in eval mode at scale 1 on SIZE-px images."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE)
    scramble_batch_norms(model, torch.Generator().manual_seed(2))
    two_stage = hasattr(model, "roi_heads")
    classifier = model.roi_heads.box_predictor.cls_score if two_stage else model.head.classification_head.cls_logits
    kept = [0] * two_stage + COCO_INDEX  # the R-CNNs' background row, then the dataset's classes
    with torch.no_grad():
        bias = classifier.bias.view(-1, 91)  # [anchors, 91]
        bias.fill_(-1e4)
        bias[:, kept] = torch.randn(bias[:, kept].shape, generator=torch.Generator().manual_seed(3))
    return model.eval()


def zoo_file(name: str, tmp_path_factory) -> tuple[nn.Module, object]:
    if name not in ZOO_FILES:
        model = zoo_model(name)
        path = tmp_path_factory.mktemp("zoo") / f"{name}.pth"
        torch.save(model.state_dict(), path)
        ZOO_FILES[name] = model, path
    return ZOO_FILES[name]


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn",
                                  "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_an_imported_teacher_predicts_what_torchvision_predicts(name, coco_named, tmp_path_factory):
    model, path = zoo_file(name, tmp_path_factory)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(COCO_NAMES)]
    teacher = zoo_detector(name, zoo_config(name), read_state_dict(path), categories)
    images, _ = batch(2)
    with torch.no_grad():
        expected = model(images)
    got = teacher.predict(images)
    for theirs, ours in zip(expected, got):
        assert len(ours["scores"]) > 0 and len(ours["scores"]) == len(theirs["scores"])
        pairs = pair_detections(ours, theirs)
        torch.testing.assert_close(ours["scores"], theirs["scores"][pairs], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"][pairs], atol=1e-3, rtol=1e-4)
        if "masks" in theirs:
            torch.testing.assert_close(ours["masks"], theirs["masks"][pairs], atol=1e-4, rtol=1e-4)


def pair_detections(ours: dict, theirs: dict) -> torch.Tensor:
    """For each of our n detections, the index of torchvision's of the same class (our label j is COCO index
    COCO_INDEX[j]) whose box and score are nearest; every one of theirs is used once. ``[n]`` int64."""
    same_class = torch.tensor(COCO_INDEX)[ours["labels"]][:, None] == theirs["labels"][None]
    distance = (ours["boxes"][:, None] - theirs["boxes"][None]).abs().amax(-1) + \
        (ours["scores"][:, None] - theirs["scores"][None]).abs()
    pairs = distance.masked_fill(~same_class, float("inf")).argmin(1)
    assert sorted(pairs.tolist()) == list(range(len(theirs["labels"])))
    return pairs


def test_category_rows_follow_the_names():
    categories = [{"id": 5, "name": "Dog"}, {"id": 7, "name": "person"}]
    assert zoo_rows(categories, 0) == [18, 1]
    assert zoo_rows(categories, 1) == [0, 18, 1]  # the background row first
    with pytest.raises(WeightsError, match=r"'3' \(id 4\), 'lamp' \(id 9\) are not COCO categories"):
        zoo_rows([{"id": 4, "name": "3"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "lamp"}], 0)


def test_import_teacher_then_pretrain_ake_and_distill_accept_it(coco_named, tmp_path, tmp_path_factory, capsys):
    name = "retinanet_resnet50_fpn_v2"
    model, path = zoo_file(name, tmp_path_factory)
    teacher = tmp_path / "teacher.pt"
    assert cli.main(["import-teacher", "--family", name, "--weights", str(path), "--data", str(coco_named),
                     "--out", str(teacher), "--set", f"data.size={SIZE}"]) == 0
    loaded, cfg = load_detector(teacher)
    assert cfg.model.torchvision_v2 and cfg.model.fpn_channels == 256 and cfg.data.size == SIZE
    head = loaded.model.head.classification_head.cls_logits.bias.view(9, 10)
    torch.testing.assert_close(head, model.head.classification_head.cls_logits.bias.view(9, 91)[:, COCO_INDEX])

    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump(to_dict(tiny_config(coco_named, epochs=1))))
    assert cli.main(["pretrain-ake", str(student), "--teacher", str(teacher), "--out", str(tmp_path / "ake"),
                     "--max-iters", "1", *AKE_SET]) == 0
    assert cli.main(["distill", str(student), "--teacher", str(teacher), "--ake", str(tmp_path / "ake" /
                     "ake.safetensors"), "--method", "unikd", "--out", str(tmp_path / "s"), "--max-iters", "1"]) == 0
    assert (tmp_path / "s" / "student.pt").is_file()
    capsys.readouterr()
    assert cli.main(["import-teacher", "--family", name, "--weights", str(path), "--data", str(coco_named),
                     "--out", str(teacher)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_import_teacher_refuses_weights_of_another_model_naming_the_keys(coco_named, tmp_path, tmp_path_factory,
                                                                         capsys):
    _, fcos = zoo_file("fcos_resnet50_fpn", tmp_path_factory)
    out = tmp_path / "t.pt"
    assert cli.main(["import-teacher", "--family", "retinanet_resnet50_fpn_v2", "--weights", str(fcos),
                     "--data", str(coco_named), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("unikd: error: the weights of zoo model retinanet_resnet50_fpn_v2 does not fit: ")
    # FCOS's towers are Sequentials of conv, GroupNorm, ReLU; RetinaNet v2's of Conv2dNormActivation blocks
    assert "24 missing: head.classification_head.conv.0.0.weight, head.classification_head.conv.0.1.bias" in err
    assert "34 unexpected: head.classification_head.conv.0.bias, head.classification_head.conv.0.weight" in err
    assert "and 29 more; 5 of the wrong shape" in err
    assert "backbone.fpn.extra_blocks.p6.weight (file [256, 256, 3, 3], model [256, 2048, 3, 3])" in err
    assert not out.exists()


def test_import_teacher_refuses_a_dataset_without_coco_names_and_an_unheld_zoo_model(tiny_digits, tmp_path,
                                                                                     tmp_path_factory, capsys):
    _, path = zoo_file("fcos_resnet50_fpn", tmp_path_factory)
    assert cli.main(["import-teacher", "--family", "fcos_resnet50_fpn", "--weights", str(path),
                     "--data", str(tiny_digits), "--out", str(tmp_path / "t.pt")]) == 2
    assert "the dataset's categories '0' (id 1), '1' (id 2)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no GroupNorm.*import retinanet_resnet50_fpn_v2"):
        zoo_config("retinanet_resnet50_fpn")
    with pytest.raises(ConfigError, match="model.torchvision_v2: family 'fcos' has no torchvision v2 variant"):
        build_detector(DetectorConfig(family="fcos", torchvision_v2=True), 3)
