"""Weights from local files, never downloaded: reading a state dict, checking its keys against the model it is
meant for, and starting a backbone from a torchvision ImageNet state dict (``model.backbone_weights``).

A file that does not fit is a :class:`WeightsError` naming the keys that are missing, the keys that are
unexpected and the keys whose shape is wrong (with both shapes). BatchNorm's step counters
(``num_batches_tracked``) are neither: FrozenBatchNorm2d has none, and evaluation never reads them.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from unikd.config import DetectorConfig
from unikd.detectors.backbone import Trunk, layout_of
from unikd.errors import UserError

LISTED = 5  # keys named per kind of problem; the rest are counted


class WeightsError(UserError, ValueError):
    """A weights file that is not a state dict, or whose keys or shapes do not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a state dict saved with ``torch.save`` (as torchvision's ``.pth`` files) or as
    ``.safetensors``, on the CPU. Raises FileNotFoundError, or a WeightsError for a file of anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, SafetensorError) as err:
        raise WeightsError(f"{path} cannot be read as a state dict ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise WeightsError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return state


def is_step_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``, which a file may have or lack (see the module's docstring)."""
    return key.endswith("num_batches_tracked")


def _names(keys: list[str]) -> str:
    more = f", and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def check_keys(what: str, expected: dict[str, torch.Size], given: dict[str, Tensor]) -> None:
    """Raise a WeightsError, naming ``what``, unless ``given`` has exactly the keys of ``expected`` with its
    shapes (step counters aside). ``expected`` maps each key to its shape (:func:`shapes`)."""
    missing = sorted(k for k in expected.keys() - given.keys() if not is_step_counter(k))
    unexpected = sorted(k for k in given.keys() - expected.keys() if not is_step_counter(k))
    wrong = [f"{k} (file {list(given[k].shape)}, model {list(expected[k])})"
             for k in sorted(expected.keys() & given.keys()) if given[k].shape != expected[k]]
    problems = [f"{len(keys)} {kind}: {_names(keys)}" for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)) if keys]
    if problems:
        raise WeightsError(f"{what} does not fit: " + "; ".join(problems))


def shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Every key of ``module``'s state dict with its shape."""
    return {k: v.shape for k, v in module.state_dict().items()}


def backbone_trunk(detector: nn.Module) -> Trunk:
    """The one :class:`~unikd.detectors.backbone.Trunk` inside ``detector``."""
    trunks = [m for m in detector.modules() if isinstance(m, Trunk)]
    if len(trunks) != 1:
        raise TypeError(f"{type(detector).__name__} has {len(trunks)} backbone trunks, expected one")
    return trunks[0]


def load_backbone_weights(detector: nn.Module, cfg: DetectorConfig) -> None:
    """Copy the ImageNet state dict ``cfg.backbone_weights`` (of the torchvision classification model
    ``cfg.backbone``, classifier included) into ``detector``'s backbone trunk.

    The file must have exactly the classification model's keys and shapes (a WeightsError names each that
    differs); the classifier's tensors are then left out. The trunk's own additions (the output LayerNorms of
    ConvNeXt and Swin) keep their initialisation.
    """
    path = cfg.backbone_weights
    state = read_state_dict(path)
    with torch.device("meta"):  # shapes only: nothing is initialised
        expected = shapes(torchvision.models.get_model(cfg.backbone, weights=None))
    check_keys(f"model.backbone_weights {path} (for model.backbone {cfg.backbone})", expected, state)
    body = backbone_trunk(detector)
    prefix = layout_of(cfg.backbone).body + "." if layout_of(cfg.backbone).body else ""
    kept = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    kept = {k: v for k, v in kept.items() if k.split(".")[0] in body.order}
    result = body.load_state_dict(kept, strict=False)
    left = [k for k in result.missing_keys if not k.startswith("output_norms.") and not is_step_counter(k)]
    assert not left and not result.unexpected_keys, (left, result.unexpected_keys)  # the trunk is the body's prefix
