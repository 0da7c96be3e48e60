"""Distillation-temperature schedules.

Every schedule takes the epoch (or the measured signal) explicitly in ``step``,
keeps its temperature within ``[min_temperature, max_temperature]``, keeps only the
state it needs and round-trips through ``state_dict()`` / ``load_state_dict()``:
a schedule built with the same arguments and loaded with a saved state produces
the same temperatures from then on.

* :class:`ConstantTemperature` — the seed's edge-device mode (a fixed mid T).
* :class:`TemperateSchedule` — the seed's three phases: warm-up, adaptive, convergence.
* :class:`GradientNormTemperature` — T from the gradient norm relative to its running max.
* :func:`to_lookup_table` / :class:`LookupTableTemperature` — a precomputed per-epoch
  table for mobile/edge deployment, replayed without any state.
* :func:`suggest_initial_temperature` — the seed's §4.1 rule of thumb for the initial T.

The schedules are registered in :data:`TEMPERATURE_SCHEDULES` under ``"constant"``,
``"temperate"``, ``"gradient_norm"`` and ``"lookup_table"``.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qtemperate._validation import finite_number, positive_number
from qtemperate.registry import Registry

__all__ = [
    "TEMPERATURE_SCHEDULES",
    "ConstantTemperature",
    "GradientNormTemperature",
    "LookupTableTemperature",
    "TemperateSchedule",
    "TemperatureSchedule",
    "TemperatureSuggestion",
    "suggest_initial_temperature",
    "to_lookup_table",
]

TEMPERATURE_SCHEDULES: Registry[type[TemperatureSchedule]] = Registry("temperature schedule")

_PHASES = ("warmup", "adaptive", "convergence")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _require_keys(state: Mapping[str, Any], keys: Sequence[str], cls: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{cls} state_dict must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{cls} state_dict is missing key(s) {missing}")


class TemperatureSchedule(ABC):
    """Base class of temperature schedules.

    Subclasses define ``step(...) -> float`` (which advances the schedule and
    returns the new temperature), the current :attr:`temperature` and the state
    round trip. ``min_temperature`` / ``max_temperature`` bound every value.
    """

    min_temperature: float
    max_temperature: float

    @property
    @abstractmethod
    def temperature(self) -> float:
        """The current temperature."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The mutable state as a dict of plain Python values."""

    @abstractmethod
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""


@TEMPERATURE_SCHEDULES.register("constant")
class ConstantTemperature(TemperatureSchedule):
    """A fixed temperature — the seed's edge-device mode (a mid value, 3–4).

    Args:
        temperature: the constant ``T > 0``.

    Raises:
        ValueError: if ``temperature`` is not a finite positive number.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        self._temperature = positive_number(temperature, "temperature")
        self.min_temperature = self.max_temperature = self._temperature

    @property
    def temperature(self) -> float:
        return self._temperature

    def step(self, *args: Any, **kwargs: Any) -> float:
        """Return the constant temperature; any arguments are ignored."""
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
    the stored temperature without applying the update twice. Epochs must be
    integers in ``[0, total_epochs)`` and must not decrease; skipping epochs is
    allowed (the skipped adaptive updates are simply not applied). Before the
    first step :attr:`temperature` is ``base_temperature``.

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

    _EPS = 1e-12

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

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        """Advance to ``epoch`` and return its temperature.

        Args:
            epoch: integer in ``[0, total_epochs)``, not below the last stepped epoch.
            val_loss: the validation loss; required in the adaptive phase.

        Raises:
            ValueError: for a bad epoch, or a missing / non-finite ``val_loss`` in
                the adaptive phase.
        """
        epoch = _integer(epoch, "epoch")
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch must be in [0, {self.total_epochs}), got {epoch}")
        if self._last_epoch is not None:
            if epoch == self._last_epoch:
                return self._temperature  # once per epoch: never apply an update twice
            if epoch < self._last_epoch:
                raise ValueError(f"epoch must not decrease: got {epoch} after {self._last_epoch}")
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
            start = self.convergence_start
            k, big_k = epoch - start, (self.total_epochs - 1) - start
            lo, t_enter = self.min_temperature, self._enter_temperature
            if big_k <= 0 or k >= big_k:
                t = lo  # exactly min_T at the last epoch (cos(π) rounding avoided)
            else:
                t = lo + (t_enter - lo) * (1.0 + math.cos(math.pi * k / big_k)) / 2.0
        self._temperature = _clamp(t, self.min_temperature, self.max_temperature)
        self._last_epoch = epoch
        return self._temperature

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


@TEMPERATURE_SCHEDULES.register("gradient_norm")
class GradientNormTemperature(TemperatureSchedule):
    """Temperature from the gradient norm relative to its running maximum.

    ``T = max_T − (max_T − min_T) · g / g_max`` with ``g_max`` the running maximum of
    all norms seen so far (including ``g``): the largest gradients so far give
    ``min_T`` (sharp targets while the student is far off), vanishing gradients
    give ``max_T`` (softer targets to keep learning). The first step has
    ``g = g_max`` and gives ``min_T``; while ``g_max = 0`` the temperature is
    ``max_T``. Before the first step :attr:`temperature` is ``max_T``.

    Args:
        min_temperature: ``min_T > 0``.
        max_temperature: ``max_T ≥ min_T``.

    Raises:
        ValueError: for bad bounds, or a negative / non-finite gradient norm.
    """

    def __init__(self, min_temperature: float = 1.0, max_temperature: float = 6.0) -> None:
        self.min_temperature = positive_number(min_temperature, "min_temperature")
        self.max_temperature = positive_number(max_temperature, "max_temperature")
        if self.min_temperature > self.max_temperature:
            raise ValueError(
                f"min_temperature ({min_temperature}) must be <= max_temperature ({max_temperature})"
            )
        self._grad_norm_max = 0.0
        self._temperature = self.max_temperature

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def grad_norm_max(self) -> float:
        """The running maximum ``g_max`` of the gradient norms."""
        return self._grad_norm_max

    def step(self, grad_norm: float) -> float:
        """Record ``grad_norm`` (a float or 0-dim tensor, ≥ 0) and return the new T."""
        if hasattr(grad_norm, "item"):
            grad_norm = grad_norm.item()  # type: ignore[union-attr]
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

    def __init__(self, table: Sequence[float]) -> None:
        self._table = self._check_table(table)
        self._temperature = self._table[0]

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

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        """Return the table entry for ``epoch`` (≥ 0); ``val_loss`` is ignored.

        The ``val_loss`` argument makes this a drop-in replacement for
        :class:`TemperateSchedule` in a training loop.
        """
        epoch = _integer(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._temperature = self._table[min(epoch, len(self._table) - 1)]
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
    :class:`LookupTableTemperature`); replay the result with
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
    if isinstance(schedule, GradientNormTemperature) or not hasattr(schedule, "step"):
        raise ValueError(
            f"schedule_factory must return an epoch-driven schedule, got {type(schedule).__name__}"
        )
    if val_losses is None:
        return [float(schedule.step(e)) for e in range(epochs)]  # type: ignore[attr-defined]
    return [float(schedule.step(e, val_losses[e])) for e in range(epochs)]  # type: ignore[attr-defined]


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
