"""The cost of distillation on digits-det: step time and peak memory of the R18 RetinaNet student trained
alone, with FitNet and with UniKD from each family's R50 teacher, and the cost of stage 1.

    python benchmarks/distill_cost.py [--threads 1] [--steps 5] [--rounds 3]

Step times are measured in one process, the variants interleaved round by round on the same batch of 8
digits-det images; each ratio divides the median step time of a variant by that of the plain student step.
Peak memory: on a GPU, ``torch.cuda.max_memory_allocated``; on a CPU, the peak resident set size of a fresh
process that runs only that variant (``--variant``), which includes the Python runtime and
libraries. Stage 1: the AKE pretraining step against the teacher's own training step in the same process,
and the fraction of the teacher's training time that the runs of ``benchmarks/distillation.py`` measured.
Weights are freshly initialised: the cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from doc_sections import replace_section

from unikd.config import load_config
from unikd.data import CocoDetection, build_digits_det, collate
from unikd.detectors import build_detector
from unikd.distill import AbsorbModel, DistillationModel, KnowledgeExtractors, build_distiller

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
FAMILIES = ("retinanet", "fcos", "faster_rcnn")


def batch(data: Path, size: int, n: int = 8):
    dataset = CocoDetection(data, "train", size)
    return collate([dataset[i] for i in range(n)])


def variants() -> list[str]:
    """``student``, then ``stage1:F``, ``teacher:F``, ``fitnet:F``, ``unikd:F`` for each teacher family F."""
    return ["student"] + [f"{kind}:{fam}" for fam in FAMILIES for kind in ("teacher", "stage1", "fitnet", "unikd")]


def build(variant: str, num_classes: int) -> torch.nn.Module:
    """The trainer's model of ``variant``, in train mode."""
    distill_cfg = load_config(DIGITS / "distill_retinanet_r18.yaml")
    kind, _, fam = variant.partition(":")
    student = build_detector(distill_cfg.model, num_classes)
    if kind == "student":
        return DistillationModel(student, None, None).train()
    teacher = build_detector(load_config(DIGITS / f"{fam}_r50_teacher.yaml").model, num_classes)
    if kind == "teacher":
        return teacher.train()
    akes = KnowledgeExtractors(load_config(DIGITS / "ake.yaml").ake, len(teacher.feature_strides),
                               teacher.feature_channels[0], num_classes)
    if kind == "stage1":
        return AbsorbModel(teacher, akes).train()
    distiller = build_distiller(kind, distill_cfg.distill, student, teacher, akes.teacher_rms,
                                akes if kind == "unikd" else None)
    return DistillationModel(student, teacher, distiller).train()


