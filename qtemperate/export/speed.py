"""The deployed student's speed against its float teacher: flat keys every comparison reads.

``summary.json``, the W&B ``tradeoff`` table, ``qtemperate compare`` and ``sweep`` read
the same scalar keys, one name per (what, runtime, batch):

* ``student_<rt>_ms_<b>``: median milliseconds per batch of the **deployed student**
  (``deployed_onnx``: ``student_int8.onnx``, the W8A8 file an int8 CPU backend runs, or
  ``student.onnx`` when the student is W8A8 or float);
* ``teacher_<rt>_ms_<b>``: the same for the float teacher (``teacher.onnx``);
* ``speedup_vs_teacher_<rt>_<b> = teacher_<rt>_ms_<b> / student_<rt>_ms_<b>`` (above 1:
  the student is faster);

with ``<rt>`` ``ort`` (onnxruntime) or ``openvino``, and ``<b>`` ``b1`` (batch 1) or
``bmax`` (the largest batch timed, ``latency_max_batch``). Both files are timed in the
same runtime, on the same CPU, at the same batch. A figure that was not measured is
``None`` and ``speed_missing`` says why, per runtime; nothing is filled in from another
runtime or batch. Standard library only (compare reads these keys without torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BATCHES",
    "RUNTIMES",
    "SPEED_KEYS",
    "per_batch",
    "speed_key",
    "speed_summary",
]

RUNTIMES = {"ort": "onnxruntime", "openvino": "OpenVINO"}
"""Runtime tag in the key names -> its name in messages."""
BATCHES = ("b1", "bmax")
"""Batch tags: batch 1 and the largest batch timed (``latency_max_batch``)."""

# Per runtime: the summary's per-batch latency of the deployed student and of the teacher.
_STUDENT = {"ort": "int8_onnx_latency_ms", "openvino": "openvino_latency_ms"}
_TEACHER = {"ort": "teacher_onnx_latency_ms", "openvino": "teacher_openvino_latency_ms"}
_NOTE = {"openvino": "openvino_note"}  # why a runtime did not run at all ("not installed")


def speed_key(what: str, runtime: str = "ort", batch: str = "b1") -> str:
    """The summary key of one speed figure.

    Args:
        what: ``"student"`` (ms), ``"teacher"`` (ms) or ``"speedup"`` (teacher / student).
        runtime: ``"ort"`` or ``"openvino"``.
        batch: ``"b1"`` or ``"bmax"`` (``"1"`` and ``"max"`` are accepted too).

    Returns:
        e.g. ``student_ort_ms_b1``, ``teacher_openvino_ms_bmax``, ``speedup_vs_teacher_ort_bmax``.

    Raises:
        ValueError: naming the argument that is none of these.
    """
    batch = {"1": "b1", "max": "bmax"}.get(str(batch), str(batch))
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: expected one of {sorted(RUNTIMES)}")
    if batch not in BATCHES:
        raise ValueError(f"batch {batch!r}: expected 1 or max")
    if what == "speedup":
        return f"speedup_vs_teacher_{runtime}_{batch}"
    if what not in ("student", "teacher"):
        raise ValueError(f"what {what!r}: expected student, teacher or speedup")
    return f"{what}_{runtime}_ms_{batch}"


SPEED_KEYS = ["latency_max_batch", *(
    speed_key(what, rt, b) for rt in RUNTIMES for what in ("student", "teacher", "speedup") for b in BATCHES
)]
"""The scalar speed keys, in table order (``speed_missing`` is their reason, not a figure)."""


def per_batch(summary: Mapping[str, Any], key: str) -> dict[str, float]:
    """``{batch: ms}`` of a per-batch key, from a nested (``summary.json``) or a flat (W&B) summary.

    ``summary[key]`` when it is a mapping, else the flat entries ``key/<batch>``; ``{}``
    when neither holds a number.
    """
    nested = summary.get(key)
    if isinstance(nested, Mapping):
        items = nested.items()
    else:
        prefix = key + "/"
        items = ((k[len(prefix):], v) for k, v in summary.items() if k.startswith(prefix))
    return {str(b): float(v) for b, v in items if isinstance(v, int | float) and not isinstance(v, bool)}


def speed_summary(
    report: Mapping[str, Any],
    quantized: bool = True,
    why: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The flat speed keys (module docstring) from the per-batch latencies of ``report``.

    Args:
        report: ``summary.json`` or :func:`~qtemperate.export.check.export_and_check`'s
            result, nested or flat: it reads ``int8_onnx_latency_ms`` /
            ``teacher_onnx_latency_ms`` (onnxruntime) and ``openvino_latency_ms`` /
            ``teacher_openvino_latency_ms`` (OpenVINO).
        quantized: Whether the student is quantized; a float student's deployed file is
            ``student.onnx`` (``onnx_latency_ms``).
        why: Reasons known to the caller, by runtime tag (the student was not timed
            there) or ``"teacher"`` (no teacher timed); they replace the generic ones.

    Returns:
        ``latency_max_batch``, the twelve ``student_*``/``teacher_*``/``speedup_vs_teacher_*``
        keys (``None`` where not measured) and ``speed_missing`` (``{runtime tag: reason}``
        for each runtime with a ``None`` speed-up, ``None`` when nothing is missing).
    """
    why = dict(why or {})
    student = {rt: per_batch(report, key) for rt, key in _STUDENT.items()}
    if not quantized:
        student["ort"] = per_batch(report, "onnx_latency_ms")
    teacher = {rt: per_batch(report, key) for rt, key in _TEACHER.items()}
    timed = [int(b) for lat in student.values() for b in lat if b.isdigit()]
    bmax = max(timed) if timed else None
    out: dict[str, Any] = {"latency_max_batch": bmax}
    missing: dict[str, str] = {}
    for rt, name in RUNTIMES.items():
        reasons: list[str] = []
        if not student[rt]:
            reasons.append(why.get(rt) or report.get(_NOTE.get(rt, "")) or
                           f"the deployed student was not timed in {name}")
        elif not teacher[rt]:
            reasons.append(why.get("teacher") or report.get(f"teacher_{rt}_note") or
                           f"the float teacher was not timed in {name}")
        for b, batch in (("b1", "1"), ("bmax", None if bmax is None else str(bmax))):
            s = student[rt].get(batch) if batch else None
            t = teacher[rt].get(batch) if batch else None
            out[speed_key("student", rt, b)] = s
            out[speed_key("teacher", rt, b)] = t
            out[speed_key("speedup", rt, b)] = t / s if s and t else None
            if batch and student[rt] and teacher[rt] and not (s and t):
                reasons.append(f"batch {batch} was not timed for both the student and the teacher")
        if not (student[rt] and teacher[rt]) or any(
                out[speed_key("speedup", rt, b)] is None for b in BATCHES):
            missing[rt] = "; ".join(dict.fromkeys(reasons)) or f"batch 1 was not timed in {name}"
    out["speed_missing"] = missing or None
    return out
