"""Distillation-temperature schedules: one interface, built through one registry.

Every schedule answers the same two calls, as timm's schedulers do, and takes the
clock explicitly:

* ``step(epoch, val_loss=None) -> T`` once per epoch (epoch-driven schedules move here);
* ``step_update(num_updates, grad_norm=None) -> T`` once per optimizer update
  (:class:`GradientNormTemperature` moves here; the others return T unchanged).

Step-level use of an epoch-driven schedule: a schedule whose
:attr:`~TemperatureSchedule.fractional_epochs` is true also takes a real epoch
(``step(3.25)`` a quarter into epoch 3): the per-epoch update (the adaptive rule, the
plateau trigger) happens once, at the first step of an epoch, and within the epoch only
what is a function of time moves — :class:`TemperateSchedule`'s cosine decays within
epochs and agrees with the per-epoch schedule at every whole epoch. The joint scheduler
(:meth:`~qtemperate.joint_scheduler.JointScheduler.step` with a real epoch, or
``updates_per_epoch`` and :meth:`~qtemperate.joint_scheduler.JointScheduler.step_update`)
drives it per optimizer update.

A schedule whose :attr:`~TemperatureSchedule.uses_grad_norm` is true consumes the
gradient norm per update; a training loop asks that flag (never the kind's name) to
decide whether to read the norm at all, which costs a host sync on a GPU.

Every schedule keeps its temperature within ``[min_temperature, max_temperature]``,
keeps only the state it needs and round-trips through ``state_dict()`` /
``load_state_dict()``: a schedule built with the same arguments and loaded with a
saved state produces the same temperatures from then on.

* :class:`ConstantTemperature` — the seed's edge-device mode (a fixed mid T).
* :class:`TemperateSchedule` — the seed's three phases: warm-up, adaptive, convergence.
* :class:`GradientNormTemperature` — T from the gradient norm relative to its running max.
* :func:`to_lookup_table` / :class:`LookupTableTemperature` — a precomputed per-epoch
  table for mobile/edge deployment, replayed without any state.
* :func:`suggest_initial_temperature` — the seed's §4.1 rule of thumb for the initial T.

The schedules are registered in :data:`TEMPERATURE_SCHEDULES` under ``"constant"``,
``"temperate"``, ``"gradient_norm"`` and ``"lookup_table"``, and the registry is the
dispatch: the joint scheduler builds a stage's schedule with
``TEMPERATURE_SCHEDULES.get(kind).for_stage(StageContext(...), **settings)`` and a
recipe validates a stage's ``temperature`` block against :func:`settings_model` of
the kind it names. A schedule registered by user code is therefore usable from a
recipe by name::

    @TEMPERATURE_SCHEDULES.register("halving")
    class HalvingTemperature(TemperatureSchedule):
        def __init__(self, start: float, every: int = 2) -> None: ...
        @classmethod
        def for_stage(cls, ctx: StageContext, every: int = 2) -> HalvingTemperature:
            return cls(ctx.start_temperature, every)
        ...  # step, temperature, state_dict, load_state_dict

    # recipe: temperature: {schedule: halving, every: 3}
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    create_model,
    model_validator,
)

from qtemperate._validation import finite_number, positive_number
from qtemperate.registry import Registry

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "AUTO_TEMPERATURE",
    "TEMPERATURE_SCHEDULES",
    "BaseTemperature",
    "ConstantTemperature",
    "GradientNormTemperature",
    "LookupTableTemperature",
    "ScheduleSettings",
    "StageContext",
    "TemperateSchedule",
    "TemperatureSchedule",
    "TemperatureSuggestion",
    "settings_model",
    "suggest_initial_temperature",
    "to_lookup_table",
]

TEMPERATURE_SCHEDULES: Registry[type[TemperatureSchedule]] = Registry("temperature schedule")

_PHASES = ("warmup", "adaptive", "convergence")

# Counts must be real integers in a recipe: YAML's `yes` or "5" silently becoming 1 or 5
# would hide a typo.
_Int = Annotated[int, Strict()]

AUTO_TEMPERATURE = "auto"
"""The ``base_temperature`` value that asks for :func:`suggest_initial_temperature` (§4.1)."""



def _base_temperature(value: Any) -> Any:
    """``None``, ``"auto"`` or a finite number > 0 (one message for every other input)."""
    if value is None or value == AUTO_TEMPERATURE:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a number > 0 or 'auto', got {value!r}")
    return float(value)


BaseTemperature = Annotated[float | Literal["auto"] | None, BeforeValidator(_base_temperature)]
"""A stage's ``base_temperature`` setting: a number, empty, or ``"auto"``.

