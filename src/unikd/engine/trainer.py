"""One training loop for every stage: teacher/student training, AKE pretraining, distillation.

The trainer knows neither detectors nor distillers. It is given a ``model`` (an ``nn.Module`` whose
``forward(images, targets)`` returns a dict of losses, or a tuple whose first element is that dict), a
training dataset, and optionally an ``evaluate`` callback. It owns the optimiser, the schedule, mixed
precision, clipping, DDP, checkpoints, ``--resume``, progress and metrics.

Exact resumption: the data order and augmentation depend only on ``(seed, epoch)``, the global RNG is
re-seeded from ``(seed, epoch, rank)`` at the start of every epoch, and the checkpoint carries the optimiser,
scheduler and scaler states, so 1 epoch + resume 1 epoch gives the same weights as 2 epochs. A resume
refuses a checkpoint made under other settings (:mod:`unikd.engine.resume`) and drops the metrics records
the interrupted run wrote after that checkpoint, so ``metrics.jsonl`` holds each step once.

Nothing non-finite is saved: every step adds ``isfinite(loss)`` to an on-device flag (no host sync), read
after every step on the CPU and at log steps on a GPU; the weights are checked before every checkpoint and
evaluation. Either failure raises :class:`~unikd.errors.DivergedError` and leaves ``last.pt`` at the last
good checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..errors import DivergedError, ResumeError, UserError
from . import distributed as D
from .checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint, write_text
from .param_groups import build_optimizer
from .resume import check_resume
from .progress import progress
from .schedule import build_scheduler

log = logging.getLogger(__name__)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices of one epoch for one rank: a permutation seeded by ``(seed, epoch)``, split across ranks.

    ``start`` skips the first ``start`` indices of this rank (a run resumed in the middle of an epoch).
    The permutation is padded by wrapping so that every rank gets the same number of indices.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, start: int = 0):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, epoch, rank, world
        self.shuffle, self.start = shuffle, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = math.ceil(self.n / self.world)
        order = (order * (per_rank * self.world // max(self.n, 1) + 1))[: per_rank * self.world]
        return order[self.rank :: self.world][self.start :]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    iter_in_epoch: int = 0  # iterations done in the epoch in progress (mid-epoch stop)
    step: int = 0  # iterations done in all
    train_seconds: float = 0.0  # wall time spent in training iterations, summed over resumed runs


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


class Trainer:
    """Train ``model`` on ``dataset`` under ``cfg``; write checkpoints, metrics and evaluations to ``out_dir``.

    Args:
        model: returns a loss dict (or ``(loss_dict, ...)``) from ``model(images, targets)``. Only parameters
            with ``requires_grad`` are optimised, in the groups of :mod:`unikd.engine.param_groups`.
        dataset: yields ``(image, target)``; may have ``set_epoch(epoch)`` (deterministic augmentation).
        collate_fn: batches a list of samples into ``(images, targets)``.
        cfg: the schedule (:class:`~unikd.config.TrainConfig`).
        batch_size, workers: per-process batch size and DataLoader workers.
        out_dir: where rank 0 writes ``checkpoints/``, ``last.pt``, ``metrics.jsonl``, ``eval.json``.
        evaluate: ``evaluate(model) -> dict`` of metrics, called on every rank (it may shard the work).
        meta: plain values stored in every checkpoint (config, class names...).
        device: the device from :func:`unikd.engine.distributed.init_from_env`.
    """

    def __init__(self, model: nn.Module, dataset, collate_fn, cfg: TrainConfig, *, batch_size: int,
                 out_dir: str | Path, workers: int = 0, evaluate: Callable[[nn.Module], dict] | None = None,
                 meta: dict | None = None, device: torch.device | None = None):
        self.cfg, self.dataset, self.collate_fn = cfg, dataset, collate_fn
        self.batch_size, self.workers = batch_size, workers
        self.out_dir = Path(out_dir)
        self.evaluate_fn, self.meta = evaluate, meta or {}
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device)
        if D.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.wrapped = self.model
        self.optimizer = build_optimizer(self.model, cfg)
        self.iters_per_epoch = len(self._loader(0))
        if self.iters_per_epoch == 0:
            source = getattr(self.dataset, "ann_file", None)
            raise UserError(f"the training set{f' ({source})' if source else ''} gives no batch: it is empty")
        self.total_iters = cfg.epochs * self.iters_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.total_iters, cfg)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.state = TrainState()
        self._tb = None
        self._first_bad_step = torch.zeros((), dtype=torch.int64, device=self.device)  # 0: every loss finite
        self.check_every_step = self.device.type == "cpu"  # read the flag every step where that costs nothing

    # ----------------------------------------------------------------- data
    def _loader(self, epoch: int, start: int = 0) -> torch.utils.data.DataLoader:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        sampler = EpochSampler(len(self.dataset), self.cfg.seed, epoch, D.rank(), D.world_size(),
                               start=start * self.batch_size)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                           num_workers=self.workers, collate_fn=self.collate_fn,
                                           pin_memory=self.device.type == "cuda")

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": vars(self.state).copy(),
            "meta": self.meta,
        }

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by this trainer (the same schedule, exactly).

        Settings that differ from the checkpoint's are refused or applied as :mod:`unikd.engine.resume` says;
        the applied ones are logged and added to ``meta["resumed"]``.
        """
        ckpt = load_checkpoint(path, map_location=self.device)
        applied = check_resume(path, ckpt["meta"], self.meta)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ResumeError(f"cannot resume from {path}: it holds another model or optimiser than this job's "
                              f"({' '.join(str(err).split())[:300]})") from None
        self.state = TrainState(**ckpt["train_state"])
        self.meta["resumed"] = ckpt["meta"].get("resumed", []) + (
            [{"step": self.state.step, "changes": {k: list(v) for k, v in applied.items()}}] if applied else [])
        for key, (old, new) in applied.items():
            log.info("resume: %s changed from %r to %r, applied from step %d", key, old, new, self.state.step)
        if D.is_main():
            self._drop_metrics_after(self.state.step, evaluated_again=self.state.epoch >= self.cfg.epochs
                                     or self._stop_early())
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    def _drop_metrics_after(self, step: int, evaluated_again: bool) -> None:
        """Remove the records of ``metrics.jsonl`` the interrupted run wrote after ``step`` (and its evaluation
        at ``step`` when the resumed run will evaluate there again), so that no step is recorded twice."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["step"] < step or (record["step"] == step and not ("eval" in record and evaluated_again)):
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def _save(self) -> None:
        self._check_finite()
        D.sync_buffers(self.model)
        if D.is_main():
            save_checkpoint(self.state_dict(), self.out_dir, self.state.step, keep=self.cfg.keep_checkpoints)
        D.barrier()

    def _check_loss_flag(self) -> None:
        """Raise if a loss since the start was non-finite (reads the on-device flag: one host sync)."""
        bad = int(self._first_bad_step.item())
        if bad:
            raise DivergedError(f"non-finite loss at step {bad}; the run stopped, {self._last_good()} "
                                "(lower train.lr, or keep train.grad_clip on)")

    def _check_finite(self) -> None:
        """Raise unless every loss so far and every floating-point weight and buffer is finite."""
        self._check_loss_flag()
        bad = [name for name, t in self.model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise DivergedError(f"{len(bad)} weight tensor(s) are not finite at step {self.state.step} "
                                f"(first: {bad[0]}); the run stopped, {self._last_good()}")

    def _last_good(self) -> str:
        last = self.out_dir / "last.pt"
        return f"{last} is the last good checkpoint" if last.exists() else "no checkpoint was written"

    # --------------------------------------------------------------- logging
    def _log(self, record: dict) -> None:
        if not D.is_main():
            return
        write_text(self.out_dir / "metrics.jsonl", json.dumps(record) + "\n", append=True)
        if self.cfg.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self.out_dir / "tensorboard")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(key, value, record["step"])
            for key, value in record.get("eval", {}).items():
                self._tb.add_scalar(f"eval/{key}", value, record["step"])

    # ------------------------------------------------------------------ loop
    def _train_step(self, images, targets) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.wrapped(images, targets)
        losses = out[0] if isinstance(out, tuple) else out
        loss = sum(losses.values())
        first_bad = torch.where(torch.isfinite(loss.detach()), 0, self.state.step + 1)
        self._first_bad_step = torch.where(self._first_bad_step > 0, self._first_bad_step, first_bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def _base_lr(self) -> float:
        """``train.lr`` under the schedule now (the rate of parameters without an ``lr_mult``)."""
        return self.cfg.lr * self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]

    def _stop_early(self) -> bool:
        return 0 < self.cfg.max_iters <= self.state.step

    def fit(self) -> dict:
        """Run (or continue) the schedule; return the final evaluation (empty without ``evaluate``)."""
        if D.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.out_dir):
                log.info("removed %s, left by an interrupted write", stale)
        cfg, st = self.cfg, self.state
        self.model.train()
        while st.epoch < cfg.epochs and not self._stop_early():
            torch.manual_seed(cfg.seed * 100_003 + st.epoch * 1_009 + D.rank())
            loader = self._loader(st.epoch, start=st.iter_in_epoch)
            bar = progress(loader, desc=f"epoch {st.epoch + 1}/{cfg.epochs}", initial=st.iter_in_epoch,
                           total=self.iters_per_epoch)
            tic, seen, seconds_before = time.perf_counter(), 0, st.train_seconds
            for images, targets in bar:
                images, targets = _to_device(images, targets, self.device)
                losses = self._train_step(images, targets)
                st.train_seconds = seconds_before + time.perf_counter() - tic
                st.step += 1
                st.iter_in_epoch += 1
                seen += len(images)
                logging_step = st.step % cfg.log_every == 0 or st.iter_in_epoch == self.iters_per_epoch
                if logging_step or self.check_every_step:
                    self._check_loss_flag()
                if logging_step:
                    values = {k: v.item() for k, v in losses.items()}
                    rate = seen * D.world_size() / (time.perf_counter() - tic)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{self._base_lr():.2e}")
                    self._log({"step": st.step, "epoch": st.epoch + st.iter_in_epoch / self.iters_per_epoch,
                               "lr": self._base_lr(), "images_per_s": rate,
                               "train_seconds": st.train_seconds, **values})
                if self._stop_early():
                    break
            bar.close()
            if st.iter_in_epoch == self.iters_per_epoch:
                st.epoch += 1
                st.iter_in_epoch = 0
            self._save()
            if (cfg.eval_every and st.epoch % cfg.eval_every == 0 and st.epoch < cfg.epochs
                    and self.evaluate_fn is not None and not self._stop_early()):
                self._evaluate()
        return self._evaluate() if self.evaluate_fn is not None else {}

    def _evaluate(self) -> dict:
        self._check_finite()
        self.model.eval()
        metrics = self.evaluate_fn(self.model)
        self.model.train()
        self._log({"step": self.state.step, "epoch": self.state.epoch, "eval": metrics})
        if D.is_main():
            write_text(self.out_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
        return metrics
