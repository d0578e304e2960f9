"""The matrix's runs made twice, same commands and seeds, on the first machine and on a new one (issue 13: the
first machine's teachers and runs were lost, and a run that repeats exactly on one machine does not across two),
from the two folders' JSONs alone.

    python benchmarks/machine_rerun.py [--first benchmarks/results/matrix_1k_first_machine]
        [--results benchmarks/results/matrix_1k] [--doc docs/results.md]

Per teacher trained on both: its val AP and its content AKE's AP on each machine. Per run found in both folders
(same student, method, teacher and seed; the student alone too): its val AP on each and the difference, new −
first. Then, per kind of run, the differences' mean ± sample std and mean absolute value: how far a run moves
with the machine alone, to read beside the spread over seeds.
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
from matrix_analysis import ake_aps, fmt, teacher_aps


KINDS = ("none", *METHODS)


def both(first: Path, results: Path) -> list[tuple[str, str, str, int, float, float]]:
    """``(student, teacher, method, seed, first AP, new AP)`` (AP in %) per run of the student alone, FitNet or
    UniKD in both folders (the student alone's teacher: the one it loaded and never ran)."""
    rows = []
    for student in ORDER:
        old, new = (load_results(student_folder(folder, student)) for folder in (first, results))
        for name in sorted(old.keys() & new.keys()):
            r = old[name]
            if r.get("method") in KINDS:
                rows.append((student, r["teacher"], r["method"], r["seed"], 100 * r["metrics"]["AP"],
                             100 * new[name]["metrics"]["AP"]))
    return rows


def comparison(first: Path, results: Path) -> list[str]:
    """The doc lines: the teachers' table, the cells' table and the differences' summary."""
    rows = both(first, results)
    if not rows:
        sys.exit(f"no run is in both {first} and {results}")
    (teacher0, ake0), (teacher1, ake1) = (
        (teacher_aps({s: load_results(student_folder(f, s)) for s in ORDER}), ake_aps(f)) for f in (first, results))
    lines = ["| teacher (R50) | teacher AP: first | new | content AKE AP: first | new |", "|---|---|---|---|---|"]
    for t in [t for t in ORDER if t in teacher0 and t in teacher1]:
        lines.append(f"| {TITLES[t]} | {fmt(teacher0[t])} | {fmt(teacher1[t])} | {fmt(ake0.get(t))} | "
                     f"{fmt(ake1.get(t))} |")
    lines += ["", "| student (R18) | method | teacher | seed | AP, first machine | AP, new machine | new − first |",
              "|---|---|---|---|---|---|---|"]
    for student, teacher, method, seed, ap0, ap1 in rows:
        lines.append(f"| {TITLES[student]} | {method} | {'–' if method == 'none' else TITLES[teacher]} | {seed} | "
                     f"{ap0:.1f} | {ap1:.1f} | {ap1 - ap0:+.1f} |")
    lines.append("")
    for kind in KINDS:
        diffs = [ap1 - ap0 for _, _, method, _, ap0, ap1 in rows if method == kind]
        if diffs:
            lines.append(f"- {kind}: {len(diffs)} run{'s' if len(diffs) > 1 else ''}, new − first "
                         f"{mean_std(diffs)} AP, mean absolute difference {statistics.mean(abs(d) for d in diffs):.1f}"
                         " AP.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=Path, default=ROOT / "benchmarks" / "results" / "matrix_1k_first_machine")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "matrix_1k")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    command = " ".join(["python benchmarks/machine_rerun.py", *sys.argv[1:]])
    section = "\n".join([
        "## The matrix's runs on the first and the new machine", "",
        f"Command: `{command}` (written {datetime.date.today()}; read from `{shown(args.first)}` and "
        f"`{shown(args.results)}`). The same runs (student, method, teacher, seed, command) on the first machine, "
        "with its teachers, and on the new one, with the teachers trained again there; val AP in %.", "",
        *comparison(args.first, args.results)]) + "\n"
    replace_section(args.doc, section, title="# Results")
    print(section)


if __name__ == "__main__":
    main()
