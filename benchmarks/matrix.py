"""The teacher × student matrix, the paper's Table 2 at our scale (issue 13): the six families' R50 teachers
distilled into the six families' R18 students, each pair with FitNet and with UniKD, beside the student alone.

    python benchmarks/matrix.py [--students F ...] [--teachers-families F ...] [--seeds 0] [--alone-seeds 0 1 2]
        [--seeded-students retinanet deformable_detr] [--configs configs/digits] [--student-epochs STUDENT=N ...]
        [--data cache/digits-det] [--runs runs/distill]
        [--teachers runs/baselines] [--jobs 2] [--threads N] [--wait-teachers]
    python benchmarks/matrix.py --table-only     # rebuild the docs table and the heatmap from the JSONs

Per student, one after the other, the jobs of ``benchmarks/distillation.py`` (its ``schedule``) in its run and
result folders, so that a run either script finished serves both: stage 1 per teacher (``RUNS/ake_FAMILY``, done
once for every student), the student alone per seed of ``--alone-seeds``, FitNet and UniKD per teacher and seed of
``--seeds`` (of ``--seeds`` and ``--alone-seeds`` for the ``--seeded-students``, whose cells get a mean ± std).
Each job is resumable. ``--configs`` holds ``ake.yaml`` and ``distill_STUDENT_r18.yaml``; a student asked to run
without its config is refused before anything starts. A smaller profile (docs/results.md, "The matrix's profile")
is a smaller ``--data`` build and ``--student-epochs`` in place of a config's, with its own ``--runs`` and
``--results``: each stage-2 JSON records its epochs, and a results folder of other epochs is refused.

The table (a section of docs/results.md) and the heatmap of the gains (docs/matrix_gains.png) are built from the
JSONs alone and show every student and teacher with results, whatever was asked to run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from distillation import (AKE_CONFIG, DIGITS, FAMILIES, METHODS, ROOT, TITLES, add_run_arguments, ap,
                          check_teachers, job_threads, load_results, mean_std, schedule, student_config,
                          student_folder)
from doc_sections import replace_section

from unikd.config import load_config

# The families in the order of issue 13: the table's columns (teachers) and blocks of rows (students).
ORDER = ("retinanet", "atss", "faster_rcnn", "fcos", "reppoints", "deformable_detr")
METHOD_TITLES = {"fitnet": "FitNet", "unikd": "UniKD"}
Cells = dict[tuple[str, str, str], dict[int, float]]  # (student, teacher, method) -> AP (%) per seed


def cell_seeds(args, student: str) -> list[int]:
    """The seeds of a student's FitNet and UniKD runs: ``--seeds``, and ``--alone-seeds`` too for the
    ``--seeded-students``."""
    return sorted({*args.seeds, *args.alone_seeds}) if student in args.seeded_students else args.seeds


def check_configs(configs: Path, students: list[str]) -> None:
    """Stop now, naming each missing file, when ``configs`` lacks ``ake.yaml`` or a student's stage-2 config."""
    wanted = {configs / AKE_CONFIG.name: "the AKEs' config (stage 1)",
              **{student_config(s, configs): f"the R18 {TITLES[s]} student's config (stage 2)" for s in students}}
    missing = [f"{path} is missing: {what}" for path, what in wanted.items() if not path.is_file()]
    if missing:
        sys.exit("\n".join(missing) + "\nwrite them, leave their students out of --students, or give another --configs")


def run_matrix(args) -> None:
    """Every asked student's jobs, one student after the other (the AKEs, made for the first, serve the rest)."""
    check_configs(args.configs, args.students)
    check_teachers(args)
    tic = time.time()
    for student in args.students:
        schedule(args, job_threads(args), student, cell_seeds(args, student), args.alone_seeds, args.configs,
                 args.student_epochs.get(student))
    print(f"done in {(time.time() - tic) / 60:.1f} min")


def load_students(results: Path) -> dict[str, dict[str, dict]]:
    """The JSONs of every student with at least one finished stage-2 run, by name, in the table's order."""
    loaded = {s: load_results(student_folder(results, s)) for s in ORDER}
    return {s: runs for s, runs in loaded.items() if any("method" in r for r in runs.values())}


def teachers_of(students: dict[str, dict[str, dict]]) -> list[str]:
    """The teachers with a FitNet or UniKD run, or a recorded checkpoint, under any student."""
    names = {r["teacher"] for runs in students.values() for r in runs.values() if r.get("method", "none") != "none"}
    names |= {name[len("teacher_"):] for runs in students.values() for name in runs if name.startswith("teacher_")}
    return [f for f in ORDER if f in names]


def seed_aps(runs: dict[str, dict], method: str, teacher: str | None = None) -> dict[int, float]:
    """AP (%) per seed of a student's runs of ``method`` with ``teacher`` (any teacher for the student alone)."""
    return {r["seed"]: 100 * r["metrics"]["AP"] for r in runs.values()
            if r.get("method") == method and (method == "none" or r["teacher"] == teacher)}


