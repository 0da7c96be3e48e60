"""One distillation epoch: steps, logged parts, stable names, divergence."""

from __future__ import annotations

import math

import pytest
import torch

from qtemperate.data import RunLoaders
from qtemperate.joint_scheduler import BitStage, JointScheduler, NoCoupling
from qtemperate.losses import TemperateLoss
from qtemperate.models import build_model
from qtemperate.training.checkpointing import Progress
from qtemperate.training.console import Console
from qtemperate.training.guards import TrainingDiverged
from qtemperate.training.loop import Distiller, LrPlan, freeze_step, stable_names
from qtemperate.training.teacher import TeacherLogits

CPU = torch.device("cpu")


def test_stable_names_use_reference_temperatures() -> None:
    sched = JointScheduler([BitStage("w8a8", 2, 8, 8)], temperatures=(6.0, 3.0, 1.0))
    st = sched.step(0)
    parts = {"loss": 1.0, **{f"kd_T{t:g}": i for i, t in enumerate(st.temperatures)}}
    named = stable_names(parts, st, sched)
    assert {"kd_T6", "kd_T3", "kd_T1", "T_scale6", "T_scale3", "T_scale1", "loss"} <= set(named)
    assert [named["T_scale6"], named["T_scale3"], named["T_scale1"]] == list(st.temperatures)


def test_freeze_step_is_first_plus_ceil_of_the_fraction_of_the_stage() -> None:
    plan = LrPlan(first_step=40, steps=30, peak=0.1, kind="cosine")
    assert freeze_step(None, plan) is None
    assert freeze_step(0.0, plan) == 40
    assert freeze_step(0.5, plan) == 55
    assert freeze_step(0.51, plan) == 40 + math.ceil(0.51 * 30) == 56
    assert freeze_step(0.999, plan) == 70  # the last step of the stage is 69: never frozen


def test_lr_plan_is_stage_local() -> None:
    plan = LrPlan(first_step=10, steps=10, peak=0.2, kind="cosine")
    assert plan.at(10) == pytest.approx(0.2)
    assert plan.at(15) == pytest.approx(0.1)


def _distiller(kd_weight: float = 0.9) -> tuple[Distiller, JointScheduler]:
    torch.manual_seed(0)
    student = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    teacher = build_model("small_cnn", num_classes=10, in_channels=1, width=8).eval()
    sched = JointScheduler([BitStage("float", 1)], temperatures=(4.0,))
    loss = TemperateLoss(kd_weight=kd_weight, temperatures=(4.0,))
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    return Distiller(student, TeacherLogits(teacher, None), loss, sched, opt, CPU, 5.0, 2), sched


def test_train_epoch_steps_and_logs(digits_loaders: RunLoaders) -> None:
    dist, sched = _distiller()
    st = sched.step(0)
    dist.loss_fn.set_temperatures(st.temperatures, st.weights)
    prog = Progress()
    logged: list[tuple[dict, int]] = []
    n = len(digits_loaders.train)
    means = dist.train_epoch(digits_loaders.train, 0, prog, LrPlan(0, n, 0.05, "cosine"),
                             lambda m, s: logged.append((m, s)), Console(False))
    assert prog.global_step == n
    assert {"loss", "task_loss", "kd_loss", "kd_T4"} <= set(means)
    assert [s for _, s in logged] == list(range(2, n + 1, 2))
    assert logged[0][0]["train/lr"] == pytest.approx(LrPlan(0, n, 0.05, "cosine").at(1))


def test_nan_loss_raises(digits_loaders: RunLoaders, monkeypatch: pytest.MonkeyPatch) -> None:
    dist, sched = _distiller()
    sched.step(0)
    real = TemperateLoss.forward

    def poisoned(self, s, t, y):  # type: ignore[no-untyped-def]
        out = real(self, s, t, y)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(TemperateLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="NaN"):
        dist.train_epoch(digits_loaders.train, 0, Progress(), LrPlan(0, 10, 0.05, "cosine"),
                         lambda m, s: None, Console(False))


def test_stable_names_of_a_multi_head_model_use_each_heads_reference() -> None:
    sched = JointScheduler([BitStage("w8a8", 2, 8, 8, schedule="constant", schedule_kwargs={"base_temperature": 3.0})],
                           temperatures=(5.0,), coupling=NoCoupling(),
                           head_temperatures={"features": 5.0, "logits": 3.0})
    st = sched.step(0)  # T(t) = 3: features 1 + 4 * 2 / 4 = 3, logits 1 + 2 * 2 / 4 = 2
    loss = TemperateLoss(kd_weight=0.5, temperatures=(5.0,), head_weights={"boxes": 0.0})
    loss.follow(st)
    g = torch.Generator().manual_seed(0)
    s = {"features": torch.randn(4, 6, generator=g), "logits": torch.randn(4, 3, generator=g), "boxes": torch.randn(4, 4)}
    t = {k: torch.randn(v.shape, generator=g) for k, v in s.items()}
    parts = loss(s, t, torch.tensor([0, 1, 2, 0]))
    assert {"kd_features_T3", "kd_logits_T2"} <= set(parts)  # named by the current T
    named = stable_names(parts, st, sched)
    assert named["T_features_scale5"] == 3.0 and named["T_logits_scale3"] == 2.0
    assert named["kd_features_T5"] is parts["kd_features_T3"] and named["kd_logits_T3"] is parts["kd_logits_T2"]
    assert not any(k in named for k in ("kd_features_T3", "kd_logits_T2"))


def test_train_epoch_moves_the_temperature_within_the_epoch(digits_loaders: RunLoaders) -> None:
    n = len(digits_loaders.train)
    dist, _ = _distiller()
    sched = JointScheduler([BitStage("w", 2, 32, 32, schedule_kwargs={"warmup": 0.0, "adapt_until": 0.0})],
                           temperatures=(4.0,), updates_per_epoch=n)
    dist.scheduler = sched
    dist.log_every = 1
    dist.loss_fn.follow(sched.step(0))
    logged: list[dict] = []
    dist.train_epoch(digits_loaders.train, 0, Progress(), LrPlan(0, n, 0.05, "cosine"),
                     lambda m, s: logged.append(m), Console(False))
    # S = 0, K = 1: T = 1 + 3 * (1 + cos(pi * i / n)) / 2 at update i of epoch 0.
    want = [1 + 3 * (1 + math.cos(math.pi * i / n)) / 2 for i in range(n)]
    assert [m["train/T"] for m in logged] == pytest.approx(want)
