"""Offline stage 2: the training set served with each sample's stored teacher knowledge, and the model that
distills from it with no teacher at all.

The record served is the one made under the sample's own augmentation (flip, shorter side) and at its image
size; anything else is refused (:meth:`unikd.knowledge.store.KnowledgeStore.record`). Of a record's K draws of
``B̂``, epoch ``e`` uses draw ``e mod K``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from unikd.categories import check_categories, dataset_categories
from unikd.data import CocoDetection, ImageResize
from unikd.detectors import DetectorAdapter
from unikd.distill import Distiller, TeacherKnowledge
from unikd.distill.ake import Queries
from unikd.host_copy import to_device
from unikd.pyramid import Pyramid

from .dump import resize_spec, variants
from .features import REGIONS, full_maps
from .manifest import KnowledgeStoreError
from .samples import AugmentedSamples, min_size_of
from .store import KnowledgeStore

KNOWLEDGE = "knowledge"  # the target key that carries a sample's record


def check_store_fits(store: KnowledgeStore, dataset: CocoDetection, eval_resize: ImageResize) -> None:
    """Refuse a store made from other data than a training job's: other categories or image ids, no records of
    an augmentation the job draws, or another evaluation scale (the teacher's must be the job's)."""
    manifest, where = store.manifest, f"knowledge store {store.root}"
    check_categories(where, manifest["categories"], dataset_categories(dataset))
    missing = sorted(set(dataset.image_ids) - set(manifest["image_ids"]))
    if missing:
        raise KnowledgeStoreError(f"{where} was dumped from other images: {len(missing)} training image id(s) are not "
                                  f"in it, first {missing[0]}")
    stored = [(v["hflip"], v["min_size"]) for v in manifest["variants"]]
    drawn = [(flip, min_size_of(dataset, choice)) for flip, choice in variants(dataset)]
    lacking = [d for d in drawn if d not in stored]
    if lacking:
        def name(flip: bool, min_size: int | None) -> str:
            return ("flipped" if flip else "not flipped") + ("" if min_size is None else f" at shorter side {min_size}")

        raise KnowledgeStoreError(f"{where} has no records of images {', '.join(name(*d) for d in lacking)}, which "
                                  f"this training draws (data.hflip, data.min_size); it holds "
                                  f"{', '.join(name(*v) for v in stored)}. Dump with this job's data settings")
    if manifest["eval_resize"] != resize_spec(eval_resize):
        raise KnowledgeStoreError(f"{where} was dumped for a job that evaluates at {manifest['eval_resize']}, this job "
                                  f"at {resize_spec(eval_resize)}: the teacher and the job must evaluate at the same "
                                  "scale")


class StoredKnowledge(AugmentedSamples):
    """``dataset``'s samples, each target with ``target["knowledge"]``: a UniKD record's fields with draw
    ``epoch mod K`` of ``B̂`` (``ct/*`` as stored, ``pos/*`` without the draw dimension); a FitNet record as the
    whole maps of its image (:func:`unikd.knowledge.features.full_maps`: checked and expanded here, on the host,
    so that the training step reads nothing back from the device)."""

    def __init__(self, dataset: CocoDetection, store: KnowledgeStore):
        super().__init__(dataset)
        self.store = store

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target, key = self.sample(index)
        record = self.store.record(*key, image_size=tuple(image.shape[-2:]))
        manifest = self.store.manifest
        if manifest["knowledge"] in REGIONS:
            fields = full_maps(record, target, tuple(image.shape[-2:]), manifest["teacher"]["strides"],
                               manifest["knowledge"])
        else:
            draw = self.epoch % manifest["draws"]
            fields = {k: (v[draw] if k.startswith("pos/") else v) for k, v in record.items()}
        return image, {**target, KNOWLEDGE: fields}


def batch_knowledge(records: list[dict[str, Tensor]], device: torch.device) -> dict[str, TeacherKnowledge]:
    """The B records of a batch as the distiller's :class:`~unikd.distill.TeacherKnowledge` per AKE, on
    ``device``, embeddings in float32: q [B, N, C], reference [B, N, 2 | 4], z [B, N, C], positive [B, N]."""
    def stack(field: str, dtype: torch.dtype | None = None) -> Tensor:
        stacked = torch.stack([r[field] for r in records])
        return to_device(stacked if dtype is None else stacked.to(dtype), device)

    return {
        "ct": TeacherKnowledge(Queries(stack("ct/q", torch.float32), stack("ct/reference")),
                               stack("ct/z", torch.float32), stack("ct/positive")),
        "pos": TeacherKnowledge(Queries(stack("pos/q", torch.float32), stack("pos/reference")),
                                stack("pos/z", torch.float32), stack("pos/gt_index") >= 0),
    }


def unikd_teacher(records: list[dict[str, Tensor]], targets: list[dict],
                  student: Pyramid) -> dict[str, TeacherKnowledge]:
    """What UniKD's loss takes from the teacher, out of a batch's records (:func:`batch_knowledge`)."""
    return batch_knowledge(records, student.levels[0].device)


class OfflineDistillationModel(nn.Module):
    """``forward(images, targets)`` = the student's detection losses + the distiller's losses from the knowledge
    in the targets (:class:`StoredKnowledge`); no teacher. ``predict`` is the student's.

    ``stored_teacher(records, targets, student_pyramid)``: what the distiller's loss takes in place of the
    teacher's features, out of the batch's records (:func:`unikd_teacher`; FitNet's:
    :func:`unikd.knowledge.features.stored_pyramid`)."""

    def __init__(self, student: DetectorAdapter, distiller: Distiller,
                 stored_teacher: Callable[[list[dict[str, Tensor]], list[dict], Pyramid], object]):
        super().__init__()
        self.student, self.distiller, self.stored_teacher = student, distiller, stored_teacher

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        if any(KNOWLEDGE not in t for t in targets):
            raise ValueError("offline distillation needs each target's stored knowledge (a StoredKnowledge dataset)")
        plain = [{k: v for k, v in t.items() if k != KNOWLEDGE} for t in targets]
        losses, student_features = self.student(images, plain)
        teacher = self.stored_teacher([t[KNOWLEDGE] for t in targets], plain, student_features)
        losses.update(self.distiller.loss(teacher, student_features, plain))
        return losses

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.student.predict(images)
