"""Process-group helpers under a real 2-process gloo group."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unikd.engine import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mean_worker(rank: int, port: int, values: list[float], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(values))
    try:
        torch.save(D.mean_over_ranks(values[rank], "cpu"), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_box_counts_are_averaged_over_ranks(tmp_path):
    """Stage 1 normalises by the number of boxes averaged over the ranks (DETR's num_boxes): 3 and 8 give
    5.5 on both; outside DDP the value itself, at least 1."""
    mp.spawn(_mean_worker, args=(_free_port(), [3.0, 8.0], str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"rank{r}.pt").item() for r in range(2)] == [5.5, 5.5]
    assert D.mean_over_ranks(7, "cpu").item() == 7.0
    assert D.mean_over_ranks(0, "cpu").item() == 1.0
