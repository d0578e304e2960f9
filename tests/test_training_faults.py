"""The trainer never saves a non-finite model, keeps what it is told to, cleans up after kills, writes each
metrics step once, and refuses a resume under other settings (naming them) while applying the harmless ones."""
import errno
import json
import os

import pytest
import torch
from torch import nn

from unikd.config import to_dict
from unikd.data import CocoDetection, collate
from unikd.engine import checkpoint as checkpoint_module
from unikd.engine.checkpoint import load_checkpoint, save_atomic
from unikd.engine.trainer import Trainer
from unikd.errors import DivergedError, OutputError, ResumeError

from conftest import tiny_config


class Drift(nn.Module):
    """A real three-weight regression on the images' mean grey level; at forward call ``bad_call`` it makes
    its loss NaN (``poison="loss"``) or its buffer NaN with a finite loss (``poison="buffer"``)."""

    def __init__(self, bad_call: int = 0, poison: str = "loss", width: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(width))
        self.register_buffer("running", torch.zeros(()))
        self.bad_call, self.poison, self.calls = bad_call, poison, 0

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        self.calls += 1
        grey = torch.stack([im.mean() for im in images]).mean()
        loss = ((self.w - grey) ** 2).sum()
        if self.calls == self.bad_call and self.poison == "loss":
            loss = loss * float("nan")
        if self.calls == self.bad_call and self.poison == "buffer":
            self.running.fill_(float("nan"))
        return {"loss_fit": loss}


def trainer(tiny_digits, out, model=None, config=None, **train):
    cfg = config or tiny_config(tiny_digits, **{"epochs": 4, "log_every": 100, "warmup_iters": 0, **train})
    data = CocoDetection(tiny_digits, "train", 64)  # 8 images, batch 4: 2 steps an epoch
    return Trainer(model or Drift(), data, collate, cfg.train, batch_size=4, out_dir=out,
                   meta={"config": to_dict(cfg)})


def steps_saved(out):
    return sorted(int(p.stem[5:]) for p in (out / "checkpoints").glob("step_*.pt"))


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_digits, tmp_path):
    t = trainer(tiny_digits, tmp_path, Drift(bad_call=3), max_iters=5)
    with pytest.raises(DivergedError, match=rf"non-finite loss at step 3; the run stopped, {tmp_path / 'last.pt'} "
                                            "is the last good checkpoint"):
        t.fit()
    assert t.state.step == 3  # on the CPU the on-device flag is read after every step
    assert steps_saved(tmp_path) == [2] and os.readlink(tmp_path / "last.pt") == "checkpoints/step_00000002.pt"


def test_on_a_gpu_schedule_the_flag_is_read_before_saving(tiny_digits, tmp_path):
    t = trainer(tiny_digits, tmp_path, Drift(bad_call=5), max_iters=5)  # --max-iters stops between log steps
    t.check_every_step = False  # as on a GPU: no host sync per step
    with pytest.raises(DivergedError, match="non-finite loss at step 5;"):
        t.fit()
    assert steps_saved(tmp_path) == [2, 4]  # the NaN weights of step 5 were not saved, nor evaluated


def test_non_finite_weights_are_never_saved(tiny_digits, tmp_path):
    t = trainer(tiny_digits, tmp_path, Drift(bad_call=3, poison="buffer"))
    with pytest.raises(DivergedError, match=r"1 weight tensor\(s\) are not finite at step 4 \(first: running\)"):
        t.fit()
    assert steps_saved(tmp_path) == [2]


def test_a_diverged_run_is_one_line_with_exit_2(tiny_digits, tmp_path, capsys):
    import yaml

    from unikd import cli

    cfg = tiny_config(tiny_digits, lr=1e6, grad_clip=0.0, warmup_iters=0, momentum=0.0)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run"), "--max-iters", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # above the error line only the progress bar
    assert err.strip().splitlines()[-1].startswith("unikd: error: non-finite loss at step "), err


