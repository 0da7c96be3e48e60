"""Latency of a finished run's ONNX files in onnxruntime and OpenVINO, side by side.

    python bench/quickstart_latency.py runs/fashion_mnist_quickstart [--out bench/results/x.json]

Times ``teacher.onnx``, ``student_float.onnx`` and ``student_int8.onnx`` (the deployed
file) at batch 1 and 64 with 1 thread (medians of 50 after 10 warm-up runs) and prints the
int8 student's speed-up over the float teacher per runtime and batch size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtemperate.export import benchmark_onnx
from qtemperate.export.openvino import benchmark_openvino

FILES = ("teacher.onnx", "student_float.onnx", "student_int8.onnx")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out: dict[str, dict[str, dict[int, float]]] = {}
    for f in FILES:
        path = args.run_dir / f
        out[f] = {"onnxruntime": benchmark_onnx(path, (1, 64), warmup=10, iters=args.iters, threads=1),
                  "openvino": benchmark_openvino(path, (1, 64), warmup=10, iters=args.iters, threads=1)}
        print(f, {rt: {b: f"{ms:.3f} ms" for b, ms in r.items()} for rt, r in out[f].items()}, flush=True)
    t, s = out["teacher.onnx"], out["student_int8.onnx"]
    speed = {rt: {b: t[rt][b] / s[rt][b] for b in (1, 64)} for rt in t}
    print("int8 student vs float teacher:", {rt: {b: f"x{v:.2f}" for b, v in r.items()} for rt, r in speed.items()})
    if args.out is not None:
        args.out.write_text(json.dumps({"latency_ms": out, "speedup_vs_teacher": speed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
