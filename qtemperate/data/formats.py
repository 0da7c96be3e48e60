"""On-disk formats: IDX files (MNIST family), CIFAR python pickle batches, gzip.

Each reader turns one file into tensors and names the file in every error
(:class:`~qtemperate.errors.DataFormatError`, a ``ValueError``: exit 2, one line);
none of them knows about datasets, splits or normalisation (see
:mod:`qtemperate.data.datasets`).

CIFAR batches are pickles, and unpickling can run code; :func:`load_cifar_batch`
uses an unpickler that accepts only what that format holds (dicts, lists, bytes,
numbers and NumPy arrays of numbers) and refuses anything else by name.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtemperate.errors import DataFormatError

__all__ = ["CIFAR_IMAGE_SHAPE", "load_cifar_batch", "read_idx", "read_maybe_gzip"]

CIFAR_IMAGE_SHAPE = (3, 32, 32)
"""``(C, H, W)`` of one CIFAR image; a batch row holds ``3 * 32 * 32`` bytes."""

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_maybe_gzip(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when the file starts with the gzip magic.

    Raises:
        DataFormatError: naming the file when it cannot be decompressed (a truncated or
            damaged ``.gz``).
    """
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head != b"\x1f\x8b":
        return Path(path).read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataFormatError(f"cannot read {path}: truncated or damaged gzip file ({exc})") from None


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    The header is two zero bytes, a dtype code, the number of dimensions and one
    big-endian ``uint32`` per dimension (images: magic 2051, labels: magic 2049).

    Args:
        path: File to read; gzip is detected from the content, not the name.
        expected_ndim: If given, the number of dimensions the file must have.

    Returns:
        A tensor of the file's shape (``uint8`` for byte data).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file on a bad magic number, an unexpected number of
            dimensions or a truncated/oversized payload.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = read_maybe_gzip(path)
    if len(data) < 4:
        raise DataFormatError(f"not an IDX file: {path} is only {len(data)} bytes long")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(
            f"not an IDX file: {path} has magic number {magic} (0x{magic:08x}); "
            "expected 2051 for images or 2049 for labels"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataFormatError(
            f"IDX file {path} has {ndim} dimensions (magic {magic}), expected {expected_ndim}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataFormatError(f"IDX file {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[dtype_code]
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        raise DataFormatError(
            f"IDX file {path} declares shape {tuple(shape)} ({expected} bytes) "
            f"but holds {payload} bytes of data"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def load_cifar_batch(path: str | os.PathLike[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR python batch (a pickled dict with ``b"data"`` and a label list).

    A row of ``b"data"`` is 1024 red, 1024 green, then 1024 blue bytes, each plane
    row-major 32x32, so ``row.reshape(3, 32, 32)`` is the ``(C, H, W)`` image.

    Args:
        path: The batch file (``data_batch_1``, ``test_batch``, ``train``, ...).
        label_key: ``b"labels"`` (CIFAR-10), ``b"fine_labels"`` or ``b"coarse_labels"``
            (CIFAR-100).

    Returns:
        ``(images, labels)``: ``uint8`` ``(N, 3, 32, 32)`` and ``int64`` ``(N,)``.

    Raises:
        DataFormatError: naming the file when it does not unpickle, pickles anything but
            arrays, dicts, lists and numbers (nothing from it is executed), lacks the keys
            or holds rows of the wrong length.
    """
    path = Path(path)
    try:
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes())).load()
    except _Refused as exc:
        raise DataFormatError(
            f"refused to load CIFAR batch {path}: it pickles {exc}, which a CIFAR batch never "
            "holds (loading it could run code)"
        ) from None
    except Exception as exc:
        raise DataFormatError(f"cannot unpickle CIFAR batch {path}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataFormatError(f"CIFAR batch {path} lacks the keys b'data' and {label_key!r}")
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels_np = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"CIFAR batch {path}: b'data' or labels are not numbers ({exc})") from None
    row = int(np.prod(CIFAR_IMAGE_SHAPE))
    if data.ndim != 2 or data.shape[1] != row:
        raise DataFormatError(f"CIFAR batch {path}: b'data' has shape {data.shape}, expected (N, {row})")
    images = torch.from_numpy(data.reshape(-1, *CIFAR_IMAGE_SHAPE).copy())
    labels = torch.as_tensor(labels_np)
    return images, labels


class _Refused(Exception):
    """A global a CIFAR batch never holds."""


# What numpy arrays and Python 3 bytes pickles reference, and nothing else: rebuilding
# an ndarray (from its state, or a buffer with protocol 5), its dtype, and (protocol 2
# from Python 3) bytes via _codecs. None of them calls anything the pickle names.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_CIFAR_GLOBALS` (``encoding="bytes"``)."""

    def __init__(self, fh: io.BytesIO) -> None:
        super().__init__(fh, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)
