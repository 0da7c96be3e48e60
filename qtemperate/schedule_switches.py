"""Recipe switches that become concrete stage schedules once the models are known.

Two of the seed's temperature switches are recipe keys; a run turns them into plain
stage blocks (numbers and schedule kinds) right after the student is derived, logs
what it chose and why, and trains the result:

* ``base_temperature: auto`` in a stage's ``temperature`` block — the §4.1 rule
  (:func:`~qtemperate.temperature.suggest_initial_temperature`) from the dataset's
  classes and training-split class counts and the teacher/student parameter counts.
  The student's count exists only once it is derived, so the run resolves it there
  (``qtemperate plan`` resolves it without class counts: a dry run reads no data).
  An ``auto`` stage then starts at that T as if the number had been written, so it
  replaces the bit-drop coupling's starting temperature for that stage.
* ``hardware: edge | cloud | mobile`` (§4.3), the deployment target:

  - ``edge``: every stage runs ``constant`` at a mid temperature: the stage's own
    ``base_temperature`` when it gives one (a number or ``auto``), else
    ``T_mid = (T_min + T_ref) / 2`` (``T_ref`` the largest of
    ``distillation.temperatures``, ``T_min`` = 1): 3.5 for the set (6, 3, 1);
  - ``cloud``: the full dynamic schedule: stages that already move T (a schedule
    that reads the validation loss or the gradient norm) run as written; a
    ``constant`` or ``lookup_table`` stage becomes ``temperate`` (keeping its
    ``base_temperature``);
  - ``mobile``: every stage replays a per-epoch table (``lookup_table``): the stage's
    schedule as written, tabulated along its no-feedback path
    (:func:`no_feedback_path`: a device has no validation loss to react to). The
    table is written as JSON beside the exported model
    (:data:`TEMPERATURE_TABLE_FILE`) with the multi-scale temperatures and loss
    weights of every epoch, so a device replays exactly what training used
    (:func:`read_temperature_table`). A ``gradient_norm`` stage cannot be tabulated
    per epoch and is an error naming the stage.

The modes are idempotent: resolving an already-resolved recipe changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtemperate.temperature import (
    AUTO_TEMPERATURE,
    TEMPERATURE_SCHEDULES,
    TemperatureSchedule,
    TemperatureSuggestion,
    settings_model,
    suggest_initial_temperature,
)

if TYPE_CHECKING:
    from qtemperate.joint_scheduler import JointScheduler
    from qtemperate.recipe import Recipe

__all__ = [
    "HARDWARE_MODES",
    "TEMPERATURE_TABLE_FILE",
    "ModelFacts",
    "Resolution",
    "SwitchError",
    "check_switches",
    "no_feedback_path",
    "read_temperature_table",
    "reads_validation_loss",
    "resolve_switches",
    "write_temperature_table",
]

HARDWARE_MODES = ("edge", "cloud", "mobile")
TEMPERATURE_TABLE_FILE = "temperature_table.json"
TABLE_FORMAT = "qtemperate-temperature-table/1"


@dataclass(frozen=True)
class ModelFacts:
    """What ``base_temperature: auto`` is computed from.

    Attributes:
        num_classes: Classes of the dataset.
        teacher_params: Teacher parameter count.
        student_params: Student parameter count (after pruning).
        class_counts: Per-class sample counts of the training split; ``None`` when
            unknown (a dry run reads no data), so the imbalance rule is not applied.
    """

    num_classes: int
    teacher_params: int
    student_params: int
    class_counts: tuple[int, ...] | None = None


@dataclass
class Resolution:
    """A recipe with its switches resolved, and what was chosen.

    Attributes:
        recipe: The recipe whose stage blocks are concrete (no ``auto``; the blocks
            the hardware mode implies). ``JointScheduler.from_recipe(recipe)`` is
            what the run trains with.
        auto: The §4.1 suggestion used for ``auto`` stages (``None`` if none asked).
        hardware: The hardware mode (``None`` if the recipe sets none).
        notes: One line per decision, for the console and the log.
        table: The mobile lookup table (:func:`write_temperature_table`'s payload).
    """

    recipe: Recipe
    auto: TemperatureSuggestion | None = None
    hardware: str | None = None
    notes: list[str] = field(default_factory=list)
    table: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s record of the switches (stable keys, scalars only)."""
        return {
            "hardware": self.hardware,
            "auto_temperature": None if self.auto is None else self.auto.temperature,
            "auto_temperature_reasons": None if self.auto is None else "; ".join(self.auto.reasons),
            "temperature_table_file": TEMPERATURE_TABLE_FILE if self.table is not None else None,
        }

    def config(self) -> dict[str, Any]:
        """The resolved stage blocks, for the run's logged config."""
        return {
            "hardware": self.hardware,
            "auto_temperature": None if self.auto is None else self.auto.temperature,
            "stage_temperatures": [st.temperature.model_dump(mode="json") for st in self.recipe.stages],
        }


# --------------------------------------------------------------------------- checks


def _kind(block_schedule: str) -> type[TemperatureSchedule]:
    return TEMPERATURE_SCHEDULES.get(block_schedule)


class SwitchError(ValueError):
    """A switch that cannot apply to this recipe; ``loc`` is the recipe field's path."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {message}")
        self.loc = loc
        self.message = message


def check_switches(recipe: Recipe) -> None:
    """What can be checked before any data or model (recipe validation calls it).

    ``hardware: mobile`` needs every stage's schedule to be epoch-driven (a
    ``gradient_norm`` stage moves T per optimizer update: no per-epoch table).

    Raises:
        SwitchError: naming ``stages.<i>.temperature.schedule``.
    """
    if recipe.hardware != "mobile":
        return
    for i, st in enumerate(recipe.stages):
        if _kind(st.temperature.schedule).uses_grad_norm:
            raise SwitchError(
                ("stages", i, "temperature", "schedule"),
                f"hardware: mobile replays a per-epoch table, but schedule "
                f"{st.temperature.schedule!r} moves T per optimizer update; use another schedule "
                "for this stage or another hardware mode",
            )


def reads_validation_loss(recipe: Recipe) -> list[str]:
    """Labels of the stages whose temperature reacts to the validation loss.

    ``edge`` and ``mobile`` runs read none (a constant T, a replayed table).
    """
    if recipe.hardware in ("edge", "mobile"):
        return []
    out = []
    for st in recipe.stages:
        kind = _kind(st.temperature.schedule)
        if kind.uses_val_loss or (recipe.hardware == "cloud" and not kind.uses_grad_norm):
            out.append(st.label)
    return out


# --------------------------------------------------------------------------- the no-feedback path


def _no_feedback_schedule(sched: JointScheduler, idx: int) -> TemperatureSchedule:
    """Stage ``idx``'s schedule rebuilt with the plateau trigger off (when it has one)."""
    st = sched.stages[idx]
    kind = _kind(st.schedule)
    kwargs = dict(st.schedule_kwargs)
    if "plateau_tol" in settings_model(kind).model_fields:
        kwargs["plateau_tol"] = 0.0  # 0 disables the trigger: no losses, no plateau
    return kind.for_stage(sched.stage_context(idx), **kwargs)


