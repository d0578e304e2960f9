"""Process-group helpers for runs launched by ``torchrun`` (DDP). A plain ``python`` run is world size 1."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import UserError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> torch.device:
    """Pick the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group.

    ``device`` is ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun each process
    takes ``cuda:LOCAL_RANK`` with the ``nccl`` backend, or the CPU with ``gloo``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device '{device}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for but CUDA is not available")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def barrier() -> None:
    if is_dist():
        dist.barrier()


def gather_objects(obj) -> list:
    """All ranks' ``obj`` in rank order (a one-element list outside DDP)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def sync_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters identical but each rank updates its BatchNorm statistics on its own batch after
    the broadcast at the start of a forward; syncing before a checkpoint or an evaluation makes the model
    the same everywhere.
    """
    if is_dist():
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def mean_over_ranks(value: float, device: torch.device | str) -> torch.Tensor:
    """``value`` averaged over all ranks, as a scalar tensor on ``device`` (``value`` itself outside DDP); at
    least 1, as a loss normaliser (DETR's ``num_boxes``)."""
    out = torch.tensor(float(value), device=device)
    if is_dist():
        dist.all_reduce(out)
        out = out / world_size()
    return out.clamp(min=1)
