"""Tests of qtemperate.losses against float64 NumPy references and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtemperate.losses import TemperateLoss, kd_loss, multi_scale_kd_loss, normalize_weights

torch.set_num_threads(1)


# ---------------------------------------------------------------- NumPy references
def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_kd(s: np.ndarray, t: np.ndarray, temperature: float | np.ndarray) -> float:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) summed over axis 1, averaged elsewhere."""
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    temp = np.asarray(temperature, dtype=np.float64)
    if temp.ndim == 1:
        temp = temp.reshape((-1,) + (1,) * (s.ndim - 1))
    log_p = np_log_softmax(t / temp, axis=1)
    log_q = np_log_softmax(s / temp, axis=1)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    t2 = temp.squeeze(1) ** 2 if temp.ndim > 0 else temp**2
    return float((kl * t2).mean())


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    return np.exp(np_log_softmax(x, axis))


def np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    log_q = np_log_softmax(logits.astype(np.float64), axis=1)
    return float(-log_q[np.arange(len(labels)), labels].mean())


def randn(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------- kd_loss
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 2, 3), (1, 2)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 17.3])
def test_kd_loss_matches_numpy_float64(shape: tuple[int, ...], temperature: float) -> None:
    s, t = randn(*shape, seed=1), randn(*shape, seed=2)
    got = kd_loss(s, t, temperature)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(np_kd(s.numpy(), t.numpy(), temperature), rel=1e-12)


def test_kd_loss_float32_matches_numpy() -> None:
    s, t = randn(6, 10, seed=3).float(), randn(6, 10, seed=4).float()
    expected = np_kd(s.double().numpy(), t.double().numpy(), 3.0)
    assert kd_loss(s, t, 3.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_dim_tensor_temperature_equals_float() -> None:
    s, t = randn(4, 5, seed=5), randn(4, 5, seed=6)
    assert kd_loss(s, t, torch.tensor(2.5)).item() == kd_loss(s, t, 2.5).item()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 6.0])
def test_kd_loss_gradient_closed_form(temperature: float) -> None:
    b, c = 4, 6
    s = randn(b, c, seed=7).requires_grad_(True)
    t = randn(b, c, seed=8).requires_grad_(True)
    kd_loss(s, t, temperature).backward()
    s_np, t_np = s.detach().numpy(), t.detach().numpy()
    expected = (
        temperature * (np_softmax(s_np / temperature, 1) - np_softmax(t_np / temperature, 1)) / b
    )
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-14)
    assert t.grad is None  # the teacher is detached: it only provides targets


def test_kd_loss_large_temperature_limit() -> None:
    # softmax(x/T) ≈ (1 + (x − x̄)/T)/C, so T²·KL → (1/(2C)) · mean_b Σ_c (d_c − d̄)², d = t − s.
    b, c = 5, 8
    s, t = randn(b, c, seed=9), randn(b, c, seed=10)
    d = (t - s).numpy()
    limit = float((((d - d.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) / (2 * c)).mean())
    big_t = 1e3
    assert kd_loss(s, t, big_t).item() == pytest.approx(limit, rel=1e-2)
    # and the softened teacher distribution is near uniform
    p = np_softmax(t.numpy() / big_t, 1)
    assert np.abs(p - 1.0 / c).max() < 1e-2 / c


def test_kd_loss_extreme_logits_are_finite() -> None:
    g = torch.Generator().manual_seed(11)
    sign = torch.randint(0, 2, (4, 5), generator=g).float() * 2 - 1
    s = (sign * 1e4).requires_grad_(True)
    t = -sign * 1e4
    t[:, 0] = 1e4  # make sure some teacher rows are not degenerate
    loss = kd_loss(s, t, 1.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    expected = np_kd(s.detach().double().numpy(), t.double().numpy(), 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 2)])
