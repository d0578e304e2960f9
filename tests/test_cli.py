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


def test_data_build_writes_a_coco_dataset(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["data", "build", "digits-det", "--out", str(out), "--train", "3", "--val", "2",
                     "--size", "48", "--seed", "5"]) == 0
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and train["images"][0]["width"] == 48
    assert len(json.loads((out / "annotations" / "instances_val.json").read_text())["images"]) == 2
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
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    code = cli.main(["train", str(tiny_yaml), "--out", str(tmp_path / "x"), "--set", "model.family=yolo"])
    assert code == 2
    assert "model.family" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_tensorboard_logging_writes_event_files(tiny_yaml, tmp_path):
    out = tmp_path / "tb"
    assert cli.main(["train", str(tiny_yaml), "--out", str(out), "--max-iters", "1",
                     "--set", "train.tensorboard=true"]) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--data", str(tmp_path / "data")]) == 0
    assert "AP" in capsys.readouterr().out
    assert (tmp_path / "demo" / "eval.json").exists()
