"""Summary keys in W&B: flat, stable and never clobbered.

``summary.json`` nests: a list of stage records, latencies per batch size. W&B's
summary nests dicts on its own, cannot chart a list, and a ``run.log`` of a table
under a key the summary already holds replaces that value (a run's ``stages`` table
used to overwrite the ``stages`` list). So the W&B summary holds every value of
``summary.json`` under a flat key made by one rule (:func:`flat_summary`):

* a scalar keeps its key: ``student_acc``, ``compression_ratio``;
* a mapping joins its keys with ``/``: ``onnx_latency_ms/1``, ``onnx_latency_ms/64``;
* a list of records that carry a ``name`` (the stages) is keyed by the list's key
  in the singular and the record's name: ``stage/w4a4/accuracy``,
  ``stage/w8a8/final_T`` (a ``/`` in a name becomes ``_``; a repeated name gets
  ``_2``, ``_3`` ... in order);
* any other list is keyed by position: ``stage/w4a4/final_temperatures/0``.

Tables and figures are logged under keys of their own that no summary key uses
(:data:`RESERVED_KEYS`: ``stages_table``, ``tradeoff``, ``schedule``, ...), so every
``summary.json`` value reads back unchanged from the W&B summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RESERVED_KEYS", "SCHEDULE_IMAGE", "SEP", "STAGES_TABLE", "TRADEOFF_TABLE", "flat_summary"]

SEP = "/"
STAGES_TABLE = "stages_table"
"""W&B key of the per-stage table (summary.json keeps its ``stages`` list)."""
TRADEOFF_TABLE = "tradeoff"
"""W&B key of the one-row size/accuracy/latency table of a run."""
SCHEDULE_IMAGE = "schedule"
"""W&B key of the temperature/bit-width schedule figure."""
RESERVED_KEYS = frozenset({STAGES_TABLE, TRADEOFF_TABLE, SCHEDULE_IMAGE, "comparison", "pareto", "pareto_scatter", "pareto_scatter_table"})
"""Keys of tables and figures; a flat summary never uses them."""


def _part(text: Any) -> str:
    return str(text).replace(SEP, "_")


def _singular(key: str) -> str:
    return key[:-1] if key.endswith("s") and len(key) > 1 else key


def _is_named_records(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, Mapping) and "name" in v for v in value)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        if not value and prefix:
            out[prefix] = None  # an empty mapping still says "nothing here"
        for k, v in value.items():
            _flatten(f"{prefix}{SEP}{_part(k)}" if prefix else _part(k), v, out)
    elif isinstance(value, (list, tuple)):
        if _is_named_records(list(value)):
            head = _singular(prefix.rsplit(SEP, 1)[-1])
            base = prefix.rsplit(SEP, 1)[0] + SEP + head if SEP in prefix else head
            seen: dict[str, int] = {}
            for record in value:
                name = _part(record["name"])
                seen[name] = seen.get(name, 0) + 1
                label = name if seen[name] == 1 else f"{name}_{seen[name]}"
                for k, v in record.items():
                    if k != "name":
                        _flatten(f"{base}{SEP}{label}{SEP}{_part(k)}", v, out)
        elif not value:
            out[prefix] = None
        else:
            for i, v in enumerate(value):
                _flatten(f"{prefix}{SEP}{i}", v, out)
    else:
        out[prefix] = value


def flat_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Every value of ``summary`` under one flat key (the rule in the module docstring).

    Args:
        summary: A summary such as ``summary.json`` (plain Python values).

    Returns:
        ``{flat_key: scalar}`` in the order of ``summary`` (``None`` for empty
        lists/mappings).

    Raises:
        ValueError: if two values would land on the same key, or a key is one of
            :data:`RESERVED_KEYS`.
    """
    out: dict[str, Any] = {}
    for key, value in summary.items():
        part: dict[str, Any] = {}
        _flatten(str(key), value, part)  # a top-level key is already flat: kept as it is
        for k, v in part.items():
            if k in out:
                raise ValueError(f"summary key {k!r} would be written twice (from {key!r})")
            if k in RESERVED_KEYS:
                raise ValueError(f"summary key {k!r} is reserved for a table or figure")
            out[k] = v
    return out
