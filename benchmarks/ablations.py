"""Issue 13's runs beside the matrix: the ablations of the paper's Table 6, the controls, FGD / MGD / PKD beside
FitNet and UniKD, and the runs of the analysis, each a change to one of the matrix's runs, at the matrix's profile
and sharing its runs.

    python benchmarks/ablations.py [--groups a c d e f g controls kd w x] [--seeds 0 1 2] [--teachers-families F ...]
        [--data DIR] [--runs DIR] [--teachers DIR] [--results DIR] [--student-epochs STUDENT=N ...] [--jobs 2]
        [--threads N]
    python benchmarks/ablations.py --table-only [--results DIR]
    python benchmarks/ablations.py --estimate [--groups ...] [--seeds ...] [--data DIR] [--results DIR]

A variant changes one thing in a matrix run of a pair (``benchmarks/matrix.py`` with the same ``--data``,
``--runs``, ``--results`` and ``--student-epochs``): a stage-1 setting (its own AKEs, ``RUNS/ake_FAMILY_KEY``), a
stage-2 setting, the method, or the student's epochs. Its runs go to ``RUNS/ablations/NAME_sS`` and its JSONs to
``RESULTS/ablations/NAME_sS.json``; the setting it is compared with (the matrix's: λ 0.5, N 100, one layer in
``f_e``, AKEs of 5 epochs, both query types, φ of 2 layers for UniKD and 1 for FitNet) is the matrix's own run of
the same seed, and the student alone its ``none_sS``. Stage 1 and the matrix's runs that a variant needs are run
here when missing (in the matrix's folders, so that either script's run serves both). Resumable as the matrix: a
run whose JSON is recorded (with the held-out metrics it needs) is done, its folder kept or not.

When ``--data`` has a ``heldout`` split (``unikd data build digits-det --heldout K``), every run is also evaluated
there (``RUN/eval_heldout.json``, in its JSON): FitNet's weight (group w) and UniKD's λ (group e) are chosen on it,
never on val.

The table (a section of docs/results.md) is built from the JSONs alone: per variant, its AP over the seeds and its
difference with the matrix's run of each seed, mean ± sample std; then the weights chosen on the held-out images.
``--estimate`` writes instead the CPU hours of the chosen groups by ``matrix_cost.py``'s step times, and how many of
their runs ``--results`` records and what the others take.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from distillation import (DIGITS, FAMILIES, HELDOUT_METRICS, TITLES, add_run_arguments, alone_teacher,
                          check_finished_teachers, check_teachers, checkpoint_sha256, distill_command, job_threads,
                          load_results, mean_std, pretrain_command, ready_teacher, record, recorded, student_config,
                          student_folder, teacher_checkpoint)
from doc_sections import replace_section
from matrix import METHOD_TITLES, parse_plan, shown, stage2_epochs, student_epochs
from matrix_cost import STEPS, Planned, job_hours, progress, train_hours
from run_cost import BATCH
from runner import UNIKD, check_ake_file, run_job

from unikd.config import load_config
from unikd.data import CocoDetection


@dataclass(frozen=True)
class Variant:
    """One change to the matrix's ``method`` run of ``teacher`` → ``student``."""

    group: str
    label: str
    teacher: str = "retinanet"
    method: str = "unikd"
    stage1: tuple[str, ...] = ()  # --set KEY=VALUE of pretrain-ake: AKEs of their own
    stage2: tuple[str, ...] = ()  # --set KEY=VALUE of distill
    epochs: int | None = None  # the student's stage-2 epochs, else the matrix's
    student: str = "retinanet"

    @property
    def name(self) -> str:
        return f"{self.group}_{slug(self.label)}"

    @property
    def job(self) -> str:
        """Its stage-2 job's name in ``matrix_cost.py``'s step times."""
        return f"{self.student}: none" if self.method == "none" else f"{self.teacher} -> {self.student}: {self.method}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# Groups: the paper's Table 6 (a)-(g), the controls and the feature-distillation baselines of issue 13.
