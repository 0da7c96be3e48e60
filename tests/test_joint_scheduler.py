"""Tests of qtemperate.joint_scheduler against hand-computed values of the documented rules.

Coupling (module docstring): h(s) = log2(32 / min(w, a)); T0(s) = clamp(T_ref + step·h);
w_i(s) ∝ w_i · T_i^(−shift·h); T_i(t) = 1 + (T_i − 1)(T(t) − 1)/(T_ref − 1).
Inside a ``temperate`` stage: W = ⌈0.3·n⌉, A = ⌈0.8·n⌉ on the stage-local clock,
adaptive T ← max(min, 0.9·T − 0.1·L), cosine decay to min at the stage's last epoch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from qtemperate import bits
from qtemperate.joint_scheduler import (
    BitDropCoupling,
    BitStage,
    JointScheduler,
    NoCoupling,
    StageState,
    halvings,
)
from qtemperate.losses import TemperateLoss
from qtemperate.recipe import parse_recipe
from qtemperate.temperature import (
    TEMPERATURE_SCHEDULES,
    ConstantTemperature,
    GradientNormTemperature,
    LookupTableTemperature,
    StageContext,
    TemperateSchedule,
    TemperatureSchedule,
)
from tests.registry_helpers import registered

TEMPS = (6.0, 3.0, 1.0)


def three_stages(**kw: object) -> JointScheduler:
    """float(2) → W8A8(3) → W4A4(4): 9 epochs."""
    return JointScheduler(
        [BitStage("float", 2), BitStage("w8a8", 3, 8, 8), BitStage("w4a4", 4, 4, 4)],
        temperatures=TEMPS,
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ halvings
@pytest.mark.parametrize(
    ("w", "a", "h"),
    [(32, 32, 0.0), (8, 8, 2.0), (4, 4, 3.0), (2, 2, 4.0), (4, 8, 3.0), (8, 2, 4.0)],
)
def test_halvings_is_log2_32_over_min_bits(w: int, a: int, h: float) -> None:
    assert halvings(w, a) == h
    assert halvings is bits.halvings  # re-exported: the bit-width facts live in qtemperate.bits


# ------------------------------------------------------------------ stage boundaries
def test_stage_index_at_every_epoch_and_bounds() -> None:
    s = three_stages()
    assert s.total_epochs == 9
    assert [s.stage_index(e) for e in range(9)] == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert s.stage_bounds() == [(0, 2), (2, 5), (5, 9)]


def test_step_reports_stage_local_clock_and_bits() -> None:
    s = three_stages()
    losses = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2]
    states = [s.step(e, losses[e]) for e in range(9)]
    assert [st.stage_index for st in states] == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [st.epoch_in_stage for st in states] == [0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert [st.stage_started for st in states] == [
        True, False, True, False, False, True, False, False, False
    ]
    assert [st.stage_name for st in states] == ["float"] * 2 + ["w8a8"] * 3 + ["w4a4"] * 4
    assert [(st.weight_bits, st.act_bits) for st in states] == (
        [(32, 32)] * 2 + [(8, 8)] * 3 + [(4, 4)] * 4
    )
    assert [st.quantized for st in states] == [False] * 2 + [True] * 7
    assert [st.epoch for st in states] == list(range(9))
    assert s.state == states[-1]


# ------------------------------------------------------------------ starting temperature
def test_start_temperature_per_stage_follows_bit_drop_rule() -> None:
    s = three_stages()
    # T_ref = 6; +1 per halving: float h=0 → 6, W8A8 h=2 → 8, W4A4 h=3 → 9.
    assert [s.start_temperature(i) for i in range(3)] == [6.0, 8.0, 9.0]
    # The first epoch of each stage is warm-up at that temperature.
    losses = [2.0] * 9
    states = {e: s.step(e, losses[e]) for e in range(9)}
    assert states[0].temperature == 6.0
    assert states[2].temperature == 8.0
    assert states[5].temperature == 9.0


def test_start_temperature_clamped_at_max() -> None:
    s = three_stages(max_temperature=8.5)
    # W4A4: 6 + 3 = 9 > 8.5 → 8.5; W8A8: 8 stays.
    assert [s.start_temperature(i) for i in range(3)] == [6.0, 8.0, 8.5]
    s2 = JointScheduler([BitStage("w2a2", 1, 2, 2)], temperatures=(8.0, 2.0))
    assert s2.start_temperature(0) == 10.0  # 8 + 4 = 12 → default max 10
    assert s2.step(0).temperature == 10.0


def test_coupling_step_size_is_configurable() -> None:
    s = three_stages(coupling=BitDropCoupling(step=0.5))
    assert [s.start_temperature(i) for i in range(3)] == [6.0, 7.0, 7.5]


def test_explicit_base_temperature_overrides_coupling() -> None:
    s = JointScheduler(
        [BitStage("w4a4", 1, 4, 4, schedule_kwargs={"base_temperature": 2.5})],
        temperatures=TEMPS,
    )
    assert s.start_temperature(0) == 2.5
    assert s.step(0).temperature == 2.5


def test_no_coupling_keeps_reference_temperature_and_base_weights() -> None:
    s = three_stages(coupling=NoCoupling(), weights=(0.2, 0.5, 0.3))
    assert [s.start_temperature(i) for i in range(3)] == [6.0, 6.0, 6.0]
    for i in range(3):
        assert s.stage_weights(i) == pytest.approx((0.2, 0.5, 0.3))


# ------------------------------------------------------------------ weights
def _hand_weights(h: float) -> tuple[float, float, float]:
    raw = (6.0 ** (-0.25 * h), 3.0 ** (-0.25 * h), 1.0)  # uniform base weights cancel
    total = sum(raw)
    return (raw[0] / total, raw[1] / total, raw[2] / total)


def test_stage_weights_follow_hand_formula() -> None:
    s = three_stages()
    assert s.stage_weights(0) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s.stage_weights(1) == pytest.approx(_hand_weights(2.0))
    assert s.stage_weights(2) == pytest.approx(_hand_weights(3.0))
    # Spelled out: h=2 → (6^-½, 3^-½, 1)/Σ ≈ (0.205605, 0.290769, 0.503626).
    assert s.stage_weights(1) == pytest.approx((0.205605, 0.290769, 0.503626), abs=1e-6)
    # h=3 → (6^-¾, 3^-¾, 1)/Σ ≈ (0.153481, 0.258124, 0.588395).
    assert s.stage_weights(2) == pytest.approx((0.153481, 0.258124, 0.588395), abs=1e-6)
    for i in range(3):
        assert math.fsum(s.stage_weights(i)) == pytest.approx(1.0)
    assert s.step(3, 1.0).weights == s.stage_weights(1)


def test_stage_weights_with_nonuniform_base() -> None:
    s = JointScheduler([BitStage("w8a8", 1, 8, 8)], temperatures=(4.0, 1.0), weights=(3.0, 1.0))
    # h=2: raw = (0.75·4^-½, 0.25·1) = (0.375, 0.25) → (0.6, 0.4).
    assert s.stage_weights(0) == pytest.approx((0.6, 0.4))


def test_weights_shift_towards_low_temperature_as_bits_drop() -> None:
    s = three_stages()
    w = [s.stage_weights(i) for i in range(3)]
    hi = [x[0] for x in w]  # weight of T=6
    lo = [x[2] for x in w]  # weight of T=1
    assert hi[0] > hi[1] > hi[2]
    assert lo[0] < lo[1] < lo[2]


# ------------------------------------------------------------------ affine map
def test_affine_map_at_reference_is_identity() -> None:
    s = three_stages()
    assert s.scale_temperatures(6.0) == pytest.approx(TEMPS)


def test_affine_map_at_one_collapses_to_one() -> None:
    s = three_stages()
    assert s.scale_temperatures(1.0) == (1.0, 1.0, 1.0)


def test_affine_map_intermediate_and_above_reference() -> None:
    s = three_stages()
    # T = 3.5 → frac = 2.5/5 = 0.5 → (1 + 5·0.5, 1 + 2·0.5, 1) = (3.5, 2, 1).
    assert s.scale_temperatures(3.5) == pytest.approx((3.5, 2.0, 1.0))
    # T = 8 → frac = 7/5 → (8, 1 + 2·1.4, 1) = (8, 3.8, 1).
    assert s.scale_temperatures(8.0) == pytest.approx((8.0, 3.8, 1.0))


def test_affine_map_clamps_to_bounds() -> None:
    s = three_stages()
    # T = 12 → frac = 11/5 → (12 → 10, 1 + 2·2.2 = 5.4, 1).
    assert s.scale_temperatures(12.0) == pytest.approx((10.0, 5.4, 1.0))
    s2 = three_stages(min_temperature=1.5)
    # T = 1.5 → frac = 0.1 → (1.5, 1.2 → 1.5, 1 → 1.5).
    assert s2.scale_temperatures(1.5) == pytest.approx((1.5, 1.5, 1.5))


def test_single_temperature_scales_to_itself() -> None:
    s = JointScheduler([BitStage("w8a8", 2, 8, 8)], temperatures=(4.0,))
    assert s.scale_temperatures(2.7) == (2.7,)
    assert s.step(0).temperatures == (6.0,)  # 4 + 2 halvings


# ------------------------------------------------------------------ temperate stage
LOSSES = [2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9]
# Stage of 10 epochs: W = 3, A = 8; convergence is epochs 8, 9 (K = 1).
FLOAT_T = [6.0, 6.0, 6.0, 5.25, 4.585, 3.9965, 3.47685, 3.019165, 3.019165, 1.0]
W8A8_T = [8.0, 8.0, 8.0, 7.05, 6.205, 5.4545, 4.78905, 4.200145, 4.200145, 1.0]
PHASES = ["warmup"] * 3 + ["adaptive"] * 5 + ["convergence"] * 2


def test_temperate_stages_run_on_stage_local_clock() -> None:
    s = JointScheduler(
        [BitStage("float", 10), BitStage("w8a8", 10, 8, 8)], temperatures=TEMPS
    )
    states = [s.step(e, LOSSES[e % 10]) for e in range(20)]
    got = [st.temperature for st in states]
    assert got[:10] == pytest.approx(FLOAT_T, abs=1e-12)
    assert got[10:] == pytest.approx(W8A8_T, abs=1e-12)
    assert [st.phase for st in states] == PHASES * 2
    # Last epoch of each stage: exactly min_temperature (non-empty convergence phase).
    assert states[9].temperature == 1.0
    assert states[19].temperature == 1.0
    # The multi-scale set follows the affine map, e.g. T = 7.05 → (7.05, 1 + 2·6.05/5, 1).
    assert states[13].temperatures == pytest.approx((7.05, 3.42, 1.0))


def test_short_stage_does_not_collapse_to_min() -> None:
    s = three_stages()
    # W8A8 stage of 3: W = 1, A = 3 → warm-up, adaptive, adaptive; no convergence.
    states = [s.step(e, 2.0) for e in range(5)]
    w8 = [st.temperature for st in states[2:5]]
    assert w8 == pytest.approx([8.0, 0.9 * 8 - 0.2, 0.9 * 7.0 - 0.2])
    assert [st.phase for st in states[2:5]] == ["warmup", "adaptive", "adaptive"]
    assert w8[-1] > 1.0


def test_adaptive_is_floored_at_min_temperature() -> None:
    s = JointScheduler([BitStage("float", 10, schedule_kwargs={"warmup": 0.0})], temperatures=TEMPS)
    # 0.9·6 − 0.1·100 = −4.6 → floored at min 1.
    assert s.step(0, 100.0).temperature == 1.0


def test_plateau_ends_adaptive_phase_early() -> None:
    s = JointScheduler(
        [BitStage("w8a8", 10, 8, 8, schedule_kwargs={"patience": 2})], temperatures=TEMPS
    )
    states = [s.step(e, 1.0) for e in range(10)]
    t5 = 0.9 * (0.9 * (0.9 * 8 - 0.1) - 0.1) - 0.1  # 5.561
    # Epochs 3, 4, 5 adaptive; 2 equal-loss steps after epoch 3 → plateau after epoch 5,
    # convergence starts at 6 with T_enter = T5, K = 9 − 6 = 3.
    expected = [
        8.0, 8.0, 8.0,
        7.1, 6.29, t5,
        t5,
        1.0 + (t5 - 1.0) * (1 + math.cos(math.pi / 3)) / 2,  # ·0.75
        1.0 + (t5 - 1.0) * (1 + math.cos(2 * math.pi / 3)) / 2,  # ·0.25
        1.0,
    ]
    assert [st.temperature for st in states] == pytest.approx(expected, abs=1e-12)
    assert t5 == pytest.approx(5.561)
    assert states[7].temperature == pytest.approx(1.0 + 4.561 * 0.75)
    assert [st.phase for st in states] == ["warmup"] * 3 + ["adaptive"] * 3 + ["convergence"] * 4


def test_adaptive_stage_requires_val_loss() -> None:
    s = three_stages()
    s.step(2, 1.0)  # W8A8 warm-up
    with pytest.raises(ValueError, match="val_loss"):
        s.step(3)  # W8A8 adaptive


# ------------------------------------------------------------------ other stage kinds
def test_constant_stage_holds_coupled_temperature() -> None:
    s = JointScheduler(
        [BitStage("float", 2), BitStage("w8a8", 3, 8, 8, schedule="constant")], temperatures=TEMPS
    )
    states = [s.step(e, 5.0) for e in range(5)]
    assert [st.temperature for st in states[2:]] == [8.0, 8.0, 8.0]
    assert [st.phase for st in states[2:]] == ["constant"] * 3
    assert states[2].temperatures == pytest.approx((8.0, 3.8, 1.0))
    assert not s.wants_grad_norm
    assert s.step_update(10, 3.0) is states[-1]  # no effect on a constant stage
    assert s.step_update(11) is states[-1]


def test_constant_stage_base_temperature() -> None:
    s = JointScheduler(
        [BitStage("w8a8", 2, 8, 8, schedule="constant", schedule_kwargs={"base_temperature": 3.5})],
        temperatures=TEMPS,
    )
    assert [s.step(e).temperature for e in range(2)] == [3.5, 3.5]


def test_gradient_norm_stage_moves_temperature_per_update() -> None:
    s = JointScheduler([BitStage("w4a4", 2, 4, 4, schedule="gradient_norm")], temperatures=TEMPS)
    # max = coupled T0 = 6 + 3 = 9, min = 1; before any norm T = max.
    st0 = s.step(0)
    assert s.wants_grad_norm
    assert st0.temperature == 9.0
    assert st0.phase == "gradient_norm"
    # T = 9 − 8·g/g_max with g_max the running max.
    expected = [(2.0, 1.0), (1.0, 5.0), (0.5, 7.0), (4.0, 1.0), (1.0, 7.0), (0.0, 9.0)]
    for n, (g, t) in enumerate(expected, start=1):
        st = s.step_update(n, g)
        assert st.temperature == pytest.approx(t)
        assert st.epoch == 0 and st.epoch_in_stage == 0
        assert s.state == st
    st = s.step_update(7, torch.tensor(2.0))  # 9 − 8·0.5 = 5 → (5, 1 + 2·0.8, 1)
    assert st.temperatures == pytest.approx((5.0, 2.6, 1.0))
    # The next epoch keeps the last per-update temperature.
    assert s.step(1).temperature == pytest.approx(5.0)
    with pytest.raises(ValueError, match="grad_norm is required"):
        s.step_update(8)


@pytest.mark.parametrize(
    ("settings", "lo", "hi"),
    [
        ({"max_temperature": 3.0}, 1.0, 3.0),
        ({"min_temperature": 2.0, "max_temperature": 3.0}, 2.0, 3.0),
        ({"min_temperature": 2.0}, 2.0, 9.0),  # max = the coupled start, 6 + 3
        ({"base_temperature": 4.0}, 1.0, 4.0),
    ],
)
def test_gradient_norm_stage_honours_its_bounds(settings: dict[str, float], lo: float, hi: float) -> None:
    s = JointScheduler(
        [BitStage("w4a4", 1, 4, 4, schedule="gradient_norm", schedule_kwargs=settings)],
        temperatures=TEMPS,
    )
    assert s.step(0).temperature == hi
    norms = [4.0, 2.0, 1.0, 0.0, 1e-12, 3.0]
    temps = [s.step_update(n, g).temperature for n, g in enumerate(norms, start=1)]
    # T = hi − (hi − lo)·g/4 (g_max = 4 from the first update on).
    assert temps == pytest.approx([hi - (hi - lo) * g / 4.0 for g in norms])
    assert all(lo <= t <= hi for t in temps)
    assert temps[0] == lo and temps[3] == hi  # the largest norm gives min, a vanishing one max


def test_observe_grad_norm_is_a_deprecated_alias() -> None:
    s = JointScheduler([BitStage("w4a4", 2, 4, 4, schedule="gradient_norm")], temperatures=TEMPS)
    with pytest.raises(RuntimeError), pytest.warns(DeprecationWarning):
        s.observe_grad_norm(1.0)
    with pytest.raises(RuntimeError, match="before step_update"):
        s.step_update(1, 1.0)
    ref = JointScheduler([BitStage("w4a4", 2, 4, 4, schedule="gradient_norm")], temperatures=TEMPS)
    s.step(0)
    ref.step(0)
    for n, g in enumerate([2.0, 1.0], start=1):
        with pytest.warns(DeprecationWarning, match=r"0\.2\.0.*step_update\(num_updates, grad_norm\)"):
            assert s.observe_grad_norm(g) == ref.step_update(n, g)
    c = JointScheduler([BitStage("w8a8", 2, 8, 8, schedule="constant")], temperatures=TEMPS)
    st = c.step(0)
    with pytest.warns(DeprecationWarning):
        assert c.observe_grad_norm(3.0) is st  # no effect on a constant stage, as before


def test_lookup_table_stage_replays_table() -> None:
    s = JointScheduler(
        [BitStage("w8a8", 3, 8, 8, schedule="lookup_table",
                  schedule_kwargs={"table": [5.0, 4.0]})],
        temperatures=TEMPS,
    )
    assert [s.step(e).temperature for e in range(3)] == [5.0, 4.0, 4.0]
    assert not s.wants_grad_norm
    assert s.step_update(5, 1.0).temperature == 4.0


def test_step_update_keeps_temperate_stage_temperature() -> None:
    s = three_stages()
    st = s.step(0, 2.0)
    assert not s.wants_grad_norm
    before = s.state_dict()
    assert s.step_update(1, 7.0) is st and s.step_update(2) is st
    assert s.state_dict() == before


def test_each_stage_schedule_is_built_through_the_registry() -> None:
    s = JointScheduler(
        [
            BitStage("float", 2),
            BitStage("c", 2, 8, 8, schedule="constant"),
            BitStage("g", 2, 8, 8, schedule="gradient_norm"),
            BitStage("l", 2, 4, 4, schedule="lookup_table", schedule_kwargs={"table": [2.0]}),
        ],
        temperatures=TEMPS,
    )
    kinds = [TemperateSchedule, ConstantTemperature, GradientNormTemperature, LookupTableTemperature]
    assert [type(s.schedule(i)) for i in range(4)] == kinds
    assert [TEMPERATURE_SCHEDULES.get(st.schedule) for st in s.stages] == kinds
    assert s.stage_context(2) == StageContext(
        epochs=2, start_temperature=8.0, min_temperature=1.0, max_temperature=10.0
    )
    wants = []
    for e in range(s.total_epochs):
        s.step(e, 1.0)
        wants.append(s.wants_grad_norm)
    assert wants == [False] * 4 + [True] * 2 + [False] * 2


def test_wants_grad_norm_before_any_step_is_the_first_stage() -> None:
    first_g = JointScheduler(
        [BitStage("g", 1, 8, 8, schedule="gradient_norm"), BitStage("t", 1, 4, 4)], temperatures=TEMPS
    )
    assert first_g.wants_grad_norm
    assert not three_stages().wants_grad_norm


@pytest.mark.parametrize(
    ("schedule", "settings", "match"),
    [
        ("constant", {"alpha": 0.5}, r"stage 's' \(schedule 'constant'\): alpha: not a setting.*base_temperature"),
        ("temperate", {"table": [1.0]}, r"table: not a setting of this schedule; its settings: base_temperature"),
        ("lookup_table", {"table": [1.0], "min_temperature": 2.0}, "min_temperature: not a setting"),
        ("gradient_norm", {"max_temperature": 3.0, "base_temperature": 2.0}, "not both"),
        ("temperate", {"alpha": -1.0}, r"stage 's' \(schedule 'temperate'\): alpha must be"),
        ("lookup_table", {}, r"stage 's' \(schedule 'lookup_table'\): .*table"),
    ],
)
def test_a_setting_is_honoured_or_rejected(schedule: str, settings: dict[str, Any], match: str) -> None:
    stage = BitStage("s", 2, 8, 8, schedule=schedule, schedule_kwargs=settings)
    with pytest.raises(ValueError, match=match):
        JointScheduler([stage], temperatures=TEMPS)


# ------------------------------------------------------------------ idempotence / state
def test_step_is_idempotent_for_the_same_epoch() -> None:
    s = JointScheduler([BitStage("float", 10)], temperatures=TEMPS)
    for e in range(4):
        s.step(e, LOSSES[e])
    first = s.step(4, 1.4)
    again = s.step(4, 99.0)  # a second call must not apply the update twice
    assert again == first
    assert first.temperature == pytest.approx(4.585)
    assert s.step(5, 1.3).temperature == pytest.approx(3.9965)


def _mixed_scheduler() -> JointScheduler:
    return JointScheduler(
        [
            BitStage("float", 4),
            BitStage("w8a8", 8, 8, 8, schedule_kwargs={"patience": 2}),
            BitStage("w4a4", 3, 4, 4, schedule="gradient_norm"),
        ],
        temperatures=TEMPS,
        weights=(0.2, 0.5, 0.3),
    )


def _drive(s: JointScheduler, epochs: range) -> list[StageState]:
    out = []
    for e in epochs:
        st = s.step(e, 1.0 if e >= 6 else 2.0 - 0.1 * e)
        for n, g in enumerate((3.0, 1.0, 2.0)):
            st = s.step_update(3 * e + n, g + e if s.wants_grad_norm else None)
        out.append(st)
    return out


@pytest.mark.parametrize("via_json", [False, True])
@pytest.mark.parametrize("cut", [0, 3, 7, 9, 12, 13])
def test_state_dict_round_trip_mid_run(cut: int, via_json: bool) -> None:
    ref = _mixed_scheduler()
    assert ref.total_epochs == 15
    full = _drive(ref, range(15))

    a = _mixed_scheduler()
    _drive(a, range(cut))
    sd = a.state_dict()
    if via_json:
        sd = json.loads(json.dumps(sd))
    b = _mixed_scheduler()
    b.load_state_dict(sd)
    assert b.state == a.state
    if cut:
        assert b.step(cut - 1) == a.step(cut - 1)  # resume re-steps the saved epoch
    rest = _drive(b, range(cut, 15))
    assert rest == full[cut:]


def test_plateau_survives_state_dict() -> None:
    ref = _mixed_scheduler()
    full = _drive(ref, range(12))
    # W8A8 (epochs 4..11, local 0..7): W = 3, A = 7; constant loss 1.0 from global 6 on.
    a = _mixed_scheduler()
    _drive(a, range(11))
    b = _mixed_scheduler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.step(11, 1.0) == full[11]
    assert full[11].temperature == 1.0
    # Adaptive local 3..6 = global 7..10 with loss 1.0: plateau after local 5 (patience 2),
    # so local 6 (global 10) is convergence at T_enter = T(global 9) instead of adaptive.
    assert full[10].phase == "convergence"
    assert full[10].temperature == full[9].temperature


def test_load_state_dict_rejects_stage_count_mismatch() -> None:
    a = three_stages()
    b = JointScheduler([BitStage("w8a8", 3, 8, 8)], temperatures=TEMPS)
    with pytest.raises(ValueError, match="stages"):
        b.load_state_dict(a.state_dict())


def test_state_dict_before_any_step() -> None:
    a = three_stages()
    b = three_stages()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state is None
    assert b.step(0).temperature == 6.0


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "make",
    [
        lambda: JointScheduler([], temperatures=TEMPS),
        lambda: BitStage("s", 0),
        lambda: BitStage("s", -1),
        lambda: BitStage("s", 1, 9, 9),
        lambda: BitStage("s", 1, 8, 1),
        lambda: BitStage("s", 1, 16, 16),
        lambda: BitStage("s", 1, 8, 8, schedule="cosine"),
        lambda: BitStage("s", 1, 8.0, 8),
        lambda: JointScheduler([BitStage("s", 1)], temperatures=()),
        lambda: JointScheduler([BitStage("s", 1)], temperatures=(4.0, 0.0)),
        lambda: JointScheduler([BitStage("s", 1)], temperatures=(float("nan"),)),
        lambda: JointScheduler([BitStage("s", 1)], temperatures=(4.0, 2.0), weights=(1.0,)),
        lambda: JointScheduler([BitStage("s", 1)], min_temperature=5.0, max_temperature=2.0),
        lambda: JointScheduler([BitStage("s", 1)], min_temperature=0.0),
        lambda: JointScheduler([BitStage("s", 1, 8, 8, schedule="lookup_table")]),
    ],
    ids=[
        "empty-stages", "epochs-0", "epochs-neg", "bits-9", "act-bits-1", "bits-16",
        "unknown-schedule", "float-bits", "no-temps", "temp-0", "temp-nan", "weights-len",
        "min-gt-max", "min-0", "lut-no-table",
    ],
)
def test_bad_arguments_raise_value_error(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("epoch", [-1, 9, 100, 9.5, -0.5, float("nan"), True, "0"])
def test_epoch_out_of_range_or_not_a_number_raises(epoch: object) -> None:
    s = three_stages()
    with pytest.raises(ValueError, match="epoch"):
        s.step(epoch)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        s.stage_index(epoch)  # type: ignore[arg-type]


def test_unknown_schedule_lists_the_registered_kinds() -> None:
    with pytest.raises(ValueError, match=r"stage 's': unknown temperature schedule 'cosine'; "
                       r"known: constant, gradient_norm, lookup_table, temperate"):
        BitStage("s", 1, schedule="cosine")


def test_float_stage_after_bit_width_is_not_quantized() -> None:
    assert BitStage("f", 1).quantized is False
    assert BitStage("q", 1, 8, 8).quantized is True
    assert BitStage("q", 1, 32, 8).quantized is True


# ------------------------------------------------------------------ user loop
def _user_loop(stages: list[BitStage]) -> list[tuple[StageState, float]]:
    """The module docstring's loop with a tiny linear student/teacher (no Brevitas)."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    sched = JointScheduler(stages, temperatures=(6.0, 3.0, 1.0))
    loss_fn = TemperateLoss(kd_weight=0.9, temperatures=(6.0, 3.0, 1.0))
    val_loss: float | None = None
    out = []
    for epoch in range(sched.total_epochs):
        st = sched.step(epoch, val_loss)
        loss_fn.set_temperatures(st.temperatures, st.weights)
        if len(set(st.temperatures)) == len(st.temperatures):
            assert loss_fn.temperatures == st.temperatures
            assert loss_fn.weights == pytest.approx(st.weights)
        else:  # only at T = 1, where every scale is 1: merged, weights summed
            assert st.temperatures == (1.0,) * len(st.temperatures)
            assert loss_fn.temperatures == (1.0,)
            assert loss_fn.weights == pytest.approx((1.0,))
        with torch.no_grad():
            t_out = teacher(x)
        loss = loss_fn(student(x), t_out, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val_loss = float(nn.functional.cross_entropy(student(x), y))
        out.append((st, float(loss.detach())))
    return out


def test_user_loop_from_module_docstring() -> None:
    out = _user_loop([BitStage("w8a8", 3, 8, 8), BitStage("w4a4", 3, 4, 4)])
    assert len(out) == 6
    assert all(math.isfinite(v) for _, v in out)
    assert [st.stage_started and st.quantized for st, _ in out] == [
        True, False, False, True, False, False
    ]
    assert out[0][0].temperatures == pytest.approx((8.0, 3.8, 1.0))
    assert out[3][0].temperatures == pytest.approx((9.0, 4.2, 1.0))


def test_user_loop_survives_convergence_to_min() -> None:
    # W8A8 stage of 10 epochs: the last epoch decays to T = 1, so the affine map hands
    # over (1, 1, 1); TemperateLoss merges equal temperatures, summing their weights.
    out = _user_loop([BitStage("w8a8", 10, 8, 8)])
    assert len(out) == 10
    assert all(math.isfinite(v) for _, v in out)
    last = out[-1][0]
    assert last.temperature == 1.0
    assert last.temperatures == (1.0, 1.0, 1.0)
    assert out[0][0].temperatures == pytest.approx((8.0, 3.8, 1.0))


def test_gradient_norm_stage_feeds_temperate_loss() -> None:
    s = JointScheduler([BitStage("w4a4", 2, 4, 4, schedule="gradient_norm")], temperatures=TEMPS)
    loss_fn = TemperateLoss(kd_weight=0.9, temperatures=TEMPS)
    s.step(0)
    st = s.step_update(1, 2.0)  # first norm: g = g_max → T = min = 1 → (1, 1, 1)
    assert st.temperatures == (1.0, 1.0, 1.0)
    loss_fn.set_temperatures(st.temperatures, st.weights)
    assert loss_fn.temperatures == (1.0,)
    assert loss_fn.weights == pytest.approx((1.0,))
    st = s.step_update(2, 1.0)  # 9 − 8·0.5 = 5 → (5, 2.6, 1)
    loss_fn.set_temperatures(st.temperatures, st.weights)
    assert loss_fn.temperatures == pytest.approx((5.0, 2.6, 1.0))


# ------------------------------------------------------------------ from a recipe
def _recipe(stages: list[dict[str, Any]], **distillation: Any) -> Any:
    return parse_recipe(
        {
            "name": "r",
            "data": {"name": "digits"},
            "teacher": {"model": "small_cnn", "train": {"epochs": 1}},
            "stages": stages,
            "distillation": {"temperatures": [6.0, 3.0, 1.0], **distillation},
        }
    )


def test_from_recipe_builds_stages_temperatures_and_coupling() -> None:
    r = _recipe(
        [
            {"epochs": 2},
            {"name": "int8", "epochs": 3, "weight_bits": 8, "act_bits": 8, "lr": 0.01,
             "temperature": {"schedule": "constant", "base_temperature": 3.5}},
            {"epochs": 4, "weight_bits": 4, "act_bits": 4,
             "temperature": {"warmup": 0.0, "adapt_until": 0.5, "patience": 2}},
        ],
        weights=[0.2, 0.5, 0.3],
        temperature_step_per_halving=0.5,
        weight_shift=0.5,
    )
    s = JointScheduler.from_recipe(r)
    assert [st.name for st in s.stages] == ["float", "int8", "w4a4"]
    assert [(st.epochs, st.weight_bits, st.act_bits, st.lr) for st in s.stages] == [
        (2, 32, 32, None), (3, 8, 8, 0.01), (4, 4, 4, None)
    ]
    assert [st.schedule for st in s.stages] == ["temperate", "constant", "temperate"]
    assert s.base_temperatures == TEMPS and s.base_weights == pytest.approx((0.2, 0.5, 0.3))
    assert s.coupling == BitDropCoupling(step=0.5, shift=0.5)
    assert [s.start_temperature(i) for i in range(3)] == [6.0, 3.5, 7.5]  # 6 + 0.5·3
    w = s.stage_weights(2)
    raw = [0.2 * 6 ** -1.5, 0.5 * 3 ** -1.5, 0.3]  # w_i · T_i^(−0.5·3)
    assert w == pytest.approx([x / sum(raw) for x in raw])
    last = s.schedule(2)
    assert isinstance(last, TemperateSchedule)
    assert (last.warmup, last.adapt_until, last.patience, last.base_temperature) == (0.0, 0.5, 2, 7.5)
    assert [s.step(e, 1.0).temperature for e in range(2, 5)] == [3.5] * 3


def test_from_recipe_without_coupling() -> None:
    s = JointScheduler.from_recipe(_recipe([{"epochs": 1, "weight_bits": 4, "act_bits": 4}], coupling="none"))
    assert isinstance(s.coupling, NoCoupling)
    assert s.start_temperature(0) == 6.0 and s.stage_weights(0) == pytest.approx((1 / 3,) * 3)


def test_from_recipe_gradient_norm_honours_max_temperature() -> None:
    # Before: a recipe's max_temperature was ignored here (set 3, got the coupled 9).
    r = _recipe([{"epochs": 2, "weight_bits": 4, "act_bits": 4,
                  "temperature": {"schedule": "gradient_norm", "max_temperature": 3}}])
    s = JointScheduler.from_recipe(r)
    assert s.step(0).temperature == 3.0 and s.wants_grad_norm
    temps = [s.step_update(n, g).temperature for n, g in enumerate([5.0, 2.5, 0.0, 1e-9], start=1)]
    assert temps == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert all(1.0 <= t <= 3.0 for t in temps)
    default = JointScheduler.from_recipe(
        _recipe([{"epochs": 1, "weight_bits": 4, "act_bits": 4, "temperature": {"schedule": "gradient_norm"}}])
    )
    assert default.step(0).temperature == 9.0  # unset: max = the coupled start, as before


@pytest.mark.parametrize(
    "block",
    [
        {},
        {"schedule": "temperate", "base_temperature": 5.0, "alpha": 0.8, "beta": 0.2, "warmup": 0.2,
         "adapt_until": 0.6, "min_temperature": 1.5, "max_temperature": 8.0, "patience": 2, "plateau_tol": 0.01},
        {"schedule": "constant"},
        {"schedule": "constant", "base_temperature": 2.5},
        {"schedule": "gradient_norm", "min_temperature": 2.0, "max_temperature": 4.0},
        {"schedule": "lookup_table", "table": [5.0, 3.0, 2.0]},
    ],
    ids=["default", "temperate", "constant", "constant-base", "gradient_norm", "lookup_table"],
)
def test_from_recipe_matches_the_hand_built_scheduler(block: dict[str, Any]) -> None:
    r = _recipe([{"epochs": 5, "weight_bits": 8, "act_bits": 8, "temperature": block}])
    settings = {k: v for k, v in block.items() if k != "schedule"}
    by_hand = JointScheduler(
        [BitStage("w8a8", 5, 8, 8, schedule=block.get("schedule", "temperate"), schedule_kwargs=settings)],
        temperatures=TEMPS,
    )
    s = JointScheduler.from_recipe(r)
    for e in range(5):
        assert s.step(e, 2.0 - 0.2 * e) == by_hand.step(e, 2.0 - 0.2 * e)
        assert s.step_update(e + 1, 1.0 + e if s.wants_grad_norm else None) == by_hand.step_update(
            e + 1, 1.0 + e if by_hand.wants_grad_norm else None
        )
    assert s.state_dict() == by_hand.state_dict()


# ------------------------------------------------------------------ a user's schedule
class _Steps(TemperatureSchedule):
    """T = start − drop · epoch, floored at the scheduler's min."""

    def __init__(self, start: float, drop: float, floor: float) -> None:
        self.start, self.drop = start, drop
        self.min_temperature, self.max_temperature = floor, start
        self._t = start

    @classmethod
    def for_stage(cls, ctx: StageContext, drop: float = 1.0) -> _Steps:
        return cls(ctx.start_temperature, drop, ctx.min_temperature)

    @property
    def temperature(self) -> float:
        return self._t

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        self._t = max(self.min_temperature, self.start - self.drop * epoch)
        return self._t

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self._t}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._t = float(state_dict["temperature"])


