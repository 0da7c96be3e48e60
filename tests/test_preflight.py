"""Tests of qtemperate.preflight: data, options, checkpoints and class counts checked before a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qtemperate import data as D
from qtemperate.models import build_model
from qtemperate.preflight import DatasetInfo, dataset_info, preflight
from qtemperate.recipe import Recipe, RecipeError, parse_recipe
from tests.data.fakes import fake_cifar100


def _recipe(tmp_path: Path, data: dict[str, Any], teacher: dict[str, Any] | None = None, **extra: Any) -> Recipe:
    raw = {
        "name": "preflight",
        "output_dir": str(tmp_path / "runs"),
        "data": data,
        "teacher": teacher or {"model": "small_cnn", "kwargs": {"width": 8}, "train": {"epochs": 1}},
        "stages": [{"epochs": 1, "weight_bits": 8, "act_bits": 8}],
        **extra,
    }
    return parse_recipe(raw)


def _checkpoint(tmp_path: Path, num_classes: int, in_channels: int = 3, wrap: bool = False) -> Path:
    state = build_model("small_cnn", num_classes=num_classes, in_channels=in_channels, width=8).state_dict()
    path = tmp_path / f"teacher{num_classes}.pt"
    torch.save({"state_dict": state} if wrap else state, path)
    return path


def _cifar100(tmp_path: Path, label_mode: str, ckpt: Path, **teacher: Any) -> Recipe:
    fake_cifar100(tmp_path)
    return _recipe(
        tmp_path,
        {"name": "cifar100", "root": str(tmp_path), "kwargs": {"label_mode": label_mode}},
        {"model": "small_cnn", "kwargs": {"width": 8, **teacher}, "checkpoint": str(ckpt)},
    )


# --------------------------------------------------------------------------- facts


def test_facts_are_the_data_packages() -> None:
    assert DatasetInfo is D.DatasetInfo
    for name, kw in (("cifar100", {"label_mode": "coarse"}), ("synthetic", {"num_classes": 3}), ("digits", None)):
        assert dataset_info(name, kw) == D.dataset_info(name, kw)


def test_dataset_info_errors_name_the_recipe_field() -> None:
    with pytest.raises(RecipeError, match=r"^data\.name: unknown dataset 'mnist'; known: cifar10, cifar100, digits"):
        dataset_info("mnist")
    with pytest.raises(RecipeError, match=r"^data\.kwargs\.label_mod: dataset 'cifar100' has no option 'label_mod'; accepted: label_mode$"):
        dataset_info("cifar100", {"label_mod": "coarse"})
    with pytest.raises(RecipeError, match=r"^data\.kwargs\.label_mode: cifar100 label_mode must be 'fine' or 'coarse'"):
        dataset_info("cifar100", {"label_mode": "medium"})
    with pytest.raises(RecipeError, match=r"^data: "):
        dataset_info("synthetic", {"num_classes": "many"})


# --------------------------------------------------------------------------- cifar100 label modes


def test_cifar100_coarse_with_a_20_class_teacher_passes(tmp_path: Path) -> None:
    recipe = _cifar100(tmp_path, "coarse", _checkpoint(tmp_path, 20))
    assert preflight(recipe) == DatasetInfo(20, 3, (32, 32))


def test_cifar100_coarse_with_a_100_class_teacher_fails_naming_the_field(tmp_path: Path) -> None:
    recipe = _cifar100(tmp_path, "coarse", _checkpoint(tmp_path, 100))
    with pytest.raises(RecipeError, match=r"^teacher\.checkpoint: classifier has 100 outputs but data 'cifar100' has 20 classes"):
        preflight(recipe)


def test_cifar100_fine_with_a_100_class_teacher_passes(tmp_path: Path) -> None:
    recipe = _cifar100(tmp_path, "fine", _checkpoint(tmp_path, 100, wrap=True))
    assert preflight(recipe).num_classes == 100


def test_teacher_kwargs_num_classes_checked_against_the_stated_facts(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, 20)
    assert preflight(_cifar100(tmp_path / "a", "coarse", ckpt, num_classes=20)).num_classes == 20
    with pytest.raises(RecipeError, match=r"^teacher\.kwargs\.num_classes: 100 but data 'cifar100' has 20 classes"):
        preflight(_cifar100(tmp_path / "b", "coarse", ckpt, num_classes=100))


def test_unknown_data_option_fails_naming_it(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, {"name": "cifar100", "kwargs": {"label_mod": "coarse"}})
    with pytest.raises(RecipeError, match=r"^data\.kwargs\.label_mod: .*accepted: label_mode"):
        preflight(recipe, check_data=False)
    recipe = _recipe(tmp_path, {"name": "digits", "kwargs": {"num_classes": 5}})
    with pytest.raises(RecipeError, match=r"^data\.kwargs\.num_classes: dataset 'digits' has no option 'num_classes'; accepted: test_fraction"):
        preflight(recipe)


# --------------------------------------------------------------------------- data and checkpoints


def test_missing_data_is_named_unless_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.CIFAR10_ENV, raising=False)
    recipe = _recipe(tmp_path, {"name": "cifar10", "root": str(tmp_path / "no-cifar")})
    with pytest.raises(RecipeError, match=r"^data: .*no-cifar"):
        preflight(recipe)
    assert preflight(recipe, check_data=False) == DatasetInfo(10, 3, (32, 32))


def test_checkpoint_problems_name_the_file(tmp_path: Path) -> None:
    def teacher(path: Path) -> dict[str, Any]:
        return {"model": "small_cnn", "kwargs": {"width": 8}, "checkpoint": str(path)}

    digits = {"name": "digits"}
    with pytest.raises(RecipeError, match=r"^teacher\.checkpoint: file not found: .*nope\.pt"):
        preflight(_recipe(tmp_path, digits, teacher(tmp_path / "nope.pt")))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RecipeError, match=r"^teacher\.checkpoint: cannot load .*corrupt\.pt"):
        preflight(_recipe(tmp_path, digits, teacher(corrupt)))
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(RecipeError, match=r"^teacher\.checkpoint: .*list\.pt does not hold a state dict"):
        preflight(_recipe(tmp_path, digits, teacher(listed)))
    ok = _checkpoint(tmp_path, 10, in_channels=1)
    assert preflight(_recipe(tmp_path, digits, teacher(ok))) == DatasetInfo(10, 1, (8, 8))


def test_unknown_model_names_the_section(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, {"name": "digits"}, student={"model": "no_such_net"})
    with pytest.raises(RecipeError, match=r"^student\.model: unknown model 'no_such_net'; known: .*small_cnn"):
        preflight(recipe)


# --------------------------------------------------------------------------- user datasets


@pytest.fixture
def blobs() -> Iterator[str]:
    def build(root: Any, seed: int, num_classes: int = 3) -> D.RawSplits:
        y = torch.arange(4 * num_classes) % num_classes
        ds = torch.utils.data.TensorDataset(torch.randn(len(y), 2, 5, 5), y)
        return D.RawSplits(ds, ds, num_classes, 2, (5, 5), (0.0, 0.0), (1.0, 1.0), scale=None)

    D.DATASETS.register(
        "test_pf_blobs",
        D.DatasetSpec(build=build, info=lambda num_classes=3: D.DatasetInfo(num_classes, 2, (5, 5))),
    )
    try:
        yield "test_pf_blobs"
    finally:
        D.DATASETS.unregister("test_pf_blobs")


def test_user_dataset_passes_preflight_with_its_stated_facts(tmp_path: Path, blobs: str) -> None:
    ckpt = _checkpoint(tmp_path, 6, in_channels=2)
    teacher = {"model": "small_cnn", "kwargs": {"width": 8}, "checkpoint": str(ckpt)}
    assert preflight(_recipe(tmp_path, {"name": blobs, "kwargs": {"num_classes": 6}}, teacher)) == DatasetInfo(6, 2, (5, 5))
    with pytest.raises(RecipeError, match=r"^teacher\.checkpoint: classifier has 6 outputs but data 'test_pf_blobs' has 3 classes"):
        preflight(_recipe(tmp_path, {"name": blobs}, teacher))


# --------------------------------------------------------------------------- the planner


def test_plan_sizes_a_20_class_head_for_cifar100_coarse(tmp_path: Path) -> None:
    from qtemperate.planner import plan_recipe

    def params(num_classes: int) -> int:
        model = build_model("small_cnn", num_classes=num_classes, in_channels=3, width=8)
        return sum(p.numel() for p in model.parameters())

    recipe = _recipe(
        tmp_path,
        {"name": "cifar100", "kwargs": {"label_mode": "coarse"}},
        student={"prune_ratio": 0.5, "iterative_steps": 1},
    )
    plan = plan_recipe(recipe)
    assert plan["teacher"]["params"] == params(20) != params(100)
    with pytest.raises(RecipeError, match=r"^data\.kwargs\.label_mod: "):
        plan_recipe(_recipe(tmp_path, {"name": "cifar100", "kwargs": {"label_mod": "coarse"}}))


# --------------------------------------------------------------------------- untrusted checkpoints, loaded data


def test_teacher_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    from tests.malicious import evil_torch_file

    marker = tmp_path / "ran"
    ckpt = evil_torch_file(tmp_path / "teacher.pt", marker)
    recipe = _recipe(tmp_path, {"name": "digits"}, {"model": "small_cnn", "checkpoint": str(ckpt)})
    with pytest.raises(RecipeError, match=r"^teacher.checkpoint: refused to load .*teacher.pt"):
        preflight(recipe)
    assert not marker.exists()


def test_teacher_checkpoint_shapes_must_fit_the_model(tmp_path: Path) -> None:
    state = build_model("small_cnn", num_classes=10, in_channels=1, width=16).state_dict()
    torch.save(state, tmp_path / "w16.pt")
    recipe = _recipe(tmp_path, {"name": "digits"},
                     {"model": "small_cnn", "kwargs": {"width": 8}, "checkpoint": str(tmp_path / "w16.pt")})
    with pytest.raises(RecipeError, match=r"teacher.checkpoint: .*w16.pt does not fit the model: conv1.weight is "
                                          r"\(16, 1, 3, 3\) in the file but \(8, 1, 3, 3\).*teacher.model 'small_cnn'"):
        preflight(recipe)


def test_degenerate_settings_and_labels(tmp_path: Path) -> None:
    from qtemperate.errors import DataFormatError
    from qtemperate.preflight import check_bundle, degenerate_settings

    recipe = _recipe(tmp_path, {"name": "digits", "batch_size": 256},
                     stages=[{"epochs": 1, "weight_bits": 8, "act_bits": 8}, {"epochs": 1, "weight_bits": 2, "act_bits": 2}])
    msgs = degenerate_settings(recipe, train_size=50)
    assert any(m.startswith("stages.1: W2A2") for m in msgs)
    assert any("data.batch_size 256 is larger than the 50 training samples" in m for m in msgs)
    assert any("only 50 training samples for 10 classes" in m for m in msgs)
    assert degenerate_settings(_recipe(tmp_path, {"name": "digits"}), train_size=1000) == []
    bundle = D.build_datasets("digits", limit_train=300, limit_test=50)
    assert check_bundle(_recipe(tmp_path, {"name": "digits"}), bundle) == []
    bundle.test.tensors[1][3] = 12
    with pytest.raises(DataFormatError, match=r"data: test labels include 12 \(1 samples\) .* 10 classes \(0..9\)"):
        check_bundle(_recipe(tmp_path, {"name": "digits"}), bundle)
