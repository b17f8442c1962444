"""CuPy backend: cuBLAS GEMMs plus one fused kernel per step, on an NVIDIA GPU.

It implements the contract of :mod:`backprop.kernels.contract` (the reference is
:mod:`backprop.kernels.numpy_ref`); given the keyword output buffers, no primitive allocates.

* Forward: ``u = x W^T`` by cuBLAS, into ``y`` (or into ``u`` when it is kept: GELU, SiLU, the
  output layer), then one kernel adds the bias and applies ``f`` in place (or from ``u`` into
  ``y``). Softmax is one row kernel.
* Backward: ``delta W`` by cuBLAS into ``out``, then one kernel multiplies by the slope in place,
  read from ``y`` (``phi(y)``) or, for GELU and SiLU, from ``u``. Gradients: ``delta^T x_prev`` by
  one GEMM, ``delta^T 1`` by one GEMV, into the caller's views of its flat gradient buffer.
* Updates: plain SGD, momentum and Adam are each one fused in-place elementwise kernel per
  parameter array, reading a gradient buffer. Adam's bias corrections can live on the device
  (:func:`adam_corrections`, one thread), so that a recorded CUDA graph replays them correctly. Given the
  guard, they read ``guard[0]`` on the device and leave the parameters and the optimizer state untouched
  unless it is ``1.0``.
* One-launch update: :func:`guarded_step` does the guard, the probes and the update of SGD, momentum or Adam
  in one launch of one block (networks up to ``STEP_MAX_PARAMS`` parameters; the fused narrow-network step
  uses it).
* Guard: :func:`guard_step` checks the loss and the whole flat gradient buffer on the device, in
  two kernels (per-block counts of non-finite elements, then one block that adds them and keeps
  the tally in the float64 guard). Nothing is read back to the host; :func:`add_sum_of_squares`
  (an L2 penalty kept on the device) works the same way.
* Output error: the loss value and the output delta in two kernels (the delta and per-block
  partial sums, then their sum), numerically stable: log-sum-exp with a row max for softmax +
  cross-entropy, sigmoid + BCE from the logits; row weights, when given, scale each row's loss
  and delta in the first kernel. Deterministic: no atomics.
  Their small scratch buffers are cached per (device, shape, dtype) and never freed.
* Data: :func:`array_stats` reduces on the device and reads back six numbers in one copy;
  :func:`one_hot` is one kernel, :func:`gather_rows` one ``take``.
* cuBLAS: through nvmath-python's bindings when they import (our own handle per device, bound to
  CuPy's current stream, with an explicit workspace, so nothing is allocated behind our back),
  else through ``cupy.cublas``. The row-major to column-major mapping is :func:`_gemm_plan`.
* CUDA graphs: :func:`capture` records what a function issues (kernels, copies, cuBLAS calls) into a
  graph, :func:`replay` launches it, :func:`copy_into` is a capturable copy; :mod:`backprop.graph`
  builds the graph of a whole training step from them. Recording needs nvmath-python (CuPy 14's
  cuBLAS wrappers refuse to run while a stream is being captured).
* :func:`set_tf32` lets float32 GEMMs use TF32 tensor cores (and the fused narrow-network passes, their TF32
  twins: :func:`fused_mlp_path`).
* cuBLASLt epilogues: with :func:`set_epilogues`, a layer's GEMMs apply bias and activation, the slope, and
  the bias gradient themselves (:mod:`backprop.kernels.epilogues` picks them; see "cuBLASLt epilogues" below).
* Narrow networks (every width at most 128): with :func:`set_fused_mlp`, each pass is one launch of the
  fused kernels of :mod:`backprop.kernels.fused_mlp_sources` (:func:`mlp_forward`, :func:`mlp_backward`).

The CUDA sources live in :mod:`backprop.kernels.cupy_sources` (importable without CuPy). Importing
this module never fails for want of CuPy or a GPU: :func:`is_available` says why it cannot run.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import cupy_sources as src
from . import epilogues as epi
from . import fused_mlp_sources as fused
from .numpy_ref import count_correct  # noqa: F401  (CuPy reductions on the device; no host read)
from .contract import (
    GUARD_SIZE,
    STAT_FIRST_NONFINITE,
    STAT_MAX,
    STAT_MIN,
    STAT_NON_INTEGER,
    STAT_NONFINITE,
    STAT_ROW_SUM_ERROR,
    STATS_SIZE,
    Capabilities,
    check_weights,
)
from .registry import ACTIVATIONS, LOSSES

try:  # CuPy imports fine without a GPU; only its CUDA calls fail there
    import cupy as _cupy
except Exception as _exc:  # ImportError, or a broken CUDA installation  # pragma: no cover - depends on machine
    _cupy = None
    _IMPORT_ERROR: str = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = ""

NAME = "cupy"
CAPABILITIES = Capabilities(gpu=True, device_queries=True, memory_pool=True, device_choice=True, graphs=True,
                            collectives=True, tf32=True, fused_mlp=True, one_launch_update=True, epilogues=True,
                            layer_aux=True, layer_paths=True)
Array = Any

#: The array module of this backend (``None`` when CuPy is not installed).
xp = _cupy

#: Relative error of a float32 GEMM in TF32 mode (inputs rounded to a 10-bit mantissa), in the
#: Frobenius norm, for well-scaled data: about 1e-3 (against about 1e-6 in full float32).
TF32_RTOL = 2e-3

#: cuBLAS's ``CUBLAS_TF32_TENSOR_OP_MATH`` (``cublasMath_t`` in cublas_api.h, value 3). CuPy 14's
#: ``cupy_backends.cuda.libs.cublas`` does not export it (only ``CUBLAS_TENSOR_OP_MATH``), so the
#: value is used whenever the attribute is missing.
CUBLAS_TF32_TENSOR_OP_MATH = 3

_lock = threading.Lock()
_reason: str | None = None
_tf32 = False


# --------------------------------------------------------------------------- availability
def _probe() -> str:
    if _cupy is None:
        return (f"CuPy is not installed ({_IMPORT_ERROR}); install the CUDA extra, "
                "pip install 'backprop-kernels[cuda12]' or 'backprop-kernels[cuda13]'")
    try:
        n = _cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA GPU ({type(exc).__name__}: {exc})"
    if n < 1:
        return "no CUDA GPU found"
    try:
        import cupy.cublas  # noqa: F401
        from cupy_backends.cuda.libs import cublas  # noqa: F401
    except Exception as exc:
        return f"cuBLAS cannot be loaded ({type(exc).__name__}: {exc})"
    try:  # a real kernel: compiles with NVRTC, launches, reads back
        probe = _cupy.arange(4, dtype=_cupy.float32) * 2
        if float(probe.sum()) != 12.0:
            return "the GPU returned a wrong result for a trivial kernel"
    except Exception as exc:
        return f"CuPy cannot run a kernel on this GPU ({type(exc).__name__}: {exc})"
    return ""


def unavailable_reason() -> str:
    """Why this backend cannot run here ("" when it can); probed once."""
    global _reason
    if _reason is None:
        with _lock:
            if _reason is None:
                _reason = _probe()
    return _reason


def is_available() -> bool:
    """True when CuPy is installed and a CUDA GPU runs its kernels."""
    return unavailable_reason() == ""


def is_simulated() -> bool:
    """CuPy runs on a GPU, never on a simulator."""
    return False


# --------------------------------------------------------------------------- arrays
def to_device(a: Any, dtype: Any) -> Array:
    """Copy host (or device) data into a new C-contiguous CuPy array of ``dtype``."""
    return _cupy.array(a, dtype=dtype, order="C", copy=True)


def to_host(a: Array) -> np.ndarray:
    """Return ``a`` as a NumPy array (a device-to-host copy for CuPy arrays)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return a.get()
    return np.asarray(a)


def zeros(shape: tuple[int, ...], dtype: Any) -> Array:
    return _cupy.zeros(shape, dtype=dtype)


