"""Learning-rate schedule by iteration: linear warm-up, then steps of ``gamma`` at fractions of the run."""
from __future__ import annotations

import bisect

import torch


def lr_factor(step: int, total: int, warmup_iters: int, warmup_factor: float,
              steps: list[float], gamma: float) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based) of ``total``.

    Warm-up rises linearly from ``warmup_factor`` to 1 over ``warmup_iters``; after that the rate is
    multiplied by ``gamma`` at each milestone ``round(f * total)`` for ``f`` in ``steps`` (the 1x schedule:
    12 epochs, steps at 8/12 and 11/12).
    """
    milestones = sorted(round(f * total) for f in steps)
    factor = gamma ** bisect.bisect_right(milestones, step)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler for ``total`` iterations from a :class:`~unikd.config.TrainConfig`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total, cfg.warmup_iters, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma),
    )
