"""The two stages from the command line, end to end on a tiny digits-det: teacher → AKE → distilled student."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from unikd import cli
from unikd.config import to_dict
from unikd.engine.checkpoint import load_checkpoint

from conftest import pretrain_akes, teacher_and_student, tiny_config


@pytest.fixture(scope="module")
def stage_inputs(tiny_digits, tmp_path_factory):
    """A tiny Faster R-CNN teacher (2 iterations), its AKEs (2 iterations), and the student YAML."""
    root = tmp_path_factory.mktemp("stages")
    teacher, student_yaml = teacher_and_student(tiny_digits, root, "faster_rcnn", teacher_iters=2)
    pretrain_akes(student_yaml, teacher, root / "ake", iters=2)
    return root, student_yaml


def test_pretrain_ake_writes_the_ake_and_its_report(stage_inputs):
    root, _ = stage_inputs
    report = json.loads((root / "ake" / "report.json").read_text())
    assert set(report["ake_val"]) >= {"AP", "AP50", "APs"}
    assert report["ake_train_seconds"] > 0 and report["teacher_train_seconds"] > 0
    assert report["fraction_of_teacher_training"] == pytest.approx(
        report["ake_train_seconds"] / report["teacher_train_seconds"])
    assert (root / "ake" / "ake.safetensors").is_file()
    ckpt = load_checkpoint(root / "ake" / "last.pt")
    assert not any(k.startswith("teacher") for k in ckpt["model"])  # checkpoints hold the AKEs only


def test_distill_each_method_and_eval_the_student(stage_inputs, tmp_path, capsys):
    root, student_yaml = stage_inputs
    teacher = str(root / "teacher" / "last.pt")
    ake = str(root / "ake" / "ake.safetensors")
    for method in ("unikd", "fitnet"):
        out = tmp_path / method
        assert cli.main(["distill", str(student_yaml), "--teacher", teacher, "--ake", ake, "--method", method,
                         "--out", str(out), "--max-iters", "2"]) == 0
        losses = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert {"unikd": "loss_kd_ct", "fitnet": "loss_fitnet"}[method] in losses
        assert cli.main(["eval", "--checkpoint", str(out / "student.pt")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(
            (out / "eval.json").read_text())


def test_zero_lambdas_train_exactly_like_no_distillation(stage_inputs, tmp_path):
    root, student_yaml = stage_inputs
    common = ["--teacher", str(root / "teacher" / "last.pt"), "--max-iters", "3"]
    assert cli.main(["distill", str(student_yaml), *common, "--method", "none", "--out", str(tmp_path / "none")]) == 0
    assert cli.main(["distill", str(student_yaml), *common, "--method", "unikd", "--ake",
                     str(root / "ake" / "ake.safetensors"), "--set", "distill.lambda_ct=0", "--set",
                     "distill.lambda_pos=0", "--out", str(tmp_path / "zero")]) == 0
    a = load_checkpoint(tmp_path / "none" / "student.pt")["model"]
    b = load_checkpoint(tmp_path / "zero" / "student.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    kd = json.loads((tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()[0])
    assert kd["loss_kd_ct"] == 0 and kd["loss_kd_pos"] == 0  # the distiller ran, with zero weight


def test_stage2_refuses_an_ake_of_another_teacher(stage_inputs, tiny_digits, tmp_path, capsys):
    root, student_yaml = stage_inputs
    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_digits, "faster_rcnn", max_iters=1, seed=1))))
    assert cli.main(["train", str(other_yaml), "--out", str(tmp_path / "other")]) == 0
    code = cli.main(["distill", str(student_yaml), "--teacher", str(tmp_path / "other" / "last.pt"), "--ake",
                     str(root / "ake" / "ake.safetensors"), "--out", str(tmp_path / "refused"), "--max-iters", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "trained for another teacher" in err and "weights_sha256" in err
    assert cli.main(["distill", str(student_yaml), "--teacher", str(root / "teacher" / "last.pt"),
                     "--out", str(tmp_path / "no_ake"), "--method", "unikd"]) == 2
    assert "needs --ake" in capsys.readouterr().err


def test_the_readme_python_api_example_runs(stage_inputs, tiny_digits, tmp_path, monkeypatch):
    root, _ = stage_inputs
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("<!-- api-example -->\n```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "runs").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "runs" / "teacher").symlink_to(root / "teacher")
    (tmp_path / "runs" / "ake").symlink_to(root / "ake")
    (tmp_path / "cache" / "digits-det").symlink_to(tiny_digits)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["losses"]) >= {"loss_kd_ct", "loss_kd_pos", "classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in scope["losses"].values())
    adaptor_weight = scope["distiller"].adaptor.proj[0].weight
    assert adaptor_weight.grad is not None and adaptor_weight.grad.abs().sum() > 0
