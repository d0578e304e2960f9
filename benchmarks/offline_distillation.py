"""Offline against online UniKD on digits-det (issue 12, item 6, the quality half): the R18 RetinaNet student
distilled from the R50 RetinaNet teacher in memory and from its knowledge store, per seed, in one benchmark run
(same teacher, AKEs, config, seeds and code).

    python benchmarks/offline_distillation.py [--seeds 0 1] [--runs runs/offline] [--teachers runs/baselines]
        [--data cache/digits-det] [--jobs 1] [--threads N]
    python benchmarks/offline_distillation.py --table-only    # rebuild the docs table from the committed JSONs

Needs the finished teacher (``TEACHERS/retinanet_r50_teacher/last.pt``) of ``benchmarks/baselines.py``. Jobs,
each resumable (run the same command again after a kill):

- stage 1: ``unikd pretrain-ake configs/digits/ake.yaml --teacher T`` → ``RUNS/ake_retinanet`` (its own AKEs, which
  the online and the offline runs share; an AKE file written before the tensors' checksum stops the script);
- the dump: ``unikd dump configs/digits/distill_retinanet_r18.yaml --teacher T --ake A --draws E`` →
  ``RUNS/store_retinanet`` (float16, both flips, one draw of ``B̂`` per epoch of the student's E epochs, so that
  each epoch sees a fresh ``B̂`` as online); a killed dump is continued by the same command;
- stage 2 per seed, online: ``unikd distill ... --teacher T --ake A --method unikd --seed S``
  → ``RUNS/retinanet_unikd_online_sS``; offline: ``unikd distill ... --knowledge-store RUNS/store_retinanet --ake A
  --method unikd --seed S`` → ``RUNS/retinanet_unikd_offline_sS``.

Each finished run's metrics go to ``benchmarks/results/offline/NAME.json`` (small, committed); the table in
docs/results.md is built from those files only.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distillation import AKE_CONFIG, load_results, mean_std, record, student_config, teacher_checkpoint
from doc_sections import replace_section
from runner import UNIKD, check_ake_file, run_job

from unikd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "offline"
FAMILY = "retinanet"
STUDENT_CONFIG = student_config(FAMILY)  # configs/digits/distill_retinanet_r18.yaml


def dump(args, threads: int) -> Path:
    """The teacher's knowledge store (``unikd dump``, continued where a killed one stopped)."""
    store = args.runs / f"store_{FAMILY}"
    epochs = load_config(STUDENT_CONFIG).train.epochs
    cmd = [UNIKD, "dump", str(STUDENT_CONFIG), "--teacher", str(teacher_checkpoint(args.teachers, FAMILY)),
           "--ake", str(args.runs / f"ake_{FAMILY}" / "ake.safetensors"), "--out", str(store), "--draws", str(epochs),
           "--data", str(args.data), "--set", f"train.threads={threads}"]
    args.runs.mkdir(parents=True, exist_ok=True)
    with open(args.runs / f"store_{FAMILY}.log", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return store


def schedule(args, threads: int) -> None:
    check_ake_file(args.runs / f"ake_{FAMILY}" / "ake.safetensors")
    run_job(["pretrain-ake", str(AKE_CONFIG), "--teacher", str(teacher_checkpoint(args.teachers, FAMILY)), "--data",
             str(args.data)], args.runs / f"ake_{FAMILY}", "report.json", threads * args.jobs)
    store = dump(args, threads * args.jobs)
    ake = str(args.runs / f"ake_{FAMILY}" / "ake.safetensors")

    def stage2(seed: int, mode: str) -> None:
        name = f"{FAMILY}_unikd_{mode}_s{seed}"
        source = (["--knowledge-store", str(store)] if mode == "offline" else
                  ["--teacher", str(teacher_checkpoint(args.teachers, FAMILY))])
        cmd = ["distill", str(STUDENT_CONFIG), *source, "--ake", ake, "--method", "unikd", "--seed", str(seed),
               "--data", str(args.data)]
        run_job(cmd, args.runs / name, "eval.json", threads)
        record(args.results, args.runs / name, name, {"teacher": FAMILY, "method": "unikd", "mode": mode,
                                                      "seed": seed})

    with ThreadPoolExecutor(args.jobs) as pool:
        for job in [pool.submit(stage2, seed, mode) for seed in args.seeds for mode in ("offline", "online")]:
            job.result()


def write_results(doc: Path, folder: Path, command: str) -> None:
    results = load_results(folder)
    seeds = sorted({r["seed"] for r in results.values()})
    lines = [
        "## Offline against online UniKD",
        "",
        f"Command: `{command}` (table written {datetime.date.today()}; figures read from "
        "`benchmarks/results/offline/*.json`, one file per finished run). R50 RetinaNet teacher → R18 RetinaNet "
        "student, `configs/digits/distill_retinanet_r18.yaml`, AKEs of `configs/digits/ake.yaml` shared by both; "
        "offline: from a float16 store with one draw of `B̂` per epoch, no teacher loaded. Val AP on digits-det.",
        "",
        "| seed | UniKD online | UniKD offline | offline − online | offline / online training time |",
        "|---|---|---|---|---|",
    ]
    differences = []
    for seed in seeds:
        on, off = results.get(f"{FAMILY}_unikd_online_s{seed}"), results.get(f"{FAMILY}_unikd_offline_s{seed}")
        cells = [str(seed)] + [f"{100 * r['metrics']['AP']:.1f}" if r else "not run" for r in (on, off)]
        if on and off:
            differences.append(100 * (off["metrics"]["AP"] - on["metrics"]["AP"]))
            cells += [f"{differences[-1]:+.1f}", f"{off['train_minutes'] / on['train_minutes']:.2f}"]
        else:
            cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Offline − online over the seeds (mean ± sample std): {mean_std(differences)} AP. The paper "
              "(Tab. 3): 49.1 offline, 49.2 online. Training times are the runs' own clocks on a shared machine (the "
              "step-time ratio measured in one process is in docs/benchmarks.md)."]
    replace_section(doc, "\n".join(lines) + "\n", title="# Results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "offline")
    parser.add_argument("--teachers", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "digits-det")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained side by side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the offline runs' JSONs")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the JSONs")
    args = parser.parse_args()
    if not args.table_only:
        tic = time.time()
        schedule(args, threads=args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
        print(f"done in {(time.time() - tic) / 60:.1f} min")
    write_results(args.doc, args.results, "python benchmarks/offline_distillation.py " + " ".join(sys.argv[1:]))
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
