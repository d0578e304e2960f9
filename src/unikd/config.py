"""Experiment configuration: typed dataclasses, loaded from YAML and validated on load.

An unknown key or a value of the wrong type is a :class:`ConfigError` that names the dotted key.
Command-line overrides use the same path: ``--set train.lr=0.02``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class DataConfig:
    """Where the COCO-format dataset is and how batches are made from it."""

    root: str = "cache/digits-det"  # folder holding images/ and annotations/instances_{split}.json
    train_split: str = "train"
    val_split: str = "val"
    size: int = 128  # longer image side after resizing, in pixels
    hflip: float = 0.5  # probability of a horizontal flip (train split only)
    batch_size: int = 8
    workers: int = 0  # DataLoader worker processes


@dataclass
class DetectorConfig:
    """One detector, built from torchvision parts (see :mod:`unikd.detectors`)."""

    family: str = "retinanet"  # retinanet | fcos | faster_rcnn | atss | reppoints
    backbone: str = "resnet18"  # any torchvision ResNet/ResNeXt/Wide-ResNet name
    fpn_channels: int = 64  # RetinaNet, FCOS, ATSS, RepPoints: a multiple of 32 (GroupNorm heads, 32 groups)
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # base size per FPN level
    trainable_layers: int = 5  # backbone stages that train (5 = all)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # RepPoints only: how a point set becomes a box (moment: mean +- learned multiple of the std; minmax).
    point_transform: str = "moment"
    # Two-stage (faster_rcnn) only: proposal and RoI sampling counts, used in training and inference.
    rpn_pre_nms_top_n: int = 1000
    rpn_post_nms_top_n: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512


@dataclass
class TrainConfig:
    """The optimisation schedule shared by every training stage."""

    epochs: int = 12
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    lr_steps: list[float] = field(default_factory=lambda: [8 / 12, 11 / 12])  # fractions of all iterations
    lr_gamma: float = 0.1
    grad_clip: float = 10.0  # max gradient norm; 0 turns clipping off
    amp: bool = True  # mixed precision; only ever used on a GPU
    seed: int = 0
    max_iters: int = 0  # stop after this many iterations (0 = run the whole schedule)
    eval_every: int = 0  # evaluate every k epochs (0 = only at the end)
    log_every: int = 20
    threads: int = 0  # torch intra-op threads per process (0 = torch's default)
    tensorboard: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class AKEConfig:
    """The two Adaptive Knowledge Extractors (paper §3.2.1), trained in stage 1 (``unikd pretrain-ake``)."""

    d_model: int = 256  # C, the width of queries and knowledge embeddings
    n_queries: int = 200  # N, per query type
    n_heads: int = 8
    n_points: int = 4  # sampling points per head per level
    d_ffn: int = 1024
    extractor_layers: int = 1  # decoder layers in f_e
    alpha: float = 0.6  # a jittered query box has IoU > alpha with its ground truth
    beta: float = 0.4  # a background query box has IoU < beta with every ground truth


@dataclass
class DistillConfig:
    """Stage 2 (``unikd distill``): which knowledge the student learns and how strongly."""

    method: str = "unikd"  # a registered method (unikd.distill.METHODS) or none
    queries: str = "both"  # both | content | positional (UniKD's distillation terms)
    lambda_ct: float = 10.0  # λ1, weight of D(z_ct_S, z_ct_T)
    lambda_pos: float = 10.0  # λ2, weight of D(z_pos_S, z_pos_T)
    # Deformable self-attention layers in the adaptor φ (0 = projection only); unset: the method's own
    # (UniKD 2, FitNet 1, as in the paper).
    adaptor_layers: int | None = None
    adaptor_heads: int = 8
    adaptor_points: int = 4  # sampling points per head per level
    fitnet_weight: float = 1.0  # weight of FitNet's foreground feature MSE (method fitnet)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ake: AKEConfig = field(default_factory=AKEConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def _check_value(key: str, hint: Any, value: Any) -> Any:
    """Return ``value`` converted to ``hint`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls: type, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    return cls(**{k: _check_value(prefix + k, hints[k], v) for k, v in values.items()})


def from_dict(values: dict, cls: type = ExperimentConfig):
    """Build and validate a config from a plain mapping (as read from YAML)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(values).__name__}")
    return _build(cls, values)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested mapping; ``value`` is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{path}': '{k}' is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults when ``path`` is None), apply overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return from_dict(apply_overrides(values, list(overrides)))
    except ConfigError as err:
        raise ConfigError(f"{path or 'defaults'}: {err}") from None


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
