"""Data primitives on the device: the ``STAT_*`` facts about an array (:func:`array_stats` reduces on the
device and reads back six numbers in one copy), one-hot rows (one kernel), a gather of rows (one ``take``),
and the count of correct predictions (CuPy reductions on the device; no host read)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..contract import (
    STAT_FIRST_NONFINITE,
    STAT_MAX,
    STAT_MIN,
    STAT_NON_INTEGER,
    STAT_NONFINITE,
    STAT_ROW_SUM_ERROR,
    STATS_SIZE,
)
from ..numpy_ref import count_correct  # noqa: F401  (CuPy reductions on the device; no host read)
from .compiled import _ew
from .device import Array, _buffer, _cupy, as_array


def array_stats(a: Array, integers: bool = True, row_sums: bool = True) -> np.ndarray:
    """The ``STAT_*`` facts about ``a`` (see :mod:`backprop.kernels.contract`; the non-integer count only
    with ``integers``, the row sums only with ``row_sums``), reduced on the device into one small
    float64 array and read back with one copy."""
    out = np.zeros(STATS_SIZE, dtype=np.float64)
    out[STAT_FIRST_NONFINITE] = -1
    flat = a.reshape(-1)
    if flat.size == 0:
        out[STAT_MIN] = out[STAT_MAX] = np.nan
        return out
    stats = _cupy.zeros(STATS_SIZE, dtype=np.float64)
    if a.dtype.kind == "f":  # integer and boolean arrays are finite and whole by construction
        finite = _cupy.isfinite(flat)
        stats[STAT_NONFINITE] = flat.size - _cupy.count_nonzero(finite)
        stats[STAT_FIRST_NONFINITE] = _cupy.argmin(finite)  # 0 when all are finite: fixed below
        if integers:
            stats[STAT_NON_INTEGER] = _cupy.count_nonzero(flat != _cupy.floor(flat))
    stats[STAT_MIN] = flat.min()
    stats[STAT_MAX] = flat.max()
    if row_sums and a.ndim == 2 and a.shape[0]:
        stats[STAT_ROW_SUM_ERROR] = _cupy.abs(a.sum(axis=1, dtype=np.float64) - 1).max()
    out[...] = stats.get()
    if out[STAT_NONFINITE] == 0:
        out[STAT_FIRST_NONFINITE] = -1
    return out


def one_hot(labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
    """Rows ``e_{labels[i]}`` of length ``n_classes``, one kernel writing every element of ``out``
    (a label out of range gives a row of zeros)."""
    labels = as_array(labels, np.int64).reshape(-1)
    out = _buffer(out, (labels.shape[0], int(n_classes)), dtype, "out")
    if out.size:
        _ew("bp_one_hot")(labels, np.int64(n_classes), out)
    return out


def gather_rows(src: Array, idx: Array, out: Array) -> Array:
    """``out[i] = src[idx[i]]`` (``idx`` an int64 CuPy array), on the device."""
    _cupy.take(src, idx, axis=0, out=out)
    return out
