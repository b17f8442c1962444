"""Training data on the backend: moved once per fit, minibatches gathered where the data lives.

When the training set fits in :data:`DATA_BUDGET_FRACTION` of the device's free memory (always, on a
host backend), it is moved to the backend once and each epoch's shuffled minibatches are gathered
there by an index array, itself copied once per epoch. Otherwise it stays on the host and goes
over in chunks of whole minibatches, each gathered on the host and copied once.

The permutation is drawn on the host from the run's seed, so one seed gives the same minibatches
on every backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DATA_BUDGET_FRACTION", "Batches"]

Array = Any

#: Largest share of the device's free memory the training set may take to be kept there.
DATA_BUDGET_FRACTION = 0.5

#: Rows per chunk when the data streams from the host (rounded down to whole minibatches).
STREAM_CHUNK_BYTES = 256 << 20


def fits_on_device(kernels: Any, nbytes: int) -> bool:
    """Whether ``nbytes`` of data may be kept on the backend (always on a host backend)."""
    budget = kernels.device_memory_free() if kernels.CAPABILITIES.device_queries else None
    return budget is None or nbytes <= DATA_BUDGET_FRACTION * budget


class Batches:
    """The minibatches of ``(X, T)`` (checked arrays: the backend's own, or host arrays) for one fit."""

    def __init__(self, kernels: Any, X: Array, T: Array, dtype: np.dtype) -> None:
        self.kernels = kernels
        self.dtype = dtype
        self.n = int(X.shape[0])
        on_backend = kernels.owns(X) and kernels.owns(T)
        if not on_backend and fits_on_device(kernels, X.nbytes + T.nbytes):
            X, T, on_backend = kernels.to_device(X, dtype), kernels.to_device(T, dtype), True
        self.X, self.T = X, T
        self.resident = on_backend

    def epoch(self, batch_size: int, order: np.ndarray | None,
              buffers: Any) -> Iterator[tuple[int, Array, Array]]:
        """Yield ``(rows, x, t)`` for each minibatch of an epoch, in ``order`` (host row numbers: a
        permutation, or a subset such as one process's share; ``None`` for every row in the stored order).
        ``buffers(rows)`` gives the ``(x, t)`` staging buffers a shuffled batch of ``rows`` is gathered into."""
        k = self.kernels
        count = self.n if order is None else len(order)
        if self.resident:
            idx = None if order is None else k.to_device(order, np.int64)
            for lo in range(0, count, batch_size):
                hi = min(lo + batch_size, count)
                if idx is None:
                    yield hi - lo, self.X[lo:hi], self.T[lo:hi]
                else:
                    x, t = buffers(hi - lo)
                    rows = idx[lo:hi]
                    yield hi - lo, k.gather_rows(self.X, rows, x), k.gather_rows(self.T, rows, t)
            return
        row_bytes = (self.X.shape[1] + self.T.shape[1]) * np.dtype(self.dtype).itemsize
        chunk = max(batch_size, (STREAM_CHUNK_BYTES // max(row_bytes, 1)) // batch_size * batch_size)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            rows = slice(start, stop) if order is None else order[start:stop]
            xc, tc = k.to_device(self.X[rows], self.dtype), k.to_device(self.T[rows], self.dtype)
            for lo in range(0, stop - start, batch_size):
                hi = min(lo + batch_size, stop - start)
                yield hi - lo, xc[lo:hi], tc[lo:hi]
