"""The jobs behind the command line: train a detector, evaluate a checkpoint, the demo."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from . import config as C
from .data import CocoDetection, build_digits_det, collate
from .detectors import build_detector
from .engine import distributed as D
from .engine.checkpoint import load_checkpoint
from .engine.trainer import Trainer
from .evaluation import evaluate_detector

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _datasets(cfg: C.ExperimentConfig) -> tuple[CocoDetection, CocoDetection]:
    d = cfg.data
    train = CocoDetection(d.root, d.train_split, d.size, hflip=d.hflip, seed=cfg.train.seed)
    val = CocoDetection(d.root, d.val_split, d.size)
    if train.category_ids != val.category_ids:
        raise ValueError(f"{d.root}: the '{d.train_split}' and '{d.val_split}' splits have different categories")
    return train, val


def train_detector(cfg: C.ExperimentConfig, out_dir: str | Path, resume: str | Path | None = None) -> dict:
    """Train the detector that ``cfg.model`` describes on ``cfg.data``; evaluate on the val split at the end.

    Returns the final COCO metrics. Under ``torchrun`` every process runs this; only rank 0 writes.
    """
    device = D.init_from_env(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    train_set, val_set = _datasets(cfg)
    detector = build_detector(cfg.model, train_set.num_classes, cfg.data.size)

    def evaluate(model):
        return evaluate_detector(model, val_set, collate, device, batch_size=cfg.data.batch_size,
                                 workers=cfg.data.workers)

    meta = {"config": C.to_dict(cfg), "num_classes": train_set.num_classes, "category_ids": train_set.category_ids}
    trainer = Trainer(detector, train_set, collate, cfg.train, batch_size=cfg.data.batch_size,
                      workers=cfg.data.workers, out_dir=out_dir, evaluate=evaluate, meta=meta, device=device)
    if resume is not None:
        trainer.resume(resume)
    metrics = trainer.fit()
    log.info("val: %s", json.dumps(metrics))
    return metrics


def load_detector(checkpoint: str | Path, device="cpu"):
    """Rebuild the detector stored in a training checkpoint. Returns ``(detector, config)``."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    cfg = C.from_dict(ckpt["meta"]["config"])
    detector = build_detector(cfg.model, ckpt["meta"]["num_classes"], cfg.data.size)
    detector.load_state_dict(ckpt["model"])
    return detector.to(device).eval(), cfg


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path | None = None, split: str = "val",
                        device: str = "auto", batch_size: int = 8) -> dict:
    """COCO metrics of a checkpoint on ``split`` of ``data_root`` (default: the data it was trained on)."""
    dev = D.init_from_env(device)
    detector, cfg = load_detector(checkpoint, dev)
    dataset = CocoDetection(data_root or cfg.data.root, split, cfg.data.size)
    return evaluate_detector(detector, dataset, collate, dev, batch_size=batch_size, verbose=D.is_main())


DEMO_OVERRIDES = [  # the digits-det student schedule of configs/digits/retinanet_r18_student.yaml
    "name=demo-retinanet-r18",
    "train.epochs=3",
    "train.optimizer=adamw",
    "train.lr=0.001",
    "train.warmup_iters=100",
    "model.anchor_sizes=[16, 32, 64, 128, 256]",
]


def demo(out_dir: str | Path, data_root: str | Path = "cache/digits-det", quick: bool = False) -> dict:
    """The main job on the embedded dataset: build digits-det (once), train an R18 RetinaNet, evaluate it."""
    out_dir = Path(out_dir)
    sizes = dict(n_train=16, n_val=8, size=64) if quick else {}
    root = build_digits_det(data_root, **sizes)
    overrides = DEMO_OVERRIDES + [f"data.root={root}"]
    if quick:
        overrides += ["data.size=64", "train.max_iters=2", "model.fpn_channels=32"]
    cfg = C.load_config(None, overrides)
    metrics = train_detector(cfg, out_dir)
    if D.is_main():
        print("digits-det val, R18 RetinaNet: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics
