"""Shared by the benchmark scripts: run one resumable ``unikd`` job in its own folder, logging to a file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

UNIKD = str(Path(sys.executable).with_name("unikd"))


def run_job(args: list[str], out: Path, done: str, threads: int, prune: bool = False) -> None:
    """``unikd ARGS --out OUT`` with ``threads`` torch threads, unless ``OUT/done`` exists; continues from
    ``OUT/last.pt`` with ``--resume`` when a previous attempt left one (else ``--overwrite``). Output goes to
    ``OUT/train.log``. ``prune``: keep one training checkpoint while it runs, and none once it is done (a
    stage-2 run is done with them: its ``student.pt`` stays), so that hundreds of runs fit on the disk."""
    if (out / done).exists():
        return
    cmd = [UNIKD, *args, "--out", str(out), "--set", f"train.threads={threads}", "--set", "train.log_every=50",
           *(["--set", "train.keep_checkpoints=0"] if prune else [])]
    # An attempt killed before its first checkpoint left only partial results: start afresh over them.
    cmd.append("--resume" if (out / "last.pt").exists() else "--overwrite")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out / "train.log", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    if prune and (out / done).exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "last.pt").unlink(missing_ok=True)


def check_ake_file(path: Path) -> None:
    """Stop now, with what to do, when an earlier stage 1 left an AKE file that unikd refuses (one written before
    AKE files carried their tensors' checksum): :func:`run_job` would skip the finished stage and the runs that
    need the file would fail hours later."""
    if not path.is_file():
        return
    with safe_open(path, "pt") as f:
        info = json.loads((f.metadata() or {}).get("unikd", "{}"))
    if "tensors_sha256" not in info:
        sys.exit(f"{path} carries no checksum of its tensors (written by an older unikd) and would be refused; "
                 f"remove {path.parent} to pretrain the AKEs again, or give another --runs")
