"""Recipes: YAML files validated into typed objects before anything runs.

A recipe is data. :func:`load_recipe` reads it with ``yaml.safe_load``, applies
``--set key.path=value`` overrides, and validates it into :class:`Recipe` (pydantic
v2, unknown keys rejected). Every validation problem becomes a :class:`RecipeError`
whose message names the field path (``stages.1.weight_bits``) or the file, so the
CLI can print one line and exit 2 before any training starts.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    Strict,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# FLOAT_BITS stays importable from here; the bit-width facts live in qtemperate.bits.
from qtemperate.bits import FLOAT_BITS, QUANT_BITS, check_bits, check_stage_bits, is_quantized
from qtemperate.errors import BadInput
from qtemperate.temperature import TEMPERATURE_SCHEDULES, TemperatureSchedule, settings_model

__all__ = [
    "DataConfig",
    "DistillationConfig",
    "DistributedConfig",
    "ExportConfig",
    "OptimizerConfig",
    "PrecisionConfig",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "StudentConfig",
    "TaskConfig",
    "TaskLossConfig",
    "TeacherConfig",
    "TeacherTrainConfig",
    "TemperatureConfig",
    "TrackingConfig",
    "apply_overrides",
    "load_recipe",
    "parse_recipe",
]

# Counts and bit widths must be real integers: YAML's `yes` (a bool) or "8" (a string)
# silently becoming 1 or 8 would hide a typo.
Int = Annotated[int, Strict()]


class RecipeError(BadInput, ValueError):
    """A recipe (or one of the files it names) is invalid. The message names the field (exit 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


DEFAULT_SCHEDULE = "temperate"


class TemperatureConfig(BaseModel):
    """The temperature schedule run inside one stage: one block per schedule kind.

    ``schedule`` names a kind registered in
    :data:`~qtemperate.temperature.TEMPERATURE_SCHEDULES` (default ``temperate``):
    ``temperate`` (warm-up / adaptive / convergence), ``constant`` (fixed T: the
    edge-device mode and the fixed-T baseline), ``gradient_norm`` (T driven by the
    student's gradient norm), ``lookup_table`` (replay ``table``), or one that user
    code registered. The other keys are that kind's settings and nothing else: a
    block is an instance of :meth:`of` ``(schedule)``, this class plus the schedule's
    ``Settings`` model (declared next to the schedule class, or derived from its
    ``for_stage``), so a key of another kind is an error naming the field path and
    the schedule. ``base_temperature`` left empty means "the joint scheduler decides":
    the largest of ``distillation.temperatures`` raised by the bit-drop coupling rule.

    The kind is looked up when the block is validated (:func:`_temperature_block`),
    so a schedule registered after this module was imported is usable by name.
    """

    # No `extra` here: a block takes it from its schedule's Settings (forbid, or allow
    # for a user's `for_stage(ctx, **settings)`), which this base must not override.
    model_config = ConfigDict(validate_assignment=True)

    schedule: str

    @classmethod
    def of(cls, schedule: str) -> type[TemperatureConfig]:
        """The block model of the registered kind ``schedule``.

        Raises:
            KeyError: for an unknown kind, listing the known ones.
            TypeError: for a kind that cannot be built from a recipe.
        """
        return _block_model(schedule, TEMPERATURE_SCHEDULES.get(schedule))

    def settings(self) -> dict[str, Any]:
        """The schedule's settings: every field but ``schedule``, as ``for_stage`` keywords."""
        return self.model_dump(exclude={"schedule"})


@functools.cache
def _block_model(key: str, schedule: type[TemperatureSchedule]) -> type[TemperatureConfig]:
    # Keyed by the class too: a key unregistered and registered again gets a new block.
    settings = settings_model(schedule)
    block: type[TemperatureConfig] = create_model(  # type: ignore[call-overload]
        f"{schedule.__name__}Config",
        # Settings first: its fields and config (extra) win; `schedule` still comes first.
        __base__=(settings, TemperatureConfig),
        __module__=__name__,
        schedule=(Literal[key], key),
    )
    block.__doc__ = f"The ``temperature`` block of a ``{key}`` stage: ``schedule`` and its settings."
    return block


def _field_error(field: str, value: Any, message: str) -> ValidationError:
    """A validation error at ``field`` inside the block (the caller's path is prefixed)."""
    return ValidationError.from_exception_data(
        "TemperatureConfig",
        [{"type": PydanticCustomError("temperature_block", message), "loc": (field,), "input": value}],
    )


def _temperature_block(value: Any, handler: Any) -> TemperatureConfig:
    """Validate a stage's ``temperature`` block as the block of the kind it names.

    The dispatch is the registry: the kind is looked up in ``TEMPERATURE_SCHEDULES``
    at validation time and its block model validates the rest (``handler``, the bare
    base model's validation, is never used).
    """
    if isinstance(value, TemperatureConfig):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            "temperature_block",
            f"expected a mapping of schedule settings, got {type(value).__name__}",
        )
    key = value.get("schedule", DEFAULT_SCHEDULE)
    known = ", ".join(TEMPERATURE_SCHEDULES.keys())
    if not isinstance(key, str) or key not in TEMPERATURE_SCHEDULES:
        raise _field_error("schedule", key, f"unknown temperature schedule {key!r}; known: {known}")
    try:
        block = TemperatureConfig.of(key)
    except TypeError as exc:  # registered, but not buildable from a recipe
        raise _field_error("schedule", key, str(exc)) from None
    if block.model_config.get("extra") == "forbid":
        names = [f for f in block.model_fields if f != "schedule"]
        unknown = [k for k in value if k not in block.model_fields]
        if unknown:
            why = (
                f"unknown key (not a setting of schedule {key!r}; "
                f"its settings: {', '.join(names) or '(none)'})"
            )
            raise ValidationError.from_exception_data(
                "TemperatureConfig",
                [
                    {"type": PydanticCustomError("unknown_setting", why), "loc": (k,), "input": value[k]}
                    for k in unknown
                ],
            )
    return block.model_validate({**value, "schedule": key})