@pytest.mark.parametrize("keep, expected", [(1, [6, 8]), (0, [8]), (2, [4, 6, 8])])
def test_keep_checkpoints(tiny_digits, tmp_path, keep, expected):
    trainer(tiny_digits, tmp_path, keep_checkpoints=keep).fit()
    assert steps_saved(tmp_path) == expected
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["step"] == 8


def test_stale_temporaries_are_removed_at_start(tiny_digits, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / "step_00000002.ptx1y2z3.tmp", tmp_path / "ake.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    (tmp_path / ".last.pt.tmp").symlink_to("checkpoints/gone.pt")
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    trainer(tiny_digits, tmp_path, epochs=1).fit()
    assert not any(p.exists() for p in stale) and not (tmp_path / ".last.pt.tmp").is_symlink()
    assert keep.read_text() == "mine" and steps_saved(tmp_path) == [2]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_atomic({"model": {}}, tmp_path / "x.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "x.pt").stat().st_mode & 0o777 == mode


def test_a_full_disk_is_an_output_error_naming_the_file(tmp_path, monkeypatch):
    def full(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'x.pt'}: No space left on device"):
        save_atomic({"model": {}}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_metrics_hold_each_step_once_after_a_resume(tiny_digits, tmp_path):
    trainer(tiny_digits, tmp_path, epochs=2, log_every=1, max_iters=3).fit()
    (tmp_path / "checkpoints" / "step_00000003.pt").unlink()  # killed after logging step 3, before saving it
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last.pt").symlink_to("checkpoints/step_00000002.pt")
    t = trainer(tiny_digits, tmp_path, epochs=2, log_every=1)
    t.resume(tmp_path / "last.pt")
    t.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_other_settings_naming_each(tiny_digits, tmp_path):
    trainer(tiny_digits, tmp_path, epochs=2, max_iters=2).fit()
    for change, named in [({"lr": 0.5}, "train.lr: 0.01 -> 0.5"), ({"optimizer": "adamw"}, "train.optimizer"),
                          ({"epochs": 3}, "train.epochs: 2 -> 3"), ({"seed": 4}, "train.seed")]:
        with pytest.raises(ResumeError, match=f"cannot resume from .*last.pt: .*{named}"):
            trainer(tiny_digits, tmp_path, **{"epochs": 2, **change}).resume(tmp_path / "last.pt")
    other = tiny_config(tiny_digits, epochs=2, log_every=100, warmup_iters=0)
    other.model.family = "fcos"
    with pytest.raises(ResumeError, match="model.family: 'retinanet' -> 'fcos'"):
        trainer(tiny_digits, tmp_path, config=other).resume(tmp_path / "last.pt")


def test_resume_applies_and_records_the_harmless_changes(tiny_digits, tmp_path):
    trainer(tiny_digits, tmp_path, epochs=2, max_iters=2).fit()
    t = trainer(tiny_digits, tmp_path, epochs=2, threads=2, log_every=7)
    t.resume(tmp_path / "last.pt")
    assert t.meta["resumed"] == [{"step": 2, "changes": {"train.log_every": [100, 7], "train.max_iters": [2, 0],
                                                          "train.threads": [1, 2]}}]
    t.fit()
    meta = load_checkpoint(tmp_path / "last.pt")["meta"]
    assert meta["config"]["train"]["log_every"] == 7 and meta["resumed"] == t.meta["resumed"]


def test_resume_into_another_model_is_a_resume_error(tiny_digits, tmp_path):
    trainer(tiny_digits, tmp_path, epochs=2, max_iters=2).fit()
    with pytest.raises(ResumeError, match="holds another model or optimiser"):
        trainer(tiny_digits, tmp_path, Drift(width=4), epochs=2).resume(tmp_path / "last.pt")


def test_a_metrics_file_that_cannot_be_written_is_an_output_error(tiny_digits, tmp_path):
    t = trainer(tiny_digits, tmp_path, epochs=1, log_every=1)
    (tmp_path / "metrics.jsonl").mkdir()  # in the way: open() fails as on a full or read-only disk
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'metrics.jsonl'}"):
        t.fit()
