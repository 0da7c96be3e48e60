"""The GPU path on one GPU in under 10 minutes; every figure written as JSON.

    python bench/gpu_check.py --out bench/results/gpu_check.json      # a CUDA machine
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check.json      # anywhere, small, CPU

Sections (each timed; a section that fails records its error and the others still run):

1. ``quickstart``: ``recipes/fashion_mnist_quickstart.yaml`` on CUDA (``device: auto``
   must pick it), through the CLI: accuracies, wall time, ONNX latencies. Without the
   Fashion-MNIST files it runs on the ``synthetic`` dataset at the same shape (noted).
2. ``qat_steps``: one training step (forward, cross-entropy, backward, SGD) of ResNet-50
   at batch 128, 224x224: float in fp32, fp32 + channels_last and bf16 autocast +
   channels_last; W8A8 and W4A4 Brevitas QAT in fp32 and under bf16 autocast. Median
   ms over timed steps after warm-up, ratio to the float fp32 step, peak memory; for
   QAT under autocast also how far its logits move from the fp32 ones (top-1 agreement
   and max |Δ| / max |fp32| on the batch) — the measurement that decides whether
   ``precision.qat: bf16`` is worth it.
3. ``torchrun_smoke``: ``python -m torch.distributed.run --standalone --nproc_per_node 1
   -m qtemperate run recipes/cifar100_resnet56_resnet20.yaml`` on the ``synthetic``
   dataset (CIFAR-100 shape) with one epoch per phase.
4. ``decode``: ImageNet-style JPEG decoding, images/s per DataLoader worker
   (``bench/imagenet_decode.py``).

``--dry-run`` keeps the structure and shrinks everything (digits instead of the
quickstart, ResNet-20 at batch 8 on 32x32, tiny synthetic sets, 16 JPEGs) so the tests
run the whole script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def environment() -> dict[str, Any]:
    import brevitas

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "brevitas": brevitas.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load": os.getloadavg(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                   bf16_supported=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
    return env


def _cli(args: list[str], timeout: float, launcher: list[str] | None = None) -> tuple[int, str, float]:
    cmd = [sys.executable, *(launcher or []), "-m", "qtemperate", "run", *args, "--no-progress", "--offline"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:], time.perf_counter() - t0


def _summary(run_dir: Path) -> dict[str, Any]:
    s = json.loads((run_dir / "summary.json").read_text())
    keep = ("teacher_acc", "student_acc", "compression_ratio", "wall_time_s", "onnx_latency_ms",
            "int8_onnx_latency_ms", "teacher_onnx_latency_ms", "onnx_top1_agreement")
    return {k: s.get(k) for k in keep}


def quickstart(dry: bool, tmp: Path) -> dict[str, Any]:
    from qtemperate.data import check_data_available

    run_dir = tmp / "quickstart"
    if dry:
        sets = ["data.name=digits", "data.limit_train=null", "data.limit_test=null", "teacher.checkpoint=null",
                "teacher.train={epochs: 1, lr: 0.1}",
                "stages.0.epochs=1", "stages.1.epochs=1", "export.benchmark_iters=2", "export.batch_sizes=[1]"]
        note = "dry run: sklearn digits on the CPU"
    else:
        sets, note = [], "Fashion-MNIST"
        try:
            check_data_available("fashion_mnist", None)
        except (FileNotFoundError, ImportError):
            sets = ["data.name=synthetic", "data.limit_train=null", "data.limit_test=null",
                    "data.kwargs={num_classes: 10, in_channels: 1, image_size: 28, n_train: 12000, n_test: 2000}",
                    # the shipped teacher knows Fashion-MNIST, not this data: train one here
                    "teacher.checkpoint=null", "teacher.train={epochs: 4, lr: 0.1}"]
            note = "Fashion-MNIST files absent: synthetic data of the same shape"
    args = ["recipes/fashion_mnist_quickstart.yaml", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    code, tail, wall = _cli(args, timeout=400)
    out: dict[str, Any] = {"exit": code, "invocation_s": round(wall, 1), "data": note}
    if code == 0:
        out.update(_summary(run_dir))
        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        out["output_tail"] = tail
    return out


def _time_steps(step: Callable[[], None], warmup: int, iters: int, cuda: bool) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def qat_steps(dry: bool) -> dict[str, Any]:
    from qtemperate.models import build_model
    from qtemperate.quantization import quantize, set_bit_width

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if dry:
        name, batch, size, kw, warmup, iters = "resnet20", 8, 32, {"num_classes": 10, "in_channels": 3}, 1, 3
    else:
        name, batch, size, kw, warmup, iters = "resnet50", 128, 224, {"num_classes": 1000, "in_channels": 3}, 5, 20
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, kw["num_classes"], (batch,), generator=gen).to(device)
    amp = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16

    def step_fn(model: torch.nn.Module, dtype: torch.dtype | None, channels_last: bool) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(inp)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def measure(label: str, model: torch.nn.Module, dtype: torch.dtype | None, channels_last: bool = False) -> dict[str, Any]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = _time_steps(step_fn(model, dtype, channels_last), warmup, iters, cuda)
        rec: dict[str, Any] = {"config": label, "step_ms": round(ms, 2)}
        if cuda:
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return rec

    torch.manual_seed(0)
    base = build_model(name, **kw).to(device)
    rows = [measure("float fp32", base, None)]
    cl = build_model(name, **kw).to(device).to(memory_format=torch.channels_last)
    rows.append(measure("float fp32 channels_last", cl, None, True))
    rows.append(measure(f"float {str(amp)[6:]} autocast channels_last", cl, amp, True))
    calib = [x[: max(2, batch // 4)]]
    for wb, ab in ((8, 8), (4, 4)):
        q = quantize(build_model(name, **kw).to(device), 8, 8, calibration_loader=calib, calibration_batches=1).to(device)
        if wb < 8:
            set_bit_width(q, wb, ab)
        rows.append(measure(f"W{wb}A{ab} fp32", q, None))
        rows.append(measure(f"W{wb}A{ab} {str(amp)[6:]} autocast", q, amp))
        q.eval()
        with torch.no_grad():
            ref = q(x).float()
            with torch.autocast(device.type, dtype=amp):
                low = q(x).float()
        rows[-1]["top1_agreement_vs_fp32"] = float((ref.argmax(1) == low.argmax(1)).float().mean())
        rows[-1]["max_rel_logit_change"] = float((ref - low).abs().max() / ref.abs().max().clamp(min=1e-12))
    float_ms = rows[0]["step_ms"]
    for r in rows:
        r["vs_float_fp32"] = round(r["step_ms"] / float_ms, 3)
    return {"model": name, "batch": batch, "image": size, "device": str(device), "warmup": warmup,
            "timed_steps": iters, "rows": rows}


def torchrun_smoke(dry: bool, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / "cifar_smoke"
    n_train, n_test = (128, 64) if dry else (4096, 1000)
    sets = [
        "data.name=synthetic", "data.root=null",
        f"data.kwargs={{num_classes: 100, in_channels: 3, image_size: 32, n_train: {n_train}, n_test: {n_test}}}",
        "teacher.train.epochs=1", "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1",
        "tracking.loggers=[jsonl]", "export.benchmark=false", "export.verify_samples=64",
    ]
    if dry:  # a ResNet-56 epoch is minutes on a CPU: a ResNet-8 teacher, one step per epoch
        # ~1 sample per class: no class-balanced validation split can be carved
        sets += ["data.num_workers=0", "data.eval_batch_size=64", "teacher.model=resnet8", "data.val_fraction=0"]
    args = ["recipes/cifar100_resnet56_resnet20.yaml", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    code, tail, wall = _cli(args, timeout=400, launcher=launcher)
    out: dict[str, Any] = {"exit": code, "invocation_s": round(wall, 1), "n_train": n_train}
    if code == 0:
        out.update(_summary(run_dir))
    else:
        out["output_tail"] = tail
    return out


def decode(dry: bool) -> dict[str, Any]:
    from bench.imagenet_decode import run

    if dry:
        return run(images=16, workers=(0, 1))
    workers = tuple(w for w in (1, 2, 4, 8) if w <= (os.cpu_count() or 1))
    return run(images=512, workers=workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="qtemperate's GPU path, checked and timed")
    p.add_argument("--dry-run", action="store_true", help="small sizes on whatever device there is (tests)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    p.add_argument("--only", nargs="+", choices=["quickstart", "qat_steps", "torchrun_smoke", "decode"])
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run for the small CPU version", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(), "sections": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "quickstart": lambda: quickstart(args.dry_run, tmp),
            "qat_steps": lambda: qat_steps(args.dry_run),
            "torchrun_smoke": lambda: torchrun_smoke(args.dry_run, tmp),
            "decode": lambda: decode(args.dry_run),
        }
        for name, fn in sections.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                rec = fn()
            except Exception as exc:
                rec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            rec["section_s"] = round(time.perf_counter() - t0, 1)
            result["sections"][name] = rec
            print(f"{name}: {json.dumps(rec)[:600]}", flush=True)
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"total {result['total_s']} s -> {args.out}")
    failed = [n for n, r in result["sections"].items() if "error" in r or r.get("exit", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