@pytest.fixture
def steps_kind() -> Iterator[str]:
    with registered(TEMPERATURE_SCHEDULES, "test_steps", _Steps) as key:
        yield key


def test_a_registered_schedule_runs_a_stage(steps_kind: str) -> None:
    s = JointScheduler(
        [BitStage("float", 1), BitStage("w8a8", 4, 8, 8, schedule=steps_kind, schedule_kwargs={"drop": 2.5})],
        temperatures=TEMPS,
    )
    assert isinstance(s.schedule(1), _Steps)
    assert [s.step(e).temperature for e in range(5)] == [6.0, 8.0, 5.5, 3.0, 1.0]  # T0 = 6 + 2
    assert s.state.phase == steps_kind and not s.wants_grad_norm
    b = JointScheduler(
        [BitStage("float", 1), BitStage("w8a8", 4, 8, 8, schedule=steps_kind, schedule_kwargs={"drop": 2.5})],
        temperatures=TEMPS,
    )
    b.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert b.state == s.state and b.schedule(1).temperature == 1.0
    with pytest.raises(ValueError, match=r"speed: not a setting of this schedule; its settings: drop"):
        JointScheduler([BitStage("s", 1, schedule=steps_kind, schedule_kwargs={"speed": 1})])


def test_an_unregistered_schedule_is_unknown(steps_kind: str) -> None:
    BitStage("s", 1, schedule=steps_kind)
    TEMPERATURE_SCHEDULES.unregister(steps_kind)
    try:
        with pytest.raises(ValueError, match="unknown temperature schedule 'test_steps'"):
            BitStage("s", 1, schedule=steps_kind)
    finally:
        TEMPERATURE_SCHEDULES.register(steps_kind, _Steps)


