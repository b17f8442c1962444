"""CUDA-graph steps, the parts that need no GPU and no CuPy: the row-major to column-major mapping of
the CuPy backend's cuBLAS calls against a column-major reference GEMM/GEMV reading flat buffers
through their leading dimensions (the fake cuBLAS of test_cupy_backend uses the same reference),
and ``graph=True`` on a backend that cannot record a graph. The graph steps themselves are tested
in test_cupy_backend (against a CPU stand-in for CuPy, and on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.kernels import cupy_gpu

OP_N, OP_T = cupy_gpu.CUBLAS_OP_N, cupy_gpu.CUBLAS_OP_T


# --------------------------------------------------------------------------- column-major reference
def colmajor(flat: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The ``rows x cols`` column-major matrix with leading dimension ``ld`` stored in the 1-D ``flat``
    (element ``(i, j)`` at ``flat[i + j * ld]``), as a writable view; checks cuBLAS's rule
    ``ld >= max(1, rows)`` and that every element lies inside ``flat``."""
    assert flat.ndim == 1
    assert isinstance(ld, int) and ld >= max(1, rows), f"leading dimension {ld} < rows {rows}"
    if rows and cols:
        assert ld * (cols - 1) + rows <= flat.size, f"{rows}x{cols} (ld {ld}) reads past {flat.size} elements"
    s = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(s, ld * s))


def colmajor_gemm(opA: int, opB: int, m: int, n: int, k: int, alpha: float, A: np.ndarray, lda: int,
                  B: np.ndarray, ldb: int, beta: float, C: np.ndarray, ldc: int, rounding=None) -> None:
    """cuBLAS ``?gemm`` on flat buffers: ``C (m x n, ldc) = alpha op(A) op(B) + beta C``, ``A`` stored
    ``m x k`` (``k x m`` when transposed) and ``B`` ``k x n`` (``n x k``); ``C`` not read when ``beta == 0``.
    ``rounding``: applied to the operands first (TF32)."""
    assert opA in (OP_N, OP_T) and opB in (OP_N, OP_T)
    Am = colmajor(A, m, k, lda) if opA == OP_N else colmajor(A, k, m, lda).T
    Bm = colmajor(B, k, n, ldb) if opB == OP_N else colmajor(B, n, k, ldb).T
    Cm = colmajor(C, m, n, ldc)
    Am, Bm = np.array(Am), np.array(Bm)
    if rounding is not None:
        Am, Bm = rounding(Am), rounding(Bm)
    prod = (Am @ Bm).astype(C.dtype)
    Cm[...] = alpha * prod if beta == 0 else alpha * prod + beta * np.array(Cm)


def colmajor_gemv(op: int, m: int, n: int, alpha: float, A: np.ndarray, lda: int, x: np.ndarray, incx: int,
                  beta: float, y: np.ndarray, incy: int) -> None:
    """cuBLAS ``?gemv`` on flat buffers: ``y = alpha op(A) x + beta y``, ``A`` stored ``m x n``."""
    assert op in (OP_N, OP_T) and incx >= 1 and incy >= 1
    Am = colmajor(A, m, n, lda)
    Am = Am if op == OP_N else Am.T
    xlen, ylen = Am.shape[1], Am.shape[0]
    assert (xlen - 1) * incx < x.size and (ylen - 1) * incy < y.size
    xv, yv = x[::incx][:xlen], y[::incy][:ylen]
    prod = (np.array(Am) @ xv).astype(y.dtype)
    yv[...] = alpha * prod if beta == 0 else alpha * prod + beta * np.array(yv)


# --------------------------------------------------------------------------- the plans
def _op(a: np.ndarray, t: str) -> np.ndarray:
    return a.T if t == "T" else a


def _shapes(rng: np.random.Generator):
    """(m, n, k) triples: random ones, and every mix of 1 (one row, one column, k = 1) with others."""
    out = [tuple(int(v) for v in rng.integers(1, 9, 3)) for _ in range(12)]
    for m in (1, 5):
        for n in (1, 4):
            for k in (1, 3):
                out.append((m, n, k))
    return out


