import json

import pytest
import yaml

from unikd import cli
from unikd.config import to_dict

from conftest import tiny_config


@pytest.fixture()
def tiny_yaml(tiny_digits, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_digits))))
    return path


def error_line(capsys) -> str:
    """The one line a user error prints; fails if stderr holds anything else (a traceback, a second line)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unikd: error: "), lines
    return lines[0]


def test_data_build_writes_a_coco_dataset(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["data", "build", "digits-det", "--out", str(out), "--train", "3", "--val", "2",
                     "--size", "48", "--seed", "5", "--heldout", "1"]) == 0
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and train["images"][0]["width"] == 48
    assert len(json.loads((out / "annotations" / "instances_val.json").read_text())["images"]) == 2
    assert len(json.loads((out / "annotations" / "instances_heldout.json").read_text())["images"]) == 1
    assert "ready" in capsys.readouterr().out


def test_train_resume_and_eval_from_the_command_line(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    common = [str(tiny_yaml), "--out", str(out), "--epochs", "2", "--seed", "1", "--device", "cpu"]
    assert cli.main(["train", *common, "--max-iters", "1"]) == 0
    first = json.loads((out / "eval.json").read_text())
    assert cli.main(["train", *common, "--resume"]) == 0  # continues from OUT/last.pt to the end
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == 4  # 2 epochs of 2 batches, eval records carry the step too
    final = json.loads((out / "eval.json").read_text())
    assert set(final) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(-1 <= v <= 1 for v in first.values())

    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "last.pt"), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(final)  # the same weights on the same split give the trainer's numbers
    assert json.loads((out / "eval_val.json").read_text()) == printed


def test_config_errors_exit_2_and_name_the_key(tiny_yaml, tmp_path, capsys):
    code = cli.main(["train", str(tiny_yaml), "--out", str(tmp_path / "x"), "--set", "train.lrr=1"])
    assert code == 2
    assert "unknown key 'train.lrr'" in error_line(capsys)
    code = cli.main(["train", str(tiny_yaml), "--out", str(tmp_path / "x"), "--set", "model.family=yolo"])
    assert code == 2
    assert "model.family" in error_line(capsys)


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere" in error_line(capsys)


def test_tensorboard_logging_writes_event_files(tiny_yaml, tmp_path):
    out = tmp_path / "tb"
    assert cli.main(["train", str(tiny_yaml), "--out", str(out), "--max-iters", "1",
                     "--set", "train.tensorboard=true"]) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- errors: the user's (one line) or a bug's


def test_the_project_errors_are_user_errors():
    from unikd.config import ConfigError
    from unikd.data import DatasetError
    from unikd.errors import UserError

    for cls in (ConfigError, DatasetError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)  # ValueError: for existing callers
    assert not issubclass(UserError, ValueError)


def test_invalid_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [0.1\n  epochs: 2\n")  # the parser's message spans several lines
    assert cli.main(["train", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.yaml: not valid YAML" in error_line(capsys)


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert cli.main(["eval", "--checkpoint", str(missing), "--device", "cpu"]) == 2
    assert str(missing) in error_line(capsys)


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["garbage", "torch-file-without-model"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content):
    import torch

    path = tmp_path / "wrong.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert str(path) in line and "not a checkpoint written by unikd" in line


def test_a_bad_device_is_one_line(tiny_yaml, tmp_path, capsys):
    assert cli.main(["train", str(tiny_yaml), "--out", str(tmp_path / "x"), "--device", "gpu"]) == 2
    assert "device 'gpu'" in error_line(capsys)


def test_data_build_into_a_bad_path_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way\n")
    assert cli.main(["data", "build", "digits-det", "--out", str(blocker / "d"), "--train", "1", "--val", "1",
                     "--size", "32"]) == 2
    assert f"cannot create the dataset folder {blocker / 'd'}" in error_line(capsys)
    assert cli.main(["data", "build", "digits-det", "--out", str(tmp_path / "d"), "--size", "8"]) == 2
    assert "size=8" in error_line(capsys)


def test_a_teacher_from_other_data_is_one_line(tiny_digits, tiny_yaml, tmp_path, capsys, monkeypatch):
    import unikd.jobs

    teacher_cfg = tiny_config(tiny_digits)
    teacher_cfg.data.size = 96

    def teacher(checkpoint, device, with_checkpoint=False):  # a checkpoint trained at another data.size
        return object(), teacher_cfg, {"meta": {"category_ids": list(range(1, 11))}}

    monkeypatch.setattr(unikd.jobs, "load_detector", teacher)
    assert cli.main(["pretrain-ake", str(tiny_yaml), "--teacher", "t.pt", "--out", str(tmp_path / "x")]) == 2
    assert "data.size=96" in error_line(capsys)


def test_a_bug_keeps_its_traceback(tiny_yaml, tmp_path, monkeypatch):
    import unikd.jobs

    def bug(*args, **kwargs):
        raise ValueError("internal bug")

    monkeypatch.setattr(unikd.jobs, "train_detector", bug)
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["train", str(tiny_yaml), "--out", str(tmp_path / "x")])