GROUPS = {
    "a": "Tab. 6a: the query types UniKD distils (RetinaNet → RetinaNet; the matrix: both)",
    "c": "Tab. 6c: N queries per type (RetinaNet → RetinaNet; the matrix: 100)",
    "d": "Tab. 6d: decoder layers in f_e (RetinaNet → RetinaNet; the matrix: 1)",
    "e": "Tab. 6e: λ = λ1 = λ2 (RetinaNet → RetinaNet; the matrix: 0.5)",
    "f": "Tab. 6f: AKE pretraining epochs (RetinaNet → RetinaNet; the matrix: 5)",
    "g": "Tab. 6g: self-attention layers in φ, FitNet with the same adaptor (Deformable DETR → RetinaNet; the "
         "matrix: UniKD 2, FitNet 1)",
    "controls": "Controls (RetinaNet → RetinaNet): untrained AKEs, the student alone trained longer, FitNet and "
                "UniKD trained as long",
    "kd": "FGD, MGD and PKD beside FitNet and UniKD (into the R18 RetinaNet)",
    "w": "FitNet's weight (RetinaNet → RetinaNet; the matrix: 0.2); UniKD's λ is group e",
    "x": "Analysis: UniKD's λ in a cell where it trails FitNet (ATSS → Faster R-CNN; the matrix: 0.9)",
    "y": "Analysis: UniKD's λ in the student where it leads FitNet least (ATSS → RepPoints; the matrix: 1)",
}
WEIGHT_GROUPS = ("w", "e")  # the groups whose weights are chosen on the held-out images
# 1 homogeneous pair, 4 not: the strong teachers (RepPoints', 14.7 AP here and 14.6 on the first machine, is
# weaker than some students alone)
KD_TEACHERS = ("retinanet", "atss", "fcos", "faster_rcnn", "deformable_detr")


def variants(alone_epochs: int, matched_epochs: int) -> list[Variant]:
    """Every variant; ``alone_epochs`` is the student's epochs in the matrix, ``matched_epochs`` those of the
    student alone that take as long as its UniKD run (from the measured step times)."""
    out = [Variant("a", f"{q} queries only", stage2=(f"distill.queries={q}",)) for q in ("content", "positional")]
    out += [Variant("c", f"N = {n}", stage1=(f"ake.n_queries={n}",)) for n in (200, 300)]
    out += [Variant("d", f"{n} layers", stage1=(f"ake.extractor_layers={n}",)) for n in (2, 3)]
    # The weight grids are the with one value above each: on seed 0 both held-out choices were the grid's top
    out += [Variant("e", f"λ = {v}", stage2=(f"distill.lambda_ct={v}", f"distill.lambda_pos={v}"))
            for v in (0.1, 2, 10, 30)]
    out += [Variant("f", f"{n} epochs", stage1=(f"train.epochs={n}",)) for n in (1, 3, 10)]
    out += [Variant("g", f"{m} φ {n} layers", teacher="deformable_detr", method=m,
                    stage2=(f"distill.adaptor_layers={n}",))
            for m, default in (("unikd", 2), ("fitnet", 1)) for n in range(4) if n != default]
    out += [Variant("controls", "UniKD, untrained AKEs", stage1=("train.lr=1e-12", "train.max_iters=1")),
            Variant("controls", f"alone, {2 * alone_epochs} epochs", method="none", epochs=2 * alone_epochs),
            Variant("controls", f"alone, {matched_epochs} epochs (UniKD's time)", method="none",
                    epochs=matched_epochs),
            *[Variant("controls", f"{METHOD_TITLES[m]}, {2 * alone_epochs} epochs", method=m, epochs=2 * alone_epochs)
              for m in ("fitnet", "unikd")]]
    out += [Variant("kd", f"{TITLES[t]} {m}", teacher=t, method=m) for t in KD_TEACHERS for m in ("fgd", "mgd", "pkd")]
    out += [Variant("w", f"FitNet weight {v}", method="fitnet", stage2=(f"distill.fitnet_weight={v}",))
            for v in (0.5, 1, 2, 4, 8)]
    # UniKD pulls 2.4 times as hard as FitNet on the features there (grad_scale.py): a third and three times λ
    out += [Variant("x", f"λ = {v}", teacher="atss", student="faster_rcnn",
                    stage2=(f"distill.lambda_ct={v}", f"distill.lambda_pos={v}")) for v in (0.3, 2.7)]
    # Both methods' gradients are 13-38 times the RepPoints student's detection gradient (grad_scale.py): a third
    # and three times λ, as for group x
    out += [Variant("y", f"λ = {v}", teacher="atss", student="reppoints",
                    stage2=(f"distill.lambda_ct={v}", f"distill.lambda_pos={v}")) for v in (0.3, 3)]
    return out


