"""What a run reports so trade-offs compare in W&B without code.

At the end of a run (:func:`log_run_results`):

* the summary, flat in W&B (:mod:`~qtemperate.tracking.keys`);
* the per-stage table under ``stages_table``;
* a one-row ``tradeoff`` table (:data:`TRADEOFF_COLUMNS`: recipe, dataset, teacher and
  student accuracy, bytes, ratio, bits, latency, target CPU, and the deployed student's
  latency and speed-up over the float teacher in onnxruntime and OpenVINO at batch 1 and
  the largest batch): W&B joins the tables of the runs in a workspace, so a scatter or
  Pareto panel of size or latency against accuracy needs no code;
* ``student.pt`` and every ``*.onnx`` file of the run folder as versioned W&B
  artifacts (``<recipe>-<file stem>-onnx``: each run logs a new version) with their
  measured bytes, latency and agreement as metadata (:func:`onnx_artifacts`);
* the schedule figure (:func:`~qtemperate.plots.schedule_figure`) with the measured
  temperatures and accuracy over the plan.

:func:`run_facts` adds what a comparison must know to put runs on one front: the
dataset and its test set, the teacher (architecture and a fingerprint of its
weights), the student's bits and the CPU the latencies were measured on.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtemperate.export.speed import SPEED_KEYS, speed_summary
from qtemperate.tracking.base import MetricLogger
from qtemperate.tracking.keys import SCHEDULE_IMAGE, STAGES_TABLE, TRADEOFF_TABLE, flat_summary

if TYPE_CHECKING:
    from torch import nn

    from qtemperate.data import DataBundle
    from qtemperate.recipe import Recipe

__all__ = [
    "STAGE_COLUMNS",
    "TRADEOFF_COLUMNS",
    "dataset_label",
    "log_run_results",
    "onnx_artifacts",
    "run_facts",
    "run_tags",
    "target_cpu",
    "teacher_fingerprint",
    "tradeoff_record",
]

TRADEOFF_COLUMNS = [
    "run", "recipe", "group", "dataset", "test_samples", "teacher", "teacher_id", "teacher_acc",
    "student_acc", "acc_drop", "student_bytes", "teacher_float_bytes", "compression_ratio",
    "weight_bits", "act_bits", "params", "onnx_bytes", "latency_b1_ms", "int8_latency_b1_ms",
    "teacher_latency_b1_ms", "target_cpu", *SPEED_KEYS,
]
"""Columns of the one-row ``tradeoff`` table (and of ``qtemperate compare``'s rows); the last
ones are the deployed student's speed against the teacher (:data:`~qtemperate.export.speed.SPEED_KEYS`)."""

STAGE_COLUMNS = ["name", "weight_bits", "act_bits", "epochs", "final_T", "accuracy", "bytes"]

_ISA_FLAGS = (  # /proc/cpuinfo flag -> what int8/float kernels care about
    ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
    ("asimddp", "NEON dot product"), ("i8mm", "int8 matmul"), ("sve", "SVE"), ("asimd", "NEON"),
)


def target_cpu() -> str:
    """The CPU the latencies are measured on: model, architecture, cores and the SIMD
    extensions integer kernels use, e.g.
    ``"Intel(R) Xeon(R) Processor; x86_64; 2 cores; AVX-512 VNNI, AVX-512, AVX2"``."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    isa = [name for flag, name in _ISA_FLAGS if flag in flags]
    parts = [model or platform.processor() or "unknown CPU", platform.machine() or "?",
             f"{os.cpu_count() or '?'} cores"]
    if isa:
        parts.append(", ".join(isa))
    return "; ".join(parts)


def teacher_fingerprint(model: nn.Module) -> str:
    """``sha256:<16 hex>`` of a model's state dict (names, dtypes, shapes and values):
    two runs share a teacher exactly when their fingerprints agree."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())  # numpy has no bf16
    return "sha256:" + h.hexdigest()[:16]


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs))


