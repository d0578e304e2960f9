"""Throughput and peak memory of the detector adapters (train step and predict), one family x backbone per process.

    python benchmarks/detectors.py                       # all families, resnet18 (FPN 64) and resnet50 (FPN 128)
    python benchmarks/detectors.py --iters 2 --warmup 1 --output /tmp/bench.md   # smoke run

Inputs are random images with a few random boxes (no dataset needed). Each configuration runs in a fresh
subprocess so that its peak memory is its own: peak RSS of the process on CPU (interpreter and torch
included), ``torch.cuda.max_memory_allocated`` on CUDA. The markdown table replaces the ``## Detectors``
section of ``--output`` and leaves its other sections alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from unikd.config import DetectorConfig
from unikd.detectors import build_detector

NUM_CLASSES = 10
SECTION = "## Detectors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["retinanet", "fcos", "faster_rcnn"])
    parser.add_argument(
        "--backbones", nargs="+", default=["resnet18:64", "resnet50:128"], metavar="NAME:FPN_CHANNELS",
        help="backbone name and FPN width, e.g. resnet18:64",
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (digits-det: 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each measurement")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--worker", nargs=3, metavar=("FAMILY", "BACKBONE", "FPN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def random_batch(size: int, batch_size: int, device: torch.device, gen: torch.Generator) -> tuple[list, list]:
    """``batch_size`` images ``[3, size, size]`` in [0, 1], each with 1-4 boxes of side 8..size/2 pixels."""
    images, targets = [], []
    for _ in range(batch_size):
        n = int(torch.randint(1, 5, (), generator=gen))
        wh = torch.rand(n, 2, generator=gen) * (size / 2 - 8) + 8
        xy = torch.rand(n, 2, generator=gen) * (size - wh)
        images.append(torch.rand(3, size, size, generator=gen).to(device))
        targets.append({
            "boxes": torch.cat([xy, xy + wh], dim=1).to(device),
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen).to(device),
        })
    return images, targets


def timed(step, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of ``step()`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def measure(args: argparse.Namespace, family: str, backbone: str, fpn_channels: int) -> dict:
    """Train (forward + backward + SGD step) and predict throughput of one configuration, in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    cfg = DetectorConfig(family=family, backbone=backbone, fpn_channels=fpn_channels)
    detector = build_detector(cfg, NUM_CLASSES, args.size).to(device).train()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images, targets = random_batch(args.size, args.batch_size, device, torch.Generator().manual_seed(0))

    def train_step() -> None:
        losses, _ = detector(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    train_s = timed(train_step, args.warmup, args.iters, device)
    predict_s = timed(lambda: detector.predict(images), args.warmup, args.iters, device)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "family": family,
        "backbone": backbone,
        "fpn_channels": fpn_channels,
        "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
        "train_img_s": args.batch_size / train_s,
        "predict_img_s": args.batch_size / predict_s,
        "peak_mib": peak_mib,
        "threads": torch.get_num_threads(),
        "device": device_name,
    }


def run_in_subprocess(family: str, backbone: str, fpn_channels: int, argv: list[str]) -> dict:
    """``measure`` in a fresh interpreter (so that peak memory is this configuration's alone)."""
    cmd = [sys.executable, __file__, *argv, "--worker", family, backbone, str(fpn_channels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{family} {backbone} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    """The ``## Detectors`` section: how it was measured, then one table row per configuration."""
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/detectors.py", *sys.argv[1:]])
    on_cpu = results[0]["device"].startswith("CPU")
    memory = "peak RSS of the process" if on_cpu else "peak `torch.cuda.max_memory_allocated`"
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}  ",
        f"Machine: {results[0]['device']}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{results[0]['threads']} torch threads  ",
        f"Setup: {args.size}x{args.size} random images with 1-4 random boxes, batch {args.batch_size}, "
        f"{NUM_CLASSES} classes, {args.warmup} warm-up + {args.iters} timed iterations; train = forward + backward "
        f"+ SGD step; predict = eval-mode inference of the randomly initialised model. Memory: {memory}.",
        "",
        "| family | backbone | FPN ch. | params (M) | train img/s | predict img/s | peak memory (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['family']} | {r['backbone']} | {r['fpn_channels']} | {r['params_m']:.1f} | {r['train_img_s']:.1f} "
        f"| {r['predict_img_s']:.1f} | {r['peak_mib']:.0f} |"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def replace_section(path: Path, section: str) -> None:
    """Write ``section`` into ``path`` in place of its ``## Detectors`` section (appended if absent)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else ["# Benchmarks\n"]
    starts = [i for i, line in enumerate(lines) if line.rstrip() == SECTION]
    if starts:
        begin = starts[0]
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = ["\n", *lines[end:]] if end < len(lines) else []
        lines = [*lines[:begin], section, *tail]
    else:
        lines = [*lines, "\n", section]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        family, backbone, fpn = args.worker
        print(json.dumps(measure(args, family, backbone, int(fpn))))
        return
    passthrough = sys.argv[1:] if argv is None else argv
    results = []
    for spec in args.backbones:
        backbone, fpn = spec.split(":")
        for family in args.families:
            result = run_in_subprocess(family, backbone, int(fpn), passthrough)
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
    replace_section(args.output, markdown(results, args))
    print(f"wrote {args.output} ({SECTION})", file=sys.stderr)


if __name__ == "__main__":
    main()
