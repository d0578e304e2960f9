"""Gradient scales at the start of distillation: how hard FitNet and UniKD pull on the student's features, against
its detection losses (issue 13's analysis).

    python benchmarks/grad_scale.py --teachers DIR --akes DIR --data DIR [--families F ...] [--students S ...]
        [--batches 4]

For each teacher and untrained R18 student of ``configs/digits/distill_STUDENT_r18.yaml`` (seed 0, the matrix's
weights), over the first ``--batches`` batches of 8 train images of ``--data``: the gradient of the student's
detection loss and of each method's weighted distillation loss with respect to the student's parameters that the
distillation reaches (backbone and FPN), summed over the batches; then the norm of the distillation's over the
detection's, and the cosine between the two; beside them the ratio of the losses themselves. A loss ratio says
how large a loss is; the gradient ratio says how hard it pulls on the features, the cosine whether with detection
or across it. FitNet's teacher scale is measured
on ``--data`` as the matrix measures it; UniKD's is the one stored with its AKEs (``--akes``/ake_TEACHER).
Writes a section of docs/results.md.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from doc_sections import replace_section
from torch import Tensor, nn

from unikd.config import load_config
from unikd.data import CocoDetection, collate
from unikd.detectors import build_detector
from unikd.distill import build_distiller, load_ake, measure_teacher_rms, teacher_fingerprint
from unikd.jobs import load_detector

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("faster_rcnn", "fcos", "retinanet", "atss", "reppoints", "deformable_detr")
STUDENTS = ("retinanet", "atss", "faster_rcnn", "fcos", "reppoints", "deformable_detr")
METHODS = ("fitnet", "unikd")
BATCH = 8


def gradient(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor | None]:
    """``loss``'s gradient for each of ``params``: None where it does not reach. Keeps the graph for the next."""
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def compare(detection: list[Tensor | None], distillation: list[Tensor | None]) -> tuple[float, float]:
    """``(‖g_kd‖ / ‖g_det‖, cos(g_kd, g_det))`` over the parameters the distillation gradient reaches
    (where ``distillation`` is not None; a parameter the detection loss does not reach counts as a zero there)."""
    pairs = [(d if d is not None else torch.zeros_like(k), k) for d, k in zip(detection, distillation) if k is not None]
    if not pairs:
        raise ValueError("the distillation loss reaches none of the parameters")
    det = torch.cat([d.flatten() for d, _ in pairs]).double()
    kd = torch.cat([k.flatten() for _, k in pairs]).double()
    return (kd.norm() / det.norm()).item(), (kd @ det / (kd.norm() * det.norm())).item()


def add(total: list[Tensor | None] | None, grads: list[Tensor | None]) -> list[Tensor | None]:
    """``total + grads`` per parameter, None + None staying None."""
    if total is None:
        return grads
    return [t if g is None else g if t is None else t + g for t, g in zip(total, grads)]


def measure(cfg, dataset, teacher, teacher_rms: Tensor, akes, batches: int) -> dict[str, tuple[float, float, float]]:
    """``{method: (loss ratio, gradient ratio, cosine)}`` for one teacher and the student of ``cfg``, over
    ``batches`` batches; the loss ratio is the weighted distillation loss over the detection loss, both summed."""
    torch.manual_seed(0)
    student = build_detector(cfg.model, dataset.num_classes).train()
    distillers = {}
    for method in METHODS:
        torch.manual_seed(0)
        distillers[method] = build_distiller(method, cfg.distill, student, teacher,
                                             None if method == "unikd" else teacher_rms, akes=akes)
    params = [p for p in student.parameters() if p.requires_grad]
    det_total, kd_total = None, {m: None for m in METHODS}
    det_loss, kd_loss = 0.0, {m: 0.0 for m in METHODS}
    for b in range(batches):
        images, targets = collate([dataset[i] for i in range(b * BATCH, (b + 1) * BATCH)])
        with torch.no_grad():
            teacher_features = teacher.extract_features(images)
        torch.manual_seed(b)
        losses, student_features = student(images, targets)
        det = sum(losses.values())
        det_loss += det.item()
        det_total = add(det_total, gradient(det, params))
        for method, distiller in distillers.items():
            torch.manual_seed(b)
            kd = sum(distiller.loss(teacher_features, student_features, targets).values())
            kd_loss[method] += kd.item()
            kd_total[method] = add(kd_total[method], gradient(kd, params))
    return {method: (kd_loss[method] / det_loss, *compare(det_total, kd_total[method])) for method in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=Path, required=True, help="folder of the FAMILY_r50_teacher runs")
    parser.add_argument("--akes", type=Path, required=True, help="folder of the matrix's ake_FAMILY runs")
    parser.add_argument("--data", type=Path, required=True, help="the matrix's dataset (digits-det-1k)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=["retinanet", "atss"])
    parser.add_argument("--students", nargs="+", choices=STUDENTS, default=list(STUDENTS))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = CocoDetection(args.data, "train", 128)
    lines = [
        "## Gradient scales at the start of distillation",
        "",
        f"Command: `python benchmarks/grad_scale.py {' '.join(sys.argv[1:])}` (measured {datetime.date.today()}). "
        f"Each untrained R18 student of `configs/digits/distill_STUDENT_r18.yaml` (seed 0) with its config's weights, "
        f"the first {args.batches} batches of {BATCH} train images: the gradient of the method's weighted "
        "distillation loss with respect to the student parameters it reaches (backbone and FPN), its norm over the "
        "detection loss's gradient on the same parameters, and the cosine between the two (summed over the batches); "
        "beside them the weighted distillation loss over the detection loss on the same batches.",
        "",
        "| student (R18) | teacher (R50) | FitNet KD/det loss | FitNet ‖g_kd‖ / ‖g_det‖ | FitNet cos | "
        "UniKD KD/det loss | UniKD ‖g_kd‖ / ‖g_det‖ | UniKD cos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam in args.families:
        teacher, tcfg = load_detector(args.teachers / f"{fam}_r50_teacher" / "last.pt")
        teacher.eval()
        akes = load_ake(args.akes / f"ake_{fam}" / "ake.safetensors", teacher_fingerprint(teacher, tcfg.model))[0]
        rms = measure_teacher_rms(teacher, dataset, collate)
        for name in args.students:
            cfg = load_config(ROOT / "configs" / "digits" / f"distill_{name}_r18.yaml")
            scales = measure(cfg, dataset, teacher, rms, akes, args.batches)
            cells = [name, fam] + [f"{v:.2f}" for m in METHODS for v in scales[m]]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    replace_section(args.doc, "\n".join(lines) + "\n", title="# Results")


if __name__ == "__main__":
    main()
