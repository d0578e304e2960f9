"""benchmarks/machine_rerun.py against a hand computation on two small results folders."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine_rerun  # noqa: E402


def write(folder: Path, name: str, metrics: dict, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"metrics": metrics, **extra}))


def run(folder: Path, teacher: str, method: str, seed: int, ap: float) -> None:
    write(folder, f"{teacher}_{method}_s{seed}", {"AP": ap / 100}, teacher=teacher, method=method, seed=seed)


def test_the_runs_in_both_folders_are_compared_against_a_hand_computation(tmp_path):
    first, new = tmp_path / "first", tmp_path / "new"
    for folder, teacher_ap, ake_ap in ((first, 29.2, 22.6), (new, 28.7, 21.9)):
        write(folder, "teacher_retinanet", {"AP": teacher_ap / 100})
        write(folder, "ake_retinanet", {"ake_val": {"AP": ake_ap / 100}})
    write(first, "none_s0", {"AP": 0.053}, teacher="faster_rcnn", method="none", seed=0)
    write(new, "none_s0", {"AP": 0.061}, teacher="retinanet", method="none", seed=0)
    write(new, "none_s1", {"AP": 0.07}, teacher="retinanet", method="none", seed=1)  # on one machine only
    run(first, "retinanet", "fitnet", 0, 8.4)
    run(new, "retinanet", "fitnet", 0, 7.9)
    run(first, "retinanet", "unikd", 0, 6.9)
    run(new, "retinanet", "unikd", 0, 8.4)
    run(first, "fcos", "unikd", 0, 7.7)  # its teacher not trained again: in one folder only
    write(first, "teacher_fcos", {"AP": 0.418})
    write(first / "atss", "teacher_atss", {"AP": 0.489})  # trained on both machines, no run on both yet
    write(new / "atss", "teacher_atss", {"AP": 0.45})
    run(first / "deformable_detr", "retinanet", "unikd", 1, 11.0)
    run(new / "deformable_detr", "retinanet", "unikd", 1, 12.0)
    lines = machine_rerun.comparison(first, new)
    assert "| RetinaNet | 29.2 | 28.7 | 22.6 | 21.9 |" in lines
    assert "| ATSS | 48.9 | 45.0 | – | – |" in lines
    assert "| FCOS |" not in "\n".join(lines)  # a teacher on one machine only
    start = lines.index("| student (R18) | method | teacher | seed | AP, first machine | AP, new machine | "
                        "new − first |")
    assert lines[start + 2:start + 6] == ["| RetinaNet | none | – | 0 | 5.3 | 6.1 | +0.8 |",
                                          "| RetinaNet | fitnet | RetinaNet | 0 | 8.4 | 7.9 | -0.5 |",
                                          "| RetinaNet | unikd | RetinaNet | 0 | 6.9 | 8.4 | +1.5 |",
                                          "| Deformable DETR | unikd | RetinaNet | 1 | 11.0 | 12.0 | +1.0 |"]
    # per kind: none +0.8; fitnet -0.5; unikd +1.5 and +1.0 (mean 1.25, sample std 0.35)
    assert lines[-3:] == ["- none: 1 run, new − first 0.8 AP, mean absolute difference 0.8 AP.",
                          "- fitnet: 1 run, new − first -0.5 AP, mean absolute difference 0.5 AP.",
                          "- unikd: 2 runs, new − first 1.2 ± 0.4 AP, mean absolute difference 1.2 AP."]


def test_no_run_in_both_folders_is_refused(tmp_path):
    run(tmp_path / "first", "retinanet", "fitnet", 0, 8.4)
    with pytest.raises(SystemExit, match="no run is in both"):
        machine_rerun.comparison(tmp_path / "first", tmp_path / "new")
