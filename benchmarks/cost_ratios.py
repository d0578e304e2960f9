"""The two cost ratios of issue 11 in one process, at digits-det size or at COCO size: UniKD step / FitNet
step, and stage 1 against the teacher's training.

    python benchmarks/cost_ratios.py --size digits|coco [--teacher retinanet] [--steps 2] [--rounds 2] [--warmup 1]

digits: the models of ``benchmarks/distill_cost.py`` (the digits-det configs), batch 8 of 128-px images.
coco: those of ``benchmarks/gpu_check.py`` (R50 teacher and R18 RetinaNet student, 256-channel FPNs, AKEs at
N = 200, UniKD's φ with two layers and FitNet's with one), batch 2 of synthetic 800 x 1333 and 1333 x 800
images. Variants: the teacher's training step, its frozen forward alone (as stage 1 runs it), the stage-1
step, the FitNet step and the UniKD step, each forward + backward + AdamW; median over ``--rounds``
interleaved rounds of ``--steps`` steps after ``--warmup`` warm-up steps each, timed in CPU seconds of the
process (``time.process_time``: on a shared machine, the time other jobs take from us does not count).

Stage 1's share of the teacher's training = (stage-1 step / teacher step) x (AKE epochs / teacher epochs),
the epochs of ``configs/digits`` or ``configs/coco``; the frozen forward's own share is the floor that no AKE
can go under while stage 1 runs the teacher online.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import distill_cost
import gpu_check
from distill_cost import step_fn

from unikd.config import load_config
from unikd.data import build_digits_det

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("teacher", "teacher_forward", "stage1", "fitnet", "unikd")


def models_and_batch(size: str, teacher: str, data: Path):
    """``{kind: model in train mode}`` and ``(images, targets)`` for ``size``."""
    if size == "digits":
        build_digits_det(data)
        images, targets = distill_cost.batch(data, 128)
        build = lambda kind: distill_cost.build(f"{kind}:{teacher}", 10)  # noqa: E731
    else:
        images, targets = gpu_check.collate(gpu_check.synthetic_batch(800, 1333))
        build = lambda kind: gpu_check.build(f"{kind}:{teacher}").train()  # noqa: E731
    models = {kind: build(kind) for kind in ("teacher", "stage1", "fitnet", "unikd")}
    return models, (images, targets)


def cpu_seconds_per_step(step, steps: int) -> float:
    tic = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - tic) / steps


def epochs(size: str, teacher: str) -> tuple[int, int]:
    """(AKE epochs, teacher epochs) of the configs of ``size``."""
    folder = ROOT / "configs" / size
    return (load_config(folder / "ake.yaml").train.epochs,
            load_config(folder / f"{teacher}_r50_teacher.yaml").train.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("digits", "coco"), required=True)
    parser.add_argument("--teacher", default="retinanet")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models, (images, targets) = models_and_batch(args.size, args.teacher, args.data)
    steps = {kind: step_fn(model, images, targets) for kind, model in models.items()}
    absorb = models["stage1"]

    def teacher_forward():
        absorb._teacher(images)

    steps = {"teacher": steps["teacher"], "teacher_forward": teacher_forward, **{k: steps[k] for k in KINDS[2:]}}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for kind, step in steps.items():
            samples[kind].append(cpu_seconds_per_step(step, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {samples[k][-1]:.3f}s" for k in steps), flush=True)
    t = {k: statistics.median(s) for k, s in samples.items()}
    ake_epochs, teacher_epochs = epochs(args.size, args.teacher)
    print(f"command: python benchmarks/cost_ratios.py {' '.join(sys.argv[1:])}")
    print(f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, {args.threads} thread(s); size {args.size}, "
          f"teacher R50 {args.teacher}, batch {len(images)}; median of {args.rounds} rounds of {args.steps} steps "
          f"after {args.warmup} warm-up step(s); CPU seconds of the process")
    print("step (CPU s): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    print(f"UniKD / FitNet step: {t['unikd'] / t['fitnet']:.2f}")
    print(f"stage-1 step / teacher step: {t['stage1'] / t['teacher']:.2f}; x {ake_epochs}/{teacher_epochs} epochs: "
          f"{t['stage1'] / t['teacher'] * ake_epochs / teacher_epochs:.0%} of the teacher's training")
    print(f"frozen teacher forward / teacher step: {t['teacher_forward'] / t['teacher']:.2f}; "
          f"x {ake_epochs}/{teacher_epochs} epochs: {t['teacher_forward'] / t['teacher'] * ake_epochs / teacher_epochs:.0%}")


if __name__ == "__main__":
    main()
