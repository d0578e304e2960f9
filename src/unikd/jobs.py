"""The jobs behind the command line: train a detector, pretrain AKEs, distill, evaluate a checkpoint."""
from __future__ import annotations

import json
import logging
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import config as C
from .categories import check_categories, checkpoint_categories, dataset_categories
from .data import CocoDetection, ImageResize, collate
from .detectors import FAMILIES, build_detector
from .engine import distributed as D
from .distill import (AbsorbModel, DistillationModel, KnowledgeExtractors, Levels, build_distiller, load_ake,
                      measure_teacher_rms, method_class, save_ake, teacher_fingerprint)
from .distill.teacher_scale import RMS_IMAGES
from .engine.checkpoint import load_checkpoint, save_atomic
from .engine.run_folder import claim_run_folder, is_main_process
from .detectors.weights import read_state_dict
from .detectors.zoo import zoo_config, zoo_detector
from .engine.trainer import Trainer, TrainState
from .errors import OutputError, UserError
from .evaluation import evaluate_detector
from .knowledge import (KNOWLEDGE, REGIONS, KnowledgeStore, KnowledgeStoreError, OfflineDistillationModel,
                        SeededQueryBoxes, StoredKnowledge, ake_entry, check_store_fits, dump_manifest, dump_records,
                        feature_fields, feature_records, prepare_store, store_summary, stored_pyramid, unikd_records,
                        unikd_teacher)
from .knowledge.manifest import DTYPES, field_specs
from .transformer import HungarianMatcher

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _datasets(cfg: C.ExperimentConfig) -> tuple[CocoDetection, CocoDetection]:
    d = cfg.data
    masks = getattr(FAMILIES.get(cfg.model.family), "predicts_masks", False)  # instance masks in the targets
    train = CocoDetection(d.root, d.train_split, ImageResize.from_config(d, train=True), hflip=d.hflip,
                          seed=cfg.train.seed, masks=masks)
    val = CocoDetection(d.root, d.val_split, ImageResize.from_config(d, train=False))
    if train.category_ids != val.category_ids:
        raise UserError(f"{d.root}: the '{d.train_split}' and '{d.val_split}' splits have different categories")
    return train, val