def synchronize() -> None:
    """Block until the device has finished all queued work."""
    _cupy.cuda.Device().synchronize()


def all_finite(a: Array) -> bool:
    """True when no element of ``a`` is NaN or infinite."""
    return bool(_cupy.isfinite(a).all())


def owns(a: Any) -> bool:
    """True when ``a`` is a CuPy array on the current device."""
    return _cupy is not None and isinstance(a, _cupy.ndarray) and a.device.id == _cupy.cuda.Device().id


def as_array(a: Array, dtype: Any) -> Array:
    """``a`` itself when it is a C-contiguous CuPy array of ``dtype`` on the current device, else a
    converted C-contiguous copy made on the device (no trip through the host for a CuPy array)."""
    if owns(a) and a.dtype == np.dtype(dtype) and a.flags.c_contiguous:
        return a
    return _cupy.ascontiguousarray(a, dtype=dtype)


def device_memory_free() -> int:
    """Bytes free for new arrays on the current device: what the driver has free plus the blocks CuPy's
    memory pool holds unused."""
    return int(_cupy.cuda.runtime.memGetInfo()[0]) + int(_cupy.get_default_memory_pool().free_bytes())


def release_memory() -> None:
    """Give the unused blocks of CuPy's memory pool back to the device."""
    _cupy.get_default_memory_pool().free_all_blocks()


def use_device(index: int) -> None:
    """Make GPU ``index`` (modulo the GPUs present) this process's current device: with one process per
    GPU, each takes the GPU of its rank among the processes of its machine."""
    _cupy.cuda.Device(int(index) % _cupy.cuda.runtime.getDeviceCount()).use()


def _nccl() -> Any:
    """CuPy's NCCL module (an ``ImportError`` when CuPy was built without it)."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError, or a missing libnccl
        raise ImportError(f"CuPy's NCCL is not usable here ({type(exc).__name__}: {exc})") from exc
    return nccl


class NcclEngine:
    """Sums and broadcasts of this backend's arrays over processes, by NCCL on the current stream (no host
    wait: the collective is queued after the step's kernels, and the update's kernels after it)."""

    def __init__(self, nccl: Any, comm: Any) -> None:
        self.nccl, self.comm = nccl, comm

    def _type(self, a: Array) -> int:
        types = {"float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64}
        try:
            return types[np.dtype(a.dtype).name]
        except KeyError:
            raise ValueError(f"NCCL reduces float32 or float64 arrays here, got {a.dtype}") from None

    def all_reduce(self, recv: Array, send: Array | None = None) -> None:
        """``recv = sum over the processes of send`` (``recv`` itself when ``send`` is ``None``)."""
        src = recv if send is None else send
        self.comm.allReduce(src.data.ptr, recv.data.ptr, recv.size, self._type(recv), self.nccl.NCCL_SUM,
                            _cupy.cuda.get_current_stream().ptr)

    def broadcast(self, a: Array, root: int = 0) -> None:
        """``a`` = process ``root``'s ``a``, in place."""
        self.comm.bcast(a.data.ptr, a.size, self._type(a), root, _cupy.cuda.get_current_stream().ptr)


def collective(size: int, rank: int, share: Any) -> NcclEngine:
    """The engine that sums this backend's arrays over ``size`` processes: NCCL through CuPy, one process
    per GPU. ``share(value)`` returns process 0's ``value`` on every process (MPI carries NCCL's unique id)."""
    nccl = _nccl()
    uid = share(nccl.get_unique_id() if rank == 0 else None)
    return NcclEngine(nccl, nccl.NcclCommunicator(size, uid, rank))


def device_info() -> dict[str, Any]:
    """Name, memory, compute capability and CUDA versions of the current device (for benchmark reports)."""
    dev = _cupy.cuda.Device()
    props = _cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"")
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "compute_capability": dev.compute_capability,
            "cuda_runtime": _cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": _cupy.cuda.runtime.driverGetVersion()}


def array_stats(a: Array, integers: bool = True, row_sums: bool = True) -> np.ndarray:
    """The ``STAT_*`` facts about ``a`` (see :mod:`backprop.kernels.contract`; the non-integer count only
    with ``integers``, the row sums only with ``row_sums``), reduced on the device into one small
    float64 array and read back with one copy."""
    out = np.zeros(STATS_SIZE, dtype=np.float64)
    out[STAT_FIRST_NONFINITE] = -1
    flat = a.reshape(-1)
    if flat.size == 0:
        out[STAT_MIN] = out[STAT_MAX] = np.nan
        return out
    stats = _cupy.zeros(STATS_SIZE, dtype=np.float64)
    if a.dtype.kind == "f":  # integer and boolean arrays are finite and whole by construction
        finite = _cupy.isfinite(flat)
        stats[STAT_NONFINITE] = flat.size - _cupy.count_nonzero(finite)
        stats[STAT_FIRST_NONFINITE] = _cupy.argmin(finite)  # 0 when all are finite: fixed below
        if integers:
            stats[STAT_NON_INTEGER] = _cupy.count_nonzero(flat != _cupy.floor(flat))
    stats[STAT_MIN] = flat.min()
    stats[STAT_MAX] = flat.max()
    if row_sums and a.ndim == 2 and a.shape[0]:
        stats[STAT_ROW_SUM_ERROR] = _cupy.abs(a.sum(axis=1, dtype=np.float64) - 1).max()
    out[...] = stats.get()
    if out[STAT_NONFINITE] == 0:
        out[STAT_FIRST_NONFINITE] = -1
    return out


