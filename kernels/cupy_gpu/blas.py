"""cuBLAS GEMMs and GEMVs of row-major arrays.

Every GEMM and GEMV goes through nvmath-python's cuBLAS bindings when they import: our own handle per
device, bound to CuPy's current stream with an explicit workspace, so that nothing is allocated behind our
back and a GEMM can be recorded into a CUDA graph (CuPy 14's ``cupy.cublas`` refuses any call while the
stream captures). Without nvmath-python, ``cupy.cublas`` does the work and :func:`capture` refuses. The
row-major to column-major mapping is :func:`_gemm_plan` (:func:`_gemv_plan` for a GEMV); the math mode
follows :func:`~.tf32.tf32_enabled` for float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .device import Array, _contiguous, _cupy, _per_device, refuse_while_recording
from .tf32 import CUBLAS_TF32_TENSOR_OP_MATH, tf32_enabled

#: cuBLAS's ``cublasOperation_t`` values (``nvmath.bindings.cublas.Operation.N`` / ``.T``).
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
#: cuBLAS's ``CUBLAS_DEFAULT_MATH`` (``nvmath.bindings.cublas.Math.DEFAULT_MATH``).
CUBLAS_DEFAULT_MATH = 0
#: Bytes of the workspace given to cuBLAS (one per device for direct calls, one per captured graph):
#: what cuBLAS itself takes by default on Hopper, and nothing is allocated behind our back. The cuBLASLt
#: plans and :func:`capture` read it here, through this module, when they run.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20

_NVMATH_HINT = ("pip install nvmath-python (nvmath-python[cu12] or [cu13] brings its CUDA libraries along); "
                "CuPy's own cuBLAS wrappers refuse to run while a stream is being captured")


# --------------------------------------------------------------------------- row-major to column-major
class GemmPlan(NamedTuple):
    """The cuBLAS (column-major) arguments of a row-major ``out = op(a) op(b)``.

    A C-order ``(r, c)`` array is, read column-major, its transpose with leading dimension ``c``.
    So ``out^T = op(b)^T op(a)^T`` is a column-major GEMM whose first operand is ``b`` and second
    ``a`` (``swap``), with each one's own transpose flag: cuBLAS computes ``C (m x n, ldc) =
    op_A(A) op_B(B)`` with ``A = b`` (``opA``, ``lda``), ``B = a`` (``opB``, ``ldb``), ``C = out``.
    """

    opA: int
    opB: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    swap: bool


def _gemm_plan(transa: str, transb: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...],
               out_shape: tuple[int, ...]) -> GemmPlan:
    """cuBLAS arguments of ``out = op(a) op(b)`` for C-contiguous 2-D ``a``, ``b``, ``out`` (see :class:`GemmPlan`)."""
    if transa not in ("N", "T") or transb not in ("N", "T"):
        raise ValueError(f"transpose flags must be 'N' or 'T', got {transa!r}, {transb!r}")
    if len(a_shape) != 2 or len(b_shape) != 2 or len(out_shape) != 2:
        raise ValueError(f"GEMM operands must be 2-D, got {a_shape}, {b_shape} -> {out_shape}")
    m, k = (a_shape[1], a_shape[0]) if transa == "T" else (a_shape[0], a_shape[1])
    kb, n = (b_shape[1], b_shape[0]) if transb == "T" else (b_shape[0], b_shape[1])
    if kb != k or tuple(out_shape) != (m, n):
        raise ValueError(f"GEMM shapes do not match: op{transa}{tuple(a_shape)} x op{transb}{tuple(b_shape)} "
                         f"-> {tuple(out_shape)}")
    op = {"N": CUBLAS_OP_N, "T": CUBLAS_OP_T}
    return GemmPlan(opA=op[transb], opB=op[transa], m=n, n=m, k=k,
                    lda=max(1, b_shape[1]), ldb=max(1, a_shape[1]), ldc=max(1, n), swap=True)


class GemvPlan(NamedTuple):
    """The cuBLAS arguments of a row-major ``y = op(a) x``: the ``(r, c)`` C-order ``a`` read column-major
    is ``a^T``, a ``c x r`` matrix with leading dimension ``c``, so the flag flips."""

    op: int
    m: int
    n: int
    lda: int


def _gemv_plan(trans: str, a_shape: tuple[int, ...]) -> GemvPlan:
    """cuBLAS arguments of ``y = op(a) x`` for a C-contiguous 2-D ``a`` (see :class:`GemvPlan`)."""
    if trans not in ("N", "T") or len(a_shape) != 2:
        raise ValueError(f"bad GEMV: op{trans} of shape {tuple(a_shape)}")
    r, c = a_shape
    return GemvPlan(op=CUBLAS_OP_T if trans == "N" else CUBLAS_OP_N, m=c, n=r, lda=max(1, c))


# --------------------------------------------------------------------------- our cuBLAS handle
_nvmath_lib: Any = None
_nvmath_error: str | None = None


def _import_binding(name: str) -> tuple[Any, str | None]:
    """``(nvmath.bindings.<name>, None)``, or ``(None, why)`` when it does not import."""
    import importlib

    try:
        return importlib.import_module(f"nvmath.bindings.{name}"), None
    except Exception as exc:  # ImportError, or its CUDA libraries missing
        return None, f"{type(exc).__name__}: {exc}"


def _nvmath_cublas() -> Any:
    """``nvmath.bindings.cublas``, or ``None`` when it does not import (the reason is kept)."""
    global _nvmath_lib, _nvmath_error
    if _nvmath_lib is None and _nvmath_error is None:
        _nvmath_lib, _nvmath_error = _import_binding("cublas")
    return _nvmath_lib


def _nvmath_reason() -> str | None:
    """Why our cuBLAS handle is not there (``None`` while nothing has failed)."""
    return _nvmath_error


class _Blas:
    """Our cuBLAS handle on one device: the stream it is bound to (a pointer, cached), its workspace
    for direct calls, its math mode (cached)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.handle = lib.create()
        self.workspace = _cupy.empty((CUBLAS_WORKSPACE_BYTES,), dtype=np.uint8)
        self.stream: int | None = None
        self.mode: int | None = None

    def bind(self, stream_ptr: int, workspace: Array) -> None:
        """Issue on ``stream_ptr`` with ``workspace`` (cuBLAS forgets a workspace when its stream is
        set, so both are set together)."""
        self.lib.set_stream(self.handle, stream_ptr)
        self.lib.set_workspace(self.handle, workspace.data.ptr, workspace.nbytes)
        self.stream = stream_ptr
        self.bound = workspace  # cuBLASLt calls take the same workspace on the same stream

    def ready(self, dtype: Any) -> int:
        """The handle, bound to CuPy's current stream and in the math mode TF32 says for ``dtype``."""
        ptr = int(_cupy.cuda.get_current_stream().ptr)
        if ptr != self.stream:
            self.bind(ptr, self.workspace)
        mode = _tf32_mode() if (tf32_enabled() and np.dtype(dtype) == np.float32) else CUBLAS_DEFAULT_MATH
        if mode != self.mode:
            self.lib.set_math_mode(self.handle, mode)
            self.mode = mode
        return self.handle


