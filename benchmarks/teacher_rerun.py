"""The matrix's cells made twice, with the first teachers and with the same teachers trained again (issue 13: a
new machine's retraining does not give the same weights), from the two folders' JSONs alone.

    python benchmarks/teacher_rerun.py [--first benchmarks/results/matrix_1k_first_teachers]
        [--results benchmarks/results/matrix_1k] [--doc docs/results.md]

Per teacher: its val AP and its content AKE's AP in each set. Per FitNet or UniKD run found in both folders (same
student, teacher, method and seed): its val AP with each set and the difference, new − first. Then the
differences' mean ± sample std and mean absolute value: how far a cell moves with the teacher's own training
noise, to read beside the seed spread of the matrix's cells.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

from distillation import METHODS, ROOT, TITLES, load_results, mean_std, student_folder
from doc_sections import replace_section
from matrix import ORDER, shown


def both(first: Path, results: Path) -> list[tuple[str, str, str, int, float, float]]:
    """``(student, teacher, method, seed, first AP, new AP)`` (AP in %) per FitNet or UniKD run in both folders."""
    rows = []
    for student in ORDER:
        old, new = (load_results(student_folder(folder, student)) for folder in (first, results))
        for name in sorted(old.keys() & new.keys()):
            r = old[name]
            if r.get("method") in METHODS:
                rows.append((student, r["teacher"], r["method"], r["seed"], 100 * r["metrics"]["AP"],
                             100 * new[name]["metrics"]["AP"]))
    return rows


def teacher_metrics(folder: Path) -> dict[str, tuple[float | None, float | None]]:
    """Per teacher, ``(its val AP, its content AKE's val AP)`` in %, from any student's folder of ``folder``."""
    found: dict[str, list[float | None]] = {}
    for student in ORDER:
        for name, r in load_results(student_folder(folder, student)).items():
            kind, _, teacher = name.partition("_")
            if kind == "teacher":
                found.setdefault(teacher, [None, None])[0] = 100 * r["metrics"]["AP"]
            elif kind == "ake":
                found.setdefault(teacher, [None, None])[1] = 100 * r["metrics"]["ake_val"]["AP"]
    return {t: (ap, ake) for t, (ap, ake) in found.items()}


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def comparison(first: Path, results: Path) -> list[str]:
    """The doc lines: the teachers' table, the cells' table and the differences' summary."""
    rows = both(first, results)
    if not rows:
        sys.exit(f"no FitNet or UniKD run is in both {first} and {results}")
    old, new = teacher_metrics(first), teacher_metrics(results)
    taught = [t for t in ORDER if any(r[1] == t for r in rows)]
    lines = ["| teacher (R50) | teacher AP: first | new | content AKE AP: first | new |", "|---|---|---|---|---|"]
    for t in taught:
        (ap0, ake0), (ap1, ake1) = old.get(t, (None, None)), new.get(t, (None, None))
        lines.append(f"| {TITLES[t]} | {fmt(ap0)} | {fmt(ap1)} | {fmt(ake0)} | {fmt(ake1)} |")
    lines += ["", "| teacher → student | method | seed | AP, first teacher | AP, new teacher | new − first |",
              "|---|---|---|---|---|---|"]
    for student, teacher, method, seed, ap0, ap1 in rows:
        lines.append(f"| {TITLES[teacher]} → {TITLES[student]} | {method} | {seed} | {ap0:.1f} | {ap1:.1f} | "
                     f"{ap1 - ap0:+.1f} |")
    diffs = [ap1 - ap0 for *_, ap0, ap1 in rows]
    lines += ["", f"Over the {len(diffs)} runs, new − first: {mean_std(diffs)} AP; mean absolute difference "
                  f"{statistics.mean(abs(d) for d in diffs):.1f} AP."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=Path, default=ROOT / "benchmarks" / "results" / "matrix_1k_first_teachers")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "matrix_1k")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    command = "python benchmarks/teacher_rerun.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        "## The matrix's cells with the first and the new teachers", "",
        f"Command: `{command}` (written {datetime.date.today()}; read from `{shown(args.first)}` and "
        f"`{shown(args.results)}`). The same runs (student, teacher, method, seed, command) with the teacher of "
        "each family as first trained and as trained again on a new machine; val AP in %.", "",
        *comparison(args.first, args.results)]) + "\n"
    replace_section(args.doc, section, title="# Results")
    print(section)


if __name__ == "__main__":
    main()