def test_kd_loss_per_sample_temperature_equals_per_row(shape: tuple[int, ...]) -> None:
    s, t = randn(*shape, seed=12), randn(*shape, seed=13)
    temps = torch.tensor([0.7, 1.0, 3.0, 8.0][: shape[0]], dtype=torch.float64)
    got = kd_loss(s, t, temps).item()
    rows = [kd_loss(s[i : i + 1], t[i : i + 1], float(temps[i])).item() for i in range(shape[0])]
    assert got == pytest.approx(float(np.mean(rows)), rel=1e-12)
    assert got == pytest.approx(np_kd(s.numpy(), t.numpy(), temps.numpy()), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(
        st.floats(-50, 50, allow_nan=False, allow_infinity=False), min_size=12, max_size=12
    ),
    other=st.lists(
        st.floats(-50, 50, allow_nan=False, allow_infinity=False), min_size=12, max_size=12
    ),
    temperature=st.floats(0.1, 20.0),
)
def test_kd_loss_nonnegative_and_zero_on_equal_logits(
    data: list[float], other: list[float], temperature: float
) -> None:
    s = torch.tensor(data, dtype=torch.float64).reshape(3, 4)
    t = torch.tensor(other, dtype=torch.float64).reshape(3, 4)
    assert kd_loss(s, t, temperature).item() >= -1e-12
    assert kd_loss(s, s.clone(), temperature).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("student", "teacher", "temperature", "match"),
    [
        ((2, 3), (2, 3), 0.0, "temperature"),
        ((2, 3), (2, 3), -1.0, "temperature"),
        ((2, 3), (2, 3), float("nan"), "temperature"),
        ((2, 3), (2, 3), float("inf"), "temperature"),
        ((2, 3), (2, 3), "hot", "temperature"),
        ((2, 3), (2, 3), torch.tensor([1.0, 0.0]), "temperature"),
        ((2, 3), (2, 3), torch.tensor([1.0, 2.0, 3.0]), "per-sample temperature"),
        ((2, 3), (2, 3), torch.ones(2, 1), "per-sample temperature"),
        ((2, 3), (2, 4), 1.0, "same shape"),
        ((3,), (3,), 1.0, "shape"),
        ((0, 3), (0, 3), 1.0, "non-empty"),
    ],
)
def test_kd_loss_bad_arguments(
    student: tuple[int, ...], teacher: tuple[int, ...], temperature: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.zeros(student), torch.zeros(teacher), temperature)  # type: ignore[arg-type]


# ---------------------------------------------------------------- normalize_weights
def test_normalize_weights_closed_form() -> None:
    assert normalize_weights(None, 4) == (0.25, 0.25, 0.25, 0.25)
    got = normalize_weights([1, 3, 0, 4], 4)
    np.testing.assert_allclose(got, [1 / 8, 3 / 8, 0.0, 4 / 8], rtol=1e-15)
    assert normalize_weights((5.0,), 1) == (1.0,)


@pytest.mark.parametrize(
    ("weights", "n", "match"),
    [
        ([1.0, 2.0], 3, "length 3"),
        ([1.0, -0.1], 2, r"weights\[1\]"),
        ([0.0, 0.0], 2, "all be zero"),
        ([1.0, float("nan")], 2, r"weights\[1\]"),
        ([1.0, "a"], 2, r"weights\[1\]"),
        (None, 0, "n must be"),
        ("ab", 2, "sequence"),
    ],
)
def test_normalize_weights_bad_arguments(weights: object, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_weights(weights, n)  # type: ignore[arg-type]


# ---------------------------------------------------------------- multi_scale_kd_loss
def test_multi_scale_single_temperature_equals_kd_loss_exactly() -> None:
    s, t = randn(5, 9, seed=14).float(), randn(5, 9, seed=15).float()
    assert torch.equal(multi_scale_kd_loss(s, t, (2.5,)), kd_loss(s, t, 2.5))
    assert torch.equal(multi_scale_kd_loss(s, t, 2.5, weights=[7.0]), kd_loss(s, t, 2.5))


def test_multi_scale_default_is_uniform_over_6_3_1() -> None:
    s, t = randn(4, 7, seed=16), randn(4, 7, seed=17)
    s_np, t_np = s.numpy(), t.numpy()
    expected = np.mean([np_kd(s_np, t_np, temp) for temp in (6.0, 3.0, 1.0)])
    assert multi_scale_kd_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_multi_scale_weights_are_normalised() -> None:
    s, t = randn(4, 7, seed=18), randn(4, 7, seed=19)
    s_np, t_np = s.numpy(), t.numpy()
    expected = (
        2 * np_kd(s_np, t_np, 6.0) + 5 * np_kd(s_np, t_np, 3.0) + 3 * np_kd(s_np, t_np, 1.0)
    ) / 10
    got = multi_scale_kd_loss(s, t, (6.0, 3.0, 1.0), weights=(2.0, 5.0, 3.0))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # scaling all weights changes nothing
    got2 = multi_scale_kd_loss(s, t, (6.0, 3.0, 1.0), weights=(0.2, 0.5, 0.3))
    assert got2.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("temperatures", "weights", "match"),
    [
        ((), None, "must not be empty"),
        ((1.0, 2.0), (1.0,), "length 2"),
        ((1.0, 2.0), (1.0, -1.0), "weights"),
        ((1.0, 2.0), (0.0, 0.0), "all be zero"),
        ((1.0, 0.0), None, "temperature"),
    ],
)
def test_multi_scale_bad_arguments(temperatures: object, weights: object, match: str) -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        multi_scale_kd_loss(s, s, temperatures, weights)  # type: ignore[arg-type]


