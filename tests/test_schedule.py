import pytest
import torch

from unikd.config import TrainConfig
from unikd.engine.schedule import build_scheduler, lr_factor


def test_warmup_then_steps_at_8_and_11_of_12():
    total = 120
    f = [lr_factor(s, total, warmup_iters=10, warmup_factor=0.001, steps=[8 / 12, 11 / 12], gamma=0.1)
         for s in range(total)]
    assert f[0] == pytest.approx(0.001)
    assert f[5] == pytest.approx(0.001 * 0.5 + 0.5)
    assert f[10] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(0.1) and f[109] == pytest.approx(0.1)
    assert f[110] == pytest.approx(0.01) and f[119] == pytest.approx(0.01)


def test_scheduler_drives_the_optimizer_per_iteration():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    cfg = TrainConfig(warmup_iters=2, warmup_factor=0.5, lr_steps=[0.5], lr_gamma=0.1)
    sched = build_scheduler(opt, total=4, cfg=cfg)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.375, 0.05, 0.05])
