"""The ``@cuda.jit`` kernels of the numba-cuda backend (imported only once CUDA is known to work).

:mod:`backprop.kernels.numba_cuda` imports this module lazily: importing it imports
``numba.cuda``. The scalar math (activations, slopes, losses) comes from
:mod:`backprop.kernels.numba_math`, compiled here as CUDA device functions, so the GPU kernels
compute exactly what the CPU kernels do.

Kernels that need shared memory (the tiled GEMM, the column and mean reductions) are built per
dtype by :func:`kernels_for`, because a shared array's dtype must be known when the kernel is
compiled; the others are compiled by Numba for each dtype on first use. float32 kernels compute
in float32: constants come from ``numba_math.consts`` (typed with the arrays' dtype), the host
casts every scalar argument to the arrays' dtype, and ``math.exp`` and friends of a float32 are
the float32 device functions.

The guard of the updates is a float64 device array read by the kernels themselves (an update
whose guard says no returns at once, leaving every state as it was); ``guard_update``, the sum of
squares and the statistics kernels compute in float64 on purpose (the guard's tally, and facts about arrays of
any dtype, integers included).

Launch shapes are small under the CUDA simulator (which runs one Python thread per GPU thread).
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from .numba_cuda import numpy_compat

numpy_compat()  # before numba.cuda is imported: see there

import numba  # noqa: E402
from numba import cuda  # noqa: E402

from . import numba_math as nm  # noqa: E402

SIMULATED = bool(numba.config.ENABLE_CUDASIM)

#: Threads per block of the elementwise kernels, and the most blocks a grid-stride launch uses.
TPB = 32 if SIMULATED else 256
MAX_BLOCKS = 2 if SIMULATED else 8192
#: Tile edge of the shared-memory GEMM (TILE x TILE threads per block). The simulator's cost is
#: mostly its barriers, one pair per TILE of the inner dimension: 8 keeps it fastest there.
TILE = 8 if SIMULATED else 16
#: Block of the column reduction: RED_X columns x RED_Y row lanes (RED_Y a power of 2).
RED_X, RED_Y = (4, 4) if SIMULATED else (32, 8)
#: Threads of the one-block mean reduction (a power of 2).
RED_T = 8 if SIMULATED else 256

_m = nm.build(cuda.jit(device=True))
consts, activate, slope = _m.consts, _m.activate, _m.slope
elementwise_loss, loss_grad = _m.elementwise_loss, _m.loss_grad
sgd_step, momentum_step, adam_step, finite = _m.sgd_step, _m.momentum_step, _m.adam_step, _m.finite


def blocks(n: int, tpb: int = TPB) -> int:
    """Blocks for a grid-stride loop over ``n`` items."""
    return max(1, min(MAX_BLOCKS, (n + tpb - 1) // tpb))


# --------------------------------------------------------------------------- elementwise kernels
@cuda.jit
def bias_act(u, b, y, code, alpha, keep_u):  # pragma: no cover - compiled
    """``v = u + b``, ``y = f(v)`` (``u = v`` too when ``keep_u``); ``y`` may be ``u``."""
    c = consts(u)
    m, n = u.shape
    for idx in range(cuda.grid(1), m * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        v = u[i, j] + b[j]
        if keep_u:
            u[i, j] = v
        y[i, j] = activate(v, code, alpha, c)


@cuda.jit
def bias_softmax(u, b, y, keep_u):  # pragma: no cover - compiled
    """Softmax of ``u + b`` row by row, one thread per row; ``y`` may be ``u``."""
    c = consts(u)
    m, n = u.shape
    for i in range(cuda.grid(1), m, cuda.gridsize(1)):
        mx = u[i, 0] + b[0]
        for j in range(n):
            v = u[i, j] + b[j]
            if keep_u:
                u[i, j] = v
            y[i, j] = v
            if v > mx:
                mx = v
        s = c[nm.ZERO]
        for j in range(n):
            e = math.exp(y[i, j] - mx)
            y[i, j] = e
            s += e
        inv = c[nm.ONE] / s
        for j in range(n):
            y[i, j] = y[i, j] * inv


@cuda.jit
def slope_mul(g, y, u, code, alpha):  # pragma: no cover - compiled
    """``g *= phi(y)`` (``f'(u)`` for GELU/SiLU), in place."""
    c = consts(g)
    m, n = g.shape
    for idx in range(cuda.grid(1), m * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        g[i, j] = g[i, j] * slope(y[i, j], u[i, j], code, alpha, c)


@cuda.jit
def loss_rows(y, u, t, w, weighted, delta, rowloss, lcode, acode, fused, k, alpha):  # pragma: no cover - compiled
    """One thread per row: the row's loss into ``rowloss[i]`` and ``delta[i, :] = dE/du``: ``(y - t) / batch``
    for a fused pair, ``dL/dy phi(y) / batch`` otherwise; cross-entropy (row-wise) from the logits.
    ``weighted``: both times ``w[i]`` (``w`` is not read otherwise)."""
    c = consts(y)
    m, n = y.shape
    inv_b = c[nm.ONE] / y.dtype.type(m)
    for i in range(cuda.grid(1), m, cuda.gridsize(1)):
        row = c[nm.ZERO]
        if lcode == nm.CROSS_ENTROPY:
            mx = u[i, 0]
            for j in range(n):
                if u[i, j] > mx:
                    mx = u[i, j]
            s = c[nm.ZERO]
            for j in range(n):
                s += math.exp(u[i, j] - mx)
            lse = mx + math.log(s)
            for j in range(n):
                row += t[i, j] * (lse - u[i, j])
        else:
            for j in range(n):
                row += elementwise_loss(y[i, j], u[i, j], t[i, j], lcode, k, c)
        for j in range(n):
            r = y[i, j] - t[i, j]
            if fused:
                d = r * inv_b
            else:
                d = loss_grad(r, lcode, k, c) * slope(y[i, j], u[i, j], acode, alpha, c) * inv_b
            if weighted:
                d = d * w[i]
            delta[i, j] = d
        if weighted:
            row = row * w[i]
        rowloss[i] = row


@cuda.jit
def sgd(p, g, lr, wd, guard):  # pragma: no cover - compiled
    """``p <- p - lr (g + wd p)`` (flat arrays; ``g`` alone without weight decay, as the reference);
    nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    c = consts(p)
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] = sgd_step(p[i], g[i], lr, wd, c)


@cuda.jit
def momentum(p, g, v, lr, mu, nesterov, wd, guard):  # pragma: no cover - compiled
    """``g' = g + wd p``, ``v <- mu v + g'``, ``p <- p - lr v`` (Nesterov: ``- lr (g' + mu v)``);
    nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i], v[i] = momentum_step(p[i], g[i], v[i], lr, mu, nesterov, wd)


@cuda.jit(device=True)
def _adam_body(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd):  # pragma: no cover - compiled
    """The Adam update of this thread's elements (shared by both Adam kernels: the same bits)."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i], m[i], v[i] = adam_step(p[i], g[i], m[i], v[i], lr_c1, c2, b1, b2, omb1, omb2, eps, wd)


@cuda.jit
def adam(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd, guard):  # pragma: no cover - compiled
    """Adam: moments ``m``, ``v``; ``p <- p - (lr / c1) m / (sqrt(v / c2) + eps)``; nothing when
    ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    _adam_body(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd)


@cuda.jit
def adam_dev(p, g, m, v, corr, b1, b2, omb1, omb2, eps, wd, guard):  # pragma: no cover - compiled
    """Adam with ``lr / c1 = corr[0]`` and ``c2 = corr[1]`` read on the device (from
    ``adam_corrections``); nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    _adam_body(p, g, m, v, corr[0], corr[1], b1, b2, omb1, omb2, eps, wd)


@cuda.jit
def adam_corrections(count, out, lr, b1, b2):  # pragma: no cover - compiled
    """One thread, float64 on purpose: ``t = count[0] + 1`` (the coming step; ``count`` unchanged),
    ``out[0] = lr / (1 - b1^t)``, ``out[1] = 1 - b2^t`` rounded to ``out``'s dtype."""
    if cuda.grid(1) != 0:
        return
    t = count[0] + 1.0
    out[0] = lr / (1.0 - math.pow(b1, t))
    out[1] = 1.0 - math.pow(b2, t)


@cuda.jit
def count_step(count, guard):  # pragma: no cover - compiled
    """One thread: ``count[0] += 1`` unless ``guard[0] != 1`` (the applied steps)."""
    if cuda.grid(1) != 0 or guard[0] != 1.0:
        return
    count[0] += 1.0


@cuda.jit(device=True)
def fail_step(guard):  # pragma: no cover - compiled
    """A probe's failing verdict: ``guard[0] = 0``, and ``guard[2] = guard[1]`` unless a step failed
    before. Threads that race here all write the same values."""
    guard[0] = 0.0
    if guard[2] == 0.0:
        guard[2] = guard[1]


@cuda.jit
def sgd_probe(p, g, lr, wd, guard):  # pragma: no cover - compiled
    """:func:`sgd`'s result computed and not written: the step fails in ``guard`` if an element would
    not be finite; nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    c = consts(p)
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        if not finite(sgd_step(p[i], g[i], lr, wd, c)):
            fail_step(guard)
            return


@cuda.jit
def momentum_probe(p, g, v, lr, mu, nesterov, wd, guard):  # pragma: no cover - compiled
    """:func:`momentum`'s ``v`` and ``p`` computed and not written: the step fails in ``guard`` if an
    element would not be finite; nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pi, vi = momentum_step(p[i], g[i], v[i], lr, mu, nesterov, wd)
        if not (finite(vi) and finite(pi)):
            fail_step(guard)
            return


@cuda.jit(device=True)
def _adam_probe_body(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd, guard):  # pragma: no cover - compiled
    """:func:`_adam_body`'s ``m``, ``v`` and ``p`` computed and not written; the step fails in ``guard``
    if an element would not be finite."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pi, mi, vi = adam_step(p[i], g[i], m[i], v[i], lr_c1, c2, b1, b2, omb1, omb2, eps, wd)
        if not (finite(mi) and finite(vi) and finite(pi)):
            fail_step(guard)
            return


@cuda.jit
def adam_probe(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd, guard):  # pragma: no cover - compiled
    """The probe of :func:`adam`; nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    _adam_probe_body(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd, guard)


@cuda.jit
def adam_dev_probe(p, g, m, v, corr, b1, b2, omb1, omb2, eps, wd, guard):  # pragma: no cover - compiled
    """The probe of :func:`adam_dev`; nothing when ``guard[0] != 1``."""
    if guard[0] != 1.0:
        return
    _adam_probe_body(p, g, m, v, corr[0], corr[1], b1, b2, omb1, omb2, eps, wd, guard)


@cuda.jit
def count_nonfinite(a, flag):  # pragma: no cover - compiled
    """``flag[0] = 1`` if any element of the flat array ``a`` is NaN or infinite."""
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = a[i]
        if math.isnan(v) or math.isinf(v):
            flag[0] = 1


@cuda.jit
def guard_scan(a, guard, flag):  # pragma: no cover - compiled
    """``flag[0] = 1`` if an element of the flat ``a`` is not finite; nothing once the guard has
    failed (``guard[2] != 0``: the verdict is sticky, no need to look)."""
    if guard[2] != 0.0:
        return
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = a[i]
        if math.isnan(v) or math.isinf(v):
            flag[0] = 1


@cuda.jit
def guard_update(guard, loss, flag, weight):  # pragma: no cover - compiled
    """One thread, after ``guard_scan``: ``guard[1] += 1``; ok when no step failed yet, ``loss[0]``
    is finite and the scan found nothing; ``guard[0] = ok``; ``guard[3] += weight * loss`` when ok,
    else ``guard[2] = guard[1]`` the first time. Clears ``flag`` for the next step."""
    if cuda.grid(1) != 0:
        return
    guard[1] += 1.0
    v = loss[0]
    ok = guard[2] == 0.0 and flag[0] == 0 and not (math.isnan(v) or math.isinf(v))
    flag[0] = 0
    if ok:
        guard[0] = 1.0
        guard[3] += weight * np.float64(v)
    else:
        guard[0] = 0.0
        if guard[2] == 0.0:
            guard[2] = guard[1]


@cuda.jit(device=True)
def block_sum(sm, tid, value):  # pragma: no cover - compiled
    """Sum ``value`` over the RED_T threads of a block into ``sm[0]`` (``sm`` a shared array of RED_T):
    a shared-memory tree, in a fixed order (deterministic)."""
    sm[tid] = value
    cuda.syncthreads()
    w = RED_T // 2
    while w > 0:
        if tid < w:
            sm[tid] += sm[tid + w]
        cuda.syncthreads()
        w //= 2


@cuda.jit
def sum_squares(a, partial):  # pragma: no cover - compiled
    """``partial[block] = sum a[i]^2`` over the block's grid-stride share of the flat ``a``, in float64
    (a shared-memory tree over the block's RED_T threads; launch with RED_T threads a block)."""
    sm = cuda.shared.array(RED_T, numba.float64)
    tid = cuda.threadIdx.x
    s = 0.0
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = np.float64(a[i])
        s += v * v
    block_sum(sm, tid, s)
    if tid == 0:
        partial[cuda.blockIdx.x] = sm[0]


@cuda.jit
def add_to_total(partial, total):  # pragma: no cover - compiled
    """``total[0] += sum(partial)`` in one block of RED_T threads, in a fixed order (deterministic)."""
    sm = cuda.shared.array(RED_T, numba.float64)
    tid = cuda.threadIdx.x
    s = 0.0
    for i in range(tid, partial.shape[0], RED_T):
        s += partial[i]
    block_sum(sm, tid, s)
    if tid == 0:
        total[0] += sm[0]


@cuda.jit
def one_hot(labels, out):  # pragma: no cover - compiled
    """``out[i, j] = 1 if j == labels[i] else 0`` (labels whole numbers, any numeric dtype)."""
    c = consts(out)
    m, n = out.shape
    for idx in range(cuda.grid(1), m * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        out[i, j] = c[nm.ONE] if j == np.int64(labels[i]) else c[nm.ZERO]


@cuda.jit
def count_correct(y, t, threshold, half, total):  # pragma: no cover - compiled
    """One thread per row: ``total[0] += 1`` when the row's prediction matches its target, by the
    position of the row maximum (first one on ties), or with ``threshold`` at ``half`` in every column."""
    i = cuda.grid(1)
    if i >= y.shape[0]:
        return
    n = y.shape[1]
    ok = True
    if threshold:
        for j in range(n):
            if (y[i, j] > half) != (t[i, j] > half):
                ok = False
    else:
        by = 0
        bt = 0
        for j in range(1, n):
            if y[i, j] > y[i, by]:
                by = j
            if t[i, j] > t[i, bt]:
                bt = j
        ok = by == bt
    if ok:
        cuda.atomic.add(total, 0, 1.0)


@cuda.jit
def gather_rows(src, idx, out):  # pragma: no cover - compiled
    """``out[i, j] = src[idx[i], j]`` (2-D views; negative indices count from the end, indices out
    of range leave their row as it was: the caller checks them)."""
    m, n = out.shape
    rows = src.shape[0]
    for e in range(cuda.grid(1), m * n, cuda.gridsize(1)):
        i = e // n
        j = e - i * n
        k = idx[i]
        if k < 0:
            k += rows
        if k >= 0 and k < rows:
            out[i, j] = src[k, j]


@cuda.jit
def cast_flat(src, dst):  # pragma: no cover - compiled
    """``dst[i] = src[i]`` converted to ``dst``'s dtype (1-D, ``src`` may be strided)."""
    for i in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit
def cast_2d(src, dst):  # pragma: no cover - compiled
    """``dst[i, j] = src[i, j]`` converted to ``dst``'s dtype (``src`` may be strided)."""
    m, n = dst.shape
    for idx in range(cuda.grid(1), m * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        dst[i, j] = src[i, j]


#: Slots of the device buffer of ``array_stats``: the ``STAT_*`` layout of the contract
#: (``STAT_FIRST_NONFINITE`` holds ``n`` until the host turns it into -1), then the counts of NaN
#: elements and of rows whose sum is NaN (the host makes min/max/row error NaN from them, as NumPy).
STATS_NAN, STATS_ROW_NAN, STATS_BUFFER = 6, 7, 8


@cuda.jit
def stats_init(buf, n):  # pragma: no cover - compiled
    """The neutral values of the ``array_stats`` reductions (one thread)."""
    if cuda.grid(1) == 0:
        buf[0] = 0.0
        buf[1] = np.float64(n)
        buf[2] = math.inf
        buf[3] = -math.inf
        buf[4] = 0.0
        buf[5] = 0.0
        buf[6] = 0.0
        buf[7] = 0.0


@cuda.jit
def stats_flat(a, buf):  # pragma: no cover - compiled
    """The elementwise facts of ``array_stats`` over the flat ``a`` (any numeric dtype, read as
    float64): each thread reduces its grid-stride share, then merges it with atomics."""
    bad = 0.0
    first = math.inf
    mn = math.inf
    mx = -math.inf
    frac = 0.0
    nan = 0.0
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = np.float64(a[i])
        if math.isnan(v):
            nan += 1.0
            frac += 1.0
            bad += 1.0
            first = min(first, np.float64(i))
        elif math.isinf(v):
            bad += 1.0
            first = min(first, np.float64(i))
        elif v != math.floor(v):
            frac += 1.0
        if not math.isnan(v):
            mn = min(mn, v)
            mx = max(mx, v)
    if bad != 0.0:
        cuda.atomic.add(buf, 0, bad)
        cuda.atomic.min(buf, 1, first)
    if mn != math.inf:
        cuda.atomic.min(buf, 2, mn)
    if mx != -math.inf:
        cuda.atomic.max(buf, 3, mx)
    if frac != 0.0:
        cuda.atomic.add(buf, 4, frac)
    if nan != 0.0:
        cuda.atomic.add(buf, 6, nan)


@cuda.jit
def stats_rows(a, buf):  # pragma: no cover - compiled
    """``buf[5] = max_i |sum_j a[i, j] - 1|`` (sums in float64, one thread per row); rows whose
    error is NaN are counted in ``buf[7]`` instead."""
    m, n = a.shape
    for i in range(cuda.grid(1), m, cuda.gridsize(1)):
        s = 0.0
        for j in range(n):
            s += np.float64(a[i, j])
        e = abs(s - 1.0)
        if math.isnan(e):
            cuda.atomic.add(buf, 7, 1.0)
        else:
            cuda.atomic.max(buf, 5, e)


# --------------------------------------------------------------------------- shared-memory kernels
def _gemm_kernel(ty: Any) -> Any:
    """The tiled GEMM kernel whose shared tiles hold Numba type ``ty``."""

    @cuda.jit
    def gemm(A, B, C, ta, tb):  # pragma: no cover - compiled
        """``C = op(A) op(B)``, ``op`` transposing when ``ta``/``tb``.

        The slow path, used where CuPy (cuBLAS) is not: a textbook TILE x TILE shared-memory
        tiling, one thread per element of ``C``."""
        As = cuda.shared.array((TILE, TILE), ty)
        Bs = cuda.shared.array((TILE, TILE), ty)
        c = consts(C)
        tx = cuda.threadIdx.x
        ty_ = cuda.threadIdx.y
        row = cuda.blockIdx.y * TILE + ty_
        col = cuda.blockIdx.x * TILE + tx
        M, N = C.shape
        K = A.shape[0] if ta else A.shape[1]
        acc = c[nm.ZERO]
        for k0 in range(0, K, TILE):
            ka = k0 + tx
            if row < M and ka < K:
                if ta:
                    As[ty_, tx] = A[ka, row]
                else:
                    As[ty_, tx] = A[row, ka]
            else:
                As[ty_, tx] = c[nm.ZERO]
            kb = k0 + ty_
            if kb < K and col < N:
                if tb:
                    Bs[ty_, tx] = B[col, kb]
                else:
                    Bs[ty_, tx] = B[kb, col]
            else:
                Bs[ty_, tx] = c[nm.ZERO]
            cuda.syncthreads()
            for kk in range(TILE):
                acc += As[ty_, kk] * Bs[kk, tx]
            cuda.syncthreads()
        if row < M and col < N:
            C[row, col] = acc

    return gemm


def _colsum_kernel(ty: Any) -> Any:
    """The column-sum kernel whose shared lanes hold Numba type ``ty``."""

    @cuda.jit
    def colsum(d, out, coef, accumulate):  # pragma: no cover - compiled
        """``out[j] = coef * sum_i d[i, j]`` (``+=`` when ``accumulate``): RED_X columns per
        block, RED_Y lanes striding over the rows, then a shared-memory tree over the lanes."""
        sm = cuda.shared.array((RED_Y, RED_X), ty)
        c = consts(d)
        tx = cuda.threadIdx.x
        ly = cuda.threadIdx.y
        j = cuda.blockIdx.x * RED_X + tx
        m, n = d.shape
        s = c[nm.ZERO]
        if j < n:
            for i in range(ly, m, RED_Y):
                s += d[i, j]
        sm[ly, tx] = s
        cuda.syncthreads()
        w = RED_Y // 2
        while w > 0:
            if ly < w:
                sm[ly, tx] += sm[ly + w, tx]
            cuda.syncthreads()
            w //= 2
        if ly == 0 and j < n:
            if accumulate:
                out[j] += coef * sm[0, tx]
            else:
                out[j] = coef * sm[0, tx]

    return colsum


def _mean_kernel(ty: Any) -> Any:
    """The mean kernel whose shared block holds Numba type ``ty``."""

    @cuda.jit
    def mean(x, out):  # pragma: no cover - compiled
        """``out[0] = sum(x) / len(x)`` in one block of RED_T threads."""
        sm = cuda.shared.array(RED_T, ty)
        c = consts(x)
        tid = cuda.threadIdx.x
        s = c[nm.ZERO]
        for i in range(tid, x.shape[0], RED_T):
            s += x[i]
        block_sum(sm, tid, s)
        if tid == 0:
            out[0] = sm[0] / x.dtype.type(x.shape[0])

    return mean


@lru_cache(maxsize=None)
def kernels_for(dtype_name: str) -> SimpleNamespace:
    """The shared-memory kernels for one dtype (``"float32"`` or ``"float64"``)."""
    ty = numba.from_dtype(np.dtype(dtype_name))
    return SimpleNamespace(gemm=_gemm_kernel(ty), colsum=_colsum_kernel(ty), mean=_mean_kernel(ty))


#: The kernels that do not depend on a dtype at definition time.
ELEMENTWISE: dict[str, Any] = {
    "bias_act": bias_act, "bias_softmax": bias_softmax, "slope_mul": slope_mul, "loss_rows": loss_rows,
    "sgd": sgd, "momentum": momentum, "adam": adam, "adam_dev": adam_dev, "sgd_probe": sgd_probe,
    "momentum_probe": momentum_probe, "adam_probe": adam_probe, "adam_dev_probe": adam_dev_probe,
    "adam_corrections": adam_corrections, "count_step": count_step, "count_nonfinite": count_nonfinite,
    "guard_scan": guard_scan, "guard_update": guard_update, "sum_squares": sum_squares,
    "add_to_total": add_to_total, "one_hot": one_hot, "gather_rows": gather_rows,
    "cast_flat": cast_flat, "cast_2d": cast_2d, "stats_init": stats_init, "stats_flat": stats_flat,
    "stats_rows": stats_rows,
}
