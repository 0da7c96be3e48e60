"""User models in recipes: import paths from the recipe's folder and the working
directory, factories given only the arguments they take, and one forward pass that
says when a model does not fit the data — all before any run folder exists."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from qtemperate.cli import main
from qtemperate.data import dataset_info
from qtemperate.heads import HeadLoss, Task
from qtemperate.models import build_model
from qtemperate.training.architecture import (
    ModelSpecError,
    build_for_data,
    check_model,
    check_outputs_kept,
    factory_kwargs,
)
from tests.pipeline_helpers import tiny_recipe

_ids = itertools.count()

NETS = '''
import torch
from torch import nn

CALLS = []

def make_net(num_classes=10, width=8):
    """No in_channels: qtemperate must not pass one."""
    CALLS.append({"num_classes": num_classes, "width": width})
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

def rgb_net(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

def fixed_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 100))

def needs_depth(depth, num_classes=10):
    return make_net(num_classes)

def broken(num_classes=10):
    raise RuntimeError("weights file missing\\nsecond line")

def not_a_module(num_classes=10):
    return "resnet"
'''


def _package(where: Path) -> str:
    """A fresh importable package ``<name>/nets.py`` under ``where``; returns its name."""
    name = f"usernets_{next(_ids)}_{abs(hash(str(where))) % 10_000}"
    (where / name).mkdir(parents=True)
    (where / name / "__init__.py").write_text("")
    (where / name / "nets.py").write_text(textwrap.dedent(NETS))
    return name


def _recipe(folder: Path, model: str, out: Path, **teacher: object) -> Path:
    raw = tiny_recipe(out, teacher={"model": model, "kwargs": {}, "train": {"epochs": 1, "lr": 0.05}, **teacher})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_import_path_resolves_from_the_recipe_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    pkg = _package(tmp_path / "project")
    recipe = _recipe(tmp_path / "project", f"{pkg}.nets:make_net", tmp_path)
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert main(["validate", "--check-files", str(recipe)]) == 0, capsys.readouterr().err
    calls = importlib.import_module(f"{pkg}.nets").CALLS
    assert calls == [{"num_classes": 10, "width": 8}]  # built once, with no in_channels


def test_import_path_resolves_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _package(tmp_path / "cwd")
    recipe = _recipe(tmp_path / "elsewhere", f"{pkg}.nets.make_net", tmp_path)
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["validate", "--check-files", str(recipe)]) == 0


@pytest.mark.parametrize(
    ("model", "teacher", "message"),
    [
        ("nope_{pkg}.nets:make_net", {}, r"teacher\.model: unknown model 'nope_.*' \(cannot import module 'nope_.*\.nets': No module named 'nope_.*'; searched .*project"),
        ("{pkg}.nets:make_nett", {}, r"teacher\.model: unknown model .* \(module '.*\.nets' has no attribute 'make_nett'\)"),
        ("{pkg}.nets:make_net", {"kwargs": {"depth": 3}}, r"teacher\.kwargs\.depth: .*make_net\(\) takes no argument 'depth'; it takes: num_classes, width"),
        ("{pkg}.nets:needs_depth", {}, r"teacher\.kwargs: .*needs_depth\(\) needs 'depth', which neither teacher\.kwargs nor the data provide"),
        ("{pkg}.nets:broken", {}, r"teacher\.model: .*broken\(num_classes=10\) raised RuntimeError: weights file missing$"),
        ("{pkg}.nets:not_a_module", {}, r"teacher\.model: .* returned a str, not a torch\.nn\.Module"),
        ("{pkg}.nets:rgb_net", {}, r"teacher\.model: does not fit data 'digits' \(1x8x8 inputs, 10 classes\): a forward pass of a \(2, 1, 8, 8\) batch raised RuntimeError"),
        ("{pkg}.nets:fixed_net", {}, r"teacher\.model: returns \(2, 100\) for a batch of 2, but data 'digits' .* needs logits of shape \(2, 10\)"),
        ("tiny_detector", {}, r"teacher\.model: returns a dict of heads \(features, logits, boxes\); name the scored head"),
    ],
)
def test_validate_check_files_names_the_field_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    model: str, teacher: dict, message: str,
) -> None:
    pkg = _package(tmp_path / "project")
    recipe = _recipe(tmp_path / "project", model.format(pkg=pkg), tmp_path, **teacher)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(recipe)]) == 0  # the schema alone cannot know
    assert main(["validate", "--check-files", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    # `run` fails the same way before its run folder exists.
    assert main(["run", str(recipe), "--no-progress"]) == 2
    assert not (tmp_path / "runs").exists()


def test_factory_kwargs_pass_only_what_a_factory_takes() -> None:
    facts = {"num_classes": 10, "in_channels": 1}
    assert factory_kwargs(lambda num_classes=3: None, {}, facts) == {"num_classes": 10}
    assert factory_kwargs(lambda **kw: None, {"w": 2}, facts) == {"num_classes": 10, "in_channels": 1, "w": 2}
    assert factory_kwargs(lambda num_classes=3, in_channels=3: None, {"num_classes": 5}, facts) == {
        "num_classes": 5, "in_channels": 1}  # the recipe's kwargs win
    with pytest.raises(ModelSpecError, match=r"student\.kwargs\.x: .* takes no argument 'x'") as err:
        factory_kwargs(lambda num_classes=3: None, {"x": 1}, facts, "student")
    assert err.value.field == "student.kwargs.x"


def test_registered_models_still_receive_the_data_facts() -> None:
    model = build_for_data("small_cnn", {"width": 4}, 7, 3)
    assert model.conv1.in_channels == 3 and model.fc.out_features == 7


def test_check_model_for_a_multi_output_model() -> None:
    info = dataset_info("synthetic_detection")
    task = Task("logits", {"logits": HeadLoss("cross_entropy"), "boxes": HeadLoss("smooth_l1", "boxes")})
    out = check_model(build_model("tiny_detector"), info, task, "teacher")
    assert set(out) == {"features", "logits", "boxes"}
    with pytest.raises(ModelSpecError, match=r"task\.accuracy_head: 'cls' is not a head of teacher\.model"):
        check_model(build_model("tiny_detector"), info, Task("cls", task.losses), "teacher")
    bad_target = Task("logits", {"boxes": HeadLoss("smooth_l1", "box")})
    with pytest.raises(ModelSpecError, match=r"task\.losses\.boxes\.target: the data has no target 'box'; it has: labels, boxes"):
        check_model(build_model("tiny_detector"), info, bad_target, "teacher")
    with pytest.raises(ModelSpecError, match=r"head 'logits' returns \(2, 5\) .* needs logits of shape \(2, 3\)"):
        check_model(build_model("tiny_detector", num_classes=5), info, task, "teacher")


def test_pruning_that_changes_an_output_head_is_refused() -> None:
    import copy

    from qtemperate.pruning import prune

    model = build_model("tiny_detector").eval()
    x = torch.randn(2, 1, 24, 24)
    pruned, _ = prune(model, x, target_params_ratio=0.5, iterative_steps=2)
    check_outputs_kept(model, pruned, x)  # prune keeps every output head's width
    assert pruned.conv1.out_channels < model.conv1.out_channels  # yet it pruned
    # a head narrowed some other way (a pruner that keeps only the last layer did this)
    narrowed = copy.deepcopy(model)
    narrowed.features = torch.nn.Linear(model.features.in_features, model.features.out_features - 3)
    with pytest.raises(ModelSpecError, match=r"student: pruning changed 'features' from \(2, 32\) to \(2, 29\)"):
        check_outputs_kept(model, narrowed, x)
    check_outputs_kept(model, model, x)  # nothing changed: fine
