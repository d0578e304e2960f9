"""benchmarks/teacher_rerun.py against a hand computation on two small results folders."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import teacher_rerun  # noqa: E402


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
        write(folder, "none_s0", {"AP": 0.05}, teacher="retinanet", method="none", seed=0)
    run(first, "retinanet", "fitnet", 0, 8.4)
    run(new, "retinanet", "fitnet", 0, 7.9)
    run(first, "retinanet", "unikd", 0, 6.9)
    run(new, "retinanet", "unikd", 0, 8.4)
    run(first, "fcos", "unikd", 0, 7.7)  # its teacher not trained again: in one folder only
    run(first / "deformable_detr", "retinanet", "unikd", 1, 11.0)
    run(new / "deformable_detr", "retinanet", "unikd", 1, 12.0)
    lines = teacher_rerun.comparison(first, new)
    assert "| RetinaNet | 29.2 | 28.7 | 22.6 | 21.9 |" in lines
    rows = [line for line in lines if "→" in line][1:]  # after the heading
    assert rows == ["| RetinaNet → RetinaNet | fitnet | 0 | 8.4 | 7.9 | -0.5 |",
                    "| RetinaNet → RetinaNet | unikd | 0 | 6.9 | 8.4 | +1.5 |",
                    "| RetinaNet → Deformable DETR | unikd | 1 | 11.0 | 12.0 | +1.0 |"]
    # differences -0.5, +1.5, +1.0: mean 0.67, sample std 1.04, mean absolute 1.0
    assert lines[-1] == "Over the 3 runs, new − first: 0.7 ± 1.0 AP; mean absolute difference 1.0 AP."


def test_no_run_in_both_folders_is_refused(tmp_path):
    run(tmp_path / "first", "retinanet", "fitnet", 0, 8.4)
    with pytest.raises(SystemExit, match="no FitNet or UniKD run is in both"):
        teacher_rerun.comparison(tmp_path / "first", tmp_path / "new")
