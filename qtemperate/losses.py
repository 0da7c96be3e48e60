"""Knowledge-distillation losses: single-temperature, multi-scale and the combined loss.

The KD term follows Hinton et al. (2015): both logit sets are softened by a
temperature ``T`` and the student is pulled towards the teacher's softened
distribution with a Kullback–Leibler divergence scaled by ``T²`` (so the gradient
magnitude does not shrink as ``T`` grows). The multi-scale variant sums this term
over several temperatures — the seed's fusion of ``T=6`` (global semantics),
``T=3`` (balance) and ``T=1`` (fine structure).

All losses are pure functions of tensors; :class:`TemperateLoss` only holds the
current temperatures and weights, which a schedule updates each step or epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtemperate._validation import positive_number
from qtemperate.heads import Task

if TYPE_CHECKING:
    from qtemperate.recipe import Recipe

__all__ = [
    "TemperateLoss",
    "kd_loss",
    "multi_scale_kd_loss",
    "normalize_weights",
]

TemperatureLike = float | Tensor


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise ValueError("student_logits and teacher_logits must be tensors")
    if student_logits.ndim < 2:
        raise ValueError(
            "student_logits must have shape (B, C) or (B, C, ...), "
            f"got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0 or student_logits.shape[1] == 0:
        raise ValueError(
            f"student_logits must have a non-empty batch and class dim, got {tuple(student_logits.shape)}"
        )


def _check_scalar_temperature(value: float, name: str = "temperature") -> float:
    return positive_number(value, name)


def _temperature_tensor(temperature: TemperatureLike, logits: Tensor) -> float | Tensor:
    """Validate ``temperature``; return a float or a tensor broadcastable to ``logits``."""
    if isinstance(temperature, Tensor):
        if temperature.ndim == 0:
            return _check_scalar_temperature(temperature.item())
        batch = logits.shape[0]
        if temperature.shape != (batch,):
            raise ValueError(
                f"a per-sample temperature must have shape ({batch},), "
                f"got {tuple(temperature.shape)}"
            )
        t = temperature.detach().to(device=logits.device, dtype=logits.dtype)
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError("temperature must be finite and > 0 for every sample")
        # (B,) -> (B, 1, 1, ...) so it broadcasts over the class dim and any spatial dims.
        return t.reshape((batch,) + (1,) * (logits.ndim - 1))
    if isinstance(temperature, bool):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return _check_scalar_temperature(temperature)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: TemperatureLike) -> Tensor:
    """Temperature-scaled distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    For logits of shape ``(B, C)`` or ``(B, C, d1, ...)`` the class dim is dim 1::

        p = softmax(t / T, dim=1),  log q = log_softmax(s / T, dim=1)
        loss = mean over (b, d1, ...) of  T_b² · Σ_c p_c · (log p_c − log q_c)

    i.e. the KL divergence is summed over classes and averaged over the batch rows
    and every other position. Both distributions are computed with ``log_softmax``,
    so logits as large as ±1e4 give a finite loss. The gradient with respect to the
    student logits of shape ``(B, C)`` is ``T · (softmax(s/T) − softmax(t/T)) / B``.

    Args:
        student_logits: student logits ``(B, C, ...)``; gradients flow into them.
        teacher_logits: teacher logits of the same shape; detached here (the
            teacher only provides targets).
        temperature: a positive float (or 0-dim tensor), or a per-sample tensor of
            shape ``(B,)`` whose entries are all positive; a tensor temperature is
            treated as a constant (no gradient flows into it).

    Returns:
        A 0-dim tensor in the student's dtype.

    Raises:
        ValueError: if ``temperature`` is not positive and finite, has the wrong
            shape, or the logit shapes differ / have fewer than two dims.
    """
    _check_logits(student_logits, teacher_logits)
    t = _temperature_tensor(temperature, student_logits)
    teacher = teacher_logits.detach().to(dtype=student_logits.dtype)
    log_q = F.log_softmax(student_logits / t, dim=1)
    log_p = F.log_softmax(teacher / t, dim=1)
    # p · (log p − log q); p may underflow to exactly 0 while log p stays finite,
    # so the product is 0 rather than 0 · (−inf) = nan.
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    kl = kl * (t.squeeze(1) ** 2 if isinstance(t, Tensor) else t * t)
    return kl.mean()


def normalize_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """Normalise ``n`` non-negative weights to sum to 1.

    ``λ_i = w_i / Σ_j w_j``; ``None`` gives uniform weights ``1/n``.

    Args:
        weights: ``n`` finite, non-negative numbers, not all zero, or ``None``.
        n: the number of terms (≥ 1).

    Returns:
        A tuple of ``n`` floats summing to 1 (up to rounding).

    Raises:
        ValueError: if ``n < 1``, the length differs from ``n``, a weight is
            negative or non-finite, or all weights are zero.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if weights is None:
        return (1.0 / n,) * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a sequence of {n} numbers, got {weights!r}")
    if len(weights) != n:
        raise ValueError(f"weights must have length {n} (one per term), got {len(weights)}")
    values = []
    for i, w in enumerate(weights):
        try:
            v = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weights[{i}] must be a number, got {w!r}") from None
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"weights[{i}] must be finite and >= 0, got {w!r}")
        values.append(v)
    total = math.fsum(values)
    if total <= 0.0:
        raise ValueError("weights must not all be zero")
    return tuple(v / total for v in values)