``"auto"`` is the seed's §4.1 rule (:func:`suggest_initial_temperature`) from the
dataset's classes and class counts and the teacher/student parameter counts; a run
resolves it once the student is derived (:func:`qtemperate.schedule_switches.resolve_switches`).
A schedule is never built from ``"auto"`` itself (:meth:`StageContext.start` refuses it).
"""


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real_epoch(value: Any) -> float:
    """An epoch that may be real (step-level use): a finite number ``≥ 0``, not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"epoch must be a number, got {value!r}")
    e = float(value)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"epoch must be finite and >= 0, got {value!r}")
    return e


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _require_keys(state: Mapping[str, Any], keys: Sequence[str], cls: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{cls} state_dict must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{cls} state_dict is missing key(s) {missing}")


@dataclass(frozen=True)
class StageContext:
    """What a stage tells the schedule it builds (the argument of ``for_stage``).

    Attributes:
        epochs: Length of the stage in epochs (≥ 1); ``step`` receives stage-local
            epochs ``0 .. epochs − 1``.
        start_temperature: The stage's starting temperature as the joint scheduler
            decides it (:meth:`~qtemperate.joint_scheduler.JointScheduler.start_temperature`):
            an explicit ``base_temperature`` setting, else the coupling rule's
            ``T_ref + step · halvings``, clamped to ``[min_temperature, max_temperature]``.
        min_temperature: The scheduler-wide lower clamp.
        max_temperature: The scheduler-wide upper clamp.

    Raises:
        ValueError: for ``epochs < 1`` or bad temperatures, naming the field.
    """

    epochs: int
    start_temperature: float
    min_temperature: float = 1.0
    max_temperature: float = 10.0

    def __post_init__(self) -> None:
        if _integer(self.epochs, "epochs") < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        positive_number(self.start_temperature, "start_temperature")
        lo = positive_number(self.min_temperature, "min_temperature")
        if lo > positive_number(self.max_temperature, "max_temperature"):
            raise ValueError(
                f"min_temperature ({self.min_temperature}) must be <= "
                f"max_temperature ({self.max_temperature})"
            )

    def start(self, base_temperature: float | None = None) -> float:
        """The temperature a schedule starts at.

        ``clamp(base_temperature, min_temperature, max_temperature)`` when the stage
        gives one, else :attr:`start_temperature` (already clamped).
        """
        if base_temperature is None:
            return self.start_temperature
        if base_temperature == AUTO_TEMPERATURE:
            raise ValueError(
                "base_temperature 'auto' is not resolved: a run resolves it from the data and "
                "the model sizes (qtemperate.schedule_switches.resolve_switches); resolve it "
                "before building the schedule"
            )
        t = positive_number(base_temperature, "base_temperature")
        return _clamp(t, self.min_temperature, self.max_temperature)


class ScheduleSettings(BaseModel):
    """Base of a schedule's recipe settings: the keys of a stage's ``temperature`` block.

    Each schedule declares its own subclass as ``Settings`` next to its code, with only
    the fields its ``for_stage`` takes; a key that is not a field is an error (the recipe
    names the field path and the schedule). :func:`settings_model` derives one from
    ``for_stage``'s signature for a schedule that does not declare it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TemperatureSchedule(ABC):
    """The interface of every temperature schedule (timm's scheduler interface).

    Subclasses define :meth:`step` (per epoch), the current :attr:`temperature` and the
    state round trip; those that move per optimizer update also override
    :meth:`step_update` and set :attr:`uses_grad_norm`. ``min_temperature`` /
    ``max_temperature`` bound every value. To be buildable from a stage (the joint
    scheduler, recipes), register the class in :data:`TEMPERATURE_SCHEDULES` and give it
    a :meth:`for_stage` constructor; its recipe settings are the nested ``Settings``
    model when declared, else derived from ``for_stage``'s keyword parameters.
    """

    min_temperature: float
    max_temperature: float

    uses_grad_norm: ClassVar[bool] = False
    """Whether :meth:`step_update` consumes the gradient norm (so the loop must read it)."""

    fractional_epochs: ClassVar[bool] = False
    """Whether :meth:`step` takes a real epoch (``3.25``: a quarter into epoch 3) and moves T
    within an epoch. The joint scheduler hands other schedules whole epochs only."""
    uses_val_loss: ClassVar[bool] = True
    """Whether :meth:`step` reacts to ``val_loss`` (so the loss it is given drives training
    decisions). True unless a schedule says otherwise: a user's schedule may read it."""

    Settings: ClassVar[type[ScheduleSettings] | None] = None
    """The recipe block of this schedule (``None``: derived from :meth:`for_stage`)."""

    @classmethod
    def for_stage(cls, ctx: StageContext, **settings: Any) -> Self:
        """Build the schedule of one stage from its context and its recipe settings.

        Args:
            ctx: The stage's length, coupled starting temperature and the
                scheduler-wide clamps.
            **settings: The stage's settings (the recipe block without ``schedule``).

        Raises:
            TypeError: for an unknown setting (or, here in the base class, always:
                a schedule that is to be built from a stage overrides this).
            ValueError: for a bad setting value, naming it.
        """
        raise TypeError(
            f"{cls.__name__} does not define for_stage(ctx, **settings), so it cannot be "
            "built for a stage"
        )

    @property
    @abstractmethod
    def temperature(self) -> float:
        """The current temperature."""

    @abstractmethod
    def step(self, epoch: int, val_loss: float | None = None) -> float:
        """Advance to ``epoch`` (0-based, on the schedule's own clock) and return T.

        Args:
            epoch: The epoch about to be trained (a real number where
                :attr:`fractional_epochs`).
            val_loss: The latest validation loss, for schedules that react to it.
        """

    def step_update(self, num_updates: int, grad_norm: float | None = None) -> float:
        """Observe one optimizer update and return T (default: T unchanged).

        Args:
            num_updates: Optimizer updates done so far in the run (global count).
            grad_norm: The student's gradient norm of this update (a float or 0-dim
                tensor); only read by schedules with :attr:`uses_grad_norm`.
        """
        return self.temperature

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The mutable state as a dict of plain Python values."""

    @abstractmethod
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""


def _own_for_stage(cls: type) -> bool:
    base = TemperatureSchedule.for_stage.__func__  # type: ignore[attr-defined]
    return getattr(getattr(cls, "for_stage", None), "__func__", base) is not base


def _annotation(param: inspect.Parameter, namespace: dict[str, Any]) -> Any:
    """A parameter's annotation as a type; ``Any`` when missing or unresolvable."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return Any
    if isinstance(ann, str):  # postponed annotations (`from __future__ import annotations`)
        try:
            return eval(ann, namespace)  # the schedule author's own annotation, as typing does
        except Exception:
            return Any
    return ann


@functools.cache
def settings_model(schedule: type[TemperatureSchedule]) -> type[ScheduleSettings]:
    """The recipe settings of a schedule class: its ``Settings``, or derived from ``for_stage``.

    The derived model has one field per keyword parameter of ``for_stage`` after
    ``ctx``, with its annotation (``Any`` if missing or unresolvable) and default
    (required if none); unknown keys are rejected unless ``for_stage`` takes
    ``**settings``.

    Raises:
        TypeError: if the class declares no ``Settings`` and no ``for_stage``, or
            ``for_stage`` has positional-only parameters after ``ctx``.
    """
    declared = getattr(schedule, "Settings", None)
    if declared is not None:
        return declared
    name = getattr(schedule, "__name__", repr(schedule))
    if not _own_for_stage(schedule):
        raise TypeError(
            f"{name} declares neither Settings nor for_stage(ctx, **settings); "
            "it cannot be built from a recipe"
        )
    fn = schedule.for_stage
    namespace = dict(vars(sys.modules.get(fn.__module__, sys)))
    fields: dict[str, Any] = {}
    open_ended = False
    for param in list(inspect.signature(fn).parameters.values())[1:]:  # after ctx
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
        elif param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise TypeError(f"{name}.for_stage: settings must be keyword parameters, got {param}")
        else:
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (_annotation(param, namespace), default)
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{name}Settings",
        __base__=_OpenDerivedSettings if open_ended else _DerivedSettings,
        __module__=schedule.__module__,
        **fields,
    )


class _DerivedSettings(ScheduleSettings):
    # A user's for_stage may annotate with any type (a tensor, a callable ...).
    model_config = ConfigDict(arbitrary_types_allowed=True)


class _OpenDerivedSettings(_DerivedSettings):
    # for_stage(ctx, **settings): the schedule itself decides which keys it takes.
    model_config = ConfigDict(extra="allow")


@TEMPERATURE_SCHEDULES.register("constant")
class ConstantTemperature(TemperatureSchedule):
    """A fixed temperature — the seed's edge-device mode (a mid value, 3–4).

    Args:
        temperature: the constant ``T > 0``.

    Raises:
        ValueError: if ``temperature`` is not a finite positive number.
    """

    uses_val_loss: ClassVar[bool] = False

    class Settings(ScheduleSettings):
        """Recipe block of a ``constant`` stage.

        Attributes:
            base_temperature: The fixed T; empty means the stage's coupled starting
                temperature (:attr:`StageContext.start_temperature`); ``auto`` the
                §4.1 rule (:data:`BaseTemperature`).
        """

        base_temperature: BaseTemperature = None

    fractional_epochs: ClassVar[bool] = True

    def __init__(self, temperature: float = 4.0) -> None:
        self._temperature = positive_number(temperature, "temperature")
        self.min_temperature = self.max_temperature = self._temperature

    @classmethod
    def for_stage(cls, ctx: StageContext, *, base_temperature: float | None = None) -> Self:
        """``T = clamp(base_temperature, min, max)`` if given, else the coupled start."""
        return cls(ctx.start(base_temperature))

    @property
    def temperature(self) -> float:
        return self._temperature

    def step(self, epoch: int | None = None, val_loss: float | None = None) -> float:
        """Return the constant temperature; ``epoch`` and ``val_loss`` are ignored."""
        return self._temperature

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self._temperature}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _require_keys(state_dict, ("temperature",), type(self).__name__)
        self._temperature = positive_number(state_dict["temperature"], "temperature")
        self.min_temperature = self.max_temperature = self._temperature


