from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtemperate.checkpoint import load_checkpoint, save_atomic


def test_save_atomic_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_atomic({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_missing_checkpoint_names_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")
