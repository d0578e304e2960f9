"""benchmarks/grad_scale.py's gradient comparison against hand computations."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import grad_scale  # noqa: E402


def test_the_ratio_and_cosine_are_over_the_parameters_the_distillation_reaches():
    """det = (a·x)² + 3 (b·x): reaches a and b; kd = (a·x − 2)²: reaches a only, so b's gradient is left out."""
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([0.5, -1.0]))
    x = torch.tensor([1.0, -1.0])
    det = (a @ x) ** 2 + 3 * (b @ x)
    kd = (a @ x - 2) ** 2
    g_det, g_kd = grad_scale.gradient(det, [a, b]), grad_scale.gradient(kd, [a, b])
    assert g_kd[1] is None
    ratio, cos = grad_scale.compare(g_det, g_kd)
    # by hand: a·x = −1; ∂det/∂a = 2(a·x) x = (−2, 2); ∂kd/∂a = 2(a·x − 2) x = (−6, 6)
    assert ratio == pytest.approx(math.hypot(6, 6) / math.hypot(2, 2))
    assert cos == pytest.approx(1.0)


def test_a_parameter_only_the_distillation_reaches_counts_as_zero_detection_gradient():
    a, c = nn.Parameter(torch.tensor([1.0])), nn.Parameter(torch.tensor([2.0]))
    det = 3 * a.sum()
    kd = 4 * a.sum() - 4 * c.sum()
    ratio, cos = grad_scale.compare(grad_scale.gradient(det, [a, c]), grad_scale.gradient(kd, [a, c]))
    # g_det = (3, 0), g_kd = (4, −4)
    assert ratio == pytest.approx(math.hypot(4, 4) / 3)
    assert cos == pytest.approx(12 / (3 * math.hypot(4, 4)))


def test_opposite_pulls_give_a_negative_cosine_and_sums_add_per_parameter():
    a = nn.Parameter(torch.tensor([1.0, 1.0]))
    first = grad_scale.add(None, grad_scale.gradient((a * torch.tensor([1.0, 2.0])).sum(), [a]))
    total = grad_scale.add(first, grad_scale.gradient((a * torch.tensor([3.0, -1.0])).sum(), [a]))
    assert torch.equal(total[0], torch.tensor([4.0, 1.0]))
    assert grad_scale.add([None], [None]) == [None]
    ratio, cos = grad_scale.compare(total, [-2 * total[0]])
    assert (ratio, cos) == (pytest.approx(2.0), pytest.approx(-1.0))


def test_a_distillation_loss_that_reaches_nothing_is_an_error():
    a = nn.Parameter(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="reaches none"):
        grad_scale.compare(grad_scale.gradient(a.sum(), [a]), [None])
