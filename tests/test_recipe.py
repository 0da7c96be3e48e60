"""Tests of qtemperate.recipe: validation, error messages naming the field, overrides."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import model_validator

from qtemperate import bits
from qtemperate.joint_scheduler import JointScheduler
from qtemperate.recipe import (
    FLOAT_BITS,
    Recipe,
    RecipeError,
    StageConfig,
    TemperatureConfig,
    apply_overrides,
    load_recipe,
    parse_recipe,
)
from qtemperate.temperature import (
    TEMPERATURE_SCHEDULES,
    ScheduleSettings,
    StageContext,
    TemperateSchedule,
    TemperatureSchedule,
)

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
RECIPE_FILES = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))


def minimal() -> dict[str, Any]:
    """A fresh, minimal valid recipe."""
    return {
        "name": "tiny",
        "data": {"name": "digits"},
        "teacher": {"model": "small_cnn", "train": {"epochs": 1}},
        "stages": [{"epochs": 1, "weight_bits": 8, "act_bits": 8}],
    }


def q(epochs: int, bits: int, act: int | None = None) -> dict[str, Any]:
    return {"epochs": epochs, "weight_bits": bits, "act_bits": bits if act is None else act}


# ------------------------------------------------------------------ valid recipe
def test_minimal_recipe_validates_with_documented_defaults() -> None:
    r = parse_recipe(minimal())
    assert isinstance(r, Recipe)
    assert r.name == "tiny"
    assert r.seed == 0
    assert r.output_dir == Path("runs")
    assert r.device == "auto"
    assert r.data.name == "digits"
    assert r.data.batch_size == 128 and r.data.eval_batch_size == 512
    assert r.data.root is None and r.data.augment is False and r.data.num_workers == 0
    assert r.teacher.model == "small_cnn"
    assert r.teacher.checkpoint is None
    assert r.teacher.train is not None and r.teacher.train.epochs == 1
    assert r.teacher.train.lr == 0.05
    assert r.student.target_size_ratio is None and r.student.prune_ratio is None
    assert r.student.importance == "l2" and r.student.first_last_bits == 8
    assert r.student.iterative_steps == 8 and r.student.max_layer_ratio == 0.9
    st = r.stages[0]
    assert (st.epochs, st.weight_bits, st.act_bits, st.lr, st.name) == (1, 8, 8, None, None)
    assert st.quantized and st.label == "w8a8"
    t = st.temperature
    assert (t.schedule, t.base_temperature, t.alpha, t.beta) == ("temperate", None, 0.9, 0.1)
    assert (t.warmup, t.adapt_until, t.min_temperature, t.max_temperature) == (0.3, 0.8, 1.0, 10.0)
    assert (t.patience, t.plateau_tol) == (5, 1e-3)
    assert isinstance(t, TemperatureConfig) and isinstance(t, TemperateSchedule.Settings)
    assert t.settings() == {
        "base_temperature": None, "alpha": 0.9, "beta": 0.1, "warmup": 0.3, "adapt_until": 0.8,
        "min_temperature": 1.0, "max_temperature": 10.0, "patience": 5, "plateau_tol": 1e-3,
    }  # a temperate block holds the temperate settings only (no `table`)
    d = r.distillation
    assert d.kd_weight == 0.9 and d.temperatures == [4.0] and d.weights is None
    assert d.coupling == "bit_drop"
    assert d.temperature_step_per_halving == 1.0 and d.weight_shift == 0.25
    assert d.cache_teacher_logits == "auto"
    o = r.optimizer
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov, o.schedule, o.grad_clip) == (
        "sgd", 0.05, 0.9, 5e-4, True, "cosine", 5.0
    )
    assert r.tracking.loggers == ["jsonl", "console", "wandb"]
    assert r.tracking.project == "qtemperate" and r.tracking.mode == "auto"
    assert r.export.onnx is True and r.export.batch_sizes == [1, 64]
    assert r.total_epochs == 1
    assert r.final_stage is r.stages[0]
    assert r.group == "tiny"


def test_multi_stage_recipe_properties() -> None:
    d = minimal()
    d["stages"] = [{"epochs": 2}, q(3, 8), q(4, 4), {"name": "last", **q(1, 4, 2)}]
    d["tracking"] = {"group": "family"}
    r = parse_recipe(d)
    assert r.total_epochs == 10
    assert [s.label for s in r.stages] == ["float", "w8a8", "w4a4", "last"]
    assert [s.quantized for s in r.stages] == [False, True, True, True]
    assert r.final_stage.act_bits == 2
    assert r.group == "family"


def test_teacher_with_checkpoint_only_is_valid() -> None:
    d = minimal()
    d["teacher"] = {"model": "small_cnn", "checkpoint": "teacher.pt"}
    r = parse_recipe(d)
    assert r.teacher.checkpoint == Path("teacher.pt")
    assert r.teacher.train is None


# ------------------------------------------------------------------ bad recipes
def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[p]
        del node[last]

    return edit


BAD = [
    ("unknown-top-level", _set("colour", "red"), "colour", "unknown key"),
    ("unknown-nested", _set("stages.0.temprature", {}), "stages.0.temprature", "unknown key"),
    ("unknown-deep", _set("stages.0.temperature.alhpa", 1), "stages.0.temperature.alhpa", "unknown key"),
    ("epochs-string", _set("stages.0.epochs", "three"), "stages.0.epochs", "integer"),
    ("epochs-fraction", _set("stages.0.epochs", 2.5), "stages.0.epochs", "integer"),
    ("weight-bits-9", _set("stages.0.weight_bits", 9), "stages.0.weight_bits", "9"),
    ("act-bits-9", _set("stages.0.act_bits", 9), "stages.0.act_bits", "9"),
    ("weight-bits-1", _set("stages.0.weight_bits", 1), "stages.0.weight_bits", "1"),
    ("act-bits-1", _set("stages.0.act_bits", 1), "stages.0.act_bits", "1"),
    ("weight-bits-16", _set("stages.0.weight_bits", 16), "stages.0.weight_bits", "16"),
    ("act-bits-16", _set("stages.0.act_bits", 16), "stages.0.act_bits", "16"),
    ("mixed-32-8", _set("stages.0.weight_bits", 32), "stages.0", "both"),
    ("mixed-8-32", _set("stages.0.act_bits", 32), "stages.0", "both"),
    ("temperature-zero", _set("distillation.temperatures", [6, 0, 1]), "distillation.temperatures", "> 0"),
    ("temperature-negative", _set("distillation.temperatures", [-2]), "distillation.temperatures", "> 0"),
    ("weights-negative", lambda d: d.update(distillation={"temperatures": [6, 3], "weights": [1, -1]}),
     "distillation.weights", "non-negative"),
    ("weights-all-zero", lambda d: d.update(distillation={"temperatures": [6, 3], "weights": [0, 0]}),
     "distillation.weights", "zero"),
    ("weights-length", lambda d: d.update(distillation={"temperatures": [6, 3, 1], "weights": [1, 1]}),
     "distillation", "weights has 2 entries but temperatures has 3"),
    ("epochs-zero", _set("stages.0.epochs", 0), "stages.0.epochs", "greater than 0"),
    ("epochs-negative", _set("stages.0.epochs", -3), "stages.0.epochs", "greater than 0"),
    ("teacher-epochs-zero", _set("teacher.train.epochs", 0), "teacher.train.epochs", "greater than 0"),
    ("ends-float", _set("stages", [q(1, 8), {"epochs": 1}]), "stages", "last stage must be quantized"),
    ("only-float", _set("stages", [{"epochs": 2}]), "stages", "last stage must be quantized"),
    ("float-after-quantized", _set("stages", [q(1, 8), {"epochs": 1}, q(1, 4)]), "stages",
     "stage 1 is float after a quantized stage"),
    ("weight-bits-up", _set("stages", [q(1, 4), q(1, 8, 4)]), "stages", "stage 1 raises the bit width"),
    ("act-bits-up", _set("stages", [q(1, 8), q(1, 4), q(1, 4, 8)]), "stages", "stage 2 raises the bit width"),
    ("kd-weight-above-1", _set("distillation.kd_weight", 1.5), "distillation.kd_weight", "less than or equal to 1"),
    ("kd-weight-negative", _set("distillation.kd_weight", -0.1), "distillation.kd_weight", "greater than or equal to 0"),
    ("both-size-targets", lambda d: d.update(student={"target_size_ratio": 0.5, "prune_ratio": 0.5}),
     "student", "not both"),
    ("target-size-zero", _set("student.target_size_ratio", 0), "student.target_size_ratio", "greater than 0"),
    ("target-size-above-1", _set("student.target_size_ratio", 1.5), "student.target_size_ratio", "less than or equal to 1"),
    ("prune-ratio-zero", _set("student.prune_ratio", 0), "student.prune_ratio", "greater than 0"),
    ("teacher-no-weights", _drop("teacher.train"), "teacher", "checkpoint or train"),
    ("teacher-no-model", _drop("teacher.model"), "teacher.model", "required field is missing"),
    ("missing-data", _drop("data"), "data", "required field is missing"),
    ("unknown-dataset", _set("data.name", "mnist"), "data.name", "digits"),
    ("name-with-space", _set("name", "my run"), "name", "pattern"),
    ("name-leading-dash", _set("name", "-run"), "name", "pattern"),
    ("name-empty", _set("name", ""), "name", "pattern"),
    ("empty-stages", _set("stages", []), "stages", "at least 1"),
    ("unknown-schedule", _set("stages.0.temperature", {"schedule": "cosine"}), "stages.0.temperature.schedule",
     "unknown temperature schedule 'cosine'; known: constant, gradient_norm, lookup_table, temperate"),
    ("lut-without-table", _set("stages.0.temperature", {"schedule": "lookup_table"}), "stages.0.temperature.table",
     "required field is missing"),
    ("lut-empty-table", _set("stages.0.temperature", {"schedule": "lookup_table", "table": []}),
     "stages.0.temperature.table", "at least 1 item"),
    ("lut-zero-entry", _set("stages.0.temperature", {"schedule": "lookup_table", "table": [2, 0]}),
     "stages.0.temperature.table.1", "greater than 0"),
    ("alpha-on-constant", _set("stages.0.temperature", {"schedule": "constant", "alpha": 0.5}),
     "stages.0.temperature.alpha",
     "unknown key (not a setting of schedule 'constant'; its settings: base_temperature)"),
    ("table-on-temperate", _set("stages.0.temperature", {"table": [2.0]}), "stages.0.temperature.table",
     "not a setting of schedule 'temperate'; its settings: base_temperature, alpha, beta, warmup"),
    ("warmup-on-gradient-norm", _set("stages.0.temperature", {"schedule": "gradient_norm", "warmup": 0.1}),
     "stages.0.temperature.warmup",
     "not a setting of schedule 'gradient_norm'; its settings: min_temperature, max_temperature, base_temperature"),
    ("min-on-lookup-table", _set("stages.0.temperature", {"schedule": "lookup_table", "table": [2], "min_temperature": 1}),
     "stages.0.temperature.min_temperature", "not a setting of schedule 'lookup_table'; its settings: table"),
    ("gradient-norm-min-above-max", _set("stages.0.temperature", {"schedule": "gradient_norm", "min_temperature": 4,
     "max_temperature": 3}), "stages.0.temperature", "min_temperature must be <= max_temperature"),
    ("gradient-norm-base-and-max", _set("stages.0.temperature", {"schedule": "gradient_norm", "base_temperature": 3,
     "max_temperature": 3}), "stages.0.temperature", "give max_temperature or base_temperature, not both"),
    ("schedule-not-a-string", _set("stages.0.temperature", {"schedule": ["constant"]}), "stages.0.temperature.schedule",
     "unknown temperature schedule"),
    ("temperature-not-a-mapping", _set("stages.0.temperature", 4), "stages.0.temperature",
     "expected a mapping of schedule settings, got int"),
    ("patience-bool", _set("stages.0.temperature.patience", True), "stages.0.temperature.patience", "integer"),
    ("alpha-nan", _set("stages.0.temperature.alpha", float("nan")), "stages.0.temperature.alpha", "finite"),
    ("min-above-max-T", _set("stages.0.temperature", {"min_temperature": 5, "max_temperature": 2}),
     "stages.0.temperature", "min_temperature must be <= max_temperature"),
    ("warmup-after-adapt", _set("stages.0.temperature", {"warmup": 0.9, "adapt_until": 0.5}),
     "stages.0.temperature", "warmup must be <= adapt_until"),
    ("stage-lr-zero", _set("stages.0.lr", 0), "stages.0.lr", "greater than 0"),
    ("first-last-bits-32", _set("student.first_last_bits", 32), "student.first_last_bits", "2..8"),
    ("unknown-logger", _set("tracking.loggers", ["tensorboard"]), "tracking.loggers.0", "jsonl"),
    ("bad-coupling", _set("distillation.coupling", "linear"), "distillation.coupling", "bit_drop"),
    ("freeze-on-float-stage", _set("stages", [{"epochs": 1, "freeze_act_ranges_at": 0.5}, q(1, 8)]), "stages.0",
     "freeze_act_ranges_at: a float stage has no activation ranges to freeze"),
    ("freeze-at-1", _set("stages.0.freeze_act_ranges_at", 1.0), "stages.0.freeze_act_ranges_at", "less than 1"),
    ("freeze-negative", _set("stages.0.freeze_act_ranges_at", -0.1), "stages.0.freeze_act_ranges_at",
     "greater than or equal to 0"),
]


@pytest.mark.parametrize(("edit", "field", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe_names_the_field(
    edit: Callable[[dict[str, Any]], None], field: str, text: str
) -> None:
    d = minimal()
    edit(d)
    with pytest.raises(RecipeError) as info:
        parse_recipe(d, source="r.yaml")
    msg = str(info.value)
    # "<source>: <field path>: <problem>", on one line
    assert msg.startswith(f"r.yaml: {field}: "), msg
    assert text in msg, msg
    assert "\n" not in msg, msg


def test_recipe_error_is_a_value_error() -> None:
    assert issubclass(RecipeError, ValueError)


def test_more_problems_are_counted_in_the_message() -> None:
    d = minimal()
    d["stages"][0] = q(1, 16)  # weight_bits and act_bits both wrong
    with pytest.raises(RecipeError, match=r"stages\.0\.weight_bits: .*\(\+1 more problem\)$"):
        parse_recipe(d)


def test_boolean_epochs_is_rejected() -> None:
    d = minimal()
    d["stages"][0]["epochs"] = True
    with pytest.raises(RecipeError, match=r"stages\.0\.epochs"):
        parse_recipe(d)


# ------------------------------------------------------------------ files
def test_load_recipe_from_file(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(minimal()))
    assert load_recipe(p).model_dump() == parse_recipe(minimal()).model_dump()
    assert load_recipe(str(p)).name == "tiny"


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("name: tiny\ndata:\n\tname: digits\n")  # a tab cannot start a token (line 3)
    with pytest.raises(RecipeError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert str(p) in msg
    assert "malformed YAML" in msg
    assert "line 3" in msg


def test_a_file_that_is_not_utf8_text_is_a_recipe_error_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "binary.yaml"
    p.write_bytes(bytes(range(256)))
    with pytest.raises(RecipeError, match=r"binary\.yaml: not UTF-8 text \(byte 128: b'\\x80'\)") as info:
        load_recipe(p)
    assert "\n" not in str(info.value)


def test_validation_error_from_file_names_file(tmp_path: Path) -> None:
    d = minimal()
    d["stages"][0]["weight_bits"] = 9
    p = tmp_path / "bits.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match=rf"^{p}: stages\.0\.weight_bits: "):
        load_recipe(p)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="not found") as info:
        load_recipe(p)
    assert str(p) in str(info.value)


def test_directory_is_not_a_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("", "NoneType"), ("just a string\n", "str")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    p = tmp_path / "top.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=f"expected a mapping at the top level, got {kind}"):
        load_recipe(p)


def test_parse_recipe_rejects_list() -> None:
    with pytest.raises(RecipeError, match="mapping"):
        parse_recipe([minimal()])


# ------------------------------------------------------------------ overrides
def test_override_nested_value() -> None:
    r = parse_recipe(minimal(), overrides=["distillation.kd_weight=0.5"])
    assert r.distillation.kd_weight == 0.5


def test_override_list_index() -> None:
    d = minimal()
    d["stages"] = [q(1, 8), q(1, 4)]
    r = parse_recipe(d, overrides=["stages.0.epochs=3", "stages.-1.epochs=5"])
    assert [s.epochs for s in r.stages] == [3, 5]


def test_override_values_are_yaml_typed() -> None:
    r = parse_recipe(
        minimal(),
        overrides=[
            "distillation.temperatures=[6,3,1]",
            "data.augment=true",
            "seed=7",
            "tracking.group=null",
            "name=renamed",
        ],
    )
    assert r.distillation.temperatures == [6.0, 3.0, 1.0]
    assert r.data.augment is True
    assert r.seed == 7
    assert r.tracking.group is None
    assert r.name == "renamed"


def test_override_value_may_contain_equals() -> None:
    r = parse_recipe(minimal(), overrides=["tracking.tags=[a=b]"])
    assert r.tracking.tags == ["a=b"]


def test_override_creates_missing_section() -> None:
    d = minimal()
    assert "student" not in d
    r = parse_recipe(d, overrides=["student.prune_ratio=0.5"])
    assert r.student.prune_ratio == 0.5
    d2 = minimal()
    d2["student"] = None  # `student:` with nothing under it in YAML
    assert parse_recipe(d2, overrides=["student.prune_ratio=0.25"]).student.prune_ratio == 0.25


def test_overrides_apply_in_order() -> None:
    r = parse_recipe(minimal(), overrides=["seed=1", "seed=2"])
    assert r.seed == 2


def test_apply_overrides_on_raw_dict() -> None:
    raw = {"a": {"b": [1, {"c": 2}]}}
    out = apply_overrides(raw, ["a.b.1.c=5", "a.b.0=x", "a.d.e=1"])
    assert out == {"a": {"b": ["x", {"c": 5}], "d": {"e": 1}}}


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("stages.5.epochs=3", "index 5 out of range"),
        ("stages.-2.epochs=3", "out of range"),
        ("stages.1=3", "out of range"),
        ("stages.x.epochs=3", "'x' is not a list index"),
        ("name.first=1", "not a mapping or list"),
        ("noequals", "expected key.path=value"),
        ("=1", "empty key"),
        ("seed=[1", "not valid YAML"),
    ],
)
def test_bad_override_raises(override: str, text: str) -> None:
    with pytest.raises(RecipeError, match="--set") as info:
        parse_recipe(minimal(), overrides=[override])
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("distillation.temprature=3", "distillation.temprature"),
        ("stages.0.temperature.alhpa=1", "stages.0.temperature.alhpa"),
        ("colour=red", "colour"),
    ],
)
def test_override_introducing_unknown_key_names_it(override: str, field: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(minimal(), overrides=[override])
    assert f"{field}: unknown key" in str(info.value)


def test_override_through_load_recipe(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(minimal()))
    r = load_recipe(p, overrides=["stages.0.weight_bits=4", "stages.0.act_bits=4"])
    assert (r.stages[0].weight_bits, r.stages[0].act_bits) == (4, 4)
    with pytest.raises(RecipeError, match=rf"^{p}: stages\.0\.weight_bits: "):
        load_recipe(p, overrides=["stages.0.weight_bits=9"])


def test_parse_recipe_does_not_mutate_its_input() -> None:
    d = minimal()
    d["distillation"] = {"kd_weight": 0.9}
    before = copy.deepcopy(d)
    parse_recipe(d, overrides=["distillation.kd_weight=0.5", "stages.0.epochs=7"])
    assert d == before


# ------------------------------------------------------------------ YAML round trip
def test_to_yaml_round_trips() -> None:
    d = minimal()
    d["stages"] = [
        {"epochs": 2, "name": "warm"},
        {**q(3, 8), "lr": 0.01, "temperature": {"schedule": "constant", "base_temperature": 3.5}},
        {**q(2, 4), "temperature": {"schedule": "lookup_table", "table": [4.0, 2.0]}},
    ]
    d["teacher"]["checkpoint"] = "ckpt/teacher.pt"
    d["data"]["root"] = "/data/digits"
    d["distillation"] = {"temperatures": [6, 3, 1], "weights": [0.2, 0.5, 0.3]}
    d["student"] = {"target_size_ratio": 0.25}
    r = parse_recipe(d)
    text = r.to_yaml()
    again = parse_recipe(yaml.safe_load(text))
    assert again.model_dump() == r.model_dump()
    assert again.to_yaml() == text
    assert text.startswith("name: tiny\n")  # sort_keys=False keeps declaration order


def test_minimal_to_yaml_round_trips() -> None:
    r = parse_recipe(minimal())
    assert parse_recipe(yaml.safe_load(r.to_yaml())).model_dump() == r.model_dump()


# ------------------------------------------------------------------ shipped recipes
def test_recipes_folder_is_not_empty() -> None:
    if not RECIPES_DIR.is_dir():
        pytest.skip(f"{RECIPES_DIR} does not exist")
    assert RECIPE_FILES, f"no recipes/*.yaml in {RECIPES_DIR}"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.name for p in RECIPE_FILES])
def test_shipped_recipe_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    assert first.startswith("#"), f"{path.name}: first line must be a comment"
    assert "qtemperate" in first, f"{path.name}: first line should say how to run it"
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.final_stage.quantized
    assert r.total_epochs >= 1


# ------------------------------------------------------------------ registered names
def test_names_come_from_the_registries() -> None:
    from qtemperate.data import DATASETS, DatasetSpec
    from qtemperate.tracking import LOGGERS

    d = minimal()
    d["data"]["name"] = "test_user_data"
    d["tracking"] = {"loggers": ["jsonl", "test_user_logger"]}
    with pytest.raises(RecipeError, match=r"data\.name: unknown dataset 'test_user_data'; known: cifar10"):
        parse_recipe(d)
    DATASETS.register("test_user_data", DatasetSpec(build=lambda root, seed: None))
    LOGGERS.register("test_user_logger", lambda run_dir, **_: None)
    try:
        r = parse_recipe(d)
        assert r.data.name == "test_user_data" and r.tracking.loggers == ["jsonl", "test_user_logger"]
    finally:
        DATASETS.unregister("test_user_data")
        LOGGERS.unregister("test_user_logger")
    d["data"]["name"] = "digits"
    with pytest.raises(RecipeError, match=r"tracking\.loggers\.1: unknown logger 'test_user_logger'; known: console, jsonl, wandb"):
        parse_recipe(d)


# ------------------------------------------------------------------ temperature blocks
KIND_BLOCKS = {
    "temperate": {"schedule": "temperate", "base_temperature": 5.0, "alpha": 0.8, "patience": 2},
    "constant": {"schedule": "constant", "base_temperature": 3.5},
    "gradient_norm": {"schedule": "gradient_norm", "min_temperature": 1.5, "max_temperature": 3.0},
    "lookup_table": {"schedule": "lookup_table", "table": [4.0, 2.0]},
}


def test_every_registered_kind_has_a_block() -> None:
    assert sorted(KIND_BLOCKS) == TEMPERATURE_SCHEDULES.keys()


@pytest.mark.parametrize("kind", sorted(KIND_BLOCKS))
def test_each_kind_block_validates_and_round_trips(kind: str) -> None:
    d = minimal()
    d["stages"][0]["temperature"] = KIND_BLOCKS[kind]
    r = parse_recipe(d)
    t = r.stages[0].temperature
    assert type(t) is TemperatureConfig.of(kind)
    assert isinstance(t, TemperatureConfig) and isinstance(t, TEMPERATURE_SCHEDULES.get(kind).Settings)
    assert t.schedule == kind
    for key, value in KIND_BLOCKS[kind].items():
        assert getattr(t, key) == value
    assert set(t.settings()) == set(TemperatureConfig.of(kind).model_fields) - {"schedule"}
    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r and again.model_dump() == r.model_dump()
    assert parse_recipe(r.model_dump(mode="json")) == r
    assert next(iter(r.model_dump()["stages"][0]["temperature"])) == "schedule"  # first in the YAML


def test_default_block_is_temperate_and_blocks_are_shared_types() -> None:
    st = StageConfig(epochs=1, weight_bits=8, act_bits=8)
    assert type(st.temperature) is TemperatureConfig.of("temperate")
    assert TemperatureConfig.of("temperate") is TemperatureConfig.of("temperate")
    assert st.temperature.model_dump()["schedule"] == "temperate"
    with pytest.raises(KeyError, match="known: constant, gradient_norm, lookup_table, temperate"):
        TemperatureConfig.of("cosine")


def test_assigning_a_block_dispatches_on_its_schedule() -> None:
    st = StageConfig(epochs=1, weight_bits=8, act_bits=8)
    st.temperature = {"schedule": "constant", "base_temperature": 2.0}  # type: ignore[assignment]
    assert type(st.temperature) is TemperatureConfig.of("constant")
    st.temperature = TemperatureConfig.of("lookup_table")(table=[3.0])
    assert st.temperature.settings() == {"table": [3.0]}
    with pytest.raises(ValueError, match=r"temperature\.alpha"):
        st.temperature = {"schedule": "constant", "alpha": 1.0}  # type: ignore[assignment]


def test_switching_the_schedule_by_override_names_the_leftover_setting() -> None:
    d = minimal()
    d["stages"][0]["temperature"] = {"warmup": 0.2, "adapt_until": 0.7}
    with pytest.raises(RecipeError, match=r"stages\.0\.temperature\.warmup: unknown key \(not a setting of "
                       r"schedule 'constant'; its settings: base_temperature\)"):
        parse_recipe(d, overrides=["stages.0.temperature.schedule=constant"])
    r = parse_recipe(d, overrides=["stages.0.temperature={schedule: constant}"])
    assert r.stages[0].temperature.schedule == "constant"


def test_bits_facts_come_from_the_bits_module() -> None:
    assert FLOAT_BITS is bits.FLOAT_BITS
    st = StageConfig(epochs=1, weight_bits=4, act_bits=4)
    assert st.quantized is bits.is_quantized(4, 4) and st.label == "w4a4"
    assert StageConfig(epochs=1).quantized is False and StageConfig(epochs=1).label == "float"


class _Warm(TemperatureSchedule):
    """A user schedule: T = start · factor ** epoch, never below the scheduler's min."""

    def __init__(self, start: float, factor: float, floor: float) -> None:
        self.start, self.factor = start, factor
        self.min_temperature, self.max_temperature = floor, start
        self._t = start

    @classmethod
    def for_stage(cls, ctx: StageContext, foo: int = 1, factor: float = 0.5) -> _Warm:
        return cls(ctx.start_temperature * foo, factor, ctx.min_temperature)

    @property
    def temperature(self) -> float:
        return self._t

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        self._t = max(self.min_temperature, self.start * self.factor**epoch)
        return self._t

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self._t}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._t = float(state_dict["temperature"])


