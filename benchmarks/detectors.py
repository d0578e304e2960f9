"""Throughput and peak memory of the detector adapters (train step and predict), one config per process.

    python benchmarks/detectors.py                       # every configs/digits/*.yaml (teachers and students)
    python benchmarks/detectors.py --iters 2 --warmup 1 --output /tmp/bench.md   # smoke run

The models are those of the experiment configs, at their ``data.size`` and ``data.batch_size``. Inputs are
random images with a few random boxes (no dataset needed). Each configuration runs in a fresh
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

from doc_sections import replace_section
from unikd.config import load_config
from unikd.detectors import build_detector

NUM_CLASSES = 10
SECTION = "## Detectors"
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", type=Path,
                        default=sorted((ROOT / "configs" / "digits").glob("*.yaml")))
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each measurement")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--worker", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)
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


def measure(args: argparse.Namespace, config: Path) -> dict:
    """Train (forward + backward + SGD step) and predict throughput of one configuration, in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    cfg = load_config(config)
    size, batch_size = cfg.data.size, cfg.data.batch_size
    detector = build_detector(cfg.model, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images, targets = random_batch(size, batch_size, device, torch.Generator().manual_seed(0))

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
        "config": config.stem,
        "family": cfg.model.family,
        "backbone": cfg.model.backbone,
        "fpn_channels": cfg.model.fpn_channels,
        "size": size,
        "batch_size": batch_size,
        "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
        "train_img_s": batch_size / train_s,
        "predict_img_s": batch_size / predict_s,
        "peak_mib": peak_mib,
        "threads": torch.get_num_threads(),
        "device": device_name,
    }


def run_in_subprocess(config: Path, argv: list[str]) -> dict:
    """``measure`` in a fresh interpreter (so that peak memory is this configuration's alone)."""
    cmd = [sys.executable, __file__, *argv, "--worker", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stderr}")
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
        f"Setup: the models of the configs (`configs/digits/`) at their image size and batch size, on random "
        f"images with 1-4 random boxes, {NUM_CLASSES} classes, {args.warmup} warm-up + {args.iters} timed iterations; "
        f"train = forward + backward + SGD step; predict = eval-mode inference of the randomly initialised model. "
        f"Memory: {memory}.",
        "",
        "| config | family | backbone | FPN ch. | size | batch | params (M) | train img/s | predict img/s "
        "| peak memory (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['config']} | {r['family']} | {r['backbone']} | {r['fpn_channels']} | {r['size']} | {r['batch_size']} "
        f"| {r['params_m']:.1f} | {r['train_img_s']:.1f} | {r['predict_img_s']:.1f} | {r['peak_mib']:.0f} |"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args, args.worker)))
        return
    passthrough = sys.argv[1:] if argv is None else argv
    results = []
    for config in args.configs:
        result = run_in_subprocess(config, passthrough)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    replace_section(args.output, markdown(results, args))
    print(f"wrote {args.output} ({SECTION})", file=sys.stderr)


if __name__ == "__main__":
    main()
