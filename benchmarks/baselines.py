"""Train the digits-det teachers (R50, ConvNeXt-T, Swin-T) and students (R18) of every family, then write
docs/results.md.

    python benchmarks/baselines.py [--runs runs/baselines] [--jobs 2] [--threads N] [--only NAME ...]
    python benchmarks/baselines.py --table-only     # rebuild the docs table from the committed JSONs

Each config ``configs/digits/*_{teacher,student}.yaml`` is trained with ``unikd train`` into ``RUNS/NAME``:
on the default digits-det build, or for a family that predicts masks (Mask R-CNN) on its masks build
(``--mask-data``; same images and boxes), both built first if missing. Resumable: a run with ``eval.json`` is
done; a run with ``last.pt`` continues with ``--resume``. ``--jobs`` runs go side by side, each with ``--threads``
(default ``cores / jobs``) torch threads. Each finished run's summary goes to
``benchmarks/results/baselines/NAME.json`` (small, committed), and the table is built from those files only: COCO
metrics on val (segm AP where the detector predicts masks), the training time from the trainer's own clock, and
each family's R50 teacher - R18 student gap.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from doc_sections import replace_section
from runner import UNIKD, run_job

from unikd.config import load_config
from unikd.detectors import FAMILIES as REGISTERED

ROOT = Path(__file__).resolve().parents[1]
# The slowest family first, so that side-by-side jobs finish close together.
FAMILIES = ("deformable_detr", "mask_rcnn", "faster_rcnn", "reppoints", "atss", "fcos", "retinanet")
DIGITS = ROOT / "configs" / "digits"
RESULTS = ROOT / "benchmarks" / "results" / "baselines"


def _order(path: Path) -> tuple:
    """Teachers first, then by family (slowest first), then by name."""
    return not path.stem.endswith("teacher"), FAMILIES.index(load_config(path).model.family), path.stem


CONFIGS = sorted([*DIGITS.glob("*_teacher.yaml"), *DIGITS.glob("*_student.yaml")], key=_order)


def needs_masks(config: Path) -> bool:
    return getattr(REGISTERED[load_config(config).model.family], "predicts_masks", False)


def train(config: Path, runs: Path, threads: int, data: Path) -> None:
    run_job(["train", str(config), "--data", str(data)], runs / config.stem, "eval.json", threads)


def record(runs: Path, config: Path, results: Path) -> None:
    """Write ``RESULTS/NAME.json``: the finished run's val metrics, training minutes and config summary."""
    out = runs / config.stem
    cfg = load_config(config)
    metrics = json.loads((out / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = max(r.get("train_seconds", 0.0) for r in records)
    entry = {"name": config.stem, "family": cfg.model.family, "backbone": cfg.model.backbone,
             "fpn": cfg.model.fpn_channels, "epochs": cfg.train.epochs,
             "role": "teacher" if config.stem.endswith("teacher") else "student", "minutes": seconds / 60,
             **metrics}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{config.stem}.json").write_text(json.dumps(entry, indent=2) + "\n")


def write_results(results: Path, command: str, doc: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    rank = {c.stem: i for i, c in enumerate(CONFIGS)}
    rows.sort(key=lambda r: rank.get(r["name"], len(rank)))
    lines = [
        "## Baseline detectors on digits-det",
        "",
        f"Command: `{command}` (table written {datetime.date.today()}, {os.cpu_count()} CPU cores, runs side by side "
        "as `--jobs` says; every figure is read from `benchmarks/results/baselines/*.json`, one file per finished "
        "run; minutes are the trainer's own clock of its training iterations).",
        "Dataset: the default `unikd data build digits-det` (2000 train / 500 val images, 128 px, seed 0); Mask "
        "R-CNN on the same build with masks (`--masks`). segm AP: mask AP, where the detector predicts masks.",
        "",
        "| config | family | role | backbone | FPN ch | epochs | AP | AP50 | AP75 | APs | APm | APl | segm AP | "
        "train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        segm = f"{100 * r['segm_AP']:.1f}" if "segm_AP" in r else "–"
        lines.append(f"| {r['name']} | {r['family']} | {r['role']} | {r['backbone']} | {r['fpn']} | {r['epochs']} | "
                     + " | ".join(f"{100 * r[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
                     + f" | {segm} | {r['minutes']:.1f} |")
    lines += ["", "R50 teacher minus R18 student AP (the gap distillation has to close; the target is at least 5):", ""]
    by_name = {r["name"]: r for r in rows}
    for fam in FAMILIES:
        t, s = by_name.get(f"{fam}_r50_teacher"), by_name.get(f"{fam}_r18_student")
        if t and s:
            gap = 100 * (t["AP"] - s["AP"])
            lines.append(f"- {fam}: {gap:+.1f} AP ({'meets' if gap >= 5 else 'MISSES'} the 5-point target)")
    replace_section(doc, "\n".join(lines) + "\n", title="# Results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--mask-data", type=Path, default=ROOT / "cache" / "digits-det-masks",
                        help="the digits-det build with masks, for the families that predict masks")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per job (default: cores / jobs); set it when other work shares the cores")
    parser.add_argument("--only", nargs="*", choices=[c.stem for c in CONFIGS], metavar="NAME",
                        help="config names (file stems) to train, in the default order")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the per-run JSONs")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the JSONs")
    args = parser.parse_args()
    if not args.table_only:
        configs = [c for c in CONFIGS if not args.only or c.stem in args.only]
        data = {c: args.mask_data if needs_masks(c) else args.data for c in configs}
        for root in sorted(set(data.values())):
            masks = ["--masks"] if root == args.mask_data else []
            subprocess.run([UNIKD, "data", "build", "digits-det", *masks, "--out", str(root)], check=True)
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        tic = time.time()

        def job(config: Path) -> None:
            train(config, args.runs, threads, data[config])
            record(args.runs, config, args.results)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(job, configs))
        print(f"trained in {(time.time() - tic) / 60:.1f} min")
    # the table is read from the JSONs only, whatever this call trained: its command is the one that rebuilds it
    results = [] if args.results == RESULTS else ["--results", str(args.results)]
    write_results(args.results, " ".join(["python benchmarks/baselines.py --table-only", *results]), args.doc)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
