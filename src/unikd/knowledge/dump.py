"""``unikd dump``: the teacher (and, for UniKD, the frozen AKEs) over the training set, every record written once.

The work is every training image under every augmentation variant the training can draw (both flips when
``data.hflip > 0``, every shorter side of ``data.min_size``), in dataset order, less the records already
committed; under ``torchrun`` rank ``r`` takes every ``world``-th of what is left and writes its own shards. A
killed dump is restarted with the same command: the uncommitted shard files are removed and the work that is
left is done, so every record ends up in the store exactly once.

A record is UniKD's knowledge (:func:`unikd_records`) or FitNet's teacher features
(:func:`unikd.knowledge.features.feature_records`): the loop is the same. ``B̂`` is drawn per record from a
generator seeded by ``(train.seed, image id, flip, shorter side, draw)``, independent of the batch, the rank and
the restart: the same store comes out of any run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from unikd.categories import dataset_categories
from unikd.data import CocoDetection, ImageResize, collate
from unikd.distill import KnowledgeExtractors
from unikd.distill.unikd import TeacherKnowledge, teacher_knowledge
from unikd.engine import distributed as D
from unikd.engine.progress import progress
from unikd.errors import OutputError
from unikd.pyramid import Pyramid
from unikd.transformer import HungarianMatcher

from .manifest import (KINDS, MANIFEST, KnowledgeStoreError, expected_keys, manifest_differences, new_manifest,
                       read_manifest, variant_key, write_manifest)
from .samples import min_size_of
from .seeded_boxes import seeded_query_boxes
from .shards import SHARDS, ShardWriter, read_indexes, uncommitted


def variants(dataset: CocoDetection) -> list[tuple[bool, int]]:
    """Every augmentation the training can draw: ``(flipped, scale choice)`` pairs."""
    flips = (False, True) if dataset.hflip > 0 else (False,)
    return [(flip, choice) for flip in flips for choice in range(dataset.resize.choices)]


def resize_spec(resize: ImageResize) -> dict:
    """A resize rule as the manifest records it: ``{"max_size": int, "min_sizes": [int, ...]}``."""
    return {"max_size": resize.max_size, "min_sizes": list(resize.min_sizes)}


class VariantSet(Dataset):
    """Items ``(index, flipped, choice)`` of ``dataset``, each under its own augmentation; the target also
    carries ``"min_size"``."""

    def __init__(self, dataset: CocoDetection, items: list[tuple[int, bool, int]]):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple[Tensor, dict]:
        index, flipped, choice = self.items[j]
        image, target = self.dataset.load(index, flipped, choice)
        return image, {**target, "min_size": min_size_of(self.dataset, choice)}


def dump_manifest(knowledge: str, teacher: dict, dataset: CocoDetection, eval_resize: ImageResize, seed: int,
                  draws: int, dtype: str, fields: dict[str, dict], **entries) -> dict:
    """The manifest of a dump of ``knowledge`` over ``dataset`` (every variant it draws) with the teacher of
    fingerprint ``teacher``; ``fields`` and ``entries`` those of the kind
    (:func:`unikd.knowledge.manifest.new_manifest`)."""
    return new_manifest(knowledge=knowledge, teacher=teacher, categories=dataset_categories(dataset),
                        image_ids=dataset.image_ids,
                        variants=[(flip, min_size_of(dataset, choice)) for flip, choice in variants(dataset)],
                        eval_resize=resize_spec(eval_resize), seed=seed, draws=draws, dtype=dtype, fields=fields,
                        **entries)


def store_summary(root: Path) -> dict:
    """``{"records", "expected", "shards", "bytes"}`` of a store, from its manifest and shard indexes."""
    indexes = read_indexes(root)
    return {"records": sum(len(i["records"]) for i in indexes), "expected": len(expected_keys(read_manifest(root))),
            "shards": len(indexes), "bytes": sum(i["bytes"] for i in indexes)}


def prepare_store(root: Path, manifest: dict, overwrite: bool) -> None:
    """Make ``root`` the store of ``manifest``: a new folder; the same store, continued (its uncommitted files
    removed); or, with ``overwrite``, another store replaced. A store of other settings without ``overwrite``, or a
    folder that is not a store, is refused. Every rank checks (so all of them raise alike); rank 0 writes."""
    replace = False
    if (root / MANIFEST).is_file():
        differences = manifest_differences(read_manifest(root), manifest)
        if differences and not overwrite:
            raise KnowledgeStoreError(f"{root} holds a store made with other settings (" + "; ".join(differences)
                                      + "); pass --overwrite to replace it, or choose another --out")
        replace = bool(differences)
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OutputError(f"{root} exists and is not a knowledge store; choose another --out")
    D.barrier()
    if D.is_main():
        if replace:
            shutil.rmtree(root)
        (root / SHARDS).mkdir(parents=True, exist_ok=True)
        for path in uncommitted(root):
            path.unlink()
        write_manifest(root, manifest)
    D.barrier()


def seeded_b_hat(targets: list[dict], image_sizes: list[tuple[int, int]], akes: KnowledgeExtractors, seed: int,
                 draw: int) -> tuple[Tensor, Tensor]:
    """``B̂`` of a batch, each image's from its own seeded generator (:func:`seeded_query_boxes`):
    (boxes [B, N, 4] cxcywh, gt_index [B, N])."""
    cfg = akes.cfg
    per_image = [seeded_query_boxes(t, size, variant_key(t["image_id"], t["flipped"], t["min_size"]), cfg.n_queries,
                                    cfg.alpha, cfg.beta, seed, draw) for t, size in zip(targets, image_sizes)]
    return torch.stack([b for b, _ in per_image]), torch.stack([g for _, g in per_image])


def record_fields(content: TeacherKnowledge, positional: list[TeacherKnowledge], gt_index: list[Tensor], i: int,
                  dtype: torch.dtype) -> dict[str, Tensor]:
    """Image ``i``'s record (:mod:`unikd.knowledge.manifest`): embeddings in ``dtype``, references in float32.
    ``positional`` and ``gt_index`` (each [B, N]) hold the K draws."""
    return {
        "ct/q": content.queries.q[i].to(dtype), "ct/reference": content.queries.reference[i].float(),
        "ct/z": content.z[i].to(dtype), "ct/positive": content.positive[i],
        "pos/q": torch.stack([k.queries.q[i] for k in positional]).to(dtype),
        "pos/reference": torch.stack([k.queries.reference[i] for k in positional]).float(),
        "pos/z": torch.stack([k.z[i] for k in positional]).to(dtype),
        "pos/gt_index": torch.stack([g[i] for g in gt_index]),
    }


@torch.no_grad()
def unikd_records(pyramid: Pyramid, targets: list[dict], akes: KnowledgeExtractors, seed: int, draws: int,
                  dtype: torch.dtype, matcher: HungarianMatcher) -> list[dict[str, Tensor]]:
    """The UniKD records of a batch (:func:`record_fields`), from the teacher pyramid with the frozen ``akes``
    and ``draws`` seeded draws of ``B̂``; targets carry ``"min_size"`` (:class:`VariantSet`)."""
    b_hats = [seeded_b_hat(targets, pyramid.image_sizes, akes, seed, d) for d in range(draws)]
    first = teacher_knowledge(akes, pyramid, targets, KINDS, matcher, b_hats[0])
    positional = [first["pos"], *(teacher_knowledge(akes, pyramid, targets, ("pos",), matcher, b)["pos"]
                                  for b in b_hats[1:])]
    return [record_fields(first["ct"], positional, [g for _, g in b_hats], i, dtype) for i in range(len(targets))]


@torch.no_grad()
def dump_records(teacher, make_records, dataset: CocoDetection, root: Path, manifest: dict, device: torch.device,
                 batch_size: int, workers: int, records_per_shard: int) -> int:
    """Write this rank's share of the records the store still lacks; return how many it wrote.
    ``make_records(pyramid, targets)``: the records of a batch from the teacher's pyramid, one field dict per
    image (:func:`unikd_records`, :func:`unikd.knowledge.features.feature_records`)."""
    done = {variant_key(r["image_id"], r["hflip"], r["min_size"]) for index in read_indexes(root)
            for r in index["records"]}
    items = [(index, flip, choice) for index, image_id in enumerate(dataset.image_ids)
             for flip, choice in variants(dataset)
             if variant_key(image_id, flip, min_size_of(dataset, choice)) not in done]
    items = items[D.rank()::D.world_size()]
    writer = ShardWriter(root, D.rank(), records_per_shard, manifest["fields"])
    teacher.eval()
    loader = DataLoader(VariantSet(dataset, items), batch_size=batch_size, collate_fn=collate, num_workers=workers)
    for images, targets in progress(loader, desc="dump", unit="batch"):
        images = [image.to(device) for image in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        records = make_records(teacher.extract_features(images), targets)
        for image, target, fields in zip(images, targets, records):
            augmentation = {"image_id": target["image_id"], "hflip": target["flipped"],
                            "min_size": target["min_size"], "image_size": list(image.shape[-2:])}
            writer.add(augmentation, fields)
    writer.flush()
    return len(items)
