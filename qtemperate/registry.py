"""One generic string-keyed registry for models, losses, schedules and importances.

A recipe names things by string; a :class:`Registry` turns the string into the
object and, when the key is unknown, raises an error that lists every known key so
the user sees the typo at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from string keys to objects (usually classes or factories).

    Example:
        >>> MODELS: Registry[Callable] = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny(): ...
        >>> MODELS.get("tiny") is tiny
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, key: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``key``; usable as a decorator when ``obj`` is omitted.

        Raises:
            ValueError: if ``key`` is already registered.
        """

        def _add(item: T) -> T:
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = item
            return item

        if obj is None:
            return _add
        return _add(obj)

    def get(self, key: str) -> T:
        """Return the object registered under ``key``.

        Raises:
            KeyError: naming the unknown key and listing the known ones.
        """
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {key!r}; known: {known}") from None

    def unregister(self, key: str) -> T:
        """Remove ``key`` and return what it held (for tests and plugins that clean up).

        Raises:
            KeyError: naming the unknown key and listing the known ones.
        """
        item = self.get(key)
        del self._entries[key]
        return item

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def keys(self) -> list[str]:
        """Sorted list of registered keys."""
        return sorted(self._entries)
