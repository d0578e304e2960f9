"""Distil each family's R50 teacher into the R18 RetinaNet student with UniKD and with FitNet; write docs/results.md.

    python benchmarks/distillation.py [--runs runs/distill] [--teachers runs/baselines] [--jobs 2]

Needs the teachers and the student baseline of ``benchmarks/baselines.py`` (``TEACHERS/NAME/last.pt``, and
``TEACHERS/retinanet_r18_student/eval.json`` for the baseline row). Jobs, each resumable (a finished one is
skipped, an interrupted one continues from its ``last.pt``):

- stage 1 per teacher: ``unikd pretrain-ake configs/digits/ake.yaml --teacher T`` → ``RUNS/ake_FAMILY``;
- stage 2 per teacher and method: ``unikd distill configs/digits/distill_retinanet_r18.yaml --teacher T
  --ake RUNS/ake_FAMILY/ake.safetensors --method M`` → ``RUNS/FAMILY_METHOD``.

``--jobs`` run side by side, each with ``cores / jobs`` torch threads; a UniKD run waits for its AKEs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from doc_sections import replace_section
from runner import run_job

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("faster_rcnn", "fcos", "retinanet")  # the slowest teacher first
METHODS = ("fitnet", "unikd")
AKE_CONFIG = ROOT / "configs" / "digits" / "ake.yaml"
STUDENT_CONFIG = ROOT / "configs" / "digits" / "distill_retinanet_r18.yaml"


def teacher_checkpoint(teachers: Path, family: str) -> Path:
    return teachers / f"{family}_r50_teacher" / "last.pt"


def schedule(args, threads: int) -> None:
    """Stage 1 for every teacher first, then the FitNet runs (they need no AKE), then the UniKD runs."""
    data = ["--data", str(args.data)]
    with ThreadPoolExecutor(args.jobs) as pool:
        akes: dict[str, Future] = {}
        for fam in FAMILIES:
            cmd = ["pretrain-ake", str(AKE_CONFIG), "--teacher", str(teacher_checkpoint(args.teachers, fam)), *data]
            akes[fam] = pool.submit(run_job, cmd, args.runs / f"ake_{fam}", "report.json", threads)

        def distill(fam: str, method: str) -> None:
            cmd = ["distill", str(STUDENT_CONFIG), "--teacher", str(teacher_checkpoint(args.teachers, fam)),
                   "--method", method, *data]
            if method == "unikd":
                akes[fam].result()
                cmd += ["--ake", str(args.runs / f"ake_{fam}" / "ake.safetensors")]
            run_job(cmd, args.runs / f"{fam}_{method}", "eval.json", threads)

        runs = [pool.submit(distill, fam, m) for m in METHODS for fam in FAMILIES]
        for job in [*akes.values(), *runs]:
            job.result()


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_results(args, command: str) -> None:
    baseline = read_json(args.teachers / "retinanet_r18_student" / "eval.json")
    lines = [
        "## Distillation into the R18 RetinaNet student",
        "",
        f"Command: `{command}` (measured {datetime.date.today()}, {os.cpu_count()} CPU cores, `--jobs` runs side "
        "by side). Student: `configs/digits/distill_retinanet_r18.yaml` (the student baseline's model, data, "
        "schedule and seed, plus the `distill` section); AKEs: `configs/digits/ake.yaml`. Val AP on digits-det, "
        "one seed; the gain is over the student baseline of the table above.",
        "",
        "| teacher (R50) | teacher AP | student AP | FitNet AP (gain) | UniKD AP (gain) | content-AKE AP | "
        "stage 1 / teacher time |",
        "|---|---|---|---|---|---|---|",
    ]
    base = 100 * baseline["AP"] if baseline else float("nan")
    for fam in FAMILIES:
        teacher = read_json(args.teachers / f"{fam}_r50_teacher" / "eval.json")
        report = read_json(args.runs / f"ake_{fam}" / "report.json")
        cells = [fam, f"{100 * teacher['AP']:.1f}" if teacher else "–", f"{base:.1f}"]
        for method in METHODS:
            result = read_json(args.runs / f"{fam}_{method}" / "eval.json")
            cells.append(f"{100 * result['AP']:.1f} ({100 * result['AP'] - base:+.1f})" if result else "not run")
        if report:
            cells += [f"{100 * report['ake_val']['AP']:.1f}", f"{report['fraction_of_teacher_training']:.0%}"]
        else:
            cells += ["not run", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    replace_section(args.doc, "\n".join(lines) + "\n", title="# Results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "distill")
    parser.add_argument("--teachers", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    for fam in FAMILIES:
        if not teacher_checkpoint(args.teachers, fam).exists():
            sys.exit(f"missing teacher {teacher_checkpoint(args.teachers, fam)}: run benchmarks/baselines.py first")
    tic = time.time()
    schedule(args, threads=max(1, (os.cpu_count() or 1) // args.jobs))
    print(f"done in {(time.time() - tic) / 60:.1f} min")
    write_results(args, "python benchmarks/distillation.py " + " ".join(sys.argv[1:]))
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
