"""A knowledge store's manifest (``STORE/manifest.json``): what the store holds and what it was made from.

It records what kind of knowledge the records hold (``"knowledge"``: ``unikd``, or FitNet's teacher features,
``fitnet-full`` / ``fitnet-foreground``, :mod:`unikd.knowledge.features`), the teacher's fingerprint, the
training data (image ids, categories, resize rule) and the augmentation variants dumped for every image, the
number of ``B̂`` draws, the dtype, and the name, dtype and shape of every field of a record, with the entries of
its kind: the AKEs' identity (the checksum of their tensors and their config) for UniKD, the teacher's per-level
scale for FitNet. It is written
once, when a dump starts; the shards' own indexes (:mod:`unikd.knowledge.shards`) record each record's
augmentation and each shard's SHA-256.

A UniKD record is the teacher's side of stage 2 for one image under one augmentation (``docs/offline.md``):

====================  ===========  ===================
field                 dtype        shape
====================  ===========  ===================
``ct/q``              store dtype  ``[N, C]``
``ct/reference``      float32      ``[N, 2]``
``ct/z``              store dtype  ``[N, C]``
``ct/positive``       bool         ``[N]``
``pos/q``             store dtype  ``[K, N, C]``
``pos/reference``     float32      ``[K, N, 4]`` (``B̂``, cxcywh)
``pos/z``             store dtype  ``[K, N, C]``
``pos/gt_index``      int64        ``[K, N]``
====================  ===========  ===================

``K`` draws of ``B̂`` per record; the content AKE does not read ``B̂``, so its fields are stored once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from unikd.errors import CorruptFileError, UserError

FORMAT = "unikd-knowledge-store"
VERSION = 2  # 2: the "knowledge" entry (UniKD or FitNet's features)
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
KINDS = ("ct", "pos")
KNOWLEDGE = {"unikd": "unikd", "fitnet-full": "fitnet", "fitnet-foreground": "fitnet"}  # -> the method it serves


class KnowledgeStoreError(UserError, ValueError):
    """A knowledge store that does not fit the job: another teacher or AKE, another dataset, a missing variant."""


def field_specs(n_queries: int, d_model: int, draws: int, dtype: str) -> dict[str, dict]:
    """``{field: {"dtype": name, "shape": [...]}}`` of one UniKD record (the table above)."""
    n, c, k = n_queries, d_model, draws
    return {
        "ct/q": {"dtype": dtype, "shape": [n, c]},
        "ct/reference": {"dtype": "float32", "shape": [n, 2]},
        "ct/z": {"dtype": dtype, "shape": [n, c]},
        "ct/positive": {"dtype": "bool", "shape": [n]},
        "pos/q": {"dtype": dtype, "shape": [k, n, c]},
        "pos/reference": {"dtype": "float32", "shape": [k, n, 4]},
        "pos/z": {"dtype": dtype, "shape": [k, n, c]},
        "pos/gt_index": {"dtype": "int64", "shape": [k, n]},
    }


def new_manifest(*, knowledge: str, teacher: dict, categories: list[dict], image_ids: list[int],
                 variants: list[tuple[bool, int | None]], eval_resize: dict, seed: int, draws: int, dtype: str,
                 fields: dict[str, dict], **entries) -> dict:
    """The manifest of a new store of ``knowledge`` (a key of :data:`KNOWLEDGE`). ``teacher``: its fingerprint;
    ``variants``: ``(hflip, min_size)`` of every augmentation dumped; ``eval_resize``: the job's evaluation
    resize rule (``max_size``, ``min_sizes``); ``fields``: the field specs of a record (a ``null`` in a shape: a
    size that differs from record to record); ``entries``: those of the kind (``ake``, ``teacher_rms``)."""
    if knowledge not in KNOWLEDGE:
        raise KnowledgeStoreError(f"knowledge '{knowledge}' is not one of {', '.join(KNOWLEDGE)}")
    if dtype not in DTYPES:
        raise KnowledgeStoreError(f"store dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if draws < 1:
        raise KnowledgeStoreError(f"the number of B̂ draws per record must be at least 1, got {draws}")
    return {
        "format": FORMAT, "version": VERSION, "knowledge": knowledge, "teacher": teacher, **entries,
        "categories": categories, "eval_resize": eval_resize,
        "variants": [{"hflip": h, "min_size": m} for h, m in variants], "seed": seed, "draws": draws,
        "dtype": dtype, "fields": fields, "image_ids": image_ids,
    }


def ake_entry(ake_info: dict) -> dict:
    """The manifest's ``ake`` entry of a UniKD store, from what ``load_ake`` returns: the checksum of the AKEs'
    tensors and their config."""
    return {"tensors_sha256": ake_info["tensors_sha256"], "config": ake_info["ake"]}


def variant_key(image_id: int, hflip: bool, min_size: int | None) -> tuple[int, bool, int | None]:
    """The key of a record: the image and its augmentation (flipped or not, the shorter side it was resized to,
    None under a longer-side rule)."""
    return int(image_id), bool(hflip), None if min_size is None else int(min_size)


def describe(key: tuple[int, bool, int | None]) -> str:
    """``image 12 (flipped, shorter side 800)`` for a record key."""
    image_id, hflip, min_size = key
    scale = "" if min_size is None else f", shorter side {min_size}"
    return f"image {image_id} ({'flipped' if hflip else 'not flipped'}{scale})"


def expected_keys(manifest: dict) -> list[tuple[int, bool, int | None]]:
    """Every record a finished dump holds: each image id under each variant, in dump order."""
    return [variant_key(i, v["hflip"], v["min_size"]) for i in manifest["image_ids"] for v in manifest["variants"]]


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``root/manifest.json`` atomically."""
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(root / MANIFEST)


def read_manifest(root: Path) -> dict:
    """The manifest of the store ``root``; a clear error if ``root`` is not a knowledge store."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise FileNotFoundError(f"knowledge store not found: {root}")
    if not path.is_file():
        raise KnowledgeStoreError(f"{root} is not a knowledge store ('unikd dump' writes one): no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KnowledgeStoreError(f"{path} is not the manifest of a knowledge store")
    if manifest.get("version") != VERSION:
        raise KnowledgeStoreError(f"{path}: store format version {manifest.get('version')}, this unikd reads "
                                  f"version {VERSION}; run 'unikd dump' again")
    return manifest


def manifest_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every top-level key whose value differs (long values abbreviated)."""
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]