@TEMPERATURE_SCHEDULES.register("temperate")
class TemperateSchedule(TemperatureSchedule):
    """The seed's three-phase schedule: warm-up, adaptive, convergence.

    Phase boundaries are integer epochs: ``W = ⌈warmup · total_epochs⌉`` and
    ``A = ⌈adapt_until · total_epochs⌉`` (``epoch < warmup·total`` ⇔ ``epoch < W``).

    * **warm-up** (``epoch < W``): ``T = base_temperature``.
    * **adaptive** (``W ≤ epoch < A``): once per epoch
      ``T ← clamp(max(min_T, alpha · T − beta · val_loss), min_T, max_T)``;
      ``val_loss`` is required.
    * **convergence** (``epoch ≥ S``, ``S = A`` or earlier on a plateau): cosine decay
      from the temperature it entered with, ``T_enter`` (the temperature after the
      last epoch before ``S``; ``base_temperature`` if there was none), to exactly
      ``min_T`` at the last epoch::

          T = min_T + (T_enter − min_T) · (1 + cos(π · k / K)) / 2,
          k = epoch − S,  K = (total_epochs − 1) − S

      so ``T = T_enter`` at ``epoch = S`` and ``T = min_T`` at
      ``epoch = total_epochs − 1``; if ``K ≤ 0`` (a one-epoch phase), ``T = min_T``.
      ``val_loss`` is optional and ignored here.

    Plateau trigger: every adaptive step's ``val_loss`` is compared with the
    previous adaptive step's, ``r = |v − v_prev| / max(|v_prev|, 1e-12)``. ``r <
    plateau_tol`` increments a counter, anything else resets it. When the counter
    reaches ``patience`` after the step for epoch ``e`` (``patience`` consecutive
    small changes, i.e. ``patience + 1`` near-equal losses), convergence starts
    early at ``S = e + 1`` with ``T_enter`` = the temperature just computed for
    ``e``. Only adaptive-phase losses count; a plateau at ``e ≥ A − 1`` changes nothing.

    Short stages (the joint scheduler builds one schedule per bit-width stage):
    the decay-to-``min_T`` guarantee holds whenever the convergence phase is
    non-empty. With the defaults, ``total_epochs=1`` gives ``W = A = 1`` (epoch 0
    is warm-up, ``T = base``), ``total_epochs=2`` or ``3`` gives warm-up then
    adaptive epochs and no convergence — ``T`` never collapses to ``min_T`` merely
    because a stage is short.

    ``step`` is idempotent per epoch: calling it again with the same epoch returns
    the stored temperature without applying the update twice. Epochs must be in
    ``[0, total_epochs)`` and must not decrease; skipping epochs is allowed (the
    skipped adaptive updates are simply not applied). Before the first step
    :attr:`temperature` is ``base_temperature``.

    Within an epoch (step-level use): ``epoch`` may be real, ``e = n + f`` with
    ``n = ⌊e⌋`` and ``0 ≤ f < 1``. The phase and the per-epoch update (warm-up value,
    adaptive rule, plateau trigger, entering convergence) belong to ``n`` and are
    applied once, at the first step of epoch ``n`` (the adaptive phase needs
    ``val_loss`` there); warm-up and adaptive T are constant within the epoch. In the
    convergence phase the cosine above is evaluated at the real ``k = e − S``, so T
    decays within epochs, equals the per-epoch value at every whole epoch and is
    exactly ``min_T`` from ``e = total_epochs − 1`` on. Steps within one epoch may
    come in any order (the cosine is a pure function of ``e``).

    Args:
        total_epochs: number of epochs (≥ 1) of the run or stage.
        base_temperature: warm-up temperature, in ``[min_T, max_T]``.
        alpha: multiplicative factor of the adaptive rule (> 0).
        beta: validation-loss factor of the adaptive rule (≥ 0).
        warmup: warm-up fraction, ``0 ≤ warmup ≤ adapt_until``.
        adapt_until: end of the adaptive phase as a fraction, ``≤ 1``.
        min_temperature: lower bound ``min_T > 0`` (and the final temperature).
        max_temperature: upper bound ``max_T ≥ min_T``.
        patience: consecutive small changes that declare a plateau (≥ 1).
        plateau_tol: relative-change threshold (≥ 0; 0 disables the trigger).

    Raises:
        ValueError: for any bad argument, naming it.
    """

    class Settings(ScheduleSettings):
        """Recipe block of a ``temperate`` stage (the defaults are the class's).

        Attributes:
            base_temperature: Warm-up temperature; empty means the stage's coupled
                starting temperature; ``auto`` the §4.1 rule (:data:`BaseTemperature`).
                Clamped to ``[min_temperature, max_temperature]``.
            alpha, beta, warmup, adapt_until, patience, plateau_tol: as in the class.
            min_temperature, max_temperature: This stage's bounds.
        """

        base_temperature: BaseTemperature = None
        alpha: float = Field(default=0.9, gt=0)
        beta: float = Field(default=0.1, ge=0)
        warmup: float = Field(default=0.3, ge=0, le=1)
        adapt_until: float = Field(default=0.8, ge=0, le=1)
        min_temperature: float = Field(default=1.0, gt=0)
        max_temperature: float = Field(default=10.0, gt=0)
        patience: _Int = Field(default=5, ge=1)
        plateau_tol: float = Field(default=1e-3, ge=0)

        @model_validator(mode="after")
        def _consistent(self) -> Self:
            if self.min_temperature > self.max_temperature:
                raise ValueError("min_temperature must be <= max_temperature")
            if self.warmup > self.adapt_until:
                raise ValueError("warmup must be <= adapt_until")
            return self

    _EPS = 1e-12

    fractional_epochs: ClassVar[bool] = True

    @classmethod
    def for_stage(
        cls,
        ctx: StageContext,
        *,
        base_temperature: float | None = None,
        min_temperature: float | None = None,
        max_temperature: float | None = None,
        **settings: Any,
    ) -> Self:
        """The stage's Temperate schedule over ``ctx.epochs`` epochs.

        ``min_T`` / ``max_T`` are the given bounds, else the scheduler-wide clamps;
        ``base_temperature = clamp(ctx.start(base_temperature), min_T, max_T)``.

        Args:
            ctx: The stage context.
            base_temperature: Warm-up temperature (default: the coupled start).
            min_temperature: Lower bound (default: ``ctx.min_temperature``).
            max_temperature: Upper bound (default: ``ctx.max_temperature``).
            **settings: ``alpha``, ``beta``, ``warmup``, ``adapt_until``, ``patience``,
                ``plateau_tol`` (see the class).
        """
        lo = positive_number(
            ctx.min_temperature if min_temperature is None else min_temperature, "min_temperature"
        )
        hi = positive_number(
            ctx.max_temperature if max_temperature is None else max_temperature, "max_temperature"
        )
        return cls(
            total_epochs=ctx.epochs,
            base_temperature=_clamp(ctx.start(base_temperature), lo, hi),
            min_temperature=lo,
            max_temperature=hi,
            **settings,
        )

    def __init__(
        self,
        total_epochs: int,
        base_temperature: float = 4.0,
        alpha: float = 0.9,
        beta: float = 0.1,
        warmup: float = 0.3,
        adapt_until: float = 0.8,
        min_temperature: float = 1.0,
        max_temperature: float = 10.0,
        patience: int = 5,
        plateau_tol: float = 1e-3,
    ) -> None:
        self.total_epochs = _integer(total_epochs, "total_epochs")
        if self.total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs!r}")
        self.min_temperature = positive_number(min_temperature, "min_temperature")
        self.max_temperature = positive_number(max_temperature, "max_temperature")
        if self.min_temperature > self.max_temperature:
            raise ValueError(
                f"min_temperature ({min_temperature}) must be <= max_temperature ({max_temperature})"
            )
        self.base_temperature = positive_number(base_temperature, "base_temperature")
        if not self.min_temperature <= self.base_temperature <= self.max_temperature:
            raise ValueError(
                f"base_temperature ({base_temperature}) must be in "
                f"[min_temperature, max_temperature] = [{min_temperature}, {max_temperature}]"
            )
        self.alpha = positive_number(alpha, "alpha")
        self.beta = finite_number(beta, "beta")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.warmup = finite_number(warmup, "warmup")
        self.adapt_until = finite_number(adapt_until, "adapt_until")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup must be in [0, 1], got {warmup!r}")
        if not 0.0 <= self.adapt_until <= 1.0:
            raise ValueError(f"adapt_until must be in [0, 1], got {adapt_until!r}")
        if self.warmup > self.adapt_until:
            raise ValueError(f"warmup ({warmup}) must be <= adapt_until ({adapt_until})")
        self.patience = _integer(patience, "patience")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        self.plateau_tol = finite_number(plateau_tol, "plateau_tol")
        if self.plateau_tol < 0.0:
            raise ValueError(f"plateau_tol must be >= 0, got {plateau_tol!r}")

        # Rounding before ceil keeps e.g. 0.3 * 10 = 3.0000000000000004 at 3.
        self.warmup_end = math.ceil(round(self.warmup * self.total_epochs, 9))
        self.adapt_end = math.ceil(round(self.adapt_until * self.total_epochs, 9))

        # Mutable state (everything state_dict() saves).
        self._temperature = self.base_temperature
        self._last_epoch: int | None = None
        self._convergence_start: int | None = None  # set on entering convergence
        self._enter_temperature: float | None = None
        self._prev_val_loss: float | None = None
        self._plateau_count = 0

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def convergence_start(self) -> int:
        """First epoch of the convergence phase (``A`` unless a plateau moved it)."""
        return self.adapt_end if self._convergence_start is None else self._convergence_start

    def phase_of(self, epoch: int) -> str:
        """The phase (``"warmup"``, ``"adaptive"`` or ``"convergence"``) of ``epoch``."""
        if epoch >= self.convergence_start:
            return "convergence"
        if epoch < self.warmup_end:
            return "warmup"
        return "adaptive"

    @property
    def phase(self) -> str:
        """Phase of the last stepped epoch (of epoch 0 before the first step)."""
        return self.phase_of(0 if self._last_epoch is None else self._last_epoch)

    def step(self, epoch: float, val_loss: float | None = None) -> float:
        """Advance to ``epoch`` and return its temperature.

        Args:
            epoch: in ``[0, total_epochs)``, its whole part not below the last
                stepped epoch's; a real epoch moves T within the epoch (see the class).
            val_loss: the validation loss; required at the first step of an
                adaptive-phase epoch.

        Raises:
            ValueError: for a bad epoch, or a missing / non-finite ``val_loss`` in
                the adaptive phase.
        """
        e = _real_epoch(epoch)
        if not 0 <= e < self.total_epochs:
            raise ValueError(f"epoch must be in [0, {self.total_epochs}), got {epoch}")
        whole = math.floor(e)
        if self._last_epoch is not None and whole < self._last_epoch:
            raise ValueError(f"epoch must not decrease: got {epoch} after {self._last_epoch}")
        if self._last_epoch is None or whole > self._last_epoch:
            self._enter_epoch(whole, val_loss)  # once per epoch: never apply an update twice
        if self.phase_of(whole) == "convergence":
            self._temperature = self._decay(e)
        return self._temperature

    def _enter_epoch(self, epoch: int, val_loss: float | None) -> None:
        """The per-epoch update of ``epoch`` (the first step of that epoch)."""
        phase = self.phase_of(epoch)
        if phase == "warmup":
            if val_loss is not None:
                finite_number(val_loss, "val_loss")
            t = self.base_temperature
        elif phase == "adaptive":
            if val_loss is None:
                raise ValueError(f"val_loss is required in the adaptive phase (epoch {epoch})")
            v = finite_number(val_loss, "val_loss")
            t = max(self.min_temperature, self.alpha * self._temperature - self.beta * v)
            self._update_plateau(v)
            if self._plateau_count >= self.patience and epoch + 1 < self.adapt_end:
                self._convergence_start = epoch + 1
                self._enter_temperature = _clamp(t, self.min_temperature, self.max_temperature)
        else:
            if self._enter_temperature is None:
                # Entering at the scheduled boundary: T_enter is the last temperature.
                self._convergence_start = self.convergence_start
                self._enter_temperature = self._temperature
            t = self._decay(epoch)
        self._temperature = _clamp(t, self.min_temperature, self.max_temperature)
        self._last_epoch = epoch

    def _decay(self, epoch: float) -> float:
        """The convergence cosine at a (real) epoch ``≥ S``; ``min_T`` from ``total − 1`` on."""
        assert self._enter_temperature is not None
        start = self.convergence_start
        k, big_k = epoch - start, (self.total_epochs - 1) - start
        lo, t_enter = self.min_temperature, self._enter_temperature
        if big_k <= 0 or k >= big_k:
            return lo  # exactly min_T at the last epoch (cos(π) rounding avoided)
        t = lo + (t_enter - lo) * (1.0 + math.cos(math.pi * k / big_k)) / 2.0
        return _clamp(t, self.min_temperature, self.max_temperature)

    def _update_plateau(self, v: float) -> None:
        prev = self._prev_val_loss
        if prev is not None:
            rel = abs(v - prev) / max(abs(prev), self._EPS)
            self._plateau_count = self._plateau_count + 1 if rel < self.plateau_tol else 0
        self._prev_val_loss = v

    def state_dict(self) -> dict[str, Any]:
        return {
            "temperature": self._temperature,
            "last_epoch": self._last_epoch,
            "convergence_start": self._convergence_start,
            "enter_temperature": self._enter_temperature,
            "prev_val_loss": self._prev_val_loss,
            "plateau_count": self._plateau_count,
            "total_epochs": self.total_epochs,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        keys = (
            "temperature",
            "last_epoch",
            "convergence_start",
            "enter_temperature",
            "prev_val_loss",
            "plateau_count",
            "total_epochs",
        )
        _require_keys(state_dict, keys, type(self).__name__)
        if state_dict["total_epochs"] != self.total_epochs:
            raise ValueError(
                f"state_dict total_epochs ({state_dict['total_epochs']}) does not match "
                f"this schedule's ({self.total_epochs})"
            )
        self._temperature = positive_number(state_dict["temperature"], "temperature")
        last = state_dict["last_epoch"]
        self._last_epoch = None if last is None else _integer(last, "last_epoch")
        start = state_dict["convergence_start"]
        self._convergence_start = None if start is None else _integer(start, "convergence_start")
        enter = state_dict["enter_temperature"]
        self._enter_temperature = None if enter is None else positive_number(enter, "enter_temperature")
        prev = state_dict["prev_val_loss"]
        self._prev_val_loss = None if prev is None else finite_number(prev, "prev_val_loss")
        self._plateau_count = _integer(state_dict["plateau_count"], "plateau_count")


_BASE_OR_MAX = (
    "give max_temperature or base_temperature, not both (a gradient_norm schedule starts at "
    "max_temperature)"
)


def _is_grad_norm(value: Any) -> bool:
    """True for the deprecated ``step(grad_norm)`` call: a float or a tensor, not an epoch."""
    if value is None or isinstance(value, (bool, numbers.Integral)):
        return False
    return hasattr(value, "item") or isinstance(value, numbers.Real)


@TEMPERATURE_SCHEDULES.register("gradient_norm")
class GradientNormTemperature(TemperatureSchedule):
    """Temperature from the gradient norm relative to its running maximum, per update.

    ``T = max_T − (max_T − min_T) · g / g_max`` with ``g_max`` the running maximum of
    all norms seen so far (including ``g``): the largest gradients so far give
    ``min_T`` (sharp targets while the student is far off), vanishing gradients
    give ``max_T`` (softer targets to keep learning). The first update has
    ``g = g_max`` and gives ``min_T``; while ``g_max = 0`` the temperature is
    ``max_T``. Before the first update :attr:`temperature` is ``max_T``.

    T moves in :meth:`step_update` (``uses_grad_norm`` is true); :meth:`step`, once per
    epoch, returns the current T, so an epoch keeps the last update's temperature.

    Args:
        min_temperature: ``min_T > 0``.
        max_temperature: ``max_T ≥ min_T``.

    Raises:
        ValueError: for bad bounds, or a negative / non-finite gradient norm.
    """

    uses_grad_norm: ClassVar[bool] = True
    uses_val_loss: ClassVar[bool] = False

    class Settings(ScheduleSettings):
        """Recipe block of a ``gradient_norm`` stage.

        Attributes:
            min_temperature: ``min_T`` (empty: the scheduler-wide lower clamp).
            max_temperature: ``max_T``, the temperature for vanishing gradients and
                before the first update (empty: the stage's coupled starting
                temperature, or ``base_temperature``).
            base_temperature: Another name for an explicit ``max_temperature`` (T
                starts at ``max_T``); give one of the two. ``auto``: the §4.1 rule.
        """

        min_temperature: float | None = Field(default=None, gt=0)
        max_temperature: float | None = Field(default=None, gt=0)
        base_temperature: BaseTemperature = None

        @model_validator(mode="after")
        def _consistent(self) -> Self:
            lo, hi = self.min_temperature, self.max_temperature
            if lo is not None and hi is not None and lo > hi:
                raise ValueError("min_temperature must be <= max_temperature")
            if hi is not None and self.base_temperature is not None:
                raise ValueError(_BASE_OR_MAX)
            return self

    def __init__(self, min_temperature: float = 1.0, max_temperature: float = 6.0) -> None:
        self.min_temperature = positive_number(min_temperature, "min_temperature")
        self.max_temperature = positive_number(max_temperature, "max_temperature")
        if self.min_temperature > self.max_temperature:
            raise ValueError(
                f"min_temperature ({min_temperature}) must be <= max_temperature ({max_temperature})"
            )
        self._grad_norm_max = 0.0
        self._temperature = self.max_temperature

    @classmethod
    def for_stage(
        cls,
        ctx: StageContext,
        *,
        min_temperature: float | None = None,
        max_temperature: float | None = None,
        base_temperature: float | None = None,
    ) -> Self:
        """``min_T`` = the given bound or ``ctx.min_temperature``; ``max_T`` = the given
        bound, else ``max(ctx.start(base_temperature), min_T)``.

        Raises:
            ValueError: for both ``max_temperature`` and ``base_temperature``, or bad bounds.
        """
        if max_temperature is not None and base_temperature is not None:
            raise ValueError(_BASE_OR_MAX)
        lo = positive_number(
            ctx.min_temperature if min_temperature is None else min_temperature, "min_temperature"
        )
        hi = max(ctx.start(base_temperature), lo) if max_temperature is None else max_temperature
        return cls(min_temperature=lo, max_temperature=hi)

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def grad_norm_max(self) -> float:
        """The running maximum ``g_max`` of the gradient norms."""
        return self._grad_norm_max

    def step(self, epoch: Any = None, val_loss: float | None = None, **deprecated: Any) -> float:
        """Once per epoch: return the current T (it moves in :meth:`step_update`).

        Args:
            epoch: The epoch (an integer ≥ 0), or None.
            val_loss: Ignored.

        Deprecated:
            ``step(grad_norm)`` (a float or 0-dim tensor, or ``grad_norm=``) still
            records the norm as :meth:`step_update` does and warns; it is removed in
            0.2.0.

        Raises:
            ValueError: for an epoch that is not an integer ≥ 0.
        """
        if "grad_norm" in deprecated or _is_grad_norm(epoch):
            grad_norm = deprecated.pop("grad_norm", epoch)
            if deprecated:
                raise TypeError(f"step() got unexpected keyword argument(s) {sorted(deprecated)}")
            warnings.warn(
                "GradientNormTemperature.step(grad_norm) is deprecated and will be removed in "
                "0.2.0; call step_update(num_updates, grad_norm) per update (step(epoch, "
                "val_loss) is now the per-epoch call)",
                DeprecationWarning,
                stacklevel=2,
            )
            return self._observe(grad_norm)
        if deprecated:
            raise TypeError(f"step() got unexpected keyword argument(s) {sorted(deprecated)}")
        if epoch is not None and _integer(epoch, "epoch") < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._temperature

    def step_update(self, num_updates: int, grad_norm: float | None = None) -> float:
        """Record the update's ``grad_norm`` (a float or 0-dim tensor, ≥ 0) and return the new T.

        Args:
            num_updates: Optimizer updates so far (not used by the formula).
            grad_norm: The gradient norm of this update; required.

        Raises:
            ValueError: for a missing, negative or non-finite ``grad_norm``.
        """
        if grad_norm is None:
            raise ValueError("grad_norm is required: this schedule moves T per update")
        return self._observe(grad_norm)

    def _observe(self, grad_norm: Any) -> float:
        if hasattr(grad_norm, "item"):
            grad_norm = grad_norm.item()
        g = finite_number(grad_norm, "grad_norm")
        if g < 0.0:
            raise ValueError(f"grad_norm must be >= 0, got {grad_norm!r}")
        self._grad_norm_max = max(self._grad_norm_max, g)
        lo, hi = self.min_temperature, self.max_temperature
        g_max = self._grad_norm_max
        t = hi if g_max == 0.0 else hi - (hi - lo) * g / g_max
        self._temperature = _clamp(t, lo, hi)
        return self._temperature

    def state_dict(self) -> dict[str, Any]:
        return {"grad_norm_max": self._grad_norm_max, "temperature": self._temperature}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _require_keys(state_dict, ("grad_norm_max", "temperature"), type(self).__name__)
        g = finite_number(state_dict["grad_norm_max"], "grad_norm_max")
        if g < 0.0:
            raise ValueError(f"grad_norm_max must be >= 0, got {g}")
        self._grad_norm_max = g
        self._temperature = positive_number(state_dict["temperature"], "temperature")


@TEMPERATURE_SCHEDULES.register("lookup_table")
class LookupTableTemperature(TemperatureSchedule):
    """Replays a precomputed per-epoch temperature table (the seed's mobile LUT).

    ``T(epoch) = table[min(epoch, len(table) − 1)]``: an epoch past the end of the
    table keeps the last entry (training a few extra epochs stays at the final,
    usually minimal, temperature). ``step`` is stateless apart from remembering the
    returned value, so it can be called in any order. Before the first step
    :attr:`temperature` is ``table[0]``.

    Args:
        table: a non-empty sequence of positive, finite temperatures.

    Raises:
        ValueError: for an empty table or a non-positive entry.
    """

    uses_val_loss: ClassVar[bool] = False

    class Settings(ScheduleSettings):
        """Recipe block of a ``lookup_table`` stage.

        Attributes:
            table: The per-epoch temperatures (non-empty, each > 0), stage-local.
        """

        table: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)

    def __init__(self, table: Sequence[float]) -> None:
        self._table = self._check_table(table)
        self._temperature = self._table[0]

    @classmethod
    def for_stage(cls, ctx: StageContext, *, table: Sequence[float]) -> Self:
        """Replay ``table`` on the stage-local clock (the context is not needed)."""
        return cls(table)

    @staticmethod
    def _check_table(table: Sequence[float]) -> tuple[float, ...]:
        if isinstance(table, (str, bytes)) or not isinstance(table, Sequence):
            raise ValueError(f"table must be a sequence of temperatures, got {table!r}")
        if len(table) == 0:
            raise ValueError("table must not be empty")
        return tuple(positive_number(t, f"table[{i}]") for i, t in enumerate(table))

    @property
    def table(self) -> tuple[float, ...]:
        return self._table

    @property
    def min_temperature(self) -> float:  # type: ignore[override]
        return min(self._table)

    @property
    def max_temperature(self) -> float:  # type: ignore[override]
        return max(self._table)

    @property
    def temperature(self) -> float:
        return self._temperature

    fractional_epochs: ClassVar[bool] = True

    def step(self, epoch: float, val_loss: float | None = None) -> float:
        """Return the table entry for ``epoch`` (≥ 0); ``val_loss`` is ignored.

        The table holds one temperature per epoch, so a real epoch (step-level use)
        reads the entry of its whole part: T is constant within an epoch. The
        ``val_loss`` argument makes this a drop-in replacement for
        :class:`TemperateSchedule` in a training loop.
        """
        whole = math.floor(_real_epoch(epoch))
        self._temperature = self._table[min(whole, len(self._table) - 1)]
        return self._temperature

    def state_dict(self) -> dict[str, Any]:
        return {"table": list(self._table), "temperature": self._temperature}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _require_keys(state_dict, ("table", "temperature"), type(self).__name__)
        self._table = self._check_table(state_dict["table"])
        self._temperature = positive_number(state_dict["temperature"], "temperature")