_blas_handles: dict[int, _Blas] = {}


def _blas() -> _Blas | None:
    """Our cuBLAS handle on the current device (made on first use), or ``None`` without nvmath-python (or
    when its cuBLAS cannot make a handle: then ``cupy.cublas`` does the work and the reason is kept)."""
    global _nvmath_lib, _nvmath_error
    lib = _nvmath_cublas()
    if lib is None:
        return None
    try:
        return _per_device(_blas_handles, lambda: _Blas(lib))
    except Exception as exc:  # nvmath imports but cannot load or start cuBLAS
        _nvmath_lib, _nvmath_error = None, f"its cuBLAS cannot make a handle: {type(exc).__name__}: {exc}"
        return None


def _tf32_mode() -> int:
    """``CUBLAS_TF32_TENSOR_OP_MATH`` as nvmath names it, else cuBLAS's value."""
    lib = _nvmath_cublas()
    math = getattr(lib, "Math", None)
    return int(getattr(math, "TF32_TENSOR_OP_MATH", CUBLAS_TF32_TENSOR_OP_MATH))


_host_scalars: dict[tuple[str, float], np.ndarray] = {}


def _host_scalar(value: float, dtype: Any) -> int:
    """Host address of ``value`` as a ``dtype`` scalar (cuBLAS's alpha and beta in its default host
    pointer mode, read when the call is issued). Cached and never freed."""
    key = (np.dtype(dtype).char, float(value))
    a = _host_scalars.get(key)
    if a is None:
        a = _host_scalars[key] = np.array([value], dtype=dtype)
    return int(a.ctypes.data)


# --------------------------------------------------------------------------- GEMM and GEMV
def _check_pair(a: Array, b: Array) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {a.dtype} and {b.dtype}")


