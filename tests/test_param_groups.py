"""The trainer's parameter groups (train.lr_mult, train.decay_mult, train.no_decay_norms): which parameters each
group holds, the rate and decay a step really applies, and resumption."""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from unikd.config import ConfigError, DistillConfig, TrainConfig, load_config, to_dict
from unikd.data import CocoDetection, collate
from unikd.detectors import build_detector
from unikd.distill import DistillationModel, build_distiller
from unikd.engine.checkpoint import load_checkpoint, save_atomic
from unikd.engine.param_groups import build_optimizer, param_groups
from unikd.engine.schedule import lr_factor
from unikd.engine.trainer import Trainer
from unikd.errors import ResumeError
from unikd.transformer.msda import MSDeformAttn

from conftest import tiny_config

DIGITS = Path(__file__).parents[1] / "configs" / "digits"


def group_of(groups: list[dict]) -> dict[int, dict]:
    """``{id(parameter): its group}``; fails if a parameter is in two groups."""
    found = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in found, "a parameter in two groups"
            found[id(p)] = group
    return found


def factors_by_name(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    """``{name: (lr, weight_decay)}`` of every parameter the groups hold, named by an independent walk."""
    found = group_of(groups)
    return {n: (found[id(p)]["lr"], found[id(p)]["weight_decay"])
            for n, p in model.named_parameters() if id(p) in found}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8), body=nn.Sequential(nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8)),
        frozen=nn.Linear(8, 8), head=nn.Linear(8, 4), ln=nn.LayerNorm(4)))
    net.frozen.requires_grad_(False)
    return net


def test_groups_hold_each_parameter_once_at_its_factors():
    cfg = TrainConfig(lr=0.1, weight_decay=0.01, lr_mult={r"^body\.": 0.5, r"head\.bias": 2.0},
                      decay_mult={r"\.bias$": 0.0}, no_decay_norms=True)
    net = small_net()
    groups = param_groups(net, cfg)
    assert factors_by_name(net, groups) == {
        "stem.weight": (0.1, 0.01), "stem.bias": (0.1, 0.0), "bn.weight": (0.1, 0.0), "bn.bias": (0.1, 0.0),
        "body.0.weight": (0.05, 0.01), "body.0.bias": (0.05, 0.0), "body.1.weight": (0.05, 0.0),
        "body.1.bias": (0.05, 0.0), "head.weight": (0.1, 0.01), "head.bias": (0.2, 0.0), "ln.weight": (0.1, 0.0),
        "ln.bias": (0.1, 0.0)}  # frozen.* is in no group
    assert [(g["lr_mult"], g["decay_mult"], len(g["params"])) for g in groups] == [
        (1.0, 1.0, 2), (1.0, 0.0, 5), (0.5, 1.0, 1), (0.5, 0.0, 3), (2.0, 0.0, 1)]  # by first parameter


def test_norms_decay_unless_asked_and_no_keys_make_one_group():
    net = small_net()
    with_norms = factors_by_name(net, param_groups(net, TrainConfig(lr=0.1, weight_decay=0.01,
                                                                     decay_mult={r"\.bias$": 0.0})))
    assert with_norms["bn.weight"] == with_norms["ln.weight"] == with_norms["body.1.weight"] == (0.1, 0.01)
    (group,) = param_groups(net, TrainConfig(lr=0.1, weight_decay=0.01))
    assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters() if p.requires_grad]
    assert (group["lr"], group["weight_decay"], group["lr_mult"], group["decay_mult"]) == (0.1, 0.01, 1.0, 1.0)


def test_a_norm_that_is_the_whole_model_is_a_norm():
    (group,) = param_groups(nn.GroupNorm(2, 4), TrainConfig(weight_decay=0.01, no_decay_norms=True))
    assert (len(group["params"]), group["weight_decay"], group["decay_mult"]) == (2, 0.0, 0.0)


@pytest.mark.parametrize("train, message", [
    (dict(lr_mult={"body": 0.5, "0": 2.0}),
     r"train.lr_mult: parameter body.0.weight matches 2 patterns \('body', '0'\)"),
    (dict(decay_mult={"weight": 0.0, "stem": 0.5}), r"train.decay_mult: parameter stem.weight matches 2 patterns"),
    (dict(lr_mult={"frozen": 0.1}), r"train.lr_mult: 'frozen' matches no trainable parameter"),
    (dict(decay_mult={"neck": 0.0}), r"train.decay_mult: 'neck' matches no trainable parameter.*e.g. stem.weight"),
])
def test_ambiguous_or_unused_patterns_are_errors(train, message):
    with pytest.raises(ConfigError, match=message):
        param_groups(small_net(), TrainConfig(**train))


def test_no_trainable_parameter_and_an_unknown_optimizer_are_errors():
    with pytest.raises(ValueError, match="^the model has no trainable parameters$"):
        param_groups(small_net().requires_grad_(False), TrainConfig())
    with pytest.raises(ConfigError, match=r"train.optimizer: unknown optimizer 'adam' \(choose sgd or adamw\)"):
        build_optimizer(small_net(), TrainConfig(optimizer="adam"))


