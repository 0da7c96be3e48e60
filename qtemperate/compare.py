"""Comparing finished runs: a size-vs-accuracy table, its Pareto front, the plot, re-export.

A run is Pareto-optimal when no other run is both smaller (``compression_ratio``)
and at least as accurate (``student_acc``), with one of the two strictly better.

Where runs come from (one argument each, :func:`load_runs`):

* a qtemperate run folder (its ``summary.json``);
* an offline W&B run: a run's ``wandb`` folder, an ``offline-run-*`` folder or a
  ``.wandb`` file (read from W&B's transaction log,
  :mod:`qtemperate.tracking.wandb_reader`);
* ``entity/project[/group]`` (or ``wandb:entity/project[/group]``): the runs of a W&B
  project or group, online (credentials and network needed).

A front compares students of one task: runs are put on one front only when they
were measured on the same dataset and test set (``dataset``, ``test_samples``) and
distilled from the same teacher (``teacher_id``, a fingerprint of its weights; runs
from before it existed are told apart by teacher name and accuracy).
:func:`compare_runs` refuses anything else unless ``allow_mixed``; then each
(dataset, teacher) group gets its own front. :func:`log_comparison` logs the table,
a scatter chart and the plot to W&B as a run of its own (``job_type: compare``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qtemperate.cli import UsageError
from qtemperate.tracking.keys import flat_summary
from qtemperate.tracking.tradeoff import TRADEOFF_COLUMNS, dataset_label, tradeoff_record

__all__ = [
    "COMPARE_COLUMNS",
    "NotARunError",
    "compare_runs",
    "export_run",
    "format_table",
    "load_runs",
    "log_comparison",
    "pareto_front",
    "pareto_plot",
]

COMPARE_COLUMNS = [*TRADEOFF_COLUMNS, "source", "pareto"]
"""Columns of a comparison row (the ``tradeoff`` columns, where it was read, the flag)."""


class NotARunError(UsageError, FileNotFoundError):
    """A source that holds no finished qtemperate run (bad input: the CLI exits 2)."""


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise NotARunError(f"{run_dir}: no summary.json (is it a finished qtemperate run?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise NotARunError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise NotARunError(f"{path}: not a qtemperate summary (a JSON object)")
    return data


def _recipe_of(run_dir: Path) -> dict[str, Any]:
    """The run's resolved recipe as plain data (``{}`` when it has none)."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # no readable recipe: no identity from it
        return {}
    return raw if isinstance(raw, dict) else {}