def no_feedback_path(sched: JointScheduler) -> list[dict[str, Any]]:
    """The schedule per epoch without validation feedback: what can be known before training.

    Every stage's schedule is rebuilt as the scheduler builds it, with the plateau
    trigger off, and stepped through its epochs with ``val_loss = 0`` when it reads
    one: the Temperate adaptive rule ``T ← clamp(max(T_min, α·T − β·v))`` becomes
    ``T ← α·T`` (an upper bound of the path a run takes, since ``v > 0``), warm-up
    and convergence are as in a run. A schedule that moves per optimizer update
    (``gradient_norm``) shows the T it holds before its first update.

    Returns:
        One row per global epoch: ``epoch``, ``stage``, ``stage_index``,
        ``weight_bits``, ``act_bits``, ``T``, ``temperatures`` (the multi-scale set),
        ``weights`` (their loss weights), ``phase`` and ``moves_per_update``.
    """
    rows: list[dict[str, Any]] = []
    for idx, (first, _last) in enumerate(sched.stage_bounds()):
        st = sched.stages[idx]
        schedule = _no_feedback_schedule(sched, idx)
        for local in range(st.epochs):
            t = float(schedule.step(local, 0.0 if schedule.uses_val_loss else None))
            rows.append({
                "epoch": first + local,
                "stage": st.name,
                "stage_index": idx,
                "weight_bits": st.weight_bits,
                "act_bits": st.act_bits,
                "T": t,
                "temperatures": list(sched.scale_temperatures(t)),
                "weights": list(sched.stage_weights(idx)),
                "phase": str(getattr(schedule, "phase", st.schedule)),
                "moves_per_update": bool(schedule.uses_grad_norm),
            })
    return rows