def test_config_checks_the_mappings():
    with pytest.raises(ConfigError, match=r"train.lr_mult\['body'\]: 0.0 is out of range"):
        load_config(None, ["train.lr_mult={body: 0}"])
    with pytest.raises(ConfigError, match=r"train.decay_mult\['x'\]: expected a number"):
        load_config(None, ["train.decay_mult={x: no}"])
    with pytest.raises(ConfigError, match=r"train.lr_mult: '\(' is not a regular expression"):
        load_config(None, ["train.lr_mult={'(': 0.5}"])
    assert load_config(None, ["train.lr_mult.backbone=0.1"]).train.lr_mult == {"backbone": 0.1}


def detr_low_lr(detector) -> set[int]:
    """The parameters Deformable DETR trains at 0.1x, found by module (not by name): the backbone's trunk, every
    deformable attention's sampling offsets and the reference-point layer."""
    low = {id(p) for p in detector.model.backbone.body.parameters()}
    low |= {id(p) for m in detector.modules() if isinstance(m, MSDeformAttn) for p in m.sampling_offsets.parameters()}
    return low | {id(p) for p in detector.model.reference_point.parameters()}


@pytest.mark.parametrize("name", ["deformable_detr_r18_student", "deformable_detr_r50_teacher"])
def test_deformable_detr_configs_train_the_papers_layers_at_a_tenth(name):
    cfg = load_config(DIGITS / f"{name}.yaml")
    torch.manual_seed(0)
    detector = build_detector(cfg.model, num_classes=10)
    low, found = detr_low_lr(detector), group_of(param_groups(detector, cfg.train))
    assert found.keys() == {id(p) for p in detector.parameters()}
    for p in detector.parameters():
        assert found[id(p)]["lr"] == pytest.approx(cfg.train.lr * (0.1 if id(p) in low else 1.0))
        assert found[id(p)]["weight_decay"] == cfg.train.weight_decay
    assert 0 < len(low) < len(found)


def test_in_a_distillation_the_students_groups_are_its_own_and_phi_trains_at_the_base_rate(tiny_digits):
    """RetinaNet -> Deformable DETR: the DETR student's layers keep their 0.1x under the ``student.`` prefix; the
    FitNet adaptor φ, which has deformable attention of its own, trains at the base rate as for every student."""
    cfg = load_config(DIGITS / "deformable_detr_r18_student.yaml")
    torch.manual_seed(0)
    student = build_detector(cfg.model, num_classes=10)
    teacher = build_detector(tiny_config(tiny_digits).model, num_classes=10)
    distiller = build_distiller("fitnet", DistillConfig(), student, teacher, teacher_rms=torch.ones(5))
    model = DistillationModel(student, teacher, distiller)
    low, found = detr_low_lr(student), group_of(param_groups(model, cfg.train))
    assert found.keys() == {id(p) for p in model.parameters()}
    assert any(isinstance(m, MSDeformAttn) for m in distiller.modules())
    for p in model.parameters():
        assert found[id(p)]["lr"] == pytest.approx(cfg.train.lr * (0.1 if id(p) in low else 1.0))


