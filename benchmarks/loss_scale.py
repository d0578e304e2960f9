"""Loss scales at the start of stage 2, per teacher: what the distillation weights are set from.

    python benchmarks/loss_scale.py [--teachers runs/baselines] [--akes runs/distill] [--families F ...]
        [--students FAMILY ...]

On the first 8 digits-det train images, with each untrained R18 student of
``configs/digits/distill_STUDENT_r18.yaml`` (RetinaNet by default): the student's detection loss, each teacher's
fixed per-level RMS (what FitNet and the AKEs divide the teacher by, measured on 256 training images), the FitNet
loss (unweighted) and the two UniKD distances D (unweighted, λ = 1) with the stage-1 AKEs of ``benchmarks/distillation.py``; then
the other feature baselines: FGD's three terms at the paper's weights (α, β, γ, λ, T of ``DistillConfig``), MGD
at α = 1 (its masked ratio the paper's) and PKD at weight 1. Writes a section of docs/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch
from doc_sections import replace_section

from unikd.config import DistillConfig, load_config
from unikd.data import CocoDetection, collate
from unikd.detectors import build_detector
from unikd.distill import build_distiller, load_ake, measure_teacher_rms, teacher_fingerprint
from unikd.jobs import load_detector

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("faster_rcnn", "fcos", "retinanet", "atss", "reppoints", "deformable_detr")
STUDENTS = sorted(p.stem[len("distill_"):-len("_r18")]
                  for p in (ROOT / "configs" / "digits").glob("distill_*_r18.yaml"))
FGD_WEIGHTS = ("fgd_alpha", "fgd_beta", "fgd_gamma", "fgd_lambda", "fgd_temperature")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--akes", type=Path, default=ROOT / "runs" / "distill")
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES[:3]))
    parser.add_argument("--students", nargs="+", choices=STUDENTS, default=["retinanet"])
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paper = {name: getattr(DistillConfig(), name) for name in (*FGD_WEIGHTS, "mgd_lambda")}
    dataset = CocoDetection(args.data, "train", 128)
    images, targets = collate([dataset[i] for i in range(8)])
    into = "" if args.students == ["retinanet"] else f" into the R18 {', '.join(args.students)} students"
    lines = [
        f"## Loss scales at the start of distillation{into}",
        "",
        f"Command: `python benchmarks/loss_scale.py {' '.join(sys.argv[1:])}` (measured {datetime.date.today()}). "
        "Each untrained R18 student of `configs/digits/distill_STUDENT_r18.yaml` (seed 0), the first 8 train images; "
        "the FitNet loss and D unweighted (weight and λ = 1); then, with the config's weights, FitNet's loss and "
        "UniKD's λ (D_ct + D_pos) over the student's detection loss (the paper's rule, Tab. 6e: near 1).",
        "",
        "| student (R18) | teacher (R50) | student detection loss | teacher RMS per level (fixed) | FitNet loss | "
        "D_ct | D_pos | weighted FitNet / detection | weighted UniKD / detection |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = [
        "",
        "The other feature baselines on the same images, with the same students and one-layer φ: FGD's feature "
        "(α, β), attention (γ) and global (λ) terms at the paper's weights, MGD at α = 1 (masked ratio "
        f"{paper['mgd_lambda']}), PKD at weight 1.",
        "",
        "| student (R18) | teacher (R50) | FGD feature / attention / global | MGD | PKD |",
        "|---|---|---|---|---|",
    ]
    teachers = {}
    for fam in args.families:
        teacher, tcfg = load_detector(args.teachers / f"{fam}_r50_teacher" / "last.pt")
        ake_file = args.akes / f"ake_{fam}" / "ake.safetensors"
        akes = load_ake(ake_file, teacher_fingerprint(teacher, tcfg.model))[0] if ake_file.exists() else None
        teachers[fam] = teacher, measure_teacher_rms(teacher, dataset, collate), akes
    with torch.no_grad():
        for name in args.students:
            cfg = load_config(ROOT / "configs" / "digits" / f"distill_{name}_r18.yaml")
            unweighted = dataclasses.replace(cfg.distill, lambda_ct=1.0, lambda_pos=1.0, fitnet_weight=1.0,
                                             mgd_alpha=1.0, pkd_weight=1.0, **paper)
            torch.manual_seed(0)
            student = build_detector(cfg.model, dataset.num_classes).train()
            losses, student_features = student(images, targets)
            detection = sum(losses.values()).item()
            for fam, (teacher, teacher_rms, akes) in teachers.items():
                torch.manual_seed(0)
                teacher_features = teacher.extract_features(images)
                rms = " / ".join(f"{v:.0f}" for v in teacher_rms.tolist())
                fitnet = build_distiller("fitnet", unweighted, student, teacher, teacher_rms).loss(
                    teacher_features, student_features, targets)["loss_fitnet"].item()
                cells = [name, fam, f"{detection:.2f}", rms, f"{fitnet:.2f}"]
                if akes is not None:
                    kd = build_distiller("unikd", unweighted, student, teacher, akes=akes).loss(
                        teacher_features, student_features, targets)
                    d_ct, d_pos = kd["loss_kd_ct"].item(), kd["loss_kd_pos"].item()
                    weighted = cfg.distill.lambda_ct * d_ct + cfg.distill.lambda_pos * d_pos
                    cells += [f"{d_ct:.2f}", f"{d_pos:.2f}"]
                else:
                    cells += ["no AKE", "no AKE"]
                cells += [f"{cfg.distill.fitnet_weight * fitnet / detection:.2f}",
                          f"{weighted / detection:.2f}" if akes is not None else "–"]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
                feature = {method: build_distiller(method, unweighted, student, teacher, teacher_rms).loss(
                    teacher_features, student_features, targets) for method in ("fgd", "mgd", "pkd")}
                fgd = " / ".join(f"{v.item():.2f}" for v in feature["fgd"].values())
                baselines.append(f"| {name} | {fam} | {fgd} | {feature['mgd']['loss_mgd'].item():.0f} | "
                                 f"{feature['pkd']['loss_pkd'].item():.2f} |")
                print(baselines[-1], flush=True)
    replace_section(args.doc, "\n".join(lines + baselines) + "\n", title="# Results")


if __name__ == "__main__":
    main()
