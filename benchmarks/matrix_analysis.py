"""Issue 13's analysis of the teacher × student matrix, from its JSONs alone: what each cell's gain goes with.

    python benchmarks/matrix_analysis.py [--results benchmarks/results/matrix_1k] [--doc docs/results.md]

Four tables, a section of ``--doc``:

- **Loss scales**, per cell: the distillation losses (the logged total minus the detection losses, those that the
  same student logs when trained alone) over the detection losses, at the first and at the last logged step of
  each run (``curve``), median over its seeds, beside the cell's gains over the student alone and UniKD's over FitNet.
- **The AKEs**, per teacher: the teacher's AP, its content AKE's AP (stage 1's ``ake_val``), and the mean gains
  of FitNet and UniKD over the students it taught.
- **The students**, per student: the student alone's AP (how far from converged) and the mean gains over the
  teachers.
- **The seeds**, per seed of each cell that FitNet and UniKD ran on more than one seed: the APs and UniKD − FitNet,
  then how many of those cells change the sign of UniKD − FitNet from one seed to another.

Then Spearman's rank correlations over the cells, each with its ``n``: few points, so read as a
direction, not as a test. Gains are per seed against the student alone of the same seed, as in matrix.py.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

from scipy.stats import spearmanr

from distillation import METHODS, ROOT, TITLES, load_results, mean_std, student_folder
from doc_sections import replace_section
from matrix import ORDER, Cells, collect, gains, load_students, shown, teachers_of


def detection_keys(runs: dict[str, dict]) -> set[str]:
    """The student's detection losses: what its runs alone log besides the total (empty when none kept a curve)."""
    return {k for r in runs.values() if r.get("method") == "none" and r.get("curve") for k in r["curve"][0]} - {
        "step", "loss"}


def kd_share(record: dict, detection: set[str]) -> float:
    """Distillation over detection loss in one logged step: the total minus the ``detection`` losses, over them."""
    det = sum(record[k] for k in detection)
    return (record["loss"] - det) / det


def shares(runs: dict[str, dict], method: str, teacher: str) -> tuple[float, float] | None:
    """Median over the seeds of :func:`kd_share` at the first and at the last logged step of the runs of
    ``method`` with ``teacher``; None when none of them kept its curve or the student alone kept none."""
    detection = detection_keys(runs)
    curves = [r["curve"] for r in runs.values()
              if r.get("method") == method and r.get("teacher") == teacher and r.get("curve")]
    if not curves or not detection:
        return None
    return (statistics.median(kd_share(c[0], detection) for c in curves),
            statistics.median(kd_share(c[-1], detection) for c in curves))


def mean_gain(runs: dict[int, float], base: dict[int, float]) -> float | None:
    diffs = gains(runs, base)
    return statistics.mean(diffs) if diffs else None


def fmt(value: float | None, signed: bool = False) -> str:
    """One decimal, ``+`` with ``signed``, ``–`` for None; a value that rounds to zero shows as ``+0.0``."""
    return "–" if value is None else f"{round(value, 1) + 0.0:{'+' if signed else ''}.1f}"


