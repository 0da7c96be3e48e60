"""Atomic writes: old file or complete new file, never half; full disks named with bytes."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from qtemperate import _faults
from qtemperate.atomic import (
    is_temp_file,
    remove_stale_temps,
    save_torch_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from qtemperate.errors import DiskFull, PermissionDenied


@pytest.fixture(autouse=True)
def _fresh_faults() -> None:
    _faults.reset()


def test_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # like open(), not mkstemp's 0600


def test_injected_enospc_keeps_the_old_file_and_names_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_torch_atomic({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setenv(_faults.ENV, "write:checkpoint.pt=enospc")
    payload = {"epoch": 2, "w": torch.zeros(1000)}
    with pytest.raises(DiskFull) as info:
        save_torch_atomic(payload, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # temp file removed
    assert info.value.path == path and info.value.needed is not None and info.value.needed > 4000
    assert str(path) in str(info.value) and "disk full" in str(info.value)


def test_real_enospc_from_the_os_becomes_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match=r"needs 5 bytes"):
        write_bytes_atomic(tmp_path / "x.bin", b"hello")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


def test_permission_denied_is_an_environment_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionDenied, match=r"x\.bin"):
        write_bytes_atomic(tmp_path / "x.bin", b"hello")


def test_remove_stale_temps_only_touches_temp_files(tmp_path: Path) -> None:
    for name in (".checkpoint.pt.abc123.tmp", ".student.onnx.x.tmp", "keep.tmp", "checkpoint.pt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps([tmp_path, tmp_path / "missing"])
    assert sorted(p.name for p in removed) == [".checkpoint.pt.abc123.tmp", ".student.onnx.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "keep.tmp"]
    assert is_temp_file(Path(".a.tmp")) and not is_temp_file(Path("a.tmp"))
