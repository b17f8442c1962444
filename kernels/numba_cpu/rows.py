"""The row helpers of the Numba CPU kernels: the compiled scalar forms, per-row loops and the ladders on the codes.

The registry's scalar forms and the optimizer steps are compiled here with the float32 math of
:mod:`~backprop.kernels.numba_cpu.float32_math` (:func:`backprop.kernels.numba_math.build`). Each activation,
slope and loss then gets a loop over one row of its own, so that LLVM vectorizes it (a switch on the code inside
the loop would not), and a generated ladder on the code (:func:`backprop.kernels.numba_math.dispatch`) calls the
right loop; an unknown code gives NaN, never another record's formula. The ladders are inlined into the kernels of
:mod:`~backprop.kernels.numba_cpu.compiled`, which key their on-disk cache on this file's source.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import numba_math as nm
from .float32_math import exp, expm1, log1p, tanh

#: Helpers called from the kernels. ``error_model="numpy"``: a float division by zero gives
#: inf/NaN as in NumPy instead of raising, which also lets the loops with a division vectorize.
_HELPER = njit(error_model="numpy")
#: The generated ladders on the codes and the row helpers they reach, inlined by Numba into the kernels:
#: no call per row. Measured on one thread: the output error of a 256 x 10 softmax layer took 25 us
#: through calls and takes 19 us inlined, mse 14 against 10 us. Compiling takes longer on a cold cache:
#: about 50 s against 36 s for both dtypes (``python -m backprop.warmup``).
_LADDER = njit(error_model="numpy", inline="always")

_m = nm.build(_HELPER, exp=exp, tanh=tanh, expm1=expm1, log1p=log1p)
_consts = _m.consts
_sgd_step, _momentum_step, _adam_step, _finite = _m.sgd_step, _m.momentum_step, _m.adam_step, _m.finite


# --------------------------------------------------------------------------- row helpers
# Each activation, slope and loss gets a loop of its own, so that LLVM vectorizes it: a switch
# on the code inside the loop would not vectorize. The loops work on one row, in place.
@_HELPER
def _row_max(a, i, n):  # pragma: no cover - compiled
    """Max of ``a[i, :n]`` with 8 independent accumulators (vectorizes without fastmath)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[i, 0]
    j = 0
    while j + 8 <= n:
        m0 = a[i, j] if a[i, j] > m0 else m0
        m1 = a[i, j + 1] if a[i, j + 1] > m1 else m1
        m2 = a[i, j + 2] if a[i, j + 2] > m2 else m2
        m3 = a[i, j + 3] if a[i, j + 3] > m3 else m3
        m4 = a[i, j + 4] if a[i, j + 4] > m4 else m4
        m5 = a[i, j + 5] if a[i, j + 5] > m5 else m5
        m6 = a[i, j + 6] if a[i, j + 6] > m6 else m6
        m7 = a[i, j + 7] if a[i, j + 7] > m7 else m7
        j += 8
    while j < n:
        m0 = a[i, j] if a[i, j] > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@_HELPER
def _row_sum(a, i, n, zero):  # pragma: no cover - compiled
    """Sum of ``a[i, :n]`` with 8 independent accumulators (vectorizes without fastmath)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    j = 0
    while j + 8 <= n:
        s0 += a[i, j]
        s1 += a[i, j + 1]
        s2 += a[i, j + 2]
        s3 += a[i, j + 3]
        s4 += a[i, j + 4]
        s5 += a[i, j + 5]
        s6 += a[i, j + 6]
        s7 += a[i, j + 7]
        j += 8
    while j < n:
        s0 += a[i, j]
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


# One loop per activation and per loss, made from the registry's scalar forms, and a generated ladder
# on the code that calls the right one (numba_math.dispatch).
def _named(fn, name):  # type: ignore[no-untyped-def]
    """``fn`` under a name of its own, before it is compiled. Numba names a compiled function after its
    ``__qualname__`` and a counter local to the process: loops made by one factory must not share a name, or two
    kernels loaded from the on-disk cache (compiled in different processes) could link each other's loops."""
    fn.__name__ = fn.__qualname__ = name
    return _HELPER(fn)


def _bias_act_loop(f, name):  # type: ignore[no-untyped-def]
    def bias_act_loop(u, y, b, i0, i1, n, keep, alpha, c):  # pragma: no cover - compiled
        # every store writes a new value: an in-place `y = f(y)` whose branch leaves y as it was compiles to a
        # masked store, ten times slower per element on AMD cores
        if keep:
            for i in range(i0, i1):
                for j in range(n):
                    v = u[i, j] + b[j]
                    u[i, j] = v
                    y[i, j] = f(v, alpha, c)
        else:
            for i in range(i0, i1):
                for j in range(n):
                    y[i, j] = f(y[i, j] + b[j], alpha, c)
    return _named(bias_act_loop, f"bias_act_loop_{name}")


def _slope_loop(phi, name):  # type: ignore[no-untyped-def]
    def slope_loop(g, y, u, i0, i1, n, alpha, c):  # pragma: no cover - compiled
        for i in range(i0, i1):
            for j in range(n):
                g[i, j] = g[i, j] * phi(y[i, j], u[i, j], alpha, c)
    return _named(slope_loop, f"slope_loop_{name}")


def _loss_loop(value, name):  # type: ignore[no-untyped-def]
    def loss_loop(y, u, t, d, i, n, k, c):  # pragma: no cover - compiled
        for j in range(n):
            d[i, j] = value(y[i, j], u[i, j], t[i, j], k, c)
    return _named(loss_loop, f"loss_loop_{name}")


