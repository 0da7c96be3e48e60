"""QAT step vs float step vs torch.ao's QAT step, side by side in one process.

One training step (forward, cross-entropy, ``zero_grad``, backward, SGD with momentum) of
ResNet-20 (``build_model("resnet20", in_channels=1)``) on a batch of 64 Fashion-MNIST
images 1×28×28, for every contender, round-robin (the contenders are interleaved so
that the machine's noise falls on all of them alike), at 1 torch thread:

==================  ====================================================================
``float``           the float model in train mode (BatchNorm in the graph)
``float_cl``        the same in ``channels_last`` (model and input)
``brevitas_w8a8``   qtemperate's W8A8 model (BN folded) through Brevitas's own operations
                    (:func:`qtemperate.quantization.fast.brevitas_reference`): the step before
``w8a8``            the same model through the fused fake-quantize (what qtemperate runs)
``brevitas_w4a4``   W4A4 (``set_bit_width(4, 4)``), Brevitas's operations
``w4a4``            W4A4, fused
``w4a4_frozen``     W4A4, fused, activation thresholds frozen (``requires_grad=False``)
``w8a8_cl``         W8A8, fused, ``channels_last``
``torchao_qat``     torch.ao ``prepare_qat_fx`` (``get_default_qat_qconfig_mapping("x86")``):
                    fused fake-quantize with observers, BatchNorm kept (Conv-BN-ReLU fused)
==================  ====================================================================

Run (under the shared machine's measurement lock)::

    flock /work/wt/measure.lock python bench/qat_step.py --rounds 30 --out bench/results/qat_step.json
    python bench/qat_step.py --profile w8a8     # torch.profiler table of one contender

Reported per contender: the median step (ms), its ratio to the float step (ratio of
medians) and the median of the per-round ratios; the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from conftest import write_json  # noqa: E402

from qtemperate import build_model, quantize, set_bit_width  # noqa: E402
from qtemperate.quantization.fast import brevitas_reference  # noqa: E402


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], str]:
    try:
        from qtemperate.data import build_datasets

        ds = build_datasets("fashion_mnist", limit_train=n * 5, limit_test=16, seed=0).train
        xs = torch.stack([ds[i][0] for i in range(n * 5)])
        ys = torch.tensor([int(ds[i][1]) for i in range(n)])
        return xs[:n], ys, list(xs[n:].split(n)), "Fashion-MNIST"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(n * 5, 1, 28, 28, generator=g)
        return xs[:n], torch.randint(0, 10, (n,), generator=g), list(xs[n:].split(n)), "random"


class Contender:
    """A model, its optimizer and the context its step runs in."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, ctx: Callable[[], Any] = contextlib.nullcontext,
                 channels_last: bool = False) -> None:
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.model, self.x, self.ctx = model.train(), x, ctx
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step(self, y: torch.Tensor) -> None:
        with self.ctx():
            loss = F.cross_entropy(self.model(self.x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def build(x: torch.Tensor, calib: list[torch.Tensor], names: list[str] | None = None) -> dict[str, Contender]:
    torch.manual_seed(0)
    fm = build_model("resnet20", num_classes=10, in_channels=1)
    q8 = quantize(fm, 8, 8, calibration_loader=calib, calibration_batches=len(calib))
    q4 = set_bit_width(copy.deepcopy(q8), 4, 4)
    frozen = copy.deepcopy(q4)
    for n, p in frozen.named_parameters():
        if n.endswith("scaling_impl.value"):
            p.requires_grad_(False)
    makers: dict[str, Callable[[], Contender]] = {
        "float": lambda: Contender(copy.deepcopy(fm), x),
        "float_cl": lambda: Contender(copy.deepcopy(fm), x, channels_last=True),
        "brevitas_w8a8": lambda: Contender(copy.deepcopy(q8), x, brevitas_reference),
        "w8a8": lambda: Contender(copy.deepcopy(q8), x),
        "brevitas_w4a4": lambda: Contender(copy.deepcopy(q4), x, brevitas_reference),
        "w4a4": lambda: Contender(copy.deepcopy(q4), x),
        "w4a4_frozen": lambda: Contender(frozen, x),
        "w8a8_cl": lambda: Contender(copy.deepcopy(q8), x, channels_last=True),
        "torchao_qat": lambda: Contender(_torchao(fm, x), x),
    }
    return {k: makers[k]() for k in (names or makers)}


def _torchao(fm: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(fm).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def measure(contenders: dict[str, Contender], y: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    for c in contenders.values():  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(2):
            c.step(y)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, c in contenders.items():
            t0 = time.perf_counter()
            c.step(y)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--contenders", nargs="+", default=None)
    ap.add_argument("--profile", default=None, help="print a torch.profiler table of this contender instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, calib, data = _batch(args.batch)
    if args.profile:
        c = build(x, calib, [args.profile])[args.profile]
        for _ in range(3):
            c.step(y)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                c.step(y)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return 0
    load_before = os.getloadavg()
    contenders = build(x, calib, args.contenders)
    times = measure(contenders, y, args.rounds)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = "float" if "float" in med else next(iter(med))
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times[base])) for k in times}
    out = {
        "setup": f"resnet20(in_channels=1), batch {args.batch} {data} 1x28x28, SGD momentum, "
                 f"{args.threads} thread(s), {args.rounds} interleaved rounds",
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "median_ms": med,
        "ratio_to_float": {k: v / med[base] for k, v in med.items()},
        "median_paired_ratio_to_float": paired,
        "samples_ms": times,
    }
    print(f"{'contender':<16}{'median ms':>11}{'/ float':>9}{'paired':>9}")
    for k in med:
        print(f"{k:<16}{med[k]:>11.1f}{med[k] / med[base]:>9.3f}{paired[k]:>9.3f}")
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