def _scale_empty(out: Array, beta: float) -> Array:
    """``out = beta out`` for an empty sum (cuBLAS would reject the leading dimensions)."""
    if beta == 0.0:
        out.fill(0)
    elif beta != 1.0:
        out *= beta
    return out


def _gemm(transa: str, transb: str, a: Array, b: Array, out: Array, alpha: float = 1.0, beta: float = 0.0) -> Array:
    """``out = alpha op(a) op(b) + beta out`` by cuBLAS, written into ``out`` (C-contiguous)."""
    _check_pair(a, b)
    if out.size == 0:
        return out
    k = a.shape[0] if transa == "T" else a.shape[1]
    if k == 0:
        return _scale_empty(out, beta)
    blas = _blas()
    if blas is None:
        return _cupy_gemm(transa, transb, a, b, out, alpha, beta)
    if out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {a.dtype} array, got {out.dtype}")
    a, b = _contiguous(a), _contiguous(b)
    p = _gemm_plan(transa, transb, a.shape, b.shape, out.shape)
    dt = out.dtype
    fn = blas.lib.sgemm if dt == np.float32 else blas.lib.dgemm
    first, second = (b, a) if p.swap else (a, b)
    fn(blas.ready(dt), p.opA, p.opB, p.m, p.n, p.k, _host_scalar(alpha, dt), first.data.ptr, p.lda,
       second.data.ptr, p.ldb, _host_scalar(beta, dt), out.data.ptr, p.ldc)
    return out


def _cupy_gemm(transa: str, transb: str, a: Array, b: Array, out: Array, alpha: float, beta: float) -> Array:
    """The GEMM by ``cupy.cublas`` (without nvmath-python; it cannot be captured into a graph)."""
    import cupy.cublas

    if tf32_enabled() and out.dtype == np.float32:
        from cupy_backends.cuda.libs import cublas

        handle = _cupy.cuda.device.get_cublas_handle()
        mode = cublas.getMathMode(handle)
        cublas.setMathMode(handle, getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", CUBLAS_TF32_TENSOR_OP_MATH))
        try:
            cupy.cublas.gemm(transa, transb, a, b, out=out, alpha=alpha, beta=beta)
        finally:
            cublas.setMathMode(handle, mode)
    else:
        cupy.cublas.gemm(transa, transb, a, b, out=out, alpha=alpha, beta=beta)
    return out


_ones_cache: dict[tuple[int, int, str], Array] = {}


def _ones(n: int, dtype: Any) -> Array:
    """A cached vector of ``n`` ones (the GEMV that sums ``delta`` over the batch reads it).

    Never evicted: a captured CUDA graph may hold its address; so never first made while recording one.
    """
    key = (_cupy.cuda.Device().id, n, np.dtype(dtype).char)
    v = _ones_cache.get(key)
    if v is None:
        refuse_while_recording(f"the vector of {n} ones ({np.dtype(dtype)})")
        v = _cupy.ones(n, dtype=dtype)
        _ones_cache[key] = v
    return v


def _bias_gemv(delta: Array, out: Array, alpha: float, beta: float) -> Array:
    """``out = alpha delta^T 1 + beta out``: the sum over the batch."""
    if out.size == 0:
        return out
    if delta.shape[0] == 0:
        return _scale_empty(out, beta)
    delta = _contiguous(delta)
    ones = _ones(delta.shape[0], delta.dtype)
    blas = _blas()
    if blas is None:
        import cupy.cublas

        cupy.cublas.gemv("T", alpha, delta, ones, beta, out)
        return out
    if out.dtype != delta.dtype or not out.flags.c_contiguous or out.shape != (delta.shape[1],):
        raise ValueError(f"out must be a C-contiguous {delta.dtype} array of shape ({delta.shape[1]},)")
    p = _gemv_plan("T", delta.shape)
    dt = delta.dtype
    fn = blas.lib.sgemv if dt == np.float32 else blas.lib.dgemv
    fn(blas.ready(dt), p.op, p.m, p.n, _host_scalar(alpha, dt), delta.data.ptr, p.lda, ones.data.ptr, 1,
       _host_scalar(beta, dt), out.data.ptr, 1)
    return out


def flop_count(sizes: list[int], batch: int) -> int:
    """Floating-point operations of the GEMMs of one training step (forward, backward, weight update)."""
    pairs = [n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    return 2 * batch * (3 * sum(pairs) - pairs[0])
