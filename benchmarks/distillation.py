"""Distil each family's R50 teacher into an R18 student (RetinaNet by default): the student alone, FitNet and
UniKD, per seed.

    python benchmarks/distillation.py [--seeds 0 1] [--families F ...] [--student FAMILY] [--runs runs/distill]
        [--teachers runs/baselines] [--jobs 2]
    python benchmarks/distillation.py [--student FAMILY] --table-only     # rebuild the docs table from the JSONs

Needs the finished teachers of ``benchmarks/baselines.py`` (``TEACHERS/FAMILY_r50_teacher/last.pt`` beside its
``eval.json``; with ``--wait-teachers``, the jobs that read a teacher still in training wait for it). Jobs, each
resumable (a finished one is skipped, and so is one whose JSON is in ``--results``, its run folder gone with an
earlier machine; an interrupted one continues from its ``last.pt``):

- stage 1 per teacher (one set of AKEs per teacher, shared by the seeds): ``unikd pretrain-ake
  configs/digits/ake.yaml --teacher T`` → ``RUNS/ake_FAMILY``;
- the student alone per seed: ``unikd distill configs/digits/distill_STUDENT_r18.yaml --method none --seed S``
  (the teacher is loaded but never run) → ``RUNS/none_sS``;
- stage 2 per teacher, method and seed: ``unikd distill ... --teacher T [--ake ...] --method M --seed S``
  → ``RUNS/FAMILY_METHOD_sS``.

Each finished run's metrics go to ``benchmarks/results/distillation/NAME.json`` (small, committed), and the
table in docs/results.md is built from those files only, so it survives a change of machine. A student other
than RetinaNet (``--student``) has its stage-2 runs in ``RUNS/STUDENT/``, its JSONs in
``benchmarks/results/distillation/STUDENT/`` and a table of its own; the AKEs (``RUNS/ake_FAMILY``) depend on the
teacher alone and serve every student. ``--jobs`` run
side by side, each with ``--threads`` (default ``cores / jobs``) torch threads; a UniKD run waits for its AKEs.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from doc_sections import replace_section
from runner import check_ake_file, run_job

from unikd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# Teachers, the slowest first; the first three are the RetinaNet student's default.
FAMILIES = ("faster_rcnn", "fcos", "retinanet", "deformable_detr", "reppoints", "atss")
METHODS = ("fitnet", "unikd")
DIGITS = ROOT / "configs" / "digits"
AKE_CONFIG = DIGITS / "ake.yaml"
STUDENTS = sorted(p.stem[len("distill_"):-len("_r18")] for p in DIGITS.glob("distill_*_r18.yaml"))
TITLES = {"retinanet": "RetinaNet", "deformable_detr": "Deformable DETR", "atss": "ATSS", "fcos": "FCOS",
          "faster_rcnn": "Faster R-CNN", "reppoints": "RepPoints"}
RESULTS = ROOT / "benchmarks" / "results" / "distillation"
HELDOUT_METRICS = "eval_heldout.json"  # what ``unikd eval --split heldout`` writes beside the checkpoint
NOT_LOSSES = ("epoch", "lr", "images_per_s", "train_seconds")  # what a metrics.jsonl line logs besides the losses


def student_config(student: str, configs: Path = DIGITS) -> Path:
    return configs / f"distill_{student}_r18.yaml"


def student_folder(folder: Path, student: str) -> Path:
    """Where a student's stage-2 runs or JSONs go under ``folder``: the RetinaNet student's stay where they always
    were, the others' in a subfolder named after the student."""
    return folder if student == "retinanet" else folder / student


def teacher_checkpoint(teachers: Path, family: str) -> Path:
    return teachers / f"{family}_r50_teacher" / "last.pt"


MACHINE_PACKAGES = ("torch", "torchvision", "numpy", "pillow")  # what a run's numbers (and the data) depend on