def _default_temperature() -> TemperatureConfig:
    return TemperatureConfig.of(DEFAULT_SCHEDULE)()


class StageConfig(_Strict):
    """One bit-width stage: ``epochs`` of training at ``weight_bits``/``act_bits``.

    32/32 is a float stage; quantized stages use 2..8 bits. ``temperature`` is the
    stage's schedule block (:class:`TemperatureConfig`), ``temperate`` by default.
    ``freeze_act_ranges_at``: fraction ``f`` of the stage's optimizer steps after which
    the learned activation ranges stop training
    (:func:`~qtemperate.quantization.freeze_activation_ranges`): the steps from
    ``first + ceil(f * steps)`` on keep them fixed and run faster (no scale gradient);
    0 freezes the calibrated ranges for the whole stage; unset (the default) never.
    """

    name: str | None = None
    epochs: Int = Field(gt=0)
    weight_bits: Int = FLOAT_BITS
    act_bits: Int = FLOAT_BITS
    lr: float | None = Field(default=None, gt=0)
    temperature: Annotated[SerializeAsAny[TemperatureConfig], WrapValidator(_temperature_block)] = (
        Field(default_factory=_default_temperature)
    )
    freeze_act_ranges_at: float | None = Field(default=None, ge=0, lt=1)

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _bits(cls, value: int, info: ValidationInfo) -> int:
        return check_bits(str(info.field_name), value)

    @model_validator(mode="after")
    def _float_or_quant(self) -> StageConfig:
        check_stage_bits(self.weight_bits, self.act_bits)
        if self.freeze_act_ranges_at is not None and not self.quantized:
            raise ValueError("freeze_act_ranges_at: a float stage has no activation ranges to freeze")
        return self

    @property
    def quantized(self) -> bool:
        return is_quantized(self.weight_bits, self.act_bits)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "float" if not self.quantized else f"w{self.weight_bits}a{self.act_bits}"