def to_lookup_table(
    schedule_factory: Callable[[], TemperatureSchedule],
    epochs: int,
    val_losses: Sequence[float] | None = None,
) -> list[float]:
    """Precompute a per-epoch temperature table (the seed's LUT for mobile).

    Calls ``schedule_factory()`` once and returns
    ``[schedule.step(e, val_losses[e]) for e in range(epochs)]`` (or
    ``schedule.step(e)`` when ``val_losses`` is None). Use it with epoch-driven
    schedules (:class:`TemperateSchedule`, :class:`ConstantTemperature`,
    :class:`LookupTableTemperature`; not one with ``uses_grad_norm``, whose T moves
    per update); replay the result with
    :class:`LookupTableTemperature`. A :class:`TemperateSchedule` with a
    non-empty adaptive phase needs ``val_losses`` (e.g. a loss curve from a
    previous run).

    Args:
        schedule_factory: a zero-argument callable returning a fresh schedule.
        epochs: number of entries (≥ 1).
        val_losses: at least ``epochs`` validation losses, or None.

    Raises:
        ValueError: for ``epochs < 1``, too few ``val_losses``, a schedule that
            is not epoch-driven, or any error the schedule raises.
    """
    epochs = _integer(epochs, "epochs")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if val_losses is not None and len(val_losses) < epochs:
        raise ValueError(f"val_losses must have at least {epochs} entries, got {len(val_losses)}")
    schedule = schedule_factory()
    # A schedule that moves per update has no per-epoch temperature to tabulate.
    if getattr(schedule, "uses_grad_norm", False) or not hasattr(schedule, "step"):
        raise ValueError(
            f"schedule_factory must return an epoch-driven schedule, got {type(schedule).__name__}"
        )
    if val_losses is None:
        return [float(schedule.step(e)) for e in range(epochs)]
    return [float(schedule.step(e, val_losses[e])) for e in range(epochs)]