def gains(runs: dict[int, float], base: dict[int, float]) -> list[float]:
    """Per seed that both have, the AP of ``runs`` minus that of ``base``."""
    return [runs[seed] - base[seed] for seed in sorted(runs) if seed in base]


def signed_mean_std(values: list[float]) -> str:
    """``+1.2 ± 0.3`` (the std with 2 values or more)."""
    return ("+" if statistics.mean(values) >= 0 else "") + mean_std(values)


def cell_text(runs: dict[int, float], alone: dict[int, float]) -> str:
    """``mean AP (+mean gain ± std)`` over the seeds; the gain only over seeds with the student alone."""
    if not runs:
        return "not run"
    diffs = gains(runs, alone)
    return f"{statistics.mean(runs.values()):.1f}" + (f" ({signed_mean_std(diffs)})" if diffs else "")


def seeds_label(counts: list[int]) -> str:
    """``(3 seeds)``, ``(1–3 seeds)`` when a row's cells have different numbers, nothing for an empty row."""
    counts = [n for n in counts if n]
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return f" ({low if low == high else f'{low}–{high}'} seed{'s' if high > 1 else ''})"


def collect(students: dict[str, dict[str, dict]], teachers: list[str]) -> tuple[dict[str, dict[int, float]], Cells]:
    """The student alone's AP per seed, per student, and every cell's AP per seed (empty where not run)."""
    alone = {s: seed_aps(runs, "none") for s, runs in students.items()}
    cells = {(s, t, m): seed_aps(runs, m, t) for s, runs in students.items() for t in teachers for m in METHODS}
    return alone, cells


def table(students: dict[str, dict[str, dict]], teachers: list[str], alone: dict[str, dict[int, float]],
          cells: Cells) -> list[str]:
    """The markdown table: a column per teacher, a block of three rows per student."""
    heads = []
    for t in teachers:
        teacher_ap = next((ap(runs, f"teacher_{t}") for runs in students.values() if f"teacher_{t}" in runs), None)
        heads.append(f"{TITLES[t]} ({'–' if teacher_ap is None else f'{teacher_ap:.1f}'})")
    lines = ["| student (R18) | | " + " | ".join(heads) + " |", "|---" * (len(teachers) + 2) + "|"]
    for s in students:
        base = mean_std(list(alone[s].values())) if alone[s] else "not run"
        epochs = sorted({r["epochs"] for r in students[s].values() if "epochs" in r})
        name = TITLES[s] + (f", {'/'.join(map(str, epochs))} epochs" if epochs else "")
        rows = [[name, "student alone" + seeds_label([len(alone[s])]), *[base] * len(teachers)]]
        for m in METHODS:
            runs = [cells[s, t, m] for t in teachers]
            rows.append(["", METHOD_TITLES[m] + seeds_label([len(r) for r in runs]),
                         *[cell_text(r, alone[s]) for r in runs]])
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def wins(differences: list[list[float]]) -> str:
    """``k of n``: of the cells with per-seed differences, those whose mean difference is positive."""
    ran = [d for d in differences if d]
    return f"{sum(statistics.mean(d) > 0 for d in ran)} of {len(ran)}"


def counts(alone: dict[str, dict[int, float]], cells: Cells) -> list[str]:
    """How many cells UniKD wins against the student alone and against FitNet (mean of per-seed differences)."""
    pairs = [(s, t) for s, t, m in cells if m == "unikd"]
    return [f"- UniKD above the student alone (mean gain > 0): "
            f"{wins([gains(cells[s, t, 'unikd'], alone[s]) for s, t in pairs])} cells.",
            "- UniKD above FitNet (mean over the seeds of UniKD − FitNet > 0, in the cells where both ran): "
            f"{wins([gains(cells[s, t, 'unikd'], cells[s, t, 'fitnet']) for s, t in pairs])} cells."]