@pytest.mark.parametrize("transa,transb", [("N", "T"), ("N", "N"), ("T", "N"), ("T", "T")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_plan_against_numpy(rng, transa, transb, dtype):
    """``_gemm_plan`` run by the column-major reference on the flat C-order buffers gives ``op(a) op(b)``
    (forward is N,T; backward N,N; the weight gradients T,N; T,T for completeness)."""
    for m, n, k in _shapes(rng):
        a = rng.normal(size=(k, m) if transa == "T" else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if transb == "T" else (k, n)).astype(dtype)
        want = _op(a, transa) @ _op(b, transb)
        p = cupy_gpu._gemm_plan(transa, transb, a.shape, b.shape, (m, n))
        assert all(isinstance(v, int) for v in p[:8]) and p.swap is True
        first, second = (b, a) if p.swap else (a, b)
        for alpha, beta in ((1.0, 0.0), (-0.5, 2.0)):
            out = np.full(m * n, np.nan if beta == 0 else 1.5, dtype=dtype)  # beta == 0: never read
            colmajor_gemm(p.opA, p.opB, p.m, p.n, p.k, alpha, first.ravel(), p.lda, second.ravel(), p.ldb,
                          beta, out, p.ldc)
            expect = alpha * want + (beta * 1.5 if beta else 0.0)
            np.testing.assert_allclose(out.reshape(m, n), expect, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{transa}{transb} m={m} n={n} k={k}")


def test_gemm_plan_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        cupy_gpu._gemm_plan("N", "T", (4, 3), (5, 2), (4, 5))
    with pytest.raises(ValueError, match="shapes"):
        cupy_gpu._gemm_plan("N", "N", (4, 3), (3, 5), (4, 6))
    with pytest.raises(ValueError, match="'N' or 'T'"):
        cupy_gpu._gemm_plan("C", "N", (4, 3), (3, 5), (4, 5))


@pytest.mark.parametrize("trans", ["N", "T"])
def test_gemv_plan_against_numpy(rng, trans):
    for r, c in [(1, 1), (1, 6), (7, 1), (5, 3), (16, 9)]:
        a = rng.normal(size=(r, c))
        x = rng.normal(size=c if trans == "N" else r)
        p = cupy_gpu._gemv_plan(trans, a.shape)
        y = np.full(r if trans == "N" else c, np.nan)
        colmajor_gemv(p.op, p.m, p.n, 1.0, a.ravel(), p.lda, x, 1, 0.0, y, 1)
        np.testing.assert_allclose(y, _op(a, trans) @ x, rtol=1e-12, atol=1e-12)


def test_reference_gemm_is_cublas_column_major(rng):
    """The reference itself, on a hand-made case: a padded leading dimension skips the padding."""
    A = np.array([1.0, 2.0, -99.0, 3.0, 4.0, -99.0])  # 2x2, ld 3: [[1, 3], [2, 4]]
    B = np.array([1.0, 0.0, 0.0, 1.0])  # identity, ld 2
    C = np.zeros(4)
    colmajor_gemm(OP_N, OP_N, 2, 2, 2, 1.0, A, 3, B, 2, 0.0, C, 2)
    np.testing.assert_array_equal(C, [1.0, 2.0, 3.0, 4.0])
    colmajor_gemm(OP_T, OP_N, 2, 2, 2, 1.0, A, 3, B, 2, 0.0, C, 2)
    np.testing.assert_array_equal(C, [1.0, 3.0, 2.0, 4.0])
    with pytest.raises(AssertionError):
        colmajor_gemm(OP_N, OP_N, 2, 2, 2, 1.0, A, 1, B, 2, 0.0, C, 2)


# --------------------------------------------------------------------------- backends without graphs
def test_graph_needs_a_backend_that_captures(rng):
    from backprop import MLP, SGD

    net = MLP([3, 4, 2], backend="numpy", seed=0)
    opt = SGD(lr=0.1)
    before = net.get_params()
    with pytest.raises(ValueError, match="graph=True needs the cupy backend"):
        net.train_step(rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), opt, graph=True)
    assert opt.steps == 0
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)


def test_fit_with_graphs_is_refused_before_training_on_a_host_backend(rng):
    net = bp.MLP([3, 4, 2], head="multiclass", backend="numpy")
    before = net.get_params()
    with pytest.raises(ValueError, match="needs the cupy backend"):
        net.fit(rng.normal(size=(10, 3)), rng.integers(0, 2, 10), epochs=1, graph=True)
    with pytest.raises(TypeError, match="graph must be"):
        net.fit(rng.normal(size=(10, 3)), rng.integers(0, 2, 10), epochs=1, graph="yes")
    for (W, b), (W0, b0) in zip(net.get_params(), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
