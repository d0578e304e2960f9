"""The stage-1 result on disk: AKE weights (safetensors) with the fingerprint of the teacher they read.

Stage 2 refuses AKEs trained on another teacher: their queries and knowledge embeddings would be
meaningless for it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from unikd import config as C
from unikd.errors import UserError
from unikd.detectors import DetectorAdapter

from .ake import KnowledgeExtractors


class AKEMismatchError(UserError, ValueError):
    """The AKE file was trained for a different teacher (or is not an AKE file)."""


def teacher_fingerprint(teacher: DetectorAdapter, model_cfg: C.DetectorConfig) -> dict:
    """Architecture, level strides and channels, and a SHA-256 of every tensor of the teacher's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"family": model_cfg.family, "backbone": model_cfg.backbone,
            "strides": list(teacher.feature_strides), "channels": list(teacher.feature_channels),
            "weights_sha256": digest.hexdigest()}


def save_ake(path: str | Path, akes: KnowledgeExtractors, teacher: dict, num_classes: int,
             category_ids: list[int]) -> Path:
    """Write ``akes`` and what they were trained on to ``path`` (a .safetensors file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"ake": C.to_dict(akes.cfg), "teacher": teacher, "num_classes": num_classes, "category_ids": category_ids}
    state = {k: v.detach().cpu().contiguous() for k, v in akes.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata={"unikd": json.dumps(info)})
    tmp.replace(path)
    return path


def load_ake(path: str | Path, teacher: dict) -> tuple[KnowledgeExtractors, dict]:
    """The AKEs in ``path``, checked against the ``teacher`` fingerprint. Returns ``(akes, info)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AKE file not found: {path}")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "unikd" not in meta:
        raise AKEMismatchError(f"{path} is not an AKE file written by 'unikd pretrain-ake'")
    info = json.loads(meta["unikd"])
    trained = info["teacher"]
    differences = [f"{key}: AKE trained for {trained.get(key)!r}, teacher has {value!r}"
                   for key, value in teacher.items() if trained.get(key) != value]
    if differences:
        raise AKEMismatchError(f"{path} was trained for another teacher (" + "; ".join(differences) + "); "
                               "run 'unikd pretrain-ake' with this teacher first")
    akes = KnowledgeExtractors(C.from_dict(info["ake"], C.AKEConfig), len(trained["strides"]),
                               trained["channels"][0], info["num_classes"])
    akes.load_state_dict(load_file(path))
    return akes, info
