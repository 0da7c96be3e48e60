from __future__ import annotations

import pytest

from qtemperate.registry import Registry


def test_register_get_and_error_lists_known_keys() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)

    @reg.register("a")
    def make_a() -> int:
        return 1

    assert reg.get("a") is make_a and reg.get("b") == 2
    assert reg.keys() == ["a", "b"] and list(reg) == ["a", "b"] and "a" in reg
    with pytest.raises(KeyError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 3)


def test_unregister_removes_and_returns_the_entry() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    assert reg.unregister("a") == 1
    assert reg.keys() == ["b"] and "a" not in reg
    reg.register("a", 3)  # the key is free again
    assert reg.get("a") == 3
    with pytest.raises(KeyError, match=r"unknown widget 'c'; known: a, b"):
        reg.unregister("c")
