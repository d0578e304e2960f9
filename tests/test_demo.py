"""``unikd demo`` and ``unikd report``: the whole main job at tiny size, its reuse of finished stages, the
report's files, and the sampling points of Fig. 4 against the attention's own."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from unikd import cli
from unikd import demo as demo_module
from unikd.config import AKEConfig
from unikd.demo import Journal, Stage, run_stage
from unikd.distill import KnowledgeExtractors
from unikd.errors import UserError
from unikd.transformer import Memory, msda

FIGURES = {"map.png", "training_curves.png", "activation_maps.png", "sampling_points.png", "detections.png"}
STUDENTS = ("student_none", "student_fitnet", "student_unikd")


def assert_valid_pngs(folder: Path) -> None:
    pngs = {p.name: p for p in folder.glob("*.png")}
    assert set(pngs) == FIGURES
    for path in pngs.values():
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            image.verify()  # a truncated or corrupt file raises
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 0 and image.height > 0


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One ``unikd demo --quick``: every stage a few iterations on 64-px images."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "demo"
    args = ["demo", "--quick", "--threads", "1", "--out", str(out), "--data", str(root / "data")]
    assert cli.main(args) == 0
    return out, args


def test_quick_demo_trains_every_stage_and_writes_the_report(quick_demo, capsys):
    out, _ = quick_demo
    for stage, done in [("teacher", "eval.json"), ("ake", "ake.safetensors"), *((s, "student.pt") for s in STUDENTS)]:
        assert (out / stage / done).is_file(), stage
    report = (out / "report" / "report.md").read_text()
    for row in ("| teacher |", "| student alone |", "| FitNet |", "| UniKD |"):
        assert row in report
    for name in FIGURES:
        assert f"]({name})" in report
    assert report.count("`unikd ") == 6  # the command of every stage but the report itself
    assert "Not drawn" not in report
    assert_valid_pngs(out / "report")
    journal = json.loads((out / "demo.json").read_text())
    assert all(s["finished"] and s["seconds"] >= 0 for s in journal["stages"].values())


def test_a_second_demo_resumes_the_unfinished_stage_and_skips_the_rest(quick_demo, capsys):
    out, args = quick_demo
    unikd = out / "student_unikd"
    for name in ("student.pt", "eval.json"):  # as if stopped after its last checkpoint
        (unikd / name).unlink()
    lines_before = {s: (out / s / "metrics.jsonl").read_text() for s in ("teacher", "ake", "student_none")}
    report_before = (out / "report" / "report.md").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"continuing from {unikd / 'last.pt'}" in printed
    assert printed.count("done already") == 5  # data, teacher, AKE, student alone, FitNet
    assert (unikd / "student.pt").is_file()
    assert {s: (out / s / "metrics.jsonl").read_text() for s in lines_before} == lines_before
    assert (out / "report" / "report.md").stat().st_mtime_ns > report_before  # a stage ran: the report is redone

    assert cli.main(args) == 0  # everything done: nothing runs, the report stays
    printed = capsys.readouterr().out
    assert printed.count("done already") == 7 and "$ unikd" not in printed
    assert "| UniKD |" in printed


def test_report_command_rebuilds_the_report_from_the_run_folders(quick_demo, tmp_path, capsys):
    out, _ = quick_demo
    runs = [str(out / name) for name in ("teacher", "ake", *STUDENTS)]
    assert cli.main(["report", *runs, "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| teacher |" in report and "| UniKD |" in report
    assert "## Stages" not in report  # commands and times come with a demo folder only
    assert_valid_pngs(tmp_path / "r")
    assert cli.main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "x")]) == 2
    assert "holds no finished unikd run" in capsys.readouterr().err


def test_a_demo_folder_of_another_scale_is_refused(quick_demo, tmp_path, capsys):
    out, _ = quick_demo
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    journal = json.loads((copy / "demo.json").read_text())
    journal["seed"] = 1
    (copy / "demo.json").write_text(json.dumps(journal))
    assert cli.main(["demo", "--quick", "--out", str(copy), "--data", str(tmp_path / "data")]) == 2
    assert "another scale or seed" in capsys.readouterr().err


def test_without_matplotlib_the_demo_stops_at_once_and_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--data", str(tmp_path / "data")]) == 2
    assert "pip install 'unikd[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing was built or trained


def fake_stage(tmp_path: Path, ran: list) -> Stage:
    cfg = demo_module.stage_configs(demo_module.QUICK, tmp_path / "data")["teacher"]
    folder = tmp_path / "teacher"
    return Stage("teacher", "a stage", ["unikd", "train"], folder, folder / "eval.json", config=cfg,
                 run=lambda resume: ran.append(resume) or (folder / "eval.json").write_text("{}"))


def test_run_stage_skips_a_finished_stage_and_resumes_from_last_pt(tmp_path):
    ran = []
    journal = Journal.open(tmp_path / "demo.json", demo_module.QUICK, 0)
    stage = fake_stage(tmp_path, ran)
    stage.folder.mkdir()
    (stage.folder / "last.pt").write_text("")
    (stage.folder / "config.yaml").write_text("")  # written by another config: refused
    with pytest.raises(UserError, match="another config"):
        run_stage(stage, journal)
    (stage.folder / "config.yaml").unlink()
    with pytest.raises(UserError, match="did not make"):  # a checkpoint without the demo's config
        run_stage(stage, journal)
    (stage.folder / "last.pt").unlink()
    assert run_stage(stage, journal) and ran == [None]
    (stage.folder / "eval.json").unlink()
    (stage.folder / "last.pt").write_text("")
    assert run_stage(stage, journal) and ran == [None, stage.folder / "last.pt"]
    assert not run_stage(stage, journal) and len(ran) == 2
    assert json.loads((tmp_path / "demo.json").read_text())["stages"]["teacher"]["finished"]


def test_a_dataset_of_other_parameters_is_refused_not_overwritten(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"n_train": 2000, "n_val": 500, "size": 128, "seed": 0}))
    with pytest.raises(UserError, match="other parameters"):
        demo_module.plan(tmp_path / "out", data, demo_module.QUICK)
    assert json.loads((data / "meta.json").read_text())["n_train"] == 2000


@pytest.mark.parametrize("pillow", ["12.3.0", None])
def test_a_dataset_of_another_or_an_unknown_pillow_is_refused_not_reused(tmp_path, pillow):
    data = tmp_path / "data"
    data.mkdir()
    q = demo_module.QUICK
    meta = {"n_train": q.n_train, "n_val": q.n_val, "size": q.size, "seed": 0, "min_side": q.min_side,
            "max_digits": q.max_digits}
    (data / "meta.json").write_text(json.dumps(meta | {"pillow": importlib.metadata.version("pillow")}))
    assert demo_module.plan(tmp_path / "out", data, q)[0].done.exists()  # this Pillow's build: reused
    (data / "meta.json").write_text(json.dumps(meta | ({"pillow": pillow} if pillow else {})))
    with pytest.raises(UserError, match=f"Pillow {pillow or '.unknown.'}, not this environment's"):
        demo_module.plan(tmp_path / "out", data, q)
    assert json.loads((data / "meta.json").read_text()).get("pillow") == pillow


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_sampling_locations_are_those_the_attention_samples(reference_dim, monkeypatch):
    torch.manual_seed(0)
    cfg = AKEConfig(d_model=32, n_queries=5, n_heads=4, n_points=2, d_ffn=64)
    ake = KnowledgeExtractors(cfg, 3, 16, 4).ct
    attn = ake.extractor[0].cross_attn
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)  # queries of their own, not the initial circle
    torch.nn.init.normal_(attn.attention_weights.weight)
    levels = [torch.randn(2, 16, s, s) for s in (8, 4, 2)]
    memory = Memory.from_levels(levels, torch.rand(2, 3, 2) * 0.5 + 0.5)
    query = torch.randn(2, 5, 32)
    reference = torch.rand(2, 5, reference_dim) * 0.5 + 0.25
    level_reference = memory.level_reference(reference)

    seen = {}
    real = msda.ms_deform_attn

    def spy(value, shapes, locations, weights):
        seen.update(locations=locations, weights=weights)
        return real(value, shapes, locations, weights)

    monkeypatch.setattr(msda, "ms_deform_attn", spy)
    attn(query, level_reference, memory.tokens, memory.spatial_shapes)
    locations, weights = attn.sampling_locations(query, level_reference, memory.spatial_shapes)
    torch.testing.assert_close(locations, seen["locations"])
    torch.testing.assert_close(weights, seen["weights"])