@functools.cache
def machine() -> dict:
    """Where a run ran, recorded in its JSON: the CPU's model and the versions of ``MACHINE_PACKAGES``. The same
    command and seed give other numbers on another machine (docs/results.md, "The matrix on a second machine")."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text() if cpuinfo.is_file() else "").splitlines()
              if line.startswith("model name")]
    return {"cpu": models[0] if models else platform.processor(),
            "packages": {p: importlib.metadata.version(p) for p in MACHINE_PACKAGES}}


def record(results: Path, run: Path, name: str, extra: dict | None = None) -> None:
    """Copy a finished run's metrics, its training minutes, the :func:`machine` it ran on, its logged training
    losses (``curve``: each logged step's losses, to 4 significant digits, for the analysis of loss scales once the
    run folder is gone) and its held-out metrics when ``benchmarks/ablations.py`` evaluated it there into
    ``RESULTS/NAME.json``."""
    done = run / ("report.json" if name.startswith("ake_") else "eval.json")
    metrics = json.loads(done.read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [{k: v if k == "step" else float(f"{v:.4g}") for k, v in r.items()
              if k not in NOT_LOSSES and isinstance(v, (int, float))} for r in logged if "eval" not in r]
    entry = {"name": name, "metrics": metrics, "train_minutes": max(r.get("train_seconds", 0) for r in logged) / 60,
             **(extra or {}), "machine": machine(), "curve": curve}
    if (run / HELDOUT_METRICS).is_file():
        entry["heldout"] = json.loads((run / HELDOUT_METRICS).read_text())
    results.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: another job (a thread, or a schedule beside this one) may read it meanwhile.
    part = results / f"{name}.json.part"
    part.write_text(json.dumps(entry, indent=2) + "\n")
    part.replace(results / f"{name}.json")


@functools.cache
def checkpoint_sha256(path: Path) -> str:
    """A teacher checkpoint's SHA-256, recorded in each FitNet or UniKD run's JSON: which teacher the run read,
    once a teacher has been trained again (on a new machine it does not come out bit for bit the same)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recorded(results: Path, name: str, heldout: bool = False) -> bool:
    """Whether ``RESULTS/NAME.json`` records the run (with its held-out metrics, when ``heldout``): the committed
    JSON stands for a finished run whose folder is gone (a new machine), which is then not run again."""
    path = results / f"{name}.json"
    return path.is_file() and (not heldout or "heldout" in json.loads(path.read_text()))


def check_same_teacher(results: Path, teachers: Path, fam: str) -> None:
    """Stop when a run recorded anywhere under ``results`` read another checkpoint of ``fam``'s teacher than the
    one in ``teachers`` (its ``teacher_sha256``; runs recorded without one are not checked): a teacher trained
    again, as on a new machine, does not come out bit for bit the same, and a column of the matrix, or an
    ablation read against it, must read one teacher."""
    sha = checkpoint_sha256(teacher_checkpoint(teachers, fam))
    other = sorted(str(p.relative_to(results)) for p in results.rglob("*.json")
                   if (run := json.loads(p.read_text())).get("teacher") == fam
                   and run.get("teacher_sha256", sha) != sha)
    if other:
        sys.exit(f"{teacher_checkpoint(teachers, fam)} is not the {fam} teacher that {len(other)} recorded runs "
                 f"under {results} read ({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}): move those "
                 "runs' JSONs aside (docs/results.md, 'The matrix on a second machine') or give that teacher back")


def check_finished_teachers(args, fams) -> None:
    """:func:`check_same_teacher` now, before any job starts, for each of ``fams`` whose teacher is finished; one
    still in training (``--wait-teachers``) is checked by :func:`ready_teacher` before each job that reads it."""
    for fam in sorted(set(fams)):
        if (teacher_checkpoint(args.teachers, fam).parent / "eval.json").exists():
            check_same_teacher(args.results, args.teachers, fam)


def ready_teacher(args, fam: str) -> None:
    """Called by every job that reads ``fam``'s teacher (its AKEs, a FitNet or UniKD run) before it starts: wait
    for the teacher's ``eval.json`` (only with ``--wait-teachers`` is one still in training), then
    :func:`check_same_teacher`."""
    while not (teacher_checkpoint(args.teachers, fam).parent / "eval.json").exists():
        time.sleep(30)
    check_same_teacher(args.results, args.teachers, fam)


def check_teachers(args) -> None:
    """Stop now when a teacher of ``args.families`` is missing or unfinished, unless ``--wait-teachers``."""
    for fam in args.families:
        if not (teacher_checkpoint(args.teachers, fam).parent / "eval.json").exists() and not args.wait_teachers:
            sys.exit(f"teacher {teacher_checkpoint(args.teachers, fam)} is missing or unfinished (no eval.json): "
                     "run benchmarks/baselines.py first, or pass --wait-teachers while it runs")


def alone_teacher(args) -> str:
    """The teacher every ``--method none`` run loads (and never runs): the first of FAMILIES with a finished
    checkpoint, whatever teachers a schedule asks for, so that the matrix, the distillation table and the
    ablations give the student alone the same command and can resume each other's runs."""
    finished = [f for f in FAMILIES if (teacher_checkpoint(args.teachers, f).parent / "eval.json").exists()]
    return finished[0] if finished else args.families[0]


