"""Experiment configuration: typed dataclasses, loaded from YAML and validated on load.

An unknown key, a value of the wrong type or a value out of its range (:data:`LIMITS`) is a
:class:`ConfigError` that names the dotted key. Command-line overrides use the same path:
``--set train.lr=0.02``. YAML is read with one change to PyYAML's YAML 1.1 rules: ``1e-3`` (an exponent
without a dot) is a number, as in YAML 1.2, not a string.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    # The loader's resize (docs/data.md, "Resize"): either size (the longer side to size; 128 when neither is
    # given) or min_size with max_size (the shorter side to S, the longer at most max_size; a list of several S:
    # one drawn per training image, the largest used for evaluation). Never both.
    size: int | None = None
    min_size: int | list[int] | None = None
    max_size: int | None = None
    hflip: float = 0.5  # probability of a horizontal flip (train split only)
    batch_size: int = 8
    workers: int = 0  # DataLoader worker processes

    def __post_init__(self):
        if self.min_size is None and self.max_size is None:
            self.size = 128 if self.size is None else self.size
        elif self.size is not None:
            raise ConfigError(f"data.size ({self.size}) and data.min_size/data.max_size are two ways to resize; "
                              "give one (data.size=null to use min_size and max_size)")
        elif self.min_size is None or self.max_size is None:
            raise ConfigError("data.min_size and data.max_size go together (to resize the longer side alone, "
                              "use data.size)")
        else:
            self.min_size = [self.min_size] if isinstance(self.min_size, int) else self.min_size
            if not self.min_size or max(self.min_size) >= self.max_size:
                raise ConfigError(f"data.min_size {self.min_size} must be one or more sizes, each below "
                                  f"data.max_size ({self.max_size})")


@dataclass
class DetectorConfig:
    """One detector, built from torchvision parts (see :mod:`unikd.detectors`)."""

    family: str = "retinanet"  # retinanet | fcos | faster_rcnn | mask_rcnn | atss | reppoints | deformable_detr
    # any torchvision ResNet/ResNeXt/Wide-ResNet, ConvNeXt or Swin (v1, v2) name (unikd.detectors.backbone)
    backbone: str = "resnet18"
    # RetinaNet, FCOS, ATSS, RepPoints: a multiple of 32 (GroupNorm heads, 32 groups); Deformable DETR: d_model,
    # a multiple of 32 (GroupNorm projections) and of attention_heads
    fpn_channels: int = 64
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # base size per FPN level
    trainable_layers: int = 5  # backbone stages that train (5 = all; torchvision's detectors train 3 when pretrained)
    # A torchvision ImageNet state dict (.pth or .safetensors) to start the backbone from, read when training
    # starts; with it, ResNets get FrozenBatchNorm2d (except with torchvision_v2), as torchvision's builders.
    backbone_weights: str | None = None
    # torchvision's "v2" variant of the family (retinanet: P6 from C5, integer anchor sizes; faster_rcnn and
    # mask_rcnn: BatchNorm in the FPN and heads, two-conv RPN head, four-conv box head): zoo teachers need it.
    torchvision_v2: bool = False
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # RepPoints only: how a point set becomes a box (moment: mean +- learned multiple of the std; minmax).
    point_transform: str = "moment"
    # Deformable DETR only (its transformer width d_model is fpn_channels; it has no anchors): the paper's values.
    num_queries: int = 300
    encoder_layers: int = 6
    decoder_layers: int = 6
    attention_heads: int = 8
    attention_points: int = 4  # sampling points per head per level
    ffn_channels: int = 1024
    box_refine: bool = False  # iterative bounding box refinement
    # Two-stage (faster_rcnn, mask_rcnn) only: proposal and RoI sampling counts, used in training and inference.
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
    # Parameter groups (unikd.engine.param_groups): {regex: factor}. A trainable parameter whose name (as the trained
    # model names it: model.backbone.body.layer1.0.conv1.weight in a detector, student.model... and distiller... in a
    # distillation job) matches a pattern (re.search) trains at lr x factor, or with weight_decay x factor. At most
    # one pattern of each mapping may match a parameter, and every pattern must match one.
    lr_mult: dict[str, float] = field(default_factory=dict)
    decay_mult: dict[str, float] = field(default_factory=dict)
    no_decay_norms: bool = False  # no weight decay on the weights and biases of BatchNorm, GroupNorm, LayerNorm
    keep_checkpoints: int = 2  # older step checkpoints kept besides the newest (last.pt); 0 keeps only that one
    tensorboard: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        for key in ("lr_mult", "decay_mult"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"train.{key}: {pattern!r} is not a regular expression ({err})") from None


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
    # FGD (Yang et al., CVPR 2022), the authors' RetinaNet values: weights of the feature loss on foreground (α) and
    # background (β) cells, of the attention loss (γ) and of the global (GcBlock) loss (λ); T the attention temperature.
    fgd_alpha: float = 1e-3
    fgd_beta: float = 5e-4
    fgd_gamma: float = 5e-4
    fgd_lambda: float = 5e-6
    fgd_temperature: float = 0.5
    # MGD (Yang et al., ECCV 2022), the paper's one-stage values: loss weight α and masked ratio λ.
    mgd_alpha: float = 2e-5
    mgd_lambda: float = 0.65
    # PKD (Cao et al., NeurIPS 2022): weight of the standardised-feature MSE (1 − Pearson r) of each level; 6 in the
    # authors' configs with a RetinaNet student.
    pkd_weight: float = 6.0


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ake: AKEConfig = field(default_factory=AKEConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3``, ``2E5`` and ``-1e+2`` are floats (YAML 1.2's rule)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def read_yaml(text: str):
    """Parse YAML ``text`` as configs are read (``1e-3`` is a number)."""
    return yaml.load(text, Loader=_Loader)


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _above(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > low), f"> {low}"


def _within(low: float, high: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


# Allowed values of the numeric keys (for a list, of each item). Keys not listed take any value of their type.
LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "data.size": _at_least(1), "data.min_size": _at_least(1), "data.max_size": _at_least(1),
    "data.hflip": _within(0, 1), "data.batch_size": _at_least(1), "data.workers": _at_least(0),
    "model.fpn_channels": _at_least(1), "model.anchor_sizes": _at_least(1), "model.trainable_layers": _within(0, 5),
    "model.score_thresh": _within(0, 1), "model.nms_thresh": _within(0, 1), "model.detections_per_img": _at_least(1),
    "model.rpn_pre_nms_top_n": _at_least(1), "model.rpn_post_nms_top_n": _at_least(1),
    "model.rpn_batch_size_per_image": _at_least(1), "model.box_batch_size_per_image": _at_least(1),
    "model.num_queries": _at_least(1), "model.encoder_layers": _at_least(1), "model.decoder_layers": _at_least(1),
    "model.attention_heads": _at_least(1), "model.attention_points": _at_least(1), "model.ffn_channels": _at_least(1),
    "train.epochs": _at_least(1), "train.lr": _above(0), "train.momentum": _within(0, 1),
    "train.weight_decay": _at_least(0), "train.warmup_iters": _at_least(0), "train.warmup_factor": _within(0, 1),
    "train.lr_steps": _within(0, 1), "train.lr_gamma": _above(0), "train.grad_clip": _at_least(0),
    "train.max_iters": _at_least(0), "train.eval_every": _at_least(0), "train.log_every": _at_least(1),
    "train.threads": _at_least(0), "train.keep_checkpoints": _at_least(0), "train.lr_mult": _above(0),
    "train.decay_mult": _at_least(0),
    "ake.d_model": _at_least(1), "ake.n_queries": _at_least(1), "ake.n_heads": _at_least(1),
    "ake.n_points": _at_least(1), "ake.d_ffn": _at_least(1), "ake.extractor_layers": _at_least(1),
    "ake.alpha": _within(0, 1), "ake.beta": _within(0, 1),
    "distill.lambda_ct": _at_least(0), "distill.lambda_pos": _at_least(0), "distill.adaptor_layers": _at_least(0),
    "distill.adaptor_heads": _at_least(1), "distill.adaptor_points": _at_least(1),
    "distill.fitnet_weight": _at_least(0),
    "distill.fgd_alpha": _at_least(0), "distill.fgd_beta": _at_least(0), "distill.fgd_gamma": _at_least(0),
    "distill.fgd_lambda": _at_least(0), "distill.fgd_temperature": _above(0), "distill.mgd_alpha": _at_least(0),
    "distill.mgd_lambda": _within(0, 1), "distill.pkd_weight": _at_least(0),
}


def _check_range(key: str, value: Any) -> None:
    """Raise a ConfigError naming ``key`` if ``value`` (or an item or mapped value of it) is outside ``LIMITS[key]``."""
    if key not in LIMITS or value is None:
        return
    ok, allowed = LIMITS[key]
    items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else [(None, value)]
    for i, v in items:
        if not (math.isfinite(v) and ok(v)):
            where = key if i is None else f"{key}[{i!r}]"
            raise ConfigError(f"{where}: {v!r} is out of range (must be {allowed})")


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
    if origin is dict:
        key_hint, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_check_value(f"{key} (a key)", key_hint, k): _check_value(f"{key}[{k!r}]", item, v)
                for k, v in value.items()}
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
    checked = {k: _check_value(prefix + k, hints[k], v) for k, v in values.items()}
    for k, v in checked.items():
        _check_range(prefix + k, v)
    return cls(**checked)


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
        try:
            node[keys[-1]] = read_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{path}': the value {raw!r} is not valid YAML: {err}") from None
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults when ``path`` is None), apply overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return from_dict(apply_overrides(values, list(overrides)))
    except ConfigError as err:
        raise ConfigError(f"{path or 'defaults'}: {err}") from None


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
