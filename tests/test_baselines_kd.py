"""The FGD, MGD and PKD baselines (issue 13 item 2): each loss against a computation from the paper's formula,
their invariants, per-image losses, where the gradients go, and one step of each through the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from unikd import cli
from unikd.config import DistillConfig
from unikd.distill import FGD, METHODS, MGD, PKD, FitNet, Levels
from unikd.distill.fgd import scale_masks
from unikd.pyramid import Pyramid

from conftest import teacher_and_student
from test_distill import STUDENT_STRIDES, TEACHER_STRIDES, crop, random_pyramid

SMALL = dict(adaptor_heads=2, adaptor_points=2)
SIZES = [(40, 64), (64, 48)]  # (h, w): a landscape and a portrait image, padded together to 64×64
TARGETS = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 38.0], [20.0, 10.0, 60.0, 28.0]])},  # overlapping boxes
           {"boxes": torch.tensor([[10.0, 12.0, 44.0, 58.0]])}]
RMS = torch.tensor([0.5, 2.0])
FEATURE_METHODS = ("fitnet", "fgd", "mgd", "pkd")


def same_grid(method: str, **cfg):
    """A distiller whose student and teacher share strides 8 and 16 (no resampling), projection-only φ, with
    non-trivial weights everywhere (GcBlock's W_v2 starts at zero), and its two random pyramids."""
    torch.manual_seed(0)
    distiller = METHODS[method](Levels([8, 16], [6, 6]), Levels([8, 16], [4, 4]),
                                DistillConfig(**{**SMALL, "adaptor_layers": 0, **cfg}), RMS)
    with torch.no_grad():
        for p in distiller.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return distiller, random_pyramid(SIZES, [8, 16], 4, seed=3), random_pyramid(SIZES, [8, 16], 6, seed=4)


def image_levels(distiller, teacher: Pyramid, student: Pyramid, b: int):
    """Per level, image ``b``'s own cells only (cropped, no masks): (teacher / rms [C, h, w], φ(F_S) [C, h, w],
    stride)."""
    with torch.no_grad():
        adapted = distiller.adaptor(student)
    out = []
    for level, (f_t, f_s, s) in enumerate(zip(teacher.levels, adapted.levels, teacher.strides)):
        h, w = math.ceil(SIZES[b][0] / s), math.ceil(SIZES[b][1] / s)
        out.append((f_t[b, :, :h, :w] / RMS[level], f_s[b, :, :h, :w], s))
    return out


def box_weights(boxes: list[list[float]], h: int, w: int, s: int) -> list[list[float]]:
    """FGD's M·S by its definition, cell by cell: 1 / (the cells of the smallest box holding the cell's centre)."""
    def inside(box, r, c):
        x, y = (c + 0.5) * s, (r + 0.5) * s
        return box[0] <= x <= box[2] and box[1] <= y <= box[3]
    sizes = [sum(inside(box, r, c) for r in range(h) for c in range(w)) for box in boxes]
    return [[max([1 / n for box, n in zip(boxes, sizes) if inside(box, r, c)], default=0.0) for c in range(w)]
            for r in range(h)]


# --------------------------------------------------------------------------- each loss by hand
def test_fgd_is_the_papers_focal_and_global_loss():
    cfg = dict(fgd_alpha=2e-3, fgd_beta=7e-4, fgd_gamma=3e-3, fgd_lambda=5e-2, fgd_temperature=0.7)
    distiller, teacher, student = same_grid("fgd", **cfg)
    loss = distiller.per_image_losses(teacher, student, TARGETS)
    T = cfg["fgd_temperature"]

    def attention(f):  # G_S = HW softmax(mean_c |F| / T), G_C = C softmax(mean_HW |F| / T)
        spatial = f.abs().mean(0).flatten().div(T).softmax(0).view(f.shape[1:]) * f[0].numel()
        return spatial, f.abs().mean((1, 2)).div(T).softmax(0) * len(f)

    def relation(gc, f):  # R(F) = F + W_v2 ReLU(LN(W_v1 Σ_j softmax_j(W_k F_j) F_j))
        flat = f.flatten(1)
        context = flat @ (gc.key.weight.view(-1) @ flat + gc.key.bias).softmax(0)
        first, norm, _, second = gc.transform
        hidden = first.weight @ context + first.bias
        hidden = (hidden - hidden.mean()) / (hidden.var(unbiased=False) + norm.eps).sqrt() * norm.weight + norm.bias
        return f + (second.weight @ hidden.clamp(min=0) + second.bias)[:, None, None]

    for b, target in enumerate(TARGETS):
        feature = attention_loss = global_loss = 0.0
        for level, (f_t, f_s, s) in enumerate(image_levels(distiller, teacher, student, b)):
            (spatial_t, channel_t), (spatial_s, channel_s) = attention(f_t), attention(f_s)
            fg = torch.tensor(box_weights(target["boxes"].tolist(), *f_t.shape[1:], s))
            n_bg = (fg == 0).sum()
            for r in range(f_t.shape[1]):
                for c in range(f_t.shape[2]):
                    weight = cfg["fgd_alpha"] * fg[r, c] if fg[r, c] > 0 else cfg["fgd_beta"] / n_bg
                    error = (channel_t * (f_t[:, r, c] - f_s[:, r, c]) ** 2).sum()
                    feature += weight * spatial_t[r, c] * error
            attention_loss += (spatial_s - spatial_t).abs().sum() + (channel_s - channel_t).abs().sum()
            gc = distiller.relations[level]
            with torch.no_grad():
                global_loss += (relation(gc, f_t) - relation(gc, f_s)).pow(2).sum()
        assert loss["loss_fgd_feature"][b].item() == pytest.approx(feature.item(), rel=1e-4)
        assert loss["loss_fgd_attention"][b].item() == pytest.approx(cfg["fgd_gamma"] * attention_loss.item(),
                                                                     rel=1e-4)
        assert loss["loss_fgd_global"][b].item() == pytest.approx(cfg["fgd_lambda"] * global_loss.item(), rel=1e-4)
    assert all(v.shape == (2,) and (v > 0).all() for v in loss.values())


def test_fgd_scale_masks_weigh_each_box_and_the_background_as_one():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 16.0, 16.0]])},  # the small box in the big
               {"boxes": torch.zeros(0, 4)}]
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[1, 4:] = False  # the second image covers 4 of the 6 rows
    foreground, background = scale_masks(targets, valid, 8)
    assert foreground[0, 0, 0] == 1 / 4 and foreground[0, 3, 3] == 1 / 16  # the smallest box holding the cell
    assert foreground[0].sum() == pytest.approx(1 + 12 / 16) and foreground[1].sum() == 0
    assert background[0].sum() == pytest.approx(1) and (background[0][:4, :4] == 0).all()
    assert background[1].sum() == pytest.approx(1) and (background[1, 4:] == 0).all()
    assert background[1, 0, 0] == pytest.approx(1 / 24)


