"""What issue 8's baseline and distillation runs will cost on this CPU, estimated from a few timed steps.

    python benchmarks/run_cost.py [--data runs/digits-det] [--threads 1] [--steps 3] [--warmup 2]

For every run that ``benchmarks/baselines.py`` and ``benchmarks/distillation.py`` would make for issue 8 (the
R50 teachers and R18 students of ATSS, RepPoints and Deformable DETR, the Mask R-CNN and ConvNeXt-T / Swin-T
teachers; stage 1 on the three pairs' teachers; stage 2 of the pairs Deformable DETR -> RetinaNet, RetinaNet ->
Deformable DETR and RepPoints -> ATSS with none / fitnet / unikd), the median CPU time of ``--steps`` training
steps (forward, backward, AdamW; after ``--warmup`` steps) on a batch of 8 digits-det train images at 128 px,
times the run's iterations (its epochs over 2000 images), plus the evaluation (its ``predict`` on a batch of 8,
times the 500 val images / 8). CPU time of this process (``time.process_time``), not wall time: with one thread
it is what a run takes on a core of its own, whatever else shares the machine while this measures. Weights are
freshly initialised: the cost does not depend on their values. Mask R-CNN's batch comes from a small masks build
in a temporary folder (same image size). Writes a section of docs/results.md with ``--doc``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from distill_cost import step_fn
from doc_sections import replace_section

from unikd.config import load_config
from unikd.data import CocoDetection, build_digits_det, collate
from unikd.detectors import build_detector
from unikd.distill import AbsorbModel, DistillationModel, KnowledgeExtractors, build_distiller

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
TRAIN_IMAGES, VAL_IMAGES, BATCH = 2000, 500, 8
BASELINES = ("deformable_detr_r50_teacher", "deformable_detr_r18_student", "mask_rcnn_r50_teacher",
             "reppoints_r50_teacher", "reppoints_r18_student", "atss_r50_teacher", "atss_r18_student",
             "retinanet_convnext_t_teacher", "retinanet_swin_t_teacher")
PAIRS = (("deformable_detr", "retinanet"), ("retinanet", "deformable_detr"), ("reppoints", "atss"))  # teacher, student
METHODS = ("none", "fitnet", "unikd")


def runs() -> list[tuple[str, str, tuple]]:
    """``(run name, kind, arguments)`` of every planned run: ``train`` (a config), ``stage1`` (a teacher family),
    ``distill`` (teacher, student, method)."""
    plan = [(name, "train", (name,)) for name in BASELINES]
    plan += [(f"ake_{t}", "stage1", (t,)) for t in dict.fromkeys(t for t, _ in PAIRS)]
    plan += [(f"{t} -> {s}: {m}", "distill", (t, s, m)) for t, s in PAIRS for m in METHODS]
    return plan


def build(kind: str, args: tuple, num_classes: int, configs: Path = DIGITS):
    """The trainer's model of a planned run (train mode), its config, and the detector whose ``predict`` its
    evaluation runs; ``configs`` holds ``ake.yaml`` and the students' ``distill_STUDENT_r18.yaml`` (the teachers'
    configs are always those of configs/digits)."""
    if kind == "train":
        cfg = load_config(DIGITS / f"{args[0]}.yaml")
        detector = build_detector(cfg.model, num_classes)
        return detector.train(), cfg, detector
    teacher = build_detector(load_config(DIGITS / f"{args[0]}_r50_teacher.yaml").model, num_classes)
    ake = load_config(configs / "ake.yaml")
    akes = KnowledgeExtractors(ake.ake, len(teacher.feature_strides), teacher.feature_channels[0], num_classes)
    if kind == "stage1":
        model = AbsorbModel(teacher, akes).train()
        return model, ake, model
    _, student_family, method = args
    cfg = load_config(configs / f"distill_{student_family}_r18.yaml")
    student = build_detector(cfg.model, num_classes)
    distiller = build_distiller(method, cfg.distill, student, teacher, akes.teacher_rms,
                                akes if method == "unikd" else None)
    return DistillationModel(student, teacher if distiller else None, distiller).train(), cfg, student


def seconds(fn, steps: int, warmup: int) -> float:
    """Median CPU time of this process over ``steps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        tic = time.process_time()
        fn()
        times.append(time.process_time() - tic)
    return statistics.median(times)


def measure(name: str, kind: str, run_args: tuple, batches: dict, steps: int, warmup: int, configs: Path = DIGITS,
            train_images: int = TRAIN_IMAGES) -> dict:
    """The run's median CPU seconds per training step and per ``predict`` batch, its iterations (its epochs over
    ``train_images``) and the CPU hours they and the evaluation add up to."""
    images, targets = batches["masks" if name.startswith("mask_rcnn") else "boxes"]
    torch.manual_seed(0)
    model, cfg, evaluated = build(kind, run_args, 10, configs)
    step = seconds(step_fn(model, images, targets), steps, warmup)
    evaluated.eval()
    with torch.no_grad():
        predict = seconds(lambda: evaluated.predict(images), steps, 1)
    iters = cfg.train.epochs * math.ceil(train_images / BATCH)
    hours = (step * iters + predict * math.ceil(VAL_IMAGES / BATCH)) / 3600
    return {"name": name, "step": step, "predict": predict, "epochs": cfg.train.epochs, "iters": iters,
            "hours": hours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        masks_root = build_digits_det(Path(tmp) / "masks", seed=0, n_train=BATCH, n_val=1, masks=True)
        batches = {"boxes": collate([CocoDetection(args.data, "train", 128)[i] for i in range(BATCH)]),
                   "masks": collate([CocoDetection(masks_root, "train", 128, masks=True)[i] for i in range(BATCH)])}
        rows = []
        for name, kind, run_args in runs():
            rows.append(measure(name, kind, run_args, batches, args.steps, args.warmup))
            r = rows[-1]
            print(f"{r['name']}: {r['step']:.2f} s/step, predict {r['predict']:.2f} s/batch, {r['iters']} iters, "
                  f"{r['hours']:.2f} h", flush=True)
    lines = [
        "## Issue 8's runs: estimated CPU time",
        "",
        f"Command: `python benchmarks/run_cost.py {' '.join(sys.argv[1:])}` (measured {datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores shared with other work, {args.threads} torch thread(s)). Median CPU time of "
        f"{args.steps} training steps (batch of {BATCH}, 128 px, after {args.warmup} warm-up steps) times the run's "
        f"iterations ({TRAIN_IMAGES} train images per epoch), plus {math.ceil(VAL_IMAGES / BATCH)} batches of "
        "`predict` for the evaluation. Freshly initialised weights. CPU time of the measuring process: a run that "
        "shares its core takes longer on the clock.",
        "",
        "| run | CPU s / step | predict CPU s / batch | epochs | iterations | estimated CPU hours |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['step']:.2f} | {r['predict']:.2f} | {r['epochs']} | {r['iters']} | "
              f"{r['hours']:.2f} |" for r in rows]
    lines += ["", f"In all: {sum(r['hours'] for r in rows):.1f} CPU hours (one seed of each stage-2 run)."]
    print("\n".join(lines))
    if args.doc is not None:
        replace_section(args.doc, "\n".join(lines) + "\n", title="# Results")


if __name__ == "__main__":
    main()
