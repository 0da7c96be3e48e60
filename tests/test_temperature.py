"""Tests of qtemperate.temperature against hand-computed values of the documented formulas."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pydantic
import pytest
import torch

from qtemperate.temperature import (
    TEMPERATURE_SCHEDULES,
    ConstantTemperature,
    GradientNormTemperature,
    LookupTableTemperature,
    ScheduleSettings,
    StageContext,
    TemperateSchedule,
    TemperatureSchedule,
    TemperatureSuggestion,
    settings_model,
    suggest_initial_temperature,
    to_lookup_table,
)
from tests.registry_helpers import registered

# Defaults total=10: W = ceil(0.3·10) = 3, A = ceil(0.8·10) = 8, alpha 0.9, beta 0.1.
LOSSES_10 = [2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9]
EXPECTED_10 = [
    4.0,
    4.0,
    4.0,
    3.45,  # 0.9·4 − 0.1·1.5
    2.965,  # 0.9·3.45 − 0.14
    2.5385,  # 0.9·2.965 − 0.13
    2.16465,  # 0.9·2.5385 − 0.12
    1.838185,  # 0.9·2.16465 − 0.11
    1.838185,  # convergence k=0: T_enter
    1.0,  # last epoch: exactly min
]
PHASES_10 = ["warmup"] * 3 + ["adaptive"] * 5 + ["convergence"] * 2


def run(schedule: TemperateSchedule, losses: list[float | None]) -> list[float]:
    return [schedule.step(e, v) for e, v in enumerate(losses)]


# ---------------------------------------------------------------- registry / base
def test_registry_names_every_schedule() -> None:
    assert TEMPERATURE_SCHEDULES.keys() == [
        "constant",
        "gradient_norm",
        "lookup_table",
        "temperate",
    ]
    assert TEMPERATURE_SCHEDULES.get("constant") is ConstantTemperature
    assert TEMPERATURE_SCHEDULES.get("temperate") is TemperateSchedule
    assert TEMPERATURE_SCHEDULES.get("gradient_norm") is GradientNormTemperature
    assert TEMPERATURE_SCHEDULES.get("lookup_table") is LookupTableTemperature
    for key in TEMPERATURE_SCHEDULES:
        assert issubclass(TEMPERATURE_SCHEDULES.get(key), TemperatureSchedule)
    with pytest.raises(TypeError):
        TemperatureSchedule()  # type: ignore[abstract]


# ---------------------------------------------------------------- constant
def test_constant_temperature() -> None:
    sched = ConstantTemperature(3.5)
    assert sched.temperature == 3.5
    assert sched.step() == 3.5 and sched.step(7, val_loss=1.0) == 3.5
    assert sched.step_update(12, grad_norm=2.0) == 3.5 and sched.step_update(13) == 3.5
    other = ConstantTemperature(1.0)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.step(0) == 3.5 and other.min_temperature == other.max_temperature == 3.5


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf"), "x", True])
def test_constant_temperature_bad(value: object) -> None:
    with pytest.raises(ValueError, match="temperature"):
        ConstantTemperature(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------- TemperateSchedule
def test_temperate_every_epoch_hand_computed() -> None:
    sched = TemperateSchedule(10)
    assert (sched.warmup_end, sched.adapt_end) == (3, 8)
    assert sched.temperature == 4.0 and sched.phase == "warmup"
    temps, phases = [], []
    for e, v in enumerate(LOSSES_10):
        temps.append(sched.step(e, v))
        phases.append(sched.phase)
        assert sched.temperature == temps[-1]
    assert temps == pytest.approx(EXPECTED_10, rel=1e-12)
    assert temps[-1] == 1.0  # exactly
    assert phases == PHASES_10


def test_temperate_cosine_decay_hand_computed() -> None:
    # total 20: W = 6, A = 16; beta = 0 so T_15 = 4·0.95^10; K = 19 − 16 = 3.
    sched = TemperateSchedule(20, alpha=0.95, beta=0.0)
    losses = [1.0 / (e + 1) for e in range(20)]  # relative changes ≫ plateau_tol
    temps = run(sched, losses)  # type: ignore[arg-type]
    t_enter = 4.0 * 0.95**10
    assert temps[:6] == [4.0] * 6
    assert temps[15] == pytest.approx(t_enter, rel=1e-12)
    assert temps[16] == pytest.approx(t_enter, rel=1e-12)  # k = 0
    assert temps[17] == pytest.approx(1 + (t_enter - 1) * 0.75, rel=1e-12)  # cos(π/3) = 1/2
    assert temps[18] == pytest.approx(1 + (t_enter - 1) * 0.25, rel=1e-12)  # cos(2π/3) = −1/2
    assert temps[19] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(temps))


def test_temperate_clamps_to_bounds() -> None:
    up = TemperateSchedule(10, alpha=1.5, beta=0.0, max_temperature=10.0)
    temps = run(up, [0.5] * 3 + [1.0, 2.0, 3.0, 4.0, 5.0, None, None])
    assert temps[3:8] == pytest.approx([6.0, 9.0, 10.0, 10.0, 10.0])
    assert temps[9] == 1.0
    down = TemperateSchedule(10, min_temperature=2.0)
    assert run(down, [None] * 3 + [100.0]) == [4.0, 4.0, 4.0, 2.0]


def test_temperate_step_is_idempotent_per_epoch() -> None:
    sched = TemperateSchedule(10)
    run(sched, LOSSES_10[:3])
    assert sched.step(3, 1.5) == pytest.approx(3.45)
    assert sched.step(3, 1.5) == pytest.approx(3.45)
    assert sched.step(3, 100.0) == pytest.approx(3.45)  # a second call never re-applies
    assert sched.step(4, 1.4) == pytest.approx(2.965)


def test_temperate_boundary_rounding() -> None:
    # 0.3·10 = 3.0000000000000004 in floating point, 0.1·3 = 0.30000000000000004
    assert TemperateSchedule(10, warmup=0.3).warmup_end == 3
    s = TemperateSchedule(3, warmup=0.1, adapt_until=0.7)
    assert (s.warmup_end, s.adapt_end) == (1, 3)
    assert [s.phase_of(e) for e in range(3)] == ["warmup", "adaptive", "adaptive"]


def test_temperate_short_stages() -> None:
    one = TemperateSchedule(1)
    assert one.step(0) == 4.0 and one.phase == "warmup"
    two = TemperateSchedule(2)  # W = 1, A = 2: warm-up then adaptive, no convergence
    assert two.step(0) == 4.0
    assert two.step(1, 2.0) == pytest.approx(3.4) and two.phase == "adaptive"
    five = TemperateSchedule(5)  # W = 2, A = 4: a one-epoch convergence phase (K = 0) → min
    assert run(five, [None, None, 1.0, 1.5, None]) == pytest.approx([4.0, 4.0, 3.5, 3.0, 1.0])
    only_conv = TemperateSchedule(5, warmup=0.0, adapt_until=0.0)  # S = 0, K = 4, T_enter = base
    expected = [1 + 3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    temps = run(only_conv, [None] * 5)
    assert temps == pytest.approx(expected, rel=1e-12)
    assert temps[0] == 4.0 and temps[2] == pytest.approx(2.5) and temps[4] == 1.0
    single_conv = TemperateSchedule(1, warmup=0.0, adapt_until=0.0)
    assert single_conv.step(0) == 1.0 and single_conv.phase == "convergence"


def test_temperate_plateau_starts_convergence_early() -> None:
    # total 20, W = 2, A = 16, patience 2: warm-up losses do not count; epoch 3 and 4
    # are the 1st and 2nd consecutive small changes → convergence starts at S = 5.
    sched = TemperateSchedule(20, warmup=0.1, patience=2, plateau_tol=1e-3)
    losses = [1.0, 1.0, 1.0, 1.0005, 1.0005] + [None] * 15
    for e in range(4):
        sched.step(e, losses[e])
    assert sched.phase_of(5) == "adaptive" and sched.convergence_start == 16
    sched.step(4, losses[4])
    assert sched.phase == "adaptive"
    assert sched.phase_of(5) == "convergence" and sched.convergence_start == 5
    temps = [sched.step(e, losses[e]) for e in range(5, 20)]
    t4 = 0.9 * (0.9 * 3.5 - 0.10005) - 0.10005  # 3.5 = 0.9·4 − 0.1·1.0 at epoch 2
    assert temps[0] == pytest.approx(t4, rel=1e-12)  # S: k = 0, K = 14
    assert temps[12 - 5] == pytest.approx(1 + (t4 - 1) * 0.5, rel=1e-12)  # k = 7 = K/2
    assert temps[-1] == 1.0
    assert sched.phase == "convergence"


def test_temperate_plateau_counter_resets_and_tolerance_is_strict() -> None:
    sched = TemperateSchedule(20, warmup=0.0, patience=2, plateau_tol=0.5)
    # changes: 0 (small, 1), 0.5 (= tol, not small → reset), 0 (1), 0 (2 → trigger after epoch 4)
    for e, v in enumerate([2.0, 2.0, 3.0, 3.0, 3.0]):
        sched.step(e, v)
        assert sched.convergence_start == (5 if e == 4 else 16)


def test_temperate_plateau_disabled_with_zero_tolerance() -> None:
    sched = TemperateSchedule(10, warmup=0.0, patience=1, plateau_tol=0.0)
    run(sched, [1.0] * 7)
    assert sched.convergence_start == 8 and sched.phase == "adaptive"


# W = ceil(0.2·16) = 4, A = ceil(0.75·16) = 12; adaptive losses 0.8 at epochs 4, 5, 6 are
# two consecutive zero changes → with patience 2 convergence starts early at S = 7.
STATE_LOSSES = [1.0, 1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.6, 0.55, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4, 0.3]


@pytest.mark.parametrize("cut", [0, 2, 4, 5, 6, 7, 9, 12, 15])
def test_temperate_state_dict_round_trip(cut: int) -> None:
    def make() -> TemperateSchedule:
        return TemperateSchedule(16, warmup=0.2, adapt_until=0.75, patience=2, plateau_tol=1e-3)

    reference = run(make(), STATE_LOSSES)  # type: ignore[arg-type]
    first = make()
    for e in range(cut):
        first.step(e, STATE_LOSSES[e])
    state = json.loads(json.dumps(first.state_dict()))  # plain values only
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.temperature == first.temperature and resumed.phase == first.phase
    rest = [resumed.step(e, STATE_LOSSES[e]) for e in range(cut, 16)]
    assert rest == reference[cut:]
    assert resumed.convergence_start == 7
    assert rest[-1] == 1.0


def test_temperate_load_state_dict_errors() -> None:
    sched = TemperateSchedule(10)
    state = sched.state_dict()
    with pytest.raises(ValueError, match="total_epochs"):
        TemperateSchedule(12).load_state_dict(state)
    del state["plateau_count"]
    with pytest.raises(ValueError, match="plateau_count"):
        sched.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_epochs": 0}, "total_epochs"),
        ({"total_epochs": 2.5}, "total_epochs"),
        ({"total_epochs": True}, "total_epochs"),
        ({"base_temperature": 0.0}, "base_temperature"),
        ({"base_temperature": 11.0}, "base_temperature"),
        ({"base_temperature": 0.5}, "base_temperature"),
        ({"min_temperature": -1.0}, "min_temperature"),
        ({"min_temperature": 5.0, "max_temperature": 4.0}, "min_temperature"),
        ({"max_temperature": float("inf")}, "max_temperature"),
        ({"alpha": 0.0}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"warmup": -0.1}, "warmup"),
        ({"warmup": 0.9, "adapt_until": 0.8}, "warmup"),
        ({"adapt_until": 1.1}, "adapt_until"),
        ({"patience": 0}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"plateau_tol": -1e-3}, "plateau_tol"),
        ({"plateau_tol": float("nan")}, "plateau_tol"),
    ],
)
def test_temperate_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs = {"total_epochs": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        TemperateSchedule(**kwargs)


@pytest.mark.parametrize(
    ("prefix", "epoch", "val_loss", "match"),
    [
        ([], -1, None, "epoch"),
        ([], 10, None, "epoch"),
        ([], float("nan"), None, "epoch"),
        ([], -0.5, None, "epoch"),
        ([], "1", None, "epoch"),
        ([], True, None, "epoch"),
        ([1.0] * 5, 3.99, None, "decrease"),
        ([1.0] * 5, 2, None, "decrease"),
        ([1.0] * 3, 3, None, "val_loss is required"),
        ([1.0] * 3, 3, float("nan"), "val_loss"),
        ([], 0, "bad", "val_loss"),
    ],
)
def test_temperate_bad_step(prefix: list[float], epoch: Any, val_loss: Any, match: str) -> None:
    sched = TemperateSchedule(10)
    run(sched, prefix)  # type: ignore[arg-type]
    before = sched.state_dict()
    with pytest.raises(ValueError, match=match):
        sched.step(epoch, val_loss)
    assert sched.state_dict() == before  # a rejected step changes nothing


# ---------------------------------------------------------------- GradientNormTemperature
def updates(sched: TemperatureSchedule, norms: list[Any]) -> list[float]:
    return [sched.step_update(n, g) for n, g in enumerate(norms, start=1)]


def test_gradient_norm_temperature_hand_computed() -> None:
    sched = GradientNormTemperature(1.0, 6.0)
    assert sched.uses_grad_norm and sched.temperature == 6.0
    # g_max: 2, 2, 4, 4, 4, 4 → T = 6 − 5·g/g_max
    temps = updates(sched, [2.0, 1.0, 4.0, 0.0, 4.0, 3.0])
    assert temps == pytest.approx([1.0, 3.5, 1.0, 6.0, 1.0, 2.25], rel=1e-12)
    assert sched.grad_norm_max == 4.0
    assert sched.step_update(7, torch.tensor(2.0)) == pytest.approx(3.5)
    zero = GradientNormTemperature(2.0, 5.0)
    assert updates(zero, [0.0, 0.0, 1.0, 0.25]) == [5.0, 5.0, 2.0, 4.25]


def test_gradient_norm_step_is_per_epoch_and_keeps_t() -> None:
    sched = GradientNormTemperature(1.0, 6.0)
    assert sched.step(0) == 6.0 and sched.step(0, val_loss=2.0) == 6.0
    sched.step_update(1, 2.0)
    assert sched.step_update(2, 1.0) == pytest.approx(3.5)
    before = sched.state_dict()
    assert sched.step(1, 0.5) == pytest.approx(3.5)  # an epoch keeps the last update's T
    assert sched.step(5) == pytest.approx(3.5) and sched.step() == pytest.approx(3.5)
    assert sched.state_dict() == before


@pytest.mark.parametrize(
    ("call", "norm"),
    [
        (lambda s, g: s.step(g), 2.0),
        (lambda s, g: s.step(g), torch.tensor(2.0)),
        (lambda s, g: s.step(grad_norm=g), 2.0),
    ],
    ids=["float", "tensor", "keyword"],
)
def test_gradient_norm_old_step_call_is_deprecated(call: Callable[..., float], norm: Any) -> None:
    old, new = GradientNormTemperature(1.0, 6.0), GradientNormTemperature(1.0, 6.0)
    with pytest.warns(DeprecationWarning, match=r"0\.2\.0.*step_update\(num_updates, grad_norm\)"):
        assert call(old, 4.0) == new.step_update(1, 4.0) == 1.0
    with pytest.warns(DeprecationWarning):
        assert call(old, norm) == new.step_update(2, norm) == pytest.approx(3.5)
    assert old.state_dict() == new.state_dict()


def test_gradient_norm_state_dict_round_trip() -> None:
    norms = [3.0, 1.0, 5.0, 2.0, 0.5, 6.0, 1.5]
    reference = GradientNormTemperature(1.5, 4.0)
    expected = updates(reference, norms)
    first = GradientNormTemperature(1.5, 4.0)
    updates(first, norms[:3])
    resumed = GradientNormTemperature(1.5, 4.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.temperature == first.temperature
    assert [resumed.step_update(n, g) for n, g in enumerate(norms[3:], start=4)] == expected[3:]


@pytest.mark.parametrize(
    ("kwargs", "grad_norm", "match"),
    [
        ({"min_temperature": 0.0}, 1.0, "min_temperature"),
        ({"min_temperature": 3.0, "max_temperature": 2.0}, 1.0, "min_temperature"),
        ({"max_temperature": float("nan")}, 1.0, "max_temperature"),
        ({}, -1.0, "grad_norm"),
        ({}, float("inf"), "grad_norm"),
        ({}, float("nan"), "grad_norm"),
    ],
)
def test_gradient_norm_bad_arguments(kwargs: dict[str, Any], grad_norm: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNormTemperature(**kwargs).step_update(0, grad_norm)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s: s.step_update(3), ValueError, "grad_norm is required"),
        (lambda s: s.step(-1), ValueError, "epoch"),
        (lambda s: s.step(True), ValueError, "epoch"),
        (lambda s: s.step(0, norm=1.0), TypeError, "norm"),
    ],
)
def test_gradient_norm_bad_calls(call: Callable[[GradientNormTemperature], float], error: type, match: str) -> None:
    sched = GradientNormTemperature()
    with pytest.raises(error, match=match):
        call(sched)
    assert sched.state_dict() == GradientNormTemperature().state_dict()


# ---------------------------------------------------------------- lookup table
def test_to_lookup_table_and_replay() -> None:
    table = to_lookup_table(lambda: TemperateSchedule(10), 10, LOSSES_10)
    assert table == pytest.approx(EXPECTED_10, rel=1e-12)
    assert all(isinstance(t, float) for t in table)
    lut = LookupTableTemperature(table)
    assert lut.temperature == table[0]
    assert [lut.step(e) for e in range(10)] == table
    assert lut.step(25, val_loss=0.3) == table[-1]  # past the end: the last entry
    assert lut.step(4) == table[4]  # stateless: any order
    assert (lut.min_temperature, lut.max_temperature) == (1.0, 4.0)
    assert to_lookup_table(lambda: ConstantTemperature(3.0), 4) == [3.0] * 4
    # a table replays itself
    assert to_lookup_table(lambda: LookupTableTemperature([5.0, 2.0]), 3) == [5.0, 2.0, 2.0]


def test_lookup_table_state_dict_round_trip() -> None:
    lut = LookupTableTemperature([4.0, 3.0, 2.0, 1.5])
    lut.step(1)
    resumed = LookupTableTemperature([9.0])
    resumed.load_state_dict(json.loads(json.dumps(lut.state_dict())))
    assert resumed.table == (4.0, 3.0, 2.0, 1.5) and resumed.temperature == 3.0
    assert [resumed.step(e) for e in range(2, 6)] == [2.0, 1.5, 1.5, 1.5]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: LookupTableTemperature([]), "empty"),
        (lambda: LookupTableTemperature([2.0, 0.0]), r"table\[1\]"),
        (lambda: LookupTableTemperature("abc"), "table"),
        (lambda: LookupTableTemperature([2.0]).step(-1), "epoch"),
        (lambda: LookupTableTemperature([2.0]).load_state_dict({"table": [1.0]}), "temperature"),
        (lambda: to_lookup_table(lambda: ConstantTemperature(), 0), "epochs"),
        (lambda: to_lookup_table(lambda: TemperateSchedule(10), 10, [1.0] * 9), "val_losses"),
        (lambda: to_lookup_table(lambda: TemperateSchedule(10), 10), "val_loss is required"),
        (lambda: to_lookup_table(GradientNormTemperature, 3), "epoch-driven"),
    ],
)
def test_lookup_table_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_every_registered_schedule_has_a_json_state() -> None:
    # every registered schedule exposes a JSON-serialisable state
    examples = {
        "constant": ConstantTemperature(3.0),
        "temperate": TemperateSchedule(5),
        "gradient_norm": GradientNormTemperature(),
        "lookup_table": LookupTableTemperature([2.0, 1.0]),
    }
    assert sorted(examples) == TEMPERATURE_SCHEDULES.keys()
    for sched in examples.values():
        state = json.loads(json.dumps(sched.state_dict()))
        sched.load_state_dict(state)
        assert sched.state_dict() == state


# ---------------------------------------------------------------- the interface
def _every_kind() -> dict[str, TemperatureSchedule]:
    return {
        "constant": ConstantTemperature(3.0),
        "temperate": TemperateSchedule(5),
        "gradient_norm": GradientNormTemperature(),
        "lookup_table": LookupTableTemperature([2.0, 1.0]),
    }


def test_every_schedule_answers_step_and_step_update() -> None:
    kinds = _every_kind()
    assert sorted(kinds) == TEMPERATURE_SCHEDULES.keys()
    for key, sched in kinds.items():
        assert isinstance(sched, TEMPERATURE_SCHEDULES.get(key))
        assert sched.uses_grad_norm is (key == "gradient_norm")
        t = sched.step(0, 2.0)
        assert t == sched.temperature
        moved = sched.step_update(1, 0.5)
        if sched.uses_grad_norm:
            assert moved == sched.min_temperature  # the first norm is the running max
        else:  # the default: T unchanged, state untouched, grad_norm optional
            before = sched.state_dict()
            assert moved == t == sched.step_update(2) == sched.step_update(3, torch.tensor(9.0))
            assert sched.state_dict() == before


def test_to_lookup_table_rejects_any_per_update_schedule() -> None:
    class PerUpdate(ConstantTemperature):
        uses_grad_norm = True

    with pytest.raises(ValueError, match="epoch-driven schedule, got PerUpdate"):
        to_lookup_table(lambda: PerUpdate(2.0), 3)


# ---------------------------------------------------------------- built for a stage
CTX = StageContext(epochs=10, start_temperature=8.0, min_temperature=1.0, max_temperature=10.0)


def test_stage_context_start() -> None:
    assert CTX.start() == 8.0 and CTX.start(None) == 8.0
    assert CTX.start(3.5) == 3.5
    assert CTX.start(12.0) == 10.0 and CTX.start(0.5) == 1.0  # clamped to the scheduler's bounds
    with pytest.raises(dataclasses.FrozenInstanceError):
        CTX.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"start_temperature": 0.0}, "start_temperature"),
        ({"min_temperature": 5.0, "max_temperature": 4.0}, "min_temperature"),
    ],
)
def test_stage_context_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StageContext(**{"epochs": 3, "start_temperature": 4.0, **kwargs})


def test_constant_for_stage() -> None:
    assert ConstantTemperature.for_stage(CTX).temperature == 8.0  # the coupled start
    assert ConstantTemperature.for_stage(CTX, base_temperature=3.5).step(4) == 3.5
    assert ConstantTemperature.for_stage(CTX, base_temperature=15.0).temperature == 10.0
    with pytest.raises(TypeError, match="alpha"):
        ConstantTemperature.for_stage(CTX, alpha=0.5)  # type: ignore[call-arg]


def test_temperate_for_stage_honours_every_setting() -> None:
    sched = TemperateSchedule.for_stage(
        CTX, alpha=0.5, beta=0.0, warmup=0.1, adapt_until=0.5, patience=3, plateau_tol=0.1
    )
    assert (sched.total_epochs, sched.base_temperature) == (10, 8.0)
    assert (sched.alpha, sched.beta, sched.warmup, sched.adapt_until) == (0.5, 0.0, 0.1, 0.5)
    assert (sched.patience, sched.plateau_tol) == (3, 0.1)
    assert (sched.min_temperature, sched.max_temperature) == (1.0, 10.0)  # the context's clamps
    # W = 1, A = 5: T = 8, then 0.5·T per adaptive epoch (beta 0), then decay to min.
    temps = [sched.step(e, 1.0 + e) for e in range(10)]
    assert temps[:5] == pytest.approx([8.0, 4.0, 2.0, 1.0, 1.0])
    assert temps[-1] == 1.0
    own = TemperateSchedule.for_stage(CTX, base_temperature=7.0, min_temperature=2.0, max_temperature=6.0)
    assert (own.base_temperature, own.min_temperature, own.max_temperature) == (6.0, 2.0, 6.0)
    low = TemperateSchedule.for_stage(CTX, min_temperature=9.0)
    assert low.base_temperature == 9.0  # the coupled start 8 clamped up to this stage's min


def test_gradient_norm_for_stage_honours_its_bounds() -> None:
    default = GradientNormTemperature.for_stage(CTX)
    assert (default.min_temperature, default.max_temperature) == (1.0, 8.0)  # max = coupled start
    assert GradientNormTemperature.for_stage(CTX, base_temperature=5.0).max_temperature == 5.0
    bounded = GradientNormTemperature.for_stage(CTX, min_temperature=2.0, max_temperature=3.0)
    assert (bounded.min_temperature, bounded.max_temperature, bounded.temperature) == (2.0, 3.0, 3.0)
    temps = updates(bounded, [4.0, 2.0, 0.0, 1e-9])
    assert temps == pytest.approx([2.0, 2.5, 3.0, 3.0])  # T = 3 − 1·g/4; vanishing g → max
    assert all(2.0 <= t <= 3.0 for t in temps)
    hot_floor = GradientNormTemperature.for_stage(CTX, min_temperature=9.0)
    assert (hot_floor.min_temperature, hot_floor.max_temperature) == (9.0, 9.0)
    with pytest.raises(ValueError, match="not both"):
        GradientNormTemperature.for_stage(CTX, max_temperature=3.0, base_temperature=3.0)
    with pytest.raises(ValueError, match="min_temperature"):
        GradientNormTemperature.for_stage(CTX, min_temperature=4.0, max_temperature=3.0)


def test_lookup_table_for_stage() -> None:
    lut = LookupTableTemperature.for_stage(CTX, table=[5.0, 4.0])
    assert [lut.step(e) for e in range(3)] == [5.0, 4.0, 4.0]
    with pytest.raises(TypeError, match="table"):
        LookupTableTemperature.for_stage(CTX)  # type: ignore[call-arg]


class _NoForStage(TemperatureSchedule):
    """A schedule usable by hand but not buildable for a stage (no for_stage)."""

    min_temperature = max_temperature = temperature = 2.0  # type: ignore[assignment]

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        return 2.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass


def test_a_schedule_without_for_stage_cannot_be_built_for_a_stage() -> None:
    assert _NoForStage().step_update(1, 3.0) == 2.0
    with pytest.raises(TypeError, match="_NoForStage does not define for_stage"):
        _NoForStage.for_stage(CTX)
    with pytest.raises(TypeError, match="_NoForStage declares neither Settings nor for_stage"):
        settings_model(_NoForStage)


# ---------------------------------------------------------------- recipe settings
EXAMPLE_SETTINGS: dict[str, dict[str, Any]] = {
    "constant": {},
    "temperate": {},
    "gradient_norm": {},
    "lookup_table": {"table": [3.0, 2.0]},
}


@pytest.mark.parametrize("key", sorted(EXAMPLE_SETTINGS))
def test_declared_settings_build_their_schedule(key: str) -> None:
    cls = TEMPERATURE_SCHEDULES.get(key)
    model = settings_model(cls)
    assert model is cls.Settings and issubclass(model, ScheduleSettings)
    assert model.model_config["extra"] == "forbid"
    settings = model.model_validate(EXAMPLE_SETTINGS[key]).model_dump()
    sched = cls.for_stage(CTX, **settings)  # every setting is a for_stage keyword
    assert type(sched) is cls
    params = inspect.signature(cls.for_stage).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        assert set(model.model_fields) <= set(params)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        model.model_validate({**EXAMPLE_SETTINGS[key], "colour": 1})


def test_temperate_settings_defaults_are_the_class_defaults() -> None:
    init = inspect.signature(TemperateSchedule.__init__).parameters
    fields = TemperateSchedule.Settings.model_fields
    assert set(fields) <= set(init)
    for name in set(fields) - {"base_temperature"}:  # base: empty means "the coupled start"
        assert fields[name].default == init[name].default, name


@pytest.mark.parametrize(
    ("key", "settings", "match"),
    [
        ("temperate", {"min_temperature": 5.0, "max_temperature": 2.0}, "min_temperature must be <="),
        ("temperate", {"warmup": 0.9, "adapt_until": 0.5}, "warmup must be <= adapt_until"),
        ("temperate", {"patience": True}, "patience"),
        ("temperate", {"alpha": float("nan")}, "alpha"),
        ("gradient_norm", {"max_temperature": 3.0, "base_temperature": 3.0}, "not both"),
        ("gradient_norm", {"min_temperature": 4.0, "max_temperature": 3.0}, "min_temperature must be <="),
        ("lookup_table", {}, "table"),
        ("lookup_table", {"table": []}, "table"),
        ("lookup_table", {"table": [2.0, 0.0]}, r"table\.1"),
        ("constant", {"base_temperature": 0.0}, "base_temperature"),
    ],
)
def test_settings_reject_bad_values(key: str, settings: dict[str, Any], match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        settings_model(TEMPERATURE_SCHEDULES.get(key)).model_validate(settings)


class _Halving(TemperatureSchedule):
    """A user schedule: T halves every ``every`` epochs from the stage's start."""

    def __init__(self, start: float, every: int = 2, floor: float = 1.0) -> None:
        self.start, self.every, self.floor = start, every, floor
        self.min_temperature, self.max_temperature = floor, start
        self._t = start

    @classmethod
    def for_stage(
        cls,
        ctx: StageContext,
        every: int = 2,
        floor: float | None = None,
        tag: Unresolvable = None,  # noqa: F821 - a name that cannot be resolved becomes Any
    ) -> _Halving:
        return cls(ctx.start_temperature, every, ctx.min_temperature if floor is None else floor)

    @property
    def temperature(self) -> float:
        return self._t

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        self._t = max(self.floor, self.start / 2 ** (epoch // self.every))
        return self._t

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self._t}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._t = state_dict["temperature"]


def test_settings_derived_from_for_stage_signature() -> None:
    model = settings_model(_Halving)
    assert issubclass(model, ScheduleSettings) and model.__name__ == "_HalvingSettings"
    assert list(model.model_fields) == ["every", "floor", "tag"]
    assert model().model_dump() == {"every": 2, "floor": None, "tag": None}
    assert model(every=3, floor=1.5).every == 3
    with pytest.raises(pydantic.ValidationError, match="every"):
        model(every="often")  # the annotation `int` is enforced
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        model(colour=1)
    assert model(tag=object()).tag is not None  # an unresolvable annotation accepts anything
    assert settings_model(_Halving) is model  # derived once
    sched = _Halving.for_stage(CTX, **model(every=1).model_dump())
    assert [sched.step(e) for e in range(4)] == [8.0, 4.0, 2.0, 1.0]


def test_settings_derived_for_open_and_required_parameters() -> None:
    class Open(_Halving):
        @classmethod
        def for_stage(cls, ctx: StageContext, rate: float, **settings: Any) -> Open:
            return cls(ctx.start_temperature, **settings)

    model = settings_model(Open)
    with pytest.raises(pydantic.ValidationError, match="rate"):
        model()  # no default: required
    assert model(rate=0.5, every=4).model_dump() == {"rate": 0.5, "every": 4}


@pytest.fixture
def registered_halving() -> Iterator[str]:
    with registered(TEMPERATURE_SCHEDULES, "test_halving", _Halving) as key:
        yield key


def test_a_registered_schedule_is_built_through_the_registry(registered_halving: str) -> None:
    cls = TEMPERATURE_SCHEDULES.get(registered_halving)
    sched = cls.for_stage(CTX, every=3)
    assert [sched.step(e) for e in range(7)] == [8.0] * 3 + [4.0] * 3 + [2.0]
    assert sched.step_update(10, 1.0) == 2.0 and not sched.uses_grad_norm  # the defaults


# ---------------------------------------------------------------- suggestion
@pytest.mark.parametrize(
    ("num_classes", "teacher", "student", "counts", "expected", "n_reasons"),
    [
        (10, 1_000, 1_000, None, 3.5, 1),
        (2, 1_000, 1_000, None, 3.5, 1),
        (100, 1_000, 1_000, None, 5.5, 1),
        (1000, 1_000, 1_000, None, 5.5, 1),
        (50, 1_000, 1_000, None, 3.5 + 2 * math.log10(5), 1),
        (10, 3_990, 1_000, None, 3.5, 1),  # ratio 3.99: no gap bonus
        (10, 4_000, 1_000, None, 4.5, 2),  # ratio 4: +1
        (10, 15_999, 1_000, None, 4.5, 2),
        (100, 16_000, 1_000, None, 7.5, 2),  # ratio 16: +2
        (3, 1_000, 1_000, [30, 15, 11], 3.5, 1),  # imbalance 30/11 < 3: no change, no reason
        (3, 1_000, 1_000, [30, 15, 10], 3.0, 2),  # imbalance 3: −0.5
        (3, 1_000, 1_000, [100, 50, 10], 2.5, 2),  # imbalance 10: −1
        (100, 64_000, 1_000, [10] * 99 + [1], 6.5, 3),
    ],
)
def test_suggest_initial_temperature(
    num_classes: int,
    teacher: int,
    student: int,
    counts: list[int] | None,
    expected: float,
    n_reasons: int,
) -> None:
    s = suggest_initial_temperature(num_classes, teacher, student, counts)
    assert isinstance(s, TemperatureSuggestion)
    assert s.temperature == pytest.approx(expected, rel=1e-12)
    assert 1.0 <= s.temperature <= 10.0
    assert len(s.reasons) == n_reasons and all(isinstance(r, str) and r for r in s.reasons)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 10, 10), "num_classes"),
        ((10.0, 10, 10), "num_classes"),
        ((10, 0, 10), "teacher_params"),
        ((10, 10, -5), "student_params"),
        ((3, 10, 10, [1, 2]), "class_counts"),
        ((3, 10, 10, [1, 0, 2]), r"class_counts\[1\]"),
    ],
)
def test_suggest_initial_temperature_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        suggest_initial_temperature(*args)


