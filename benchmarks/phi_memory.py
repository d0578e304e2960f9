"""Peak CPU memory of UniKD's adaptor φ (two deformable self-attention layers) for one 800 x 1333 image,
forward and backward, from the R18 RetinaNet student to each R50 teacher's levels, and the tokens its
self-attention runs over.

    python benchmarks/phi_memory.py [--short 800] [--long 1333] [--threads 1]

Each teacher is measured in a fresh process (``--teacher``): the student's features of one synthetic image
(``gpu_check.synthetic_batch``) are computed without gradients, then the peak resident set size is reset
(``/proc/self/clear_refs``) and φ runs forward and backward in float32; the figure is the peak RSS above the
RSS just before φ's forward. Run with ``PYTHONPATH=<other checkout>/src`` to measure another version of φ:
the output names the source it imported.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from gpu_check import TEACHERS, collate, detector, synthetic_batch

import unikd
from unikd.config import DistillConfig
from unikd.distill import Adaptor


def status_mb(key: str) -> float:
    """``key`` (``VmRSS``, ``VmHWM``) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status: this measures on Linux only")


def measure(teacher_family: str, short: int, long: int) -> dict:
    """φ's peak RSS (MB) above what the process held before its forward, and its self-attention's tokens."""
    torch.manual_seed(0)
    student = detector("retinanet", "resnet18")
    teacher = detector(teacher_family, "resnet50")
    cfg = DistillConfig()
    phi = Adaptor(student.feature_strides, student.feature_channels, teacher.feature_strides,
                  teacher.feature_channels, layers=2, n_heads=cfg.adaptor_heads, n_points=cfg.adaptor_points)
    images, _ = collate(synthetic_batch(short, long)[:1])
    with torch.no_grad():
        features = student.extract_features(images)
    features = features.with_levels([f.detach().requires_grad_() for f in features.levels])
    tokens = []
    phi.layers[0].register_forward_hook(lambda module, args, out: tokens.append(args[0].shape[1]))
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    sum(level.square().mean() for level in phi(features).levels).backward()
    return {"teacher": teacher_family, "phi_peak_mb": status_mb("VmHWM") - before, "tokens": tokens[0],
            "teacher_levels": len(teacher.feature_strides), "phi_levels": phi.layers[0].self_attn.n_levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=800)
    parser.add_argument("--long", type=int, default=1333)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)  # internal: measure one teacher in this process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.teacher:
        print(json.dumps(measure(args.teacher, args.short, args.long)))
        return
    source = Path(unikd.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "src/unikd/distill/adaptor.py"],
                           capture_output=True, text=True).stdout.strip()
    print(f"unikd from {source} at {commit}{' (adaptor.py modified)' if dirty else ''}; torch {torch.__version__}, "
          f"{args.threads} thread(s); one {args.short} x {args.long} image, float32, forward + backward")
    print("| teacher (R50) | teacher levels | φ's levels | tokens in φ's self-attention | φ peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for fam in TEACHERS:
        cmd = [sys.executable, __file__, "--teacher", fam, "--short", str(args.short), "--long", str(args.long),
               "--threads", str(args.threads)]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {fam} | {row['teacher_levels']} | {row['phi_levels']} | {row['tokens']} | "
              f"{row['phi_peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