def _as_temperature_tuple(
    temperatures: TemperatureLike | Sequence[TemperatureLike], name: str = "temperatures"
) -> tuple[TemperatureLike, ...]:
    if isinstance(temperatures, (int, float, Tensor)) and not isinstance(temperatures, bool):
        return (temperatures,)
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence):
        raise ValueError(f"{name} must be a number or a sequence of numbers, got {temperatures!r}")
    if len(temperatures) == 0:
        raise ValueError(f"{name} must not be empty")
    return tuple(temperatures)


def _multi_scale_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: Sequence[TemperatureLike],
    weights: Sequence[float],
) -> tuple[Tensor, list[Tensor]]:
    """Return ``(Σ λ_i · kd_i, [kd_i])``; ``weights`` must already be normalised."""
    parts = [kd_loss(student_logits, teacher_logits, t) for t in temperatures]
    # Start from the first term (not 0) so a single temperature reproduces kd_loss bit-exactly.
    total = weights[0] * parts[0] if len(parts) > 1 else parts[0]
    for w, p in zip(weights[1:], parts[1:]):
        total = total + w * p
    return total, parts


def multi_scale_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: TemperatureLike | Sequence[TemperatureLike] = (6.0, 3.0, 1.0),
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Multi-temperature distillation ``Σ_i λ_i · kd_loss(s, t, T_i)``.

    The default ``(6, 3, 1)`` is the seed's fusion: ``T=6`` transfers global
    semantics (class similarities), ``T=3`` balances, ``T=1`` keeps the fine
    structure of the teacher's top prediction. ``λ = normalize_weights(weights)``,
    so ``weights=None`` means uniform ``λ_i = 1/n`` (no scale is privileged by
    default; pass e.g. ``(0.2, 0.5, 0.3)`` to favour the balanced scale). With a
    single temperature the result equals ``kd_loss`` exactly.

    Args:
        student_logits: student logits ``(B, C, ...)``.
        teacher_logits: teacher logits of the same shape (detached inside).
        temperatures: one temperature or a non-empty sequence; each is a float or a
            per-sample ``(B,)`` tensor as accepted by :func:`kd_loss`.
        weights: non-negative weights, one per temperature, not all zero; or None.

    Returns:
        A 0-dim tensor.

    Raises:
        ValueError: for an empty ``temperatures``, bad weights or any argument
            :func:`kd_loss` rejects.
    """
    temps = _as_temperature_tuple(temperatures)
    lam = normalize_weights(weights, len(temps))
    total, _ = _multi_scale_parts(student_logits, teacher_logits, temps, lam)
    return total


def _float_temperatures(
    temperatures: float | Sequence[float], name: str = "temperatures"
) -> tuple[float, ...]:
    temps = _as_temperature_tuple(temperatures, name)
    out = tuple(
        _check_scalar_temperature(t.item() if isinstance(t, Tensor) else t, f"{name}[{i}]")
        for i, t in enumerate(temps)
    )
    return out


def _merge_equal_temperatures(
    temps: tuple[float, ...], lam: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Merge temperatures that coincide (as logged with ``:g``), summing their weights.

    Σ λᵢ·KD(Tᵢ) is unchanged, one KD is computed per distinct T, and the ``kd_T{T}``
    log keys cannot collide — a schedule that decays every scale to T = 1 at the end
    of a stage hands over ``(1, 1, 1)``.
    """
    merged: dict[str, list[float]] = {}
    for t, w in zip(temps, lam):
        key = f"{t:g}"
        if key in merged:
            merged[key][1] += w
        else:
            merged[key] = [t, w]
    return tuple(v[0] for v in merged.values()), tuple(v[1] for v in merged.values())


