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
``--results`` (matrix.py's folder of JSONs) adds how many of the runs it records, what their training took by their
own clocks against the step times, and what the runs left take, by the step times and at that ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from distillation import METHODS, TITLES, student_folder
from doc_sections import replace_section
from matrix import ORDER, add_plan_arguments, cell_seeds, parse_plan, stage2_epochs
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


def train_hours(step: dict, epochs: float, train_images: int) -> float:
    """CPU hours of one run's training steps."""
    return step["step"] * epochs * math.ceil(train_images / BATCH) / 3600


def job_hours(step: dict, epochs: float, train_images: int, val_images: int) -> float:
    """CPU hours of one run: its training steps and its evaluation's ``predict`` batches."""
    return train_hours(step, epochs, train_images) + step["predict"] * math.ceil(val_images / BATCH) / 3600


class Planned(NamedTuple):
    """One run of an estimate: the JSONs (relative to a results folder) that record it once finished, any one of
    them; its estimated hours of training steps; its estimated hours in all, evaluations included."""
    jsons: tuple[str, ...]
    train: float
    hours: float


def progress(planned: list[Planned], results: Path) -> str:
    """How far ``planned`` has come under ``results``: the runs recorded, what their training took by their own
    clocks (``train_minutes``) against its estimate, and the estimate of the runs left, also at that ratio."""
    done = {}
    for run in planned:
        path = next((results / j for j in run.jsons if (results / j).is_file()), None)
        if path is not None:
            done[run] = json.loads(path.read_text())["train_minutes"] / 60
    left = sum(run.hours for run in planned if run not in done)
    line = f"Recorded under `{results}`: {len(done)} of {len(planned)} runs"
    estimated = sum(run.train for run in done)
    if estimated > 0:
        ratio = sum(done.values()) / estimated
        line += (f"; their training took {sum(done.values()):.1f} hours by their own clocks against {estimated:.1f} "
                 f"by the step times ({ratio:.2f} times). The {len(planned) - len(done)} left: {left:.1f} CPU hours "
                 f"by the step times, {left * ratio:.1f} at that ratio.")
    else:
        line += f". The {len(planned) - len(done)} left: {left:.1f} CPU hours by the step times."
    return line


def planned(args, steps: dict, n_train: int, n_val: int, ake_train: int, ake_epochs: int
            ) -> dict[tuple[str, str], list[Planned]]:
    """Every run of the matrix by ``(student, method)``: stage 1 under ``("", "ake")`` (its JSON is in any
    student's folder), the student alone under ``"none"``, each run on its seeds."""
    runs: dict[tuple[str, str], list[Planned]] = {("", "ake"): [
        Planned(tuple(str(student_folder(Path(), s) / f"ake_{t}.json") for s in ORDER), train_hours(steps[f"ake_{t}"], ake_epochs,
                ake_train), job_hours(steps[f"ake_{t}"], ake_epochs, ake_train, n_val)) for t in args.families]}
    for s in args.students:
        epochs = stage2_epochs(args, s)

        def run(job: str, name: str) -> Planned:
            return Planned((str(student_folder(Path(), s) / f"{name}.json"),), train_hours(steps[job], epochs, n_train),
                           job_hours(steps[job], epochs, n_train, n_val))

        runs[s, "none"] = [run(f"{s}: none", f"none_s{seed}") for seed in args.alone_seeds]
        for m in METHODS:
            runs[s, m] = [run(f"{t} -> {s}: {m}", f"{t}_{m}_s{seed}") for t in args.families
                          for seed in cell_seeds(args, s)]
    return runs


def estimate(args) -> list[str]:
    """The doc section: per student, the hours of its runs, and the matrix's total; with ``args.results``, how
    many of the runs it records and what the others take."""
    record = json.loads(args.steps_file.read_text())
    steps = record["jobs"]
    n_train, n_val = (len(CocoDetection(args.data, split, 128)) for split in ("train", "val"))
    ake_train = len(CocoDetection(args.ake_data or args.data, "train", 128))
    ake_epochs = load_config(args.configs / "ake.yaml").train.epochs
    runs = planned(args, steps, n_train, n_val, ake_train, ake_epochs)
    hours = {key: sum(run.hours for run in plan) for key, plan in runs.items()}
    stage1, total = hours["", "ake"], sum(hours.values())
    rows = [f"| {TITLES[s]} | {stage2_epochs(args, s)} | {len(args.alone_seeds)} | {hours[s, 'none']:.1f} | "
            f"{len(cell_seeds(args, s))} | " + " | ".join(f"{hours[s, m]:.1f}" for m in METHODS)
            + f" | {hours[s, 'none'] + sum(hours[s, m] for m in METHODS):.1f} |" for s in args.students]
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
        *(["", progress([run for plan in runs.values() for run in plan], args.results)] if args.results else []),
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
    parser.add_argument("--results", type=Path, default=None,
                        help="matrix.py's folder of JSONs: say how many of the runs it records and what is left")
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
