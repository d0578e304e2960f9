"""Train the digits-det teachers (R50) and students (R18) of every family, then write docs/results.md.

    python benchmarks/baselines.py [--runs runs/baselines] [--jobs 2] [--only NAME ...]

Each config ``configs/digits/*_{teacher,student}.yaml`` is trained with ``unikd train`` into
``RUNS/NAME``. Resumable: a run with ``eval.json`` is done; a run with ``last.pt`` continues with
``--resume``. ``--jobs`` runs go side by side, each with ``cores / jobs`` torch threads. The table gives
COCO metrics on val, the training time from the trainer's own clock, and the teacher - student gap.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from doc_sections import replace_section
from runner import UNIKD, run_job

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("deformable_detr", "faster_rcnn", "reppoints", "atss", "fcos", "retinanet")
# Teachers first and the slowest family first, so that side-by-side jobs finish close together.
DIGITS = ROOT / "configs" / "digits"
CONFIGS = sorted([*DIGITS.glob("*_teacher.yaml"), *DIGITS.glob("*_student.yaml")],
                 key=lambda p: (not p.stem.endswith("teacher"), FAMILIES.index(p.stem.rsplit("_r", 1)[0])))


def train(config: Path, runs: Path, threads: int, data: Path) -> None:
    run_job(["train", str(config), "--data", str(data)], runs / config.stem, "eval.json", threads)


def summary(runs: Path, config: Path) -> dict | None:
    out = runs / config.stem
    if not (out / "eval.json").exists():
        return None
    cfg = yaml.safe_load(config.read_text())
    metrics = json.loads((out / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = max(r.get("train_seconds", 0.0) for r in records)
    return {"name": config.stem, "family": cfg["model"]["family"], "backbone": cfg["model"]["backbone"],
            "fpn": cfg["model"]["fpn_channels"], "epochs": cfg["train"]["epochs"],
            "role": "teacher" if config.stem.endswith("teacher") else "student",
            "minutes": seconds / 60, **metrics}


def write_results(rows: list[dict], command: str, doc: Path) -> None:
    lines = [
        "## Baseline detectors on digits-det",
        "",
        f"Command: `{command}` (measured {datetime.date.today()}, {os.cpu_count()} CPU cores, "
        "runs side by side as `--jobs` says; minutes are the trainer's own clock of its training iterations).",
        "Dataset: the default `unikd data build digits-det` (2000 train / 500 val images, 128 px, seed 0).",
        "",
        "| config | family | role | backbone | FPN ch | epochs | AP | AP50 | AP75 | APs | APm | APl | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['family']} | {r['role']} | {r['backbone']} | {r['fpn']} | {r['epochs']} | "
                     + " | ".join(f"{100 * r[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
                     + f" | {r['minutes']:.1f} |")
    lines += ["", "Teacher minus student AP (the gap distillation has to close; the target is at least 5):", ""]
    for fam in FAMILIES:
        t = next((r for r in rows if r["family"] == fam and r["role"] == "teacher"), None)
        s = next((r for r in rows if r["family"] == fam and r["role"] == "student"), None)
        if t and s:
            gap = 100 * (t["AP"] - s["AP"])
            lines.append(f"- {fam}: {gap:+.1f} AP ({'meets' if gap >= 5 else 'MISSES'} the 5-point target)")
    replace_section(doc, "\n".join(lines) + "\n", title="# Results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="config names (file stems) to train")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    subprocess.run([UNIKD, "data", "build", "digits-det", "--out", str(args.data)], check=True)
    configs = [c for c in CONFIGS if not args.only or c.stem in args.only]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    tic = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: train(c, args.runs, threads, args.data), configs))
    print(f"trained in {(time.time() - tic) / 60:.1f} min")
    rows = [r for r in (summary(args.runs, c) for c in CONFIGS) if r]
    write_results(rows, "python benchmarks/baselines.py " + " ".join(sys.argv[1:]), args.doc)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