def one_hot(labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
    """Rows ``e_{labels[i]}`` of length ``n_classes``, one kernel writing every element of ``out``
    (a label out of range gives a row of zeros)."""
    labels = as_array(labels, np.int64).reshape(-1)
    out = _buffer(out, (labels.shape[0], int(n_classes)), dtype, "out")
    if out.size:
        _ew("bp_one_hot")(labels, np.int64(n_classes), out)
    return out


def gather_rows(src: Array, idx: Array, out: Array) -> Array:
    """``out[i] = src[idx[i]]`` (``idx`` an int64 CuPy array), on the device."""
    _cupy.take(src, idx, axis=0, out=out)
    return out


# --------------------------------------------------------------------------- TF32
def set_tf32(enabled: bool) -> None:
    """Let float32 GEMMs use TF32 tensor cores (Ampere and newer), or not (the default).

    TF32 rounds the GEMM inputs to a 10-bit mantissa and accumulates in float32: several times
    faster on large layers, at a relative error of about 1e-3 per GEMM (``TF32_RTOL``) instead of
    about 1e-6. Float64 is unaffected, and so are the elementwise kernels. The setting is read when
    a GEMM is issued (a captured CUDA graph keeps the mode it was captured with; the graph cache
    is keyed by it). ``NVIDIA_TF32_OVERRIDE=0`` in the environment disables TF32 whatever this says.
    With :func:`set_fused_mlp` too, a float32 narrow network's fused passes run their layers' products on the
    tensor cores in TF32 (``mma.sync``, sm_80 and newer), at the same error per layer (:func:`fused_mlp_path`).
    """
    global _tf32
    _tf32 = bool(enabled)


def tf32_enabled() -> bool:
    return _tf32


# --------------------------------------------------------------------------- cuBLAS
# Every GEMM and GEMV goes through nvmath-python's cuBLAS bindings when they import: our own
# handle per device, bound to CuPy's current stream with an explicit workspace, so that a GEMM
# can be recorded into a CUDA graph (CuPy 14's ``cupy.cublas`` refuses any call while the
# stream captures). Without nvmath-python, ``cupy.cublas`` does the work and :func:`capture`
# refuses.

#: cuBLAS's ``cublasOperation_t`` values (``nvmath.bindings.cublas.Operation.N`` / ``.T``).
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
#: cuBLAS's ``CUBLAS_DEFAULT_MATH`` (``nvmath.bindings.cublas.Math.DEFAULT_MATH``).
CUBLAS_DEFAULT_MATH = 0
#: Bytes of the workspace given to cuBLAS (one per device for direct calls, one per captured graph):
#: what cuBLAS itself takes by default on Hopper, and nothing is allocated behind our back.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20

_NVMATH_HINT = ("pip install nvmath-python (nvmath-python[cu12] or [cu13] brings its CUDA libraries along); "
                "CuPy's own cuBLAS wrappers refuse to run while a stream is being captured")


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
        """The handle, bound to CuPy's current stream and in the math mode ``_tf32`` says for ``dtype``."""
        ptr = int(_cupy.cuda.get_current_stream().ptr)
        if ptr != self.stream:
            self.bind(ptr, self.workspace)
        mode = _tf32_mode() if (_tf32 and np.dtype(dtype) == np.float32) else CUBLAS_DEFAULT_MATH
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


def _per_device(cache: dict[int, Any], make: Callable[[], Any]) -> Any:
    """``cache``'s object for the current device, made by ``make()`` on first use (once, under the lock;
    an exception from ``make`` caches nothing)."""
    dev = _cupy.cuda.Device().id
    obj = cache.get(dev)
    if obj is None:
        with _lock:
            obj = cache.get(dev)
            if obj is None:
                obj = cache[dev] = make()
    return obj


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

    if _tf32 and out.dtype == np.float32:
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

    Never evicted: a captured CUDA graph may hold its address.
    """
    key = (_cupy.cuda.Device().id, n, np.dtype(dtype).char)
    v = _ones_cache.get(key)
    if v is None:
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


# --------------------------------------------------------------------------- cuBLASLt epilogues
# With :func:`set_epilogues`, a layer's GEMMs go through cuBLASLt (``nvmath.bindings.cublasLt``) with
# the epilogue :mod:`backprop.kernels.epilogues` picks: bias and activation in the forward GEMM, the
# slope in the backward GEMM, the bias gradient in the weight-gradient GEMM. Each (epilogue, shape,
# dtype, alignment) has one plan: descriptors and the heuristic's algorithm, made once and kept, so a
# call issues one ``cublasLtMatmul`` on the current stream with the cuBLAS workspace bound there (a
# captured graph's own while it records) and allocates nothing. The bias, aux and bias-gradient
# pointers are set on the descriptor before each call (cuBLASLt reads them when the call is issued).
# A plan the heuristic refuses (no algorithm, or an error such as CUBLAS_STATUS_NOT_SUPPORTED) is
# remembered, and its calls take the GEMM and the elementwise kernel instead.

#: ``cublasComputeType_t`` and ``cudaDataType_t`` values (``nvmath.bindings.cublas.ComputeType``,
#: ``nvmath.CudaDataType``).
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_CUDA_R_32F, _CUDA_R_64F = 0, 1
#: Pointers of the bias (or bias gradient) and of the aux that an epilogue call takes: cuBLASLt's
#: vector loads want this alignment (a misaligned one takes the GEMM and kernel path).
LT_POINTER_ALIGN = 16

_epilogues_on = False
_lt_lib: Any = None
_lt_error: str | None = None
_lt_warned = False


def set_epilogues(enabled: bool) -> None:
    """Let a layer's GEMMs apply their bias, activation, slope and bias gradient in cuBLASLt epilogues
    (ReLU, the tanh form of GELU, identity: :mod:`backprop.kernels.epilogues`) instead of separate
    kernels. Off by default. Needs nvmath-python; without it the GEMM and kernel path stays (one warning)."""
    global _epilogues_on
    _epilogues_on = bool(enabled)


def epilogues_enabled() -> bool:
    return _epilogues_on


def _nvmath_cublaslt() -> Any:
    """``nvmath.bindings.cublasLt`` or ``None`` (then one warning names the reason)."""
    global _lt_lib, _lt_error, _lt_warned
    if _lt_lib is None and _lt_error is None:
        _lt_lib, _lt_error = _import_binding("cublasLt")
    if _lt_lib is None and not _lt_warned:
        _lt_warned = True
        warnings.warn(f"cuBLASLt epilogues need nvmath-python ({_lt_error}): {_NVMATH_HINT}; the layers keep a "
                      "GEMM and an elementwise kernel", RuntimeWarning, stacklevel=3)
    return _lt_lib


def _alignment(ptr: int) -> int:
    """The largest power of two, up to 256, that divides the address ``ptr``."""
    return min(256, ptr & -ptr) if ptr else 256


class _LtPlan:
    """One cuBLASLt matmul: its descriptor (transposes, epilogue, aux leading dimension), the layouts of
    A, B and D (C is D, beta 0), and the heuristic's algorithm (``None`` with ``reason`` when refused)."""

    def __init__(self, lt: _Lt, key: tuple, bias_ptr: int, aux_ptr: int) -> None:
        lib = self.lib = lt.lib
        epilogue, dt_char, tf32, ops, aux_ld, aligns = key[1:]
        f64 = np.dtype(dt_char) == np.float64
        data = _CUDA_R_64F if f64 else _CUDA_R_32F
        compute = _COMPUTE_64F if f64 else (_COMPUTE_32F_FAST_TF32 if tf32 else _COMPUTE_32F)
        self.algo: np.ndarray | None = None
        self.reason = ""
        self.desc = lib.matmul_desc_create(compute, data)
        A = lib.MatmulDescAttribute
        self._set(A.TRANSA, CUBLAS_OP_T if ops.trans_a else CUBLAS_OP_N)
        self._set(A.TRANSB, CUBLAS_OP_T if ops.trans_b else CUBLAS_OP_N)
        self._set(A.EPILOGUE, epi.EPILOGUE[epilogue])
        if aux_ld:
            self._set(A.EPILOGUE_AUX_LD, aux_ld)
        # the heuristic reads the bias and aux pointers for their alignment: the first call's (the key holds
        # their alignments, so a call whose pointers are less aligned gets a plan of its own)
        if bias_ptr:
            self._set(A.BIAS_POINTER, bias_ptr)
        if aux_ptr:
            self._set(A.EPILOGUE_AUX_POINTER, aux_ptr)
        self.layouts = (lib.matrix_layout_create(data, *ops.a_shape(), ops.lda),
                        lib.matrix_layout_create(data, *ops.b_shape(), ops.ldb),
                        lib.matrix_layout_create(data, ops.m, ops.n, ops.ldd))
        pref = lib.matmul_preference_create()
        P = lib.MatmulPreferenceAttribute
        try:
            for attr, value in ((P.MAX_WORKSPACE_BYTES, CUBLAS_WORKSPACE_BYTES), (P.MIN_ALIGNMENT_A_BYTES, aligns[0]),
                                (P.MIN_ALIGNMENT_B_BYTES, aligns[1]), (P.MIN_ALIGNMENT_C_BYTES, aligns[2]),
                                (P.MIN_ALIGNMENT_D_BYTES, aligns[2])):
                v = np.array([value], dtype=lib.get_matmul_preference_attribute_dtype(attr))
                lib.matmul_preference_set_attribute(pref, attr, v.ctypes.data, v.itemsize)
            result = np.zeros(1, dtype=lib.matmul_heuristic_result_dtype)
            found = np.zeros(1, dtype=np.int32)
            a, b, d = self.layouts
            lib.matmul_algo_get_heuristic(lt.handle, self.desc, a, b, d, d, pref, 1, result.ctypes.data,
                                          found.ctypes.data)
            if found[0] < 1:
                self.reason = f"cuBLASLt has no algorithm for {epilogue} here"
            elif int(result["workspace_size"][0]) > CUBLAS_WORKSPACE_BYTES:
                self.reason = f"cuBLASLt's algorithm for {epilogue} wants more workspace than {CUBLAS_WORKSPACE_BYTES}"
            else:
                self.algo = result
        except Exception as exc:  # e.g. cuBLASLtError: CUBLAS_STATUS_NOT_SUPPORTED (an epilogue in float64)
            self.reason = f"cuBLASLt refuses {epilogue}: {type(exc).__name__}: {exc}"
        finally:
            lib.matmul_preference_destroy(pref)

    def _set(self, attr: Any, value: int) -> None:
        v = np.array([value], dtype=self.lib.get_matmul_desc_attribute_dtype(attr))
        self.lib.matmul_desc_set_attribute(self.desc, attr, v.ctypes.data, v.itemsize)


class _Lt:
    """Our cuBLASLt handle on one device and its plans (kept for the process: a captured graph may use them)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.handle = lib.create()
        self.plans: dict[tuple, _LtPlan] = {}


_lt_handles: dict[int, _Lt] = {}


def _lt() -> _Lt | None:
    """Our cuBLASLt handle on the current device, or ``None`` without nvmath-python."""
    global _lt_lib, _lt_error
    lib = _nvmath_cublaslt()
    if lib is None or _blas() is None:
        return None
    try:
        return _per_device(_lt_handles, lambda: _Lt(lib))
    except Exception as exc:  # nvmath imports but cannot load or start cuBLASLt
        _lt_lib, _lt_error = None, f"its cuBLASLt cannot make a handle: {type(exc).__name__}: {exc}"
        return None


#: (kind, activation, m, n, k, dtype) -> what served that GEMM the last time: an epilogue, or why not.
_lt_paths: dict[tuple, str] = {}


def _lt_matmul(kind: str, act: str, choice: epi.Choice, ops: epi.Operands, a: Array, b: Array, d: Array,
               bias: Array | None = None, aux: Array | None = None, aux_ld: int = 0) -> bool:
    """``D = op(A) op(B)`` with ``choice``'s epilogue, issued on the current stream; ``False`` (nothing
    issued) when it takes the GEMM and kernel path. ``bias``: the bias, or where the bias gradient goes."""
    path_key = (kind, act, ops.m, ops.n, ops.k, d.dtype.char)
    if choice.epilogue is None:
        _lt_paths[path_key] = f"GEMM + kernel ({choice.reason})"
        return False
    for p in (bias, aux):
        if p is not None and p.data.ptr % LT_POINTER_ALIGN:
            _lt_paths[path_key] = f"GEMM + kernel (a bias or aux pointer not {LT_POINTER_ALIGN}-byte aligned)"
            return False
    lt = _lt()
    if lt is None:
        _lt_paths[path_key] = f"GEMM + kernel (no cuBLASLt: {_lt_error})"
        return False
    blas = _blas()
    assert blas is not None
    dt = d.dtype
    tf32 = _tf32 and dt == np.float32
    bias_ptr, aux_ptr = (0 if v is None else int(v.data.ptr) for v in (bias, aux))
    aligns = tuple(_alignment(p) for p in (a.data.ptr, b.data.ptr, d.data.ptr, bias_ptr, aux_ptr))
    key = (_cupy.cuda.Device().id, choice.epilogue, dt.char, tf32, ops, aux_ld, aligns)
    plan = lt.plans.get(key)
    if plan is None:
        plan = lt.plans[key] = _LtPlan(lt, key, bias_ptr, aux_ptr)
    if plan.algo is None:
        _lt_paths[path_key] = f"GEMM + kernel ({plan.reason})"
        return False
    blas.ready(dt)  # binds our cuBLAS handle's stream and workspace: the cuBLASLt call shares them
    A = lt.lib.MatmulDescAttribute
    if bias_ptr:
        plan._set(A.BIAS_POINTER, bias_ptr)
    if aux_ptr:
        plan._set(A.EPILOGUE_AUX_POINTER, aux_ptr)
    la, lb, ld = plan.layouts
    try:
        lt.lib.matmul(lt.handle, plan.desc, _host_scalar(1.0, dt), a.data.ptr, la, b.data.ptr, lb,
                      _host_scalar(0.0, dt), d.data.ptr, ld, d.data.ptr, ld, plan.algo.ctypes.data,
                      blas.bound.data.ptr, blas.bound.nbytes, blas.stream)
    except Exception as exc:  # refused when issued (cuBLASLt checks before it enqueues): this plan is done
        plan.algo, plan.reason = None, f"cuBLASLt refused the call: {type(exc).__name__}: {exc}"
        _lt_paths[path_key] = f"GEMM + kernel ({plan.reason})"
        return False
    _lt_paths[path_key] = f"cuBLASLt {choice.epilogue}"
    return True


class ReluMask:
    """The bit mask ``u > 0`` of a ReLU layer's ``(batch, n)`` output, written by the forward GEMM's
    ``RELU_AUX_BIAS`` epilogue and read by the ``DRELU`` epilogue of the backward GEMM below it
    (column-major bits, ``ld`` per row of the batch: :func:`~backprop.kernels.epilogues.relu_mask_layout`).
    ``source``: the address and shape of the ``y`` it was written with (``None`` until then, or when the
    forward pass took another path), so the backward pass reads it only for that ``y``."""

    __slots__ = ("bits", "ld", "shape", "source")

    def __init__(self, batch: int, n: int) -> None:
        self.ld, nbytes = epi.relu_mask_layout(n, batch)
        self.bits = _cupy.zeros((nbytes,), dtype=np.uint8)
        self.shape = (batch, n)
        self.source: tuple[int, tuple[int, ...]] | None = None


def layer_aux(act: str, batch: int, n_out: int, dtype: Any) -> ReluMask | None:
    """The buffer a training forward pass of a ``(batch, n_out)`` layer with activation ``act`` hands to the
    backward pass through the epilogues (``layer_forward(aux=)``, ``delta_backward(aux_prev=)``): a
    :class:`ReluMask` for ReLU (``batch n_out / 8`` bytes, padded; written only while :func:`set_epilogues`
    is on), else ``None``."""
    if act != "relu" or epi.forward_epilogue(act, False, n_out, dtype, True).epilogue is None:
        return None
    return ReluMask(batch, n_out)


def _mask_for(aux: Any, y: Array) -> ReluMask | None:
    """``aux`` when it is a :class:`ReluMask` written with ``y``, else ``None``."""
    if isinstance(aux, ReluMask) and aux.source == (y.data.ptr, tuple(y.shape)):
        return aux
    return None


def epilogue_paths() -> dict[tuple, str]:
    """What served each GEMM the last time it ran: ``(kind, activation, m, n, k, dtype char) -> "cuBLASLt
    EPILOGUE"`` or ``"GEMM + kernel (why)"``; kind is ``forward``, ``backward`` or ``gradients``, and
    ``m, n, k`` are the column-major sizes of :mod:`backprop.kernels.epilogues`."""
    return dict(_lt_paths)


def layer_paths(n_in: int, n_out: int, act: str, act_prev: str | None, batch: int, dtype: Any) -> dict[str, str]:
    """What served a ``n_in -> n_out`` layer's GEMMs at ``batch`` rows the last time they ran (from
    :func:`epilogue_paths`): ``forward``, ``gradients``, and ``backward`` (the delta into the layer below,
    whose activation is ``act_prev``; absent for the first layer)."""
    ch = np.dtype(dtype).char
    kinds = {"forward": ("forward", act, n_out, batch, n_in, ch),
             "gradients": ("gradients", "", n_in, n_out, batch, ch)}
    if act_prev is not None:
        kinds["backward"] = ("backward", act_prev, n_in, batch, n_out, ch)
    default = "GEMM + kernel (epilogues off)" if not _epilogues_on else "not run yet"
    return {kind: _lt_paths.get(key, default) for kind, key in kinds.items()}


def _contiguous(a: Array) -> Array:
    return a if a.flags.c_contiguous else _cupy.ascontiguousarray(a)


def _buffer(buf: Array | None, shape: tuple[int, ...], dtype: Any, name: str) -> Array:
    """``buf`` checked against what a primitive writes into it, or a new array when it is ``None``."""
    if buf is None:
        return _cupy.empty(shape, dtype=dtype)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != np.dtype(dtype) or not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}, "
                         f"got {buf.dtype} {tuple(buf.shape)}{'' if buf.flags.c_contiguous else ' (not contiguous)'}")
    return buf


_scratch_cache: dict[tuple[int, str, tuple[int, ...], str, int], Array] = {}


def _scratch(tag: str, shape: tuple[int, ...], dtype: Any) -> Array:
    """A device scratch buffer for ``tag`` (its use), reused by every call from the same host thread with the
    same device, shape and dtype (threads enqueueing on one stream never share one); never handed out to
    callers. Never evicted: a captured CUDA graph may hold its address."""
    key = (_cupy.cuda.Device().id, tag, tuple(shape), np.dtype(dtype).char, threading.get_ident())
    buf = _scratch_cache.get(key)
    if buf is None:
        buf = _cupy.empty(shape, dtype=dtype)
        _scratch_cache[key] = buf
    return buf


def _guard_bits(guard: Array) -> Array:
    """The int64 view of the float64 guard the guarded kernels read (``guard[0]`` compared by its bits)."""
    if guard.dtype != np.float64 or guard.shape != (GUARD_SIZE,) or not guard.flags.c_contiguous:
        raise ValueError(f"guard must be a contiguous float64 array of shape ({GUARD_SIZE},), "
                         f"got {guard.dtype} {tuple(guard.shape)}")
    return guard.view(np.int64)


# --------------------------------------------------------------------------- compiled kernels
_elementwise: dict[str, Any] = {}
_raw_modules: dict[tuple[int, str], Any] = {}


def _ew(name: str) -> Any:
    """The ElementwiseKernel ``name`` (CuPy compiles it per dtype on first call and caches it)."""
    kern = _elementwise.get(name)
    if kern is None:
        in_params, out_params, operation = src.elementwise_kernels()[name]
        kern = _cupy.ElementwiseKernel(in_params, out_params, operation, name=name, preamble=src.MATH_PREAMBLE,
                                       no_return=True)
        _elementwise[name] = kern
    return kern


def _raw(name: str, dtype: Any) -> Any:
    """Raw kernel ``name`` for ``dtype`` (one module per device and dtype holds them all)."""
    ctype = src.CTYPES[np.dtype(dtype).name]
    key = (_cupy.cuda.Device().id, ctype)
    module = _raw_modules.get(key)
    if module is None:
        module = _cupy.RawModule(code=src.raw_module_source(ctype))
        _raw_modules[key] = module
    return module.get_function(name)


_LOSS_PAIRS = frozenset(src.loss_pairs())


def _scalar(value: float, dtype: Any) -> Any:
    return np.dtype(dtype).type(value)


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}")


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
    y: Array | None = None, u: Array | None = None, aux: ReluMask | None = None,
) -> tuple[Array, Array | None]:
    """``u = x W^T + b``, ``y = f(u)``: one GEMM and one fused kernel. Returns ``(y, u if keep_u else None)``.

    Without ``keep_u`` the GEMM writes into ``y`` and the bias and ``f`` are applied there in place
    (``u`` is ignored); with it the GEMM writes into ``u``, which gets the bias, and ``f(u)`` goes
    to ``y``. Either buffer is allocated when not given. With :func:`set_epilogues`, one cuBLASLt call
    where an epilogue computes ``f`` (``BIAS``, ``RELU_BIAS``, ``GELU_BIAS``; ``GELU_AUX_BIAS`` writes
    the kept ``u``; ``RELU_AUX_BIAS`` also writes the mask ``aux`` of :func:`layer_aux` for the backward pass).
    """
    _check_act(act)
    batch, n_out = x.shape[0], W.shape[0]
    shape = (batch, n_out)
    if keep_u:
        u = _buffer(u, shape, W.dtype, "u")
        y = _buffer(y, shape, W.dtype, "y")
        z = u
    else:
        y = _buffer(y, shape, W.dtype, "y")
        z = y
    mask = aux if isinstance(aux, ReluMask) and aux.shape == shape else None
    if mask is not None:
        mask.source = None
    if _epilogues_on and y.size and x.shape[1] and x.dtype == W.dtype:
        choice = epi.forward_epilogue(act, keep_u, n_out, W.dtype, mask is not None)
        ops = epi.forward_operands(batch, x.shape[1], n_out)
        aux_arr, aux_ld = (mask.bits, mask.ld) if choice.epilogue == "RELU_AUX_BIAS" and mask is not None else \
            ((u, n_out) if choice.epilogue == "GELU_AUX_BIAS" else (None, 0))
        if _lt_matmul("forward", act, choice, ops, _contiguous(W), _contiguous(x), y, _contiguous(b), aux_arr, aux_ld):
            if aux_arr is not None and mask is not None:
                mask.source = (y.data.ptr, shape)
            return y, (u if keep_u else None)
    _gemm("N", "T", x, W, z)
    if z.size == 0:  # nothing to activate
        return y, (u if keep_u else None)
    if ACTIVATIONS[act].rowwise:  # softmax
        grid = (batch + src.ROWS_PER_BLOCK - 1) // src.ROWS_PER_BLOCK
        _raw("bp_softmax_forward", z.dtype)(
            (grid,), (src.BLOCK,), (z, _contiguous(b), y, np.int64(batch), np.int64(n_out)))
    elif keep_u:
        _ew(f"bp_fwd_keep_{act}")(b, _scalar(alpha, z.dtype), u, y)
    else:
        _ew(f"bp_fwd_{act}")(b, _scalar(alpha, z.dtype), y)
    return y, (u if keep_u else None)


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0, *,
    out: Array | None = None, aux_prev: ReluMask | None = None,
) -> Array:
    """``delta^{l-1} = (delta W) * phi(y_prev)``: one GEMM into ``out`` and one fused kernel in place
    (none for identity). With :func:`set_epilogues`, one cuBLASLt call where an epilogue applies the
    slope: ``DGELU`` from ``u_prev`` (``gelu_tanh``), ``DRELU`` from the mask ``aux_prev`` that the
    forward pass wrote with this ``y_prev``."""
    _check_act(act_prev)
    if act_prev not in src.ACT_SLOPE:
        raise ValueError(f"activation {act_prev!r} has no elementwise slope")
    var, _ = src.ACT_SLOPE[act_prev]
    if var == "u" and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = _buffer(out, (delta.shape[0], W.shape[1]), W.dtype, "out")
    if _epilogues_on and g.size and delta.shape[1] and delta.dtype == W.dtype:
        mask = _mask_for(aux_prev, y_prev)
        choice = epi.backward_epilogue(act_prev, W.shape[0], W.shape[1], W.dtype, mask is not None)
        aux_arr, aux_ld = (mask.bits, mask.ld) if choice.epilogue == "DRELU" and mask is not None else \
            ((_contiguous(u_prev), W.shape[1]) if choice.epilogue == "DGELU" else (None, 0))
        ops = epi.backward_operands(delta.shape[0], W.shape[0], W.shape[1])
        if _lt_matmul("backward", act_prev, choice, ops, _contiguous(W), _contiguous(delta), g, None, aux_arr, aux_ld):
            return g
    _gemm("N", "N", delta, W, g)
    if not ACTIVATIONS[act_prev].linear and g.size:
        _ew(f"bp_slope_{act_prev}")(u_prev if var == "u" else y_prev, _scalar(alpha_prev, g.dtype), g)
    return g


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """``dE/dW = delta^T x_prev`` (GEMM) and ``dE/db = delta^T 1`` (GEMV), into ``dW``/``db`` when given;
    with :func:`set_epilogues`, both in one cuBLASLt call (``BGRADB``)."""
    dW = _buffer(dW, (delta.shape[1], x_prev.shape[1]), delta.dtype, "dW")
    db = _buffer(db, (delta.shape[1],), delta.dtype, "db")
    if _epilogues_on and dW.size and delta.shape[0] and x_prev.dtype == delta.dtype:
        choice = epi.gradient_epilogue(delta.shape[0], delta.dtype)
        ops = epi.gradient_operands(delta.shape[0], delta.shape[1], x_prev.shape[1])
        if _lt_matmul("gradients", "", choice, ops, _contiguous(x_prev), _contiguous(delta), dW, db):
            return dW, db
    _gemm("T", "N", delta, x_prev, dW)
    _bias_gemv(delta, db, 1.0, 0.0)
    return dW, db


# --------------------------------------------------------------------------- output error
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


# --------------------------------------------------------------------------- guard
def guard_step(guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None:
    """The guard's verdict on this step, on the device (no host read): count the step; it is ok when no
    earlier step failed and ``loss`` and every element of ``grads`` are finite, and then ``weight *
    loss`` is added to the sum, else the first failing step's number is kept. Two kernels: per-block
    counts of non-finite gradients (``bp_guard_scan``), then one block adds them and updates ``guard``
    (``bp_guard_finish``). The per-block counts live in a cached scratch buffer."""
    _guard_bits(guard)  # checks it
    if loss.dtype != grads.dtype:
        raise TypeError(f"dtype mismatch: loss {loss.dtype}, gradients {grads.dtype}")
    grads = _contiguous(grads)
    dtype = grads.dtype
    n = grads.size
    blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_GUARD_BLOCKS))
    partial = _scratch("guard_partial", (blocks,), dtype)
    _raw("bp_guard_scan", dtype)((blocks,), (src.BLOCK,), (grads, partial, np.int64(n)))
    _raw("bp_guard_finish", dtype)((1,), (src.BLOCK,),
                                   (guard, _contiguous(loss), partial, np.int64(blocks), np.float64(weight)))


# --------------------------------------------------------------------------- optimizers
def _update(name: str, guard: Array | None, ins: tuple, outs: tuple, probe: bool = False) -> None:
    """Launch update kernel ``name`` on ``ins`` (gradient and scalars) and ``outs`` (updated in place), or
    its guarded variant, which reads ``guard[0]`` on the device and writes nothing unless it is 1.0, or
    (``probe``) its raw ``_probe`` twin, which writes nothing but the guard's verdict."""
    if probe:
        if guard is None:
            raise ValueError("probe=True needs the step's guard")
        n = outs[0].size
        if n:
            blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_GUARD_BLOCKS))
            _raw(f"{name}_probe", outs[0].dtype)((blocks,), (src.BLOCK,),
                                                 (*ins, *outs, _guard_bits(guard), np.int64(n)))
    elif guard is None:
        _ew(name)(*ins, *outs)
    else:
        _ew(f"{name}_guarded")(*ins, _guard_bits(guard), *outs)