def _with_identity(flat: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Fill ``dataset``/``teacher`` of a run logged before they were in the summary."""
    data, teacher = config.get("data") or {}, config.get("teacher") or {}
    if flat.get("dataset") is None and isinstance(data, dict) and data.get("name"):
        flat["dataset"] = dataset_label(data["name"], data.get("kwargs") or {})
    if flat.get("teacher") is None and isinstance(teacher, dict) and teacher.get("model"):
        flat["teacher"] = teacher["model"]
    return flat


def _online_path(text: str) -> bool:
    from qtemperate.tracking.wandb_reader import parse_online_path

    return text.startswith("wandb:") or (not Path(text).exists() and parse_online_path(text) is not None)


def _from_wandb(runs: Sequence[Any], source: str) -> list[tuple[str, str, dict[str, Any]]]:
    out, unfinished = [], []
    for run in runs:
        if run.job_type == "compare":
            continue  # a comparison logged by log_comparison, not a training run
        # W&B's own keys (_step, _runtime ...) and table/image references are not results.
        flat = {k: v for k, v in run.summary.items()
                if not k.startswith("_") and not (isinstance(v, dict) and "_type" in v)}
        flat = flat_summary(flat)  # runs logged before the summary was flat
        if flat.get("student_acc") is None:
            unfinished.append(run.name or run.run_id)
            continue
        out.append((run.name or run.run_id, run.source, _with_identity(flat, run.config)))
    if unfinished:
        warnings.warn(f"{source}: skipped W&B runs without results (unfinished?): {', '.join(unfinished)}",
                      RuntimeWarning, stacklevel=3)
    if not out:
        raise NotARunError(f"{source}: no finished qtemperate run in its W&B runs")
    return out


def load_runs(sources: Sequence[str | Path], api: Any = None) -> list[tuple[str, str, dict[str, Any]]]:
    """Read runs from local folders, offline W&B files or W&B online (module docstring).

    Args:
        sources: Folders, ``.wandb`` files or ``[wandb:]entity/project[/group]``.
        api: A ``wandb.Api``-like object for online sources (tests pass one).

    Returns:
        ``(run name, where it was read, flat summary)`` per run, in argument order.

    Raises:
        NotARunError: a source that holds no finished qtemperate run.
        UsageError: an online source that cannot be read (no credentials or network).
    """
    from qtemperate.tracking.wandb_reader import (
        WandbReadError,
        find_wandb_run_files,
        read_online_runs,
        read_wandb_runs,
    )

    out: list[tuple[str, str, dict[str, Any]]] = []
    for src in sources:
        text = str(src)
        path = Path(text)
        try:
            if (path / "summary.json").is_file() or (path.is_dir() and not find_wandb_run_files(path)):
                flat = flat_summary(_read_summary(path))
                out.append((path.name, str(path), _with_identity(flat, _recipe_of(path))))
            elif path.exists():
                if not find_wandb_run_files(path):
                    raise NotARunError(f"{path}: neither a qtemperate run folder nor a W&B run file/folder")
                out += _from_wandb(read_wandb_runs(path), text)
            elif _online_path(text):
                try:
                    out += _from_wandb(read_online_runs(text.removeprefix("wandb:"), api=api), text)
                except WandbReadError as exc:
                    if text.startswith("wandb:"):
                        raise
                    raise WandbReadError(f"{text}: no such folder; read as a W&B path: {exc}") from None
            else:
                raise NotARunError(f"{path}: no such run folder (nor a W&B path entity/project[/group])")
        except WandbReadError as exc:
            raise UsageError(str(exc)) from None
    return out


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


def _dataset_key(row: dict[str, Any]) -> str:
    n = row.get("test_samples")
    return f"{row.get('dataset') or '?'} ({n if n is not None else '?'} test samples)"


def _teacher_key(row: dict[str, Any]) -> str:
    if row.get("teacher_id"):
        return f"{row.get('teacher') or '?'} {row['teacher_id']}"
    return f"{row.get('teacher') or '?'} (teacher acc {row['teacher_acc']:.4f}, no fingerprint)"


def _mixed(rows: Sequence[dict[str, Any]], key: Any, what: str) -> str | None:
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r["run"])
    if len(groups) < 2:
        return None
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
    return f"runs from different {what} ({listed})"


def compare_runs(
    run_dirs: Sequence[str | Path], allow_mixed: bool = False, api: Any = None
) -> list[dict[str, Any]]:
    """One row per run (:data:`COMPARE_COLUMNS`, sorted by size) with a ``pareto`` flag.

    Args:
        run_dirs: Sources as :func:`load_runs` reads them.
        allow_mixed: Accept runs of different datasets/test sets or teachers; each
            (dataset, teacher) group then gets its own front.
        api: A ``wandb.Api``-like object for online sources.

    Raises:
        NotARunError: a source without a finished run.
        UsageError: runs of different datasets or teachers without ``allow_mixed``
            (naming them).
    """
    rows = []
    for name, source, flat in load_runs(run_dirs, api=api):
        try:
            row = tradeoff_record(flat, name)
        except KeyError as exc:
            raise NotARunError(f"{source}: summary has no {exc.args[0]} (not a qtemperate run summary)") from None
        rows.append({**row, "source": source})
    problems = [p for p in (_mixed(rows, _dataset_key, "datasets"), _mixed(rows, _teacher_key, "teachers")) if p]
    if problems and not allow_mixed:
        raise UsageError(
            "; and ".join(problems) + " — a front compares students of one dataset and one teacher; "
            "pass --allow-mixed (allow_mixed=True) to draw one front per group"
        )
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((_dataset_key(r), _teacher_key(r)), []).append(r)
    for members in groups.values():
        for r, f in zip(members, pareto_front([(m["compression_ratio"], m["student_acc"]) for m in members])):
            r["pareto"] = f
    return sorted(rows, key=lambda r: r["compression_ratio"])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as aligned text (what ``qtemperate compare`` prints)."""
    w = max([32, *(len(str(r["run"])) + 2 for r in rows)])
    lines = [f"{'run':<{w}}{'teacher':>9}{'student':>9}{'drop':>8}{'ratio':>9}{'KiB':>10}{'b1 ms':>9}{'pareto':>8}"]
    for r in rows:
        lat = r.get("latency_b1_ms")
        lines.append(
            f"{r['run']:<{w}}{r['teacher_acc']:>9.4f}{r['student_acc']:>9.4f}{r['acc_drop'] * 100:>7.2f}%"
            f"{r['compression_ratio']:>9.4f}{r['student_bytes'] / 1024:>10.1f}"
            f"{(f'{lat:.3f}' if lat is not None else '-'):>9}{('*' if r['pareto'] else ''):>8}"
        )
    return "\n".join(lines)


def pareto_plot(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Scatter of accuracy vs compression ratio, each front joined by a line; writes a PNG.

    Runs of different (dataset, teacher) groups (``allow_mixed``) get their own marker
    and front; each teacher's accuracy is a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=120)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((_dataset_key(r), _teacher_key(r)), []).append(r)
    markers = "osD^vP*X"
    for g, ((dkey, tkey), members) in enumerate(groups.items()):
        xs = [r["compression_ratio"] for r in members]
        ys = [r["student_acc"] * 100 for r in members]
        colors = ["tab:red" if r["pareto"] else "tab:gray" for r in members]
        ax.scatter(xs, ys, c=colors, marker=markers[g % len(markers)], zorder=3)
        labels: dict[tuple[float, float], list[str]] = {}  # runs on the same point share one label
        for r, x, y in zip(members, xs, ys):
            labels.setdefault((x, y), []).append(str(r["run"]))
        for (x, y), names in labels.items():
            text = ", ".join(n if len(n) <= 28 else n[:27] + "…" for n in names)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6.5)
        front = sorted((x, y) for r, x, y in zip(members, xs, ys) if r["pareto"])
        label = "Pareto front" if len(groups) == 1 else f"front: {dkey}, {tkey}"[:70]
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1,
                    ls="-" if g == 0 else (0, (4, 2 + g)), label=label)
    for t in {r["teacher_acc"] for r in rows}:
        ax.axhline(t * 100, color="tab:blue", ls="--", lw=0.8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    ratios = [r["compression_ratio"] for r in rows]
    log = max(ratios) / max(min(ratios), 1e-12) > 10  # a log axis only when sizes span a decade
    if log:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(x=0.25, y=0.12)
    ax.set_xlabel("student bytes / teacher float bytes" + (" (log)" if log else ""))
    ax.set_ylabel("student top-1 accuracy (%)")
    ax.set_title("qtemperate: size vs accuracy (dashed: teacher)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def log_comparison(
    rows: Sequence[dict[str, Any]],
    plot: str | Path | None,
    run_dir: str | Path,
    project: str = "qtemperate",
    group: str | None = None,
    name: str = "comparison",
    mode: str = "auto",
    tags: Sequence[str] = (),
) -> Any:
    """Log a comparison to W&B as a report-ready run of its own (``job_type: compare``).

    The run holds the ``comparison`` table (:data:`COMPARE_COLUMNS`), a W&B scatter
    chart of ``student_acc`` against ``compression_ratio`` (``pareto_scatter``), the
    Pareto plot image (``pareto``) and a summary (``runs``, ``pareto_runs``,
    ``best_student_acc``, ``smallest_compression_ratio``). Offline it lands in
    ``run_dir/wandb/offline-run-*``.

    Returns:
        The finished :class:`~qtemperate.tracking.WandbLogger` (``run_file``,
        ``url``, ``active``).
    """
    from qtemperate.tracking.wandb_logger import WandbLogger

    lg = WandbLogger(
        project, run_dir, group=group, name=name, mode=mode, tags=["comparison", *tags],
        config={"runs": [r["run"] for r in rows], "sources": [r.get("source") for r in rows]},
        system_stats=False, job_type="compare",
    )
    data = [[r.get(c) for c in COMPARE_COLUMNS] for r in rows]
    lg.log_table("comparison", list(COMPARE_COLUMNS), data)
    lg.log_scatter("pareto_scatter", list(COMPARE_COLUMNS), data, "compression_ratio", "student_acc",
                   title="student accuracy vs compression ratio")
    if plot is not None:
        lg.log_image("pareto", plot)
    lg.log_summary({
        "runs": len(rows),
        "pareto_runs": sum(bool(r["pareto"]) for r in rows),
        "best_student_acc": max(r["student_acc"] for r in rows),
        "smallest_compression_ratio": min(r["compression_ratio"] for r in rows),
    })
    lg.finish()
    return lg


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