# ---------------------------------------------------------------- step-level (real epochs)
def test_temperate_within_epoch_closed_form_at_the_boundaries() -> None:
    # 5 epochs, adaptive at 0-1 (A = ceil(0.4 * 5) = 2), convergence S = 2, K = 2.
    sched = TemperateSchedule(5, base_temperature=6.0, warmup=0.0, adapt_until=0.4)
    twin = TemperateSchedule(5, base_temperature=6.0, warmup=0.0, adapt_until=0.4)  # per epoch
    t0 = 0.9 * 6.0 - 0.1 * 1.0
    assert sched.step(0, 1.0) == pytest.approx(t0) == twin.step(0, 1.0)
    assert sched.step(0.5) == sched.step(0.999) == pytest.approx(t0)  # adaptive T is constant in an epoch
    t1 = 0.9 * t0 - 0.1 * 1.0
    assert sched.step(1, 1.0) == pytest.approx(t1) == twin.step(1, 1.0)  # the update applied once
    assert sched.step(1.75) == pytest.approx(t1)
    cos = lambda k: 1.0 + (t1 - 1.0) * (1.0 + math.cos(math.pi * k / 2)) / 2  # noqa: E731
    assert sched.step(2.0) == pytest.approx(t1) == twin.step(2)  # T_enter at e = S
    assert sched.step(2.5) == pytest.approx(cos(0.5))  # within the epoch, between twin's 2 and 3
    assert sched.step(3) == pytest.approx(cos(1.0)) == twin.step(3)
    assert sched.step(3.999) > 1.0
    assert sched.step(4) == 1.0 == sched.step(4.5) == twin.step(4)  # exactly min_T in the last epoch
    with pytest.raises(ValueError, match="decrease"):
        sched.step(3.5)


def test_temperate_within_epoch_is_monotone_and_resumes_mid_epoch() -> None:
    sched = TemperateSchedule(4, base_temperature=8.0, warmup=0.0, adapt_until=0.0)
    values = [sched.step(e / 10) for e in range(40)]
    assert values == sorted(values, reverse=True) and values[0] == 8.0 and values[-1] == 1.0
    a = TemperateSchedule(4, base_temperature=8.0, warmup=0.0, adapt_until=0.0)
    a.step(1.25)
    b = TemperateSchedule(4, base_temperature=8.0, warmup=0.0, adapt_until=0.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.step(1.5) == a.step(1.5) and b.step(2.0) == a.step(2.0)


def test_fractional_epochs_of_the_other_schedules() -> None:
    assert TemperateSchedule.fractional_epochs and ConstantTemperature.fractional_epochs
    assert LookupTableTemperature([5.0, 3.0, 1.0]).step(1.9) == 3.0  # one entry per epoch
    assert ConstantTemperature(2.5).step(0.3) == 2.5
    assert not GradientNormTemperature.fractional_epochs  # its T moves per update, not with time
