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

Multi-head models (a detector's feature, class and box heads): ``head_temperatures``
gives a head its own reference temperature(s) ``T_h``; the same affine map moves them,
``T_h(t) = 1 + (T_h − 1) · (T(t) − 1) / (T_ref − 1)``, so at ``T(t) = T_ref`` every head
is at its recipe value and all reach 1 together (the seed's detection case: feature
T = 5, head T = 3, then a fine-tune stage at T = 1). A head's multi-scale weights follow
the coupling rule from uniform base weights. :meth:`TemperateLoss.follow
<qtemperate.losses.TemperateLoss.follow>` hands a state's shared and per-head
temperatures to the loss.

Step-level use: ``step`` takes a real epoch (``3.25``: a quarter into epoch 3). A
stage whose schedule has ``fractional_epochs`` (``temperate``, ``constant``,
``lookup_table``) then moves within the epoch (the Temperate cosine decays per update,
agreeing with the per-epoch values at whole epochs); other schedules get the whole
epoch. With ``updates_per_epoch`` set, :meth:`JointScheduler.step_update` does this from
the update count: update ``n`` (updates done before it, counted from 0 over the run)
trains at epoch ``n / updates_per_epoch``.

Each stage's schedule is built through the registry, never by kind:
``TEMPERATURE_SCHEDULES.get(stage.schedule).for_stage(StageContext(...), **stage.schedule_kwargs)``,
and stepped through the one interface: :meth:`JointScheduler.step` calls
``schedule.step(local_epoch, val_loss)`` once per epoch and
:meth:`JointScheduler.step_update` calls ``schedule.step_update(num_updates, grad_norm)``
once per optimizer update. :attr:`JointScheduler.wants_grad_norm` says whether the
current stage's schedule reads the gradient norm, so a loop computes it (a host sync
on a GPU) only then.

Example (your own QAT loop)::

    sched = JointScheduler([BitStage("w8a8", 3, 8, 8), BitStage("w4a4", 3, 4, 4)],
                           temperatures=(6.0, 3.0, 1.0))   # or JointScheduler.from_recipe(recipe)
    loss_fn = TemperateLoss(kd_weight=0.9, temperatures=(6.0, 3.0, 1.0))
    val_loss, updates = None, 0
    for epoch in range(sched.total_epochs):
        st = sched.step(epoch, val_loss)
        if st.stage_started and st.quantized:
            set_bit_width(qmodel, st.weight_bits, st.act_bits)
        loss_fn.follow(st)                      # shared and per-head temperatures, weights
        for x, y in loader:
            ...  # forward, backward
            if sched.wants_grad_norm:
                st = sched.step_update(updates, clip_grad_norm_(qmodel.parameters(), 5.0))
                loss_fn.follow(st)
            ...  # optimizer step
            updates += 1
        val_loss = evaluate(...)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qtemperate.bits import FLOAT_BITS, check_bits, halvings, is_quantized
from qtemperate.losses import normalize_weights
from qtemperate.temperature import (
    AUTO_TEMPERATURE,
    TEMPERATURE_SCHEDULES,
    StageContext,
    TemperatureSchedule,
    settings_model,
)

if TYPE_CHECKING:
    from qtemperate.recipe import Recipe

__all__ = [
    "BitDropCoupling",
    "BitStage",
    "CouplingRule",
    "JointScheduler",
    "NoCoupling",
    "StageState",
    "halvings",
]