class TeacherTrainConfig(_Strict):
    """Train the teacher from scratch inside the run (no pretrained weights exist here)."""

    epochs: Int = Field(gt=0)
    lr: float = Field(default=0.05, gt=0)


class TeacherConfig(_Strict):
    """The teacher: a registry name or import path, and a checkpoint and/or training."""

    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
    train: TeacherTrainConfig | None = None

    @model_validator(mode="after")
    def _has_weights(self) -> TeacherConfig:
        if self.checkpoint is None and self.train is None:
            raise ValueError("give a checkpoint or train: {epochs: N}")
        return self


class StudentConfig(_Strict):
    """The student: derived from the teacher by pruning, or its own architecture.

    Size targets: ``target_size_ratio`` is the student's true quantized bytes over
    the teacher's float bytes (the planner picks the pruning ratio from the final
    stage's bit widths); ``prune_ratio`` instead keeps that fraction of parameters.
    """

    model: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    target_size_ratio: float | None = Field(default=None, gt=0, le=1)
    prune_ratio: float | None = Field(default=None, gt=0, le=1)
    importance: str = "l2"
    iterative_steps: Int = Field(default=8, ge=1)
    max_layer_ratio: float = Field(default=0.9, gt=0, lt=1)
    round_to: Int | None = Field(default=None, ge=1)
    first_last_bits: Int = 8
    per_channel: bool = True
    calibration_batches: Int = Field(default=8, ge=0)

    @field_validator("first_last_bits")
    @classmethod
    def _fl_bits(cls, v: int) -> int:
        if v not in QUANT_BITS:
            raise ValueError(f"bits must be 2..8, got {v}")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> StudentConfig:
        if self.target_size_ratio is not None and self.prune_ratio is not None:
            raise ValueError("give target_size_ratio or prune_ratio, not both")
        return self


def _registered_dataset(name: str) -> str:
    # Imported here: the registry (and torch) load only when a recipe is validated,
    # after user code had its chance to register a dataset.
    from qtemperate.data import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS.keys())}")
    return name


DatasetName = Annotated[str, AfterValidator(_registered_dataset)]
"""A key of :data:`qtemperate.data.DATASETS` (built-in or registered by user code)."""


