"""Numba CPU backend: NumPy's BLAS for the GEMMs, fused Numba kernels for everything around them.

Every GEMM stays with the BLAS that NumPy links (``np.matmul``, into ``out=`` buffers where that
saves an allocation); Numba fuses what NumPy does in several passes with temporaries:

* ``layer_forward``: ``u = x W^T`` (BLAS), then bias + activation in one pass over ``u``, in
  place when ``u`` is not kept (softmax row by row, max subtracted, in the same pass);
* ``delta_backward``: ``g = delta W`` (BLAS), then ``g *= phi(y_prev)`` in place, one pass;
* ``weight_gradients``: ``delta^T x`` (BLAS, into ``dW``) and the bias gradient as one column
  reduction;
* ``sgd_update_from_delta``: ``delta^T x`` into a reused scratch buffer, then one kernel for
  ``W <- (1 - eta lambda) W - eta G`` and ``b <- b - eta sum delta``;
* ``output_error``: loss value and ``delta`` in one kernel (softmax + cross-entropy through
  log-sum-exp of the logits, sigmoid + BCE from the logits);
* ``momentum_update`` / ``adam_update``: one fused pass each.

Kernels are ``@njit(parallel=True, fastmath=False, cache=True, error_model="numpy")``; the
activation and the loss are integer codes dispatched inside each kernel
(:mod:`backprop.kernels.numba_math`), so the backend compiles 8 kernels per dtype (about 25 s
for both dtypes on a cold cache, then loaded from ``__pycache__`` in well under a second).
Within a kernel each activation has a loop of its own, so that LLVM vectorizes it.

float32 stays float32: constants are made with the arrays' dtype, scalars are cast to it before
a kernel is called, and ``exp``, ``tanh``, ``expm1`` and ``log1p`` of a float32 are float32
polynomial versions (a few ulp) that vectorize, where libm's would be one call per element;
``erf`` (GELU) is libm's. float64 uses libm throughout.

Threads: a kernel runs on ``min(numba.get_num_threads(), elements // PARALLEL_GRAIN)`` threads
(see :data:`PARALLEL_GRAIN`): the passes of typical layers stay on the calling thread,
where a thread pool would only wait on NumPy's spinning BLAS threads; passes over tens of
million elements use the cores that ``numba.get_num_threads()`` allows (all by default).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads, types
from numba.extending import overload

from . import numba_math as nm
from .numpy_ref import synchronize, to_device, to_host, zeros  # noqa: F401  (arrays are NumPy arrays)

NAME = "numba"
IS_GPU = False
Array = Any

#: Array module of this backend's arrays: they are plain NumPy arrays.
xp = np

_JIT = dict(parallel=True, fastmath=False, cache=True, error_model="numpy")
#: Helpers called from the kernels. ``error_model="numpy"``: a float division by zero gives
#: inf/NaN as in NumPy instead of raising, which also lets the loops with a division vectorize.
_HELPER = njit(error_model="numpy")

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
    """``log(1 + x)``, called by the kernels only with ``0 <= x <= 1`` (softplus, BCE)."""
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
_consts, _activate, _slope = _m.consts, _m.activate, _m.slope
_d_elu = _m.d_elu
_d_gelu = _m.d_gelu
_d_leaky_relu = _m.d_leaky_relu
_d_relu = _m.d_relu
_d_selu = _m.d_selu
_d_sigmoid = _m.d_sigmoid
_d_silu = _m.d_silu
_d_softplus = _m.d_softplus
_d_tanh = _m.d_tanh
_f_elu = _m.f_elu
_f_gelu = _m.f_gelu
_f_leaky_relu = _m.f_leaky_relu
_f_relu = _m.f_relu
_f_selu = _m.f_selu
_f_silu = _m.f_silu
_f_step = _m.f_step
_f_tanh = _m.f_tanh
_g_huber = _m.g_huber
_g_mae = _m.g_mae
_l_huber = _m.l_huber
_l_mae = _m.l_mae
_l_mse = _m.l_mse
_sigmoid = _m.sigmoid
_softplus = _m.softplus


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


@_HELPER
def _act_row(a, i, n, code, alpha, c):  # pragma: no cover - compiled
    """``a[i, :] = f(a[i, :])`` in place (softmax row-wise, max subtracted). One array for reads
    and writes: two arguments pointing at the same row would defeat the vectorizer."""
    if code == nm.RELU:
        for j in range(n):
            a[i, j] = _f_relu(a[i, j], alpha, c)
    elif code == nm.IDENTITY:
        pass
    elif code == nm.STEP:
        for j in range(n):
            a[i, j] = _f_step(a[i, j], alpha, c)
    elif code == nm.SIGMOID:
        for j in range(n):
            a[i, j] = _sigmoid(a[i, j], alpha, c)
    elif code == nm.TANH:
        for j in range(n):
            a[i, j] = _f_tanh(a[i, j], alpha, c)
    elif code == nm.LEAKY_RELU:
        for j in range(n):
            a[i, j] = _f_leaky_relu(a[i, j], alpha, c)
    elif code == nm.ELU:
        for j in range(n):
            a[i, j] = _f_elu(a[i, j], alpha, c)
    elif code == nm.SELU:
        for j in range(n):
            a[i, j] = _f_selu(a[i, j], alpha, c)
    elif code == nm.SOFTPLUS:
        for j in range(n):
            a[i, j] = _softplus(a[i, j], alpha, c)
    elif code == nm.GELU:
        for j in range(n):
            a[i, j] = _f_gelu(a[i, j], alpha, c)
    elif code == nm.SILU:
        for j in range(n):
            a[i, j] = _f_silu(a[i, j], alpha, c)
    elif code == nm.SOFTMAX:
        mx = _row_max(a, i, n)
        for j in range(n):
            a[i, j] = _exp(a[i, j] - mx)
        inv = c[nm.ONE] / _row_sum(a, i, n, c[nm.ZERO])
        for j in range(n):
            a[i, j] = a[i, j] * inv


@_HELPER
def _slope_row(g, y, u, i, n, code, alpha, c):  # pragma: no cover - compiled
    """``g[i, :] *= phi(y[i, :])`` (``f'(u[i, :])`` for GELU and SiLU)."""
    if code == nm.RELU:
        for j in range(n):
            g[i, j] = g[i, j] * _d_relu(y[i, j], u[i, j], alpha, c)
    elif code == nm.IDENTITY:
        pass
    elif code == nm.STEP:
        for j in range(n):
            g[i, j] = g[i, j] * c[nm.ZERO]
    elif code == nm.SIGMOID:
        for j in range(n):
            g[i, j] = g[i, j] * _d_sigmoid(y[i, j], u[i, j], alpha, c)
    elif code == nm.TANH:
        for j in range(n):
            g[i, j] = g[i, j] * _d_tanh(y[i, j], u[i, j], alpha, c)
    elif code == nm.LEAKY_RELU:
        for j in range(n):
            g[i, j] = g[i, j] * _d_leaky_relu(y[i, j], u[i, j], alpha, c)
    elif code == nm.ELU:
        for j in range(n):
            g[i, j] = g[i, j] * _d_elu(y[i, j], u[i, j], alpha, c)
    elif code == nm.SELU:
        for j in range(n):
            g[i, j] = g[i, j] * _d_selu(y[i, j], u[i, j], alpha, c)
    elif code == nm.SOFTPLUS:
        for j in range(n):
            g[i, j] = g[i, j] * _d_softplus(y[i, j], u[i, j], alpha, c)
    elif code == nm.GELU:
        for j in range(n):
            g[i, j] = g[i, j] * _d_gelu(y[i, j], u[i, j], alpha, c)
    elif code == nm.SILU:
        for j in range(n):
            g[i, j] = g[i, j] * _d_silu(y[i, j], u[i, j], alpha, c)


@_HELPER
def _loss_row(y, u, t, d, i, n, lcode, k, inv_b, c):  # pragma: no cover - compiled
    """Loss of row ``i`` (returned) and ``d[i, :] = dL/dy / batch``; ``d`` serves as scratch first.
    Cross-entropy: ``sum_j t_j (lse - u_j)``, ``lse = max + log sum exp(u - max)``; BCE from the
    logits: ``sum_j softplus(u_j) - t_j u_j``; both with ``dL/du = y - t``."""
    if lcode == nm.CROSS_ENTROPY:
        mx = _row_max(u, i, n)
        for j in range(n):
            d[i, j] = _exp(u[i, j] - mx)
        lse = mx + np.log(_row_sum(d, i, n, c[nm.ZERO]))
        for j in range(n):
            d[i, j] = t[i, j] * (lse - u[i, j])
    elif lcode == nm.BCE:
        for j in range(n):
            d[i, j] = _softplus(u[i, j], k, c) - t[i, j] * u[i, j]
    elif lcode == nm.MSE:
        for j in range(n):
            d[i, j] = _l_mse(y[i, j] - t[i, j], k, c)
    elif lcode == nm.MAE:
        for j in range(n):
            d[i, j] = _l_mae(y[i, j] - t[i, j], k, c)
    else:
        for j in range(n):
            d[i, j] = _l_huber(y[i, j] - t[i, j], k, c)
    row = _row_sum(d, i, n, c[nm.ZERO])
    if lcode == nm.MAE:
        for j in range(n):
            d[i, j] = _g_mae(y[i, j] - t[i, j], k, c) * inv_b
    elif lcode == nm.HUBER:
        for j in range(n):
            d[i, j] = _g_huber(y[i, j] - t[i, j], k, c) * inv_b
    else:
        for j in range(n):
            d[i, j] = (y[i, j] - t[i, j]) * inv_b
    return row


# --------------------------------------------------------------------------- kernels
@njit(**_JIT)
def _all_finite(a):  # pragma: no cover - compiled
    bad = 0
    for i in prange(a.shape[0]):
        if not math.isfinite(a[i]):
            bad += 1
    return bad == 0


@njit(**_JIT)
def _bias_act(u, b, y, code, alpha, keep_u):  # pragma: no cover - compiled
    """``u += b``, then ``y = f(u)`` row by row, in place when ``y`` is ``u`` (``keep_u`` False)."""
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
    """``g *= phi(y)`` in place (``f'(u)`` for GELU/SiLU, which read ``u``)."""
    c = _consts(g)
    m, n = g.shape
    for i in prange(m):
        _slope_row(g, y, u, i, n, code, alpha, c)


@njit(**_JIT)
def _output_error(y, u, t, delta, lcode, acode, k, alpha, out):  # pragma: no cover - compiled
    """Loss and ``delta`` in one pass over the rows; ``out[0]`` receives the mean loss."""
    c = _consts(y)
    m, n = y.shape
    inv_b = c[nm.ONE] / y.dtype.type(m)
    total = c[nm.ZERO]
    for i in prange(m):
        total += _loss_row(y, u, t, delta, i, n, lcode, k, inv_b, c)
        if lcode != nm.CROSS_ENTROPY and lcode != nm.BCE:
            _slope_row(delta, y, u, i, n, acode, alpha, c)
    out[0] = total / y.dtype.type(m)


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
def _sgd_apply(w, g, decay, coef, d, b, nthreads):  # pragma: no cover - compiled
    """``w <- decay * w + coef * g`` (flat arrays) and ``b <- b + coef * sum_i d[i, :]``."""
    c = _consts(w)
    if decay == c[nm.ONE]:
        for i in prange(w.shape[0]):
            w[i] += coef * g[i]
    else:
        for i in prange(w.shape[0]):
            w[i] = decay * w[i] + coef * g[i]
    _colsum(d, b, coef, True, nthreads)


@njit(**_JIT)
def _momentum(p, g, v, lr, mu, nesterov, wd):  # pragma: no cover - compiled
    """``g' = g + wd p``, ``v <- mu v + g'``, ``p <- p - lr v`` (Nesterov: ``- lr (g' + mu v)``)."""
    for i in prange(p.shape[0]):
        gd = g[i] + wd * p[i]
        vi = mu * v[i] + gd
        v[i] = vi
        if nesterov:
            p[i] -= lr * (gd + mu * vi)
        else:
            p[i] -= lr * vi


@njit(**_JIT)
def _adam(p, g, m, v, lr_c1, c2, b1, b2, eps, wd):  # pragma: no cover - compiled
    """Adam: ``m``, ``v`` moments, ``p <- p - (lr / c1) m / (sqrt(v / c2) + eps)``."""
    c = _consts(p)
    for i in prange(p.shape[0]):
        gd = g[i] + wd * p[i]
        mi = b1 * m[i] + (c[nm.ONE] - b1) * gd
        vi = b2 * v[i] + (c[nm.ONE] - b2) * gd * gd
        m[i] = mi
        v[i] = vi
        p[i] -= lr_c1 * mi / (np.sqrt(vi / c2) + eps)


#: Every compiled kernel (the tests inspect their float32 code).
KERNELS = (_all_finite, _bias_act, _slope_mul, _output_error, _colsum, _sgd_apply, _momentum, _adam)


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
    return bool(_all_finite(flat)) if flat.size else True


# --------------------------------------------------------------------------- calling kernels
def _thread_count_functions() -> tuple[Any, Any]:
    """``(get, set)`` for Numba's thread count. The public functions validate and make sure the
    pool is started on every call (about 1 us each, twice per kernel call); once the pool is
    started, the unchecked functions they call are 5x faster. Falls back to the public ones."""
    get_num_threads()  # starts the thread pool
    try:
        from numba.np.ufunc.parallel import _get_num_threads, _set_num_threads

        if _get_num_threads() == get_num_threads():
            return _get_num_threads, _set_num_threads
    except ImportError:  # pragma: no cover - another Numba layout
        pass
    return get_num_threads, set_num_threads  # pragma: no cover


_get_threads: Any = None
_set_threads: Any = None


def _threads(work: int) -> int:
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    return min(_get_threads(), max(1, work // PARALLEL_GRAIN))


def _run(kernel: Any, work: int, *args: Any) -> None:
    """Call ``kernel(*args)`` on as many threads as ``work`` elements justify (see
    :data:`PARALLEL_GRAIN`), at most the caller's ``numba.get_num_threads()``."""
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    cur = _get_threads()
    want = min(cur, max(1, work // PARALLEL_GRAIN))
    if want == cur:
        kernel(*args)
        return
    _set_threads(want)
    try:
        kernel(*args)
    finally:
        _set_threads(cur)


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array (in-place updates need a view, not a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("in-place updates need C-contiguous arrays (make them with to_device/zeros)")
    return a.reshape(-1)


_scratch = threading.local()


def _scratch_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer reused across calls (only for temporaries that never leave a call)."""
    pool = getattr(_scratch, "pool", None)
    if pool is None:
        pool = _scratch.pool = {}
    key = (shape, dtype.str)
    buf = pool.get(key)
    if buf is None:
        if len(pool) > 64:
            pool.clear()
        buf = pool[key] = np.empty(shape, dtype)
    return buf


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False
) -> tuple[Array, Array | None]:
    """``u = x W^T`` by BLAS, then ``y = f(u + b)`` in one fused pass; ``(y, u if keep_u)``."""
    code = nm.act_code(act)
    dt = W.dtype
    u = np.empty((x.shape[0], W.shape[0]), dtype=dt)
    np.matmul(x, W.T, out=u)
    y = np.empty_like(u) if keep_u else u
    _run(_bias_act, u.size, u, _c(b), y, code, dt.type(alpha), bool(keep_u))
    return y, (u if keep_u else None)


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0
) -> Array:
    """``g = delta W`` by BLAS, then ``g *= phi(y_prev)`` in place (one pass)."""
    code = nm.act_code(act_prev)
    if code == nm.SOFTMAX:
        raise ValueError("activation 'softmax' has no elementwise slope")
    if code in nm.NEEDS_U and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = np.matmul(delta, W)
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


def sgd_update_from_delta(
    W: Array, b: Array, delta: Array, x_prev: Array, lr: float, weight_decay: float = 0.0
) -> None:
    """``W <- (1 - eta lambda) W - eta delta^T x_prev``, ``b <- b - eta sum delta``, in place.

    ``delta^T x_prev`` goes into a per-thread scratch buffer (reused across steps, never returned)."""
    dt = W.dtype.type
    delta = _c(delta)
    G = _scratch_buffer(W.shape, W.dtype)
    np.matmul(delta.T, x_prev, out=G)
    decay = 1.0 - lr * weight_decay if weight_decay else 1.0
    work = max(W.size, delta.size)
    _run(_sgd_apply, work, _flat(W), G.reshape(-1), dt(decay), dt(-lr), delta, b, _threads(work))


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0
) -> tuple[Array, Array]:
    """Mean loss (a 0-d array of ``y``'s dtype) and ``delta = dE/du`` in one fused pass."""
    lcode, acode = nm.output_loss_codes(output, loss, u is not None)
    y = _c(y)
    dt = y.dtype
    if u is None:
        u = y
    u = np.ascontiguousarray(u, dtype=dt)
    t = np.ascontiguousarray(t, dtype=dt)
    delta = np.empty_like(y)
    out = np.empty(1, dtype=dt)
    _run(_output_error, y.size, y, u, t, delta, lcode, acode, dt.type(param), dt.type(alpha), out)
    return out.reshape(()), delta


# --------------------------------------------------------------------------- optimizers
def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused pass (see the reference)."""
    dt = p.dtype.type
    _run(_momentum, p.size, _flat(p), _c(g).reshape(-1), _flat(v), dt(lr), dt(momentum), bool(nesterov),
         dt(weight_decay))


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: int, weight_decay: float = 0.0,
) -> None:
    """Adam with bias corrections, in place, one fused pass (see the reference)."""
    dt = p.dtype.type
    c1 = 1.0 - beta1**step
    c2 = 1.0 - beta2**step
    _run(_adam, p.size, _flat(p), _c(g).reshape(-1), _flat(m), _flat(v), dt(lr / c1), dt(c2), dt(beta1),
         dt(beta2), dt(eps), dt(weight_decay))
