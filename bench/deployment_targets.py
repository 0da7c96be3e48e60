"""Side-by-side int8 deployment: qtemperate vs the routes a user would take instead (issue 8).

Run (1 thread for every timed runtime; the timed section takes the shared measurement
lock itself, ``--lock``, so training and emulation do not hold it)::

    .venv/bin/python bench/deployment_targets.py --lock /work/wt/measure.lock \\
        --out bench/results/deployment_targets.json 2>&1 | tee bench/results/deployment_targets.log

ResNet-20 (1x28x28) trained briefly on a Fashion-MNIST slice, unpruned and pruned
(``round_to=8``). For each student, on the same test images:

* ``float``            — the float model (ONNX) in onnxruntime and in OpenVINO;
* ``qtemperate``       — W8A8 QAT (1 epoch, KD from the float model) for the detected
  target, its QDQ ONNX in onnxruntime and in OpenVINO;
* ``qtemperate_avx2``  — the same QAT for ``export.target: x86-avx2`` (7-bit weights);
* ``ort_u8s8`` / ``ort_u8s8_reduce`` — onnxruntime ``quantize_static`` (QDQ, per-channel
  s8 weights, u8 activations, MinMax on 256 images) without / with ``reduce_range``;
* ``nncf``             — NNCF post-training quantization of the float OpenVINO model
  (300 images), compiled by OpenVINO.

Figures: latency at batch 1 and 64 (1 thread; contenders interleaved in one process,
``--reps`` rounds, median of per-round medians), test accuracy, agreement (argmax) with the
model each file was derived from (qtemperate: its own PyTorch QAT model, exactness;
PTQ routes: the float model), ops left after onnxruntime's optimizer, and, with
``qemu-x86_64`` installed, the agreement of every onnxruntime int8 file on an emulated
Haswell (AVX2 without VNNI: the int16 pair-sum class) against its own unoptimized graph.
The CPU's flags and the load (``uptime``) are recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qtemperate.data import build_datasets
from qtemperate.export import export_onnx, optimized_op_types
from qtemperate.export.emulate import emulator_available, run_emulated
from qtemperate.export.targets import check_int16_saturation, cpu_info, detect_target
from qtemperate.losses import kd_loss
from qtemperate.models import build_model
from qtemperate.pruning import prune
from qtemperate.quantization import quantize


def _load(n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b = build_datasets("fashion_mnist", limit_train=n_train, limit_test=n_test, seed=0)
    xs = [torch.stack([s[i][0] for i in range(len(s))]) for s in (b.train, b.test)]
    ys = [torch.tensor([int(s[i][1]) for i in range(len(s))]) for s in (b.train, b.test)]
    return xs[0], ys[0], xs[1], ys[1]


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
           teacher: torch.nn.Module | None = None, seed: int = 0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(y) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - 127, 128):
            idx = perm[i : i + 128]
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x[idx])
                loss = 0.5 * loss + 0.5 * kd_loss(out, t, 4.0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
    model.eval()


def _ort(path: Path, threads: int, optimized: bool = True) -> Any:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                  else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})[0]


def _ov_compile(model_or_path: Any, batch: int, threads: int) -> Any:
    import openvino as ov

    core = ov.Core()
    m = core.read_model(str(model_or_path)) if isinstance(model_or_path, str | Path) else model_or_path.clone()
    m.reshape({m.inputs[0].get_any_name(): [batch, 1, 28, 28]})
    c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                                      "PERFORMANCE_HINT": "LATENCY"})
    req = c.create_infer_request()
    return lambda x: next(iter(req.infer({0: x}).values()))


def _ov_int8_layers(model_or_path: Any) -> dict[str, int]:
    import openvino as ov

    core = ov.Core()
    m = core.read_model(str(model_or_path)) if isinstance(model_or_path, str | Path) else model_or_path.clone()
    m.reshape({m.inputs[0].get_any_name(): [1, 1, 28, 28]})
    c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    cnt: Counter[str] = Counter()
    for op in c.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in ("Convolution", "FullyConnected", "MatMul"):
            prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
            cnt["int8" if prec in ("u8", "i8") else "float"] += 1
    return dict(cnt)


class _Calib:
    def __init__(self, x: np.ndarray, name: str) -> None:
        self.it = iter([{name: x[i : i + 32]} for i in range(0, len(x), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def _quantize_static(float_path: Path, out: Path, calib: np.ndarray, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(pre))
    quantize_static(str(pre), str(out), _Calib(calib, "input"), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=reduce_range)
    return out


def _nncf(float_path: Path, calib: np.ndarray) -> Any:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_path))
    model.reshape({model.inputs[0].get_any_name(): [1, 1, 28, 28]})
    ds = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    q = nncf.quantize(model, ds, subset_size=len(calib))
    q.reshape({q.inputs[0].get_any_name(): [-1, 1, 28, 28]})
    return q


def _predict(run: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def _ops(path: Path) -> dict[str, int]:
    ops = optimized_op_types(path)
    keep = ("QuantizeLinear", "DequantizeLinear", "Transpose", "QLinearConv", "QLinearAdd", "QGemm",
            "Conv", "FusedConv", "Gemm", "Add")
    return {k: ops[k] for k in keep if ops[k]}


def _time(runners: dict[str, dict[int, Any]], batches: tuple[int, ...], reps: int) -> dict[str, dict[str, float]]:
    """Median over ``reps`` interleaved rounds of each contender's per-round median (ms)."""
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, 1, 28, 28)).astype(np.float32) for b in batches}
    iters = {1: 60, 64: 8}
    per: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in runners}
    for b in batches:
        for fns in runners.values():
            for _ in range(3):
                fns[b](xs[b])
    for _ in range(reps):
        for b in batches:
            for k, fns in runners.items():
                ts = []
                for _ in range(iters.get(b, 10)):
                    t0 = time.perf_counter()
                    fns[b](xs[b])
                    ts.append((time.perf_counter() - t0) * 1e3)
                per[k][b].append(statistics.median(ts))
    return {k: {str(b): statistics.median(v[b]) for b in batches} for k, v in per.items()}