def rank_correlation(xs: list[float | None], ys: list[float | None]) -> str:
    """``ρ = 0.43 (n = 7)`` over the pairs where both are known; ``–`` under 3 pairs or when either side is
    constant (no ranking to correlate)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3 or min(len({x for x, _ in pairs}), len({y for _, y in pairs})) < 2:
        return f"– (n = {len(pairs)})"
    rho = spearmanr([x for x, _ in pairs], [y for _, y in pairs]).statistic
    return f"ρ = {rho:.2f} (n = {len(pairs)})"


def ake_aps(results: Path) -> dict[str, float]:
    """The content AKE's val AP (%) per teacher, from ``ake_TEACHER.json`` in any student's folder of ``results``
    (stage 1 is recorded beside the first student it ran for, not always the RetinaNet one)."""
    return {name[len("ake_"):]: 100 * r["metrics"]["ake_val"]["AP"] for s in ORDER
            for name, r in load_results(student_folder(results, s)).items() if name.startswith("ake_")}


def teacher_aps(students: dict[str, dict[str, dict]]) -> dict[str, float]:
    return {name[len("teacher_"):]: 100 * r["metrics"]["AP"]
            for runs in students.values() for name, r in runs.items() if name.startswith("teacher_")}


def seed_rows(alone: dict[int, float], fitnet: dict[int, float], unikd: dict[int, float]) -> list[tuple]:
    """``(seed, alone AP, FitNet AP, UniKD AP, UniKD − FitNet)`` per seed that both methods ran (alone None
    where the student alone did not run that seed)."""
    return [(seed, alone.get(seed), fitnet[seed], unikd[seed], unikd[seed] - fitnet[seed])
            for seed in sorted(fitnet) if seed in unikd]


def seeds_table(alone: dict[str, dict[int, float]], cells: Cells, ran: list[tuple[str, str]]) -> list[str]:
    """The per-seed table of the cells where both methods share two seeds or more, and the sign-change count."""
    lines = ["| teacher → student | seed | alone AP | FitNet AP | UniKD AP | UniKD − FitNet |",
             "|---|---|---|---|---|---|"]
    seeded = {(s, t): rows for s, t in ran if len(rows := seed_rows(alone[s], cells[s, t, "fitnet"],
                                                                      cells[s, t, "unikd"])) > 1}
    for (s, t), rows in seeded.items():
        lines += [f"| {TITLES[t]} → {TITLES[s]} | {seed} | {fmt(base)} | {fmt(fitnet)} | {fmt(unikd)} | "
                  f"{fmt(edge, True)} |" for seed, base, fitnet, unikd, edge in rows]
    flips = sum(1 for rows in seeded.values() if len({edge > 0 for *_, edge in rows}) > 1)
    return lines + ["", f"UniKD − FitNet changes sign from one seed to another in {flips} of these {len(seeded)} "
                        "cells."]


def analysis(results: Path) -> list[str]:
    """The four tables and the correlations, as markdown lines."""
    students = load_students(results)
    if not students:
        sys.exit(f"no finished stage-2 run in {results}")
    teachers = teachers_of(students)
    alone, cells = collect(students, teachers)
    gain = {key: mean_gain(runs, alone[key[0]]) for key, runs in cells.items()}
    edge = {(s, t): mean_gain(cells[s, t, "unikd"], cells[s, t, "fitnet"]) for s in students for t in teachers}
    share = {(s, t, m): shares(students[s], m, t) for s in students for t in teachers for m in METHODS}
    ran = [(s, t) for s in students for t in teachers if any(cells[s, t, m] for m in METHODS)]

    lines = ["| teacher → student | FitNet KD/det: first → last | UniKD KD/det: first → last | FitNet gain | "
             "UniKD gain | UniKD − FitNet |", "|---|---|---|---|---|---|"]
    for s, t in ran:
        ratio = [("–" if share[s, t, m] is None else f"{share[s, t, m][0]:.2f} → {share[s, t, m][1]:.2f}")
                 for m in METHODS]
        lines.append(f"| {TITLES[t]} → {TITLES[s]} | {ratio[0]} | {ratio[1]} | {fmt(gain[s, t, 'fitnet'], True)} | "
                     f"{fmt(gain[s, t, 'unikd'], True)} | {fmt(edge[s, t], True)} |")
    first = {key: None if v is None else v[0] for key, v in share.items()}
    lines += ["", "Over the cells: UniKD's gain against its KD/det ratio at the first step "
              + rank_correlation([first[s, t, "unikd"] for s, t in ran], [gain[s, t, "unikd"] for s, t in ran])
              + "; FitNet's gain against its own "
              + rank_correlation([first[s, t, "fitnet"] for s, t in ran], [gain[s, t, "fitnet"] for s, t in ran])
              + "."]

    akes, teacher_ap = ake_aps(results), teacher_aps(students)
    per_teacher = {t: {m: [g for s in students if (g := gain[s, t, m]) is not None] for m in METHODS}
                   for t in teachers}
    per_teacher_edge = {t: [e for s in students if (e := edge[s, t]) is not None] for t in teachers}
    mean = lambda values: statistics.mean(values) if values else None  # noqa: E731
    lines += ["", "| teacher (R50) | teacher AP | content AKE AP | students | FitNet mean gain | UniKD mean gain | "
              "UniKD − FitNet |", "|---|---|---|---|---|---|---|"]
    for t in teachers:
        lines.append(f"| {TITLES[t]} | {fmt(teacher_ap.get(t))} | {fmt(akes.get(t))} | "
                     f"{len(per_teacher[t]['unikd'])} | {fmt(mean(per_teacher[t]['fitnet']), True)} | "
                     f"{fmt(mean(per_teacher[t]['unikd']), True)} | {fmt(mean(per_teacher_edge[t]), True)} |")
    lines += ["", "Over the cells: UniKD's gain against the teacher's content AKE AP "
              + rank_correlation([akes.get(t) for s, t in ran], [gain[s, t, "unikd"] for s, t in ran])
              + "; UniKD − FitNet against it "
              + rank_correlation([akes.get(t) for s, t in ran], [edge[s, t] for s, t in ran]) + "."]

    lines += ["", "| student (R18) | alone AP | teachers | FitNet mean gain | UniKD mean gain | UniKD − FitNet |",
              "|---|---|---|---|---|---|"]
    for s in students:
        row = {m: [g for t in teachers if (g := gain[s, t, m]) is not None] for m in METHODS}
        lines.append(f"| {TITLES[s]} | {mean_std(list(alone[s].values()))} | {len(row['unikd'])} | "
                     f"{fmt(mean(row['fitnet']), True)} | {fmt(mean(row['unikd']), True)} | "
                     f"{fmt(mean([e for t in teachers if (e := edge[s, t]) is not None]), True)} |")
    alone_ap = {s: mean(list(alone[s].values())) for s in students}
    lines += ["", "Over the cells: UniKD's gain against the student alone's AP "
              + rank_correlation([alone_ap[s] for s, t in ran], [gain[s, t, "unikd"] for s, t in ran])
              + "; FitNet's "
              + rank_correlation([alone_ap[s] for s, t in ran], [gain[s, t, "fitnet"] for s, t in ran]) + "."]
    return lines + [""] + seeds_table(alone, cells, ran)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "matrix_1k")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    command = "python benchmarks/matrix_analysis.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        "## The matrix's analysis: loss scales, AKEs, students, seeds", "",
        f"Command: `{command}` (written {datetime.date.today()}; read from `{shown(args.results)}`'s JSONs). "
        "KD/det: the distillation losses over the student's detection losses at the first and the last logged "
        "step, median over the seeds; gains in AP over the student alone of the same seed, mean over the seeds. "
        "Rank correlations (Spearman) with their number of points: a direction, not a test.", "",
        *analysis(args.results)]) + "\n"
    replace_section(args.doc, section, title="# Results")
    print(section)


if __name__ == "__main__":
    main()
