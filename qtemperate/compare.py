"""Comparing finished runs: a size/speed-vs-accuracy table, its Pareto front, the plot, re-export.

A run is Pareto-optimal when no other run is both cheaper and at least as accurate
(``student_acc``), with one of the two strictly better. The cost is the size
(``compression_ratio``, ``pareto_over="size"``) or the deployed student's latency
(``pareto_over="latency"``: ``student_<runtime>_ms_<batch>``, onnxruntime at batch 1 by
default, :mod:`qtemperate.export.speed`); runs without that latency are left off the
front and named. Latencies are compared only between runs timed on one CPU
(``target_cpu``) at one batch size.

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
from qtemperate.errors import QtemperateWarning
from qtemperate.export.speed import RUNTIMES, speed_key
from qtemperate.tracking.keys import flat_summary
from qtemperate.tracking.tradeoff import TRADEOFF_COLUMNS, dataset_label, tradeoff_record

__all__ = [
    "COMPARE_COLUMNS",
    "PARETO_AXES",
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
PARETO_AXES = ("size", "latency")
"""What a front minimizes beside maximizing accuracy (``--pareto-over``)."""


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
    """Flags of the points ``(cost, accuracy)`` that no other point dominates.

    Point ``j`` dominates ``i`` when ``cost_j <= cost_i`` and ``acc_j >= acc_i`` with one
    of the two strict; the cost is a size or a latency (lower is better).
    """
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


def _cpu_key(row: dict[str, Any]) -> str:
    return str(row.get("target_cpu") or "? (CPU not recorded)")


def _batch_key(row: dict[str, Any]) -> str:
    return f"batch {row.get('latency_max_batch')}"


def _x_key(pareto_over: str = "size", runtime: str = "ort", batch: str = "1") -> str:
    """The row column a front minimizes: ``compression_ratio`` or ``student_<runtime>_ms_<b>``.

    Raises:
        UsageError: naming ``pareto_over``, ``runtime`` or ``batch`` when it is not one
            of :data:`PARETO_AXES`, ``ort``/``openvino``, ``1``/``max``.
    """
    if pareto_over == "size":
        return "compression_ratio"
    if pareto_over != "latency":
        raise UsageError(f"--pareto-over {pareto_over!r}: expected one of {', '.join(PARETO_AXES)}")
    if runtime not in RUNTIMES:
        raise UsageError(f"--latency-runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if str(batch) not in ("1", "max", "b1", "bmax"):
        raise UsageError(f"--latency-batch {batch!r}: expected 1 or max")
    return speed_key("student", runtime, batch)


def _group_key(row: dict[str, Any], xk: str) -> tuple[str, ...]:
    """Runs on one front: one dataset and teacher; for a latency, one CPU and batch size."""
    key = (_dataset_key(row), _teacher_key(row))
    if xk != "compression_ratio":
        key += (_cpu_key(row),) + ((_batch_key(row),) if xk.endswith("_bmax") else ())
    return key


def _mixed(rows: Sequence[dict[str, Any]], key: Any, what: str) -> str | None:
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r["run"])
    if len(groups) < 2:
        return None
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
    return f"runs from different {what} ({listed})"


def compare_runs(
    run_dirs: Sequence[str | Path],
    allow_mixed: bool = False,
    api: Any = None,
    pareto_over: str = "size",
    runtime: str = "ort",
    batch: str = "1",
) -> list[dict[str, Any]]:
    """One row per run (:data:`COMPARE_COLUMNS`, sorted by the front's cost) with a ``pareto`` flag.

    Args:
        run_dirs: Sources as :func:`load_runs` reads them.
        allow_mixed: Accept runs of different datasets/test sets or teachers (and, over
            latency, CPUs or largest batches); each group then gets its own front.
        api: A ``wandb.Api``-like object for online sources.
        pareto_over: ``"size"`` (``compression_ratio``) or ``"latency"`` (the deployed
            student's ``student_<runtime>_ms_<batch>``).
        runtime: Over latency: ``"ort"`` (onnxruntime) or ``"openvino"``.
        batch: Over latency: ``"1"`` or ``"max"`` (the largest batch timed).

    Returns:
        The rows; over latency a run without that latency has ``pareto = None`` (it is
        on no front, and a :class:`~qtemperate.errors.QtemperateWarning` names it).

    Raises:
        NotARunError: a source without a finished run.
        UsageError: runs of different datasets or teachers (over latency: CPUs or
            largest batches) without ``allow_mixed``, naming them; over latency, no run
            with that latency; a bad ``pareto_over``/``runtime``/``batch``.
    """
    xk = _x_key(pareto_over, runtime, batch)
    rows = []
    for name, source, flat in load_runs(run_dirs, api=api):
        try:
            row = tradeoff_record(flat, name)
        except KeyError as exc:
            raise NotARunError(f"{source}: summary has no {exc.args[0]} (not a qtemperate run summary)") from None
        rows.append({**row, "source": source})
    timed = [r for r in rows if r.get(xk) is not None]
    if not timed:
        raise UsageError(f"--pareto-over latency: no run has {xk} (the deployed student timed in "
                         f"{_runtime_of(xk)}); compare over size or another --latency-runtime/--latency-batch")
    untimed = [r["run"] for r in rows if r.get(xk) is None]
    if untimed:
        warnings.warn(f"not on the latency front (no {xk}): {', '.join(map(str, untimed))}",
                      QtemperateWarning, stacklevel=2)
    problems = [p for p in (_mixed(rows, _dataset_key, "datasets"), _mixed(rows, _teacher_key, "teachers")) if p]
    what = "one dataset and one teacher"
    if xk != "compression_ratio":
        problems += [p for p in (_mixed(timed, _cpu_key, "CPUs"),) if p]
        what += ", timed on one CPU"
        if xk.endswith("_bmax"):
            problems += [p for p in (_mixed(timed, _batch_key, "largest batch sizes"),) if p]
            what += " at one batch size"
    if problems and not allow_mixed:
        raise UsageError(
            "; and ".join(problems) + f" — a front compares students of {what}; "
            "pass --allow-mixed (allow_mixed=True) to draw one front per group"
        )
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        r["pareto"] = None
    for r in timed:
        groups.setdefault(_group_key(r, xk), []).append(r)
    for members in groups.values():
        for r, f in zip(members, pareto_front([(m[xk], m["student_acc"]) for m in members])):
            r["pareto"] = f
    return sorted(rows, key=lambda r: (r.get(xk) is None, r.get(xk) or 0.0, r["compression_ratio"]))


def _runtime_of(xk: str, rows: Sequence[dict[str, Any]] = ()) -> str:
    """``onnxruntime at batch 1``, ``OpenVINO at batch 64``: where a latency column was timed."""
    rt = next((t for t in RUNTIMES if f"_{t}_" in xk), "ort")
    bm = _uniform_max_batch(rows)
    batch = "batch 1" if xk.endswith("_b1") else (f"batch {bm[1:]}" if bm != "bmax" else "the largest batch")
    return f"{RUNTIMES[rt]} at {batch}"


def _uniform_max_batch(rows: Sequence[dict[str, Any]]) -> str:
    """``b64`` when every timed run's largest batch is 64, else ``bmax``."""
    sizes = {r.get("latency_max_batch") for r in rows if r.get("latency_max_batch") is not None}
    return f"b{sizes.pop()}" if len(sizes) == 1 else "bmax"


def _speed_columns(rows: Sequence[dict[str, Any]], xk: str | None) -> list[tuple[str, str, str]]:
    """``(header, row key, format)`` of the speed columns some row has a value for."""
    bm = _uniform_max_batch(rows)
    cols = []
    for rt, tag in (("ort", "ort"), ("openvino", "ov")):
        group = [(f"{tag} ms b1", speed_key("student", rt, "b1"), ".3f")]
        if xk == speed_key("student", rt, "bmax"):  # the front's axis is shown
            group.append((f"{tag} ms {bm}", xk, ".3f"))
        group += [(f"{tag} xT b1", speed_key("speedup", rt, "b1"), ".2f"),
                  (f"{tag} xT {bm}", speed_key("speedup", rt, "bmax"), ".2f")]
        if any(r.get(k) is not None for r in rows for _, k, _ in group):
            cols += group
    return cols


def format_table(rows: Sequence[dict[str, Any]], pareto_over: str = "size", runtime: str = "ort",
                 batch: str = "1") -> str:
    """The comparison as aligned text (what ``qtemperate compare`` prints).

    Size and accuracy, then the deployed student's latency and speed-up over the float
    teacher (``xT = teacher ms / student ms``, same runtime and batch) for each runtime
    some run was timed in, and the Pareto flag (``*`` on the front, ``-`` left off it
    for lack of the front's latency). A legend line names the axis of the front.
    """
    xk = _x_key(pareto_over, runtime, batch)
    speed = _speed_columns(rows, xk)
    w = max([32, *(len(str(r["run"])) + 2 for r in rows)])
    sw = max([9, *(len(h) + 2 for h, _, _ in speed)])
    head = f"{'run':<{w}}{'teacher':>9}{'student':>9}{'drop':>8}{'ratio':>9}{'KiB':>10}"
    lines = [head + "".join(f"{h:>{sw}}" for h, _, _ in speed) + f"{'pareto':>8}"]
    for r in rows:
        cells = "".join(f"{(format(r[k], f) if r.get(k) is not None else '-'):>{sw}}" for _, k, f in speed)
        flag = {True: "*", False: "", None: "-"}[r.get("pareto")]
        lines.append(
            f"{r['run']:<{w}}{r['teacher_acc']:>9.4f}{r['student_acc']:>9.4f}{r['acc_drop'] * 100:>7.2f}%"
            f"{r['compression_ratio']:>9.4f}{r['student_bytes'] / 1024:>10.1f}{cells}{flag:>8}"
        )
    front = "size (compression_ratio)" if xk == "compression_ratio" else f"latency ({xk})"
    legend = f"pareto: front over {front} and student accuracy"
    if speed:
        legend += ("; ms: the deployed student (student_int8.onnx, or student.onnx at W8A8); "
                   "xT: float teacher ms / student ms in the same runtime and batch; ort: onnxruntime, "
                   "ov: OpenVINO")
    return "\n".join([*lines, legend])


def pareto_plot(
    rows: Sequence[dict[str, Any]],
    out: str | Path,
    x: str = "size",
    runtime: str = "ort",
    batch: str = "1",
) -> Path:
    """Scatter of accuracy vs size or latency, each front joined by a line; writes a PNG.

    Args:
        rows: :func:`compare_runs`'s rows.
        out: The PNG to write (folders are created).
        x: ``"size"`` (student bytes / teacher float bytes) or ``"latency"`` (the
            deployed student's ms per batch, ``student_<runtime>_ms_<batch>``).
        runtime: Over latency: ``"ort"`` or ``"openvino"``.
        batch: Over latency: ``"1"`` or ``"max"``.

    The front is computed here on the axis drawn (:func:`pareto_front` per group), so it
    holds whatever axis ``rows`` were flagged on. Runs of different groups
    (``allow_mixed``: dataset, teacher and, over latency, CPU) get their own marker and
    front; each teacher's accuracy is a dashed line, and over latency its latency in the
    same runtime and batch a dashed vertical line. Runs without the latency are not
    drawn; a note in the figure names them.

    Raises:
        UsageError: over latency, when no run has that latency.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    xk = _x_key(x, runtime, batch)
    drawn = [r for r in rows if r.get(xk) is not None]
    left_out = [str(r["run"]) for r in rows if r.get(xk) is None]
    if not drawn:
        raise UsageError(f"the Pareto plot over latency: no run has {xk} (the deployed student timed in "
                         f"{_runtime_of(xk)})")
    out = Path(out)
    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=120)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in drawn:
        groups.setdefault(_group_key(r, xk), []).append(r)
    markers = "osD^vP*X"
    for g, (gkey, members) in enumerate(groups.items()):
        xs = [float(r[xk]) for r in members]
        ys = [r["student_acc"] * 100 for r in members]
        flags = pareto_front(list(zip(xs, ys)))
        colors = ["tab:red" if f else "tab:gray" for f in flags]
        ax.scatter(xs, ys, c=colors, marker=markers[g % len(markers)], zorder=3)
        labels: dict[tuple[float, float], list[str]] = {}  # runs on the same point share one label
        for r, px, py in zip(members, xs, ys):
            labels.setdefault((px, py), []).append(str(r["run"]))
        for (px, py), names in labels.items():
            text = ", ".join(n if len(n) <= 28 else n[:27] + "…" for n in names)
            ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=6.5)
        front = sorted((px, py) for f, px, py in zip(flags, xs, ys) if f)
        label = "Pareto front" if len(groups) == 1 else ("front: " + ", ".join(gkey))[:70]
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1,
                    ls="-" if g == 0 else (0, (4, 2 + g)), label=label)
    for t in {r["teacher_acc"] for r in drawn}:
        ax.axhline(t * 100, color="tab:blue", ls="--", lw=0.8)
    xs_all = [float(r[xk]) for r in drawn]
    if xk != "compression_ratio":
        tk = xk.replace("student_", "teacher_", 1)
        for t in {r[tk] for r in drawn if r.get(tk) is not None}:
            ax.axvline(t, color="tab:blue", ls="--", lw=0.8)
            xs_all.append(float(t))
    if left_out:
        ax.text(0.01, 0.01, f"not drawn (no {xk}): {', '.join(left_out)}"[:120], transform=ax.transAxes,
                fontsize=6.5, color="tab:gray", va="bottom")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    log = max(xs_all) / max(min(xs_all), 1e-12) > 10  # a log axis only when the values span a decade
    if log:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(x=0.25, y=0.12)
    if xk == "compression_ratio":
        ax.set_xlabel("student bytes / teacher float bytes" + (" (log)" if log else ""))
        ax.set_title("qtemperate: size vs accuracy (dashed: teacher)")
    else:
        ax.set_xlabel(f"deployed student latency, ms per batch ({_runtime_of(xk, drawn)})"
                      + (" (log)" if log else ""))
        ax.set_title("qtemperate: latency vs accuracy (dashed: teacher)")
    ax.set_ylabel("student top-1 accuracy (%)")
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
    pareto_over: str = "size",
    runtime: str = "ort",
    batch: str = "1",
) -> Any:
    """Log a comparison to W&B as a report-ready run of its own (``job_type: compare``).

    The run holds the ``comparison`` table (:data:`COMPARE_COLUMNS`), a W&B scatter
    chart of ``student_acc`` against the front's axis (``pareto_scatter``:
    ``compression_ratio``, or over latency ``student_<runtime>_ms_<batch>``), the
    Pareto plot image (``pareto``) and a summary (``runs``, ``pareto_runs``,
    ``pareto_x``, ``best_student_acc``, ``smallest_compression_ratio``, and
    ``fastest_student_ms`` over latency). Offline it lands in
    ``run_dir/wandb/offline-run-*``.

    Returns:
        The finished :class:`~qtemperate.tracking.WandbLogger` (``run_file``,
        ``url``, ``active``).
    """
    from qtemperate.tracking.wandb_logger import WandbLogger

    xk = _x_key(pareto_over, runtime, batch)
    lg = WandbLogger(
        project, run_dir, group=group, name=name, mode=mode, tags=["comparison", *tags],
        config={"runs": [r["run"] for r in rows], "sources": [r.get("source") for r in rows]},
        system_stats=False, job_type="compare",
    )
    data = [[r.get(c) for c in COMPARE_COLUMNS] for r in rows]
    lg.log_table("comparison", list(COMPARE_COLUMNS), data)
    lg.log_scatter("pareto_scatter", list(COMPARE_COLUMNS), data, xk, "student_acc",
                   title="student accuracy vs " + ("compression ratio" if xk == "compression_ratio" else xk))
    if plot is not None:
        lg.log_image("pareto", plot)
    summary: dict[str, Any] = {
        "runs": len(rows),
        "pareto_runs": sum(bool(r["pareto"]) for r in rows),
        "pareto_x": xk,
        "best_student_acc": max(r["student_acc"] for r in rows),
        "smallest_compression_ratio": min(r["compression_ratio"] for r in rows),
    }
    timed = [r[xk] for r in rows if r.get(xk) is not None]
    if xk != "compression_ratio" and timed:
        summary["fastest_student_ms"] = min(timed)
    lg.log_summary(summary)
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
