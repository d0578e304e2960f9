"""Explore the demo's scale: run the demo's stages (``unikd.demo.plan``) with other epoch counts and report the
val AP of the teacher, the content AKE and the three students for each, to find a scale at which distillation
shows within the demo's budget.

    python benchmarks/demo_explore.py --data cache/digits-det-demo --out runs/demo_explore --scales 5,2,2 10,3,3 \
        [--size 64] [--batch-size 4] [--set teacher.model.box_batch_size_per_image=32] [--json results.json]

A scale is ``TEACHER_EPOCHS,AKE_EPOCHS,STUDENT_EPOCHS`` over the demo's data (``unikd.demo.DEMO``: its image size,
its train and val counts and digit bounds, unless ``--size``, ``--n-train``, ``--n-val``, ``--batch-size``,
``--min-side`` or ``--max-digits`` say otherwise);
``--set ROLE.KEY=VALUE`` changes one of the demo's settings by role (``schedule``, ``teacher``, ``ake`` or
``student``: the dicts of ``unikd.demo``) for every scale. Each scale gets its own folder under ``--out`` and is
resumable as the demo is. The AP
depends on the device (AMP on a GPU, fp32 on a CPU) and thread count, so a scale found on a GPU is to be run as
``make demo`` on the CPU before it is adopted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import yaml

from unikd import demo
from unikd.demo import DEMO, Journal, plan, run_stage

ROLES = {"schedule": demo.SCHEDULE, "teacher": demo.TEACHER, "ake": demo.AKE, "student": demo.STUDENT}


def override(setting: str) -> None:
    """Apply ``ROLE.KEY=VALUE`` (VALUE read as YAML) to the demo's settings of ROLE."""
    name, value = setting.split("=", 1)
    role, key = name.split(".", 1)
    ROLES[role][key] = yaml.safe_load(value)


def explore(spec: str, data: Path, out: Path, seed: int, base: demo.Scale) -> dict:
    teacher, ake, student = (int(v) for v in spec.split(","))
    scale = dataclasses.replace(base, teacher_epochs=teacher, ake_epochs=ake, student_epochs=student)
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
    settings = {role: dict(values) for role, values in ROLES.items()}
    return {"scale": dataclasses.asdict(scale), "settings": settings, "seed": seed, "AP": ap, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the demo's digits-det build (built if missing)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scales", nargs="+", required=True, help="TEACHER,AKE,STUDENT epochs, e.g. 5,2,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=DEMO.size)
    parser.add_argument("--n-train", type=int, default=DEMO.n_train)
    parser.add_argument("--n-val", type=int, default=DEMO.n_val)
    parser.add_argument("--batch-size", type=int, default=DEMO.batch_size)
    parser.add_argument("--min-side", type=int, default=DEMO.min_side)
    parser.add_argument("--max-digits", type=int, default=DEMO.max_digits)
    parser.add_argument("--set", action="append", default=[], metavar="ROLE.KEY=VALUE")
    parser.add_argument("--json", type=Path, help="write the results here after each scale")
    args = parser.parse_args()
    for setting in args.set:
        override(setting)
    base = dataclasses.replace(DEMO, size=args.size, n_train=args.n_train, n_val=args.n_val,
                               batch_size=args.batch_size, min_side=args.min_side, max_digits=args.max_digits)
    results = []
    for spec in args.scales:
        results.append(explore(spec, args.data, args.out, args.seed, base))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
