"""The optimiser and its parameter groups: per-parameter learning-rate and weight-decay factors from the config.

``train.lr_mult`` and ``train.decay_mult`` map regular expressions to factors. A trainable parameter whose name
(``model.named_parameters()`` of the model the trainer is given: ``model.backbone.body.layer1.0.conv1.weight`` for
a detector; ``student.model...`` and ``distiller...`` in a distillation job) matches a pattern (``re.search``)
trains at ``lr × factor``, or with ``weight_decay × factor``; ``train.no_decay_norms`` sets the weight decay of
every normalisation layer's weight and bias to 0, whatever ``decay_mult`` says of them. Normalisation layers are
found by their type (:data:`NORMS`), not their names: torchvision's ConvNeXt names its block LayerNorm ``block.2``.

Two rules catch mistakes that would otherwise train silently with the wrong rates: a parameter may match at most
one pattern of each mapping (no precedence to remember), and every pattern must match at least one trainable
parameter (a misspelt pattern is an error, not a no-op).

Parameters with the same pair of factors share one group; the groups come in the order of their first parameter.
Without any of the three keys there is one group, as before they existed, so older checkpoints resume unchanged.
Each group records its ``lr_mult`` and ``decay_mult`` (they are saved with the optimiser's state).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ConfigError, TrainConfig

# Normalisation layers whose parameters ``train.no_decay_norms`` exempts (``_NormBase``: BatchNorm, SyncBatchNorm,
# InstanceNorm; torchvision's ConvNeXt LayerNorm2d is a LayerNorm).
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters that normalisation layers own."""
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if isinstance(module, NORMS)
            for name, _ in module.named_parameters(recurse=False)}


def _factor(name: str, patterns: dict[str, float], key: str) -> float:
    """The factor of the one pattern of ``patterns`` that ``name`` matches (1 if none); a ConfigError if several."""
    matched = [p for p in patterns if re.search(p, name)]
    if len(matched) > 1:
        raise ConfigError(f"train.{key}: parameter {name} matches {len(matched)} patterns "
                          f"({', '.join(map(repr, matched))}); make them match one each")
    return patterns[matched[0]] if matched else 1.0


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters of ``model`` in groups of equal factors, for ``torch.optim``.

    Returns ``[{"params": [...], "lr": cfg.lr × lr_mult, "weight_decay": cfg.weight_decay × decay_mult,
    "lr_mult": ..., "decay_mult": ...}, ...]``. Raises a ConfigError for a parameter that two patterns of one
    mapping match, or a pattern that no trainable parameter matches.
    """
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    for key in ("lr_mult", "decay_mult"):
        for pattern in getattr(cfg, key):
            if not any(re.search(pattern, name) for name, _ in named):
                raise ConfigError(f"train.{key}: {pattern!r} matches no trainable parameter (their names are the "
                                  f"trained model's, e.g. {named[0][0]})")
    norms = norm_parameter_names(model) if cfg.no_decay_norms else set()
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        lr_mult = _factor(name, cfg.lr_mult, "lr_mult")
        decay_mult = 0.0 if name in norms else _factor(name, cfg.decay_mult, "decay_mult")
        group = groups.setdefault((lr_mult, decay_mult), {
            "params": [], "lr": cfg.lr * lr_mult, "weight_decay": cfg.weight_decay * decay_mult,
            "lr_mult": lr_mult, "decay_mult": decay_mult})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (sgd | adamw) over :func:`param_groups` of ``model`` (every group sets its own ``lr`` and
    ``weight_decay``)."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    raise ConfigError(f"train.optimizer: unknown optimizer '{cfg.optimizer}' (choose sgd or adamw)")
