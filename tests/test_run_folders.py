"""An --out folder holds one run: a second run is refused unless --resume or --overwrite; data build writes
only into an empty folder or its own earlier build. Each refusal is one line with exit status 2."""
import json

import pytest
import torch
import yaml

from unikd import cli
from unikd.config import to_dict

from conftest import tiny_config


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unikd: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def tiny_yaml(tiny_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_digits, epochs=1))))
    return path


@pytest.fixture(scope="module")
def finished(tiny_yaml, tmp_path_factory):
    """A run of one step, finished (checkpoint, metrics, eval.json)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(["train", str(tiny_yaml), "--out", str(out), "--max-iters", "1"]) == 0
    return out


def snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_second_run_into_the_same_out_is_refused_and_nothing_is_touched(tiny_yaml, finished, capsys):
    before = snapshot(finished)
    assert cli.main(["train", str(tiny_yaml), "--out", str(finished), "--max-iters", "1"]) == 2
    line = error_line(capsys)
    assert f"--out {finished} holds another run (checkpoints, last.pt, metrics.jsonl, eval.json)" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(finished) == before


def test_overwrite_replaces_the_run_but_not_other_files(tiny_yaml, finished, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name, data in snapshot(finished).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    (out / "last.pt").unlink()
    (out / "last.pt").symlink_to("checkpoints/step_00000001.pt")
    (out / "checkpoints" / "step_00000099.pt").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", str(tiny_yaml), "--out", str(out), "--max-iters", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two steps and the evaluation, no record of the first run
    assert (out / "notes.txt").read_text() == "mine"


def test_a_log_file_alone_is_not_a_run(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("$ unikd train ...\n")  # what benchmarks/runner.py writes first
    assert cli.main(["train", str(tiny_yaml), "--out", str(out), "--max-iters", "1"]) == 0
    assert (out / "train.log").read_text() == "$ unikd train ...\n"


def test_resume_may_change_threads_and_logging_but_not_the_rate(tiny_yaml, finished, capsys):
    assert cli.main(["train", str(tiny_yaml), "--out", str(finished), "--resume", "--set", "train.lr=0.5"]) == 2
    assert "train.lr: 0.01 -> 0.5" in error_line(capsys)
    assert cli.main(["train", str(tiny_yaml), "--out", str(finished), "--resume", "--max-iters", "1",
                     "--set", "train.threads=1", "--set", "train.log_every=50"]) == 0  # as the benchmark runner


def test_an_out_that_is_a_file_is_one_line(tiny_yaml, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["train", str(tiny_yaml), "--out", str(blocker)]) == 2
    assert f"--out {blocker} is a file" in error_line(capsys)


def test_an_out_that_cannot_be_written_is_one_line(tiny_yaml, capsys):
    # sysfs takes no new files or folders, even from root (the tests run as root, where modes do not apply)
    for out, reason in (("/sys/kernel", "Permission denied"), ("/sys/unikd-out", "Operation not permitted")):
        assert cli.main(["train", str(tiny_yaml), "--out", out]) == 2
        assert f"cannot write to --out {out}: {reason}" in error_line(capsys)


def test_data_build_refuses_a_folder_with_other_files(tmp_path, capsys):
    user = tmp_path / "coco"
    (user / "images").mkdir(parents=True)
    (user / "images" / "a.png").write_bytes(b"user image")
    (user / "annotations").mkdir()
    (user / "annotations" / "instances_train.json").write_text("{}")
    args = ["data", "build", "digits-det", "--train", "2", "--val", "1", "--size", "32"]
    assert cli.main([*args, "--out", str(user)]) == 2
    assert f"{user} is not empty and was not made by 'unikd data build' (annotations, images)" in error_line(capsys)
    assert (user / "images" / "a.png").read_bytes() == b"user image"
    assert (user / "annotations" / "instances_train.json").read_text() == "{}"


def test_data_build_rewrites_its_own_build_and_finishes_an_interrupted_one(tmp_path):
    out = tmp_path / "d"
    args = ["data", "build", "digits-det", "--out", str(out), "--val", "1", "--size", "32"]
    assert cli.main([*args, "--train", "2"]) == 0
    assert cli.main([*args, "--train", "3"]) == 0  # other parameters: its own build is rebuilt
    assert len(json.loads((out / "annotations" / "instances_train.json").read_text())["images"]) == 3
    (out / "meta.json").unlink()  # as if killed mid-build: the manifest remains
    assert cli.main([*args, "--train", "3"]) == 0 and (out / "meta.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["data", "build", "digits-det", "--out", str(empty), "--train", "1", "--val", "1",
                     "--size", "32"]) == 0


def variant(tiny_digits, root, edit):
    """The val split of ``tiny_digits`` under ``root`` (same images), its JSON changed by ``edit(data)``."""
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(tiny_digits / "images")
    data = json.loads((tiny_digits / "annotations" / "instances_val.json").read_text())
    edit(data)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def test_a_checkpoint_from_another_data_category_set_is_refused_by_eval(finished, tiny_digits, tmp_path, capsys):
    def shift_ids(data):
        for c in data["categories"]:
            c["id"] += 10
        for a in data["annotations"]:
            a["category_id"] += 10

    def rename(data):
        data["categories"][3]["name"] = "three"

    def drop_nine(data):
        data["categories"] = [c for c in data["categories"] if c["id"] != 10]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 10]

    def add_one(data):
        data["categories"].append({"id": 11, "name": "ten"})

    ckpt = str(finished / "last.pt")
    cases = [(shift_ids, "the data has category ids [11, 12,"), (rename, "id: trained vs data) 4: '3' vs 'three'"),
             (drop_nine, "has category ids [10] that the data lacks (pass --subset"),
             (add_one, "the data has category ids [11] that checkpoint")]
    for edit, message in cases:
        root = variant(tiny_digits, tmp_path / edit.__name__, edit)
        assert cli.main(["eval", "--checkpoint", ckpt, "--data", str(root), "--device", "cpu"]) == 2
        line = error_line(capsys)
        assert f"checkpoint {ckpt} does not fit the data" in line and message in line, line
    assert cli.main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "drop_nine"), "--device", "cpu",
                     "--subset", "--out", str(tmp_path / "m.json")]) == 0
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_the_last_pt_of_an_ake_or_distill_run_passed_to_eval_is_one_line(finished, tmp_path, capsys):
    ckpt = torch.load(finished / "last.pt", weights_only=True)
    ckpt["model"] = {f"student.{k}": v for k, v in ckpt["model"].items()}  # a DistillationModel's keys
    ckpt["meta"]["teacher"] = {"family": "faster_rcnn"}
    path = tmp_path / "distill_last.pt"
    torch.save(ckpt, path)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert f"{path} is not a detector checkpoint: it is the checkpoint of a 'pretrain-ake' or 'distill' run" in line


def test_report_refuses_data_with_other_categories(finished, tiny_digits, tmp_path, capsys):
    def rename(data):
        data["categories"][0]["name"] = "zero"

    root = variant(tiny_digits, tmp_path / "renamed", rename)
    assert cli.main(["report", str(finished), "--out", str(tmp_path / "report"), "--data", str(root)]) == 2
    assert f"run {finished} does not fit the data: category names differ (id: trained vs data) 1: '0' vs 'zero'" \
        in error_line(capsys)