def sgd_update(p: Array, g: Array, lr: float, weight_decay: float = 0.0, guard: Array | None = None,
               probe: bool = False) -> None:
    """Plain SGD, in place, one fused kernel: ``p <- p - eta (g + lambda p)``."""
    d = p.dtype
    _update("bp_sgd", guard, (g, _scalar(lr, d), _scalar(weight_decay, d)), (p,), probe)


def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused kernel: ``v <- mu v + g'``, ``p <- p - eta v``
    (Nesterov: ``p <- p - eta (g' + mu v)``), ``g' = g + lambda p``."""
    d = p.dtype
    _update("bp_momentum", guard,
            (g, _scalar(lr, d), _scalar(momentum, d), _scalar(weight_decay, d), np.int32(bool(nesterov))), (p, v),
            probe)


def _check_count(count: Array) -> None:
    if count.dtype != np.float64 or tuple(count.shape) != (1,):
        raise ValueError(f"count must be a float64 array of shape (1,), got {count.dtype} {tuple(count.shape)}")


def adam_corrections(count: Array, lr: float, beta1: float, beta2: float, out: Array) -> None:
    """Adam's bias corrections for the coming step, kept on the device, one single-thread kernel
    (``bp_adam_corrections``), no host read: ``t = count[0] + 1`` (float64 ``(1,)``, unchanged),
    ``out[0] = lr / (1 - beta1^t)``, ``out[1] = 1 - beta2^t``, in double rounded to ``out``'s dtype."""
    _check_count(count)
    if tuple(out.shape) != (2,):
        raise ValueError(f"out must be an array of shape (2,), got {tuple(out.shape)}")
    _raw("bp_adam_corrections", out.dtype)(
        (1,), (32,), (count, out, np.float64(lr), np.float64(beta1), np.float64(beta2)))


def count_step(count: Array, guard: Array | None = None) -> None:
    """``count[0] += 1`` on the device unless ``guard[0] != 1.0`` (``bp_count_step``, one thread)."""
    _check_count(count)
    if guard is not None:
        _guard_bits(guard)  # checks it
    _raw("bp_count_step", np.float64)((1,), (32,), (count, count if guard is None else guard,
                                                    np.int64(guard is not None)))


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: Any, weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """Adam, in place, one fused kernel; bias corrections ``1 - beta^step`` computed on the host from an
    int ``step``, or read on the device from the corrections array of :func:`adam_corrections`
    (``bp_adam_device``; ``lr`` unused), the same bits either way."""
    d = p.dtype
    tail = (_scalar(beta1, d), _scalar(beta2, d), _scalar(1 - beta1, d), _scalar(1 - beta2, d))
    if isinstance(step, (int, np.integer)):
        c1 = 1 - beta1**step
        c2 = 1 - beta2**step
        _update("bp_adam", guard,
                (g, _scalar(lr / c1, d), *tail, _scalar(c2, d), _scalar(eps, d), _scalar(weight_decay, d)), (p, m, v),
                probe)
    else:
        if step.dtype != d or tuple(step.shape) != (2,):
            raise TypeError(f"Adam's corrections must be a (2,) array of {d}, got {step.dtype} {tuple(step.shape)}")
        _update("bp_adam_device", guard, (g, step, *tail, _scalar(eps, d), _scalar(weight_decay, d)), (p, m, v),
                probe)


def guarded_step(optimizer: str, guard: Array, loss: Array, weight: float, params: tuple[Array, Array],
                 grads: tuple[Array, Array], state: tuple[tuple[Array, Array], ...], hyper: dict[str, Any],
                 count: Array | None = None) -> bool:
    """A whole guarded update in one launch of one block (``bp_step_<optimizer>``): :func:`guard_step`, the
    probe of every update, then the updates (and Adam's corrections and step count), with the arithmetic of
    those kernels, so the same bits. ``optimizer``: ``"sgd"`` (``hyper``: ``lr``, ``weight_decay``),
    ``"momentum"`` (also ``momentum``, ``nesterov``; ``state``: the velocities) or ``"adam"`` (``lr``, ``beta1``,
    ``beta2``, ``eps``, ``weight_decay``; ``state``: the moments m, v; ``count``: the applied steps). Every
    pair is (weights, biases); the weights take the decay. ``False``, with nothing launched, above
    ``STEP_MAX_PARAMS`` parameters (then the multi-launch path serves)."""
    W, b = params
    d = W.dtype
    n = W.size + b.size
    if n > src.STEP_MAX_PARAMS or n == 0:
        return False
    _guard_bits(guard)  # checks it
    if loss.dtype != d or loss.size != 1:
        raise TypeError(f"the loss must be one {d} value, got {loss.dtype} of shape {tuple(loss.shape)}")
    loss = _contiguous(loss)
    pieces = [*params, *(a for pair in state for a in pair)]
    if any(a.dtype != d for a in (*pieces, *grads)) or grads[0].shape != W.shape or grads[1].shape != b.shape:
        raise ValueError("guarded_step: parameters, gradients and state must be pieces of one dtype and shape")
    lr, wd = _scalar(hyper["lr"], d), _scalar(hyper.get("weight_decay", 0.0), d)
    if optimizer == "sgd":
        ins: tuple = (*grads, lr, wd)
    elif optimizer == "momentum":
        ins = (*grads, lr, _scalar(hyper["momentum"], d), wd, np.int32(bool(hyper["nesterov"])))
    elif optimizer == "adam":
        if count is None:
            raise ValueError("guarded_step('adam') needs the count of applied steps")
        _check_count(count)
        b1, b2 = hyper["beta1"], hyper["beta2"]
        ins = (*grads, _scalar(b1, d), _scalar(b2, d), _scalar(1 - b1, d), _scalar(1 - b2, d), _scalar(hyper["eps"], d),
               wd, count, np.float64(hyper["lr"]), np.float64(b1), np.float64(b2))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (sgd, momentum, adam)")
    args = (*pieces, *ins, guard, loss, np.float64(weight), np.int64(W.size), np.int64(b.size))
    _raw(f"bp_step_{optimizer}", d)((1,), (src.STEP_THREADS,), args)
    return True


# --------------------------------------------------------------------------- CUDA graphs
def capture_unavailable_reason() -> str:
    """Why :func:`capture` cannot record here ("" when it can)."""
    reason = unavailable_reason()
    if reason:
        return reason
    if _blas() is None:
        return f"recording cuBLAS calls into a CUDA graph needs nvmath-python ({_nvmath_error}): {_NVMATH_HINT}"
    return ""


class CapturedGraph:
    """A recorded CUDA graph and what it needs alive: the stream it was recorded on, the memory pool
    that served anything allocated while recording (used by nothing else, so no later allocation
    can take an address the graph writes), and the cuBLAS workspace its GEMMs use. The arrays the
    recorded work reads and writes are the caller's to keep alive."""

    __slots__ = ("graph", "stream", "pool", "workspace")

    def __init__(self, graph: Any, stream: Any, pool: Any, workspace: Array) -> None:
        self.graph, self.stream, self.pool, self.workspace = graph, stream, pool, workspace


def _abandon(stream: Any) -> None:
    """End a capture that failed half-way, ignoring the error an invalidated capture raises."""
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def capture(fn: Callable[[], Any]) -> CapturedGraph:
    """Record every kernel, copy and cuBLAS call ``fn()`` issues into a CUDA graph, without running
    them, on a private non-blocking stream with its own memory pool (kept with the graph). Our
    cuBLAS handle is bound to that stream, with a workspace of the graph's own, before the capture
    begins. On an error the capture is ended and the error re-raised. ``fn`` must not read device
    data back to the host (nothing runs while recording)."""
    reason = capture_unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot record a CUDA graph: {reason}")
    blas = _blas()
    assert blas is not None
    workspace = _cupy.empty((CUBLAS_WORKSPACE_BYTES,), dtype=np.uint8)
    pool = _cupy.cuda.MemoryPool()
    stream = _cupy.cuda.Stream(non_blocking=True)
    try:
        with _cupy.cuda.using_allocator(pool.malloc), stream:
            blas.bind(int(stream.ptr), workspace)
            stream.begin_capture()
            try:
                fn()
            except BaseException:
                _abandon(stream)
                raise
            graph = stream.end_capture()
    finally:
        blas.stream = None  # the next direct call binds the current stream and the direct workspace
    return CapturedGraph(graph, stream, pool, workspace)


def replay(graph: CapturedGraph) -> None:
    """Launch a graph made by :func:`capture` on the current stream."""
    graph.graph.launch(_cupy.cuda.get_current_stream())


def copy_into(dst: Array, src: Array) -> None:
    """``dst[...] = src``: a device-to-device copy on the current stream (capturable) between arrays of
    the same shape and dtype."""
    if tuple(dst.shape) != tuple(src.shape) or dst.dtype != src.dtype:
        raise ValueError(f"copy_into needs arrays of one shape and dtype, got {dst.dtype} {tuple(dst.shape)} "
                         f"and {src.dtype} {tuple(src.shape)}")
    _cupy.copyto(dst, src)


# --------------------------------------------------------------------------- fused narrow networks
_fused_on = False
_fused_modules: dict[tuple[int, str, bool], Any] = {}
#: (device, sizes, activations, alphas, kept u, rows, dtype) -> the device layout and alphas of the fused kernels
_fused_plans: dict[tuple, tuple[Array, Array]] = {}
_sm_counts: dict[int, int] = {}


def set_fused_mlp(enabled: bool) -> None:
    """Let narrow networks (every width at most 128, float32 or float64, activations the fused kernels
    compute: :func:`fused_mlp_reason`) run each pass of a training step or of inference as one kernel
    launch (:func:`mlp_forward`, :func:`mlp_backward`) instead of a GEMM and an elementwise kernel per layer.
    Off by default. The results equal the layer-by-layer path's to rounding (a different order of sums)."""
    global _fused_on
    _fused_on = bool(enabled)


def fused_mlp_enabled() -> bool:
    return _fused_on


def fused_mlp_reason(sizes: Any, acts: Any, dtype: Any) -> str:
    """Why :func:`mlp_forward` and :func:`mlp_backward` do not serve a network of widths ``sizes`` (input first)
    and activations ``acts``; ``""`` when they do."""
    return fused.unserved_reason(list(sizes), list(acts), dtype)


#: What :func:`fused_mlp_path` says when the fused passes take the TF32 kernels.
FUSED_TF32 = "TF32 tensor cores"


def fused_mlp_path(dtype: Any) -> str:
    """Where the fused passes of a ``dtype`` network run: ``"TF32 tensor cores"`` when :func:`set_tf32` is on for
    a float32 network on sm_80 or newer (and ``NVIDIA_TF32_OVERRIDE`` is not ``0``), else ``"CUDA cores"``, with
    the reason TF32 was asked for and not taken."""
    if not (_tf32 and np.dtype(dtype) == np.float32):
        return "CUDA cores"
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return "CUDA cores (NVIDIA_TF32_OVERRIDE=0)"
    cc = int(_cupy.cuda.Device().compute_capability)
    return FUSED_TF32 if cc >= 80 else f"CUDA cores (TF32 needs sm_80 or newer, this is sm_{cc})"


def _fused_tensor_cores(dtype: Any) -> bool:
    """Whether the fused passes of a ``dtype`` network take the TF32 kernels (:func:`fused_mlp_path`)."""
    return fused_mlp_path(dtype) == FUSED_TF32


def _fused_kernel(name: str, dtype: Any, tensor_cores: bool = False) -> Any:
    """Kernel ``name`` of the fused module for ``dtype`` on this device: the CUDA-core module, or the float module
    with the TF32 twins (compiled only when first asked for: it needs sm_80)."""
    ctype = src.CTYPES[np.dtype(dtype).name]
    key = (_cupy.cuda.Device().id, ctype, tensor_cores)
    module = _fused_modules.get(key)
    if module is None:
        module = _fused_modules[key] = _cupy.RawModule(code=fused.module_source(ctype, tensor_cores))
    return module.get_function(name)


def _fused_plan(sizes: tuple, acts: tuple, alphas: tuple, keep_u: tuple, rows: int, dtype: Any) -> tuple[Array, Array]:
    key = (_cupy.cuda.Device().id, sizes, acts, alphas, keep_u, rows, np.dtype(dtype).char)
    plan = _fused_plans.get(key)
    if plan is None:
        reason = fused_mlp_reason(sizes, acts, dtype)
        if reason:
            raise ValueError(f"the fused kernels do not serve this network: {reason}")
        layout = fused.plan(sizes, acts, rows, keep_u)[0]
        plan = _fused_plans[key] = (_cupy.asarray(layout, dtype=np.int64),
                                    _cupy.asarray(np.array(alphas, dtype=np.float64), dtype=dtype))
    return plan


def _fused_args(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                u_flat: Array) -> tuple[int, Array, Array, tuple, tuple]:
    """Check the arrays of a fused pass against the network; returns ``(rows, layout, alphas, sizes, acts)``."""
    sizes, acts = tuple(int(n) for n in sizes), tuple(acts)
    keep_u = tuple(bool(k) for k in keep_u)
    dtype = params.dtype
    rows = int(x.shape[0]) if x.ndim == 2 else -1
    if x.ndim != 2 or x.shape[1] != sizes[0] or x.dtype != dtype or not x.flags.c_contiguous:
        raise ValueError(f"x must be a C-contiguous {dtype} array of shape (rows, {sizes[0]}), got {x.dtype} "
                         f"{tuple(x.shape)}")
    _, _, _, ny, nu = fused.plan(sizes, acts, rows, keep_u)
    n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    _buffer(params, (n_params,), dtype, "params")
    _buffer(y_flat, (ny,), dtype, "y_flat")
    _buffer(u_flat, (max(nu, 1),), dtype, "u_flat")
    layout, alph = _fused_plan(sizes, acts, tuple(float(a) for a in alphas), keep_u, rows, dtype)
    return rows, layout, alph, sizes, acts


def mlp_forward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                u_flat: Array) -> None:
    """``u^l = W^l x^{l-1} + b^l``, ``x^l = f(u^l)`` for every layer in one launch: each layer's ``y`` into
    ``y_flat`` and, where ``keep_u``, its ``u`` into ``u_flat``, layer after layer as ``(rows, n_l)`` blocks
    (``fused_mlp_sources.plan``). ``params``: the network's flat ``[W^1 | ... | W^L | b^1 | ... | b^L]``."""
    _mlp_forward(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat, None)


def mlp_forward_error(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                      u_flat: Array, t: Array, loss: str, param: float = 0.0, *, delta: Array, value: Array,
                      weights: Array | None = None) -> None:
    """:func:`mlp_forward`, and at its end the error at the output, as :func:`output_error` computes it (the same
    formulas, row ``weights`` included): ``delta^L`` into ``delta`` (``(rows, n_L)``) and the mean loss into
    ``value`` (0-d), the loss summed per block and the blocks' sums added by one more launch."""
    dtype = params.dtype
    rows = int(x.shape[0]) if x.ndim == 2 else -1
    pair = fused.PAIR_CODES.get((tuple(acts)[-1], loss))
    if pair is None:
        raise ValueError(f"output {tuple(acts)[-1]!r} does not go with loss {loss!r}")
    check_weights(weights, rows, dtype)
    _buffer(t, (rows, int(tuple(sizes)[-1])), dtype, "t")
    _buffer(delta, (rows, int(tuple(sizes)[-1])), dtype, "delta")
    _buffer(value, (), dtype, "value")
    _mlp_forward(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat, (t, weights, pair, param, delta, value))


def _mlp_forward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                 u_flat: Array, error: tuple | None) -> None:
    rows, layout, alph, sizes, acts = _fused_args(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dtype = params.dtype
    tc = _fused_tensor_cores(dtype)
    width = fused.kernel_width(sizes)
    tiles = -(-rows // fused.tile_rows(width, src.CTYPES[dtype.name]))
    none = _scratch("no_weights", (1,), dtype)  # stands in for the arrays a pass without its error never reads
    if error is None:
        t, w, weighted, pair, k, delta, partial = none, none, 0, fused.NO_ERROR, 0.0, none, none
    else:
        t, weights, pair, k, delta, value = error
        w, weighted = (none, 0) if weights is None else (_contiguous(weights), 1)
        partial = _scratch("fused_loss_partial", (max(tiles, 1),), dtype)
    if rows > 0:
        _fused_kernel(fused.kernel_name("forward", width, tc), dtype, tc)((tiles,), (fused.THREADS,), (
            x, params, layout, alph, np.int32(len(acts)), np.int64(rows), y_flat, u_flat, t, w, np.int32(weighted),
            np.int32(pair), _scalar(k, dtype), _scalar(max(rows, 1), dtype), delta, partial))
    if error is not None:
        _fused_kernel("bp_mlp_mean", dtype, tc)((1,), (src.BLOCK,), (partial, np.int64(tiles), _scalar(rows, dtype),
                                                                  value))


def _backward_blocks() -> int:
    """Blocks of the fused backward pass: two per multiprocessor (each keeps a slice of partial gradients)."""
    dev = _cupy.cuda.Device().id
    if dev not in _sm_counts:
        _sm_counts[dev] = int(_cupy.cuda.runtime.getDeviceProperties(dev).get("multiProcessorCount", 4))
    return 2 * _sm_counts[dev]


def mlp_backward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                 u_flat: Array, delta: Array, grads: Array) -> None:
    """From ``delta^L`` (``(rows, n_L)``), every ``dE/dW^l = delta^l (x^{l-1})^T`` and ``dE/db^l = sum delta^l``
    into ``grads`` (the parameters' flat layout), with ``delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l`` kept in
    shared memory: one launch whose blocks each sum their tiles into a slice of a cached buffer, then one that
    adds the slices in a fixed order (deterministic). ``y_flat``, ``u_flat``: what :func:`mlp_forward` wrote."""
    rows, layout, alph, sizes, acts = _fused_args(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dtype = params.dtype
    tc = _fused_tensor_cores(dtype)
    _buffer(delta, (rows, sizes[-1]), dtype, "delta")
    n = int(params.size)
    _buffer(grads, (n,), dtype, "grads")
    if rows == 0:
        _fused_kernel("bp_mlp_reduce", dtype, tc)((1,), (src.BLOCK,), (grads, np.int64(0), np.int64(n), grads))  # zeros
        return
    width = fused.kernel_width(sizes)
    tiles = -(-rows // fused.tile_rows(width, src.CTYPES[dtype.name]))
    grid = max(1, min(tiles, _backward_blocks()))
    slices = grid * (fused.THREADS // width)  # one per group of threads of each block
    partial = _scratch("fused_partial", (slices * n,), dtype)
    _fused_kernel(fused.kernel_name("backward", width, tc), dtype, tc)((grid,), (fused.THREADS,), (
        x, params, layout, alph, np.int32(len(acts)), np.int64(rows), y_flat, u_flat, delta, partial, np.int64(n)))
    blocks = min(-(-n // src.BLOCK), 1024)
    _fused_kernel("bp_mlp_reduce", dtype, tc)((blocks,), (src.BLOCK,), (partial, np.int64(slices), np.int64(n),
                                                                        grads))


def flop_count(sizes: list[int], batch: int) -> int:
    """Floating-point operations of the GEMMs of one training step (forward, backward, weight update)."""
    pairs = [n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    return 2 * batch * (3 * sum(pairs) - pairs[0])


__all__ = [
    "CUBLAS_TF32_TENSOR_OP_MATH",
    "CAPABILITIES",
    "is_simulated",
    "LT_POINTER_ALIGN",
    "NAME",
    "ReluMask",
    "TF32_RTOL",
    "adam_corrections",
    "adam_update",
    "add_sum_of_squares",
    "all_finite",
    "array_stats",
    "as_array",
    "capture",
    "capture_unavailable_reason",
    "collective",
    "copy_into",
    "count_correct",
    "delta_backward",
    "device_info",
    "device_memory_free",
    "epilogue_paths",
    "epilogues_enabled",
    "flop_count",
    "fused_mlp_enabled",
    "fused_mlp_path",
    "fused_mlp_reason",
    "gather_rows",
    "guard_step",
    "guarded_step",
    "is_available",
    "layer_aux",
    "layer_forward",
    "layer_paths",
    "mlp_backward",
    "mlp_forward",
    "mlp_forward_error",
    "momentum_update",
    "one_hot",
    "output_error",
    "owns",
    "release_memory",
    "replay",
    "set_epilogues",
    "set_fused_mlp",
    "set_tf32",
    "sgd_update",
    "synchronize",
    "tf32_enabled",
    "to_device",
    "to_host",
    "unavailable_reason",
    "use_device",
    "weight_gradients",
    "xp",
    "zeros",
]
