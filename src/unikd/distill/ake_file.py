"""The stage-1 result on disk: AKE weights (safetensors) with the fingerprint of the teacher they read.

Stage 2 refuses AKEs trained on another teacher: their queries and knowledge embeddings would be
meaningless for it. The file carries a SHA-256 of its tensors, checked on load: a file without it (written
before the checksum existed) or whose tensors do not match it is refused, naming the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from unikd import config as C
from unikd.errors import CorruptFileError, OutputError, UserError
from unikd.detectors import DetectorAdapter

from .ake import KnowledgeExtractors


class AKEMismatchError(UserError, ValueError):
    """The AKE file was trained for a different teacher (or is not an AKE file)."""


def tensors_sha256(state: dict) -> str:
    """SHA-256 (hex) of a state dict: every tensor's name and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def teacher_fingerprint(teacher: DetectorAdapter, model_cfg: C.DetectorConfig) -> dict:
    """Architecture, level strides and channels, and a SHA-256 of every tensor of the teacher's weights."""
    return {"family": model_cfg.family, "backbone": model_cfg.backbone,
            "strides": list(teacher.feature_strides), "channels": list(teacher.feature_channels),
            "weights_sha256": tensors_sha256(teacher.state_dict())}


def save_ake(path: str | Path, akes: KnowledgeExtractors, teacher: dict, num_classes: int,
             category_ids: list[int]) -> Path:
    """Write ``akes`` and what they were trained on to ``path`` (a .safetensors file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in akes.state_dict().items()}
    info = {"ake": C.to_dict(akes.cfg), "teacher": teacher, "num_classes": num_classes, "category_ids": category_ids,
            "tensors_sha256": tensors_sha256(state)}
    tmp = path.with_suffix(".tmp")
    try:
        save_file(state, tmp, metadata={"unikd": json.dumps(info)})
        tmp.replace(path)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err}") from None
    return path


def load_ake(path: str | Path, teacher: dict) -> tuple[KnowledgeExtractors, dict]:
    """The AKEs in ``path``, checked against the ``teacher`` fingerprint. Returns ``(akes, info)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AKE file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({err})") from None
    if "unikd" not in meta:
        raise AKEMismatchError(f"{path} is not an AKE file written by 'unikd pretrain-ake'")
    try:
        info = json.loads(meta["unikd"])
    except json.JSONDecodeError:
        raise CorruptFileError(f"{path}: its 'unikd' metadata is not valid JSON") from None
    if "tensors_sha256" not in info:
        raise CorruptFileError(f"{path} carries no checksum of its tensors (written by an older unikd); "
                               "run 'unikd pretrain-ake' again to remake it")
    try:
        state = load_file(path)
    except SafetensorError as err:
        raise CorruptFileError(f"{path}: its tensors cannot be read ({err})") from None
    if tensors_sha256(state) != info["tensors_sha256"]:
        raise CorruptFileError(f"{path}: its tensors do not match the checksum stored with them (the file was "
                               "changed or damaged after 'unikd pretrain-ake' wrote it)")
    trained = info["teacher"]
    differences = [f"{key}: AKE trained for {trained.get(key)!r}, teacher has {value!r}"
                   for key, value in teacher.items() if trained.get(key) != value]
    if differences:
        raise AKEMismatchError(f"{path} was trained for another teacher (" + "; ".join(differences) + "); "
                               "run 'unikd pretrain-ake' with this teacher first")
    akes = KnowledgeExtractors(C.from_dict(info["ake"], C.AKEConfig), len(trained["strides"]),
                               trained["channels"][0], info["num_classes"])
    akes.load_state_dict(state)
    return akes, info
