"""Comparing finished runs: a size-vs-accuracy table, its Pareto front, and re-export.

A run is Pareto-optimal when no other run is both smaller (``compression_ratio``)
and at least as accurate (``student_acc``), with one of the two strictly better.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["compare_runs", "export_run", "pareto_front", "pareto_plot"]


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (is it a finished qtemperate run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FileNotFoundError(f"{path}: not valid JSON") from None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Flags of the points ``(size, accuracy)`` that no other point dominates."""
    flags = []
    for i, (si, ai) in enumerate(points):
        dominated = any(
            sj <= si and aj >= ai and (sj < si or aj > ai)
            for j, (sj, aj) in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def compare_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run (sorted by size) with a ``pareto`` flag."""
    rows = []
    for d in run_dirs:
        d = Path(d)
        s = _read_summary(d)
        lat = s.get("onnx_latency_ms") or {}
        rows.append(
            {
                "run": d.name,
                "run_dir": str(d),
                "recipe": s.get("recipe"),
                "teacher_acc": s["teacher_acc"],
                "student_acc": s["student_acc"],
                "acc_drop": s["acc_drop"],
                "compression_ratio": s["compression_ratio"],
                "student_bytes": s["student_bytes"],
                "params": s.get("params"),
                "latency_b1_ms": lat.get("1"),
            }
        )
    flags = pareto_front([(r["compression_ratio"], r["student_acc"]) for r in rows])
    for r, f in zip(rows, flags):
        r["pareto"] = f
    return sorted(rows, key=lambda r: r["compression_ratio"])


def pareto_plot(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Scatter of accuracy vs compression ratio, front joined by a line; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xs = [r["compression_ratio"] for r in rows]
    ys = [r["student_acc"] * 100 for r in rows]
    ax.scatter(xs, ys, c=["tab:red" if r["pareto"] else "tab:gray" for r in rows], zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r["pareto"])
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1, label="Pareto front")
        ax.legend(loc="lower right")
    teacher = {r["teacher_acc"] for r in rows}
    for t in teacher:
        ax.axhline(t * 100, color="tab:blue", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("student bytes / teacher float bytes (log)")
    ax.set_ylabel("student top-1 accuracy (%)")
    ax.set_title("qtemperate: size vs accuracy (dashed: teacher)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def export_run(run_dir: Path, batch_sizes: Sequence[int] = (1, 64), samples: int = 256) -> dict[str, Any]:
    """Rebuild a run's ``student.pt``, export ``student.onnx`` (and its int8 twin), verify and time it.

    The same export-and-check step as ``qtemperate run``
    (:func:`~qtemperate.export.check.export_and_check`), so the keys are
    ``summary.json``'s (``onnx_top1_agreement``, ``onnx_max_abs_diff``,
    ``onnx_latency_ms``, ``int8_onnx_latency_ms``, ...). ``top1_agreement`` and
    ``max_abs_diff`` are kept as deprecated aliases (removed in 0.3).

    Verification uses the run's own test data when it is available (the resolved
    ``recipe.yaml``), otherwise random inputs of the right shape (agreement then
    says less; ``verify_inputs`` says which).
    """
    import torch

    from qtemperate.checkpoint import load_checkpoint, load_student
    from qtemperate.export import export_and_check
    from qtemperate.recipe import RecipeError, load_recipe

    if not (run_dir / "student.pt").is_file():
        raise FileNotFoundError(f"{run_dir}: no student.pt (is it a finished qtemperate run?)")
    model, meta = load_student(run_dir / "student.pt")
    recipe = load_recipe(run_dir / "recipe.yaml")
    source = "random"
    try:
        from qtemperate.data import build_datasets

        d = recipe.data
        bundle = build_datasets(d.name, root=d.root, limit_test=samples, seed=recipe.seed, **d.kwargs)
        n = min(samples, len(bundle.test))
        inputs = torch.stack([bundle.test[i][0] for i in range(n)])
        source = d.name
    except (FileNotFoundError, ImportError, RecipeError):
        from qtemperate.preflight import dataset_info

        info = dataset_info(recipe.data.name, recipe.data.kwargs)
        inputs = torch.randn(samples, info.in_channels, *info.image_size)
    arch = load_checkpoint(run_dir / "student.pt").get("arch")  # float widths: the int8 speed-up
    report = export_and_check(model, run_dir, inputs, batch_sizes=batch_sizes, iters=20,
                              float_student=arch if isinstance(arch, torch.nn.Module) else None)
    return {
        **report,
        "weight_bits": meta["weight_bits"],
        "act_bits": meta["act_bits"],
        "verify_inputs": source,
        "top1_agreement": report["onnx_top1_agreement"],
        "max_abs_diff": report["onnx_max_abs_diff"],
    }
