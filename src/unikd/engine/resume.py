"""What may change when a run is resumed, and what may not.

A checkpoint stores the whole experiment config (``meta["config"]``). On ``--resume`` the given config is
compared with it key by key:

- :data:`APPLIED` keys may differ: they take effect from the resumed step on and the new value is what the
  checkpoints record from then on (with the change itself in ``meta["resumed"]``). They change how the run
  is carried out (threads, logging, where the data lives, when to stop), not what it computes.
- every other key (model, data, optimiser, schedule, seed, AKE, distillation) is refused with a
  :class:`~unikd.errors.ResumeError` naming each key: the restored weights, optimiser and scheduler states
  were made under the old values, which would silently stay in force.

The checkpoint's other meta (``num_classes``, ``category_ids``, the teacher's fingerprint) must match too.
"""
from __future__ import annotations

from typing import Any

from .. import config as C
from ..errors import ResumeError

APPLIED = frozenset({
    "name", "data.root", "data.workers", "train.max_iters", "train.eval_every", "train.log_every",
    "train.threads", "train.tensorboard", "train.device", "train.keep_checkpoints", "train.grad_clip",
})


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two config dicts: ``{key: (old, new)}``."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_resume(path, old_meta: dict, new_meta: dict) -> dict[str, tuple[Any, Any]]:
    """Raise a ResumeError naming each refused difference between a checkpoint's meta and the job's; return
    the applied config changes ``{key: (old, new)}``."""
    changes = {}
    if "config" in old_meta and "config" in new_meta:
        changes = config_changes(_with_defaults(old_meta["config"]), new_meta["config"])
    refused = {k: v for k, v in changes.items() if k not in APPLIED}
    for key in sorted(old_meta.keys() - {"config", "resumed"}):  # keys added since the checkpoint: not compared
        if old_meta.get(key) != new_meta.get(key):
            refused[key] = (old_meta.get(key), new_meta.get(key))
    if refused:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in ((k, *v) for k, v in refused.items()))
        raise ResumeError(f"cannot resume from {path}: this job differs from the run that wrote it in {listed}. "
                          "Those must stay as they were (only " + ", ".join(sorted(APPLIED)) + " may change on "
                          "resume); start a new run with another --out or with --overwrite")
    return {k: v for k, v in changes.items() if k in APPLIED}


def _with_defaults(values: dict) -> dict:
    """A stored config with the keys added since it was written set to their defaults (as loading it would)."""
    try:
        return C.to_dict(C.from_dict(values))
    except C.ConfigError:
        return values


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