def chosen_variants(args, steps: dict) -> list[Variant]:
    """The variants of ``args.groups`` whose teacher is one of ``args.families``, at the profile's epochs of the
    RetinaNet student (``args.student_epochs``, else its config's)."""
    alone = stage2_epochs(args, "retinanet")
    return [v for v in variants(alone, matched_epochs(steps, "retinanet", "retinanet", alone))
            if v.group in args.groups and v.teacher in args.families]


def ake_folder(runs: Path, variant: Variant) -> Path:
    """The AKEs a UniKD variant reads: the matrix's of its teacher, or its own when it changes stage 1."""
    key = "_".join(slug(o) for o in variant.stage1)
    return runs / (f"ake_{variant.teacher}_{key}" if key else f"ake_{variant.teacher}")


def references(variant: Variant) -> list[str]:
    """The methods of the matrix's runs of ``variant``'s pair that its table row is read against: the student
    alone, the run it changes, and FitNet and UniKD for the feature baselines and the controls."""
    wanted = {"none", variant.method} | ({"fitnet", "unikd"} if variant.group == "kd" else set())
    wanted |= {"unikd"} if variant.group == "controls" else set()
    return [m for m in ("none", "fitnet", "unikd") if m in wanted]


def matrix_prefix(teacher: str, method: str) -> str:
    """The matrix's run (and JSON) of a pair and method is ``PREFIX_sSEED``."""
    return "none" if method == "none" else f"{teacher}_{method}"


def matched_epochs(steps: dict, student: str, teacher: str, epochs: int) -> int:
    """The student alone's epochs that take as long as its UniKD run of ``epochs`` (``benchmarks/matrix_cost.py``'s
    measured step times), rounded up."""
    return math.ceil(epochs * steps[f"{teacher} -> {student}: unikd"]["step"] / steps[f"{student}: none"]["step"])


