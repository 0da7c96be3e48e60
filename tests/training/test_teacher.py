"""The teacher step: training, saving, reuse on resume, logit caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtemperate.checkpoint import load_checkpoint
from qtemperate.data import DataBundle, RunLoaders
from qtemperate.models import build_model
from qtemperate.recipe import OptimizerConfig, Recipe, parse_recipe
from qtemperate.tracking import JsonlLogger
from qtemperate.training.evaluate import evaluate
from qtemperate.training.teacher import (
    TEACHER_FILE,
    TeacherLogits,
    cache_teacher_logits,
    prepare_teacher,
    should_cache_logits,
    train_teacher,
)
from tests.numerics import assert_accuracy_explained, output_tolerance

CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    return build_model("small_cnn", num_classes=10, in_channels=1, width=8)


def test_train_teacher_learns_and_is_deterministic(digits_loaders: RunLoaders, tmp_path: Path) -> None:
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    logger = JsonlLogger(tmp_path)
    steps = train_teacher(a, digits_loaders, 2, 0.05, OptimizerConfig(), CPU, seed=1, logger=logger)
    logger.finish()
    assert steps == 2 * len(digits_loaders.train)
    train_teacher(b, digits_loaders, 2, 0.05, OptimizerConfig(), CPU, seed=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    acc, _ = evaluate(a, digits_loaders.test, CPU)
    assert acc > 0.3  # 10 classes, 16 steps: well above chance (0.1)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"teacher/acc"' in rows[0]


def test_prepare_teacher_saves_and_reuses_on_resume(
    recipe: Recipe, digits_bundle: DataBundle, digits_loaders: RunLoaders, tmp_path: Path
) -> None:
    model, steps = prepare_teacher(recipe, digits_bundle, digits_loaders, tmp_path, False, CPU)
    saved = load_checkpoint(tmp_path / TEACHER_FILE)
    assert saved["steps"] == steps == recipe.teacher.train.epochs * len(digits_loaders.train)
    assert saved["model"] == "small_cnn" and saved["kwargs"]["num_classes"] == 10
    again, steps2 = prepare_teacher(recipe, digits_bundle, digits_loaders, tmp_path, True, CPU)
    assert steps2 == steps and not again.training
    for pa, pb in zip(model.parameters(), again.parameters()):
        assert torch.equal(pa, pb)


def test_prepare_teacher_loads_a_checkpoint(
    recipe: Recipe, digits_bundle: DataBundle, digits_loaders: RunLoaders, tmp_path: Path
) -> None:
    src = build_model("small_cnn", num_classes=10, in_channels=1, width=16)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "t.pt")
    raw = recipe.model_dump(mode="json")
    raw["teacher"] = {"model": "small_cnn", "kwargs": {"width": 16}, "checkpoint": str(tmp_path / "t.pt")}
    r = parse_recipe(raw)
    model, steps = prepare_teacher(r, digits_bundle, digits_loaders, tmp_path / "run", False, CPU)
    assert steps == 0
    for pa, pb in zip(src.parameters(), model.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    ("mode", "augmented", "cache"),
    [("auto", False, True), ("auto", True, False), ("on", False, True), ("off", False, False), ("off", True, False)],
)
def test_should_cache_logits(mode: str, augmented: bool, cache: bool) -> None:
    assert should_cache_logits(mode, augmented)[0] is cache


def test_cache_on_with_augmentation_is_an_error() -> None:
    with pytest.raises(ValueError, match="cache_teacher_logits"):
        should_cache_logits("on", True)


@pytest.mark.numerics
def test_cached_logits_equal_live_logits(digits_loaders: RunLoaders) -> None:
    teacher = _model().eval()
    cache = cache_teacher_logits(teacher, digits_loaders, CPU)
    assert cache.shape == (len(digits_loaders.plain.dataset), 10)
    cached, live = TeacherLogits(teacher, cache), TeacherLogits(teacher, None)
    x, _, idx = next(iter(digits_loaders.train))
    assert cached.cached and not live.cached
    # cached in other batches (other kernels' rounding): within 2 γ_L max|logit| (tests.numerics)
    got, ref = cached(x, idx), live(x, idx)
    tol = output_tolerance(teacher, x, ref)
    assert (got - ref).abs().max() <= tol, f"max |Δ| {(got - ref).abs().max():.3g} > {tol:.3g}"


@pytest.mark.numerics
def test_a_multi_output_teacher_is_cached_per_head_and_scored_on_its_accuracy_head() -> None:
    from qtemperate.data import build_datasets, build_run_loaders
    from qtemperate.heads import HeadLoss, Task

    bundle = build_datasets("synthetic_detection", seed=0, n_train=96, n_test=40)
    loaders = build_run_loaders(bundle, batch_size=32, eval_batch_size=50)
    teacher = build_model("tiny_detector", width=4).eval()
    cache = cache_teacher_logits(teacher, loaders, torch.device("cpu"))
    assert set(cache) == {"features", "logits", "boxes"} and cache["boxes"].shape == (96, 4)
    x, _, idx = next(iter(loaders.train))
    looked_up, live = TeacherLogits(teacher, cache)(x, idx), TeacherLogits(teacher, None)(x, idx)
    for h in live:  # within 2 γ_L max|head| (tests.numerics)
        tol = output_tolerance(teacher, x, live[h])
        assert (looked_up[h] - live[h]).abs().max() <= tol, h

    task = Task("logits", {"logits": HeadLoss("cross_entropy"), "boxes": HeadLoss("smooth_l1", "boxes", 2.0)})
    acc, loss = evaluate(teacher, loaders.test, torch.device("cpu"), task)
    xs = torch.stack([bundle.test[i][0] for i in range(40)])
    ys = {k: torch.stack([bundle.test[i][1][k] for i in range(40)]) for k in ("labels", "boxes")}
    with torch.no_grad():
        out = teacher(xs)
    assert_accuracy_explained(acc, teacher, xs, ys["labels"], output="logits", what="teacher")  # near-ties aside
    assert loss == pytest.approx(float(task.loss(out, ys)[0]), rel=1e-5)  # one batch of 40: the batch mean
    with pytest.raises(ValueError, match="name the head scored"):
        evaluate(teacher, loaders.test, torch.device("cpu"))  # a dict output is never guessed
def test_teacher_training_resumes_exactly_after_an_epoch(digits_loaders: RunLoaders, tmp_path: Path) -> None:
    from qtemperate.training.teacher import load_teacher_training

    full, part = _model(), _model()
    part.load_state_dict(full.state_dict())
    steps = train_teacher(full, digits_loaders, 2, 0.05, OptimizerConfig(), CPU, seed=1)
    ckpt = tmp_path / "teacher_training.pt"
    # "Killed" after epoch 1: train one epoch of two (the LR schedule spans both), checkpointed.
    import qtemperate.training.teacher as T

    class Stop(Exception):
        pass

    real_save = T.save_atomic

    def save_then_stop(obj: object, path: Path) -> Path:
        real_save(obj, path)
        raise Stop

    T.save_atomic = save_then_stop  # type: ignore[assignment]
    try:
        with pytest.raises(Stop):
            train_teacher(part, digits_loaders, 2, 0.05, OptimizerConfig(), CPU, seed=1,
                          checkpoint_path=ckpt, metrics_bytes=lambda: 123)
    finally:
        T.save_atomic = real_save  # type: ignore[assignment]
    saved = load_teacher_training(ckpt)
    assert (saved["epoch"], saved["epochs"], saved["metrics_bytes"]) == (0, 2, 123)
    resumed = _model()
    assert train_teacher(resumed, digits_loaders, 2, 0.05, OptimizerConfig(), CPU, seed=1, resume_from=saved) == steps
    for pa, pb in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(pa, pb)


def test_a_pickled_teacher_model_is_refused(
    recipe: Recipe, digits_bundle: DataBundle, digits_loaders: RunLoaders, tmp_path: Path
) -> None:
    from qtemperate.errors import BadInput, CheckpointError

    whole = tmp_path / "whole.pt"
    torch.save(build_model("small_cnn", num_classes=10, in_channels=1, width=16), whole)
    raw = recipe.model_dump(mode="json")
    raw["teacher"] = {"model": "small_cnn", "kwargs": {"width": 16}, "checkpoint": str(whole)}
    with pytest.raises(CheckpointError, match=r"teacher.checkpoint: refused .*torch.save\(model.state_dict\(\), path\)"):
        prepare_teacher(parse_recipe(raw), digits_bundle, digits_loaders, tmp_path / "run", False, CPU)
    wrong = tmp_path / "wrong.pt"
    torch.save(build_model("small_cnn", num_classes=10, in_channels=1, width=8).state_dict(), wrong)
    raw["teacher"]["checkpoint"] = str(wrong)
    with pytest.raises(BadInput, match=r"wrong.pt does not fit the model: conv1.weight is \(8, 1, 3, 3\) in the file"):
        prepare_teacher(parse_recipe(raw), digits_bundle, digits_loaders, tmp_path / "run", False, CPU)
