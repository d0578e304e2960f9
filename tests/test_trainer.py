import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unikd.data import CocoDetection, collate
from unikd.detectors import build_detector
from unikd.engine.checkpoint import load_checkpoint
from unikd.engine.trainer import EpochSampler, Trainer

from conftest import tiny_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def make_trainer(cfg, out_dir):
    torch.manual_seed(cfg.train.seed)
    train_set = CocoDetection(cfg.data.root, "train", cfg.data.size, hflip=cfg.data.hflip, seed=cfg.train.seed)
    detector = build_detector(cfg.model, train_set.num_classes)
    return Trainer(detector, train_set, collate, cfg.train, batch_size=cfg.data.batch_size, out_dir=out_dir)


def test_epoch_sampler_is_a_seeded_partition_across_ranks():
    parts = [list(EpochSampler(10, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 5
    assert sorted(parts[0] + parts[1]) == list(range(10))
    assert parts[0] == list(EpochSampler(10, seed=3, epoch=1, rank=0, world=2))
    assert list(EpochSampler(10, seed=3, epoch=2)) != list(EpochSampler(10, seed=3, epoch=1))
    assert list(EpochSampler(10, seed=3, epoch=1, start=4)) == list(EpochSampler(10, seed=3, epoch=1))[4:]
    padded = [list(EpochSampler(5, seed=0, epoch=0, rank=r, world=2)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 3 and set(padded[0] + padded[1]) == set(range(5))


def test_one_epoch_plus_resume_equals_two_epochs(tiny_digits, tmp_path):
    cfg = tiny_config(tiny_digits, epochs=2, lr_steps=[0.5])  # the lr step falls in the resumed epoch
    straight = make_trainer(cfg, tmp_path / "straight")
    straight.fit()

    first = make_trainer(cfg, tmp_path / "split")
    first.cfg.max_iters = first.iters_per_epoch
    first.fit()
    ckpt = load_checkpoint(tmp_path / "split" / "last.pt")
    state = ckpt["train_state"]
    assert (state["epoch"], state["iter_in_epoch"], state["step"]) == (1, 0, first.iters_per_epoch)
    assert state["train_seconds"] > 0

    cfg_resumed = tiny_config(tiny_digits, epochs=2, lr_steps=[0.5])
    resumed = make_trainer(cfg_resumed, tmp_path / "split")
    resumed.resume(tmp_path / "split" / "last.pt")
    resumed.fit()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = make_trainer(cfg, tmp_path / "unused").model.state_dict()
    assert any(not torch.equal(start[k], a[k]) for k in a)  # training did change the weights
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * first.iters_per_epoch + 1))
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == [
        f"step_{first.iters_per_epoch:08d}.pt", f"step_{2 * first.iters_per_epoch:08d}.pt"]


def test_non_finite_loss_stops_with_a_clear_error(tiny_digits, tmp_path):
    trainer = make_trainer(tiny_config(tiny_digits, lr=1e6, grad_clip=0.0, warmup_iters=0, max_iters=6),
                           tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite loss at step"):
        trainer.fit()


def test_ddp_two_cpu_processes_end_identical_and_only_rank0_writes(tiny_digits, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(tiny_digits), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p0 = torch.load(tmp_path / "params_rank0.pt")
    p1 = torch.load(tmp_path / "params_rank1.pt")
    start = torch.load(tmp_path / "params_start_rank0.pt")
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    assert any(not torch.equal(p0[k], start[k]) for k in p0)
    assert (tmp_path / "out_rank0" / "last.pt").exists()
    lines = (tmp_path / "out_rank0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
    assert not (tmp_path / "out_rank1").exists()