class _Declared(_Warm):
    """A user schedule that declares its recipe block (with its own constraints)."""

    class Settings(ScheduleSettings):
        foo: int = 1
        factor: float = 0.5

        @model_validator(mode="after")
        def _factor(self) -> _Declared.Settings:
            if not 0 < self.factor <= 1:
                raise ValueError("factor must be in (0, 1]")
            return self


def _unregister(key: str) -> None:
    TEMPERATURE_SCHEDULES.unregister(key)


@pytest.fixture
def user_kinds() -> Iterator[None]:
    TEMPERATURE_SCHEDULES.register("test_mine", _Warm)
    TEMPERATURE_SCHEDULES.register("test_declared", _Declared)
    try:
        yield
    finally:
        _unregister("test_mine")
        _unregister("test_declared")


def test_a_registered_schedule_is_usable_from_a_recipe(user_kinds: None) -> None:
    d = minimal()
    d["stages"] = [{"epochs": 1}, {**q(4, 8), "temperature": {"schedule": "test_mine", "foo": 2}}]
    r = parse_recipe(d, source="r.yaml")
    t = r.stages[1].temperature
    assert t.schedule == "test_mine" and t.settings() == {"foo": 2, "factor": 0.5}
    assert parse_recipe(yaml.safe_load(r.to_yaml())) == r
    s = JointScheduler.from_recipe(r)
    assert isinstance(s.schedule(1), _Warm)
    # T0 = 4 + 2 halvings = 6, foo = 2 → 12 (clamped to 10 in the multi-scale set), halving.
    temps = [s.step(e).temperature for e in range(5)]
    assert temps == [4.0, 12.0, 6.0, 3.0, 1.5]
    assert s.step(1).temperatures == (10.0,) and s.state.phase == "test_mine"


