"""The fault-injection hook: inert without its variable, exact about which hit it acts on."""

from __future__ import annotations

import errno

import pytest

from qtemperate import _faults


def test_inert_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_faults.ENV, raising=False)
    for _ in range(3):
        _faults.fault_point("write:checkpoint.pt")


def test_acts_on_the_nth_hit_of_its_point_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_faults.ENV, "teacher_step@3=enospc; write:x.pt=enospc")
    _faults.reset()
    _faults.fault_point("teacher_step")
    _faults.fault_point("stage_switch")
    _faults.fault_point("teacher_step")
    with pytest.raises(OSError) as info:
        _faults.fault_point("teacher_step")
    assert info.value.errno == errno.ENOSPC
    _faults.fault_point("teacher_step")  # the 4th hit: nothing
    with pytest.raises(OSError):
        _faults.fault_point("write:x.pt")
    monkeypatch.setenv(_faults.ENV, "teacher_step=explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        _faults.fault_point("teacher_step")