def job_threads(args) -> int:
    """Torch threads per job: ``--threads``, else the cores shared by the ``--jobs``."""
    return args.threads or max(1, (os.cpu_count() or 1) // args.jobs)


def schedule(args, threads: int, student: str, seeds: list[int], alone_seeds: list[int],
             configs: Path = DIGITS, epochs: int | None = None) -> None:
    """Stage 1 for every teacher of ``args.families`` first, then the student alone per seed of ``alone_seeds``
    and the FitNet runs per seed of ``seeds`` (no AKE needed), then the UniKD runs. ``configs`` holds
    ``ake.yaml`` and the student's ``distill_STUDENT_r18.yaml``; ``epochs``, when given, replaces that config's
    in every stage-2 run. Each stage-2 JSON records its epochs."""
    stage2_epochs = epochs or load_config(student_config(student, configs)).train.epochs
    runs, results = student_folder(args.runs, student), student_folder(args.results, student)
    other = {r["epochs"] for r in load_results(results).values() if r.get("epochs", stage2_epochs) != stage2_epochs}
    if other:
        sys.exit(f"{results} holds runs of {sorted(other)} epochs, this schedule's are {stage2_epochs}: give this "
                 "profile its own --runs and --results")
    for fam in args.families:
        check_ake_file(args.runs / f"ake_{fam}" / "ake.safetensors")
    check_finished_teachers(args, [f for f in args.families for m in METHODS for s in seeds
                                   if not recorded(results, f"{f}_{m}_s{s}")])
    with ThreadPoolExecutor(args.jobs) as pool:
        akes: dict[str, Future] = {}

        def stage1(fam: str) -> None:
            ready_teacher(args, fam)
            record(results, teacher_checkpoint(args.teachers, fam).parent, f"teacher_{fam}")
            out = args.runs / f"ake_{fam}"
            run_job(pretrain_command(args, fam, configs), out, "report.json", threads)
            record(results, out, f"ake_{fam}")

        def stage2(fam: str, method: str, seed: int) -> None:
            name = f"none_s{seed}" if method == "none" else f"{fam}_{method}_s{seed}"
            if recorded(results, name):
                return
            if method == "unikd":
                akes[fam].result()
            if method != "none":
                ready_teacher(args, fam)
            run_job(distill_command(args, student, fam, method, seed, configs, epochs), runs / name, "eval.json",
                    threads, prune=True)
            extra = {"teacher": fam, "method": method, "seed": seed, "epochs": stage2_epochs}
            if method != "none":
                extra["teacher_sha256"] = checkpoint_sha256(teacher_checkpoint(args.teachers, fam))
            record(results, runs / name, name, extra)

        # Stage 1 only where a UniKD run is left to do: recorded runs need no AKEs.
        for fam in [f for f in args.families if not all(recorded(results, f"{f}_unikd_s{s}") for s in seeds)]:
            akes[fam] = pool.submit(stage1, fam)
        # Not named ``runs``: stage2 reads that folder when it runs, after this line.
        jobs = [pool.submit(stage2, alone_teacher(args), "none", seed) for seed in alone_seeds]
        jobs += [pool.submit(stage2, fam, m, seed) for seed in seeds for m in METHODS for fam in args.families]
        for job in [*akes.values(), *jobs]:
            job.result()


def pretrain_command(args, fam: str, configs: Path = DIGITS, overrides: tuple[str, ...] = ()) -> list[str]:
    """``unikd pretrain-ake`` of ``fam``'s teacher on ``args.ake_data`` (else ``args.data``) with ``configs``' AKE
    config (and ``--set`` each of ``overrides``), less ``--out``."""
    return ["pretrain-ake", str(configs / AKE_CONFIG.name), "--teacher", str(teacher_checkpoint(args.teachers, fam)),
            "--data", str(args.ake_data or args.data), *[a for o in overrides for a in ("--set", o)]]


def distill_command(args, student: str, fam: str, method: str, seed: int, configs: Path = DIGITS,
                    epochs: int | None = None, akes: Path | None = None, overrides: tuple[str, ...] = ()) -> list[str]:
    """``unikd distill`` of ``student`` from ``fam``'s teacher with ``method`` and ``seed`` on ``args.data`` (UniKD
    with the AKEs of ``akes``, by default ``RUNS/ake_FAMILY``), less ``--out``."""
    cmd = ["distill", str(student_config(student, configs)), "--teacher", str(teacher_checkpoint(args.teachers, fam)),
           "--method", method, "--seed", str(seed), "--data", str(args.data),
           *(["--epochs", str(epochs)] if epochs else []), *[a for o in overrides for a in ("--set", o)]]
    if method == "unikd":
        cmd += ["--ake", str((akes or args.runs / f"ake_{fam}") / "ake.safetensors")]
    return cmd


def load_results(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def ap(results: dict, name: str) -> float | None:
    return 100 * results[name]["metrics"]["AP"] if name in results else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def write_results(doc: Path, folder: Path, command: str, student: str) -> None:
    results = load_results(folder)
    seeds = sorted({r["seed"] for r in results.values() if "seed" in r})
    teachers = {r["teacher"] for r in results.values() if r.get("method", "none") != "none"}
    teachers |= {name[len("teacher_"):] for name in results if name.startswith("teacher_")}
    lines = [
        f"## Distillation into the R18 {TITLES[student]} student",
        "",
        f"Command: `{command}` (table written {datetime.date.today()}, {os.cpu_count()} CPU cores, `--jobs` runs "
        f"side by side; every figure is read from `{student_folder(RESULTS.relative_to(ROOT), student)}/*.json`, one "
        "file per finished "
        f"run). Student: `configs/digits/{student_config(student).name}`; AKEs: `configs/digits/ake.yaml`, one set "
        "per teacher shared by the seeds and students. Val AP on digits-det; the gain is over the student alone of "
        "the same seed.",
        "",
        "| teacher (R50) | seed | student alone | FitNet (gain) | UniKD (gain) | UniKD − FitNet |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for fam in [f for f in FAMILIES if f in teachers]:
        gains: dict[str, list[float]] = {"fitnet": [], "unikd": [], "margin": []}
        for seed in seeds:
            base = ap(results, f"none_s{seed}")
            cells = [fam, str(seed), f"{base:.1f}" if base is not None else "not run"]
            values = {m: ap(results, f"{fam}_{m}_s{seed}") for m in METHODS}
            for m in METHODS:
                v = values[m]
                if v is None:
                    cells.append("not run")
                elif base is None:
                    cells.append(f"{v:.1f}")
                else:
                    cells.append(f"{v:.1f} ({v - base:+.1f})")
                    gains[m].append(v - base)
            if None not in values.values():
                gains["margin"].append(values["unikd"] - values["fitnet"])
                cells.append(f"{values['unikd'] - values['fitnet']:+.1f}")
            else:
                cells.append("–")
            lines.append("| " + " | ".join(cells) + " |")
        report = results.get(f"ake_{fam}", {}).get("metrics")
        summary.append((fam, gains, report))
    lines += ["", "Over the seeds (mean ± sample std of the per-seed differences):", "",
              "| teacher (R50) | teacher AP | seeds | FitNet gain | UniKD gain | UniKD − FitNet | content-AKE AP | "
              "stage 1 / teacher time |", "|---|---|---|---|---|---|---|---|"]
    for fam, gains, report in summary:
        teacher = ap(results, f"teacher_{fam}")
        ake_cells = ([f"{100 * report['ake_val']['AP']:.1f}", f"{report['fraction_of_teacher_training']:.0%}"]
                     if report else ["not run", "–"])
        cells = [fam, "–" if teacher is None else f"{teacher:.1f}", str(len(gains["margin"])),
                 mean_std(gains["fitnet"]), mean_std(gains["unikd"]), mean_std(gains["margin"]), *ake_cells]
        lines.append("| " + " | ".join(cells) + " |")
    replace_section(doc, "\n".join(lines) + "\n", title="# Results")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`schedule` and the table read besides the students, teachers and seeds: folders, jobs,
    threads, ``--wait-teachers``, ``--table-only``."""
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "distill")
    parser.add_argument("--teachers", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--ake-data", type=Path, default=None,
                        help="stage 1's dataset, when not --data (a smaller profile's AKEs on the teachers' data)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per job (default: cores / jobs); set it when other work shares the cores")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the per-run JSONs")
    parser.add_argument("--wait-teachers", action="store_true",
                        help="a teacher still in training: the jobs that read it wait for its eval.json")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the JSONs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES[:3]),
                        help="teachers to run (default: %(default)s; the table lists every teacher with results)")
    parser.add_argument("--student", choices=STUDENTS, default="retinanet",
                        help="the student (configs/digits/distill_STUDENT_r18.yaml)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if not args.table_only:
        check_teachers(args)
        tic = time.time()
        schedule(args, job_threads(args), args.student, args.seeds, args.seeds)
        print(f"done in {(time.time() - tic) / 60:.1f} min")
    write_results(args.doc, student_folder(args.results, args.student),
                  "python benchmarks/distillation.py " + " ".join(sys.argv[1:]), args.student)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