class DataConfig(_Strict):
    """Where the data comes from. No downloads: files must already be on disk.

    ``name`` is a key of :data:`qtemperate.data.DATASETS`, so a dataset registered by
    user code is usable by name; ``kwargs`` are its builder's options (checked by
    :func:`qtemperate.preflight.preflight`). ``val_fraction`` (default 0.1) holds out a
    class-balanced part of the training set whose loss drives the temperature schedule
    and its plateau trigger; the test split is only read for the reported accuracy.
    With 0 the test split's loss drives them, and the run warns.
    ``batch_size`` is the global batch of one optimizer step: under torchrun with ``W``
    processes each loads ``batch_size / W``; ``eval_batch_size`` and ``num_workers`` are
    per process.
    """

    name: DatasetName
    root: Path | None = None
    batch_size: Int = Field(default=128, gt=0)
    eval_batch_size: Int = Field(default=512, gt=0)
    limit_train: Int | None = Field(default=None, gt=0)
    limit_test: Int | None = Field(default=None, gt=0)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    augment: bool = False
    num_workers: Int = Field(default=0, ge=0)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DistillationConfig(_Strict):
    """The Temperate loss and the bit-drop coupling rule of the joint scheduler.

    Multi-head models (with a ``task`` section): ``head_temperatures`` gives a head its
    own reference temperature(s), moved by the schedule like ``temperatures`` (at
    ``T(t) = max(temperatures)`` a head is at its recipe value; all reach 1 together);
    ``head_weights`` weighs each head's KD (normalised; a head left out has weight 1,
    weight 0 is not distilled). See :mod:`qtemperate.joint_scheduler`.
    """

    kd_weight: float = Field(default=0.9, ge=0, le=1)
    temperatures: list[float] = Field(default_factory=lambda: [4.0], min_length=1)
    weights: list[float] | None = None
    head_temperatures: dict[str, float | list[float]] | None = None
    head_weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None

    @field_validator("head_temperatures")
    @classmethod
    def _head_t(cls, v: dict[str, float | list[float]] | None) -> dict[str, float | list[float]] | None:
        for head, temps in (v or {}).items():
            values = temps if isinstance(temps, list) else [temps]
            if not values or any(not math.isfinite(t) or t <= 0 for t in values):
                raise ValueError(f"{head}: temperatures must be finite and > 0 (one or a list), got {temps!r}")
        return v
    coupling: Literal["bit_drop", "none"] = "bit_drop"
    temperature_step_per_halving: float = Field(default=1.0, ge=0)
    weight_shift: float = Field(default=0.25, ge=0)
    cache_teacher_logits: Literal["auto", "on", "off"] = "auto"

    @field_validator("temperatures")
    @classmethod
    def _positive_t(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(t) or t <= 0 for t in v):
            raise ValueError("temperatures must be finite and > 0")
        return v

    @field_validator("weights")
    @classmethod
    def _nonneg_w(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if any(w < 0 for w in v):
                raise ValueError("weights must be non-negative")
            if not any(w > 0 for w in v):
                raise ValueError("weights must not all be zero")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> DistillationConfig:
        if self.weights is not None and len(self.weights) != len(self.temperatures):
            raise ValueError(
                f"weights has {len(self.weights)} entries but temperatures has {len(self.temperatures)}"
            )
        return self


def _task_loss_name(name: str) -> str:
    from qtemperate.heads import TASK_LOSSES  # at validation time: user registrations count

    if name not in TASK_LOSSES:
        raise ValueError(f"unknown task loss {name!r}; known: {', '.join(TASK_LOSSES.keys())}")
    return name


class TaskLossConfig(_Strict):
    """The task loss of one head: a loss, the dataset target it compares with, a weight.

    ``target`` defaults to ``labels`` (the class labels) for ``cross_entropy`` and to
    the head's own name otherwise (``boxes: smooth_l1`` compares with target ``boxes``).
    A bare loss name is shorthand for ``{loss: <name>}``.
    """

    loss: Annotated[str, AfterValidator(_task_loss_name)]
    target: str | None = None
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)


def _loss_shorthand(value: Any) -> Any:
    return {"loss": value} if isinstance(value, str) else value