def _check_kd_weight(kd_weight: float) -> float:
    try:
        w = float(kd_weight)
    except (TypeError, ValueError):
        raise ValueError(f"kd_weight must be a number in [0, 1], got {kd_weight!r}") from None
    if not 0.0 <= w <= 1.0:  # also rejects nan
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight!r}")
    return w


class TemperateLoss(nn.Module):
    """Task loss plus (multi-scale) distillation, with temperatures set by a schedule.

    ``loss = (1 − kd_weight) · CE(student, labels) + kd_weight · KD`` where
    ``KD = Σ_i λ_i · kd_loss(student, teacher, T_i)`` (see :func:`multi_scale_kd_loss`).

    Multi-head models: when ``student_out`` and ``teacher_out`` are dicts (e.g. a
    detector's class and feature heads) they must have the same keys. ``CE`` uses
    the head ``task_head``; the distillation term is
    ``KD = Σ_h ω_h · KD_h`` with ``KD_h`` the multi-scale loss of head ``h`` at that
    head's temperatures and ``ω = normalize_weights`` of ``head_weights`` (a head
    missing from ``head_weights`` gets raw weight 1; a head with weight 0 is not
    distilled at all, e.g. a box-regression head). A head listed in
    ``head_temperatures`` uses those temperatures (uniform λ unless changed with
    ``set_temperatures(..., head=h)``); every other head follows the shared
    :attr:`temperatures`, which the schedule updates (:meth:`follow` sets both from a
    :class:`~qtemperate.joint_scheduler.StageState`).

    The task term: with a ``task`` (:class:`~qtemperate.heads.Task`: a loss, target
    and weight per head, e.g. cross-entropy on ``logits`` against ``labels`` and
    smooth-L1 on ``boxes`` against ``boxes``) ``CE`` above is replaced by
    ``Σ_h w_h · L_h(student_h, target_h)`` and ``labels`` is the batch's targets (a
    dict of tensors, or the class-label tensor); the parts then include
    ``task_{head}``. A regression head is trained by its task loss only: give it
    ``head_weights`` 0 (the softmax KD does not apply to it).

    Returned parts (all 0-dim tensors): ``loss``, ``task_loss``, ``kd_loss`` and,
    for tensor outputs, ``kd_T{T:g}`` per temperature (e.g. ``kd_T4``,
    ``kd_T2.5``); for dict outputs, ``kd_{head}`` and ``kd_{head}_T{T:g}`` for every
    distilled head instead. The per-temperature entries are the unweighted
    ``kd_loss`` values, so ``kd_loss = Σ λ_i · kd_T{T_i}``.

    Args:
        kd_weight: weight of the KD term, in ``[0, 1]``.
        temperatures: shared temperature(s), positive and distinct.
        weights: weights of the shared temperatures (``None``: uniform).
        head_temperatures: per-head temperature overrides for dict outputs.
        head_weights: per-head raw weights for dict outputs (``None``: uniform).
        task_head: the head that receives the cross-entropy in dict outputs (without
            ``task``).
        task: per-head task losses for dict outputs (see above).

    Raises:
        ValueError: for any bad argument, naming it.
    """

    def __init__(
        self,
        kd_weight: float = 0.9,
        temperatures: float | Sequence[float] = (4.0,),
        weights: Sequence[float] | None = None,
        *,
        head_temperatures: Mapping[str, float | Sequence[float]] | None = None,
        head_weights: Mapping[str, float] | None = None,
        task_head: str = "logits",
        task: Task | None = None,
    ) -> None:
        super().__init__()
        if task is not None and not isinstance(task, Task):
            raise ValueError(f"task must be a qtemperate.heads.Task, got {task!r}")
        self.task = task if task is not None and task.multi_head else None
        self.kd_weight = _check_kd_weight(kd_weight)
        self._temperatures: tuple[float, ...] = ()
        self._weights: tuple[float, ...] = ()
        self.set_temperatures(temperatures, weights)
        if not isinstance(task_head, str):
            raise ValueError(f"task_head must be a string, got {task_head!r}")
        self.task_head = task_head
        self._head_temperatures: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
        if head_temperatures is not None:
            if not isinstance(head_temperatures, Mapping):
                raise ValueError(
                    f"head_temperatures must be a dict head -> temperature(s), got {head_temperatures!r}"
                )
            for head, temps in head_temperatures.items():
                self.set_temperatures(temps, head=head)
        self._head_weights: dict[str, float] = {}
        if head_weights is not None:
            if not isinstance(head_weights, Mapping):
                raise ValueError(
                    f"head_weights must be a dict head -> weight, got {head_weights!r}"
                )
            for head, w in head_weights.items():
                try:
                    v = float(w)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"head_weights[{head!r}] must be a number, got {w!r}"
                    ) from None
                if not math.isfinite(v) or v < 0.0:
                    raise ValueError(f"head_weights[{head!r}] must be finite and >= 0, got {w!r}")
                self._head_weights[str(head)] = v

    @property
    def temperatures(self) -> tuple[float, ...]:
        """The shared temperatures ``(T_1, ..., T_n)``."""
        return self._temperatures

    @property
    def weights(self) -> tuple[float, ...]:
        """The normalised weights ``(λ_1, ..., λ_n)`` of the shared temperatures."""
        return self._weights

    @property
    def head_temperatures(self) -> dict[str, tuple[float, ...]]:
        """Per-head temperature overrides (a copy)."""
        return {h: temps for h, (temps, _) in self._head_temperatures.items()}

    def set_temperatures(
        self,
        temperatures: float | Sequence[float],
        weights: Sequence[float] | None = None,
        *,
        head: str | None = None,
    ) -> None:
        """Set the temperatures (and their weights), typically from a schedule.

        Args:
            temperatures: a positive float or a non-empty sequence; equal ones are
                merged with their weights summed.
            weights: their non-negative weights (``None``: uniform), normalised.
            head: for dict outputs, set this head's override instead of the shared
                temperatures.

        Raises:
            ValueError: for a bad temperature or weight.
        """
        name = "temperatures" if head is None else f"head_temperatures[{head!r}]"
        temps = _float_temperatures(temperatures, name)
        lam = normalize_weights(weights, len(temps))
        temps, lam = _merge_equal_temperatures(temps, lam)
        if head is None:
            self._temperatures, self._weights = temps, lam
        else:
            if not isinstance(head, str):
                raise ValueError(f"head must be a string, got {head!r}")
            self._head_temperatures[head] = (temps, lam)

    def follow(self, state: Any) -> None:
        """Take the temperatures of a scheduler state (shared set and every head's).

        ``state`` is a :class:`~qtemperate.joint_scheduler.StageState` (or anything with
        ``temperatures``, ``weights`` and, for multi-head models, ``head_temperatures``
        and ``head_weights`` mappings).
        """
        self.set_temperatures(state.temperatures, state.weights)
        head_weights = getattr(state, "head_weights", {}) or {}
        for head, temps in (getattr(state, "head_temperatures", {}) or {}).items():
            self.set_temperatures(temps, head_weights.get(head), head=head)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> TemperateLoss:
        """The loss a recipe describes: ``distillation`` (kd_weight, temperatures, weights,
        head_temperatures, head_weights) and the ``task`` section."""
        d = recipe.distillation
        task = Task.from_recipe(recipe)
        return cls(
            kd_weight=d.kd_weight, temperatures=tuple(d.temperatures), weights=d.weights,
            head_temperatures=d.head_temperatures, head_weights=d.head_weights,
            task_head=task.accuracy_head or "logits", task=task,
        )

    def set_kd_weight(self, kd_weight: float) -> None:
        """Set the weight of the KD term (in ``[0, 1]``)."""
        self.kd_weight = _check_kd_weight(kd_weight)

    def extra_repr(self) -> str:
        return f"kd_weight={self.kd_weight:g}, temperatures={self._temperatures}, weights={self._weights}"

    def forward(
        self,
        student_out: Tensor | Mapping[str, Tensor],
        teacher_out: Tensor | Mapping[str, Tensor],
        labels: Tensor | Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """Compute the loss and its parts (see the class docstring for the formula).

        Raises:
            ValueError: if one output is a dict and the other is not, the heads
                differ (naming the head), or a configured head is missing.
        """
        s_is_dict = isinstance(student_out, Mapping)
        if s_is_dict != isinstance(teacher_out, Mapping):
            raise ValueError("student_out and teacher_out must both be tensors or both be dicts")
        if not s_is_dict:
            assert isinstance(student_out, Tensor) and isinstance(teacher_out, Tensor)
            kd, parts = _multi_scale_parts(
                student_out, teacher_out, self._temperatures, self._weights
            )
            out = {f"kd_T{t:g}": p for t, p in zip(self._temperatures, parts)}
            task = F.cross_entropy(student_out, labels)  # type: ignore[arg-type]
        else:
            assert isinstance(student_out, Mapping) and isinstance(teacher_out, Mapping)
            kd, out = self._dict_kd(student_out, teacher_out)
            if self.task is not None:
                task, task_parts = self.task.loss(student_out, labels)
                out.update(task_parts)
            else:
                task = F.cross_entropy(student_out[self.task_head], labels)
        w = self.kd_weight
        loss = (1.0 - w) * task + w * kd
        return {"loss": loss, "task_loss": task, "kd_loss": kd, **out}

    def _dict_kd(
        self, student_out: Mapping[str, Tensor], teacher_out: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        for head in student_out:
            if head not in teacher_out:
                raise ValueError(f"head {head!r} is in student_out but not in teacher_out")
        for head in teacher_out:
            if head not in student_out:
                raise ValueError(f"head {head!r} is in teacher_out but not in student_out")
        if self.task is None and self.task_head not in student_out:
            raise ValueError(f"task_head {self.task_head!r} is not among the output heads")
        for name, mapping in (
            ("head_temperatures", self._head_temperatures),
            ("head_weights", self._head_weights),
        ):
            for head in mapping:
                if head not in student_out:
                    raise ValueError(f"{name} names head {head!r}, which is not in the outputs")
        heads = list(student_out)
        omega = normalize_weights([self._head_weights.get(h, 1.0) for h in heads], len(heads))
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        for head, om in zip(heads, omega):
            if om == 0.0:
                continue
            temps, lam = self._head_temperatures.get(head, (self._temperatures, self._weights))
            head_kd, per_t = _multi_scale_parts(student_out[head], teacher_out[head], temps, lam)
            parts[f"kd_{head}"] = head_kd
            for t, p in zip(temps, per_t):
                parts[f"kd_{head}_T{t:g}"] = p
            total = om * head_kd if total is None else total + om * head_kd
        assert total is not None  # normalize_weights guarantees one positive weight
        return total, parts
