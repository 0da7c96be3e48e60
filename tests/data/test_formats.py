"""Tests of qtemperate.data.formats: IDX files and CIFAR pickle batches."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qtemperate import data as D
from qtemperate.data.formats import read_maybe_gzip
from tests.data.fakes import write_idx

# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4) * 7
    labels = np.array([4, 0, 9], dtype=np.uint8)
    pi = write_idx(tmp_path / "img-idx3-ubyte", images, gz)
    pl = write_idx(tmp_path / "lab-idx1-ubyte", labels, gz)
    got_i = D.read_idx(pi, expected_ndim=3)
    got_l = D.read_idx(pl, expected_ndim=1)
    assert got_i.dtype == torch.uint8 and got_i.shape == (3, 2, 4)
    assert got_i.tolist() == images.tolist()
    assert got_l.tolist() == [4, 0, 9]


def test_read_idx_bad_magic_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(struct.pack(">IIII", 0x12345678, 1, 1, 1) + b"\x00")
    with pytest.raises(ValueError, match=r"bad-idx3-ubyte.*magic number 305419896"):
        D.read_idx(bad)


def test_read_idx_wrong_ndim_and_truncated(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "lab", np.array([1, 2, 3], dtype=np.uint8), gz=False)
    with pytest.raises(ValueError, match="expected 3"):
        D.read_idx(p, expected_ndim=3)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"lab.*holds 2 bytes"):
        D.read_idx(p)


def test_read_idx_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        D.read_idx("/nonexistent/train-images-idx3-ubyte")


def test_read_maybe_gzip_detects_content_not_name(tmp_path: Path) -> None:
    plain = tmp_path / "data.gz"  # a misleading name: the content is not compressed
    plain.write_bytes(b"\x00\x00\x08\x01abc")
    packed = tmp_path / "data"
    packed.write_bytes(gzip.compress(b"hello"))
    assert read_maybe_gzip(plain) == b"\x00\x00\x08\x01abc"
    assert read_maybe_gzip(packed) == b"hello"
    broken = tmp_path / "broken"
    broken.write_bytes(gzip.compress(b"hello")[:-6])
    with pytest.raises(ValueError, match=r"cannot read .*broken"):
        read_maybe_gzip(broken)


# --------------------------------------------------------------------------- CIFAR batches


def test_load_cifar_batch_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [7, 1]}))
    x, y = D.load_cifar_batch(path, b"labels")
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == [7, 1]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    assert x[1, 0, 0, 5].item() == data[1, 5]
    assert x[1, 1, 2, 3].item() == data[1, 1024 + 2 * 32 + 3]
    assert x[0, 2, 31, 31].item() == data[0, 3071]


def test_load_cifar_batch_errors_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot unpickle CIFAR batch .*garbage"):
        D.load_cifar_batch(garbage, b"labels")
    keyless = tmp_path / "keyless"
    keyless.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match=r"keyless lacks the keys b'data' and b'fine_labels'"):
        D.load_cifar_batch(keyless, b"fine_labels")
    short = tmp_path / "short"
    short.write_bytes(pickle.dumps({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"short: b'data' has shape \(1, 100\), expected \(N, 3072\)"):
        D.load_cifar_batch(short, b"labels")


# --------------------------------------------------------------------------- untrusted files


def test_malformed_data_files_are_data_format_errors(tmp_path: Path) -> None:
    from qtemperate.errors import DataFormatError

    p = write_idx(tmp_path / "lab", np.array([1, 2, 3], dtype=np.uint8), gz=True)
    p.write_bytes(p.read_bytes()[:-10])  # a truncated download
    with pytest.raises(DataFormatError, match=r"lab.gz: truncated or damaged gzip"):
        D.read_idx(p)
    corrupt = bytearray(gzip.compress(b"\x00\x00\x08\x01" + bytes(100)))
    corrupt[12:20] = b"\xff" * 8  # damaged deflate stream
    (tmp_path / "corrupt").write_bytes(bytes(corrupt))
    with pytest.raises(DataFormatError, match="corrupt"):
        D.read_idx(tmp_path / "corrupt")
    (tmp_path / "html").write_bytes(b"<html>not found</html>")  # wrong magic
    with pytest.raises(DataFormatError, match=r"html has magic number"):
        D.read_idx(tmp_path / "html")


def test_cifar_batch_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    from qtemperate.errors import DataFormatError
    from tests.malicious import evil_cifar_batch

    marker = tmp_path / "ran"
    path = evil_cifar_batch(tmp_path / "data_batch_1", marker)
    with pytest.raises(DataFormatError, match=r"refused to load CIFAR batch .*data_batch_1: it pickles builtins.exec"):
        D.load_cifar_batch(path, b"labels")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch_of_arrays_loads_with_any_protocol(tmp_path: Path, protocol: int) -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"data": data, b"labels": [3, 9], b"batch_label": b"training batch 1 of 5",
             b"filenames": [b"a.png", b"b.png"]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    x, y = D.load_cifar_batch(path, b"labels")
    assert x.flatten().tolist() == data.flatten().tolist() and y.tolist() == [3, 9]
