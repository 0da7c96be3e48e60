"""1 process x batch B vs N processes x B/N (gloo, CPU): the same recipe, side by side.

    python bench/data_parallel.py recipes/fashion_mnist_quickstart.yaml --nproc 2 \\
        [--seeds 0 1] [--set KEY=VALUE ...] [--out bench/results/data_parallel.json]

For each seed: the recipe run by one process (``data.batch_size`` as written) and by
``--nproc`` processes through ``qtemperate run --nproc`` (the same global batch), one
torch thread per process. Reports teacher/student accuracy, per-epoch test accuracy and
loss, the first teacher epoch's test loss, and wall time. Extra seeds of the single
process give the run-to-run spread the difference should be compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(recipe: str, sets: list[str], nproc: int, run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qtemperate", "run", recipe, "--run-dir", str(run_dir), "--no-progress", "--offline"]
    for s in sets:
        cmd += ["--set", s]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "nproc": nproc,
        "teacher_acc": summary["teacher_acc"],
        "student_acc": summary["student_acc"],
        "compression_ratio": summary["compression_ratio"],
        "teacher_test_loss": [r["teacher/test_loss"] for r in rows if "teacher/test_loss" in r],
        "epoch_test_acc": [r["test/acc"] for r in rows if "test/acc" in r],
        "epoch_test_loss": [r["test/loss"] for r in rows if "test/loss" in r],
        "stage_start_val_loss": [r["stage/start_val_loss"] for r in rows if "stage/start_val_loss" in r],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--spread-seeds", type=int, nargs="*", default=[], help="extra single-process seeds")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result: dict[str, Any] = {"recipe": args.recipe, "set": args.set, "runs": [], "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            sets = [*args.set, f"seed={seed}"]
            for n in (1, args.nproc):
                rec = _run(args.recipe, sets, n, Path(tmp) / f"s{seed}-n{n}")
                rec["seed"] = seed
                result["runs"].append(rec)
                print(json.dumps(rec), flush=True)
        for seed in args.spread_seeds:
            rec = _run(args.recipe, [*args.set, f"seed={seed}"], 1, Path(tmp) / f"spread{seed}")
            rec["seed"] = seed
            rec["spread"] = True
            result["runs"].append(rec)
            print(json.dumps(rec), flush=True)
    result["load_after"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