def _prepare(cfg: C.ExperimentConfig) -> tuple[torch.device, CocoDetection, CocoDetection]:
    """What every training job starts with: the device (and process group), threads, seeds, the two splits."""
    device = D.init_from_env(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    return (device, *_datasets(cfg))


def _fit(cfg: C.ExperimentConfig, model: torch.nn.Module, train_set: CocoDetection, val_set: CocoDetection,
         device: torch.device, out_dir: str | Path, resume: str | Path | None, meta: dict,
         evaluated=lambda model: model, train_data=None) -> tuple[Trainer, dict]:
    """Train ``model`` with the shared trainer (resuming from ``resume``) and evaluate ``evaluated(model)``
    on the val split at the end. ``train_data``: what the trainer iterates, when not ``train_set`` itself (a
    :class:`~unikd.knowledge.StoredKnowledge` around it). Returns the trainer and the final COCO metrics."""

    def evaluate(m):
        return evaluate_detector(evaluated(m), val_set, collate, device, batch_size=cfg.data.batch_size,
                                 workers=cfg.data.workers)

    meta = {"config": C.to_dict(cfg), "num_classes": train_set.num_classes, "category_ids": train_set.category_ids,
            "categories": dataset_categories(train_set), **meta}
    trainer = Trainer(model, train_set if train_data is None else train_data, collate, cfg.train, batch_size=cfg.data.batch_size,
                      workers=cfg.data.workers, out_dir=out_dir, evaluate=evaluate, meta=meta, device=device)
    if resume is not None:
        trainer.resume(resume)
    metrics = trainer.fit()
    log.info("val: %s", json.dumps(metrics))
    return trainer, metrics


def train_detector(cfg: C.ExperimentConfig, out_dir: str | Path, resume: str | Path | None = None,
                   overwrite: bool = False) -> dict:
    """Train the detector that ``cfg.model`` describes on ``cfg.data``; evaluate on the val split at the end.

    Returns the final COCO metrics. Under ``torchrun`` every process runs this; only rank 0 writes.
    ``out_dir`` must not hold another run unless ``resume`` or ``overwrite`` (:mod:`unikd.engine.run_folder`).
    """
    claim_run_folder(out_dir, resume, overwrite, is_main_process())
    device, train_set, val_set = _prepare(cfg)
    detector = build_detector(cfg.model, train_set.num_classes, backbone_weights=resume is None)
    return _fit(cfg, detector, train_set, val_set, device, out_dir, resume, meta={})[1]


def load_detector(checkpoint: str | Path, device="cpu", with_checkpoint: bool = False):
    """Rebuild the detector stored in a training checkpoint. Returns ``(detector, config)``, plus the
    checkpoint's other entries (``meta``, ``train_state``) when ``with_checkpoint``."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    cfg = C.from_dict(ckpt["meta"]["config"])
    detector = build_detector(cfg.model, ckpt["meta"]["num_classes"], backbone_weights=False)
    try:
        detector.load_state_dict(ckpt.pop("model"))
    except RuntimeError:
        hint = (" it is the checkpoint of a 'pretrain-ake' or 'distill' run, whose model holds more than the "
                "detector: use the teacher's checkpoint, or a distill run's student.pt"
                if "teacher" in ckpt["meta"] else f" its weights do not fit a {cfg.model.family} detector")
        raise UserError(f"{checkpoint} is not a detector checkpoint:{hint}") from None
    detector = detector.to(device).eval()
    return (detector, cfg, ckpt) if with_checkpoint else (detector, cfg)


def _load_teacher(checkpoint: str | Path, cfg: C.ExperimentConfig, train_set: CocoDetection, device):
    """The teacher of a distillation job, checked against the job's data. Returns ``(teacher, config, ckpt)``."""
    teacher, tcfg, ckpt = load_detector(checkpoint, device, with_checkpoint=True)
    check_categories(f"teacher {checkpoint}", checkpoint_categories(ckpt["meta"]), dataset_categories(train_set))
    if ImageResize.from_config(cfg.data, train=False) != ImageResize.from_config(tcfg.data, train=False):
        raise UserError(f"teacher {checkpoint} was trained at {resize_keys(tcfg.data)}, this job uses "
                        f"{resize_keys(cfg.data)}: they must evaluate at the same scale (the largest data.min_size "
                        "and data.max_size, or data.size)")
    return teacher, tcfg, ckpt


def resize_keys(data: C.DataConfig) -> str:
    """The resize settings of ``data`` as ``data.size=128`` or ``data.min_size=[800] data.max_size=1333``."""
    if data.size is not None:
        return f"data.size={data.size}"
    return f"data.min_size={data.min_size} data.max_size={data.max_size}"


def _teacher_rms(teacher, train_set: CocoDetection, cfg: C.ExperimentConfig, device) -> torch.Tensor:
    """The teacher's fixed per-level scale (:func:`unikd.distill.measure_teacher_rms`), logged."""
    rms = measure_teacher_rms(teacher, train_set, collate, device, batch_size=cfg.data.batch_size)
    log.info("teacher RMS per level over %d training images: %s", min(len(train_set), RMS_IMAGES),
             " / ".join(f"{v:.3g}" for v in rms.tolist()))
    return rms


def pretrain_ake(cfg: C.ExperimentConfig, teacher_checkpoint: str | Path, out_dir: str | Path,
                 resume: str | Path | None = None, overwrite: bool = False) -> dict:
    """Stage 1: train ``AKE_ct`` and ``AKE_pos`` on the frozen teacher's features; write ``OUT/ake.safetensors``
    (with the teacher's fingerprint) and ``OUT/report.json`` (the AKE's own val mAP, and its training time as
    a fraction of the teacher's)."""
    claim_run_folder(out_dir, resume, overwrite, is_main_process())
    device, train_set, val_set = _prepare(cfg)
    teacher, tcfg, tckpt = _load_teacher(teacher_checkpoint, cfg, train_set, device)
    fingerprint = teacher_fingerprint(teacher, tcfg.model)
    akes = KnowledgeExtractors(cfg.ake, len(teacher.feature_strides), teacher.feature_channels[0],
                               train_set.num_classes)
    akes.teacher_rms.copy_(_teacher_rms(teacher, train_set, cfg, device))
    trainer, metrics = _fit(cfg, AbsorbModel(teacher, akes), train_set, val_set, device, out_dir, resume,
                            meta={"teacher": fingerprint}, train_data=_with_query_boxes(train_set, akes, cfg))
    seconds, teacher_seconds = trainer.state.train_seconds, tckpt["train_state"]["train_seconds"]
    report = {"ake_val": metrics, "teacher": str(teacher_checkpoint), "teacher_rms": akes.teacher_rms.tolist(),
              "ake_train_seconds": seconds,
              "teacher_train_seconds": teacher_seconds,
              "fraction_of_teacher_training": seconds / teacher_seconds if teacher_seconds else None}
    if D.is_main():
        path = save_ake(Path(out_dir) / "ake.safetensors", akes, fingerprint, train_set.num_classes,
                        train_set.category_ids)
        (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        fraction = report["fraction_of_teacher_training"] or float("nan")
        print(f"AKEs saved to {path}; content-AKE val AP {metrics.get('AP', float('nan')):.3f}; "
              f"stage 1 took {fraction:.1%} of the teacher's training time")
    return report


def distill(cfg: C.ExperimentConfig, teacher_checkpoint: str | Path | None, out_dir: str | Path,
            ake_path: str | Path | None = None, resume: str | Path | None = None, overwrite: bool = False,
            knowledge_store: str | Path | None = None) -> dict:
    """Stage 2: train the student of ``cfg.model`` with ``cfg.distill.method`` (unikd | fitnet | none) from the
    teacher, or (UniKD) from a ``knowledge_store`` that ``unikd dump`` wrote, with no teacher loaded; evaluate it
    on val; write ``OUT/student.pt``, a detector checkpoint ``unikd eval`` reads."""
    if (teacher_checkpoint is None) == (knowledge_store is None):
        raise UserError("stage 2 reads the teacher (--teacher) or a knowledge store (--knowledge-store): give one")
    claim_run_folder(out_dir, resume, overwrite, is_main_process())
    device, train_set, val_set = _prepare(cfg)
    student = build_detector(cfg.model, train_set.num_classes, backbone_weights=resume is None)
    if knowledge_store is None:
        model, fingerprint, train_data = _online_model(cfg, teacher_checkpoint, ake_path, student, train_set, device)
    else:
        model, fingerprint, train_data = _offline_model(cfg, knowledge_store, ake_path, student, train_set)
    trainer, metrics = _fit(cfg, model, train_set, val_set, device, out_dir, resume, meta={"teacher": fingerprint},
                            evaluated=lambda m: m.student, train_data=train_data)
    if D.is_main():
        save_atomic({"model": student.state_dict(), "meta": trainer.meta, "train_state": vars(trainer.state).copy()},
                    Path(out_dir) / "student.pt")
        print(f"{cfg.distill.method} student, val: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics


def _akes_for(method: str, ake_path: str | Path | None, fingerprint: dict):
    """The stage-1 AKEs of ``ake_path``, checked against the teacher's ``fingerprint``."""
    if ake_path is None:
        raise UserError(f"--method {method} needs --ake (the output of 'unikd pretrain-ake')")
    return load_ake(ake_path, fingerprint)


def _online_model(cfg: C.ExperimentConfig, teacher_checkpoint: str | Path, ake_path, student, train_set, device):
    """The model of stage 2 with the teacher in memory. Returns ``(model, teacher fingerprint, what the trainer
    iterates)``: the training set, with each sample's ``B̂`` for UniKD."""
    teacher, tcfg, _ = _load_teacher(teacher_checkpoint, cfg, train_set, device)
    fingerprint = teacher_fingerprint(teacher, tcfg.model)
    method = method_class(cfg.distill.method)
    akes = teacher_rms = None
    if method is not None and method.needs_akes:
        akes, _ = _akes_for(method.method, ake_path, fingerprint)
    elif method is not None:
        teacher_rms = _teacher_rms(teacher, train_set, cfg, device)
    distiller = build_distiller(cfg.distill.method, cfg.distill, student, teacher, teacher_rms, akes)
    train_data = None if akes is None else _with_query_boxes(train_set, akes, cfg)
    return DistillationModel(student, teacher if distiller is not None else None, distiller), fingerprint, train_data


def _with_query_boxes(train_set: CocoDetection, akes: KnowledgeExtractors,
                      cfg: C.ExperimentConfig) -> SeededQueryBoxes:
    """The training set with each sample's ``B̂`` for the positional AKE, drawn in the data loader from the
    sample's seeded generator (:mod:`unikd.knowledge.seeded_boxes`)."""
    return SeededQueryBoxes(train_set, akes.cfg.n_queries, akes.cfg.alpha, akes.cfg.beta, cfg.train.seed)


def _offline_model(cfg: C.ExperimentConfig, store_path: str | Path, ake_path, student, train_set):
    """The model of stage 2 from a knowledge store, no teacher loaded: UniKD from a UniKD store, FitNet from a
    store of FitNet's features. Returns ``(model, the store's teacher fingerprint, the training set served with its
    stored knowledge)``."""
    store = KnowledgeStore(store_path)
    knowledge, method = store.manifest["knowledge"], cfg.distill.method
    if KNOWLEDGE[knowledge] != method:
        raise UserError(f"knowledge store {store_path} holds {knowledge} knowledge; method '{method}' cannot use it "
                        f"(--method {KNOWLEDGE[knowledge]}, or dump a store for {method})")
    check_store_fits(store, train_set, ImageResize.from_config(cfg.data, train=False))
    fingerprint = store.manifest["teacher"]
    teacher = Levels(fingerprint["strides"], fingerprint["channels"])
    if method == "unikd":
        akes, info = _akes_for("unikd", ake_path, fingerprint)
        if info["tensors_sha256"] != store.manifest["ake"]["tensors_sha256"]:
            raise KnowledgeStoreError(f"{ake_path} are not the AKEs knowledge store {store_path} was dumped with "
                                      "(their tensors differ); use those, or dump the store again with these")
        distiller = build_distiller("unikd", cfg.distill, student, teacher, akes=akes)
        stored_teacher = unikd_teacher
    else:
        rms = torch.tensor(store.manifest["teacher_rms"], dtype=torch.float32)
        distiller = build_distiller(method, cfg.distill, student, teacher, teacher_rms=rms)

        def stored_teacher(maps, targets, student_pyramid):
            return stored_pyramid(maps, student_pyramid.image_sizes, teacher.strides, student_pyramid.levels[0].device)
    return OfflineDistillationModel(student, distiller, stored_teacher), fingerprint, StoredKnowledge(train_set, store)


def dump_knowledge(cfg: C.ExperimentConfig, teacher_checkpoint: str | Path, ake_path: str | Path | None,
                   out: str | Path, dtype: str = "float16", draws: int = 1, records_per_shard: int = 256,
                   overwrite: bool = False, knowledge: str = "unikd") -> dict:
    """``unikd dump``: the teacher's side of stage 2 for every training image under every augmentation the job
    draws, into the knowledge store ``out`` (:mod:`unikd.knowledge`): UniKD's knowledge (``knowledge="unikd"``,
    with the AKEs of ``ake_path``) or FitNet's teacher features (``fitnet-full``: whole maps, ``fitnet-foreground``:
    the cells inside the boxes). A store of the same settings is continued where it stopped; another one is
    replaced only with ``overwrite``. Under ``torchrun`` each rank writes its own shards. Returns
    ``{"records", "expected", "shards", "bytes", "seconds"}``."""
    if knowledge not in KNOWLEDGE:
        raise UserError(f"--knowledge {knowledge}: choose {', '.join(KNOWLEDGE)}")
    if knowledge != "unikd" and (ake_path is not None or draws != 1):
        raise UserError(f"--knowledge {knowledge} stores the teacher's features: it takes no --ake and no --draws")
    if knowledge == "unikd" and ake_path is None:
        raise UserError("--knowledge unikd needs --ake (the output of 'unikd pretrain-ake' on that teacher)")
    device, train_set, _ = _prepare(cfg)
    teacher, tcfg, _ = _load_teacher(teacher_checkpoint, cfg, train_set, device)
    fingerprint = teacher_fingerprint(teacher, tcfg.model)
    if knowledge == "unikd":
        akes, info = load_ake(ake_path, fingerprint)
        entries = {"ake": ake_entry(info),
                   "fields": field_specs(info["ake"]["n_queries"], info["ake"]["d_model"], draws, dtype)}
    else:
        entries = {"teacher_rms": _teacher_rms(teacher, train_set, cfg, device).tolist(),
                   "fields": feature_fields(teacher.feature_channels, knowledge, dtype)}
    manifest = dump_manifest(knowledge, fingerprint, train_set, ImageResize.from_config(cfg.data, train=False),
                             cfg.train.seed, draws, dtype, **entries)
    out = Path(out)
    prepare_store(out, manifest, overwrite)
    if knowledge == "unikd":
        make_records = partial(unikd_records, akes=akes.to(device).eval(), seed=cfg.train.seed, draws=draws,
                               dtype=DTYPES[dtype], matcher=HungarianMatcher())
    else:
        make_records = partial(feature_records, knowledge=knowledge, dtype=DTYPES[dtype])
    tic = time.perf_counter()
    dump_records(teacher, make_records, train_set, out, manifest, device, cfg.data.batch_size, cfg.data.workers,
                 records_per_shard)
    D.barrier()
    summary = {**store_summary(out), "seconds": time.perf_counter() - tic}
    if D.is_main():
        what = f"{draws} draw(s) of B̂" if knowledge == "unikd" else f"{REGIONS[knowledge]} feature maps"
        print(f"knowledge store {out} ({knowledge}): {summary['records']} of {summary['expected']} records in "
              f"{summary['shards']} shards, {summary['bytes'] / 2**20:.1f} MiB "
              f"({summary['bytes'] / max(summary['records'], 1) / 1024:.1f} KiB per record, {manifest['dtype']}, "
              f"{what})")
    return summary


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path | None = None, split: str = "val",
                        device: str = "auto", batch_size: int = 8, subset: bool = False) -> dict:
    """COCO metrics of a checkpoint on ``split`` of ``data_root`` (default: the data it was trained on).

    The checkpoint's categories must be the dataset's (ids and names); with ``subset`` the dataset may have
    fewer, and the detections of the others are dropped (:mod:`unikd.categories`).
    """
    dev = D.init_from_env(device)
    detector, cfg, ckpt = load_detector(checkpoint, dev, with_checkpoint=True)
    dataset = CocoDetection(data_root or cfg.data.root, split, ImageResize.from_config(cfg.data, train=False))
    check_categories(f"checkpoint {checkpoint}", checkpoint_categories(ckpt["meta"]), dataset_categories(dataset),
                     subset)
    return evaluate_detector(detector, dataset, collate, dev, batch_size=batch_size, verbose=D.is_main(),
                             category_ids=ckpt["meta"]["category_ids"])


def import_teacher(zoo: str, weights: str | Path, data_root: str | Path, out: str | Path,
                   overrides: list[str] = (), overwrite: bool = False) -> Path:
    """Write ``out``, a teacher checkpoint for the dataset in ``data_root`` (the form ``unikd train`` writes, which
    ``pretrain-ake``, ``distill`` and ``eval`` read) from the state dict ``weights`` of torchvision's COCO zoo
    model ``zoo`` (:mod:`unikd.detectors.zoo`).

    The config is the defaults with the zoo model's architecture, then ``overrides`` (``key=value``, as
    ``--set``): the resize of the jobs that will use the teacher, say, or post-processing thresholds. Its class
    rows are the dataset's categories, matched to COCO's by name. An existing ``out`` is replaced only with
    ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    values = C.to_dict(C.ExperimentConfig())
    values["model"] = C.to_dict(zoo_config(zoo))
    values["data"]["root"] = str(data_root)
    cfg = C.from_dict(C.apply_overrides(values, list(overrides)))
    train_set, _ = _datasets(cfg)
    categories = dataset_categories(train_set)
    teacher = zoo_detector(zoo, cfg.model, read_state_dict(weights), categories)
    meta = {"config": C.to_dict(cfg), "num_classes": train_set.num_classes, "category_ids": train_set.category_ids,
            "categories": categories, "imported": {"zoo": zoo, "weights": str(weights)}}
    save_atomic({"model": teacher.state_dict(), "meta": meta, "train_state": vars(TrainState())}, out)
    print(f"teacher {zoo} for the {train_set.num_classes} categories of {data_root} written to {out}")
    return out
