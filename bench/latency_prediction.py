"""How far the latency table's prediction is from a real measurement, per model and runtime.

For ResNet-20 (``qtemperate.models``) and the two models the latency tests prune
(``tests/test_latency.py``: a MobileNetV2-style and a ResNet-style network qtemperate
did not build), unpruned and pruned to a latency target (``0.7 x`` the unpruned int8
ratio), the script predicts the int8 student (``quantize`` -> ``export_onnx``: the QDQ
file a run exports) and the float teacher from one latency table, measures both files
interleaved (median of ``--iters`` runs, 1 thread, batch 1) and prints the relative
errors of the student, the teacher and their ratio.

Run::

    python bench/latency_prediction.py --runtimes onnxruntime,openvino --out bench/results/latency_prediction.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtemperate.export import export_onnx
from qtemperate.export.targets import cpu_info
from qtemperate.latency import LatencySpec, LatencyTable, latency_context, predict_latency
from qtemperate.models import build_model
from qtemperate.pruning import UnreachableTarget, prune
from qtemperate.quantization import quantize
from tests.test_latency import TinyMobileNetV2, TinyResNet


def interleaved_ms(runtime: str, paths: list[Path], iters: int) -> list[float]:
    """Median ms per file, one run of each in turn (load changes hit all alike)."""
    import onnx

    from qtemperate.latency import _Graph

    graphs = [_Graph(runtime, onnx.load(str(p)), 1) for p in paths]
    for g in graphs:
        for _ in range(10):
            g.run()
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(iters):
        for k, g in enumerate(graphs):
            t = time.perf_counter()
            g.run()
            times[k].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtimes", default="onnxruntime")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--table", type=Path, default=None, help="latency table file (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    x = torch.randn(1, 3, 32, 32)
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    models = {"resnet20": lambda: build_model("resnet20", num_classes=10, in_channels=3),
              "tiny_mobilenetv2": TinyMobileNetV2, "tiny_resnet": TinyResNet}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table_path = args.table or Path(tmp) / "table.json"
        for runtime in args.runtimes.split(","):
            ctx = latency_context(runtime)
            for name, make in models.items():
                torch.manual_seed(0)
                teacher = make().eval()
                table = LatencyTable(table_path)
                base = predict_latency(teacher, x, table, runtime).total_ms
                t_pred = predict_latency(teacher, x, table, runtime, int8=False).total_ms
                goal = round(0.7 * base / t_pred, 3)
                spec = LatencySpec(runtime, path=table_path)
                try:
                    student, _ = prune(teacher, x, target_latency_ratio=goal, iterative_steps=1, latency=spec)
                except UnreachableTarget as exc:  # this runtime's kernels gain less: aim just above the floor
                    goal = round(1.1 * exc.smallest, 3)
                    student, _ = prune(teacher, x, target_latency_ratio=goal, iterative_steps=1, latency=spec)
                t_path = export_onnx(teacher, Path(tmp) / f"{name}_t.onnx", x)
                for label, model in (("unpruned", teacher), (f"pruned to {goal}", student)):
                    q = quantize(model.eval(), calibration_loader=calib, calibration_batches=2, target="auto").eval()
                    s_path = export_onnx(q, Path(tmp) / f"{name}_s.onnx", x)
                    s_pred = predict_latency(model, x, table, runtime).total_ms
                    s_real, t_real = interleaved_ms(runtime, [s_path, t_path], args.iters)
                    row = {"runtime": runtime, "model": name, "student": label,
                           "student_pred_ms": s_pred, "student_real_ms": s_real,
                           "teacher_pred_ms": t_pred, "teacher_real_ms": t_real,
                           "student_err": s_pred / s_real - 1, "teacher_err": t_pred / t_real - 1,
                           "ratio_pred": s_pred / t_pred, "ratio_real": s_real / t_real}
                    row["ratio_err"] = row["ratio_pred"] / row["ratio_real"] - 1
                    rows.append(row)
                    print(f"{runtime:11s} {name:16s} {label:16s} student {s_pred:.3f}/{s_real:.3f} ms "
                          f"({row['student_err']:+.1%}), teacher {t_pred:.3f}/{t_real:.3f} ms "
                          f"({row['teacher_err']:+.1%}), ratio {row['ratio_pred']:.3f}/{row['ratio_real']:.3f} "
                          f"({row['ratio_err']:+.1%})", flush=True)
            print(f"  ({ctx.cpu}, {ctx.runtime} {ctx.version}, 1 thread, batch 1; predicted/real)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_info().to_dict(), "iters": args.iters, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
