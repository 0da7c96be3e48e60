"""Planning time of ``recipes/resnet50_1of8.yaml``: in-process and the CLI's wall time.

In one process, alternating (so machine noise falls on both), at 1 torch thread:

* ``widths``: :func:`qtemperate.planner.plan_recipe` as shipped — bytes from the pruned
  widths (:mod:`qtemperate.quant_layout`), one DepGraph for the whole ratio search
  (:class:`qtemperate.pruning.ChannelPruner`);
* ``quantize``: the same planner made to work as before: every candidate quantized with
  Brevitas to count its bytes, every trial pruning a copy with a fresh DepGraph.

Both must return the same plan (checked). Then ``qtemperate plan <recipe>`` is run as a
subprocess a few times: the CLI's own "since the command started" figure and the wall
time around the subprocess (interpreter start and exit included). Process CPU time is
reported beside every wall time (on a loaded machine the CPU time is what an idle core
would take).

Run::

    flock /work/wt/measure.lock python bench/plan_time.py --rounds 3 --out bench/results/plan_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from conftest import environment  # noqa: E402

import qtemperate.planner as planner  # noqa: E402
import qtemperate.pruning as pruning  # noqa: E402
from qtemperate.recipe import load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "resnet50_1of8.yaml"


def _plan(old_way: bool) -> tuple[dict[str, Any], float, float]:
    layout, ops = planner.quant_layout, pruning._STATELESS_OPS
    if old_way:
        planner.quant_layout = lambda model: None  # type: ignore[assignment]
        pruning._STATELESS_OPS = ()  # type: ignore[assignment]
    try:
        w, c = time.perf_counter(), time.process_time()
        out = planner.plan_recipe(load_recipe(RECIPE))
        return out, time.perf_counter() - w, time.process_time() - c
    finally:
        planner.quant_layout, pruning._STATELESS_OPS = layout, ops


def _cli(threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    w = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qtemperate.cli", "plan", str(RECIPE)], capture_output=True,
                          text=True, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - w
    m = re.search(r"planned in ([\d.]+) s \(([\d.]+) s since the command started\)", proc.stdout)
    assert m, proc.stdout
    return {"wall_outside_s": wall, "in_process_s": float(m.group(1)), "since_start_s": float(m.group(2))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cli-runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    _plan(False)  # warm-up (imports inside the planner, oneDNN primitives)
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ("widths", "quantize")}
    plans: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for name, old in (("widths", False), ("quantize", True)):
            out, wall, cpu = _plan(old)
            out.pop("seconds")
            plans[name] = out
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    assert plans["widths"] == plans["quantize"], "the two planners disagree"
    cli = [_cli(1) for _ in range(args.cli_runs)]
    load_after = os.getloadavg()
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    cli_med = {k: statistics.median(r[k] for r in cli) for k in cli[0]}
    for k, d in med.items():
        print(f"plan_recipe {k:<9} wall {d['wall']:6.2f} s   cpu {d['cpu']:6.2f} s")
    print(f"speed-up (wall) {med['quantize']['wall'] / med['widths']['wall']:.1f}x, "
          f"(cpu) {med['quantize']['cpu'] / med['widths']['cpu']:.1f}x")
    print(f"qtemperate plan (1 thread): in-process {cli_med['in_process_s']:.2f} s, since the command started "
          f"{cli_med['since_start_s']:.2f} s, wall around the process {cli_med['wall_outside_s']:.2f} s")
    print(f"load average before {load_before}, after {load_after}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "environment": environment(), "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
            "recipe": str(RECIPE.relative_to(ROOT)), "load_avg_before": load_before, "load_avg_after": load_after,
            "median": med, "samples": times, "cli_runs": cli, "cli_median": cli_med,
            "plans_identical": True, "plan": plans["widths"],
        }, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