# ---------------------------------------------------------------- TemperateLoss
def test_temperate_loss_parts_add_up_single_temperature() -> None:
    s = randn(6, 5, seed=20).requires_grad_(True)
    t = randn(6, 5, seed=21)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    crit = TemperateLoss(kd_weight=0.7, temperatures=4.0)
    out = crit(s, t, labels)
    assert set(out) == {"loss", "task_loss", "kd_loss", "kd_T4"}
    ce = np_ce(s.detach().numpy(), labels.numpy())
    kd = np_kd(s.detach().numpy(), t.numpy(), 4.0)
    assert out["task_loss"].item() == pytest.approx(ce, rel=1e-12)
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-12)
    assert out["kd_T4"].item() == pytest.approx(kd, rel=1e-12)
    assert out["loss"].item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-12)
    out["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_temperate_loss_multi_scale_and_setters() -> None:
    s, t = randn(4, 6, seed=22), randn(4, 6, seed=23)
    labels = torch.tensor([5, 0, 3, 1])
    s_np, t_np = s.numpy(), t.numpy()
    crit = TemperateLoss(kd_weight=0.5, temperatures=(6.0, 2.5), weights=(3.0, 1.0))
    assert crit.temperatures == (6.0, 2.5)
    assert crit.weights == (0.75, 0.25)
    out = crit(s, t, labels)
    assert set(out) == {"loss", "task_loss", "kd_loss", "kd_T6", "kd_T2.5"}
    kd6, kd25 = np_kd(s_np, t_np, 6.0), np_kd(s_np, t_np, 2.5)
    assert out["kd_T6"].item() == pytest.approx(kd6, rel=1e-12)
    assert out["kd_T2.5"].item() == pytest.approx(kd25, rel=1e-12)
    assert out["kd_loss"].item() == pytest.approx(0.75 * kd6 + 0.25 * kd25, rel=1e-12)
    ce = np_ce(s_np, labels.numpy())
    assert out["loss"].item() == pytest.approx(0.5 * ce + 0.5 * (0.75 * kd6 + 0.25 * kd25))

    crit.set_temperatures(3.0)
    crit.set_kd_weight(1.0)
    assert crit.temperatures == (3.0,) and crit.weights == (1.0,)
    out = crit(s, t, labels)
    assert set(out) == {"loss", "task_loss", "kd_loss", "kd_T3"}
    assert out["loss"].item() == pytest.approx(np_kd(s_np, t_np, 3.0), rel=1e-12)
    crit.set_kd_weight(0.0)
    assert crit(s, t, labels)["loss"].item() == pytest.approx(ce, rel=1e-12)


def test_temperate_loss_dict_heads() -> None:
    b = 4
    s = {"logits": randn(b, 5, seed=24), "feat": randn(b, 8, 3, seed=25), "box": randn(b, 4)}
    t = {"logits": randn(b, 5, seed=26), "feat": randn(b, 8, 3, seed=27), "box": randn(b, 4)}
    labels = torch.tensor([0, 4, 2, 1])
    crit = TemperateLoss(
        kd_weight=0.6,
        temperatures=(4.0, 1.0),
        weights=(1.0, 3.0),
        head_temperatures={"feat": 2.0},
        head_weights={"logits": 3.0, "feat": 1.0, "box": 0.0},
    )
    out = crit(s, t, labels)
    assert set(out) == {
        "loss",
        "task_loss",
        "kd_loss",
        "kd_logits",
        "kd_logits_T4",
        "kd_logits_T1",
        "kd_feat",
        "kd_feat_T2",
    }
    n = {k: v.numpy() for k, v in s.items()}
    m = {k: v.numpy() for k, v in t.items()}
    kd_logits = 0.25 * np_kd(n["logits"], m["logits"], 4.0) + 0.75 * np_kd(
        n["logits"], m["logits"], 1.0
    )
    kd_feat = np_kd(n["feat"], m["feat"], 2.0)
    assert out["kd_logits"].item() == pytest.approx(kd_logits, rel=1e-12)
    assert out["kd_feat"].item() == pytest.approx(kd_feat, rel=1e-12)
    assert out["kd_feat_T2"].item() == pytest.approx(kd_feat, rel=1e-12)
    kd = 0.75 * kd_logits + 0.25 * kd_feat
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-12)
    ce = np_ce(n["logits"], labels.numpy())
    assert out["task_loss"].item() == pytest.approx(ce, rel=1e-12)
    assert out["loss"].item() == pytest.approx(0.4 * ce + 0.6 * kd, rel=1e-12)

    # shared temperatures follow set_temperatures; the overridden head does not
    crit.set_temperatures(3.0)
    out = crit(s, t, labels)
    assert "kd_logits_T3" in out and "kd_feat_T2" in out
    crit.set_temperatures(5.0, head="feat")
    assert crit.head_temperatures == {"feat": (5.0,)}
    assert "kd_feat_T5" in crit(s, t, labels)


