"""Training-step overhead of Temperate distillation on a W4A4 ResNet-20 (2 CPU threads).

Run: ``pytest bench/test_training_overhead.py --benchmark-only``

* (a) ``qat_ce``: full QAT step (forward, CE, backward, grad clip, SGD step);
* (b) ``qat_temperate``: the same step with :class:`TemperateLoss` multi-scale
  (6, 3, 1) and a :class:`JointScheduler` step + ``set_temperatures`` every step
  (the trainer does that once per epoch: this is the worst case); teacher logits are
  precomputed (the trainer's cache);
* (c) ``loss_only_*``: the loss (+ scheduler) forward and backward on a logits tensor,
  no model: the absolute cost of what (b) adds, against plain CE;
* (d) ``float_ce``: the same step on the float ResNet-20;
* (e) ``epoch_*``: one epoch over 2048 images, student W4A4 small_cnn(width 16),
  teacher float ResNet-20, with the teacher forward per batch vs indexing cached logits.

``test_interleaved_overhead`` runs (d), (a), (b) round-robin in one loop (the machine
is noisy; alternating puts the same noise on all three) and writes
``bench/results/training_overhead.json`` with medians, the overhead of (b) vs (a) and
the float/QAT ratio. The goal is an overhead ≤ 3 % of the QAT step.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qtemperate import (
    BitDropCoupling,
    BitStage,
    JointScheduler,
    TemperateLoss,
    build_model,
    quantize,
    set_bit_width,
)

TEMPS = (6.0, 3.0, 1.0)
_RESULTS: dict[str, Any] = {}


def _scheduler() -> JointScheduler:
    stages = [BitStage("w8a8", 1, 8, 8), BitStage("w4a4", 2, 4, 4)]
    return JointScheduler(stages, TEMPS, None, BitDropCoupling())


class _Setup:
    """A W4A4 ResNet-20, its float twin, optimizers, a batch and cached teacher logits."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], calib: list[torch.Tensor]) -> None:
        torch.manual_seed(0)
        self.x, self.y = batch
        self.float_model = build_model("resnet20", num_classes=10, in_channels=1).train()
        q = quantize(self.float_model, 8, 8, calibration_loader=calib, calibration_batches=4)
        self.qat_model = set_bit_width(q, 4, 4).train()
        teacher = build_model("resnet20", num_classes=10, in_channels=1).eval()
        with torch.no_grad():
            self.t_logits = teacher(self.x)  # the cache: one row per sample
        self.idx = torch.arange(self.x.shape[0])
        self.opt_q = torch.optim.SGD(self.qat_model.parameters(), lr=0.01, momentum=0.9)
        self.opt_f = torch.optim.SGD(self.float_model.parameters(), lr=0.01, momentum=0.9)
        self.sched = _scheduler()
        self.loss_fn = TemperateLoss(kd_weight=0.9, temperatures=TEMPS)
        self.val_loss = 1.0

    @staticmethod
    def _finish(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return float(gnorm)

    def float_ce(self) -> None:
        self._finish(self.float_model, self.opt_f, F.cross_entropy(self.float_model(self.x), self.y))

    def qat_ce(self) -> None:
        self._finish(self.qat_model, self.opt_q, F.cross_entropy(self.qat_model(self.x), self.y))

    def qat_temperate(self) -> None:
        st = self.sched.step(1, self.val_loss)  # first W4A4 epoch: T from the coupling rule
        self.loss_fn.set_temperatures(st.temperatures, st.weights)
        t_out = self.t_logits[self.idx]
        parts = self.loss_fn(self.qat_model(self.x), t_out, self.y)
        self._finish(self.qat_model, self.opt_q, parts["loss"])


@pytest.fixture(scope="module")
def setup(fashion_batch: tuple[torch.Tensor, torch.Tensor], calib_batches: list[torch.Tensor]) -> _Setup:
    return _Setup(fashion_batch, calib_batches)


def _pedantic(benchmark: Any, fn: Callable[[], None], rounds: int, warmup: int = 2) -> None:
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


# -- (a), (b), (d): one benchmark each -------------------------------------------------
def test_qat_step_ce(benchmark: Any, setup: _Setup) -> None:
    """(a) W4A4 ResNet-20 QAT step, plain cross-entropy."""
    _pedantic(benchmark, setup.qat_ce, rounds=12)


def test_qat_step_temperate(benchmark: Any, setup: _Setup) -> None:
    """(b) W4A4 ResNet-20 QAT step, TemperateLoss (6, 3, 1) + JointScheduler step."""
    _pedantic(benchmark, setup.qat_temperate, rounds=12)


def test_float_step_ce(benchmark: Any, setup: _Setup) -> None:
    """(d) float ResNet-20 step, plain cross-entropy."""
    _pedantic(benchmark, setup.float_ce, rounds=12)


# -- (c): the loss and scheduler alone ---------------------------------------------------
@pytest.fixture(scope="module")
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(128, 10) * 3, torch.randn(128, 10) * 3, torch.randint(0, 10, (128,))


def test_loss_only_ce(benchmark: Any, logits: tuple[torch.Tensor, ...]) -> None:
    """(c0) CE forward + backward on (128, 10) logits: the baseline of (c)."""
    s, _, y = logits

    def run() -> None:
        s_ = s.clone().requires_grad_()
        F.cross_entropy(s_, y).backward()

    benchmark.pedantic(run, rounds=300, iterations=5, warmup_rounds=10)


def _bench_temperate_step(benchmark: Any, logits: tuple[torch.Tensor, ...], read_back: bool) -> None:
    """Scheduler step + set_temperatures + TemperateLoss (6,3,1) fwd+bwd, optionally
    followed by ``float()`` of every loss part (per-step bookkeeping)."""
    s, t, y = logits
    sched = _scheduler()
    loss_fn = TemperateLoss(kd_weight=0.9, temperatures=TEMPS)

    def run() -> None:
        st = sched.step(1, 1.0)
        loss_fn.set_temperatures(st.temperatures, st.weights)
        s_ = s.clone().requires_grad_()
        parts = loss_fn(s_, t, y)
        parts["loss"].backward()
        if read_back:
            {k: float(v.detach()) for k, v in parts.items()}

    benchmark.pedantic(run, rounds=300, iterations=5, warmup_rounds=10)


def test_loss_only_temperate(benchmark: Any, logits: tuple[torch.Tensor, ...]) -> None:
    """(c) JointScheduler step + set_temperatures + TemperateLoss (6,3,1) forward + backward."""
    _bench_temperate_step(benchmark, logits, read_back=False)


def test_loss_only_temperate_with_logging(benchmark: Any, logits: tuple[torch.Tensor, ...]) -> None:
    """(c') as (c) plus a ``float()`` of every part (what the trainer now does only every log_every steps)."""
    _bench_temperate_step(benchmark, logits, read_back=True)


# -- side by side ---------------------------------------------------------------------
def test_interleaved_overhead(
    benchmark: Any, setup: _Setup, logits: tuple[torch.Tensor, ...], result_writer: Any
) -> None:
    """(a), (b), (d) round-robin in one loop; writes bench/results/training_overhead.json."""
    times: dict[str, list[float]] = {"float_ce": [], "qat_ce": [], "qat_temperate": []}
    fns = {"float_ce": setup.float_ce, "qat_ce": setup.qat_ce, "qat_temperate": setup.qat_temperate}
    for fn in fns.values():  # warm-up
        fn()

    def one_round() -> None:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)

    benchmark.pedantic(one_round, rounds=15, iterations=1, warmup_rounds=0)

    # The absolute cost of the loss + scheduler, measured without the model (less noise).
    s, t, y = logits
    sched, loss_fn = _scheduler(), TemperateLoss(kd_weight=0.9, temperatures=TEMPS)

    def loss_ms(temperate: bool, n: int = 400) -> float:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            s_ = s.clone().requires_grad_()
            if temperate:
                st = sched.step(1, 1.0)
                loss_fn.set_temperatures(st.temperatures, st.weights)
                loss = loss_fn(s_, t, y)["loss"]
            else:
                loss = F.cross_entropy(s_, y)
            loss.backward()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    loss_ms(True, 50)
    ce_ms, temperate_ms = loss_ms(False), loss_ms(True)
    med = {k: statistics.median(v) for k, v in times.items()}
    pair = [b / a - 1.0 for a, b in zip(times["qat_ce"], times["qat_temperate"])]
    out = {
        "model": "resnet20(in_channels=1), W4A4 (quantize W8A8 + calibration, set_bit_width 4/4)",
        "batch": "128 Fashion-MNIST images 1x28x28",
        "rounds": len(times["qat_ce"]),
        "median_ms": med,
        "samples_ms": times,
        "overhead_b_vs_a_median_ratio": med["qat_temperate"] / med["qat_ce"] - 1.0,
        "overhead_b_vs_a_median_of_paired_ratios": statistics.median(pair),
        "loss_only_ms": {"ce": ce_ms, "temperate_multiscale_plus_scheduler": temperate_ms},
        "overhead_from_loss_only": (temperate_ms - ce_ms) / med["qat_ce"],
        "float_over_qat_ratio": med["float_ce"] / med["qat_ce"],
        "qat_over_float_ratio": med["qat_ce"] / med["float_ce"],
    }
    _RESULTS["interleaved"] = out
    benchmark.extra_info.update({k: v for k, v in out.items() if k != "samples_ms"})
    result_writer("training_overhead", _RESULTS)


