"""The scikit-learn estimators' data on its way to the network: cast to the network's dtype (a value too large
for it is an error, not an infinity), and cut into minibatches on the backend in scikit-learn's order (dense
data moved to the backend once, sparse data densified a minibatch at a time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from sklearn.utils import gen_batches

from . import step
from .validation import cast_finite

if TYPE_CHECKING:
    from .network import MLP
    from .staging import Batches

__all__ = ["cast_data", "minibatches"]


def cast_data(X: Any, dtype: np.dtype, name: str = "X", first_row: int = 0) -> Any:
    """``X`` (dense, or a sparse matrix) cast to the network's ``dtype``; a value too large for it is a
    ``ValueError`` naming ``name`` instead of an infinity (float64 ``X`` of 1e39 for a float32 network).
    ``first_row``: where this chunk of rows starts in the caller's ``X``."""
    if X.dtype == dtype:
        return X
    if sp.issparse(X):
        data = cast_finite(X.data, dtype, f"{name} (its stored values)")
        X = X.copy()
        X.data = data
        return X
    return cast_finite(X, dtype, name, offset=(first_row, 0))


def minibatches(net: MLP, data: Batches | None, X: Any, y: np.ndarray, batch_size: int,
                order: np.ndarray | None) -> Iterator[tuple[int, Any, Any]]:
    """``(rows, x, t)`` on the backend for each minibatch of an epoch, in scikit-learn's order (``order``: the
    shuffled row numbers, or ``None``): from ``data`` (dense rows already on their way to the backend), else
    from the sparse ``X`` and its targets ``y``."""
    if data is not None:
        def staging(rows: int) -> tuple[Any, Any]:
            ws = step.workspace(net, rows)
            return ws.x, ws.t

        yield from data.epoch(batch_size, order, staging)
        return
    k = net.backend.kernels
    for batch_slice in gen_batches(X.shape[0], batch_size):
        idx = order[batch_slice] if order is not None else batch_slice
        xb, tb = X[idx].toarray(), y[idx]
        yield tb.shape[0], k.to_device(xb, net.dtype), k.to_device(tb, net.dtype)