@pytest.mark.parametrize(
    ("block", "field", "text"),
    [
        ({"schedule": "test_mine", "fo": 2}, "stages.0.temperature.fo",
         "unknown key (not a setting of schedule 'test_mine'; its settings: foo, factor)"),
        ({"schedule": "test_mine", "foo": "two"}, "stages.0.temperature.foo", "integer"),
        ({"schedule": "test_declared", "factor": 2.0}, "stages.0.temperature", "factor must be in (0, 1]"),
        ({"schedule": "test_declared", "alpha": 2.0}, "stages.0.temperature.alpha",
         "not a setting of schedule 'test_declared'; its settings: foo, factor"),
    ],
)
def test_a_registered_schedule_block_names_the_field(
    user_kinds: None, block: dict[str, Any], field: str, text: str
) -> None:
    d = minimal()
    d["stages"][0]["temperature"] = block
    with pytest.raises(RecipeError) as info:
        parse_recipe(d, source="r.yaml")
    msg = str(info.value)
    assert msg.startswith(f"r.yaml: {field}: ") and text in msg and "\n" not in msg, msg


def test_a_declared_block_is_used_as_declared(user_kinds: None) -> None:
    d = minimal()
    d["stages"][0]["temperature"] = {"schedule": "test_declared", "factor": 0.25}
    t = parse_recipe(d).stages[0].temperature
    assert isinstance(t, _Declared.Settings) and t.settings() == {"foo": 1, "factor": 0.25}


def test_an_unregistered_or_unbuildable_schedule_is_an_error() -> None:
    d = minimal()
    d["stages"][0]["temperature"] = {"schedule": "test_mine", "foo": 2}
    with pytest.raises(RecipeError, match=r"stages\.0\.temperature\.schedule: unknown temperature schedule "
                       r"'test_mine'; known: constant, gradient_norm, lookup_table, temperate$"):
        parse_recipe(d)

    class NoForStage(_Warm):
        for_stage = TemperatureSchedule.__dict__["for_stage"]

    TEMPERATURE_SCHEDULES.register("test_bare", NoForStage)
    try:
        d["stages"][0]["temperature"] = {"schedule": "test_bare"}
        with pytest.raises(RecipeError, match=r"stages\.0\.temperature\.schedule: NoForStage declares "
                           r"neither Settings nor for_stage"):
            parse_recipe(d)
    finally:
        _unregister("test_bare")