def test_mgd_generates_the_teacher_from_the_masked_student():
    distiller, teacher, student = same_grid("mgd", mgd_alpha=3e-2, mgd_lambda=0.5)
    gen = torch.Generator().manual_seed(5)
    keeps = [torch.rand(2, 1, *f.shape[-2:], generator=gen) >= 0.5 for f in teacher.levels]
    distiller.random_keep = lambda f: keeps[[k.shape[-2:] for k in keeps].index(f.shape[-2:])]
    loss = distiller.per_image_losses(teacher, student, TARGETS)["loss_mgd"]
    for b in range(2):
        expected = 0.0
        for level, (f_t, f_s, _) in enumerate(image_levels(distiller, teacher, student, b)):
            g = distiller.generators[level]
            keep = keeps[level][b, :, :f_t.shape[1], :f_t.shape[2]]
            with torch.no_grad():  # the image alone: a 3×3 conv with zero padding around its own cells
                hidden = torch.conv2d((f_s * keep)[None], g.conv1.weight, g.conv1.bias, padding=1).clamp(min=0)
                generated = torch.conv2d(hidden, g.conv2.weight, g.conv2.bias, padding=1)[0]
            expected += (generated - f_t).pow(2).sum().item()
        assert loss[b].item() == pytest.approx(3e-2 * expected, rel=1e-4)