# ------------------------------------------------------------------ step-level use
def _two_stages(**kw: Any) -> JointScheduler:
    """W8A8 (1 epoch, warm-up at T0 = 6 + 2) -> W4A4 (3 epochs, cosine from T0 = 6 + 3 at once)."""
    return JointScheduler(
        [BitStage("w8a8", 1, 8, 8), BitStage("w4a4", 3, 4, 4, schedule_kwargs={"warmup": 0.0, "adapt_until": 0.0})],
        temperatures=(6.0, 3.0, 1.0), **kw,
    )


def test_updates_per_epoch_moves_the_cosine_within_epochs() -> None:
    upe = 4
    sched = _two_stages(updates_per_epoch=upe)
    assert sched.moves_per_update is False or sched.state is None  # w8a8 warm-up: nothing moves yet
    n = 0
    for epoch in range(sched.total_epochs):
        st = sched.step(epoch)
        for i in range(upe):
            st = sched.step_update(n)
            assert st.epoch == epoch and st.epoch_fraction == i / upe
            if epoch == 0:
                want = 8.0  # one-epoch warm-up at 6 + 2 halvings
            else:
                k = (epoch - 1) + i / upe  # W4A4: S = 0, K = 2, T_enter = 9
                want = 1.0 if k >= 2 else 1.0 + 8.0 * (1 + math.cos(math.pi * k / 2)) / 2
            assert st.temperature == pytest.approx(want), (epoch, i)
            assert st.weight_bits == (8 if epoch == 0 else 4)
            assert st.temperatures == sched.scale_temperatures(st.temperature)
            n += 1
    # At the first update of W4A4 the stage starts at its coupled temperature, exactly.
    fresh = _two_stages(updates_per_epoch=upe)
    fresh.step(0)
    fresh.step(1)
    assert fresh.step_update(upe).temperature == 9.0 and fresh.state.stage_started


