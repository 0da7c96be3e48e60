"""Autocast per phase: the setting resolves per device, autocast really runs in bf16,
evaluation stays fp32, and a run in bf16 on the CPU is correct (not timed here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtemperate.checkpoint import load_student
from qtemperate.models import build_model
from qtemperate.recipe import RecipeError, parse_recipe
from qtemperate.trainer import Trainer
from qtemperate.training.precision import ComputePolicy, amp_dtype, policy_for
from tests.numerics import assert_accuracy_explained
from tests.pipeline_helpers import tiny_recipe

CPU = torch.device("cpu")


def test_settings_resolve_per_device() -> None:
    assert amp_dtype("fp32", CPU) is None and amp_dtype("bf16", CPU) is torch.bfloat16
    assert amp_dtype("auto", CPU) is None  # bf16 is only automatic on a CUDA device
    cuda = torch.device("cuda")
    if torch.cuda.is_available():
        assert amp_dtype("auto", cuda) is (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    assert not policy_for("bf16", CPU).channels_last  # NHWC only on CUDA
    assert policy_for("bf16", cuda).channels_last and not policy_for("bf16", cuda, quantized=True).channels_last
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        amp_dtype("fp16", CPU)


def test_policy_runs_convolutions_in_bf16_and_places_batches() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    seen: list[torch.dtype] = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 1, 8, 8)
    for policy, want in ((ComputePolicy(CPU, torch.bfloat16), torch.bfloat16), (ComputePolicy(CPU), torch.float32)):
        with policy.autocast():
            model(policy.to_device(x))
        assert seen[-1] == want
    nhwc = ComputePolicy(CPU, None, channels_last=True)
    assert nhwc.to_device(x).is_contiguous(memory_format=torch.channels_last)
    assert nhwc.prepare(model).conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.name == "fp32" and ComputePolicy(CPU, torch.bfloat16).name == "bf16"


def test_recipe_names_a_bad_precision() -> None:
    raw = tiny_recipe(Path("/tmp"))
    raw["precision"] = {"qat": "fp8"}
    with pytest.raises(RecipeError, match=r"precision\.qat"):
        parse_recipe(raw)


def test_bf16_run_on_cpu_is_correct_and_reports_fp32_accuracy(tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, precision={"teacher": "bf16", "float_stage": "bf16", "qat": "bf16"})
    raw["student"] = {"prune_ratio": 0.5, "calibration_batches": 2, "iterative_steps": 1}
    raw["stages"].insert(0, {"name": "float", "epochs": 1, "lr": 0.02})
    raw["stages"][2]["epochs"] = 1
    summary = Trainer(parse_recipe(raw), run_dir=tmp_path / "run", progress=False).run()
    assert summary["teacher_acc"] > 0.8 and summary["student_acc"] > 0.5  # digits, 10 classes
    model, _ = load_student(tmp_path / "run" / "student.pt")  # fp32 evaluation of the saved student
    from qtemperate.data import build_datasets

    test = build_datasets("digits", seed=0).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))])
    assert_accuracy_explained(summary["student_acc"], model, x, y, what="fp32 student.pt")  # near-ties aside
