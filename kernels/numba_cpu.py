"""Numba CPU backend: NumPy's BLAS for the GEMMs, fused Numba kernels for everything around them.

Every GEMM stays with the BLAS that NumPy links (``np.matmul``, into ``out=`` buffers where that
saves an allocation); Numba fuses what NumPy does in several passes with temporaries:

* ``layer_forward``: ``u = x W^T`` (BLAS), then bias + activation in one pass over ``u``, in
  place when ``u`` is not kept (softmax row by row, max subtracted, in the same pass);
* ``delta_backward``: ``g = delta W`` (BLAS), then ``g *= phi(y_prev)`` in place, one pass;
* ``weight_gradients``: ``delta^T x`` (BLAS, into ``dW``) and the bias gradient as one column
  reduction;
* ``output_error``: loss value and ``delta`` in one kernel (softmax + cross-entropy through
  log-sum-exp of the logits, sigmoid + BCE from the logits);
* ``guard_step``: the finiteness scan of the gradients and the guard's bookkeeping, one kernel;
  ``add_sum_of_squares``: one float64 reduction;
* ``sgd_update`` / ``momentum_update`` / ``adam_update``: one fused pass each (skipped, without
  touching any state, when the guard says the step is not to be applied);
* ``one_hot``, ``gather_rows``: one pass each; ``array_stats`` is the reference's (NumPy reductions).

With the keyword buffers of the contract (``y=``, ``u=``, ``out=``, ``delta=``, ``value=``,
``dW=``, ``db=``) a training step allocates no array: the GEMMs write into them (``out=``) and
the kernels work in place.

Kernels are ``@njit(parallel=True, nogil=True, fastmath=False, cache=True, error_model="numpy")``; the
activation and the loss are integer codes dispatched inside each kernel
(:mod:`backprop.kernels.numba_math`), so the backend compiles one kernel per primitive and
dtype, not one per activation (under a minute for both dtypes on a cold cache, then loaded
from ``__pycache__`` in well under a second).
Within a kernel each activation and loss has a loop of its own, so that LLVM vectorizes it; the loops
and the ladder that picks one are generated from the registry's scalar forms
(:mod:`backprop.kernels.registry`, :func:`backprop.kernels.numba_math.dispatch`).

float32 stays float32: constants are made with the arrays' dtype, scalars are cast to it before
a kernel is called, and ``exp``, ``tanh``, ``expm1`` and ``log1p`` of a float32 are float32
polynomial versions (a few ulp) that vectorize, where libm's would be one call per element;
``erf`` (GELU) is libm's. float64 uses libm throughout.

Threads: a kernel runs on ``min(numba.get_num_threads(), elements // PARALLEL_GRAIN)`` threads
(see :data:`PARALLEL_GRAIN`): the passes of typical layers stay on the calling thread,
where a thread pool would only wait on NumPy's spinning BLAS threads; passes over tens of
million elements use the cores that ``numba.get_num_threads()`` allows (all by default).

Python threads: the kernels release the GIL (``nogil=True``), as NumPy's BLAS does, so threads running
passes on different networks or batches run at once. Numba's ``workqueue`` threading layer (the fallback where
neither TBB nor OpenMP is found) cannot run parallel kernels from two threads at once (it aborts the process):
under it, kernel calls take one lock and run one at a time.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads, types
from numba.extending import overload

from . import numba_math as nm
# arrays are NumPy arrays: these primitives are the reference's (array_stats: NumPy's min and max decide
# finiteness in two vectorised passes, faster than a Numba pass that also switches the thread count)
from .contract import Capabilities, check_weights
from .numpy_ref import (  # noqa: F401
    adam_corrections, array_stats, copy_into, count_correct, count_step, fail_step, probing, synchronize, to_device,
    to_host, zeros,
)

NAME = "numba"
CAPABILITIES = Capabilities()
Array = Any

#: Array module of this backend's arrays: they are plain NumPy arrays.
xp = np

_JIT = dict(parallel=True, nogil=True, fastmath=False, cache=True, error_model="numpy")
#: Helpers called from the kernels. ``error_model="numpy"``: a float division by zero gives
#: inf/NaN as in NumPy instead of raising, which also lets the loops with a division vectorize.
_HELPER = njit(error_model="numpy")
#: The generated ladders on the codes and the row helpers they reach, inlined by Numba into the kernels:
#: no call per row. Measured on one thread: the output error of a 256 x 10 softmax layer took 25 us
#: through calls and takes 19 us inlined, mse 14 against 10 us. Compiling takes longer on a cold cache:
#: about 50 s against 36 s for both dtypes (``python -m backprop.warmup``).
_LADDER = njit(error_model="numpy", inline="always")

#: Elements of work per thread: a kernel over ``n`` elements runs on
#: ``min(numba.get_num_threads(), n // PARALLEL_GRAIN)`` threads, at least one. A fused pass over
#: a million float32 takes a fraction of a millisecond on one core, and waking a thread pool
#: right after a BLAS call costs more than that whenever the cores are busy: NumPy's BLAS leaves
#: its threads spinning after each GEMM, and on a loaded machine a parallel region waits for a
#: scheduler time slice (milliseconds) at its barrier. Measured on a 2-core machine with
#: OpenBLAS: the SGD update of a 1825 x 1825 layer (3.3 million elements) on two threads made the
#: training step of a net with N = 1e7 take 133 ms against 76 ms on one thread (numpy: 79 ms). So
#: only passes over tens of millions of elements go parallel. Set ``BACKPROP_NUMBA_GRAIN``
#: (elements) or this attribute to change it; ``numba.set_num_threads`` still caps the thread count.
PARALLEL_GRAIN = int(os.environ.get("BACKPROP_NUMBA_GRAIN", 1 << 24))


# --------------------------------------------------------------------------- float32 math
def _exp(x):  # type: ignore[no-untyped-def]
    """``exp`` for the kernels: libm's for float64; for float32 the polynomial below, which LLVM
    vectorizes (libm's ``expf`` is a call per element, NumPy's ``exp`` is SIMD)."""
    return math.exp(x)


@overload(_exp, jit_options={"error_model": "numpy"})
def _exp_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp32(x):  # type: ignore[no-untyped-def]
        # Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial
        # (max error about 1 ulp); 2^k is built from its bits in two halves so that results
        # down to the denormals come out right. np.floor, not math.floor: the latter is int64.
        f = np.float32
        xc = x
        if xc < f(-104.0):
            xc = f(-104.0)
        if xc > f(88.75):
            xc = f(88.75)
        if not (xc == xc):
            xc = f(0.0)
        k = np.floor(xc * f(1.4426950408889634) + f(0.5))
        r = xc - k * f(0.693359375) - k * f(-2.12194440e-4)
        p = f(1.9875691500e-4)
        p = p * r + f(1.3981999507e-3)
        p = p * r + f(8.3334519073e-3)
        p = p * r + f(4.1665795894e-2)
        p = p * r + f(1.6666665459e-1)
        p = p * r + f(5.0000001201e-1)
        y = p * r * r + r + f(1.0)
        ki = np.int32(k)
        k1 = ki >> np.int32(1)
        s1 = np.int32((k1 + np.int32(127)) << np.int32(23)).view(np.float32)
        s2 = np.int32((ki - k1 + np.int32(127)) << np.int32(23)).view(np.float32)
        res = y * s1 * s2
        if x < f(-104.0):
            res = f(0.0)
        if x > f(88.72283935546875):
            res = f(np.inf)
        if not (x == x):
            res = x
        return res

    return exp32


def _tanh(x):  # type: ignore[no-untyped-def]
    return math.tanh(x)


@overload(_tanh, inline="always", jit_options={"error_model": "numpy"})
def _tanh_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.tanh(x)

    def tanh32(x):  # type: ignore[no-untyped-def]
        # Cephes tanhf: odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above (about 2 ulp)
        f = np.float32
        ax = abs(x)
        z = x * x
        p = f(-5.70498872745e-3)
        p = p * z + f(2.06390887954e-2)
        p = p * z + f(-5.37397155531e-2)
        p = p * z + f(1.33314422036e-1)
        p = p * z + f(-3.33332819422e-1)
        small = p * z * x + x
        big = f(1.0) - f(2.0) / (_exp(ax + ax) + f(1.0))
        big = -big if x < f(0.0) else big
        return small if ax < f(0.625) else big

    return tanh32


def _expm1(x):  # type: ignore[no-untyped-def]
    return math.expm1(x)


@overload(_expm1, inline="always", jit_options={"error_model": "numpy"})
def _expm1_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.expm1(x)

    def expm1_32(x):  # type: ignore[no-untyped-def]
        # Taylor series to x^8 / 8! below |x| = 0.5 (relative error < 1e-8), exp(x) - 1 above
        f = np.float32
        p = f(1.0 / 40320.0)
        p = p * x + f(1.0 / 5040.0)
        p = p * x + f(1.0 / 720.0)
        p = p * x + f(1.0 / 120.0)
        p = p * x + f(1.0 / 24.0)
        p = p * x + f(1.0 / 6.0)
        p = p * x + f(0.5)
        small = (p * x + f(1.0)) * x
        big = _exp(x) - f(1.0)
        return small if abs(x) < f(0.5) else big

    return expm1_32


def _log1p(x):  # type: ignore[no-untyped-def]
    """``log(1 + x)``; the registry's scalar forms call it only with ``0 <= x <= 1``."""
    return math.log1p(x)