# --------------------------------------------------------------------------- resolution


def _fmt(t: float) -> str:
    return f"{t:.4g}"


def resolve_switches(
    recipe: Recipe,
    facts: ModelFacts | None = None,
    say: Callable[[str], None] | None = None,
) -> Resolution:
    """Resolve ``base_temperature: auto`` and ``hardware`` into concrete stage blocks.

    Args:
        recipe: A validated recipe.
        facts: Classes, class counts and parameter counts; required when a stage
            asks for ``auto``.
        say: Called with each note (e.g. the console).

    Returns:
        The :class:`Resolution`; its recipe is validated like any other.

    Raises:
        ValueError: ``auto`` without ``facts``, or a mode that cannot apply (naming
            the stage).
    """
    from qtemperate.joint_scheduler import JointScheduler
    from qtemperate.recipe import parse_recipe

    check_switches(recipe)
    raw = recipe.model_dump(mode="json")
    blocks: list[dict[str, Any]] = [dict(st["temperature"]) for st in raw["stages"]]
    res = Resolution(recipe=recipe, hardware=recipe.hardware)

    auto_stages = [i for i, b in enumerate(blocks) if b.get("base_temperature") == AUTO_TEMPERATURE]
    if auto_stages:
        if facts is None:
            raise ValueError(
                "base_temperature: auto needs the dataset's classes and the teacher/student "
                "parameter counts (ModelFacts)"
            )
        res.auto = suggest_initial_temperature(
            facts.num_classes, facts.teacher_params, facts.student_params,
            list(facts.class_counts) if facts.class_counts is not None else None,
        )
        for i in auto_stages:
            blocks[i]["base_temperature"] = res.auto.temperature
        labels = ", ".join(recipe.stages[i].label for i in auto_stages)
        why = "; ".join(res.auto.reasons)
        if facts.class_counts is None:
            why += "; class counts not read (dry run): the imbalance rule is not applied"
        res.notes.append(f"base_temperature auto -> T = {_fmt(res.auto.temperature)} ({labels}): {why}")

    def current() -> Recipe:
        for st, block in zip(raw["stages"], blocks):
            st["temperature"] = block
        return parse_recipe(raw, source="resolved recipe")

    mode = recipe.hardware
    if mode is not None:
        resolved = current() if auto_stages else recipe
        sched = JointScheduler.from_recipe(resolved)
        for i, block in enumerate(blocks):
            label, kind_name = recipe.stages[i].label, block["schedule"]
            kind = _kind(kind_name)
            if mode == "edge":
                base = block.get("base_temperature")
                if kind_name == "constant" and base is not None:
                    continue
                t = float(base) if base is not None else (sched.min_temperature + sched.reference_temperature) / 2
                t = min(max(t, sched.min_temperature), sched.max_temperature)
                blocks[i] = {"schedule": "constant", "base_temperature": t}
                res.notes.append(f"hardware edge: stage {label} {kind_name} -> constant T = {_fmt(t)}")
            elif mode == "cloud":
                if kind.uses_val_loss or kind.uses_grad_norm:
                    continue
                new: dict[str, Any] = {"schedule": "temperate"}
                if block.get("base_temperature") is not None:
                    new["base_temperature"] = block["base_temperature"]
                blocks[i] = new
                res.notes.append(f"hardware cloud: stage {label} {kind_name} -> temperate (dynamic T)")
            else:  # mobile
                if kind_name == "lookup_table":
                    continue
                start = sum(st.epochs for st in sched.stages[:i])
                path = [r for r in no_feedback_path(sched) if r["stage_index"] == i]
                table = [r["T"] for r in path]
                blocks[i] = {"schedule": "lookup_table", "table": table}
                res.notes.append(
                    f"hardware mobile: stage {label} {kind_name} -> lookup_table "
                    f"{[round(t, 3) for t in table]} (epochs {start}..{start + len(table) - 1}, "
                    "no validation feedback)"
                )
    res.recipe = current() if (auto_stages or mode is not None) else recipe
    if mode == "mobile":
        res.table = _table_payload(res.recipe)
    if say is not None:
        for line in res.notes:
            say(line)
    return res