def schedule(args, chosen: list[Variant], threads: int) -> None:
    """Every AKE set, matrix run and variant run that ``chosen`` needs, each once: the AKEs, then the runs (a
    UniKD run waits for its AKEs)."""
    results = args.results / "ablations"
    heldout = (args.data / "annotations" / "instances_heldout.json").is_file()
    # (variant, seed, whether it is the variant's own run or one of the matrix's) per run folder
    runs: dict[Path, tuple[Variant, int, bool]] = {}
    chooses: set[Path] = set()  # the matrix's runs whose held-out AP takes part in choosing a weight
    for variant in chosen:
        for seed in args.seeds:
            for method in references(variant):
                matrix_run = Variant("", "", variant.teacher, method, student=variant.student)
                out = student_folder(args.runs, variant.student) / f"{matrix_prefix(variant.teacher, method)}_s{seed}"
                runs.setdefault(out, (matrix_run, seed, False))
                if variant.group in WEIGHT_GROUPS and method == variant.method:
                    chooses.add(out)
            runs[args.runs / "ablations" / f"{variant.name}_s{seed}"] = (variant, seed, True)

    def destination(variant: Variant, own: bool) -> Path:
        return results if own else student_folder(args.results, variant.student)

    # A run recorded in its JSON (with the held-out metrics it needs) is done, its folder kept or not.
    runs = {out: (v, seed, own) for out, (v, seed, own) in runs.items()
            if not recorded(destination(v, own), out.name, heldout and (own or out in chooses))}
    ake_sets = {ake_folder(args.runs, v): v for v, _, _ in runs.values() if v.method == "unikd"}
    check_finished_teachers(args, [v.teacher for v, _, _ in runs.values() if v.method != "none"])

    def stage1(variant: Variant) -> None:
        out = ake_folder(args.runs, variant)
        check_ake_file(out / "ake.safetensors")
        ready_teacher(args, variant.teacher)
        run_job(pretrain_command(args, variant.teacher, args.configs, variant.stage1), out, "report.json", threads)
        record(results if variant.stage1 else args.results, out, out.name)

    def stage2(out: Path, variant: Variant, seed: int, own: bool) -> None:
        if variant.method == "unikd":
            akes[ake_folder(args.runs, variant)].result()
        epochs = variant.epochs or args.student_epochs.get(variant.student)
        teacher = alone_teacher(args) if variant.method == "none" else variant.teacher
        if variant.method != "none":
            ready_teacher(args, teacher)
        run_job(distill_command(args, variant.student, teacher, variant.method, seed, args.configs, epochs,
                                ake_folder(args.runs, variant), variant.stage2), out, "eval.json", threads,
                prune=True)
        if heldout and not (out / HELDOUT_METRICS).is_file():
            subprocess.run([UNIKD, "eval", "--checkpoint", str(out / "student.pt"), "--data", str(args.data),
                            "--split", "heldout"], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        epochs = epochs or load_config(student_config(variant.student, args.configs)).train.epochs
        extra = {"teacher": variant.teacher, "method": variant.method, "seed": seed, "epochs": epochs}
        if variant.method != "none":
            extra["teacher_sha256"] = checkpoint_sha256(teacher_checkpoint(args.teachers, variant.teacher))
        if own:
            extra |= {"variant": variant.name, "group": variant.group, "label": variant.label,
                      "student": variant.student}
        record(destination(variant, own), out, out.name, extra)

    with ThreadPoolExecutor(args.jobs) as pool:
        akes: dict[Path, Future] = {folder: pool.submit(stage1, v) for folder, v in ake_sets.items()}
        jobs = [pool.submit(stage2, out, *job) for out, job in runs.items()]
        for job in [*akes.values(), *jobs]:
            job.result()


def per_seed(runs: dict[str, dict], prefix: str) -> dict[int, float]:
    """AP (%) per seed of the JSONs named ``PREFIX_sS``."""
    return {r["seed"]: 100 * r["metrics"]["AP"] for name, r in runs.items() if name.rsplit("_s", 1)[0] == prefix}


def differences(values: dict[int, float], base: dict[int, float]) -> str:
    """``mean ± std`` of the per-seed differences (``–`` with no common seed)."""
    diffs = [values[s] - base[s] for s in sorted(values) if s in base]
    return ("+" if diffs and statistics.mean(diffs) >= 0 else "") + mean_std(diffs) if diffs else "–"


def row(label: str, values: dict[int, float], alone: dict[int, float], base: dict[int, float] | None) -> str:
    return (f"| {label} | {len(values)} | {mean_std(list(values.values()))} | {differences(values, alone)} | "
            f"{differences(values, base) if base is not None else '–'} |")


def alone_of(run: dict, own: dict[str, dict], matrix: dict[str, dict]) -> tuple[dict[int, float], int | None]:
    """The student alone a variant's run is read against, AP per seed: the matrix's; for a distillation run of
    other epochs than the matrix's student alone, the controls' student alone of the same epochs (and those epochs;
    no seeds when there is none)."""
    if run["method"] == "none" or run.get("epochs") in {m.get("epochs") for m in matrix.values()
                                                         if m.get("method") == "none"}:
        return per_seed(matrix, "none"), None
    same = [r["variant"] for r in own.values() if r.get("method") == "none" and r.get("student") == run["student"]
            and r.get("epochs") == run.get("epochs")]
    return (per_seed(own, same[0]) if same else {}), run.get("epochs")


def tables(results: Path) -> list[str]:
    """Per group with results: the matrix's runs its variants are read against, then the variants."""
    own = load_results(results / "ablations")
    lines = []
    for group, title in GROUPS.items():
        variants_run = {r["variant"]: r for r in own.values() if r.get("group") == group}
        if not variants_run:
            continue
        header = "| run | seeds | AP | − student alone | − the matrix's run of its method |"
        lines += ["", f"**{title}**", "", header, "|---|---|---|---|---|"]
        listed = set()
        for name, r in variants_run.items():
            matrix = load_results(student_folder(results, r["student"]))
            alone, epochs = alone_of(r, own, matrix)
            for method in references(Variant(group, "", r["teacher"], r["method"])):
                if (r["student"], r["teacher"], method) not in listed:
                    listed.add((r["student"], r["teacher"], method))
                    label = "student alone" if method == "none" else f"matrix: {TITLES[r['teacher']]} {method}"
                    lines.append(row(label, per_seed(matrix, matrix_prefix(r["teacher"], method)),
                                     per_seed(matrix, "none"), None))
            base = per_seed(matrix, matrix_prefix(r["teacher"], r["method"]))
            label = r["label"] + (f" (− the student alone of {epochs} epochs)" if epochs else "")
            lines.append(row(label, per_seed(own, name), alone,
                             base if r["method"] in ("none", "fitnet", "unikd") else None))
    return lines


FEATURE_METHODS = ("fitnet", "fgd", "mgd", "pkd", "unikd")  # the comparison's columns: the baselines, then UniKD


def baselines_comparison(results: Path) -> list[str]:
    """Issue 13's baselines comparison, pair by pair: per teacher of group kd with results, the gain over the
    student alone (per seed, mean ± std) of FitNet, FGD, MGD, PKD and UniKD into the R18 RetinaNet, with its seeds;
    then, per baseline, the pairs where UniKD is above it on their common seeds."""
    own, matrix = load_results(results / "ablations"), load_results(results)
    teachers = [t for t in KD_TEACHERS if any(r.get("group") == "kd" and r["teacher"] == t for r in own.values())]
    if not teachers:
        return []
    alone = per_seed(matrix, "none")

    def runs(teacher: str, method: str) -> dict[int, float]:
        if method in METHOD_TITLES:
            return per_seed(matrix, matrix_prefix(teacher, method))
        return {r["seed"]: 100 * r["metrics"]["AP"] for r in own.values()
                if r.get("group") == "kd" and (r["teacher"], r["method"]) == (teacher, method)}

    def gain(values: dict[int, float]) -> str:
        return f"{differences(values, alone)} ({len(values.keys() & alone.keys())})" if values else "–"

    cells = {t: {m: runs(t, m) for m in FEATURE_METHODS} for t in teachers}
    lines = ["", "**The feature baselines pair by pair** (R18 RetinaNet student; AP gain over the student alone, per "
             "seed, mean ± std, its seeds in brackets)", "",
             "| teacher (R50) | " + " | ".join(METHOD_TITLES.get(m, m.upper()) for m in FEATURE_METHODS) + " |",
             "|---|" + "---|" * len(FEATURE_METHODS)]
    lines += [f"| {TITLES[t]}{' (same family)' if t == 'retinanet' else ''} | "
              + " | ".join(gain(cells[t][m]) for m in FEATURE_METHODS) + " |" for t in teachers]
    lines.append("")
    for m in FEATURE_METHODS[:-1]:
        leads = [[cells[t]["unikd"][s] - cells[t][m][s] for s in cells[t][m].keys() & cells[t]["unikd"].keys()]
                 for t in teachers]
        leads = [lead for lead in leads if lead]
        if leads:
            lines.append(f"- UniKD above {METHOD_TITLES.get(m, m.upper())} (mean over their common seeds of UniKD's "
                         f"AP minus its): {sum(statistics.mean(lead) > 0 for lead in leads)} of {len(leads)} pairs.")
    return lines


def heldout_per_seed(runs: dict[str, dict], prefix: str) -> dict[int, float]:
    """Held-out AP (%) per seed of the JSONs named ``PREFIX_sS`` that have one."""
    return {r["seed"]: 100 * r["heldout"]["AP"] for name, r in runs.items()
            if name.rsplit("_s", 1)[0] == prefix and "heldout" in r}


def weight_choice(results: Path) -> list[str]:
    """FitNet's weight and UniKD's λ on RetinaNet → RetinaNet, each chosen by its mean AP on the held-out train
    images (the matrix's run and the variants of groups w and e), with the val AP of every candidate. A method's
    candidates are compared on the seeds that all of them have a held-out AP for, and every figure of its rows is
    over those seeds."""
    own, matrix = load_results(results / "ablations"), load_results(results)
    alone = per_seed(matrix, "none")
    candidates = {"fitnet": [("0.2 (the matrix)", matrix, "retinanet_fitnet")],
                  "unikd": [("0.5 (the matrix)", matrix, "retinanet_unikd")]}
    for variant, r in {r["variant"]: r for r in own.values() if r.get("group") in WEIGHT_GROUPS}.items():
        candidates[r["method"]].append((r["label"].split()[-1], own, variant))
    lines = ["", "**Weights chosen on held-out train images** (RetinaNet → RetinaNet; `heldout`, never val)", "",
             "| method | weight | seeds | held-out AP | val AP | val − student alone |", "|---|---|---|---|---|---|"]
    chosen = {}
    for method, runs in candidates.items():
        scored = [(label, heldout_per_seed(folder, prefix), per_seed(folder, prefix)) for label, folder, prefix in runs]
        scored = [c for c in scored if c[1]]
        seeds = set.intersection(*(set(held) for _, held, _ in scored)) if scored else set()
        if not seeds:
            continue
        scored = [(label, {s: held[s] for s in seeds}, {s: val[s] for s in seeds})
                  for label, held, val in scored]
        best = max(scored, key=lambda c: statistics.mean(c[1].values()))
        chosen[method] = best
        for label, held, val in scored:
            mark = " (chosen)" if label == best[0] else ""
            lines.append(f"| {method} | {label}{mark} | {len(held)} | {mean_std(list(held.values()))} | "
                         f"{mean_std(list(val.values()))} | {differences(val, alone)} |")
    if len(chosen) == 2:
        lines += ["", f"UniKD − FitNet on val, each at its chosen weight (per seed, mean ± std): "
                      f"{differences(chosen['unikd'][2], chosen['fitnet'][2])}."]
    return lines if len(lines) > 5 else []


def estimate(args, chosen: list[Variant], steps: dict) -> list[str]:
    """The doc section of the CPU hours that ``chosen`` adds to the matrix, per group: each variant's runs (its
    seeds, its epochs, val and held-out evaluation) and its own AKEs, from ``matrix_cost.py``'s step times
    (FGD, MGD and PKD's among them); stage-1 variants at the AKE step of the matrix's settings."""
    n_train, n_val = (len(CocoDetection(args.data, split, 128)) for split in ("train", "val"))
    n_heldout = len(CocoDetection(args.data, "heldout", 128)) if (
        args.data / "annotations" / "instances_heldout.json").is_file() else 0
    ake_train = len(CocoDetection(args.ake_data or args.data, "train", 128))
    missing = sorted({v.job for v in chosen} - steps.keys())
    if missing:
        sys.exit(f"no step time for {', '.join(missing)}: run python benchmarks/matrix_cost.py --measure first")
    plan: dict[str, list[Planned]] = {}  # per group
    for v in chosen:
        step = steps[v.job]
        epochs = v.epochs or stage2_epochs(args, v.student)
        heldout = step["predict"] * math.ceil(n_heldout / BATCH) / 3600
        runs = plan.setdefault(v.group, [])
        runs += [Planned((f"ablations/{v.name}_s{seed}.json",), train_hours(step, epochs, n_train),
                         job_hours(step, epochs, n_train, n_val) + heldout) for seed in args.seeds]
        if v.stage1:
            stage1 = load_config(args.configs / "ake.yaml", list(v.stage1)).train
            ake_epochs = stage1.epochs if stage1.max_iters == 0 else stage1.max_iters / math.ceil(ake_train / BATCH)
            ake_step = steps[f"ake_{v.teacher}"]
            runs.append(Planned((f"ablations/{ake_folder(Path(), v).name}.json",),
                                train_hours(ake_step, ake_epochs, ake_train),
                                job_hours(ake_step, ake_epochs, ake_train, n_val)))
    hours = {group: sum(run.hours for run in runs) for group, runs in plan.items()}
    total = sum(hours.values())
    return [f"## The ablations' compute on {args.data.name}", "",
            f"Command: `python benchmarks/ablations.py {' '.join(sys.argv[1:])}` (written {datetime.date.today()}; "
            f"step times of `{shown(STEPS)}`). CPU hours at one thread that each group adds to the "
            f"matrix (whose runs it is read against are the matrix's): its runs on {len(args.seeds)} seeds, their "
            f"val and held-out evaluation, and its own AKEs; AKE variants at the matrix's AKE step time.", "",
            "| group | CPU h |", "|---|---|", *[f"| {GROUPS[g]} | {h:.1f} |" for g, h in hours.items()], "",
            f"**In all: {total:.1f} CPU hours, {total / os.cpu_count():.1f} hours on {os.cpu_count()} cores.**", "",
            progress([run for runs in plan.values() for run in runs], args.results)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teachers-families", dest="families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="only the variants of these teachers (default: all; group kd has one per teacher)")
    parser.add_argument("--configs", type=Path, default=DIGITS)
    parser.add_argument("--student-epochs", nargs="+", type=student_epochs, default=[], metavar="STUDENT=N",
                        help="as matrix.py's: the profile's stage-2 epochs of a student in place of its config's")
    parser.add_argument("--steps-file", type=Path, default=STEPS, help="matrix_cost.py's measured step times")
    parser.add_argument("--estimate", action="store_true",
                        help="only write the CPU hours the chosen groups add to the matrix, and what --results "
                        "records of them (docs section)")
    add_run_arguments(parser)
    args = parse_plan(parser)
    steps = json.loads(args.steps_file.read_text())["jobs"]
    chosen = chosen_variants(args, steps)
    if args.estimate:
        section = "\n".join(estimate(args, chosen, steps)) + "\n"
        replace_section(args.doc, section, title="# Results")
        print(section)
        return
    if not args.table_only:
        check_teachers(argparse.Namespace(**{**vars(args), "families": sorted({v.teacher for v in chosen})}))
        tic = time.time()
        schedule(args, chosen, job_threads(args))
        print(f"done in {(time.time() - tic) / 60:.1f} min")
    command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:])
    lines = ["## Ablations, controls and feature baselines", "",
             f"Command: `{command}` (table written {datetime.date.today()}, {os.cpu_count()} CPU cores; every figure "
             f"is read from `{shown(args.results)}/ablations/*.json` and the matrix's JSONs). Val AP on "
             f"{args.data.name}: per run, the mean ± sample std over its seeds, then the mean ± std over the seeds "
             "of its difference with the student alone and with the matrix's run of the same pair and method (same "
             "seed).", *tables(args.results), *baselines_comparison(args.results),
             *weight_choice(args.results)]
    section = "\n".join(lines) + "\n"
    replace_section(args.doc, section, title="# Results")
    print(section)


if __name__ == "__main__":
    main()
