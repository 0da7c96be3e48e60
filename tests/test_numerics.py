"""The test helpers of tests/numerics.py: the float bound, the reduction length, near-ties."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qtemperate.models import build_model
from tests.numerics import (
    U32,
    Agreement,
    assert_accuracy_explained,
    gamma,
    lowest_explained_agreement,
    reduction_length,
    rounding_bound,
    top1_agreement,
    top1_margin,
)

pytestmark = pytest.mark.numerics


def test_the_requested_cpu_capability_is_the_one_torch_runs() -> None:
    """``make test-numerics`` reruns these tests on PyTorch's kernels for older CPUs: check they run."""
    want = os.environ.get("ATEN_CPU_CAPABILITY")
    if not want:
        pytest.skip("ATEN_CPU_CAPABILITY not set: this CPU's own kernels")
    assert torch.backends.cpu.get_cpu_capability().lower() == want.lower()


# -- the bound ------------------------------------------------------------------------------
def test_gamma_is_the_closed_form_and_refuses_where_no_bound_exists() -> None:
    assert gamma(0) == 0.0
    assert gamma(10) == pytest.approx(10 * U32 / (1 - 10 * U32), rel=1e-15)
    assert rounding_bound(3.0, 10) == pytest.approx(2 * 3.0 * gamma(10), rel=1e-15)
    assert rounding_bound(3.0, 10, computations=1) == pytest.approx(3.0 * gamma(10), rel=1e-15)
    assert gamma(4, unit=2.0**-53) == pytest.approx(4 * 2.0**-53, rel=1e-12)
    with pytest.raises(ValueError, match="unbounded"):
        gamma(2**24)
    with pytest.raises(ValueError, match=">= 0"):
        gamma(-1)


def _sequential_sum32(t: np.ndarray) -> float:
    """Left-to-right float32 summation (every partial sum rounded to float32)."""
    return float(np.cumsum(t.astype(np.float32), dtype=np.float32)[-1])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4000), seed=st.integers(0, 2**31 - 1), spread=st.floats(1e-3, 1e3))
def test_float32_sums_in_any_order_are_within_the_bound(n: int, seed: int, spread: float) -> None:
    """|fl(Σt) - Σt| <= γ_n Σ|t| for any order; two orders differ by at most twice that."""
    rng = np.random.default_rng(seed)
    t = (rng.standard_normal(n) * spread * rng.choice([1e-3, 1.0, 1e3], n)).astype(np.float32)
    exact = math.fsum(t.astype(np.float64).tolist())  # correctly rounded: within 2**-53 |Σt|
    mags = math.fsum(np.abs(t.astype(np.float64)).tolist())
    orders = [_sequential_sum32(t), _sequential_sum32(t[::-1]), float(torch.from_numpy(t).sum()),
              _sequential_sum32(t[rng.permutation(n)])]
    for s in orders:
        assert abs(s - exact) <= rounding_bound(mags, n, computations=1) + 2.0**-53 * mags
    assert max(orders) - min(orders) <= rounding_bound(mags, n) + 2 * 2.0**-53 * mags


# -- the reduction length -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "shape", "length"),
    [
        (nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)), (1, 8, 8), (9 + 1) + (288 + 1)),
        (nn.Conv2d(4, 8, 3, groups=2, bias=False), (4, 5, 5), 2 * 9),
        (nn.Linear(16, 3, bias=False), (16,), 16),
        (nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1)), (2, 6, 6), 36 + 1),  # ReLU rounds nothing
        (nn.Sequential(nn.Linear(5, 5), nn.Softmax(dim=1)), (5,), (5 + 1) + (2 * 5 + 2)),
    ],
)
def test_reduction_length_of_known_layers(model: nn.Module, shape: tuple[int, ...], length: int) -> None:
    assert reduction_length(model, torch.randn(3, *shape)) == length


def test_reduction_length_leaves_the_model_as_it_was() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=4).train()
    assert reduction_length(model, torch.randn(2, 1, 8, 8)) > 0
    assert model.training


@pytest.mark.parametrize("name", ["small_cnn", "resnet8"])
def test_a_float32_network_is_within_the_bound_of_its_float64_value(name: str) -> None:
    """``|y32 - y64| <= γ_L max|y|``: the magnitude x eps x reduction length bound on real nets."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, width=8).eval()
    x = torch.randn(32, 1, 12, 12)
    with torch.no_grad():
        y32 = model(x).double()
        y64 = model.double()(x.double())
    bound = rounding_bound(y64.abs().max(), reduction_length(model.float(), x), computations=1)
    assert (y32 - y64).abs().max() <= bound


# -- near-ties --------------------------------------------------------------------------------
def test_top1_margin_is_largest_minus_second_along_axis_1() -> None:
    ref = np.array([[1.0, 3.0, 2.5], [0.0, 0.0, -1.0]])
    np.testing.assert_array_equal(top1_margin(ref), [0.5, 0.0])
    maps = torch.zeros(2, 3, 4, 5)
    maps[:, 1] = 1.0
    assert top1_margin(maps).shape == (2, 4, 5) and (top1_margin(maps) == 1.0).all()
    with pytest.raises(ValueError, match="C>=2"):
        top1_margin(np.zeros((4, 1)))


def test_near_ties_are_set_aside_and_counted_real_flips_are_not() -> None:
    tol = 1e-5
    ref = np.array([[1.0, 1.0 + 1e-6, 0.0],  # near-tie (margin 1e-6 <= 2 tol)
                    [0.0, 5.0, 1.0],
                    [3.0, 0.0, 0.0],
                    [0.0, 0.0, 2.0]])
    got = ref.copy()
    got[0, 0] += 2e-6  # the near-tie flips: rounding can do that
    a = top1_agreement(got, ref, tol)
    assert a == Agreement(agree=3, compared=3, near_ties=1, tol=tol) and a.rate == 1.0 and a.total == 4
    assert "1 near-tie(s) of 4 set aside" in str(a) and "3/3" in str(a)
    got[2] = [0.0, 4.0, 0.0]  # a real disagreement: margin 3 >> 2 tol
    a = top1_agreement(got, ref, tol)
    assert (a.agree, a.compared, a.near_ties) == (2, 3, 1) and a.rate == pytest.approx(2 / 3)
    assert lowest_explained_agreement(ref, tol) == 0.75
    assert top1_agreement(ref[:1], ref[:1], tol).rate == 1.0  # nothing compared: vacuous, said so
    with pytest.raises(ValueError, match="shapes differ"):
        top1_agreement(got[:2], ref, tol)


def test_reported_accuracy_may_differ_by_the_near_ties_only() -> None:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    x = torch.tensor([[1.0, 1.0 + 2**-23, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 2])  # recomputed: 3 of 4 correct (row 0's argmax is 1)
    assert assert_accuracy_explained(3 / 4, model, x, y) == 1
    assert_accuracy_explained(4 / 4, model, x, y)  # row 0 counted the other way: a near-tie
    for wrong in (2 / 4, 5 / 4):  # a verdict a near-tie cannot change: rows 1-3 are no near-ties
        with pytest.raises(AssertionError, match=r"outside 3\.\.4/4"):
            assert_accuracy_explained(wrong, model, x, y)
    y[0] = 2  # row 0's label is not one of its tied classes: wrong whichever way the tie goes
    assert_accuracy_explained(3 / 4, model, x, y)
    with pytest.raises(AssertionError, match=r"outside 3\.\.3/4"):
        assert_accuracy_explained(4 / 4, model, x, y)