# -- (e) teacher-logit cache ------------------------------------------------------------
class _IndexedSlice(Dataset):
    def __init__(self, base: Dataset, n: int) -> None:
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.base[i]
        return x, y, i


class _EpochSetup:
    """2048 images; student W4A4 small_cnn(16); teacher float ResNet-20."""

    N = 2048

    def __init__(self, fashion: Any, calib: list[torch.Tensor]) -> None:
        torch.manual_seed(0)
        self.data = _IndexedSlice(fashion.train, self.N)
        self.loader = DataLoader(self.data, batch_size=128, shuffle=False, num_workers=0)
        self.teacher = build_model("resnet20", num_classes=10, in_channels=1).eval()
        small = build_model("small_cnn", num_classes=10, in_channels=1, width=16)
        self.student0 = set_bit_width(quantize(small, 8, 8, calibration_loader=calib, calibration_batches=4), 4, 4)
        self.loss_fn = TemperateLoss(kd_weight=0.9, temperatures=TEMPS)
        self.cache: torch.Tensor | None = None

    def build_cache(self) -> float:
        t0 = time.perf_counter()
        plain = DataLoader(self.data, batch_size=512, shuffle=False)
        with torch.no_grad():
            self.cache = torch.cat([self.teacher(x) for x, _, _ in plain])
        return time.perf_counter() - t0

    def epoch(self, cached: bool) -> None:
        student = copy.deepcopy(self.student0).train()
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        for x, y, idx in self.loader:
            if cached:
                assert self.cache is not None
                t_out = self.cache[idx]
            else:
                with torch.no_grad():
                    t_out = self.teacher(x)
            loss = self.loss_fn(student(x), t_out, y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def epoch_setup(fashion: Any, calib_batches: list[torch.Tensor]) -> _EpochSetup:
    e = _EpochSetup(fashion, calib_batches)
    _RESULTS["teacher_cache_build_s"] = e.build_cache()
    return e


def test_epoch_teacher_forward(benchmark: Any, epoch_setup: _EpochSetup) -> None:
    """(e) one epoch (2048 images), teacher ResNet-20 forward on every batch."""
    benchmark.pedantic(epoch_setup.epoch, args=(False,), rounds=3, iterations=1, warmup_rounds=1)
    _RESULTS["epoch_teacher_forward_s"] = benchmark.stats.stats.median


def test_epoch_cached_logits(benchmark: Any, epoch_setup: _EpochSetup, result_writer: Any) -> None:
    """(e) one epoch (2048 images), teacher logits indexed from the cache."""
    benchmark.pedantic(epoch_setup.epoch, args=(True,), rounds=3, iterations=1, warmup_rounds=1)
    _RESULTS["epoch_cached_logits_s"] = benchmark.stats.stats.median
    if "epoch_teacher_forward_s" in _RESULTS:
        _RESULTS["epoch_speedup_from_cache"] = _RESULTS["epoch_teacher_forward_s"] / _RESULTS["epoch_cached_logits_s"]
        _RESULTS["epoch_setup"] = "2048 Fashion-MNIST images, batch 128, student W4A4 small_cnn(width=16), teacher float resnet20"
    result_writer("training_overhead", _RESULTS)
