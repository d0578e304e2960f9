"""Run by tests/test_trainer.py under torchrun: 3 DDP iterations on CPU, then save this rank's weights.

Each rank is given its own output folder so that the test can see which ranks wrote anything.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_config  # noqa: E402
from unikd.data import CocoDetection, collate  # noqa: E402
from unikd.detectors import build_detector  # noqa: E402
from unikd.engine import distributed as D  # noqa: E402
from unikd.engine.trainer import Trainer  # noqa: E402

root, base = Path(sys.argv[1]), Path(sys.argv[2])
device = D.init_from_env("cpu")
cfg = tiny_config(root, epochs=4, max_iters=3)
cfg.data.batch_size = 2
torch.manual_seed(D.rank() + 1)  # different on each rank: DDP must broadcast rank 0's initial weights
train_set = CocoDetection(root, "train", cfg.data.size, hflip=cfg.data.hflip, seed=0)
detector = build_detector(cfg.model, train_set.num_classes)
trainer = Trainer(detector, train_set, collate, cfg.train, batch_size=cfg.data.batch_size,
                  out_dir=base / f"out_rank{D.rank()}", device=device)
if D.is_main():
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, base / "params_start_rank0.pt")
trainer.fit()
torch.save(trainer.model.state_dict(), base / f"params_rank{D.rank()}.pt")
D.shutdown()
