"""Checkpoints written atomically (temporary file, then rename) and found again for ``--resume``."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import UserError

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
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only).

    ``path`` is the file or a run folder (its ``last.pt``). A missing file raises ``FileNotFoundError``; a file
    that is not such a checkpoint raises :class:`~unikd.errors.UserError` naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    not_ours = f"{path} is not a checkpoint written by unikd"
    if not _is_torch_archive(path):
        raise UserError(f"{not_ours} (not a torch.save archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses objects our checkpoints never hold
        raise UserError(f"{not_ours} (it holds objects other than tensors and plain Python values)") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{not_ours} (no 'model' weights in it)")
    return state


def _is_torch_archive(path: Path) -> bool:
    """Whether ``path`` is a zip archive as ``torch.save`` writes it (``<name>/data.pkl`` inside)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, IsADirectoryError):
        return False
