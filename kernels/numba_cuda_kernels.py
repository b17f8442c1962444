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

Launch shapes are small under the CUDA simulator (which runs one Python thread per GPU thread).
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
from numba import cuda

from . import numba_math as nm

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
softplus, elementwise_loss, loss_grad = _m.softplus, _m.elementwise_loss, _m.loss_grad


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
def loss_rows(y, u, t, delta, rowloss, lcode, acode, k, alpha):  # pragma: no cover - compiled
    """One thread per row: the row's loss into ``rowloss[i]`` and ``delta[i, :] = dE/du``."""
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
                delta[i, j] = (y[i, j] - t[i, j]) * inv_b
        elif lcode == nm.BCE:
            for j in range(n):
                row += softplus(u[i, j], k, c) - t[i, j] * u[i, j]
                delta[i, j] = (y[i, j] - t[i, j]) * inv_b
        else:
            for j in range(n):
                r = y[i, j] - t[i, j]
                row += elementwise_loss(r, lcode, k, c)
                delta[i, j] = loss_grad(r, lcode, k, c) * slope(y[i, j], u[i, j], acode, alpha, c) * inv_b
        rowloss[i] = row


@cuda.jit
def scale_add(w, g, decay, coef):  # pragma: no cover - compiled
    """``w <- decay * w + coef * g`` (flat arrays)."""
    for i in range(cuda.grid(1), w.shape[0], cuda.gridsize(1)):
        w[i] = decay * w[i] + coef * g[i]


@cuda.jit
def momentum(p, g, v, lr, mu, nesterov, wd):  # pragma: no cover - compiled
    """``g' = g + wd p``, ``v <- mu v + g'``, ``p <- p - lr v`` (Nesterov: ``- lr (g' + mu v)``)."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        gd = g[i] + wd * p[i]
        vi = mu * v[i] + gd
        v[i] = vi
        if nesterov:
            p[i] -= lr * (gd + mu * vi)
        else:
            p[i] -= lr * vi


@cuda.jit
def adam(p, g, m, v, lr_c1, c2, b1, b2, eps, wd):  # pragma: no cover - compiled
    """Adam: moments ``m``, ``v``; ``p <- p - (lr / c1) m / (sqrt(v / c2) + eps)``."""
    c = consts(p)
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        gd = g[i] + wd * p[i]
        mi = b1 * m[i] + (c[nm.ONE] - b1) * gd
        vi = b2 * v[i] + (c[nm.ONE] - b2) * gd * gd
        m[i] = mi
        v[i] = vi
        p[i] -= lr_c1 * mi / (math.sqrt(vi / c2) + eps)


@cuda.jit
def count_nonfinite(a, flag):  # pragma: no cover - compiled
    """``flag[0] = 1`` if any element of the flat array ``a`` is NaN or infinite."""
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = a[i]
        if math.isnan(v) or math.isinf(v):
            flag[0] = 1


# --------------------------------------------------------------------------- shared-memory kernels
@lru_cache(maxsize=None)
def kernels_for(dtype_name: str) -> SimpleNamespace:
    """The shared-memory kernels for one dtype (``"float32"`` or ``"float64"``)."""
    ty = numba.from_dtype(np.dtype(dtype_name))

    @cuda.jit
    def gemm(A, B, C, ta, tb, alpha, beta, use_beta):  # pragma: no cover - compiled
        """``C = alpha op(A) op(B) (+ beta C if use_beta)``, ``op`` transposing when ``ta``/``tb``.

        The slow path, used where CuPy (cuBLAS) is not: a textbook TILE x TILE shared-memory
        tiling, one thread per element of ``C``. ``C`` is read only when ``use_beta``."""
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
            if use_beta:
                C[row, col] = alpha * acc + beta * C[row, col]
            else:
                C[row, col] = alpha * acc

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

    @cuda.jit
    def mean(x, out):  # pragma: no cover - compiled
        """``out[0] = sum(x) / len(x)`` in one block of RED_T threads."""
        sm = cuda.shared.array(RED_T, ty)
        c = consts(x)
        tid = cuda.threadIdx.x
        s = c[nm.ZERO]
        for i in range(tid, x.shape[0], RED_T):
            s += x[i]
        sm[tid] = s
        cuda.syncthreads()
        w = RED_T // 2
        while w > 0:
            if tid < w:
                sm[tid] += sm[tid + w]
            cuda.syncthreads()
            w //= 2
        if tid == 0:
            out[0] = sm[0] / x.dtype.type(x.shape[0])

    return SimpleNamespace(gemm=gemm, colsum=colsum, mean=mean)


#: The kernels that do not depend on a dtype at definition time.
ELEMENTWISE: dict[str, Any] = {
    "bias_act": bias_act, "bias_softmax": bias_softmax, "slope_mul": slope_mul, "loss_rows": loss_rows,
    "scale_add": scale_add, "momentum": momentum, "adam": adam, "count_nonfinite": count_nonfinite,
}
