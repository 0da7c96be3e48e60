"""onnxruntime int8 vs float on one CPU, quickly: ResNet-20, 1 thread, interleaved, per-op time.

A lighter companion of ``bench/deployment_targets.py`` (which trains, prunes, and compares
every route): latency does not depend on training, so this script builds ResNet-20
(``build_model("resnet20", in_channels=1)``), estimates its BatchNorm statistics on
Fashion-MNIST (random data when the files are absent), quantizes it W8A8 for this CPU's
deployment target, exports the float and the int8 (QDQ) file, and times both in
onnxruntime (default optimized session, 1 thread), interleaved round by round, at batch
1 and 64. It then profiles one session of each and reports the time per operator type,
and checks the int8 file against its own unoptimized graph (argmax agreement, max |Δ|).

Run::

    python bench/ort_int8_speedup.py --rounds 15 --out bench/results/ort_int8_speedup.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from conftest import write_json  # noqa: E402

from qtemperate.export import export_onnx  # noqa: E402
from qtemperate.export.targets import detect_target  # noqa: E402
from qtemperate.models import build_model  # noqa: E402
from qtemperate.quantization import quantize  # noqa: E402


def _images(n: int) -> tuple[torch.Tensor, str]:
    try:
        from qtemperate.data import build_datasets

        ds = build_datasets("fashion_mnist", limit_train=n, limit_test=16, seed=0).train
        return torch.stack([ds[i][0] for i in range(n)]), "Fashion-MNIST"
    except FileNotFoundError:
        return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)), "random"


def _session(path: Path, threads: int, optimized: bool = True, profile: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _op_times(path: Path, x: np.ndarray, threads: int, runs: int, prefix: str) -> dict[str, float]:
    """Milliseconds per run spent in each operator type (onnxruntime's profiler)."""
    s = _session(path, threads, profile=prefix)
    name = s.get_inputs()[0].name
    for _ in range(runs):
        s.run(None, {name: x})
    events = json.loads(Path(s.end_profiling()).read_text())
    per: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"].get("op_name", "?")] += e["dur"]
    return {op: us / runs / 1e3 for op, us in per.most_common()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, data = _images(512)
    torch.manual_seed(0)
    fm = build_model("resnet20", num_classes=10, in_channels=1).train()
    with torch.no_grad():
        for b in x.split(64):  # BatchNorm statistics from data: realistic activation ranges
            fm(b)
    fm.eval()
    target = detect_target()
    q = quantize(fm, 8, 8, calibration_loader=list(x.split(64)), calibration_batches=4, target=target).eval()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = {"float": export_onnx(fm, d / "float.onnx", x[:1]), "int8": export_onnx(q, d / "int8.onnx", x[:1])}
        sessions = {k: _session(p, args.threads) for k, p in files.items()}
        name = sessions["int8"].get_inputs()[0].name
        xs = x[:256].numpy()
        deployed = sessions["int8"].run(None, {name: xs})[0]
        graph = _session(files["int8"], args.threads, optimized=False).run(None, {name: xs})[0]
        exact = {"agreement": float((deployed.argmax(1) == graph.argmax(1)).mean()),
                 "max_abs_diff": float(np.abs(deployed - graph).max())}
        latency: dict[str, dict[str, float]] = {}
        for batch, n in ((1, 200), (64, 10)):
            xb = x[:batch].numpy()
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for s in sessions.values():
                for _ in range(3):
                    s.run(None, {name: xb})
            for _ in range(args.rounds):
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    for _ in range(n):
                        s.run(None, {name: xb})
                    times[k].append((time.perf_counter() - t0) / n * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            latency[f"b{batch}"] = {**{f"{k}_ms": v for k, v in med.items()},
                                    "int8_speedup": med["float"] / med["int8"]}
            print(f"batch {batch:>2}: float {med['float']:.3f} ms, int8 {med['int8']:.3f} ms, "
                  f"int8 speed-up {med['float'] / med['int8']:.2f}x")
        ops = {k: _op_times(p, x[:64].numpy(), args.threads, 20, str(d / k)) for k, p in files.items()}
    for k, per in ops.items():
        total = sum(per.values())
        print(f"{k} at batch 64, per op type: " + ", ".join(f"{op} {ms:.2f} ms ({100 * ms / total:.0f}%)"
                                                           for op, ms in list(per.items())[:5]))
    print(f"int8 deployed vs its graph: agreement {exact['agreement']:.3f}, max |d| {exact['max_abs_diff']:.4f}")
    out = {"setup": f"resnet20(in_channels=1) untrained, BN statistics from {data}, W8A8 for target {target}, "
                    f"{args.threads} thread(s), {args.rounds} interleaved rounds (200 runs at b1, 10 at b64)",
           "target": target, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
           "latency": latency, "ms_per_op_type_b64": ops, "int8_deployed_vs_graph": exact}
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