# --------------------------------------------------------------------------- the mobile table


def _table_payload(recipe: Recipe) -> dict[str, Any]:
    from qtemperate.joint_scheduler import JointScheduler

    sched = JointScheduler.from_recipe(recipe)
    rows = no_feedback_path(sched)  # lookup tables read no feedback: this is the run's path
    stages = []
    for idx, (first, last) in enumerate(sched.stage_bounds()):
        st = sched.stages[idx]
        mine = rows[first:last]
        stages.append({
            "name": st.name,
            "weight_bits": st.weight_bits,
            "act_bits": st.act_bits,
            "first_epoch": first,
            "epochs": st.epochs,
            "table": [r["T"] for r in mine],
            "temperatures": [r["temperatures"] for r in mine],
            "weights": list(sched.stage_weights(idx)),
        })
    return {
        "format": TABLE_FORMAT,
        "recipe": recipe.name,
        "hardware": recipe.hardware,
        "reference_temperatures": list(sched.base_temperatures),
        "replay": (
            "per stage, epoch e (0-based within the stage): T = table[min(e, len(table) - 1)] "
            "(qtemperate.LookupTableTemperature(table)); the multi-scale temperatures of that "
            "epoch are temperatures[e], weighted by weights"
        ),
        "stages": stages,
    }


def write_temperature_table(resolution: Resolution, folder: str | Path) -> Path | None:
    """Write the mobile table as ``folder/temperature_table.json``; ``None`` if not mobile."""
    if resolution.table is None:
        return None
    path = Path(folder) / TEMPERATURE_TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(resolution.table, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_temperature_table(path: str | Path) -> list[dict[str, Any]]:
    """Replay a written table: one row per global epoch (``epoch``, ``stage``, ``T``,
    ``temperatures``, ``weights``), T from :class:`~qtemperate.temperature.LookupTableTemperature`.

    Raises:
        ValueError: not a qtemperate temperature table.
    """
    from qtemperate.temperature import LookupTableTemperature

    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a qtemperate temperature table ({TABLE_FORMAT})")
    rows = []
    for st in data["stages"]:
        lut = LookupTableTemperature(st["table"])
        for e in range(st["epochs"]):
            rows.append({
                "epoch": st["first_epoch"] + e,
                "stage": st["name"],
                "T": lut.step(e),
                "temperatures": st["temperatures"][min(e, len(st["temperatures"]) - 1)],
                "weights": st["weights"],
            })
    return rows