def test_real_epochs_equal_whole_epochs_and_bad_update_counts_are_named() -> None:
    a, b = _two_stages(), _two_stages()
    for e in range(4):
        assert a.step(e).temperature == b.step(float(e)).temperature
    sched = _two_stages(updates_per_epoch=4)
    sched.step(0)
    with pytest.raises(ValueError, match=r"update 4 is in epoch 1 at updates_per_epoch=4, but the scheduler was stepped to epoch 0"):
        sched.step_update(4)
    with pytest.raises(ValueError, match="updates_per_epoch"):
        _two_stages(updates_per_epoch=0)
    # A gradient-norm stage still moves per update from the norm, whatever updates_per_epoch says.
    g = JointScheduler([BitStage("g", 2, 8, 8, schedule="gradient_norm")], temperatures=(4.0,), updates_per_epoch=2)
    g.step(0.5)
    # max_T = 4 + 2 halvings = 6: T = 6 - 5 * g / g_max
    assert g.step_update(0, 2.0).temperature == 1.0 and g.step_update(1, 1.0).temperature == pytest.approx(3.5)


def test_head_temperatures_move_with_the_schedule_and_reach_one_together() -> None:
    # The seed's detection case: feature T = 5, head T = 3, then a fine-tune stage at T = 1.
    sched = JointScheduler(
        [BitStage("w8a8", 2, 8, 8, schedule="constant"),
         BitStage("mid", 1, 8, 8, schedule="constant", schedule_kwargs={"base_temperature": 3.0}),
         BitStage("finetune", 1, 4, 4, schedule="constant", schedule_kwargs={"base_temperature": 1.0})],
        temperatures=(5.0,), coupling=NoCoupling(), head_temperatures={"features": 5.0, "logits": [3.0, 1.0]},
    )
    st = sched.step(0)
    assert st.head_temperatures == {"features": (5.0,), "logits": (3.0, 1.0)}
    assert st.head_weights == {"features": (1.0,), "logits": (0.5, 0.5)}
    st = sched.step(2)  # T(t) = 3: T_h = 1 + (T_h - 1) * (3 - 1) / (5 - 1)
    assert st.head_temperatures == {"features": (3.0,), "logits": (2.0, 1.0)}
    st = sched.step(3)
    assert st.head_temperatures == {"features": (1.0,), "logits": (1.0, 1.0)}
    # The state (head temperatures included) round-trips through a JSON checkpoint.
    again = JointScheduler(sched.stages, temperatures=(5.0,), coupling=NoCoupling(),
                           head_temperatures={"features": 5.0, "logits": [3.0, 1.0]})
    again.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert again.state == st
    # The loss takes shared and per-head temperatures from the state.
    loss = TemperateLoss(temperatures=(4.0,))
    loss.follow(sched.step(0))
    assert loss.head_temperatures == {"features": (5.0,), "logits": (3.0, 1.0)}
    with pytest.raises(ValueError, match=r"max\(temperatures\) > 1"):
        JointScheduler(sched.stages, temperatures=(1.0,), head_temperatures={"logits": 3.0})


def test_from_recipe_carries_head_temperatures() -> None:
    raw = {
        "name": "h", "data": {"name": "synthetic_detection"},
        "teacher": {"model": "tiny_detector", "train": {"epochs": 1}},
        "student": {"model": "tiny_detector"},
        "task": {"accuracy_head": "logits", "losses": {"logits": "cross_entropy", "boxes": "smooth_l1"}},
        "stages": [{"epochs": 1, "weight_bits": 8, "act_bits": 8, "temperature": {"schedule": "constant"}}],
        "distillation": {"temperatures": [5.0], "coupling": "none",
                         "head_temperatures": {"features": 5.0, "logits": 3.0}, "head_weights": {"boxes": 0.0}},
    }
    sched = JointScheduler.from_recipe(parse_recipe(raw), updates_per_epoch=3)
    assert sched.head_reference == {"features": (5.0,), "logits": (3.0,)} and sched.updates_per_epoch == 3
    assert sched.step(0).head_temperatures == {"features": (5.0,), "logits": (3.0,)}