@dataclass(frozen=True)
class TemperatureSuggestion:
    """A suggested initial temperature and the reasons behind it."""

    temperature: float
    reasons: tuple[str, ...]


def suggest_initial_temperature(
    num_classes: int,
    teacher_params: int,
    student_params: int,
    class_counts: Sequence[int] | None = None,
) -> TemperatureSuggestion:
    """Suggest an initial distillation temperature (the seed's §4.1 guidance).

    The rule, applied in order and then clamped to ``[1, 10]``:

    1. Task complexity: ``T = 3.5`` for ``num_classes ≤ 10`` (simple tasks, 3–4),
       ``T = 5.5`` for ``num_classes ≥ 100`` (complex tasks, 5–6), and
       log-linear in between: ``T = 3.5 + 2 · log10(num_classes / 10)``.
    2. Capacity gap ``r = teacher_params / student_params``: ``+2`` if ``r ≥ 16``,
       ``+1`` if ``r ≥ 4`` (a weaker student needs softer targets).
    3. Class imbalance ``q = max(class_counts) / min(class_counts)``: ``−1`` if
       ``q ≥ 10``, ``−0.5`` if ``q ≥ 3`` (high T spreads mass onto rare classes
       the teacher is unsure about).

    Args:
        num_classes: number of classes (≥ 2).
        teacher_params: teacher parameter count (> 0).
        student_params: student parameter count (> 0).
        class_counts: optional per-class sample counts (``num_classes`` positive ints).

    Returns:
        A :class:`TemperatureSuggestion` with the temperature and one reason per rule.

    Raises:
        ValueError: for a bad argument, naming it.
    """
    num_classes = _integer(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    teacher = positive_number(teacher_params, "teacher_params")
    student = positive_number(student_params, "student_params")
    reasons: list[str] = []
    if num_classes <= 10:
        t = 3.5
        reasons.append(f"simple task ({num_classes} classes <= 10): base T = 3.5")
    elif num_classes >= 100:
        t = 5.5
        reasons.append(f"complex task ({num_classes} classes >= 100): base T = 5.5")
    else:
        t = 3.5 + 2.0 * math.log10(num_classes / 10)
        reasons.append(f"{num_classes} classes: base T = 3.5 + 2*log10({num_classes}/10) = {t:.3g}")
    ratio = teacher / student
    if ratio >= 16:
        t += 2.0
        reasons.append(f"large capacity gap (teacher/student = {ratio:.3g} >= 16): +2")
    elif ratio >= 4:
        t += 1.0
        reasons.append(f"capacity gap (teacher/student = {ratio:.3g} >= 4): +1")
    if class_counts is not None:
        if isinstance(class_counts, (str, bytes)) or not isinstance(class_counts, Sequence):
            raise ValueError(f"class_counts must be a sequence of counts, got {class_counts!r}")
        if len(class_counts) != num_classes:
            raise ValueError(
                f"class_counts must have num_classes={num_classes} entries, got {len(class_counts)}"
            )
        counts = [positive_number(c, f"class_counts[{i}]") for i, c in enumerate(class_counts)]
        imbalance = max(counts) / min(counts)
        if imbalance >= 10:
            t -= 1.0
            reasons.append(f"strong class imbalance (max/min count = {imbalance:.3g} >= 10): -1")
        elif imbalance >= 3:
            t -= 0.5
            reasons.append(f"class imbalance (max/min count = {imbalance:.3g} >= 3): -0.5")
    clamped = _clamp(t, 1.0, 10.0)
    if clamped != t:
        reasons.append(f"clamped {t:.3g} to [1, 10]")
    return TemperatureSuggestion(temperature=clamped, reasons=tuple(reasons))