@overload(_log1p, jit_options={"error_model": "numpy"})
def _log1p_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.log1p(x)

    def log1p32(x):  # type: ignore[no-untyped-def]
        # log(1 + x) = 2 atanh(s), s = x / (2 + x) in [0, 1/3] for x in [0, 1]: odd series to s^17
        f = np.float32
        s = x / (f(2.0) + x)
        z = s * s
        p = f(1.0 / 17.0)
        p = p * z + f(1.0 / 15.0)
        p = p * z + f(1.0 / 13.0)
        p = p * z + f(1.0 / 11.0)
        p = p * z + f(1.0 / 9.0)
        p = p * z + f(1.0 / 7.0)
        p = p * z + f(1.0 / 5.0)
        p = p * z + f(1.0 / 3.0)
        p = p * z + f(1.0)
        return f(2.0) * s * p

    return log1p32


_m = nm.build(_HELPER, exp=_exp, tanh=_tanh, expm1=_expm1, log1p=_log1p)
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


def _act_loop(f, name):  # type: ignore[no-untyped-def]
    def act_loop(a, i, n, alpha, c):  # pragma: no cover - compiled
        for j in range(n):
            a[i, j] = f(a[i, j], alpha, c)
    return _named(act_loop, f"act_loop_{name}")


def _slope_loop(phi, name):  # type: ignore[no-untyped-def]
    def slope_loop(g, y, u, i, n, alpha, c):  # pragma: no cover - compiled
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
def _rowwise_act(a, i, n, code, alpha, c):  # pragma: no cover - compiled
    """Softmax of row ``i``, max subtracted; any other code here is unknown: NaN, which the step's guard
    refuses (never another activation's formula)."""
    if code == nm.SOFTMAX:
        mx = _row_max(a, i, n)
        for j in range(n):
            a[i, j] = _exp(a[i, j] - mx)
        inv = c[nm.ONE] / _row_sum(a, i, n, c[nm.ZERO])
        for j in range(n):
            a[i, j] = a[i, j] * inv
    else:
        for j in range(n):
            a[i, j] = c[nm.NAN]


