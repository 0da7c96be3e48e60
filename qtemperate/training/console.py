"""Human-facing output of a run: one line per epoch above tqdm progress bars."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["Console"]

T = TypeVar("T")


class Console:
    """Epoch lines and progress bars, both silenced by ``enabled=False``.

    Args:
        enabled: Show lines and bars (the CLI's ``--no-progress`` turns them off).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def say(self, line: str) -> None:
        """Print one line above any progress bar."""
        if self.enabled:
            tqdm.write(line)

    def bar(self, items: Iterable[T], desc: str, **kwargs: Any) -> Any:
        """A transient progress bar over ``items`` (plain iteration when disabled)."""
        return tqdm(items, desc=desc, disable=not self.enabled, leave=False, **kwargs)
