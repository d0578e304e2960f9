"""Checkpoints written atomically (temporary file, then rename) and found again for ``--resume``.

Files are created with the user's umask (as ``open`` would), a write that fails for want of space or
permission is an :class:`~unikd.errors.OutputError` naming the file, temporary files left by a killed
write are removed when a run starts (:func:`remove_stale_temporaries`), and only the newest
``keep`` + 1 step checkpoints are kept (:func:`prune_checkpoints`).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import CorruptFileError, OutputError, UserError

LAST = "last.pt"
TEMPORARY = "*.tmp"  # what save_atomic and save_checkpoint name their unfinished files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(state: dict, path: Path) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is either the old file or the whole new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota, a file system gone read-only
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, append: bool = False) -> None:
    """Write (or append) ``text`` to ``path``; a failure (a full disk, no permission) is an OutputError."""
    try:
        with open(path, "a" if append else "w") as f:
            f.write(text)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None


def save_checkpoint(state: dict, out_dir: Path, step: int, keep: int | None = None) -> Path:
    """Save ``state`` as ``out_dir/checkpoints/step_XXXXXXXX.pt``, point ``out_dir/last.pt`` at it, and (unless
    ``keep`` is None) delete all but it and the ``keep`` step checkpoints before it."""
    out_dir = Path(out_dir)
    path = out_dir / "checkpoints" / f"step_{step:08d}.pt"
    save_atomic(state, path)
    link_tmp = out_dir / f".{LAST}.tmp"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(path.relative_to(out_dir))
    os.replace(link_tmp, out_dir / LAST)
    if keep is not None:
        prune_checkpoints(out_dir, path, keep)
    return path


def prune_checkpoints(out_dir: Path, newest: Path, keep: int) -> list[Path]:
    """Delete the step checkpoints of ``out_dir`` but ``newest`` and the ``keep`` before it; return the deleted."""
    older = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*.pt") if p.name < newest.name)
    doomed = older[: max(len(older) - keep, 0)]
    for p in doomed:
        p.unlink()
    return doomed


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the unfinished files a killed write left in ``out_dir`` and its ``checkpoints/``; return them."""
    out_dir = Path(out_dir)
    stale = [p for d in (out_dir, out_dir / "checkpoints") for p in d.glob(TEMPORARY) if p.is_file() or p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only).

    ``path`` is the file or a run folder (its ``last.pt``). A missing file raises ``FileNotFoundError``; a file
    that is not such a checkpoint raises :class:`~unikd.errors.UserError` naming it, and one whose bytes fail
    the archive's CRCs (or cannot be unpacked) a :class:`~unikd.errors.CorruptFileError`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    not_ours = f"{path} is not a checkpoint written by unikd"
    if not _is_torch_archive(path):
        raise UserError(f"{not_ours} (not a torch.save archive)")
    damaged = _damaged_member(path)
    if damaged:
        raise CorruptFileError(f"{path} is damaged: {damaged} does not match the CRC stored in the archive")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses objects our checkpoints never hold
        raise UserError(f"{not_ours} (it holds objects other than tensors and plain Python values)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:  # a damaged archive
        raise CorruptFileError(f"{path} is damaged and cannot be loaded ({_one_line(err)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{not_ours} (no 'model' weights in it)")
    return state


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _damaged_member(path: Path) -> str | None:
    """The first member of the zip archive ``path`` whose bytes fail their CRC-32 (torch.load does not check)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def _is_torch_archive(path: Path) -> bool:
    """Whether ``path`` is a zip archive as ``torch.save`` writes it (``<name>/data.pkl`` inside)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, IsADirectoryError):
        return False
