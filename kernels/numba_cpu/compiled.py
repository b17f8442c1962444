"""The compiled kernels of the Numba CPU backend, one per primitive and dtype.

Kernels are ``@njit(parallel=True, nogil=True, fastmath=False, cache=True, error_model="numpy")``; the ones that
dispatch on activation and loss codes run the row ladders of :mod:`~backprop.kernels.numba_cpu.rows`, the
optimizer kernels the steps of :mod:`backprop.kernels.numba_math`. Numba's on-disk cache checks only the source
file of a kernel: the dispatching kernels close over :data:`CACHE_KEY`, a digest of the registry
(:data:`backprop.kernels.numba_math.REGISTRY_KEY`) and of the sources of the row helpers and the float32 math,
which Numba's cache index includes.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import ModuleType

import numpy as np
from numba import njit, prange

from .. import numba_math as nm
from . import float32_math
from . import rows as row_helpers
from .rows import _adam_step, _bias_act_rows, _consts, _error_row, _finite, _momentum_step, _sgd_step, _slope_rows

#: The options of every kernel (see the module docstring).
_JIT = dict(parallel=True, nogil=True, fastmath=False, cache=True, error_model="numpy")


def _cache_key(*modules: ModuleType) -> str:
    """A digest of the registry key and of the source files of ``modules``, the files besides their own whose code
    the dispatching kernels compile in."""
    h = hashlib.sha256(nm.REGISTRY_KEY.encode())
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


#: Rows per call of a row helper in the elementwise kernels (a block of rows per call, not a row: the call costs more
#: than a narrow row's arithmetic).
ROWS = 64

#: What the dispatching kernels key their on-disk cache on (:func:`_cache_key`).
CACHE_KEY = _cache_key(row_helpers, float32_math)


# --------------------------------------------------------------------------- kernels
@njit(**_JIT)
def _all_finite(a):  # pragma: no cover - compiled
    bad = 0
    for i in prange(a.shape[0]):
        if not math.isfinite(a[i]):
            bad += 1
    return bad == 0


def _dispatching_kernels(cache_key: str):  # type: ignore[no-untyped-def]
    """The kernels that dispatch on activation and loss codes. Each closes over ``cache_key`` (:data:`CACHE_KEY`:
    the registry's scalar forms and the row helpers), which Numba's cache index includes: a kernel compiled from
    another registry or other row helpers is never loaded from the on-disk cache."""

    @njit(**_JIT)
    def _bias_act(u, b, y, code, alpha, keep_u):  # pragma: no cover - compiled
        """``u += b``, then ``y = f(u)``, in blocks of :data:`ROWS` rows; in place when ``y`` is ``u`` (``keep_u``
        False)."""
        cache_key  # noqa: B018 - keys the cache
        c = _consts(u)
        m, n = u.shape
        for blk in prange((m + ROWS - 1) // ROWS):
            _bias_act_rows(u, y, b, blk * ROWS, min(m, blk * ROWS + ROWS), n, keep_u, code, alpha, c)

    @njit(**_JIT)
    def _slope_mul(g, y, u, code, alpha):  # pragma: no cover - compiled
        """``g *= phi(y)`` in place (``f'(u)`` for the activations that read ``u``), in blocks of :data:`ROWS`
        rows."""
        cache_key  # noqa: B018 - keys the cache
        c = _consts(g)
        m, n = g.shape
        for blk in prange((m + ROWS - 1) // ROWS):
            _slope_rows(g, y, u, blk * ROWS, min(m, blk * ROWS + ROWS), n, code, alpha, c)

    @njit(**_JIT)
    def _output_error(y, u, t, w, weighted, delta, lcode, acode, fused, k, alpha, out):  # pragma: no cover
        """Loss and ``delta`` in one pass over the rows; ``out[0]`` receives the mean loss. ``weighted``: row
        ``i``'s loss and delta are multiplied by ``w[i]`` (``w`` is not read otherwise)."""
        cache_key  # noqa: B018 - keys the cache
        c = _consts(y)
        m, n = y.shape
        inv_b = c[nm.ONE] / y.dtype.type(m)
        total = c[nm.ZERO]
        for i in prange(m):
            total += _error_row(y, u, t, w, weighted, delta, i, n, lcode, acode, fused, k, alpha, inv_b, c)
        out[0] = total / y.dtype.type(m)

    return _bias_act, _slope_mul, _output_error


_bias_act, _slope_mul, _output_error = _dispatching_kernels(CACHE_KEY)


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
        # four independent sums: one float64 sum waits for each addition to finish (one element per 4 cycles)
        s0 = s1 = s2 = s3 = 0.0
        i = lo
        while i + 4 <= hi:
            v0, v1, v2, v3 = np.float64(a[i]), np.float64(a[i + 1]), np.float64(a[i + 2]), np.float64(a[i + 3])
            s0 += v0 * v0
            s1 += v1 * v1
            s2 += v2 * v2
            s3 += v3 * v3
            i += 4
        while i < hi:
            v0 = np.float64(a[i])
            s0 += v0 * v0
            i += 1
        part[ch] = (s0 + s1) + (s2 + s3)
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
