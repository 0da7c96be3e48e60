"""int8 and float convolution latency against channel count: the data behind ``kernel_friendly_round_to``.

For every channel count ``c`` in 4..64 a one-layer graph of :mod:`qtemperate.latency`
(``c -> c`` channels; 3x3 and 1x1 on a 16x16 input; batch 1, 1 thread) is timed in each
runtime with the table's own measurement (profiled node time minus the profiler's
per-node cost), ``--rounds`` times with fresh tables, and the median kept. The script
prints, per runtime, precision and layer, the latency of every width and, for each
multiple ``m`` in 1, 2, 4, 8, 16, how often a width that is a multiple of ``m`` runs
slower than some wider width (a pruned layer slower than an unpruned twin).

Run::

    python bench/latency_round_to.py --rounds 3 --out bench/results/latency_round_to.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtemperate.export.targets import cpu_info
from qtemperate.latency import LatencyTable, LayerSignature, latency_context

CHANNELS = range(4, 65)
MULTIPLES = (1, 2, 4, 8, 16)


def layer(c: int, k: int, hw: int) -> LayerSignature:
    p = k // 2
    return LayerSignature("conv", c, c, (k, k), (1, 1), (p, p, p, p), (1, 1), 1, (hw, hw))


def slower_than_wider(times: dict[int, float], m: int, tol: float) -> list[int]:
    """Widths that are multiples of ``m`` and run more than ``tol`` slower than some wider width."""
    widths = sorted(times)
    return [c for c in widths if c % m == 0
            and any(times[c] > times[w] * (1 + tol) for w in widths if w > c)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hw", type=int, default=16)
    ap.add_argument("--runtimes", default="onnxruntime,openvino")
    ap.add_argument("--precisions", default="int8,float")
    ap.add_argument("--tol", type=float, default=0.05, help="noise allowance of 'slower'")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    info = cpu_info()
    results: dict[str, object] = {
        "cpu": info.to_dict(), "python": platform.python_version(), "hw": args.hw, "rounds": args.rounds,
        "tol": args.tol, "runs": {},
    }
    for runtime in args.runtimes.split(","):
        ctx = latency_context(runtime, 1, 1)
        results["version_" + runtime] = ctx.version
        for precision in args.precisions.split(","):
            int8 = precision == "int8"
            for k in (3, 1):
                rounds = []
                for _ in range(args.rounds):
                    table = LatencyTable()
                    rounds.append({c: table.layer_ms(ctx, int8, layer(c, k, args.hw)) * 1e3 for c in CHANNELS})
                times = {c: statistics.median(r[c] for r in rounds) for c in CHANNELS}
                name = f"{runtime}/{precision}/{k}x{k}"
                bad = {m: slower_than_wider(times, m, args.tol) for m in MULTIPLES}
                results["runs"][name] = {"us": times, "slower_than_wider": bad}  # type: ignore[index]
                print(f"{name} ({ctx.cpu}, {ctx.runtime} {ctx.version}), µs per width:")
                print("  " + " ".join(f"{c}:{times[c]:.1f}" for c in CHANNELS))
                for m in MULTIPLES:
                    print(f"  multiples of {m:2d} slower than a wider width: {bad[m]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