def step_fn(model: torch.nn.Module, images, targets, read=None):
    """One training step (forward, backward, AdamW) of ``model``, as the trainer runs it: on ``images`` and
    ``targets``, or on the batch ``read()`` returns at each step (so that the step includes the loader's work)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = model(*(read() if read else (images, targets)))
        losses = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def peak_memory_mb(variant: str, args, device: torch.device) -> float:
    """Peak memory of ``steps`` steps of ``variant`` alone (GPU: allocated; CPU: a fresh process's RSS)."""
    if device.type == "cuda":
        images, targets = to_device(batch(args.data, 128), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = step_fn(build(variant, 10).to(device), images, targets)
        for _ in range(2):
            step()
        return torch.cuda.max_memory_allocated(device) / 2**20
    cmd = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads), "--data", str(args.data)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def to_device(b, device):
    images, targets = b
    return [im.to(device) for im in images], [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                                              for t in targets]


def peak_rss_mb() -> float:
    """This process's peak resident set size. ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss`` would carry
    the parent's peak over from ``fork``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def run_variant_alone(args) -> None:
    images, targets = batch(args.data, 128)
    step = step_fn(build(args.variant, 10), images, targets)
    for _ in range(2):
        step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def stage1_fractions(runs: Path) -> dict[str, float]:
    out = {}
    for fam in FAMILIES:
        report = runs / f"ake_{fam}" / "report.json"
        if report.exists():
            out[fam] = json.loads(report.read_text())["fraction_of_teacher_training"]
    return out


def write(args, times: dict[str, float], memory: dict[str, float], device: torch.device, command: str) -> None:
    base = times["student"]
    fractions = stage1_fractions(args.runs)
    ake_cfg = load_config(DIGITS / "ake.yaml")
    teacher_epochs = {fam: load_config(DIGITS / f"{fam}_r50_teacher.yaml").train.epochs for fam in FAMILIES}
    where = f"{os.cpu_count()} CPU cores, {args.threads} torch thread(s)" if device.type == "cpu" else str(device)
    lines = [
        "## Cost of distillation",
        "",
        f"Command: `{command}` (measured {datetime.date.today()}, {where}). Student: R18 RetinaNet "
        "(`configs/digits/distill_retinanet_r18.yaml`), batch 8 of 128-px digits-det images; teachers: the R50 "
        "configs; AKEs: `configs/digits/ake.yaml`. Step = forward + backward + AdamW step; median of "
        f"{args.rounds} interleaved rounds of {args.steps} steps. Peak memory: "
        + ("`torch.cuda.max_memory_allocated`." if device.type == "cuda" else
           "peak RSS of a fresh process running only that variant (includes the Python runtime and libraries)."),
        "",
        "| teacher (R50) | student step (s) | FitNet step / student | UniKD step / student | UniKD / FitNet | "
        "peak MB: student / FitNet / UniKD |",
        "|---|---|---|---|---|---|",
    ]
    for fam in FAMILIES:
        fit, uni = times[f"fitnet:{fam}"], times[f"unikd:{fam}"]
        lines.append(f"| {fam} | {base:.3f} | {fit / base:.2f}× | {uni / base:.2f}× | {uni / fit:.2f}× | "
                     f"{memory['student']:.0f} / {memory[f'fitnet:{fam}']:.0f} / {memory[f'unikd:{fam}']:.0f} |")
    lines += [
        "",
        "The paper's reference (Tab. 3): online UniKD costs about 1.03× FitNet.",
        "",
        "Stage 1 against teacher training. Per step, in this process: one AKE pretraining step (frozen teacher "
        "forward + both AKEs) over one training step of the teacher. Per schedule: that ratio times "
        f"{ake_cfg.train.epochs} AKE epochs over the teacher's epochs. Measured: the fraction that "
        "`unikd pretrain-ake` reported from the trainers' clocks of the real runs (`benchmarks/distillation.py`).",
        "",
        "| teacher (R50) | AKE step / teacher step | × epochs (schedule estimate) | measured, real runs |",
        "|---|---|---|---|",
    ]
    for fam in FAMILIES:
        ratio = times[f"stage1:{fam}"] / times[f"teacher:{fam}"]
        measured = f"{fractions[fam]:.0%}" if fam in fractions else "not run"
        lines.append(f"| {fam} | {ratio:.2f} | {ratio * ake_cfg.train.epochs / teacher_epochs[fam]:.0%} | {measured} |")
    lines += ["", "The paper's reference (Tab. 6f): 15 AKE epochs cost 21% of a 12-epoch R50 teacher's training."]
    replace_section(args.doc, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "distill", help="benchmarks/distillation.py runs")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant's peak RSS
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.variant:
        return run_variant_alone(args)
    build_digits_det(args.data)
    device = torch.device(args.device)
    memory = {v: peak_memory_mb(v, args, device) for v in variants()
              if v.split(":")[0] in ("student", "fitnet", "unikd")}
    images, targets = to_device(batch(args.data, 128), device)
    steps = {v: step_fn(build(v, 10).to(device), images, targets) for v in variants()}
    for step in steps.values():
        step()  # warm-up
    samples: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(args.rounds):
        for v, step in steps.items():
            samples[v].append(time_steps(step, args.steps, device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {samples[v][-1]:.3f}s" for v in steps), flush=True)
    times = {v: statistics.median(s) for v, s in samples.items()}
    write(args, times, memory, device, "python benchmarks/distill_cost.py " + " ".join(sys.argv[1:]))
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
