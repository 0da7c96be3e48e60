"""Compact one-line metric prints, safe beside tqdm bars."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from qtemperate.tracking.base import MetricLogger, Scalar, check_table, plain

__all__ = ["ConsoleLogger"]


def _fmt(value: Any, precision: int) -> str:
    value = plain(value)
    if isinstance(value, float):
        if (value != 0 and (abs(value) < 10 ** -precision or abs(value) >= 1e6)) or math.isnan(value):
            return f"{value:.{precision}g}"
        return f"{value:.{precision}f}"
    return str(value)


class ConsoleLogger(MetricLogger):
    """Compact one-line prints, safe beside tqdm bars (uses ``tqdm.write``).

    Args:
        every: Print metrics only when ``step % every == 0``.
        precision: Decimals of floats.
        file: Stream to print to (default ``sys.stdout``).
    """

    def __init__(self, every: int = 1, precision: int = 4, file: TextIO | None = None) -> None:
        if every < 1:
            raise ValueError(f"ConsoleLogger every must be >= 1, got {every}")
        self.every = every
        self.precision = precision
        self.file = file

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.file if self.file is not None else sys.stdout)

    def format(self, metrics: Mapping[str, Any], step: int | None = None) -> str:
        """The line printed for ``metrics``, e.g. ``step 10 | loss 0.1234 | phase fp``."""
        parts = [] if step is None else [f"step {step}"]
        parts += [f"{k} {_fmt(v, self.precision)}" for k, v in metrics.items()]
        return " | ".join(parts)

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """Print metrics every ``every`` steps."""
        if step % self.every == 0:
            self._write(self.format(metrics, step))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Print the summary on one line."""
        self._write("summary | " + self.format(summary))

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Print the table as aligned text."""
        check_table(name, columns, rows)
        cells = [list(map(str, columns))] + [[_fmt(v, self.precision) for v in r] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        lines = [f"table {name}"] + [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells
        ]
        self._write("\n".join(lines))

