"""Data sets from local files (nothing is downloaded): MNIST in its standard IDX files.

>>> from backprop.datasets import load_mnist
>>> (X_train, y_train), (X_test, y_test) = load_mnist("~/data/mnist")    # doctest: +SKIP
>>> X_train.shape, X_train.dtype, y_train[:5]                            # doctest: +SKIP
((60000, 784), dtype('float32'), array([5, 0, 4, 1, 9], dtype=uint8))

The IDX format: two zero bytes, a type code (``0x08`` unsigned byte, ``0x09`` signed byte, ``0x0B`` int16,
``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a
big-endian uint32, then the data, big-endian, in C order. Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MNIST_FILES", "IDXError", "load_mnist", "read_idx", "write_idx"]

#: IDX type code -> big-endian NumPy dtype
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

#: part -> file stem; each is looked up as ``stem``, ``stem.gz`` and with ``.idx`` for ``-idx`` (the
#: spelling of some mirrors: ``train-images.idx3-ubyte``).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class IDXError(ValueError):
    """A file is not a well-formed IDX file (bad magic number, truncated, trailing bytes, bad gzip)."""


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if opener is gzip.open:
            raise IDXError(f"{path}: not a readable gzip file ({exc})") from None
        raise


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a NumPy array of its native type (native byte order).

    Raises :class:`IDXError` (a ``ValueError``) naming the file for a bad magic number, an unknown type
    code, a header or data shorter than the header announces, or bytes after the data.
    """
    path = Path(path).expanduser()
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_TYPES:
        raise IDXError(f"{path}: bad magic number 0x{data[:4].hex()}: an IDX file starts with two zero bytes and "
                       f"a type code among {', '.join(f'0x{c:02X}' for c in _IDX_TYPES)}"
                       + (" (is it gzip-compressed without a .gz name?)" if data[:2] == b"\x1f\x8b" else ""))
    if ndim == 0:
        raise IDXError(f"{path}: bad magic number 0x{data[:4].hex()}: zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    count = math.prod(shape)  # Python integers: a huge header cannot overflow
    expected = count * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise IDXError(f"{path}: truncated: shape {shape} of {dtype.name} needs {expected} data bytes, "
                       f"the file has {got}")
    if got > expected:
        raise IDXError(f"{path}: {got - expected} unexpected bytes after the data of shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    names = [stem, stem.replace("-idx", ".idx")]
    candidates = [directory / (n + ext) for n in dict.fromkeys(names) for ext in ("", ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{directory}: no {stem} file; looked for {', '.join(c.name for c in candidates)}")


def load_mnist(path: str | os.PathLike[str], *, normalize: bool = True, flatten: bool = True,
               dtype: Any = "float32") -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load MNIST (or Fashion-MNIST, same files) from a directory holding the four standard IDX files.

    ``path``: a directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``.
    Returns ``(X_train, y_train), (X_test, y_test)``: images as ``dtype`` scaled to ``[0, 1]`` when
    ``normalize`` (else the raw 0..255 values), flattened to ``(n, rows * cols)`` when ``flatten`` (else
    ``(n, rows, cols)``); labels as ``uint8``.

    Raises ``FileNotFoundError`` naming a missing file, :class:`IDXError` for a malformed one, and
    ``ValueError`` when images and labels disagree (counts, shapes, labels outside 0..9).
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory {directory} does not exist or is not a directory")
    out = []
    for split in ("train", "test"):
        img_path = _find(directory, MNIST_FILES[f"{split}_images"])
        lab_path = _find(directory, MNIST_FILES[f"{split}_labels"])
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{img_path}: expected 3-D unsigned-byte images, got shape {images.shape} "
                             f"of {images.dtype}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(f"{lab_path}: expected 1-D unsigned-byte labels, got shape {labels.shape} "
                             f"of {labels.dtype}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: {images.shape[0]} images in {img_path.name} but {labels.shape[0]} labels "
                             f"in {lab_path.name}")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lab_path}: labels must lie in 0..9, found {int(labels.max())}")
        X = images.reshape(images.shape[0], -1) if flatten else images
        X = X.astype(dtype)
        if normalize:
            X /= 255
        out.append((X, labels))
    if out[0][0].shape[1:] != out[1][0].shape[1:]:
        raise ValueError(f"training images have shape {out[0][0].shape[1:]} but test images {out[1][0].shape[1:]}")
    return out[0], out[1]


def write_idx(path: str | os.PathLike[str], array: Any) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``); the inverse of
    :func:`read_idx`, for tests and for small data sets of one's own."""
    arr = np.asarray(array)
    codes = {v.newbyteorder("=") if v.itemsize > 1 else v: k for k, v in _IDX_TYPES.items()}
    key = arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype
    if key not in codes:
        raise TypeError(f"IDX cannot store {arr.dtype}; it stores {', '.join(v.name for v in _IDX_TYPES.values())}")
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got {arr.ndim}")
    code = codes[key]
    payload = (bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
               + np.ascontiguousarray(arr, dtype=_IDX_TYPES[code]).tobytes())
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)
