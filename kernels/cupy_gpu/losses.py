"""The loss and the error at the output layer, and the sum of squares of an L2 penalty, on the device.

* Output error: the loss value and the output delta in two kernels (the delta and per-block partial sums,
  then their sum), numerically stable: log-sum-exp with a row max for softmax + cross-entropy, sigmoid +
  BCE from the logits; row weights, when given, scale each row's loss and delta in the first kernel.
  Deterministic: no atomics. Their small scratch buffers are cached per (device, shape, dtype) and never freed.
* :func:`add_sum_of_squares` keeps an L2 penalty on the device in the same way: no host read.
"""

from __future__ import annotations

import numpy as np

from .. import cupy_sources as src
from ..contract import check_weights
from ..registry import ACTIVATIONS, LOSSES
from .compiled import _raw
from .device import Array, _buffer, _contiguous, _scalar, _scratch

_LOSS_PAIRS = frozenset(src.loss_pairs())


def output_error(
    y: Array, u: Array | None, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0, *,
    delta: Array | None = None, value: Array | None = None, weights: Array | None = None,
) -> tuple[Array, Array]:
    """The mean loss (a 0-d array, ``value`` when given) and ``delta^L`` (into ``delta`` when given), in
    two kernels (see the module docstring); with ``weights``, each row's loss and delta times its weight.
    Their scratch (per-row or per-block sums, the stand-in for absent weights) is cached."""
    dtype = y.dtype
    batch = y.shape[0]
    check_weights(weights, batch, dtype)
    delta = _buffer(delta, y.shape, dtype, "delta")
    value = _buffer(value, (), dtype, "value")
    y, t = _contiguous(y), _contiguous(t)
    # unweighted: a cached one-element array stands in for w, which the kernels then never read
    w = _scratch("no_weights", (1,), dtype) if weights is None else _contiguous(weights)
    weighted = np.int32(weights is not None)
    if loss in LOSSES and LOSSES[loss].rowwise:  # softmax + cross-entropy
        if u is None:
            raise ValueError("cross_entropy needs the output logits u")
        u = _contiguous(u)
        rows, cols = y.shape
        rowloss = _scratch("rowloss", (max(rows, 1),), dtype)
        grid = (rows + src.ROWS_PER_BLOCK - 1) // src.ROWS_PER_BLOCK
        if rows:
            _raw("bp_softmax_xent", dtype)(
                (grid,), (src.BLOCK,),
                (y, u, t, w, weighted, delta, rowloss, np.int64(rows), np.int64(cols), _scalar(batch, dtype)))
        _raw("bp_sum_scale", dtype)((1,), (src.BLOCK,), (rowloss, np.int64(rows), _scalar(batch, dtype), value))
        return value, delta
    if loss not in src.LOSS_BODY:
        raise ValueError(f"unknown loss {loss!r}")
    if (output, loss) not in _LOSS_PAIRS:
        raise ValueError(f"output {output!r} does not go with loss {loss!r}")
    needs_u = LOSSES[loss].fused or ACTIVATIONS[output].needs_u
    if needs_u and u is None:
        raise ValueError(f"{output} + {loss} needs the output pre-activation u")
    u = _contiguous(u) if u is not None else y  # not read when not needed
    n = y.size
    blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_LOSS_BLOCKS))
    partial = _scratch("loss_partial", (blocks,), dtype)
    _raw(src.loss_kernel_name(output, loss), dtype)(
        (blocks,), (src.BLOCK,),
        (y, u, t, w, weighted, delta, partial, np.int64(n), np.int64(max(y.shape[1], 1)), _scalar(batch, dtype),
         _scalar(param, dtype), _scalar(alpha, dtype)))
    _raw("bp_sum_scale", dtype)((1,), (src.BLOCK,), (partial, np.int64(blocks), _scalar(batch, dtype), value))
    return value, delta


def add_sum_of_squares(total: Array, a: Array) -> None:
    """``total[0] += sum(a^2)`` on the device, no host read: per-block sums of squares in ``a``'s dtype,
    then one block adds them and accumulates into the float64 ``(1,)`` array ``total`` in float64."""
    if total.dtype != np.float64 or total.shape != (1,):
        raise ValueError(f"total must be a float64 array of shape (1,), got {total.dtype} {tuple(total.shape)}")
    a = _contiguous(a)
    n = a.size
    blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_GUARD_BLOCKS))
    partial = _scratch("squares_partial", (blocks,), a.dtype)
    _raw("bp_sum_squares", a.dtype)((blocks,), (src.BLOCK,), (a, partial, np.int64(n)))
    _raw("bp_add_to_total", a.dtype)((1,), (src.BLOCK,), (partial, np.int64(blocks), total))
