import os
from pathlib import Path

import pytest
import yaml

from unikd.config import ExperimentConfig, from_dict, to_dict

# Small AKEs for the command-line tests (`unikd pretrain-ake ... *AKE_SET`).
AKE_SET = ["--set", "ake.d_model=32", "--set", "ake.n_queries=10", "--set", "ake.n_heads=4",
           "--set", "ake.n_points=2", "--set", "ake.d_ffn=64"]


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """A real digits-det build, tiny: 8 train and 4 val images of 64 px."""
    from unikd.data import build_digits_det

    return build_digits_det(tmp_path_factory.mktemp("digits") / "digits-det", seed=0, n_train=8, n_val=4, size=64)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A COCO-format train split of three images, one box each: landscape 150x100 (W x H), portrait 90x120 and
    400x80, whose longer side limits a shorter-side resize (tests/test_resize.py)."""
    from test_coco_data import ann, write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes"), [(1, 150, 100), (2, 90, 120), (3, 400, 80)], [
        ann(1, 1, [20, 10, 60, 40]), ann(2, 2, [10, 30, 50, 70]), ann(3, 3, [300, 20, 80, 40]),
    ])


def tiny_config(root, family="retinanet", **train) -> ExperimentConfig:
    """A small but real experiment: R18 with a 32-channel FPN on 64-px images, batch 4."""
    values = to_dict(ExperimentConfig())
    values["data"].update(root=str(root), size=64, batch_size=4, hflip=0.5)
    values["model"].update(family=family, backbone="resnet18", fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128],
                           rpn_pre_nms_top_n=100, rpn_post_nms_top_n=50, box_batch_size_per_image=64)
    values["train"].update({"epochs": 2, "warmup_iters": 2, "log_every": 1, "threads": 1, "device": "cpu", **train})
    return from_dict(values)


def teacher_and_student(data, root: Path, family: str, teacher_iters: int) -> tuple[Path, Path]:
    """A tiny ``family`` teacher trained ``teacher_iters`` iterations through the command line into
    ``root/teacher``, and the RetinaNet student's YAML (one epoch): (the teacher's ``last.pt``, the YAML)."""
    from unikd import cli

    teacher_yaml, student_yaml = root / "teacher.yaml", root / "student.yaml"
    teacher_yaml.write_text(yaml.safe_dump(to_dict(tiny_config(data, family, max_iters=teacher_iters))))
    assert cli.main(["train", str(teacher_yaml), "--out", str(root / "teacher")]) == 0
    student_yaml.write_text(yaml.safe_dump(to_dict(tiny_config(data, "retinanet", epochs=1))))
    return root / "teacher" / "last.pt", student_yaml


def pretrain_akes(student_yaml: Path, teacher: Path, out: Path, iters: int) -> None:
    """Small AKEs (:data:`AKE_SET`) on ``teacher`` for ``iters`` iterations through the command line, into ``out``."""
    from unikd import cli

    assert cli.main(["pretrain-ake", str(student_yaml), "--teacher", str(teacher), "--out", str(out),
                     "--max-iters", str(iters), *AKE_SET]) == 0


def pytest_collection_modifyitems(config, items):
    """Under mutmut (``make mutation``), which passes the tests fastest first, keep its order of the files (by
    their fastest test) but run each file's tests in file order, as ``make test`` does, so that a test that
    depends on an earlier one's module fixture does not read as a kill."""
    if "MUTANT_UNDER_TEST" in os.environ:
        first = {}
        for index, item in enumerate(items):
            first.setdefault(item.location[0], index)
        items.sort(key=lambda item: (first[item.location[0]], item.location[1]))