def train_hours(students: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Hours of training in the JSONs: the teachers and AKEs once (each student's folder has a copy), the stage-2
    runs of every student."""
    shared = {name: r["train_minutes"] for runs in students.values() for name, r in runs.items() if "method" not in r}
    minutes = {"teachers": sum(m for name, m in shared.items() if name.startswith("teacher_")),
               "AKEs": sum(m for name, m in shared.items() if name.startswith("ake_")),
               "stage 2": sum(r["train_minutes"] for runs in students.values() for r in runs.values() if "method" in r)}
    return {kind: m / 60 for kind, m in minutes.items()}


def heatmap(path: Path, students: list[str], teachers: list[str], alone: dict[str, dict[int, float]],
            cells: Cells) -> None:
    """The mean gains in two panels, FitNet and UniKD: a row per student, a column per teacher, each cell
    annotated, grey where not run, one diverging colour scale centred at 0."""
    mean_gains = {key: statistics.mean(d) for key, runs in cells.items() if (d := gains(runs, alone[key[0]]))}
    limit = max((abs(g) for g in mean_gains.values()), default=0) or 1
    cmap = colormaps["RdBu"].with_extremes(bad="lightgrey")
    fig = Figure(figsize=(3 + 1.3 * len(teachers), 1.5 + 0.5 * len(students)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, method in zip(axes, METHODS):
        grid = np.array([[mean_gains.get((s, t, method), np.nan) for t in teachers] for s in students])
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-limit, vmax=limit)
        for (i, j), g in np.ndenumerate(grid):
            if not np.isnan(g):
                ax.text(j, i, f"{g:+.1f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(g) > 0.6 * limit else "black")
        ax.set_xticks(range(len(teachers)), [TITLES[t] for t in teachers], rotation=30, ha="right")
        ax.set_yticks(range(len(students)), [TITLES[s] for s in students])
        ax.set_title(f"{METHOD_TITLES[method]} gain (AP)")
        ax.set_xlabel("teacher (R50)")
    axes[0].set_ylabel("student (R18)")
    fig.colorbar(image, ax=axes, label="gain over the student alone (AP)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_matrix(args, command: str) -> str:
    """The doc section and the heatmap, from the JSONs of ``args.results``; returns the section."""
    students = load_students(args.results)
    if not students:
        sys.exit(f"no finished stage-2 run in {args.results}")
    teachers = teachers_of(students)
    alone, cells = collect(students, teachers)
    heatmap(args.heatmap, list(students), teachers, alone, cells)
    hours = train_hours(students)
    results, configs = shown(args.results), shown(args.configs)
    lines = [
        "## The teacher × student matrix",
        "",
        f"Command: `{command}` (table written {datetime.date.today()}, {os.cpu_count()} CPU cores, `--jobs` runs "
        f"side by side; every figure is read from `{results}/*.json` (the RetinaNet student) and "
        f"`{results}/STUDENT/*.json`, one file per finished run, shared with `benchmarks/distillation.py`). "
        f"Students: `{configs}/distill_STUDENT_r18.yaml`; AKEs: `{configs}/{AKE_CONFIG.name}`, one set per teacher "
        f"shared by the seeds and students. Val AP on {args.data.name}, laid out as the paper's Table 2: a column "
        "per R50 teacher (its AP in the heading), a block per R18 student: the student alone (mean ± sample std "
        "over its seeds), then FitNet and UniKD, each `mean AP (+gain)`, the gain the mean over the seeds of the "
        "run's AP minus the student alone's of the same seed (± sample std with 2 seeds or more).",
        "",
        *table(students, teachers, alone, cells),
        "",
        *counts(alone, cells),
        f"- Compute: {sum(hours.values()):.1f} hours of training in the JSONs, each run's own clock on a shared "
        "machine, not multiplied by its threads (" + ", ".join(f"{kind} {h:.1f}" for kind, h in hours.items()) + ").",
        "",
        f"![Mean AP gain over the student alone, FitNet and UniKD, per teacher and student]"
        f"({os.path.relpath(args.heatmap.resolve(), args.doc.resolve().parent)})",
    ]
    section = "\n".join(lines) + "\n"
    replace_section(args.doc, section, title="# Results")
    return section


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Which cells the matrix holds, with how many seeds, at which profile: ``--students``,
    ``--teachers-families``, ``--seeds``, ``--alone-seeds``, ``--seeded-students``, ``--configs``,
    ``--student-epochs``."""
    parser.add_argument("--students", nargs="+", choices=FAMILIES, default=list(ORDER),
                        help="R18 students to run, one after the other (default: all six)")
    parser.add_argument("--teachers-families", dest="families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="R50 teachers to run (default: all six, the slowest first)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every FitNet and UniKD cell")
    parser.add_argument("--alone-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the student alone, and of the cells of the --seeded-students")
    parser.add_argument("--seeded-students", nargs="*", choices=FAMILIES, default=["retinanet", "deformable_detr"],
                        help="students whose cells run on the --alone-seeds too (default: %(default)s)")
    parser.add_argument("--configs", type=Path, default=DIGITS,
                        help="folder of ake.yaml and distill_STUDENT_r18.yaml (default: configs/digits)")
    parser.add_argument("--student-epochs", nargs="+", type=student_epochs, default=[], metavar="STUDENT=N",
                        help="stage-2 epochs of a student in place of its config's (a smaller profile)")


def student_epochs(text: str) -> tuple[str, int]:
    """``STUDENT=N`` of ``--student-epochs``, checked."""
    student, _, epochs = text.partition("=")
    if student not in FAMILIES or not epochs.isdigit() or int(epochs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give STUDENT=N, a family of {', '.join(FAMILIES)} and N >= 1")
    return student, int(epochs)


def stage2_epochs(args, student: str) -> int:
    """A student's stage-2 epochs at the plan's profile: ``--student-epochs``, else its config's in ``--configs``."""
    return args.student_epochs.get(student) or load_config(student_config(student, args.configs)).train.epochs


def parse_plan(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, ``--student-epochs`` as a dict."""
    args = parser.parse_args()
    args.student_epochs = dict(args.student_epochs)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(parser)
    parser.add_argument("--heatmap", type=Path, default=ROOT / "docs" / "matrix_gains.png",
                        help="the PNG of the gains (default: docs/matrix_gains.png)")
    add_run_arguments(parser)
    args = parse_plan(parser)
    if not args.table_only:
        run_matrix(args)
    print(write_matrix(args, "python benchmarks/matrix.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