@_HELPER
def _nan_slope_row(g, y, u, i, n, code, alpha, c):  # pragma: no cover - compiled
    for j in range(n):
        g[i, j] = c[nm.NAN]


@_LADDER
def _rowwise_loss(y, u, t, d, i, n, code, k, c):  # pragma: no cover - compiled
    """Cross-entropy of row ``i`` from the logits, ``t_j (lse - u_j)`` per element into ``d`` (scratch),
    ``lse = max + log sum exp(u - max)``; any other code here is unknown: NaN."""
    if code == nm.CROSS_ENTROPY:
        mx = _row_max(u, i, n)
        for j in range(n):
            d[i, j] = _exp(u[i, j] - mx)
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
#: ``a[i, :] = f(a[i, :])`` in place (softmax row-wise). One array for reads and writes: two arguments
#: pointing at the same row would defeat the vectorizer.
_act_row = nm.dispatch(_LADDER, "act_row", "a, i, n, code, alpha, c", {
    k: None if k in nm.LINEAR else _act_loop(_m.activations[name][0], name) for k, name in _ELEMENTWISE},
    _rowwise_act)
#: ``g[i, :] *= phi(y[i, :])`` (``f'(u[i, :])`` for the activations that read ``u``).
_slope_row = nm.dispatch(_LADDER, "slope_row", "g, y, u, i, n, code, alpha, c", {
    k: None if k in nm.LINEAR else _slope_loop(_m.activations[name][1], name) for k, name in _ELEMENTWISE},
    _nan_slope_row)
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


# --------------------------------------------------------------------------- kernels
@njit(**_JIT)
def _all_finite(a):  # pragma: no cover - compiled
    bad = 0
    for i in prange(a.shape[0]):
        if not math.isfinite(a[i]):
            bad += 1
    return bad == 0


