"""Test helper: register an entry for the duration of a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qtemperate.registry import Registry


@contextmanager
def registered(registry: Registry[Any], key: str, obj: Any) -> Iterator[str]:
    """``registry.register(key, obj)``, undone on exit; yields ``key``."""
    registry.register(key, obj)
    try:
        yield key
    finally:
        registry.unregister(key)
