"""What the teacher × student matrix (``benchmarks/matrix.py``) costs on this CPU, for a profile and its seeds.

    python benchmarks/matrix_cost.py --measure [--data runs/digits-det] [--steps 2] [--warmup 1]
    python benchmarks/matrix_cost.py [--configs DIR] [--data DIR] [matrix.py's --students, --seeds, ...] [--doc F]

``--measure``: the median CPU seconds of a training step (batch of 8 digits-det train images at 128 px, forward,
backward, AdamW, after ``--warmup`` steps) and of a ``predict`` batch of every job the matrix makes: stage 1 per
R50 teacher, each R18 student alone, FitNet and UniKD per teacher and student, with freshly initialised weights
(the cost does not depend on their values), and FGD, MGD and PKD per teacher into the R18 RetinaNet (the
feature-distillation baselines that ``benchmarks/ablations.py`` runs), into ``benchmarks/results/matrix_steps.json``.
Resumable: a job already in the file is not measured again. CPU time of this process, so what a one-thread run
takes on a core of its own, whatever else shares the machine.

Without ``--measure``: from that file, the CPU hours of the matrix that ``matrix.py`` would run with the same
options: each job's step time times its iterations (its config's epochs in ``--configs``, or
``--student-epochs``, over the train images of ``--data``) plus the evaluation (``predict`` over the val images),
times its number of runs (its seeds), and the wall time on this machine's cores, one single-thread run per core.
``--doc`` writes the table into a section of docs/results.md named after the configs folder and the dataset.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch
from distillation import METHODS, TITLES
from doc_sections import replace_section
from matrix import ORDER, add_plan_arguments, cell_seeds, parse_plan
from run_cost import BATCH, measure

from unikd.config import load_config
from unikd.data import CocoDetection, collate

ROOT = Path(__file__).resolve().parents[1]
STEPS = ROOT / "benchmarks" / "results" / "matrix_steps.json"
FEATURE_KD = ("fgd", "mgd", "pkd")  # measured into the R18 RetinaNet only, the student ablations.py gives them


def jobs(students: list[str], teachers: list[str]) -> list[tuple[str, str, tuple]]:
    """``(name, kind, arguments)`` of every job of the matrix, in run_cost's terms: ``stage1`` per teacher, the
    student alone (``none``, whose teacher is loaded but never run) and each method per teacher and student; then
    the :data:`FEATURE_KD` methods per teacher into the RetinaNet student."""
    plan = [(f"ake_{t}", "stage1", (t,)) for t in teachers]
    plan += [(f"{s}: none", "distill", (teachers[0], s, "none")) for s in students]
    plan += [(f"{t} -> {s}: {m}", "distill", (t, s, m)) for s in students for t in teachers for m in METHODS]
    plan += [(f"{t} -> retinanet: {m}", "distill", (t, "retinanet", m)) for t in teachers for m in FEATURE_KD]
    return plan


def measure_all(args) -> None:
    """Measure every job missing from ``--steps-file``, writing the file after each."""
    torch.set_num_threads(1)
    record = json.loads(args.steps_file.read_text()) if args.steps_file.is_file() else {
        "command": "python benchmarks/matrix_cost.py " + " ".join(sys.argv[1:]), "date": str(datetime.date.today()),
        "threads": 1, "jobs": {}}
    done = record["jobs"]
    batch = {"boxes": collate([CocoDetection(args.data, "train", 128)[i] for i in range(BATCH)])}
    for name, kind, run_args in jobs(list(ORDER), list(ORDER)):
        if name in done:
            continue
        r = measure(name, kind, run_args, batch, args.steps, args.warmup)
        done[name] = {"step": r["step"], "predict": r["predict"]}
        print(f"{name}: {r['step']:.2f} s/step, predict {r['predict']:.2f} s/batch", flush=True)
        args.steps_file.parent.mkdir(parents=True, exist_ok=True)
        args.steps_file.write_text(json.dumps(record, indent=1) + "\n")


def job_hours(step: dict, epochs: int, train_images: int, val_images: int) -> float:
    """CPU hours of one run: its training steps and its evaluation's ``predict`` batches."""
    return (step["step"] * epochs * math.ceil(train_images / BATCH)
            + step["predict"] * math.ceil(val_images / BATCH)) / 3600


def estimate(args) -> list[str]:
    """The doc section: per student, the hours of its runs, and the matrix's total."""
    record = json.loads(args.steps_file.read_text())
    steps = record["jobs"]
    n_train, n_val = (len(CocoDetection(args.data, split, 128)) for split in ("train", "val"))
    ake_train = len(CocoDetection(args.ake_data or args.data, "train", 128))
    ake_epochs = load_config(args.configs / "ake.yaml").train.epochs
    rows, total = [], 0.0
    stage1 = sum(job_hours(steps[f"ake_{t}"], ake_epochs, ake_train, n_val) for t in args.families)
    for s in args.students:
        epochs = args.student_epochs.get(s) or load_config(args.configs / f"distill_{s}_r18.yaml").train.epochs
        alone = job_hours(steps[f"{s}: none"], epochs, n_train, n_val) * len(args.alone_seeds)
        seeds = len(cell_seeds(args, s))
        per_method = {m: sum(job_hours(steps[f"{t} -> {s}: {m}"], epochs, n_train, n_val) for t in args.families)
                      * seeds for m in METHODS}
        row = alone + sum(per_method.values())
        total += row
        rows.append(f"| {TITLES[s]} | {epochs} | {len(args.alone_seeds)} | {alone:.1f} | {seeds} | "
                    + " | ".join(f"{per_method[m]:.1f}" for m in METHODS) + f" | {row:.1f} |")
    total += stage1
    cores = os.cpu_count()
    command = "python benchmarks/matrix_cost.py " + " ".join(sys.argv[1:])
    return [
        f"## The matrix's compute: configs/{args.configs.name} on {args.data.name}",
        "",
        f"Command: `{command}` (written {datetime.date.today()}; step times: `{record['command']}`, "
        f"{record['date']}, in `{STEPS.relative_to(ROOT)}`, the models of configs/digits with fresh weights, "
        "CPU seconds of the measuring process beside other jobs). CPU hours at one thread: each "
        f"run's steps (its epochs, the table's, over the {n_train} train images of {args.data.name}, batch "
        f"{BATCH}) and its evaluation ({n_val} val images), times its seeds; teachers: "
        f"{', '.join(TITLES[t] for t in args.families)}.",
        "",
        "| student (R18) | epochs | alone: seeds | alone: CPU h | cells: seeds | "
        + " | ".join(f"{m}: CPU h" for m in METHODS) + " | row: CPU h |",
        "|---|---|---|---|---|" + "---|" * len(METHODS) + "---|",
        *rows,
        "",
        f"Stage 1 ({ake_epochs} epochs of {ake_train} images per teacher): {stage1:.1f} CPU h. "
        f"**In all: {total:.1f} CPU hours, {total / cores:.1f} hours on {cores} cores** (one single-thread run per "
        "core, no other work).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(parser)
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--ake-data", type=Path, default=None, help="stage 1's dataset, when not --data")
    parser.add_argument("--measure", action="store_true", help="measure the step times missing from the file")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps-file", type=Path, default=STEPS)
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this markdown file")
    args = parse_plan(parser)
    if args.measure:
        measure_all(args)
        return
    section = estimate(args)
    print("\n".join(section))
    if args.doc is not None:
        replace_section(args.doc, "\n".join(section) + "\n", title="# Results")


if __name__ == "__main__":
    main()
