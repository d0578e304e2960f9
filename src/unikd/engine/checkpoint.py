"""Checkpoints written atomically (temporary file, then rename) and found again for ``--resume``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

LAST = "last.pt"


def save_atomic(state: dict, path: Path) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, out_dir: Path, step: int) -> Path:
    """Save ``state`` as ``out_dir/checkpoints/step_XXXXXXXX.pt`` and point ``out_dir/last.pt`` at it."""
    out_dir = Path(out_dir)
    path = out_dir / "checkpoints" / f"step_{step:08d}.pt"
    save_atomic(state, path)
    link_tmp = out_dir / f".{LAST}.tmp"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(path.relative_to(out_dir))
    os.replace(link_tmp, out_dir / LAST)
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only)."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
