"""Explore the demo's scale: run the demo's stages (``unikd.demo.plan``) with other epoch counts and report the
val AP of the teacher, the content AKE and the three students for each, to find a scale at which distillation
shows within the demo's budget.

    python benchmarks/demo_explore.py --data cache/digits-det-demo --out runs/demo_explore --scales 5,2,2 10,3,3 \
        [--json results.json]

A scale is ``TEACHER_EPOCHS,AKE_EPOCHS,STUDENT_EPOCHS`` over the demo's data (``unikd.demo.DEMO``: its image size,
its train and val counts); each gets its own folder under ``--out`` and is resumable as the demo is. The AP
depends on the device (AMP on a GPU, fp32 on a CPU) and thread count, so a scale found on a GPU is to be run as
``make demo`` on the CPU before it is adopted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from unikd.demo import DEMO, Journal, plan, run_stage


def explore(spec: str, data: Path, out: Path, seed: int) -> dict:
    teacher, ake, student = (int(v) for v in spec.split(","))
    scale = dataclasses.replace(DEMO, teacher_epochs=teacher, ake_epochs=ake, student_epochs=student)
    folder = out / f"t{teacher}_a{ake}_s{student}_seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    journal = Journal.open(folder / "demo.json", scale, seed)
    times = {}
    for stage in plan(folder, data, scale, seed):
        tic = time.perf_counter()
        run_stage(stage, journal)
        times[stage.name] = round(time.perf_counter() - tic, 1)
    ap = {}
    for name in ("teacher", "student_none", "student_fitnet", "student_unikd"):
        ap[name] = round(100 * json.loads((folder / name / "eval.json").read_text())["AP"], 1)
    ap["ake"] = round(100 * json.loads((folder / "ake" / "report.json").read_text())["ake_val"]["AP"], 1)
    return {"scale": dataclasses.asdict(scale), "seed": seed, "AP": ap, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the demo's digits-det build (built if missing)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scales", nargs="+", required=True, help="TEACHER,AKE,STUDENT epochs, e.g. 5,2,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here after each scale")
    args = parser.parse_args()
    results = []
    for spec in args.scales:
        results.append(explore(spec, args.data, args.out, args.seed))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