@contextlib.contextmanager
def _locked(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/deployment_targets.json")
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--emulate-samples", type=int, default=128)
    ap.add_argument("--lock", default=None, help="flock this file around the timed section")
    ap.add_argument("--no-emulate", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.time()
    host = detect_target()
    result: dict[str, Any] = {
        "command": " ".join(sys.argv), "cpu": cpu_info().to_dict(), "detected_target": host,
        "threads": args.threads, "load_start": _uptime(), "students": {},
    }
    import nncf
    import onnxruntime
    import openvino

    result["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                          "openvino": openvino.__version__, "nncf": nncf.__version__}
    xtr, ytr, xte, yte = _load(args.train, args.test)
    calib_t = [xtr[i : i + 64] for i in range(0, 512, 64)]
    calib_np = xtr[:256].numpy()
    float_model = build_model("resnet20", num_classes=10, in_channels=1)
    _train(float_model, xtr, ytr, args.epochs, 0.1)
    pruned, rep = prune(float_model, xtr[:8], target_params_ratio=0.35, calibration_loader=calib_t,
                        round_to=8, iterative_steps=8)
    _train(pruned, xtr, ytr, 1, 0.02, teacher=float_model, seed=1)
    print(f"[{time.time() - t0:.0f}s] float trained; pruned to {rep.achieved_ratio:.3f} of the params", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="qt_deploy_"))
    x_np, y_np = xte.numpy(), yte.numpy()
    emulated_files: dict[str, Path] = {}
    for sname, fm in (("unpruned", float_model), ("pruned", pruned)):
        widths = [m.out_channels for m in fm.modules() if isinstance(m, torch.nn.Conv2d)]
        row: dict[str, Any] = {"conv_widths": sorted(set(widths)),
                               "params": sum(p.numel() for p in fm.parameters())}
        fpath = export_onnx(fm, tmp / f"{sname}_float.onnx", xte[:1])
        with torch.no_grad():
            ref_float = fm(xte).argmax(1).numpy()
        paths: dict[str, Path] = {"float": fpath}
        own_ref: dict[str, np.ndarray] = {}
        for label, target in (("qtemperate", host), ("qtemperate_avx2", "x86-avx2")):
            q = quantize(fm, calibration_loader=calib_t, calibration_batches=8, target=target)
            _train(q, xtr, ytr, 1, 0.005, teacher=fm, seed=2)
            paths[label] = export_onnx(q, tmp / f"{sname}_{label}.onnx", xte[:1])
            with torch.no_grad():
                own_ref[label] = q(xte).argmax(1).numpy()
            row[f"{label}_pytorch_acc"] = float((own_ref[label] == y_np).mean())
            row[f"{label}_int16_rule"] = check_int16_saturation(paths[label], "x86-avx2").to_dict()
        paths["ort_u8s8"] = _quantize_static(fpath, tmp / f"{sname}_ort_u8s8.onnx", calib_np, False)
        paths["ort_u8s8_reduce"] = _quantize_static(fpath, tmp / f"{sname}_ort_u8s8_reduce.onnx", calib_np, True)
        nncf_model = _nncf(fpath, calib_np[:300])
        print(f"[{time.time() - t0:.0f}s] {sname}: files ready", flush=True)
        # accuracy / agreement / ops (not timed)
        routes: dict[str, Any] = {}
        for label, p in paths.items():
            pred = _predict(_ort(p, args.threads), x_np).argmax(1)
            routes[f"ort:{label}"] = {
                "acc": float((pred == y_np).mean()),
                "agreement_float": float((pred == ref_float).mean()),
                "agreement_own_pytorch": float((pred == own_ref[label]).mean()) if label in own_ref else None,
                "ops_after_optimization": _ops(p),
                "onnx_bytes": p.stat().st_size,
            }
        for label, src in (("float", fpath), ("qtemperate", paths["qtemperate"]), ("nncf", nncf_model)):
            pred = _predict(_ov_compile(src, 64, args.threads), x_np[: (len(x_np) // 64) * 64]).argmax(1)
            n = len(pred)
            routes[f"openvino:{label}"] = {
                "acc": float((pred == y_np[:n]).mean()),
                "agreement_float": float((pred == ref_float[:n]).mean()),
                "agreement_own_pytorch": float((pred == own_ref[label][:n]).mean()) if label in own_ref else None,
                "int8_layers": _ov_int8_layers(src),
            }
        row["routes"] = routes
        # latency: every contender interleaved, 1 thread
        runners = {f"ort:{k}": {b: _ort(p, args.threads) for b in (1, 64)} for k, p in paths.items()}
        for label, src in (("float", fpath), ("qtemperate", paths["qtemperate"]), ("nncf", nncf_model)):
            runners[f"openvino:{label}"] = {b: _ov_compile(src, b, args.threads) for b in (1, 64)}
        with _locked(args.lock):
            row["load_before_timing"] = _uptime()
            lat = _time(runners, (1, 64), args.reps)
            row["load_after_timing"] = _uptime()
        row["latency_ms"] = lat
        row["speedup_vs_ort_float"] = {k: {b: lat["ort:float"][b] / v[b] for b in v} for k, v in lat.items()}
        result["students"][sname] = row
        for label in ("qtemperate", "qtemperate_avx2", "ort_u8s8", "ort_u8s8_reduce"):
            emulated_files[f"{sname}:{label}"] = paths[label]
        print(f"[{time.time() - t0:.0f}s] {sname}: {json.dumps(lat)}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.no_emulate and emulator_available():
        xs = x_np[: args.emulate_samples]
        keys = list(emulated_files)
        graph = {k: _ort(emulated_files[k], args.threads, optimized=False)(xs) for k in keys}
        t1 = time.time()
        outs = run_emulated([emulated_files[k] for k in keys], xs)
        emu = {}
        for k, o in zip(keys, outs):
            emu[k] = {"agreement_with_graph": float((o[0].argmax(1) == graph[k].argmax(1)).mean()),
                      "max_abs_diff_with_graph": float(np.abs(o[0] - graph[k]).max()),
                      "acc": float((o[0].argmax(1) == y_np[: len(xs)]).mean())}
        result["emulated_haswell"] = {"samples": len(xs), "seconds": time.time() - t1, "files": emu}
        print(f"[{time.time() - t0:.0f}s] emulated Haswell: {json.dumps(emu)}", flush=True)
    result["wall_s"] = time.time() - t0
    result["load_end"] = _uptime()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