def _dispatching_kernels(registry_key: str):  # type: ignore[no-untyped-def]
    """The kernels that dispatch on activation and loss codes. Each closes over ``registry_key`` (a digest
    of the registry's scalar forms), which Numba's cache index includes: a kernel compiled from another
    registry is never loaded from the on-disk cache."""

    @njit(**_JIT)
    def _bias_act(u, b, y, code, alpha, keep_u):  # pragma: no cover - compiled
        """``u += b``, then ``y = f(u)`` row by row, in place when ``y`` is ``u`` (``keep_u`` False)."""
        registry_key  # noqa: B018 - keys the cache
        c = _consts(u)
        m, n = u.shape
        for i in prange(m):
            for j in range(n):
                u[i, j] += b[j]
            if keep_u:
                for j in range(n):
                    y[i, j] = u[i, j]
            _act_row(y, i, n, code, alpha, c)

    @njit(**_JIT)
    def _slope_mul(g, y, u, code, alpha):  # pragma: no cover - compiled
        """``g *= phi(y)`` in place (``f'(u)`` for the activations that read ``u``)."""
        registry_key  # noqa: B018 - keys the cache
        c = _consts(g)
        m, n = g.shape
        for i in prange(m):
            _slope_row(g, y, u, i, n, code, alpha, c)

    @njit(**_JIT)
    def _output_error(y, u, t, w, weighted, delta, lcode, acode, fused, k, alpha, out):  # pragma: no cover
        """Loss and ``delta`` in one pass over the rows; ``out[0]`` receives the mean loss. ``weighted``: row
        ``i``'s loss and delta are multiplied by ``w[i]`` (``w`` is not read otherwise)."""
        registry_key  # noqa: B018 - keys the cache
        c = _consts(y)
        m, n = y.shape
        inv_b = c[nm.ONE] / y.dtype.type(m)
        total = c[nm.ZERO]
        for i in prange(m):
            row = _loss_row(y, u, t, delta, i, n, lcode, fused, k, inv_b, c)
            if not fused:
                _slope_row(delta, y, u, i, n, acode, alpha, c)
            if weighted:
                wi = w[i]
                row = row * wi
                for j in range(n):
                    delta[i, j] = delta[i, j] * wi
            total += row
        out[0] = total / y.dtype.type(m)

    return _bias_act, _slope_mul, _output_error


_bias_act, _slope_mul, _output_error = _dispatching_kernels(nm.REGISTRY_KEY)


