"""Copies of small host-made tensors (shapes, sizes, sampled boxes) to the device without waiting for it."""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t``, a CPU tensor, on ``device``. On CUDA it goes through pinned memory with a non-blocking copy, so
    the host does not wait for the device's queue to drain (a blocking copy does, and so does a non-blocking
    one from pageable memory); on any other device it is a plain ``.to``."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
