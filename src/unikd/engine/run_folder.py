"""An ``--out`` folder belongs to one run: a new run refuses a folder that holds another's results.

A run's artefacts are what the training jobs write (:data:`ARTEFACTS`). Anything else in the folder (the
benchmark runner's ``train.log``, the demo's ``config.yaml``, the user's notes) is not a run and is left
alone. A new run (no ``--resume``) into a folder holding artefacts is refused, naming them, unless it is
given ``--overwrite``, which deletes exactly those artefacts first.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputError
from .checkpoint import LAST

ARTEFACTS = ("checkpoints", LAST, "metrics.jsonl", "eval.json", "student.pt", "ake.safetensors", "report.json",
             "tensorboard")
EVAL_FILES = "eval_*.json"  # written next to a checkpoint by ``unikd eval``


def artefacts(out: Path) -> list[Path]:
    """The run artefacts present in ``out``, in :data:`ARTEFACTS` order."""
    found = [out / name for name in ARTEFACTS if (out / name).exists() or (out / name).is_symlink()]
    return found + sorted(out.glob(EVAL_FILES))


def claim_run_folder(out: str | Path, resume: str | Path | None, overwrite: bool, main: bool = True) -> Path:
    """Check that a job may write to ``out`` and make it: refuse a file, a folder that cannot be written,
    or one holding another run (when not resuming and not ``overwrite``). With ``overwrite``, delete the
    artefacts (only on the ``main`` process). Raises :class:`~unikd.errors.OutputError`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise OutputError(f"cannot write to --out {out}: {err.strerror or err}") from None
    present = artefacts(out)
    if resume is None and present and not overwrite:
        names = ", ".join(p.name for p in present)
        raise OutputError(f"--out {out} holds another run ({names}); continue it with --resume, replace it with "
                          "--overwrite, or give another --out")
    if resume is None and overwrite and main:
        for path in present:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return out


def is_main_process() -> bool:
    """Rank 0 under ``torchrun`` (read from the environment: the process group may not exist yet)."""
    return int(os.environ.get("RANK", "0")) == 0