@njit(**_JIT)
def _colsum(d, out, coef, accumulate, nthreads):  # pragma: no cover - compiled
    """The bias gradient: ``out = coef * sum_i d[i, :]`` (``out += ...`` when ``accumulate``;
    ``out`` is only read then). Blocks of rows are summed in parallel, then their partial sums."""
    m, n = d.shape
    nch = min(nthreads, max(1, m // 64))
    part = np.zeros((nch, n), d.dtype)
    for ch in prange(nch):
        lo = ch * m // nch
        hi = (ch + 1) * m // nch
        for i in range(lo, hi):
            for j in range(n):
                part[ch, j] += d[i, j]
    for j in range(n):
        s = part[0, j]
        for ch in range(1, nch):
            s += part[ch, j]
        if accumulate:
            out[j] += coef * s
        else:
            out[j] = coef * s


@njit(**_JIT)
def _sgd(p, g, lr, wd):  # pragma: no cover - compiled
    """``p <- p - lr (g + wd p)`` (flat arrays; ``g`` alone without weight decay, as the reference)."""
    c = _consts(p)
    for i in prange(p.shape[0]):
        p[i] = _sgd_step(p[i], g[i], lr, wd, c)


@njit(**_JIT)
def _momentum(p, g, v, lr, mu, nesterov, wd):  # pragma: no cover - compiled
    """``g' = g + wd p``, ``v <- mu v + g'``, ``p <- p - lr v`` (Nesterov: ``- lr (g' + mu v)``)."""
    for i in prange(p.shape[0]):
        p[i], v[i] = _momentum_step(p[i], g[i], v[i], lr, mu, nesterov, wd)


@njit(**_JIT)
def _adam(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd):  # pragma: no cover - compiled
    """Adam: ``m``, ``v`` moments, ``p <- p - (lr / c1) m / (sqrt(v / c2) + eps)``."""
    for i in prange(p.shape[0]):
        p[i], m[i], v[i] = _adam_step(p[i], g[i], m[i], v[i], lr_c1, c2, b1, b2, omb1, omb2, eps, wd)


@njit(**_JIT)
def _sgd_probe(p, g, lr, wd):  # pragma: no cover - compiled
    """How many elements of :func:`_sgd`'s result would not be finite (nothing written)."""
    c = _consts(p)
    bad = 0
    for i in prange(p.shape[0]):
        if not _finite(_sgd_step(p[i], g[i], lr, wd, c)):
            bad += 1
    return bad


@njit(**_JIT)
def _momentum_probe(p, g, v, lr, mu, nesterov, wd):  # pragma: no cover - compiled
    """How many elements of :func:`_momentum`'s ``v`` and ``p`` would not be finite (nothing written)."""
    bad = 0
    for i in prange(p.shape[0]):
        pi, vi = _momentum_step(p[i], g[i], v[i], lr, mu, nesterov, wd)
        if not (_finite(pi) and _finite(vi)):
            bad += 1
    return bad


@njit(**_JIT)
def _adam_probe(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd):  # pragma: no cover - compiled
    """How many elements of :func:`_adam`'s ``m``, ``v`` and ``p`` would not be finite (nothing written)."""
    bad = 0
    for i in prange(p.shape[0]):
        pi, mi, vi = _adam_step(p[i], g[i], m[i], v[i], lr_c1, c2, b1, b2, omb1, omb2, eps, wd)
        if not (_finite(pi) and _finite(mi) and _finite(vi)):
            bad += 1
    return bad


@njit(**_JIT)
def _guard_step(guard, loss, grads, weight):  # pragma: no cover - compiled
    """The guard's bookkeeping (``guard`` float64, ``loss`` a 1-element view of the 0-d loss):
    ``guard[1] += 1``; ok when no step failed yet, the loss and every gradient are finite;
    ``guard[0] = ok``; ``guard[3] += weight * loss`` when ok, else ``guard[2] = guard[1]`` the
    first time. The scan of the gradients stays in their dtype, and is skipped once a step has
    failed (the guard is sticky); only the guard's own arithmetic is float64."""
    guard[1] += 1.0
    ok = guard[2] == 0.0 and math.isfinite(loss[0])
    bad = 0
    if ok:
        for i in prange(grads.shape[0]):
            if not math.isfinite(grads[i]):
                bad += 1
    if ok and bad == 0:
        guard[0] = 1.0
        guard[3] += weight * np.float64(loss[0])
    else:
        guard[0] = 0.0
        if guard[2] == 0.0:
            guard[2] = guard[1]


@njit(**_JIT)
def _add_sum_of_squares(total, a, nthreads):  # pragma: no cover - compiled
    """``total[0] += sum_i a[i]^2`` in float64 (blocks of elements in parallel, then in order)."""
    n = a.shape[0]
    nch = min(nthreads, max(1, n // 4096))
    part = np.zeros(nch)
    for ch in prange(nch):
        lo = ch * n // nch
        hi = (ch + 1) * n // nch
        s = 0.0
        for i in range(lo, hi):
            v = np.float64(a[i])
            s += v * v
        part[ch] = s
    s = 0.0
    for ch in range(nch):
        s += part[ch]
    total[0] += s


@njit(**_JIT)
def _one_hot(labels, out):  # pragma: no cover - compiled
    """``out[i, :] = e_{labels[i]}`` (labels whole numbers in range, any numeric dtype)."""
    c = _consts(out)
    m, n = out.shape
    for i in prange(m):
        for j in range(n):
            out[i, j] = c[nm.ZERO]
        out[i, np.int64(labels[i])] = c[nm.ONE]


@njit(**_JIT)
def _gather_rows(src, idx, out):  # pragma: no cover - compiled
    """``out[i, :] = src[idx[i], :]`` (2-D views); returns how many indices were out of range
    (their rows are left as they were)."""
    m, n = out.shape
    rows = src.shape[0]
    bad = 0
    for i in prange(m):
        k = idx[i]
        if k < 0:
            k += rows
        if k < 0 or k >= rows:
            bad += 1
        else:
            for j in range(n):
                out[i, j] = src[k, j]
    return bad


#: Every compiled kernel (the tests inspect their float32 code).
KERNELS = (_all_finite, _bias_act, _slope_mul, _output_error, _colsum, _sgd, _momentum, _adam, _sgd_probe,
           _momentum_probe, _adam_probe, _guard_step,
           _add_sum_of_squares, _one_hot, _gather_rows)
#: Kernels that compute in float64 on purpose whatever their input's dtype, so the float32 check
#: of the tests leaves them out: ``_guard_step`` keeps the float64 guard (step count, loss sum,
#: the float32 loss widened to be added to it; its per-element scan of the gradients does no
#: float64 arithmetic); ``_add_sum_of_squares`` sums in float64 as the contract says; the
#: statistics read every element as float64 (they serve input checks, and integer arrays go
#: through them too).
FLOAT64_KERNELS = (_guard_step, _add_sum_of_squares)


# --------------------------------------------------------------------------- compile notice
#: Printed to stderr, once per process, just before the first kernel is compiled (a cold cache takes
#: seconds per kernel); not printed when the kernels load from Numba's on-disk cache.
#: ``BACKPROP_QUIET=1`` (or ``true``/``yes``) silences it.
COMPILE_NOTICE = "backprop: compiling numba kernels (first run only, cached afterwards)..."
_KERNEL_IDS = frozenset(id(k) for k in KERNELS)
_noticed = False


def _quiet() -> bool:
    return os.environ.get("BACKPROP_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def _compile_notice(dispatcher: Any) -> bool:
    """Print :data:`COMPILE_NOTICE` if ``dispatcher`` is one of :data:`KERNELS`, the notice was not printed
    yet and ``BACKPROP_QUIET`` is unset; True when it printed. Called by Numba's ``numba:compile`` event,
    which Numba fires only on a real compilation: after the in-memory overloads and the on-disk cache
    (``dispatcher._cache.load_overload``) both missed the signature."""
    global _noticed
    if _noticed or id(dispatcher) not in _KERNEL_IDS or _quiet():
        return False
    _noticed = True
    print(COMPILE_NOTICE, file=sys.stderr, flush=True)
    return True


def _install_compile_notice() -> bool:
    """Listen to Numba's ``numba:compile`` events (Numba >= 0.53); False where that API is missing."""
    try:
        from numba.core import event
    except ImportError:  # pragma: no cover - another Numba layout
        return False

    class _Notice(event.Listener):  # type: ignore[misc]
        def on_start(self, ev: Any) -> None:
            data = ev.data
            if isinstance(data, dict):
                _compile_notice(data.get("dispatcher"))

        def on_end(self, ev: Any) -> None:
            pass

    event.register("numba:compile", _Notice())
    return True


_install_compile_notice()


# --------------------------------------------------------------------------- housekeeping
def is_available() -> bool:
    """True: importing this module already needed Numba."""
    return True


def unavailable_reason() -> str:
    return ""


def is_simulated() -> bool:
    return False


def all_finite(a: Array) -> bool:
    flat = np.ascontiguousarray(a).reshape(-1)
    return bool(_run(_all_finite, flat.size, flat)) if flat.size else True


# --------------------------------------------------------------------------- calling kernels
def _thread_count_functions() -> tuple[Any, Any]:
    """``(get, set)`` for Numba's thread count. The public functions validate and make sure the
    pool is started on every call (about 1 us each, twice per kernel call); once the pool is
    started, the unchecked functions they call are 5x faster. Falls back to the public ones.
    Also sets :data:`_one_at_a_time` for the threading layer the pool started on."""
    global _one_at_a_time
    get_num_threads()  # starts the thread pool
    _one_at_a_time = threading.Lock() if _layer_is_serial() else None
    try:
        from numba.np.ufunc.parallel import _get_num_threads, _set_num_threads

        if _get_num_threads() == get_num_threads():
            return _get_num_threads, _set_num_threads
    except ImportError:  # pragma: no cover - another Numba layout
        pass
    return get_num_threads, set_num_threads  # pragma: no cover


def _layer_is_serial() -> bool:
    """True under Numba's ``workqueue`` threading layer, which aborts when two threads run parallel kernels."""
    try:
        from numba import threading_layer

        return bool(threading_layer() == "workqueue")
    except (ImportError, ValueError):  # pragma: no cover - no layer reported: assume the unsafe one
        return True


_get_threads: Any = None
_set_threads: Any = None
#: A lock every kernel call takes under the ``workqueue`` threading layer; ``None`` under TBB and OpenMP.
_one_at_a_time: threading.Lock | None = None


def _threads(work: int) -> int:
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    return min(_get_threads(), max(1, work // PARALLEL_GRAIN))


def _run(kernel: Any, work: int, *args: Any) -> Any:
    """``kernel(*args)`` on as many threads as ``work`` elements justify (see
    :data:`PARALLEL_GRAIN`), at most the caller's ``numba.get_num_threads()``; its result."""
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    if _one_at_a_time is not None:
        with _one_at_a_time:
            return _sized(kernel, work, args)
    return _sized(kernel, work, args)


def _sized(kernel: Any, work: int, args: tuple[Any, ...]) -> Any:
    """``kernel(*args)`` on the threads ``work`` justifies (:func:`_run`)."""
    cur = _get_threads()
    want = min(cur, max(1, work // PARALLEL_GRAIN))
    if want == cur:
        return kernel(*args)
    _set_threads(want)
    try:
        return kernel(*args)
    finally:
        _set_threads(cur)


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array (in-place updates need a view, not a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("in-place updates need C-contiguous arrays (make them with to_device/zeros)")
    return a.reshape(-1)


def _skipped(guard: Array | None) -> bool:
    """True when a guard says this step must not be applied (the guard is a host array here)."""
    return guard is not None and guard[0] != 1.0


def _verdict(guard: Array, bad: int) -> None:
    """A probe's verdict on the (host) guard: the step fails when ``bad`` results were not finite."""
    if bad:
        fail_step(guard)


# --------------------------------------------------------------------------- arrays
def owns(a: Any) -> bool:
    """True for NumPy arrays, the arrays of this backend."""
    return isinstance(a, np.ndarray)


def as_array(a: Array, dtype: Any) -> Array:
    """``a`` as a C-contiguous array of ``dtype``: ``a`` itself when it already is one, else a copy."""
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous:
        return a
    return np.asarray(a, dtype=dtype, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d


def one_hot(labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
    """Rows ``e_{labels[i]}`` of length ``n_classes`` (labels whole numbers in ``[0, n_classes)``,
    any numeric dtype), into ``out`` when given."""
    if out is None:
        out = np.empty((labels.shape[0], n_classes), dtype=dtype)
    _run(_one_hot, out.size, labels.reshape(-1), out)
    return out


def gather_rows(src: Array, idx: Array, out: Array) -> Array:
    """``out[i] = src[idx[i]]``: the rows of a minibatch, picked by an int64 index array; one pass."""
    rows = src.shape[0]
    s2 = src.reshape(rows, -1) if src.ndim != 2 else src
    o2 = out.reshape(out.shape[0], -1) if out.ndim != 2 else out
    if _run(_gather_rows, o2.size, s2, idx, o2):
        raise IndexError(f"gather_rows: an index is out of range for {rows} rows")
    return out


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
    y: Array | None = None, u: Array | None = None,
) -> tuple[Array, Array | None]:
    """``u = x W^T`` by BLAS, then ``y = f(u + b)`` in one fused pass; ``(y, u if keep_u)``.

    Without ``keep_u`` the GEMM writes into ``y`` (when given) and the epilogue works in place;
    with it the GEMM writes into ``u`` and the activation into ``y`` (each when given)."""
    code = nm.act_code(act)
    dt = W.dtype
    shape = (x.shape[0], W.shape[0])
    if keep_u:
        if u is None:
            u = np.empty(shape, dtype=dt)
        if y is None:
            y = np.empty(shape, dtype=dt)
        np.matmul(x, W.T, out=u)
        _run(_bias_act, u.size, u, _c(b), y, code, dt.type(alpha), True)
        return y, u
    if y is None:
        y = np.empty(shape, dtype=dt)
    np.matmul(x, W.T, out=y)
    _run(_bias_act, y.size, y, _c(b), y, code, dt.type(alpha), False)
    return y, None


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0, *,
    out: Array | None = None,
) -> Array:
    """``g = delta W`` by BLAS (into ``out`` when given), then ``g *= phi(y_prev)`` in place (one pass)."""
    code = nm.act_code(act_prev)
    if code == nm.SOFTMAX:
        raise ValueError("activation 'softmax' has no elementwise slope")
    if code in nm.NEEDS_U and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = np.matmul(delta, W) if out is None else np.matmul(delta, W, out=out)
    if code not in nm.LINEAR:
        y_prev = _c(y_prev)
        u_prev = y_prev if u_prev is None else _c(u_prev)
        _run(_slope_mul, g.size, g, y_prev, u_prev, code, g.dtype.type(alpha_prev))
    return g


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """``dW = delta^T x_prev`` (BLAS, written into ``dW`` when given), ``db`` = column sums of delta."""
    delta = _c(delta)
    if dW is None:
        dW = np.matmul(delta.T, x_prev)
    else:
        np.matmul(delta.T, x_prev, out=dW)
    if db is None:
        db = np.empty(delta.shape[1], dtype=delta.dtype)
    nt = _threads(delta.size)
    _run(_colsum, delta.size, delta, db, delta.dtype.type(1), False, nt)
    return dW, db


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array | None, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0, *,
    delta: Array | None = None, value: Array | None = None, weights: Array | None = None,
) -> tuple[Array, Array]:
    """Mean loss ``E`` (a 0-d array of ``y``'s dtype) and ``delta = dE/du`` in one fused pass, into
    ``value`` and ``delta`` when given: ``delta = (y - t) / batch`` for the fused pairs,
    ``dL/dy * phi(y) / batch`` otherwise; with ``weights``, each row's loss and delta times its weight."""
    lcode, acode, fused = nm.output_loss_codes(output, loss, u is not None)
    y = _c(y)
    dt = y.dtype
    check_weights(weights, y.shape[0], dt)
    w = _no_weights(dt) if weights is None else _c(weights)
    if u is None:
        u = y
    u = np.ascontiguousarray(u, dtype=dt)
    t = np.ascontiguousarray(t, dtype=dt)
    if delta is None:
        delta = np.empty_like(y)
    if value is None:
        value = np.empty((), dtype=dt)
    _run(_output_error, y.size, y, u, t, w, weights is not None, delta, lcode, acode, fused, dt.type(param),
         dt.type(alpha), value.reshape(1))
    return value, delta


_NO_WEIGHTS: dict[np.dtype, np.ndarray] = {}


def _no_weights(dtype: np.dtype) -> np.ndarray:
    """The ``w`` argument of an unweighted ``_output_error`` (never read): one cached array per dtype, so that
    weighted and unweighted calls share the kernel's one signature per dtype. Keyed by the dtype itself: a
    lookup by ``dtype.str`` (which builds the string) took 0.3 us, a tenth of the Python side of the call."""
    w = _NO_WEIGHTS.get(dtype)
    if w is None:
        w = _NO_WEIGHTS[dtype] = np.ones(1, dtype=dtype)
    return w


# --------------------------------------------------------------------------- guarded updates
def guard_step(guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None:
    """Decide whether this step may be applied and keep the tally (``GUARD_*`` layout, float64):
    ``guard[1] += 1``; ``ok = guard[2] == 0 and isfinite(loss) and all(isfinite(grads))``;
    ``guard[0] = ok``; if ok ``guard[3] += weight * loss``, elif ``guard[2] == 0``:
    ``guard[2] = guard[1]`` (the first failing step, sticky). One kernel, no Python-side read."""
    _run(_guard_step, grads.size, guard, loss.reshape(1), _flat(grads), float(weight))


def add_sum_of_squares(total: Array, a: Array) -> None:
    """``total[0] += sum_ij a_ij^2``, summed in float64 into the float64 ``(1,)`` array ``total`` (an
    L2 penalty ``||W||^2`` kept on the backend over many steps); one pass."""
    if total.dtype != np.float64 or total.shape != (1,):
        raise ValueError(f"total must be a float64 array of shape (1,), got {total.dtype} {tuple(total.shape)}")
    flat = np.ascontiguousarray(a).reshape(-1)
    _run(_add_sum_of_squares, flat.size, total, flat, _threads(flat.size))


def sgd_update(p: Array, g: Array, lr: float, weight_decay: float = 0.0, guard: Array | None = None,
               probe: bool = False) -> None:
    """Plain SGD, in place, one fused pass: ``p <- p - eta (g + lambda p)`` (skipped when ``guard``
    is given and ``guard[0] != 1``; ``probe``: the same pass, writing only the guard's verdict)."""
    if _skipped(guard):
        return
    dt = p.dtype.type
    args = (_flat(p), _c(g).reshape(-1), dt(lr), dt(weight_decay))
    if probing(guard, probe):
        _verdict(guard, _run(_sgd_probe, p.size, *args))
    else:
        _run(_sgd, p.size, *args)


def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused pass: ``g' = g + lambda p``,
    ``v <- mu v + g'``, ``p <- p - eta v`` (Nesterov: ``p <- p - eta (g' + mu v)``); ``p`` and
    ``v`` untouched when ``guard`` is given and ``guard[0] != 1``."""
    if _skipped(guard):
        return
    dt = p.dtype.type
    args = (_flat(p), _c(g).reshape(-1), _flat(v), dt(lr), dt(momentum), bool(nesterov), dt(weight_decay))
    if probing(guard, probe):
        _verdict(guard, _run(_momentum_probe, p.size, *args))
    else:
        _run(_momentum, p.size, *args)


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: Any, weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """Adam with bias corrections, in place, one fused pass: ``m <- b1 m + (1-b1) g'``,
    ``v <- b2 v + (1-b2) g'^2``, ``p <- p - eta m_hat / (sqrt(v_hat) + eps)`` with
    ``g' = g + lambda p`` and corrections ``1 - b^step``; ``step`` an int, or the corrections array of
    :func:`adam_corrections` (``lr`` then unused); ``p``, ``m``, ``v`` untouched when ``guard`` is
    given and ``guard[0] != 1``."""
    if _skipped(guard):
        return
    dt = p.dtype.type
    if isinstance(step, (int, np.integer)):
        lr_c1, c2 = dt(lr / (1.0 - beta1**step)), dt(1.0 - beta2**step)
    else:
        lr_c1, c2 = dt(step[0]), dt(step[1])
    args = (_flat(p), _c(g).reshape(-1), _flat(m), _flat(v), lr_c1, c2, dt(beta1), dt(beta2), dt(1.0 - beta1),
            dt(1.0 - beta2), dt(eps), dt(weight_decay))
    if probing(guard, probe):
        _verdict(guard, _run(_adam_probe, p.size, *args))
    else:
        _run(_adam, p.size, *args)