def norm_params_by_shape(model: nn.Module) -> set[str]:
    """Names of normalisation parameters told by shape alone: ``X.weight`` and ``X.bias`` where ``X.weight`` is
    1-d (a convolution's or linear layer's weight has 2 or more dimensions)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return {n for n in shapes if n.rsplit(".", 1)[-1] in ("weight", "bias")
            and len(shapes.get(n.rsplit(".", 1)[0] + ".weight", ())) == 1}


@pytest.mark.parametrize("name, also_exempt", [
    ("retinanet_convnext_t_teacher", lambda n: n.endswith((".bias", "layer_scale"))),  # ConvNeXt: 1-d or bias
    ("retinanet_swin_t_teacher", lambda n: n.endswith("relative_position_bias_table")),
])
def test_convnext_and_swin_teachers_exempt_norms_and_their_papers_parameters_from_decay(name, also_exempt):
    cfg = load_config(DIGITS / f"{name}.yaml")
    detector = build_detector(cfg.model, num_classes=10)
    exempt = norm_params_by_shape(detector) | {n for n, _ in detector.named_parameters() if also_exempt(n)}
    decay = factors_by_name(detector, param_groups(detector, cfg.train))
    assert decay.keys() == {n for n, _ in detector.named_parameters()}
    assert {n for n, (_, wd) in decay.items() if wd == 0} == exempt
    assert {wd for n, (_, wd) in decay.items() if wd} == {cfg.train.weight_decay} == {0.05}
    assert any("body" in n for n in exempt) and any("head" in n for n in exempt)  # the trunk's norms, the head's GN


GROUPS = dict(lr_mult={r"\.body\.": 0.5}, decay_mult={r"\.fpn\.": 0.0}, no_decay_norms=True)


def expected_factors(name: str, shape_norms: set[str]) -> tuple[float, float]:
    return (0.5 if ".body." in name else 1.0), (0.0 if ".fpn." in name or name in shape_norms else 1.0)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_one_step_applies_each_parameters_rate_and_decay(tiny_digits, tmp_path, optimizer):
    """After one step every parameter moved as the optimiser's update rule says at lr × lr_mult and weight_decay ×
    decay_mult (no warm-up, no clipping): AdamW's first step is ``p (1 - lr wd) - lr g / (|g| + eps)``, SGD's
    ``p - lr (g + wd p)``."""
    lr, wd = 0.01, 0.2
    cfg = tiny_config(tiny_digits, optimizer=optimizer, lr=lr, weight_decay=wd, warmup_iters=0, grad_clip=0.0,
                      max_iters=1, epochs=1, **GROUPS)
    torch.manual_seed(0)
    train_set = CocoDetection(cfg.data.root, "train", cfg.data.size, hflip=0.0)
    detector = build_detector(cfg.model, train_set.num_classes)
    before = {n: p.detach().clone() for n, p in detector.named_parameters()}
    trainer = Trainer(detector, train_set, collate, cfg.train, batch_size=4, out_dir=tmp_path)
    trainer.fit()
    norms = norm_params_by_shape(detector)
    if optimizer == "sgd":  # a first step is the same with or without momentum: check that it is there
        assert {g["momentum"] for g in trainer.optimizer.param_groups} == {cfg.train.momentum} == {0.9}
    assert norms and any(".body." in n for n in before) and any(".fpn." in n for n in before)
    for name, p in detector.named_parameters():
        lr_mult, decay_mult = expected_factors(name, norms)
        p0, g, a, d = before[name], p.grad, lr * lr_mult, wd * decay_mult
        expected = p0 * (1 - a * d) - a * g / (g.abs() + 1e-8) if optimizer == "adamw" else p0 - a * (g + d * p0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    # The logged rate is train.lr under the schedule, though the first group (the trunk's) runs at half of it.
    assert trainer.optimizer.param_groups[0]["lr_mult"] == 0.5
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    c = cfg.train
    assert record["lr"] == pytest.approx(lr * lr_factor(1, trainer.total_iters, 0, c.warmup_factor, c.lr_steps,
                                                        c.lr_gamma)) == pytest.approx(lr * 0.1)


def make(cfg, out):
    torch.manual_seed(cfg.train.seed)
    train_set = CocoDetection(cfg.data.root, "train", cfg.data.size, hflip=cfg.data.hflip, seed=cfg.train.seed)
    return Trainer(build_detector(cfg.model, train_set.num_classes), train_set, collate, cfg.train,
                   batch_size=cfg.data.batch_size, out_dir=out, meta={"config": to_dict(cfg)})


def test_resume_keeps_the_groups(tiny_digits, tmp_path):
    cfg = tiny_config(tiny_digits, epochs=2, lr_steps=[0.5], optimizer="adamw", weight_decay=0.1, **GROUPS)
    straight = make(cfg, tmp_path / "straight")
    straight.fit()
    first = make(cfg, tmp_path / "split")
    first.cfg.max_iters = first.iters_per_epoch
    first.fit()
    resumed = make(tiny_config(tiny_digits, epochs=2, lr_steps=[0.5], optimizer="adamw", weight_decay=0.1, **GROUPS),
                   tmp_path / "split")
    resumed.resume(tmp_path / "split" / "last.pt")
    keys = ("lr", "initial_lr", "weight_decay", "lr_mult", "decay_mult")
    assert len(resumed.optimizer.param_groups) == 4
    assert [[g[k] for k in keys] for g in resumed.optimizer.param_groups] == [
        [g[k] for k in keys] for g in first.optimizer.param_groups]
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    other = tiny_config(tiny_digits, epochs=2, lr_steps=[0.5], optimizer="adamw", weight_decay=0.1,
                        **{**GROUPS, "lr_mult": {r"\.body\.": 0.25}})
    with pytest.raises(ResumeError, match=r"train.lr_mult.\\.body\\.: 0.5 -> 0.25"):
        make(other, tmp_path / "split").resume(tmp_path / "split" / "last.pt")


def test_a_checkpoint_from_before_the_groups_resumes(tiny_digits, tmp_path):
    """A checkpoint written before the three keys existed (its config lacks them, its one optimiser group has no
    factors) resumes under the defaults and trains on."""
    cfg = tiny_config(tiny_digits, epochs=2)
    first = make(cfg, tmp_path)
    first.cfg.max_iters = first.iters_per_epoch
    first.fit()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for key in ("lr_mult", "decay_mult", "no_decay_norms"):
        del ckpt["meta"]["config"]["train"][key]
    for group in ckpt["optimizer"]["param_groups"]:
        del group["lr_mult"], group["decay_mult"]
    save_atomic(ckpt, tmp_path / "old.pt")
    resumed = make(tiny_config(tiny_digits, epochs=2), tmp_path)
    resumed.resume(tmp_path / "old.pt")
    resumed.fit()
    assert resumed.state.step == 2 * first.iters_per_epoch