def test_mgd_masks_whole_cells_at_ratio_lambda():
    distiller, _, _ = same_grid("mgd", mgd_lambda=0.65)
    keep = distiller.random_keep(torch.zeros(4, 3, 50, 50))
    assert keep.shape == (4, 1, 50, 50) and keep.dtype == torch.bool
    assert 1 - keep.float().mean().item() == pytest.approx(0.65, abs=0.02)


def test_pkd_is_one_minus_the_pearson_correlation_per_channel():
    distiller, teacher, student = same_grid("pkd", pkd_weight=3.0)
    loss = distiller.per_image_losses(teacher, student, TARGETS)["loss_pkd"]
    for b in range(2):
        expected = 0.0
        for f_t, f_s, _ in image_levels(distiller, teacher, student, b):
            r = [torch.corrcoef(torch.stack([s.flatten(), t.flatten()]))[0, 1] for s, t in zip(f_s, f_t)]
            expected += 1 - sum(r).item() / len(r)
        assert loss[b].item() == pytest.approx(3.0 * expected, rel=1e-4)


# --------------------------------------------------------------------------- invariants
class Fixed(nn.Module):
    """An adaptor that returns given levels, whatever the student."""

    def __init__(self, levels: list[torch.Tensor], strides: list[int]):
        super().__init__()
        self.levels, self.strides = levels, strides

    def forward(self, student: Pyramid) -> Pyramid:
        return student.with_levels(self.levels, self.strides)


@pytest.mark.parametrize("method", ["fitnet", "fgd", "pkd"])
def test_a_student_that_matches_the_teacher_has_zero_loss(method):
    distiller, teacher, student = same_grid(method)
    distiller.adaptor = Fixed([f / RMS[i] for i, f in enumerate(teacher.levels)], teacher.strides)
    losses = distiller.per_image_losses(teacher, student, TARGETS)
    for name, value in losses.items():
        torch.testing.assert_close(value, torch.zeros(2), atol=1e-6, rtol=0, msg=name)


def test_mgd_with_every_cell_masked_does_not_read_the_student():
    distiller, teacher, student = same_grid("mgd", mgd_lambda=1.0)
    other = random_pyramid(SIZES, [8, 16], 6, seed=9)
    torch.testing.assert_close(distiller.per_image_losses(teacher, student, TARGETS)["loss_mgd"],
                               distiller.per_image_losses(teacher, other, TARGETS)["loss_mgd"])