def dataset_label(name: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """``name`` or ``name(option=value,...)``: the dataset a run's accuracy is measured on."""
    return f"{name}({_kwargs_text(kwargs)})" if kwargs else name


def run_facts(recipe: Recipe, bundle: DataBundle, teacher: nn.Module) -> dict[str, Any]:
    """Facts ``summary.json`` carries so runs are compared only with their peers.

    Returns:
        ``dataset`` (name and options), ``test_samples`` / ``val_samples`` (sizes of
        the splits the accuracy and the schedule read), ``teacher`` (architecture),
        ``teacher_id`` (:func:`teacher_fingerprint`), ``student_weight_bits`` /
        ``student_act_bits`` (the final stage) and ``target_cpu``.
    """
    t = recipe.teacher
    return {
        "dataset": dataset_label(recipe.data.name, recipe.data.kwargs),
        "test_samples": len(bundle.test),  # type: ignore[arg-type]
        "val_samples": 0 if bundle.val is None else len(bundle.val),  # type: ignore[arg-type]
        "teacher": f"{t.model}({_kwargs_text(t.kwargs)})" if t.kwargs else t.model,
        "teacher_id": teacher_fingerprint(teacher),
        "student_weight_bits": recipe.final_stage.weight_bits,
        "student_act_bits": recipe.final_stage.act_bits,
        "target_cpu": target_cpu(),
    }


def run_tags(recipe: Recipe) -> list[str]:
    """The run's W&B tags: the recipe's own, then ``recipe:<name>``, ``dataset:<name>`` and
    ``hardware:<mode>`` when set (W&B tags are at most 64 characters)."""
    tags = [*recipe.tracking.tags, f"recipe:{recipe.name}", f"dataset:{recipe.data.name}"]
    if recipe.hardware is not None:
        tags.append(f"hardware:{recipe.hardware}")
    return list(dict.fromkeys(t[:64] for t in tags))


def _last_stage_bits(flat: Mapping[str, Any]) -> tuple[Any, Any]:
    wb = [v for k, v in flat.items() if k.startswith("stage/") and k.endswith("/weight_bits")]
    ab = [v for k, v in flat.items() if k.startswith("stage/") and k.endswith("/act_bits")]
    return (wb[-1] if wb else None, ab[-1] if ab else None)


def tradeoff_record(summary: Mapping[str, Any], run: str) -> dict[str, Any]:
    """One row of :data:`TRADEOFF_COLUMNS` from a run's summary (nested as in
    ``summary.json`` or flat as in W&B).

    The speed columns are the summary's :data:`~qtemperate.export.speed.SPEED_KEYS`; a
    summary written before they existed gets them from its per-batch latencies
    (:func:`~qtemperate.export.speed.speed_summary`: ``None`` where a file was not timed).

    Raises:
        KeyError: naming the first of ``teacher_acc``, ``student_acc``,
            ``compression_ratio``, ``student_bytes`` that the summary lacks (it is not
            a finished qtemperate run).
    """
    flat = flat_summary(summary) if any(isinstance(v, (Mapping, list)) for v in summary.values()) else dict(summary)
    for key in ("teacher_acc", "student_acc", "compression_ratio", "student_bytes"):
        if flat.get(key) is None:
            raise KeyError(key)
    speed = flat if "latency_max_batch" in flat else speed_summary(flat)
    wb, ab = _last_stage_bits(flat)
    return {
        "run": run,
        "recipe": flat.get("recipe"),
        "group": flat.get("group"),
        "dataset": flat.get("dataset"),
        "test_samples": flat.get("test_samples"),
        "teacher": flat.get("teacher"),
        "teacher_id": flat.get("teacher_id"),
        "teacher_acc": flat["teacher_acc"],
        "student_acc": flat["student_acc"],
        "acc_drop": flat.get("acc_drop", flat["teacher_acc"] - flat["student_acc"]),
        "student_bytes": flat["student_bytes"],
        "teacher_float_bytes": flat.get("teacher_float_bytes"),
        "compression_ratio": flat["compression_ratio"],
        "weight_bits": flat.get("student_weight_bits", wb),
        "act_bits": flat.get("student_act_bits", ab),
        "params": flat.get("params"),
        "onnx_bytes": flat.get("onnx_bytes"),
        "latency_b1_ms": flat.get("onnx_latency_ms/1"),
        "int8_latency_b1_ms": flat.get("int8_onnx_latency_ms/1"),
        "teacher_latency_b1_ms": flat.get("teacher_onnx_latency_ms/1"),
        "target_cpu": flat.get("target_cpu"),
        **{k: speed.get(k) for k in SPEED_KEYS},
    }


# --------------------------------------------------------------------------- ONNX artifacts

# File -> (role, the summary's key prefix of its measurements, bits source).
_KNOWN_ONNX = {
    "student": ("student at its final bits", "onnx"),
    "student_int8": ("int8 twin of the student (W8A8: what an int8 CPU backend runs)", "int8_onnx"),
    "teacher": ("float teacher", "teacher_onnx"),
    "student_float": ("float student (pruned, before QAT): the int8 speed-up's baseline", "float_student_onnx"),
    "student.qonnx": ("QONNX file of the student (FINN / FPGA flows), checked with QONNX's executor", "qonnx"),
}


def _measurements(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{name: value}`` of the flat summary keys ``<prefix>_<name>`` (latency per batch nested)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if not k.startswith(prefix + "_"):
            continue
        rest = k[len(prefix) + 1 :]
        if "/" in rest:
            head, _, batch = rest.partition("/")
            out.setdefault(head, {})[batch] = v
        else:
            out[rest] = v
    return out


def onnx_artifacts(run_dir: str | Path, summary: Mapping[str, Any]) -> list[tuple[Path, str, dict[str, Any]]]:
    """Every ``*.onnx`` file of the run folder with its artifact name and metadata.

    The metadata holds what was measured about that file, never a figure of another:
    ``bytes`` (its size on disk, read now), ``weight_bits``/``act_bits`` and, from the
    summary, its ``latency_ms`` per batch size, ``top1_agreement`` and
    ``max_abs_diff`` against PyTorch (``student.onnx``: ``onnx_*`` keys;
    ``student_int8.onnx``: ``int8_onnx_*``; ``teacher.onnx``: ``teacher_onnx_*``;
    ``student_float.onnx``: ``float_student_onnx_*``; ``student.qonnx.onnx``: ``qonnx_*``).
    Any other file ``<stem>.onnx`` (QONNX, ...) gets the summary keys
    ``<stem>_*``; a measurement the summary does not hold is left out.

    Returns:
        ``(path, artifact name, metadata)`` per file, sorted by file name.
    """
    run_dir = Path(run_dir)
    flat = flat_summary(summary)
    recipe = flat.get("recipe") or run_dir.name
    out = []
    for path in sorted(run_dir.glob("*.onnx")):
        stem = path.stem
        role, prefix = _KNOWN_ONNX.get(stem, (stem, stem))
        meta: dict[str, Any] = {"file": path.name, "role": role, "bytes": path.stat().st_size}
        if stem == "teacher":
            meta.update(weight_bits=32, act_bits=32, accuracy=flat.get("teacher_acc"))
        elif stem == "student_int8":
            meta.update(weight_bits=8, act_bits=8)
        elif stem == "student_float":
            meta.update(weight_bits=32, act_bits=32)
        elif stem in ("student", "student.qonnx"):
            meta.update(weight_bits=flat.get("student_weight_bits"), act_bits=flat.get("student_act_bits"),
                        accuracy=flat.get("student_acc"))
        measured = _measurements(flat, prefix)
        measured.pop("bytes", None)  # the size is read from the file itself
        measured.pop("path", None)
        meta.update(measured)
        meta.update({k: flat.get(k) for k in ("recipe", "dataset", "teacher_id", "target_cpu")})
        meta = {k: v for k, v in meta.items() if v is not None}
        out.append((path, f"{recipe}-{stem}-onnx", meta))
    return out


# --------------------------------------------------------------------------- the end of a run


def log_run_results(
    logger: MetricLogger,
    run_dir: str | Path,
    recipe: Recipe,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] = (),
    schedule_recipe: Recipe | None = None,
) -> None:
    """Log what a finished run reports (see the module docstring).

    Args:
        logger: The run's logger(s).
        run_dir: The run folder (``student.pt``, ``*.onnx``, where ``schedule.png`` goes).
        recipe: The run's recipe.
        summary: ``summary.json``'s content.
        history: The per-epoch records of the run (temperatures, ``test_acc``).
        schedule_recipe: The recipe the scheduler was built from (switches resolved);
            default ``recipe``.
    """
    run_dir = Path(run_dir)
    logger.log_summary(summary)
    stages = list(summary.get("stages") or [])
    logger.log_table(STAGES_TABLE, STAGE_COLUMNS, [[s.get(c) for c in STAGE_COLUMNS] for s in stages])
    record = tradeoff_record(summary, run_dir.name)
    logger.log_table(TRADEOFF_TABLE, TRADEOFF_COLUMNS, [[record[c] for c in TRADEOFF_COLUMNS]])
    if history:
        try:
            from qtemperate.joint_scheduler import JointScheduler
            from qtemperate.plots import schedule_figure
            from qtemperate.schedule_switches import no_feedback_path

            sched = JointScheduler.from_recipe(schedule_recipe or recipe)
            title = recipe.name + (f" (hardware: {recipe.hardware})" if recipe.hardware else "")
            png = schedule_figure(no_feedback_path(sched), run_dir / "schedule.png", title=title,
                                  measured=list(history), reference_temperatures=sched.base_temperatures)
            logger.log_image(SCHEDULE_IMAGE, png)
        except ImportError:  # matplotlib is the optional `plot` extra
            pass
    if (run_dir / "student.pt").is_file():
        logger.log_artifact(run_dir / "student.pt", name=f"{recipe.name}-student", type="model",
                            metadata={k: v for k, v in record.items() if v is not None})
    for path, name, meta in onnx_artifacts(run_dir, summary):
        logger.log_artifact(path, name=name, type="model", metadata=meta)
    table = run_dir / "temperature_table.json"
    if table.is_file():
        logger.log_artifact(table, name=f"{recipe.name}-temperature-table", type="temperature-table",
                            metadata={"hardware": summary.get("hardware"), "recipe": recipe.name})
