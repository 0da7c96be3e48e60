"""The joint scheduler: bit-width stages and temperature, within and across stages.

A run is an ordered list of :class:`BitStage` s (e.g. float → W8A8 → W4A4). The
:class:`JointScheduler` owns the stage boundaries and, for any epoch, tells the
stage, its bit widths, the distillation temperature(s) and their loss weights.

Coupling rule (:class:`BitDropCoupling`, the default; seed §4.1 "raise T when the
capacity gap is large"). With ``h(s) = log2(32 / min(w_bits, a_bits))`` the number of
halvings of precision of stage ``s`` (0 for float, 2 for W8A8, 3 for W4A4):

* each stage starts its own Temperate schedule at
  ``T0(s) = clamp(T_ref + step · h(s), T_min, T_max)``, ``T_ref`` the largest recipe
  temperature and ``step`` = 1 per halving — so a drop in precision is met by a
  softer teacher; within the stage the Temperate phases run on a stage-local clock
  (warm-up, adaptive, decay to ``T_min`` at the stage's last epoch; the plateau
  trigger ends the adaptive phase early);
* multi-scale weights shift from high to low temperatures as bits drop:
  ``w_i(s) ∝ w_i · T_i^(−shift · h(s))`` (``shift`` = 0.25), normalised to sum to 1.

The scalar schedule temperature ``T(t)`` moves the whole multi-scale set with an
affine map that keeps 1 fixed: ``T_i(t) = 1 + (T_i − 1) · (T(t) − 1) / (T_ref − 1)``,
so (6, 3, 1) at ``T(t) = 6`` is unchanged and every scale reaches 1 together when
the schedule decays to 1.

Example (your own QAT loop)::

    sched = JointScheduler([BitStage("w8a8", 3, 8, 8), BitStage("w4a4", 3, 4, 4)],
                           temperatures=(6.0, 3.0, 1.0))
    loss_fn = TemperateLoss(kd_weight=0.9, temperatures=(6.0, 3.0, 1.0))
    val_loss = None
    for epoch in range(sched.total_epochs):
        st = sched.step(epoch, val_loss)
        if st.stage_started and st.quantized:
            set_bit_width(qmodel, st.weight_bits, st.act_bits)
        loss_fn.set_temperatures(st.temperatures, st.weights)
        ...  # train one epoch, then val_loss = evaluate(...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qtemperate.losses import normalize_weights
from qtemperate.temperature import (
    ConstantTemperature,
    GradientNormTemperature,
    LookupTableTemperature,
    TemperateSchedule,
    TemperatureSchedule,
)

__all__ = [
    "BitDropCoupling",
    "BitStage",
    "CouplingRule",
    "JointScheduler",
    "NoCoupling",
    "StageState",
    "halvings",
]

FLOAT_BITS = 32
_ANCHOR = 1.0  # the temperature that leaves logits unsoftened; fixed by the affine map


def halvings(weight_bits: int, act_bits: int, reference_bits: int = FLOAT_BITS) -> float:
    """Number of halvings of precision: ``log2(reference / min(weight_bits, act_bits))``."""
    return max(0.0, math.log2(reference_bits / min(weight_bits, act_bits)))


@dataclass(frozen=True)
class BitStage:
    """One stage of the run.

    Attributes:
        name: Label used in logs (``float``, ``w8a8`` ...).
        epochs: Length of the stage in epochs (≥ 1).
        weight_bits: 32 for float, else 2..8.
        act_bits: 32 for float, else 2..8.
        lr: Peak learning rate of the stage (``None``: the optimizer's).
        schedule: Temperature schedule kind inside the stage: ``temperate``,
            ``constant``, ``gradient_norm`` or ``lookup_table``.
        schedule_kwargs: Extra arguments of that schedule (``alpha``, ``warmup`` ...).
            A ``base_temperature`` here overrides the coupling rule for the stage.
    """

    name: str
    epochs: int
    weight_bits: int = FLOAT_BITS
    act_bits: int = FLOAT_BITS
    lr: float | None = None
    schedule: str = "temperate"
    schedule_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"stage {self.name!r}: epochs must be >= 1, got {self.epochs}")
        for label, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if bits != FLOAT_BITS and not 2 <= bits <= 8:
                raise ValueError(f"stage {self.name!r}: {label} must be 2..8 or 32, got {bits}")
        if self.schedule not in _SCHEDULE_KINDS:
            raise ValueError(
                f"stage {self.name!r}: unknown schedule {self.schedule!r}; "
                f"known: {', '.join(sorted(_SCHEDULE_KINDS))}"
            )

    @property
    def quantized(self) -> bool:
        return self.weight_bits != FLOAT_BITS or self.act_bits != FLOAT_BITS


@dataclass(frozen=True)
class StageState:
    """What the scheduler says for one epoch (and, for ``gradient_norm``, one step)."""

    epoch: int
    stage_index: int
    stage_name: str
    epoch_in_stage: int
    stage_started: bool
    weight_bits: int
    act_bits: int
    quantized: bool
    temperature: float
    temperatures: tuple[float, ...]
    weights: tuple[float, ...]
    lr: float | None
    phase: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CouplingRule:
    """How bit widths set each stage's starting temperature and multi-scale weights.

    Subclass and override both methods to change the coupling; pass an instance as
    ``JointScheduler(..., coupling=...)``.
    """

    def start_temperature(self, reference: float, stage: BitStage) -> float:
        """Starting temperature of ``stage`` given the recipe's reference temperature."""
        raise NotImplementedError

    def stage_weights(
        self, temperatures: Sequence[float], weights: Sequence[float], stage: BitStage
    ) -> tuple[float, ...]:
        """Multi-scale loss weights (summing to 1) used throughout ``stage``."""
        raise NotImplementedError


@dataclass(frozen=True)
class BitDropCoupling(CouplingRule):
    """Default rule: +``step`` per halving of bits, weights shifted towards low T.

    ``T0 = T_ref + step · h``; ``w_i ∝ w_i · T_i^(−shift · h)``, ``h`` = :func:`halvings`.
    """

    step: float = 1.0
    shift: float = 0.25
    reference_bits: int = FLOAT_BITS

    def start_temperature(self, reference: float, stage: BitStage) -> float:
        return reference + self.step * halvings(stage.weight_bits, stage.act_bits, self.reference_bits)

    def stage_weights(
        self, temperatures: Sequence[float], weights: Sequence[float], stage: BitStage
    ) -> tuple[float, ...]:
        h = halvings(stage.weight_bits, stage.act_bits, self.reference_bits)
        raw = [w * t ** (-self.shift * h) for w, t in zip(weights, temperatures)]
        return tuple(normalize_weights(raw, len(raw)))


@dataclass(frozen=True)
class NoCoupling(CouplingRule):
    """Stages ignore bit widths: every stage starts at ``T_ref`` with the base weights."""

    def start_temperature(self, reference: float, stage: BitStage) -> float:
        return reference

    def stage_weights(
        self, temperatures: Sequence[float], weights: Sequence[float], stage: BitStage
    ) -> tuple[float, ...]:
        return tuple(weights)


_SCHEDULE_KINDS = {"temperate", "constant", "gradient_norm", "lookup_table"}


class JointScheduler:
    """Stage boundaries plus temperature within and across bit-width stages.

    Args:
        stages: The ordered stages (float stages first, then non-increasing bits).
        temperatures: The recipe's multi-scale temperatures at the reference
            precision, e.g. ``(6, 3, 1)``; one value for single-scale KD.
        weights: Their base weights (non-negative; ``None`` = uniform).
        coupling: The :class:`CouplingRule` (default :class:`BitDropCoupling`).
        min_temperature: Lower clamp of every temperature.
        max_temperature: Upper clamp of every temperature.

    The state is minimal: each stage's schedule state and the last epoch stepped.
    ``step(epoch, val_loss)`` is idempotent for an epoch, so a resumed run calls it
    again and gets the same answer.
    """

    def __init__(
        self,
        stages: Sequence[BitStage],
        temperatures: Sequence[float] = (4.0,),
        weights: Sequence[float] | None = None,
        coupling: CouplingRule | None = None,
        min_temperature: float = 1.0,
        max_temperature: float = 10.0,
    ) -> None:
        if not stages:
            raise ValueError("stages must not be empty")
        temps = tuple(float(t) for t in temperatures)
        if not temps or any(not math.isfinite(t) or t <= 0 for t in temps):
            raise ValueError(f"temperatures must be finite and > 0, got {temperatures!r}")
        if not 0 < min_temperature <= max_temperature:
            raise ValueError("need 0 < min_temperature <= max_temperature")
        self.stages: tuple[BitStage, ...] = tuple(stages)
        self.base_temperatures = temps
        self.base_weights = tuple(normalize_weights(weights, len(temps)))
        self.coupling = coupling if coupling is not None else BitDropCoupling()
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.reference_temperature = max(temps)

        self._starts: list[int] = []
        total = 0
        for st in self.stages:
            self._starts.append(total)
            total += st.epochs
        self.total_epochs = total
        self._stage_weights = [
            self.coupling.stage_weights(self.base_temperatures, self.base_weights, st)
            for st in self.stages
        ]
        self._schedules: list[TemperatureSchedule] = [self._build(i) for i in range(len(self.stages))]
        self._last: StageState | None = None

    # -- construction -------------------------------------------------------------
    def start_temperature(self, stage_index: int) -> float:
        """The coupled starting temperature of a stage, clamped to [min, max]."""
        st = self.stages[stage_index]
        explicit = st.schedule_kwargs.get("base_temperature")
        t0 = (
            float(explicit)
            if explicit is not None
            else self.coupling.start_temperature(self.reference_temperature, st)
        )
        return min(max(t0, self.min_temperature), self.max_temperature)

    def _build(self, idx: int) -> TemperatureSchedule:
        st = self.stages[idx]
        kw = {k: v for k, v in st.schedule_kwargs.items() if k != "base_temperature"}
        t0 = self.start_temperature(idx)
        lo = kw.pop("min_temperature", self.min_temperature)
        hi = kw.pop("max_temperature", self.max_temperature)
        if st.schedule == "temperate":
            kw.pop("table", None)
            return TemperateSchedule(
                total_epochs=st.epochs,
                base_temperature=min(max(t0, lo), hi),
                min_temperature=lo,
                max_temperature=hi,
                **kw,
            )
        if st.schedule == "constant":
            return ConstantTemperature(t0)
        if st.schedule == "gradient_norm":
            return GradientNormTemperature(min_temperature=lo, max_temperature=max(t0, lo))
        table = kw.get("table")
        if not table:
            raise ValueError(f"stage {st.name!r}: lookup_table schedule needs a table")
        return LookupTableTemperature(table)

    # -- queries ------------------------------------------------------------------
    def stage_index(self, epoch: int) -> int:
        """Index of the stage that ``epoch`` (global, 0-based) falls in."""
        self._check_epoch(epoch)
        idx = 0
        for i, start in enumerate(self._starts):
            if epoch >= start:
                idx = i
        return idx

    def stage_bounds(self) -> list[tuple[int, int]]:
        """``[(first_epoch, last_epoch_exclusive), ...]`` per stage."""
        return [(s, s + st.epochs) for s, st in zip(self._starts, self.stages)]

    def stage_weights(self, stage_index: int) -> tuple[float, ...]:
        """The multi-scale weights used throughout a stage."""
        return self._stage_weights[stage_index]

    def schedule(self, stage_index: int) -> TemperatureSchedule:
        """The per-stage temperature schedule (stage-local epochs)."""
        return self._schedules[stage_index]

    def scale_temperatures(self, temperature: float) -> tuple[float, ...]:
        """Map the scalar schedule temperature onto the multi-scale set.

        ``T_i = 1 + (T_i^ref − 1) · (T − 1) / (T_ref − 1)``, clamped to [min, max];
        with a single reference temperature (or ``T_ref = 1``) every scale is ``T``.
        """
        ref = self.reference_temperature
        if len(self.base_temperatures) == 1 or ref == _ANCHOR:
            out = [temperature] * len(self.base_temperatures)
        else:
            frac = (temperature - _ANCHOR) / (ref - _ANCHOR)
            out = [_ANCHOR + (t - _ANCHOR) * frac for t in self.base_temperatures]
        return tuple(min(max(t, self.min_temperature), self.max_temperature) for t in out)

    @property
    def state(self) -> StageState | None:
        """The last state returned by :meth:`step` or :meth:`observe_grad_norm`."""
        return self._last

    # -- stepping -----------------------------------------------------------------
    def step(self, epoch: int, val_loss: float | None = None) -> StageState:
        """Advance to global ``epoch`` and return what to train it with.

        Args:
            epoch: Global 0-based epoch.
            val_loss: The latest validation loss (drives the adaptive phase and the
                plateau trigger of a ``temperate`` stage).
        """
        idx = self.stage_index(epoch)
        local = epoch - self._starts[idx]
        sched = self._schedules[idx]
        if isinstance(sched, TemperateSchedule):
            temperature = sched.step(local, val_loss)
        elif isinstance(sched, LookupTableTemperature):
            temperature = sched.step(local)
        else:  # constant and gradient-norm: value set per step / fixed
            temperature = sched.temperature
        self._last = self._state(epoch, idx, local, float(temperature))
        return self._last

    def observe_grad_norm(self, grad_norm: float) -> StageState:
        """Feed the student's gradient norm (``gradient_norm`` stages move T per step)."""
        if self._last is None:
            raise RuntimeError("call step(epoch) before observe_grad_norm()")
        sched = self._schedules[self._last.stage_index]
        if isinstance(sched, GradientNormTemperature):
            t = float(sched.step(grad_norm))
            self._last = self._state(
                self._last.epoch, self._last.stage_index, self._last.epoch_in_stage, t
            )
        return self._last

    def _state(self, epoch: int, idx: int, local: int, temperature: float) -> StageState:
        st = self.stages[idx]
        sched = self._schedules[idx]
        return StageState(
            epoch=epoch,
            stage_index=idx,
            stage_name=st.name,
            epoch_in_stage=local,
            stage_started=local == 0,
            weight_bits=st.weight_bits,
            act_bits=st.act_bits,
            quantized=st.quantized,
            temperature=temperature,
            temperatures=self.scale_temperatures(temperature),
            weights=self._stage_weights[idx],
            lr=st.lr,
            phase=str(getattr(sched, "phase", st.schedule)),
        )

    def _check_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError(f"epoch must be an int, got {epoch!r}")
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch must be in [0, {self.total_epochs}), got {epoch}")

    # -- persistence --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-stage schedule states and the last state (plain Python types)."""
        return {
            "schedules": [s.state_dict() for s in self._schedules],
            "last": None if self._last is None else self._last.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (stages and temperatures must match)."""
        scheds = state["schedules"]
        if len(scheds) != len(self._schedules):
            raise ValueError(
                f"state has {len(scheds)} stages but the scheduler has {len(self._schedules)}"
            )
        for sched, sd in zip(self._schedules, scheds):
            sched.load_state_dict(sd)
        last = state.get("last")
        if last is None:
            self._last = None
        else:
            last = dict(last)
            last["temperatures"] = tuple(last["temperatures"])
            last["weights"] = tuple(last["weights"])
            self._last = StageState(**last)