_ANCHOR = 1.0  # the temperature that leaves logits unsoftened; fixed by the affine map


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"num_updates must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class BitStage:
    """One stage of the run.

    Attributes:
        name: Label used in logs (``float``, ``w8a8`` ...).
        epochs: Length of the stage in epochs (≥ 1).
        weight_bits: 32 for float, else 2..8.
        act_bits: 32 for float, else 2..8.
        lr: Peak learning rate of the stage (``None``: the optimizer's).
        schedule: Temperature schedule kind inside the stage, a key of
            :data:`~qtemperate.temperature.TEMPERATURE_SCHEDULES` (``temperate``,
            ``constant``, ``gradient_norm``, ``lookup_table`` or one you registered).
        schedule_kwargs: The schedule's settings, passed to its ``for_stage``
            (``alpha``, ``warmup`` ...). A ``base_temperature`` here also overrides
            the coupling rule's starting temperature for the stage.
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
            try:
                check_bits(label, bits)
            except ValueError as exc:
                raise ValueError(f"stage {self.name!r}: {exc}") from None
        if self.schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"stage {self.name!r}: unknown temperature schedule {self.schedule!r}; "
                f"known: {', '.join(TEMPERATURE_SCHEDULES.keys())}"
            )

    @property
    def quantized(self) -> bool:
        return is_quantized(self.weight_bits, self.act_bits)


@dataclass(frozen=True)
class StageState:
    """What the scheduler says for one epoch (and, stepped per update, one update).

    ``epoch`` is the whole epoch and ``epoch_fraction`` how far into it the state is
    (0 for per-epoch use). ``head_temperatures`` / ``head_weights`` hold each
    configured head's current temperatures and their multi-scale weights (empty
    without ``head_temperatures``).
    """

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
    epoch_fraction: float = 0.0
    head_temperatures: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    head_weights: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> StageState:
        """Inverse of :meth:`to_dict` (lists back to tuples; older states lack the head fields)."""
        d = dict(state)
        d["temperatures"] = tuple(d["temperatures"])
        d["weights"] = tuple(d["weights"])
        for key in ("head_temperatures", "head_weights"):
            d[key] = {h: tuple(v) for h, v in d.get(key, {}).items()}
        return cls(**d)


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
        head_temperatures: Reference temperature(s) per output head of a multi-head
            model, moved with the schedule (see the module docstring); needs
            ``max(temperatures) > 1``.
        updates_per_epoch: Optimizer updates per epoch; when given, :meth:`step_update`
            moves epoch-driven schedules within the epoch.

    The state is minimal: each stage's schedule state and the last epoch stepped.
    ``step(epoch, val_loss)`` is idempotent for an epoch, so a resumed run calls it
    again and gets the same answer.

    Raises:
        ValueError: for bad arguments, or a stage whose schedule cannot be built from
            its settings (naming the stage and the setting).
    """

    def __init__(
        self,
        stages: Sequence[BitStage],
        temperatures: Sequence[float] = (4.0,),
        weights: Sequence[float] | None = None,
        coupling: CouplingRule | None = None,
        min_temperature: float = 1.0,
        max_temperature: float = 10.0,
        head_temperatures: Mapping[str, float | Sequence[float]] | None = None,
        updates_per_epoch: int | None = None,
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
        self.head_reference = self._check_heads(head_temperatures)
        if updates_per_epoch is not None and (
            isinstance(updates_per_epoch, bool) or not isinstance(updates_per_epoch, int)
            or updates_per_epoch < 1
        ):
            raise ValueError(f"updates_per_epoch must be an integer >= 1, got {updates_per_epoch!r}")
        self.updates_per_epoch = updates_per_epoch

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
        self._head_weights = [
            {
                h: self.coupling.stage_weights(ref, normalize_weights(None, len(ref)), st)
                for h, ref in self.head_reference.items()
            }
            for st in self.stages
        ]
        self._schedules: list[TemperatureSchedule] = [self._build(i) for i in range(len(self.stages))]
        self._last: StageState | None = None

    def _check_heads(
        self, heads: Mapping[str, float | Sequence[float]] | None
    ) -> dict[str, tuple[float, ...]]:
        if heads is None:
            return {}
        if not isinstance(heads, Mapping):
            raise ValueError(f"head_temperatures must be a dict head -> temperature(s), got {heads!r}")
        out: dict[str, tuple[float, ...]] = {}
        for head, temps in heads.items():
            values = (temps,) if isinstance(temps, (int, float)) else tuple(temps)
            if not values or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
                for t in values
            ):
                raise ValueError(f"head_temperatures[{head!r}] must be positive numbers, got {temps!r}")
            out[str(head)] = tuple(float(t) for t in values)
        if out and self.reference_temperature == _ANCHOR:
            raise ValueError(
                "head_temperatures need max(temperatures) > 1: head temperatures move with the "
                "schedule relative to it"
            )
        return out

    @classmethod
    def from_recipe(cls, recipe: Recipe, updates_per_epoch: int | None = None) -> JointScheduler:
        """The scheduler a :class:`~qtemperate.recipe.Recipe` describes.

        One :class:`BitStage` per recipe stage (its label, epochs, bits, lr, and its
        ``temperature`` block as the schedule kind plus settings), the distillation
        temperatures and weights, and the coupling: ``bit_drop`` →
        :class:`BitDropCoupling` with ``temperature_step_per_halving`` and
        ``weight_shift``, ``none`` → :class:`NoCoupling`. The clamps are the defaults
        (1 and 10). ``distillation.head_temperatures`` become the per-head references.
        """
        stages = [
            BitStage(
                st.label,
                st.epochs,
                st.weight_bits,
                st.act_bits,
                st.lr,
                st.temperature.schedule,
                st.temperature.settings(),
            )
            for st in recipe.stages
        ]
        dist = recipe.distillation
        coupling: CouplingRule = (
            NoCoupling()
            if dist.coupling == "none"
            else BitDropCoupling(step=dist.temperature_step_per_halving, shift=dist.weight_shift)
        )
        return cls(stages, dist.temperatures, dist.weights, coupling,
                   head_temperatures=dist.head_temperatures, updates_per_epoch=updates_per_epoch)

    # -- construction -------------------------------------------------------------
    def start_temperature(self, stage_index: int) -> float:
        """The coupled starting temperature of a stage, clamped to [min, max]."""
        st = self.stages[stage_index]
        explicit = st.schedule_kwargs.get("base_temperature")
        if explicit == AUTO_TEMPERATURE:
            raise ValueError(
                "base_temperature 'auto' is not resolved: a run resolves it from the data and the "
                "model sizes (qtemperate.schedule_switches.resolve_switches) before building the scheduler"
            )
        t0 = (
            float(explicit)
            if explicit is not None
            else self.coupling.start_temperature(self.reference_temperature, st)
        )
        return min(max(t0, self.min_temperature), self.max_temperature)

    def stage_context(self, stage_index: int) -> StageContext:
        """What the stage's schedule is built from: its epochs, start T and the clamps."""
        return StageContext(
            epochs=self.stages[stage_index].epochs,
            start_temperature=self.start_temperature(stage_index),
            min_temperature=self.min_temperature,
            max_temperature=self.max_temperature,
        )

    def _build(self, idx: int) -> TemperatureSchedule:
        st = self.stages[idx]
        where = f"stage {st.name!r} (schedule {st.schedule!r})"
        kind = TEMPERATURE_SCHEDULES.get(st.schedule)
        try:
            model = settings_model(kind)
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if model.model_config.get("extra") == "forbid":
            known = list(model.model_fields)
            unknown = [k for k in st.schedule_kwargs if k not in known]
            if unknown:
                raise ValueError(
                    f"{where}: {', '.join(unknown)}: not a setting of this schedule; "
                    f"its settings: {', '.join(known) or '(none)'}"
                )
        try:
            return kind.for_stage(self.stage_context(idx), **st.schedule_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc

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

    def scale_temperatures(
        self, temperature: float, reference: Sequence[float] | None = None
    ) -> tuple[float, ...]:
        """Map the scalar schedule temperature onto a set of reference temperatures.

        ``T_i = 1 + (T_i^ref − 1) · (T − 1) / (T_ref − 1)``, clamped to [min, max];
        with a single reference temperature (or ``T_ref = 1``) every scale is ``T``.

        Args:
            temperature: The schedule's temperature ``T``.
            reference: The reference set (default: the multi-scale ``temperatures``;
                a head's ``head_temperatures`` for that head).
        """
        ref = self.reference_temperature
        base = self.base_temperatures if reference is None else tuple(reference)
        if (reference is None and len(base) == 1) or ref == _ANCHOR:
            out = [temperature] * len(base)
        else:
            frac = (temperature - _ANCHOR) / (ref - _ANCHOR)
            out = [_ANCHOR + (t - _ANCHOR) * frac for t in base]
        return tuple(min(max(t, self.min_temperature), self.max_temperature) for t in out)

    @property
    def state(self) -> StageState | None:
        """The last state returned by :meth:`step` or :meth:`step_update`."""
        return self._last

    @property
    def moves_per_update(self) -> bool:
        """Whether :meth:`step_update` can move T in the current stage: its schedule reads
        the gradient norm, or it is epoch-driven with ``fractional_epochs`` and
        ``updates_per_epoch`` is set (step-level use)."""
        idx = 0 if self._last is None else self._last.stage_index
        sched = self._schedules[idx]
        return sched.uses_grad_norm or (self.updates_per_epoch is not None and sched.fractional_epochs)

    @property
    def wants_grad_norm(self) -> bool:
        """Whether the current stage's schedule reads the gradient norm per update.

        The current stage is the one of the last :meth:`step` (the first stage before
        any step). When false, :meth:`step_update` needs no ``grad_norm``, so a loop
        can skip reading it (``float(norm)`` is a host sync on a GPU).
        """
        idx = 0 if self._last is None else self._last.stage_index
        return self._schedules[idx].uses_grad_norm

    # -- stepping -----------------------------------------------------------------
    def step(self, epoch: float, val_loss: float | None = None) -> StageState:
        """Advance to global ``epoch`` and return what to train it with.

        Args:
            epoch: Global 0-based epoch; a real number (``3.25``) for step-level use:
                the stage and bits are those of its whole part, and a schedule with
                ``fractional_epochs`` moves within the epoch (others get the whole epoch).
            val_loss: The latest validation loss (drives the adaptive phase and the
                plateau trigger of a ``temperate`` stage; read at the first step of an
                epoch).
        """
        e = self._check_epoch(epoch)
        whole = math.floor(e)
        idx = self.stage_index(whole)
        local = whole - self._starts[idx]
        sched = self._schedules[idx]
        at = local + (e - whole) if sched.fractional_epochs else local
        temperature = sched.step(at, val_loss)
        self._last = self._state(whole, idx, local, float(temperature), e - whole)
        return self._last

    def step_update(self, num_updates: int, grad_norm: float | None = None) -> StageState:
        """Observe one optimizer update of the current epoch and return what to train with.

        With ``updates_per_epoch`` set and a current stage whose schedule has
        ``fractional_epochs``, T moves to epoch ``num_updates / updates_per_epoch``
        (:meth:`step` with that real epoch; it must lie in the epoch last stepped).
        Then ``schedule.step_update(num_updates, grad_norm)`` is called on the current
        stage's schedule: a ``gradient_norm`` stage moves T here, the others keep it
        (and then the same :class:`StageState` is returned).

        Args:
            num_updates: Optimizer updates done before this one in the run (0 for the
                first update).
            grad_norm: The student's gradient norm (float or 0-dim tensor); required
                when :attr:`wants_grad_norm`, else ignored.

        Raises:
            RuntimeError: before the first :meth:`step`.
            ValueError: for a missing or bad ``grad_norm`` where one is needed, or an
                update count outside the epoch last stepped.
        """
        last = self._last
        if last is None:
            raise RuntimeError("call step(epoch) before step_update()")
        sched = self._schedules[last.stage_index]
        upe = self.updates_per_epoch
        if upe is not None and sched.fractional_epochs:
            n = _count(num_updates)
            if n // upe != last.epoch:
                raise ValueError(
                    f"update {n} is in epoch {n // upe} at updates_per_epoch={upe}, but the "
                    f"scheduler was stepped to epoch {last.epoch}; call step(epoch) at each "
                    "epoch start and count updates from 0 over the run"
                )
            last = self.step(n / upe)
        t = float(sched.step_update(num_updates, grad_norm))
        if t != last.temperature:
            last = self._state(last.epoch, last.stage_index, last.epoch_in_stage, t, last.epoch_fraction)
        self._last = last
        return last

    def observe_grad_norm(self, grad_norm: float) -> StageState:
        """Deprecated alias of :meth:`step_update` (removed in 0.2.0).

        Feeds ``grad_norm`` to the current stage as ``step_update(0, grad_norm)`` (the
        alias has no update count); stages that do not read it keep T, as before.
        """
        warnings.warn(
            "JointScheduler.observe_grad_norm(grad_norm) is deprecated and will be removed in "
            "0.2.0; call step_update(num_updates, grad_norm)",
            DeprecationWarning,
            stacklevel=2,
        )
        if self._last is None:
            raise RuntimeError("call step(epoch) before observe_grad_norm()")
        if not self.wants_grad_norm:
            return self._last
        return self.step_update(0, grad_norm)

    def _state(
        self, epoch: int, idx: int, local: int, temperature: float, fraction: float = 0.0
    ) -> StageState:
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
            epoch_fraction=fraction,
            head_temperatures={
                h: self.scale_temperatures(temperature, ref) for h, ref in self.head_reference.items()
            },
            head_weights=dict(self._head_weights[idx]),
        )

    def _check_epoch(self, epoch: float) -> float:
        if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch):
            raise ValueError(f"epoch must be a number, got {epoch!r}")
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch must be in [0, {self.total_epochs}), got {epoch}")
        return float(epoch)

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
            self._last = StageState.from_dict(last)