def _grad_loop(grad, name):  # type: ignore[no-untyped-def]
    def grad_loop(y, t, d, i, n, k, inv_b, c):  # pragma: no cover - compiled
        for j in range(n):
            d[i, j] = grad(y[i, j] - t[i, j], k, c) * inv_b
    return _named(grad_loop, f"grad_loop_{name}")


@_LADDER
def _rowwise_bias_act(u, y, b, i0, i1, n, keep, code, alpha, c):  # pragma: no cover - compiled
    """``u += b``, then softmax of each row into ``y``, max subtracted; any other code here is unknown: NaN, which
    the step's guard refuses (never another activation's formula)."""
    for i in range(i0, i1):
        for j in range(n):
            v = u[i, j] + b[j]
            u[i, j] = v
            y[i, j] = v
        if code == nm.SOFTMAX:
            mx = _row_max(y, i, n)
            for j in range(n):
                y[i, j] = exp(y[i, j] - mx)
            inv = c[nm.ONE] / _row_sum(y, i, n, c[nm.ZERO])
            for j in range(n):
                y[i, j] = y[i, j] * inv
        else:
            for j in range(n):
                y[i, j] = c[nm.NAN]


@_HELPER
def _nan_slope_rows(g, y, u, i0, i1, n, code, alpha, c):  # pragma: no cover - compiled
    for i in range(i0, i1):
        for j in range(n):
            g[i, j] = c[nm.NAN]


@_LADDER
def _rowwise_loss(y, u, t, d, i, n, code, k, c):  # pragma: no cover - compiled
    """Cross-entropy of row ``i`` from the logits, ``t_j (lse - u_j)`` per element into ``d`` (scratch),
    ``lse = max + log sum exp(u - max)``; any other code here is unknown: NaN."""
    if code == nm.CROSS_ENTROPY:
        mx = _row_max(u, i, n)
        for j in range(n):
            d[i, j] = exp(u[i, j] - mx)
        lse = mx + np.log(_row_sum(d, i, n, c[nm.ZERO]))
        for j in range(n):
            d[i, j] = t[i, j] * (lse - u[i, j])
    else:
        for j in range(n):
            d[i, j] = c[nm.NAN]


@_HELPER
def _nan_grad_row(y, t, d, i, n, code, k, inv_b, c):  # pragma: no cover - compiled
    for j in range(n):
        d[i, j] = c[nm.NAN]


_ELEMENTWISE = [(nm.ACT_CODES[name], name) for name in _m.activations]
#: ``u[i, :] += b``, then ``y[i, :] = f(u[i, :])`` for the rows ``i0 <= i < i1`` (``keep``: ``u`` is kept, ``y`` a
#: separate array; else ``y`` is ``u``, done in place); softmax row-wise. One call per block of rows: a call per
#: row costs more than a narrow row's arithmetic.
_bias_act_rows = nm.dispatch(_LADDER, "bias_act_rows", "u, y, b, i0, i1, n, keep, code, alpha, c", {
    k: _bias_act_loop(_m.activations[name][0], name) for k, name in _ELEMENTWISE}, _rowwise_bias_act)
#: ``g[i, :] *= phi(y[i, :])`` (``f'(u[i, :])`` for the activations that read ``u``) for the rows ``i0 <= i < i1``.
_slope_rows = nm.dispatch(_LADDER, "slope_rows", "g, y, u, i0, i1, n, code, alpha, c", {
    k: None if k in nm.LINEAR else _slope_loop(_m.activations[name][1], name) for k, name in _ELEMENTWISE},
    _nan_slope_rows)
#: ``d[i, :] =`` the loss of each element of row ``i`` (cross-entropy: ``t_j (lse - u_j)``).
_loss_values_row = nm.dispatch(_LADDER, "loss_values_row", "y, u, t, d, i, n, code, k, c", {
    nm.LOSS_CODES[name]: _loss_loop(value, name) for name, (value, _) in _m.losses.items()}, _rowwise_loss)
#: ``d[i, :] = dL/dy(y - t) / batch`` for the elementwise (not fused) losses.
_loss_grad_row = nm.dispatch(_LADDER, "loss_grad_row", "y, t, d, i, n, code, k, inv_b, c", {
    nm.LOSS_CODES[name]: _grad_loop(grad, name) for name, (_, grad) in _m.losses.items() if grad is not None},
    _nan_grad_row)


@_LADDER
def _loss_row(y, u, t, d, i, n, lcode, fused, k, inv_b, c):  # pragma: no cover - compiled
    """Loss of row ``i`` (returned) and ``d[i, :] = dL/dy / batch``, or ``(y - t) / batch`` for a fused
    pair (``dL/du``); ``d`` serves as scratch first."""
    _loss_values_row(y, u, t, d, i, n, lcode, k, c)
    row = _row_sum(d, i, n, c[nm.ZERO])
    if fused:
        for j in range(n):
            d[i, j] = (y[i, j] - t[i, j]) * inv_b
    else:
        _loss_grad_row(y, t, d, i, n, lcode, k, inv_b, c)
    return row


@_LADDER
def _error_row(y, u, t, w, weighted, delta, i, n, lcode, acode, fused, k, alpha, inv_b, c):  # pragma: no cover
    """The error at the output for row ``i``: ``delta[i, :] = dE/du`` (``(y - t) / batch`` for a fused pair, else
    ``dL/dy * phi(y) / batch``), times ``w[i]`` when ``weighted``; returns the row's (weighted) loss."""
    row = _loss_row(y, u, t, delta, i, n, lcode, fused, k, inv_b, c)
    if not fused:
        _slope_rows(delta, y, u, i, i + 1, n, acode, alpha, c)
    if weighted:
        wi = w[i]
        row = row * wi
        for j in range(n):
            delta[i, j] = delta[i, j] * wi
    return row