class TaskConfig(_Strict):
    """Which output of a multi-output model is scored, and how each head is trained.

    ``accuracy_head`` is compared with the class labels for every reported accuracy;
    ``losses`` is the task loss of each trained head (see :mod:`qtemperate.heads`).
    Without this section the model must return one tensor of logits.
    """

    accuracy_head: str
    losses: dict[str, Annotated[TaskLossConfig, BeforeValidator(_loss_shorthand)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _targets(self) -> TaskConfig:
        for head, cfg in self.losses.items():
            if cfg.target is None:
                cfg.target = "labels" if cfg.loss == "cross_entropy" else head
        return self


class OptimizerConfig(_Strict):
    """Optimizer and learning-rate schedule (cosine within each stage by default)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = True
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(default=5.0, gt=0)


def _registered_logger(name: str) -> str:
    from qtemperate.tracking import LOGGERS  # at validation time, like the datasets

    if name not in LOGGERS:
        raise ValueError(f"unknown logger {name!r}; known: {', '.join(LOGGERS.keys())}")
    return name


LoggerName = Annotated[str, AfterValidator(_registered_logger)]
"""A key of :data:`qtemperate.tracking.LOGGERS` (built-in or registered by user code)."""


class TrackingConfig(_Strict):
    """Metric loggers: keys of :data:`qtemperate.tracking.LOGGERS`: ``jsonl``
    (metrics.jsonl), ``console``, ``wandb`` or one registered by user code."""

    loggers: list[LoggerName] = Field(
        default_factory=lambda: ["jsonl", "console", "wandb"]
    )
    project: str = "qtemperate"
    group: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = Field(default_factory=list)
    log_every: Int = Field(default=10, ge=1)


class ExportConfig(_Strict):
    """ONNX export of the student, checked and timed in onnxruntime (and OpenVINO, QONNX).

    ``target`` is the CPU class the student is trained for (``auto``: the CPU running
    the run; see :mod:`qtemperate.export.targets`): it sets the QAT ranges, so it is
    resolved before training. ``openvino`` / ``qonnx`` run those checks when the
    optional packages are installed (the summary names the extra otherwise).
    """

    onnx: bool = True
    target: str = "auto"
    verify_samples: Int = Field(default=256, ge=1)
    benchmark: bool = True
    batch_sizes: list[Annotated[Int, Field(gt=0)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    benchmark_iters: Int = Field(default=20, ge=1)
    openvino: bool = True
    qonnx: bool = True

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        from qtemperate.export.targets import TARGET_CHOICES

        if value not in TARGET_CHOICES:
            raise ValueError(f"unknown target {value!r}; allowed: {', '.join(TARGET_CHOICES)}")
        return value


Precision = Literal["auto", "fp32", "bf16"]


class PrecisionConfig(_Strict):
    """Autocast per phase (:mod:`qtemperate.training.precision`): ``bf16``, ``fp32``, or
    ``auto`` (bf16 on a CUDA device that supports it, fp32 elsewhere). Evaluation is
    always fp32."""

    teacher: Precision = "auto"
    float_stage: Precision = "auto"
    qat: Precision = "fp32"


class DistributedConfig(_Strict):
    """Data-parallel runs under torchrun (:mod:`qtemperate.training.distributed`); unused
    in a single process. ``data.batch_size`` is the global batch over all processes."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(default=1800.0, gt=0)
    sync_batchnorm: bool = True


class Recipe(_Strict):
    """A whole qtemperate run: teacher, student, data, stages, distillation, tracking.

    ``hardware`` (seed §4.3) selects the temperature mode of every stage for a
    deployment target: ``edge`` a constant mid T, ``cloud`` the full dynamic schedule,
    ``mobile`` a per-epoch lookup table written beside the exported model (see
    :mod:`qtemperate.schedule_switches`); empty runs the stage blocks as written.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: Int = 0
    output_dir: Path = Path("runs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hardware: Literal["edge", "cloud", "mobile"] | None = None
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig = Field(default_factory=StudentConfig)
    stages: list[StageConfig] = Field(min_length=1)
    task: TaskConfig | None = None
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[StageConfig]) -> list[StageConfig]:
        if not stages[-1].quantized:
            raise ValueError("the last stage must be quantized (weight_bits/act_bits 2..8)")
        seen_quant = False
        prev: StageConfig | None = None
        for i, st in enumerate(stages):
            if st.quantized:
                seen_quant = True
            elif seen_quant:
                raise ValueError(f"stage {i} is float after a quantized stage")
            if prev is not None and prev.quantized and (
                st.weight_bits > prev.weight_bits or st.act_bits > prev.act_bits
            ):
                raise ValueError(f"stage {i} raises the bit width; stages must go down in bits")
            prev = st
        return stages

    _source_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _heads(self) -> Recipe:
        from qtemperate.heads import REGRESSION_LOSSES

        d = self.distillation
        for key in ("head_temperatures", "head_weights"):
            if getattr(d, key) and self.task is None:
                raise ValueError(
                    f"distillation.{key}: per-head settings need a multi-output model; add a task "
                    "section (task.accuracy_head, task.losses)"
                )
        if d.head_temperatures and max(d.temperatures) <= 1:
            raise ValueError(
                "distillation.head_temperatures: head temperatures move with the schedule relative "
                "to max(distillation.temperatures), which must be > 1"
            )
        if self.task is not None:
            weights = d.head_weights or {}
            for head, cfg in self.task.losses.items():
                if cfg.loss in REGRESSION_LOSSES and weights.get(head, 1.0) > 0:
                    raise ValueError(
                        f"distillation.head_weights.{head}: head {head!r} is trained with {cfg.loss} "
                        "(regression); softmax distillation does not apply to it: give it weight 0"
                    )
        return self

    @property
    def source_dir(self) -> Path | None:
        """The folder of the recipe file (``None`` for a recipe not read from a file):
        import paths of user models resolve from it (see
        :func:`qtemperate.training.architecture.model_search_path`)."""
        return self._source_dir

    @model_validator(mode="after")
    def _switches(self) -> Recipe:
        from qtemperate.schedule_switches import SwitchError, check_switches  # imports this module

        try:
            check_switches(self)
        except SwitchError as exc:  # reported at the field it names
            raise ValidationError.from_exception_data(
                "Recipe",
                [{"type": PydanticCustomError("switch", exc.message), "loc": exc.loc, "input": self.hardware}],
            ) from None
        return self

    @property
    def final_stage(self) -> StageConfig:
        return self.stages[-1]

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    @property
    def group(self) -> str:
        """W&B group: runs of one recipe family share it (default: the recipe name)."""
        return self.tracking.group or self.name

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (what a run stores as ``recipe.yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_loc(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(recipe)"


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = _format_loc(p for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required field is missing"
    msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    if not first["loc"]:  # a recipe-level check: its message starts with the field path
        return f"{source}: {msg}{tail}"
    return f"{source}: {loc}: {msg}{tail}"


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: value is not valid YAML ({exc.__class__.__name__})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw recipe dict.

    List items are addressed by index (``stages.1.epochs=3``). Intermediate mappings
    are created when missing, so ``--set student.prune_ratio=0.5`` works on a recipe
    without a ``student`` section; unknown keys are then caught by validation.
    """
    for text in overrides:
        path, value = _parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, part, where)
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise RecipeError(f"--set {'.'.join(path)}: {where} is not a mapping or list")
        last = path[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, ".".join(path))
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {'.'.join(path)}: parent is not a mapping or list")
    return raw


def _list_index(node: list[Any], part: str, where: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise RecipeError(f"--set {where}: {part!r} is not a list index") from None
    if not -len(node) <= idx < len(node):
        raise RecipeError(f"--set {where}: index {idx} out of range (list has {len(node)} items)")
    return idx


def _list_item(node: list[Any], part: str, where: str) -> Any:
    return node[_list_index(node, part, where)]


def parse_recipe(raw: Any, source: str = "recipe", overrides: Iterable[str] = ()) -> Recipe:
    """Validate an already-loaded mapping into a :class:`Recipe`.

    Raises:
        RecipeError: one line naming the source and the first bad field.
    """
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    data = apply_overrides(copy.deepcopy(dict(raw)), overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, source)) from None


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe with ``yaml.safe_load`` and validate it.

    Args:
        path: The recipe file.
        overrides: ``key.path=value`` strings (the CLI's ``--set``).

    Raises:
        RecipeError: the file is missing, is not UTF-8 text, is not valid YAML, or a field
            is invalid; the message names the file and the field.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary or otherwise encoded file: YAML is UTF-8 text
        raise RecipeError(
            f"{p}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
            "a recipe is a YAML file"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{p}: malformed YAML{where}") from None
    recipe = parse_recipe(raw, source=str(p), overrides=overrides)
    recipe._source_dir = p.resolve().parent
    _checkpoint_beside_recipe(recipe)
    return recipe


def _checkpoint_beside_recipe(recipe: Recipe) -> None:
    """A relative ``teacher.checkpoint`` that is not found from the working directory is
    read from the recipe's folder, when it is there (a recipe shipped with its teacher runs
    from anywhere); otherwise the path stays as written and preflight names it."""
    ckpt = recipe.teacher.checkpoint
    if ckpt is None or ckpt.is_absolute() or ckpt.exists() or recipe.source_dir is None:
        return
    beside = recipe.source_dir / ckpt
    if beside.exists():
        recipe.teacher.checkpoint = beside
