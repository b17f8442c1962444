"""The fused narrow-network kernels of the Numba CPU backend: every layer of a pass on one tile of rows at a time.

The batch is cut into tiles of ``tile`` rows, small enough that a tile of the widest layer stays in the core's
cache, and the tiles are split into ``chunks`` contiguous runs, one per thread. On its tile a thread runs every
layer, each GEMM a BLAS call (:data:`_xxgemm`: SciPy's BLAS, which the caller keeps on one thread) and the
elementwise work right after it, on rows still in cache:

* :func:`_mlp_forward_tiles`: ``u^l = x^{l-1} (W^l)^T`` (BLAS), then ``u^l += b^l`` and ``x^l = f(u^l)`` row by
  row, layer after layer; optionally the error at the output of the last layer on the same rows
  (:func:`~backprop.kernels.numba_cpu.rows._error_row`, the layer-by-layer kernel's formula), the loss summed per
  chunk;
* :func:`_mlp_backward_tiles`: from ``delta^L``, per layer ``l = L..1``: ``dE/dW^l += (delta^l)^T x^{l-1}``
  and ``dE/db^l += (delta^l)^T 1`` (BLAS, accumulating into the chunk's partial gradients),
  then ``delta^{l-1} = phi(x^{l-1}) * delta^l W^l`` (BLAS, then the slope row by row) in a scratch tile;
* :func:`_sum_chunks`: the chunks' partial gradients added in a fixed order (deterministic for a chunk count).

``layout`` holds one row per layer: ``n_in, n_out``, the offsets of ``W^l`` and ``b^l`` in the flat parameters,
and the offsets of the layer's ``(rows, n_out)`` blocks in ``y_flat`` and ``u_flat`` (``-1``: ``u`` not kept, the
block of ``y`` serves). The kernels close over :data:`~backprop.kernels.numba_cpu.compiled.CACHE_KEY`, as the
layer-by-layer kernels do.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from .. import numba_math as nm
from .compiled import _JIT, CACHE_KEY
from .rows import _bias_act_rows, _consts, _error_row, _slope_rows

#: Columns of a row of ``layout``.
N_IN, N_OUT, W_OFF, B_OFF, Y_OFF, U_OFF = range(6)
LAYOUT_COLUMNS = 6


#: The per-tile helpers: compiled without ``parallel`` (called from the chunks' loop, each on its thread), at module
#: level (a kernel closing over a compiled function would never be found in the on-disk cache).
_TILE = njit(nogil=True, fastmath=False, error_model="numpy")

#: Numba's own entry to the BLAS GEMM of SciPy (what its ``np.dot`` calls): column-major ``?gemm`` with ``kind``
#: ``'s'``/``'d'``, taking leading dimensions and ``beta``, so that a tile's GEMM reads and writes rows of the flat
#: buffers in place and a gradient accumulates into its sum. Resolved by name at link time (cacheable).
_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp, types.voidptr, types.voidptr, types.intp,
    types.voidptr, types.intp, types.voidptr, types.voidptr, types.intp))
_N, _T = np.int8(ord("n")), np.int8(ord("t"))
#: ``kind`` of :data:`_xxgemm` for float32 and float64.
KIND = {np.dtype(np.float32): np.int8(ord("s")), np.dtype(np.float64): np.int8(ord("d"))}


@_TILE
def _gemm(kind, trans_a, trans_b, m, n, k, A, B, C, accumulate, one_zero):  # pragma: no cover - compiled
    """Row-major ``C (m x n) = op(A) op(B)`` (``+= `` when ``accumulate``), ``op`` a transpose where ``trans_*``;
    ``A``, ``B``, ``C`` C-contiguous 2-D views. Column-major BLAS computes ``C^T = op(B)^T op(A)^T``.
    ``one_zero``: the array ``[1, 0]`` of the dtype (alpha, and beta when not accumulating)."""
    _xxgemm(kind, _T if trans_b else _N, _T if trans_a else _N, n, m, k, one_zero.ctypes, B.ctypes, B.shape[1],
            A.ctypes, A.shape[1], one_zero[0 if accumulate else 1:].ctypes, C.ctypes, n)


@_TILE
def _rows(flat, offset, r0, r1, n):  # pragma: no cover - compiled
    """Rows ``r0:r1`` of the ``(rows, n)`` block at ``offset`` of a flat buffer, as a C-contiguous view."""
    return flat[offset + r0 * n:offset + r1 * n].reshape((r1 - r0, n))


@_TILE
def _forward_tile(kind, x, rows, params, layout, codes, alphas, y_flat, u_flat, r0, r1, with_error, t, w, weighted,
                  lcode, fused, k, delta, c, one_zero):  # pragma: no cover - compiled
    """Rows ``r0:r1`` through every layer; with ``with_error`` their error at the output. Their loss sum.
    ``x``, ``t``, ``delta``: flat."""
    n_layers = layout.shape[0]
    inv_b = c[nm.ONE] / params.dtype.type(max(rows, 1))
    total = c[nm.ZERO]
    prev = _rows(x, 0, r0, r1, layout[0, N_IN])
    m = r1 - r0
    for li in range(n_layers):
        n_in, n_out = layout[li, N_IN], layout[li, N_OUT]
        W = _rows(params, layout[li, W_OFF], 0, n_out, n_in)
        b = params[layout[li, B_OFF]:layout[li, B_OFF] + n_out]
        y = _rows(y_flat, layout[li, Y_OFF], r0, r1, n_out)
        kept = layout[li, U_OFF] >= 0
        u = _rows(u_flat, layout[li, U_OFF], r0, r1, n_out) if kept else y
        _gemm(kind, False, True, m, n_out, n_in, prev, W, u, False, one_zero)
        code, alpha = codes[li], alphas[li]
        _bias_act_rows(u, y, b, 0, m, n_out, kept, code, alpha, c)
        if with_error and li == n_layers - 1:
            d = _rows(delta, 0, r0, r1, n_out)
            tt = _rows(t, 0, r0, r1, n_out)
            ww = w[r0:r1] if weighted else w
            for i in range(m):
                total += _error_row(y, u, tt, ww, weighted, d, i, n_out, lcode, code, fused, k, alpha, inv_b, c)
        prev = y
    return total


@_TILE
def _backward_tile(kind, x, rows, params, layout, codes, alphas, y_flat, u_flat, delta, r0, r1, part, scratch, c,
                   one_zero, ones):  # pragma: no cover - compiled
    """Rows ``r0:r1``'s gradients added into ``part``, layer ``L`` down to 1: ``dE/dW += delta^T x_prev`` and
    ``dE/db += delta^T 1`` (BLAS, ``ones`` at least a tile of ones), ``delta_prev = phi(x_prev) * delta W``.
    ``x``, ``delta``: flat."""
    m = r1 - r0
    half = scratch.shape[0] // 2
    last = layout.shape[0] - 1
    d = _rows(delta, 0, r0, r1, layout[last, N_OUT])
    side = 0
    for li in range(last, -1, -1):
        n_in, n_out = layout[li, N_IN], layout[li, N_OUT]
        wo, bo = layout[li, W_OFF], layout[li, B_OFF]
        prev = _rows(x, 0, r0, r1, n_in) if li == 0 else _rows(y_flat, layout[li - 1, Y_OFF], r0, r1, n_in)
        _gemm(kind, True, False, n_out, n_in, m, d, prev, _rows(part, wo, 0, n_out, n_in), True, one_zero)
        _gemm(kind, False, False, 1, n_out, m, _rows(ones, 0, 0, 1, m), d, _rows(part, bo, 0, 1, n_out), True, one_zero)
        if li > 0:
            g = _rows(scratch, side * half, 0, m, n_in)
            _gemm(kind, False, False, m, n_in, n_out, d, _rows(params, wo, 0, n_out, n_in), g, False, one_zero)
            kept = layout[li - 1, U_OFF] >= 0
            u = _rows(u_flat, layout[li - 1, U_OFF], r0, r1, n_in) if kept else prev
            code, alpha = codes[li - 1], alphas[li - 1]
            _slope_rows(g, prev, u, 0, m, n_in, code, alpha, c)
            d = g
            side = 1 - side


def _tile_kernels(cache_key: str):  # type: ignore[no-untyped-def]
    """The fused kernels, each closing over ``cache_key`` (see :mod:`~backprop.kernels.numba_cpu.compiled`)."""

    @njit(**_JIT)
    def _mlp_forward_tiles(kind, x, rows, params, layout, codes, alphas, y_flat, u_flat, tile, chunks,
                           with_error, t, w, weighted, lcode, fused, k, delta, partial):  # pragma: no cover
        """Every layer's forward pass on each tile of rows (module docstring); with ``with_error`` the error at the
        output too: ``delta`` and ``partial[chunk]``, the chunk's sum of row losses."""
        cache_key  # noqa: B018 - keys the cache
        c = _consts(params)
        one_zero = np.zeros(2, params.dtype)
        one_zero[0] = c[nm.ONE]
        tiles = (rows + tile - 1) // tile
        for ch in prange(chunks):
            total = c[nm.ZERO]
            for ti in range(ch * tiles // chunks, (ch + 1) * tiles // chunks):
                total += _forward_tile(kind, x, rows, params, layout, codes, alphas, y_flat, u_flat, ti * tile,
                                       min(rows, ti * tile + tile), with_error, t, w, weighted, lcode, fused, k,
                                       delta, c, one_zero)
            if with_error:
                partial[ch] = total

    @njit(**_JIT)
    def _mlp_backward_tiles(kind, x, rows, params, layout, codes, alphas, y_flat, u_flat, delta, tile, chunks,
                            partial, scratch):  # pragma: no cover
        """Each chunk's gradients into ``partial[chunk]`` (module docstring). ``scratch[chunk]``: two tiles of
        ``delta`` of the widest layer."""
        cache_key  # noqa: B018 - keys the cache
        c = _consts(params)
        one_zero = np.zeros(2, params.dtype)
        one_zero[0] = c[nm.ONE]
        ones = np.ones(tile, params.dtype)
        tiles = (rows + tile - 1) // tile
        for ch in prange(chunks):
            part = partial[ch]
            for q in range(part.shape[0]):
                part[q] = c[nm.ZERO]
            for ti in range(ch * tiles // chunks, (ch + 1) * tiles // chunks):
                _backward_tile(kind, x, rows, params, layout, codes, alphas, y_flat, u_flat, delta, ti * tile,
                               min(rows, ti * tile + tile), part, scratch[ch], c, one_zero, ones)

    return _mlp_forward_tiles, _mlp_backward_tiles


_mlp_forward_tiles, _mlp_backward_tiles = _tile_kernels(CACHE_KEY)


@njit(**_JIT)
def _sum_chunks(partial, out):  # pragma: no cover - compiled
    """``out[q] = sum_ch partial[ch, q]``, the chunks added in order (the same sum on every call)."""
    chunks, n = partial.shape
    for q in prange(n):
        s = partial[0, q]
        for ch in range(1, chunks):
            s += partial[ch, q]
        out[q] = s