def test_temperate_loss_dict_uniform_head_weights_default() -> None:
    s = {"logits": randn(3, 4, seed=28), "aux": randn(3, 4, seed=29)}
    t = {"logits": randn(3, 4, seed=30), "aux": randn(3, 4, seed=31)}
    out = TemperateLoss(kd_weight=1.0, temperatures=2.0)(s, t, torch.tensor([0, 1, 2]))
    expected = 0.5 * np_kd(s["logits"].numpy(), t["logits"].numpy(), 2.0) + 0.5 * np_kd(
        s["aux"].numpy(), t["aux"].numpy(), 2.0
    )
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("student", "teacher", "kwargs", "match"),
    [
        ({"logits": 0, "a": 0}, {"logits": 0}, {}, "'a'"),
        ({"logits": 0}, {"logits": 0, "b": 0}, {}, "'b'"),
        ({"cls": 0}, {"cls": 0}, {}, "task_head 'logits'"),
        ({"logits": 0}, {"logits": 0}, {"head_temperatures": {"featz": 2.0}}, "'featz'"),
        ({"logits": 0}, {"logits": 0}, {"head_weights": {"featz": 2.0}}, "'featz'"),
        ({"logits": 0}, {"logits": 0}, {"head_weights": {"logits": 0.0}}, "all be zero"),
        ({"logits": 0}, None, {}, "both"),
    ],
)
def test_temperate_loss_dict_errors(
    student: dict[str, int], teacher: dict[str, int] | None, kwargs: dict, match: str
) -> None:
    def make(spec: dict[str, int]) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(2, 3) for k in spec}

    crit = TemperateLoss(**kwargs)
    t_out = torch.zeros(2, 3) if teacher is None else make(teacher)
    with pytest.raises(ValueError, match=match):
        crit(make(student), t_out, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kd_weight": 1.5}, "kd_weight"),
        ({"kd_weight": -0.1}, "kd_weight"),
        ({"kd_weight": float("nan")}, "kd_weight"),
        ({"temperatures": 0.0}, "temperatures"),
        ({"temperatures": ()}, "temperatures"),
        ({"temperatures": (4.0, 2.0), "weights": (1.0,)}, "length 2"),
        ({"head_temperatures": {"feat": -1.0}}, "head_temperatures"),
        ({"head_weights": {"feat": -1.0}}, "head_weights"),
        ({"task_head": 3}, "task_head"),
    ],
)
def test_temperate_loss_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TemperateLoss(**kwargs)


def test_temperate_loss_bad_setters() -> None:
    crit = TemperateLoss()
    with pytest.raises(ValueError, match="kd_weight"):
        crit.set_kd_weight(2.0)
    with pytest.raises(ValueError, match="temperatures"):
        crit.set_temperatures([1.0, -2.0])
    # a rejected update leaves the previous configuration in place
    assert crit.temperatures == (4.0,) and math.isclose(crit.kd_weight, 0.9)


def test_equal_temperatures_merge_with_summed_weights() -> None:
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    crit = TemperateLoss(kd_weight=1.0, temperatures=(1.0, 1.0, 3.0), weights=(1.0, 1.0, 2.0))
    assert crit.temperatures == (1.0, 3.0)
    assert crit.weights == pytest.approx((0.5, 0.5))
    out = crit(s, t, y)
    assert set(k for k in out if k.startswith("kd_T")) == {"kd_T1", "kd_T3"}
    expected = 0.5 * kd_loss(s, t, 1.0) + 0.5 * kd_loss(s, t, 3.0)
    assert float(out["kd_loss"]) == pytest.approx(float(expected), rel=1e-6)