def test_pkd_ignores_a_per_channel_affine_change_of_the_student():
    distiller, teacher, student = same_grid("pkd")
    before = distiller.per_image_losses(teacher, student, TARGETS)["loss_pkd"]
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # φ ends in an affine layer norm: scale and shift each of its output channels
        for norm in distiller.adaptor.norms:
            norm.weight.mul_(torch.rand(norm.weight.shape, generator=gen) * 5 + 0.2)
            norm.bias.add_(torch.randn(norm.bias.shape, generator=gen) * 3)
    after = distiller.per_image_losses(teacher, student, TARGETS)["loss_pkd"]
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def heterogeneous(method: str, **cfg):
    """A P2–P6 teacher (64 channels) and a P3–P7 student (32 channels) with a one-layer φ whose sampling depends on
    the positions, as after training."""
    torch.manual_seed(0)
    distiller = METHODS[method](Levels(STUDENT_STRIDES, [32] * 5), Levels(TEACHER_STRIDES, [64] * 5),
                                DistillConfig(**{**SMALL, **cfg}), torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]))
    with torch.no_grad():
        for layer in distiller.adaptor.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.05)
            layer.self_attn.attention_weights.weight.normal_(std=0.5)
        for p in [*getattr(distiller, "relations", nn.Module()).parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return distiller


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_a_samples_loss_does_not_depend_on_its_batch_mate(method):
    distiller = heterogeneous(method, mgd_lambda=0.0)  # MGD without its random mask: the rest is deterministic
    teacher = random_pyramid(SIZES, TEACHER_STRIDES, 64, seed=1)
    student = random_pyramid(SIZES, STUDENT_STRIDES, 32, seed=2)
    batch = distiller.per_image_losses(teacher, student, TARGETS)
    for i in range(2):
        alone = distiller.per_image_losses(crop(teacher, i), crop(student, i), TARGETS[i:i + 1])
        for name, value in alone.items():
            assert value.shape == (1,) and value.item() == pytest.approx(batch[name][i].item(), rel=1e-4), name


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_gradients_reach_the_student_and_phi_never_the_teacher(method):
    distiller = heterogeneous(method)
    teacher = random_pyramid(SIZES, TEACHER_STRIDES, 64, seed=1)
    student = random_pyramid(SIZES, STUDENT_STRIDES, 32, seed=2)
    for level in [*teacher.levels, *student.levels]:
        level.requires_grad_(True)
    sum(value.sum() for value in distiller.per_image_losses(teacher, student, TARGETS).values()).backward()
    assert all(level.grad is None or not level.grad.any() for level in teacher.levels)
    used = set(distiller.adaptor.source)  # the student's P7 has no teacher level
    for index, (level, padded) in enumerate(zip(student.levels, student.padding_masks())):
        if index not in used:
            assert level.grad is None
            continue
        assert level.grad.masked_select(~padded[:, None]).abs().sum() > 0
        assert not level.grad.masked_select(padded[:, None]).any()  # padded cells: exactly no gradient
    assert distiller.adaptor.proj[0].weight.grad.abs().sum() > 0
    assert distiller.adaptor.layers[0].self_attn.value_proj.weight.grad.abs().sum() > 0
    own = {"fgd": "relations", "mgd": "generators"}.get(method)
    if own:  # the method's own modules (one per level) train with φ
        assert all(sum(p.grad.abs().sum() for p in module.parameters()) > 0 for module in getattr(distiller, own))


def test_the_baselines_are_registered_with_the_papers_defaults():
    assert (METHODS["fgd"], METHODS["mgd"], METHODS["pkd"]) == (FGD, MGD, PKD)
    cfg = DistillConfig()
    assert (cfg.fgd_alpha, cfg.fgd_beta, cfg.fgd_gamma, cfg.fgd_lambda, cfg.fgd_temperature) == (
        1e-3, 5e-4, 5e-4, 5e-6, 0.5)
    assert (cfg.mgd_alpha, cfg.mgd_lambda, cfg.pkd_weight) == (2e-5, 0.65, 6.0)
    for cls in (FitNet, FGD, MGD, PKD):  # the feature baselines compare on FitNet's one-layer φ
        assert len(cls(Levels([8], [8]), Levels([8], [8]), DistillConfig(**SMALL), torch.ones(1)).adaptor.layers) == 1


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny_pair(tiny_digits, tmp_path_factory):
    """A tiny Faster R-CNN teacher (2 iterations) and the RetinaNet student's YAML."""
    return teacher_and_student(tiny_digits, tmp_path_factory.mktemp("baselines"), "faster_rcnn", teacher_iters=2)


@pytest.mark.parametrize("method,names", [("fgd", ["loss_fgd_feature", "loss_fgd_attention", "loss_fgd_global"]),
                                          ("mgd", ["loss_mgd"]), ("pkd", ["loss_pkd"])])
def test_distill_one_step_with_each_baseline(tiny_pair, tmp_path, method, names):
    teacher, student_yaml = tiny_pair
    out = tmp_path / method
    assert cli.main(["distill", str(student_yaml), "--teacher", str(teacher), "--method", method,
                     "--out", str(out), "--max-iters", "1", "--set", "distill.adaptor_heads=4",
                     "--set", "distill.adaptor_points=2"]) == 0
    losses = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(losses[name]) and losses[name] > 0 for name in names)
    assert (out / "student.pt").is_file()
