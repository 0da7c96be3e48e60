"""Tests of qtemperate.recipe: validation, error messages naming the field, overrides."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtemperate.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    load_recipe,
    parse_recipe,
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
    assert (t.patience, t.plateau_tol, t.table) == (5, 1e-3, None)
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
    ("unknown-schedule", _set("stages.0.temperature", {"schedule": "cosine"}), "stages.0.temperature.schedule", "temperate"),
    ("lut-without-table", _set("stages.0.temperature", {"schedule": "lookup_table"}), "stages.0.temperature", "needs a table"),
    ("min-above-max-T", _set("stages.0.temperature", {"min_temperature": 5, "max_temperature": 2}),
     "stages.0.temperature", "min_temperature must be <= max_temperature"),
    ("warmup-after-adapt", _set("stages.0.temperature", {"warmup": 0.9, "adapt_until": 0.5}),
     "stages.0.temperature", "warmup must be <= adapt_until"),
    ("stage-lr-zero", _set("stages.0.lr", 0), "stages.0.lr", "greater than 0"),
    ("first-last-bits-32", _set("student.first_last_bits", 32), "student.first_last_bits", "2..8"),
    ("unknown-logger", _set("tracking.loggers", ["tensorboard"]), "tracking.loggers.0", "jsonl"),
    ("bad-coupling", _set("distillation.coupling", "linear"), "distillation.coupling", "bit_drop"),
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
    # "<source>: <field path>: <problem>"
    assert msg.startswith(f"r.yaml: {field}: "), msg
    assert text in msg, msg


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
