"""Compression-stage measurement: ResNet-20 on Fashion-MNIST, float → pruned → W8A8 → W4A4.

    python bench/compression_stages.py [--limit-train N] [--out bench/results/compression_stages.json]

1. ``resnet20(in_channels=1)`` trained ``--float-epochs`` (2) float epochs, plain CE
   (SGD lr 0.1, nesterov, wd 5e-4, cosine per step, batch 128) on the training set
   (all 60k by default; ``--limit-train`` takes a class-balanced slice);
2. pruned to 1/2 of the parameters (:func:`qtemperate.prune`, l2 importance, BN
   statistics re-estimated on 20 training batches);
3. quantized W8A8 (:func:`qtemperate.quantize`, 8 calibration batches);
4. fine-tuned ``--ft-fraction`` (1/4) of an epoch, plain CE, lr 0.01 cosine;
5. switched to W4A4 in place (:func:`qtemperate.set_bit_width`);
6. fine-tuned another 1/4 epoch.

After every step: accuracy on the 10k test images and bytes (:func:`qtemperate.model_size`:
float bytes for float models, the params × bits ``quantized_bytes`` for quantized ones).
At the end the float (unpruned and pruned), W8A8 and W4A4 models are exported with
:func:`qtemperate.export_onnx`, checked with :func:`qtemperate.verify_onnx` (top-1
agreement on 1000 test images, and the ONNX model's own accuracy on the 10k test set)
and timed with :func:`qtemperate.benchmark_onnx` at batch 1 and 64 (2 threads).
Goal: the exported quantized model ≥ 1.5× faster than the float ONNX at batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from conftest import environment  # noqa: E402

from qtemperate import (  # noqa: E402
    benchmark_onnx,
    build_model,
    export_onnx,
    model_size,
    prune,
    quantize,
    set_bit_width,
    verify_onnx,
)
from qtemperate.data import EpochSeededSampler, build_datasets  # noqa: E402
from qtemperate.recipe import OptimizerConfig  # noqa: E402
from qtemperate.trainer import evaluate  # noqa: E402
from qtemperate.training.lr_schedule import lr_at, set_lr  # noqa: E402
from qtemperate.training.optimizer import build_optimizer  # noqa: E402

DEVICE = torch.device("cpu")


def train(model: nn.Module, loader: DataLoader, sampler: EpochSeededSampler, steps: int, lr: float,
          epoch_seed: int) -> float:
    """``steps`` SGD steps (cosine from ``lr``), epochs re-shuffled; returns seconds."""
    opt = build_optimizer(model, OptimizerConfig(), lr)
    model.train()
    t0, step, ep = time.perf_counter(), 0, epoch_seed
    while step < steps:
        sampler.set_epoch(ep)
        for x, y in loader:
            set_lr(opt, lr_at(step, steps, lr))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            if step >= steps:
                break
        ep += 1
    model.eval()
    return time.perf_counter() - t0


def onnx_accuracy(path: Path, test_loader: DataLoader, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in test_loader:
        out = sess.run(None, {name: x.numpy().astype(np.float32)})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
        total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit-train", type=int, default=None, help="class-balanced slice (default: all 60k)")
    p.add_argument("--float-epochs", type=int, default=2)
    p.add_argument("--ft-fraction", type=float, default=0.25, help="fine-tuning per quantized step, in epochs")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="fraction of parameters kept")
    p.add_argument("--iters", type=int, default=50, help="benchmark_onnx timed runs per batch size")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "compression_stages.json")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    torch.manual_seed(0)
    t_start = time.perf_counter()

    bundle = build_datasets("fashion_mnist", limit_train=args.limit_train, seed=0)
    sampler = EpochSeededSampler(len(bundle.train), 0)
    loader = DataLoader(bundle.train, batch_size=128, sampler=sampler, drop_last=True)
    test_loader = DataLoader(bundle.test, batch_size=1000)
    calib = [b[0] for _, b in zip(range(20), DataLoader(bundle.train, batch_size=128, shuffle=False))]
    example = bundle.test[0][0].unsqueeze(0)
    steps_per_epoch = len(loader)
    ft_steps = max(1, round(args.ft_fraction * steps_per_epoch))
    steps: list[dict[str, Any]] = []

    def record(name: str, model: nn.Module, quantized: bool, train_s: float = 0.0, **extra: Any) -> None:
        acc, loss = evaluate(model, test_loader, DEVICE)
        size = model_size(model, example)
        row = {"step": name, "test_acc": acc, "test_loss": loss, "params": size.params, "macs": size.macs,
               "bytes": float(size.quantized_bytes if quantized else size.float_bytes),
               "float_bytes": size.float_bytes, "train_s": train_s, **extra}
        steps.append(row)
        print(f"[{time.perf_counter() - t_start:6.0f}s] {name:<22} acc {acc:.4f}  bytes {row['bytes']:>10.0f}  "
              f"params {size.params}  train {train_s:.0f}s", flush=True)

    model = build_model("resnet20", num_classes=10, in_channels=1)
    secs = train(model, loader, sampler, args.float_epochs * steps_per_epoch, 0.1, 0)
    record(f"float ({args.float_epochs} epochs)", model, False, secs)

    t0 = time.perf_counter()
    pruned, report = prune(model, example, target_params_ratio=args.prune_ratio, calibration_loader=calib)
    pruned.eval()
    record(f"pruned to {args.prune_ratio:g} params", pruned, False, 0.0,
           prune_s=time.perf_counter() - t0, achieved_ratio=report.achieved_ratio)

    t0 = time.perf_counter()
    q = quantize(pruned, 8, 8, calibration_loader=calib, calibration_batches=8).eval()
    record("W8A8 (calibrated)", q, True, 0.0, quantize_s=time.perf_counter() - t0)
    secs = train(q, loader, sampler, ft_steps, 0.01, 100)
    record(f"W8A8 + {args.ft_fraction:g} epoch FT", q, True, secs, ft_steps=ft_steps)
    w8_state = {k: v.clone() for k, v in q.state_dict().items()}

    set_bit_width(q, 4, 4)
    record("W4A4 (switched)", q, True)
    secs = train(q, loader, sampler, ft_steps, 0.01, 200)
    record(f"W4A4 + {args.ft_fraction:g} epoch FT", q, True, secs, ft_steps=ft_steps)

    # -- ONNX: float (unpruned, pruned) vs W8A8 vs W4A4 -----------------------------------
    w8 = quantize(pruned, 8, 8)
    w8.load_state_dict(w8_state)
    w8.eval()
    onnx: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("float_resnet20", model), ("float_pruned", pruned), ("w8a8", w8), ("w4a4", q)):
            path = export_onnx(m.eval(), Path(tmp) / f"{name}.onnx", example)
            xs = torch.stack([bundle.test[i][0] for i in range(1000)])
            rep = verify_onnx(path, m, xs)
            lat = benchmark_onnx(path, batch_sizes=(1, 64), warmup=10, iters=args.iters, threads=args.threads)
            onnx[name] = {"onnx_bytes": path.stat().st_size, "latency_ms": {str(k): v for k, v in lat.items()},
                          "top1_agreement_1000": rep.top1_agreement, "max_abs_diff": rep.max_abs_diff,
                          "onnx_test_acc": onnx_accuracy(path, test_loader, args.threads)}
            print(f"[{time.perf_counter() - t_start:6.0f}s] onnx {name:<15} {onnx[name]['onnx_bytes']:>8} B  "
                  f"b1 {lat[1]:.3f} ms  b64 {lat[64]:.2f} ms  acc {onnx[name]['onnx_test_acc']:.4f}", flush=True)
    f64 = onnx["float_resnet20"]["latency_ms"]["64"]
    p64 = onnx["float_pruned"]["latency_ms"]["64"]
    speedups = {
        name: {"vs_float_resnet20_b64": f64 / o["latency_ms"]["64"], "vs_float_pruned_b64": p64 / o["latency_ms"]["64"],
               "vs_float_resnet20_b1": onnx["float_resnet20"]["latency_ms"]["1"] / o["latency_ms"]["1"],
               "vs_float_pruned_b1": onnx["float_pruned"]["latency_ms"]["1"] / o["latency_ms"]["1"]}
        for name, o in onnx.items()
    }
    for name, s in speedups.items():
        print(f"speedup {name:<15} b64: {s['vs_float_resnet20_b64']:.2f}x vs float resnet20, "
              f"{s['vs_float_pruned_b64']:.2f}x vs pruned float", flush=True)
    payload = {
        "environment": environment(),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "train_images": len(bundle.train), "test_images": len(bundle.test),
        "steps_per_epoch": steps_per_epoch, "ft_steps": ft_steps,
        "steps": steps, "onnx": onnx, "speedups": speedups,
        "goal_quantized_1p5x_faster_b64": {k: speedups[k]["vs_float_resnet20_b64"] >= 1.5 for k in ("w8a8", "w4a4")},
        "threads": args.threads,
        "total_time_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
