"""benchmarks/matrix_analysis.py against hand computations on a small results folder."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import matrix_analysis  # noqa: E402


def step(det: float, kd_ct: float, kd_pos: float = 0.0) -> dict:
    """One logged step: two detection losses summing to ``det``, the weighted KD losses, their total."""
    return {"step": 50, "classification": det / 2, "bbox_regression": det / 2, "loss_kd_ct": kd_ct,
            "loss_kd_pos": kd_pos, "loss": det + kd_ct + kd_pos}


@pytest.fixture
def results(tmp_path):
    def write(folder, name, ap, **extra):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps({"metrics": {"AP": ap / 100}, **extra}))

    for t, teacher_ap, ake_ap in (("retinanet", 29.0, 22.0), ("fcos", 33.0, 31.0), ("atss", 30.0, 15.0)):
        write(tmp_path, f"teacher_{t}", teacher_ap)
        (tmp_path / f"ake_{t}.json").write_text(json.dumps({"metrics": {"ake_val": {"AP": ake_ap / 100}}}))
    aps = {"none": {0: 10.0, 1: 14.0},
           ("fitnet", "retinanet"): {0: 12.0, 1: 16.0}, ("unikd", "retinanet"): {0: 15.0, 1: 17.0},
           ("fitnet", "fcos"): {0: 9.0, 1: 15.0}, ("unikd", "fcos"): {0: 11.0, 1: 13.0},
           ("fitnet", "atss"): {0: 13.0}, ("unikd", "atss"): {0: 12.0}}
    for seed, ap in aps["none"].items():
        write(tmp_path, f"none_s{seed}", ap, seed=seed, method="none", teacher="retinanet",
              curve=[{"step": 50, "loss": 3.0, "classification": 2.0, "bbox_regression": 1.0}])
    curves = {("unikd", "retinanet", 0): [step(2.0, 0.6, 0.4), step(1.0, 0.3, 0.2)],  # 0.50 -> 0.50
              ("unikd", "retinanet", 1): [step(1.0, 0.5, 0.5), step(1.0, 0.1, 0.1)],  # 1.00 -> 0.20
              ("fitnet", "retinanet", 0): [step(4.0, 1.0), step(2.0, 1.0)]}  # 0.25 -> 0.50; seed 1 kept none
    for key, per_seed in aps.items():
        if key == "none":
            continue
        method, teacher = key
        for seed, ap in per_seed.items():
            write(tmp_path, f"{teacher}_{method}_s{seed}", ap, seed=seed, method=method, teacher=teacher,
                  curve=curves.get((method, teacher, seed), []))
    write(tmp_path / "fcos", "none_s0", 20.0, seed=0, method="none", teacher="retinanet")
    write(tmp_path / "fcos", "retinanet_fitnet_s0", 21.0, seed=0, method="fitnet", teacher="retinanet")
    return tmp_path


def test_kd_share_is_the_distillation_over_the_detection_losses():
    detection = {"classification", "bbox_regression"}
    assert matrix_analysis.kd_share(step(2.0, 0.6, 0.4), detection) == pytest.approx(0.5)
    fitnet = {"step": 50, "loss": 3.0, "loss_class_0": 1.0, "loss_giou": 1.5, "loss_fitnet": 0.5}
    assert matrix_analysis.kd_share(fitnet, {"loss_class_0", "loss_giou"}) == pytest.approx(0.2)


def test_analysis_tables_against_a_hand_computation(results):
    lines = matrix_analysis.analysis(results)
    # gains per seed against the student alone (10, 14): FitNet +2 +2, UniKD +5 +3; UniKD - FitNet +3 +1;
    # KD/det: UniKD median(0.5, 1.0) -> median(0.5, 0.2); FitNet one curve 0.25 -> 0.5
    assert "| RetinaNet → RetinaNet | 0.25 → 0.50 | 0.75 → 0.35 | +2.0 | +4.0 | +2.0 |" in lines
    assert "| FCOS → RetinaNet | – | – | +0.0 | +0.0 | +0.0 |" in lines
    assert "| ATSS → RetinaNet | – | – | +3.0 | +2.0 | -1.0 |" in lines
    assert "| RetinaNet → FCOS | – | – | +1.0 | – | – |" in lines
    # per teacher: the RetinaNet teacher taught two students with FitNet (+2, +1) and one with UniKD
    assert "| RetinaNet | 29.0 | 22.0 | 1 | +1.5 | +4.0 | +2.0 |" in lines
    assert "| ATSS | 30.0 | 15.0 | 1 | +3.0 | +2.0 | -1.0 |" in lines
    assert "| RetinaNet | 12.0 ± 2.8 | 3 | +1.7 | +2.0 | +0.3 |" in lines
    assert "| FCOS | 20.0 | 0 | +1.0 | – | – |" in lines
    text = "\n".join(lines)
    # UniKD's gain (+4, 0, +2) against the content AKE AP (22, 31, 15): ranks (3, 1, 2) and (2, 3, 1)
    assert "UniKD's gain against the teacher's content AKE AP ρ = -0.50 (n = 3)" in text
    # only one cell has a UniKD curve: too few points for a correlation
    assert "UniKD's gain against its KD/det ratio at the first step – (n = 1)" in text
    # UniKD ran into one student only: its alone AP is the same for the three cells, no ranking
    assert "UniKD's gain against the student alone's AP – (n = 3)" in text


def test_analysis_refuses_a_folder_without_stage_2_runs(tmp_path):
    with pytest.raises(SystemExit, match="no finished stage-2 run"):
        matrix_analysis.analysis(tmp_path)


def test_ake_aps_reads_stage_1_from_whichever_student_folder_recorded_it(results):
    # the ATSS teacher's stage 1 recorded only beside the ATSS student (its first student), not the RetinaNet one
    (results / "atss").mkdir()
    (results / "ake_atss.json").rename(results / "atss" / "ake_atss.json")
    assert matrix_analysis.ake_aps(results) == pytest.approx({"retinanet": 22.0, "fcos": 31.0, "atss": 15.0})


def test_the_seeds_table_lists_each_seed_of_the_cells_with_two_and_counts_sign_changes(results):
    lines = matrix_analysis.analysis(results)
    start = lines.index("| teacher → student | seed | alone AP | FitNet AP | UniKD AP | UniKD − FitNet |")
    assert lines[start + 2:start + 6] == [
        "| RetinaNet → RetinaNet | 0 | 10.0 | 12.0 | 15.0 | +3.0 |",
        "| RetinaNet → RetinaNet | 1 | 14.0 | 16.0 | 17.0 | +1.0 |",
        "| FCOS → RetinaNet | 0 | 10.0 | 9.0 | 11.0 | +2.0 |",
        "| FCOS → RetinaNet | 1 | 14.0 | 15.0 | 13.0 | -2.0 |"]
    # ATSS ran one seed: not listed; FCOS's edge goes from +2 to -2, RetinaNet's stays positive
    assert lines[start + 6:] == ["", "UniKD − FitNet changes sign from one seed to another in 1 of these 2 cells."]


def test_seed_rows_keep_the_seeds_both_methods_ran_and_mark_a_missing_alone():
    rows = matrix_analysis.seed_rows({0: 5.0}, {0: 6.0, 1: 7.0, 2: 8.0}, {0: 9.0, 2: 7.5})
    assert rows == [(0, 5.0, 6.0, 9.0, 3.0), (2, None, 8.0, 7.5, -0.5)]
