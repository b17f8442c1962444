"""The CuPy backend beyond the shared suite: unavailability without a GPU (runs anywhere), its Python
side against a CPU stand-in for CuPy that runs the real CUDA sources in the host emulator, and on a
GPU (marked ``gpu``, skipped cleanly without one) poisoned outputs at real sizes, the buffers,
guard and data primitives of the contract against the reference, CUDA-graph steps equal to
ordinary steps, and the TF32 mode within its documented tolerance."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

from backprop.backend import available_backends, resolve_backend
from backprop.kernels import ACTIVATIONS, LOSSES
from backprop.kernels import numpy_ref as ref
from backprop.kernels.contract import (
    GUARD_FAILED,
    GUARD_LOSS_SUM,
    GUARD_OK,
    GUARD_SIZE,
    GUARD_STEPS,
    STAT_FIRST_NONFINITE,
    STAT_NON_INTEGER,
    STAT_NONFINITE,
    missing_names,
)

HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden]
PAIRS = sorted({(o, loss) for loss, s in LOSSES.items() for o in s.outputs})
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}


def _alpha(act: str) -> float:
    return ALPHA.get(act, ACTIVATIONS[act].default_alpha)


def _module():
    from backprop.kernels import cupy_gpu

    return cupy_gpu


# --------------------------------------------------------------------------- anywhere
def test_module_imports_without_cupy():
    """With CuPy missing, the module imports and says so instead of raising."""
    code = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None  # import cupy -> ImportError
        from backprop.kernels import cupy_gpu as k
        from backprop.kernels.contract import missing_names
        assert k.xp is None and k.CAPABILITIES.gpu is True and k.NAME == "cupy"
        assert not k.is_available()
        assert "not installed" in k.unavailable_reason(), k.unavailable_reason()
        assert not missing_names(k), missing_names(k)
        assert callable(k.capture) and callable(k.replay) and callable(k.copy_into)
        assert callable(k.set_tf32) and callable(k.device_memory_free)
        assert "not installed" in k.capture_unavailable_reason()
        assert k.owns([1.0]) is False
        from backprop.backend import available_backends, resolve_backend
        assert "cupy" not in available_backends()
        try:
            resolve_backend("cupy")
        except ValueError as exc:
            assert "not installed" in str(exc)
        else:
            raise AssertionError("resolve_backend('cupy') should fail without CuPy")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_reports_itself_unavailable_without_a_gpu():
    k = _module()
    if k.is_available():
        pytest.skip("a GPU is here: the backend is available")
    reason = k.unavailable_reason()
    assert reason and isinstance(reason, str)
    assert k.CAPABILITIES.gpu is True
    assert "cupy" not in available_backends()
    with pytest.raises(ValueError, match="not available"):
        resolve_backend("cupy")


def test_meets_the_contract():
    from backprop.kernels.contract import REQUIRED, Capabilities, check_capabilities

    k = _module()
    assert not missing_names(k)
    assert all(callable(getattr(k, n)) for n in REQUIRED if n not in ("NAME", "xp", "CAPABILITIES"))
    # every capability is declared, and every function it promises is there
    assert k.CAPABILITIES == Capabilities(**{f: True for f in Capabilities.__dataclass_fields__})
    assert not check_capabilities(k)
    assert callable(k.flop_count)
    assert not hasattr(k, "sgd_update_from_delta")  # plain SGD is sgd_update on a gradient buffer
    assert not hasattr(k, "capture_train_step")  # the step is recorded by backprop.graph from capture


def test_flop_count():
    k = _module()
    # forward 2*B*(a+b), backward delta 2*B*b (none for the first layer), gradients 2*B*(a+b)
    a, b = 3 * 5, 5 * 2
    assert k.flop_count([3, 5, 2], 7) == 2 * 7 * (3 * (a + b) - a)


def test_tf32_switch_is_a_plain_setting():
    k = _module()
    assert k.tf32_enabled() is False
    k.set_tf32(True)
    try:
        assert k.tf32_enabled() is True
    finally:
        k.set_tf32(False)
    assert 1e-4 < k.TF32_RTOL <= 1e-2


# --------------------------------------------------------------------------- CPU stand-in for CuPy
# A fake ``cupy`` whose arrays are NumPy arrays (new ones filled with NaN, like poisoned memory),
# whose cuBLAS GEMM/GEMV follow ``cupy.cublas``'s signatures and checks, and whose
# ElementwiseKernel and RawModule run the backend's real CUDA sources in the host emulator of
# test_cupy_sources. Stream capture records every device operation instead of running it (and
# refuses host synchronization), graph launch replays them. A fake ``nvmath.bindings.cublas``
# works as cuBLAS does: on raw pointers (looked up in a registry of every fake device
# allocation), column-major with leading dimensions (the reference of test_graph), alpha and beta
# read from host memory when the call is issued, on the stream its handle is bound to (which must
# be CuPy's current one), with a workspace that setting the stream drops. It checks the Python side
# of the backend on a CPU: argument order and types of every launch, shapes, in-place writes, the
# row-major to column-major mapping, the graph logic. It is a model of CuPy, not CuPy: the GPU
# tests below are the real thing.
import bisect as _bisect
import ctypes as _ctypes
import enum as _enum
import types as _types

from tests import fake_cublaslt as _fake_cublaslt
from tests import test_cupy_sources as _src_tests
from tests import test_graph as _colmajor
from tests.test_kernels import _targets


def _tf32_layer(k, rng):
    """A 256 -> 128 layer at batch 64 on the backend in float32: the float64 ``u`` it should give, its
    device inputs, and the ``u`` of an ordinary (TF32 off) float32 forward pass."""
    x, W, b = rng.normal(size=(64, 256)), rng.normal(size=(128, 256)) / 16, rng.normal(size=128)
    xd, Wd, bd = (k.to_device(a, np.float32) for a in (x, W, b))
    _, u32 = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
    return x @ W.T + b, (xd, Wd, bd), u32


class _FakeArray(np.ndarray):
    @property
    def data(self):  # cupy's MemoryPointer: only .ptr is used
        return _types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return _types.SimpleNamespace(id=0)

    def get(self):
        _Fake.no_sync("ndarray.get")
        return np.array(self)


def _fa(a) -> _FakeArray:
    arr = np.asarray(a)
    _Fake.register(arr)
    return arr.view(_FakeArray)


class _Fake:
    stream_stack: list = []
    streams: dict = {}  # pointer -> stream
    math_mode = 0  # the mode of CuPy's cuBLAS handle
    modes_set: list = []  # every cuBLAS math mode the backend set
    launches: list = []
    allocations = 0  # device arrays made by empty/zeros/ones/empty_like
    captured_allocations = 0  # device memory asked for (those and copies from the host) while a stream captured
    allocators: list = []  # the allocators using_allocator set, innermost last
    handles: dict = {}  # nvmath cuBLAS handle -> its state
    blas_calls: list = []  # (name, stream pointer, capturing) of every nvmath GEMM/GEMV
    lt_calls: list = []  # (epilogue, stream pointer, capturing) of every fake cuBLASLt matmul
    lt_refused: set = set()  # (epilogue name, dtype) the fake cuBLASLt's heuristic refuses
    memory: dict = {}  # start address -> the NumPy array owning that memory
    starts: list = []  # sorted start addresses

    @classmethod
    def reset(cls):
        cls.stream_stack, cls.streams, cls.launches, cls.modes_set, cls.blas_calls = [], {}, [], [], []
        cls.lt_calls.clear()
        cls.lt_refused.clear()
        cls.math_mode = cls.allocations = cls.captured_allocations = 0
        cls.allocators = []
        cls.handles, cls.memory, cls.starts = {}, {}, []

    @classmethod
    def capturing(cls) -> bool:
        return any(getattr(s, "_ops", None) is not None for s in cls.streams.values())

    @classmethod
    def no_sync(cls, what):
        if cls.capturing():
            raise RuntimeError(f"{what} synchronizes the host during stream capture")

    @classmethod
    def current(cls):
        return cls.stream_stack[-1] if cls.stream_stack else cls.streams.get(0)

    @classmethod
    def run(cls, fn, stream=None):
        """Run a device operation, or record it when its stream (default: the current one) is capturing."""
        cur = cls.current() if stream is None else stream
        if cur is not None and cur._ops is not None:
            cur._ops.append(fn)
        else:
            fn()

    @classmethod
    def register(cls, arr: np.ndarray) -> None:
        """Remember the memory under ``arr`` (its owning array), so that a pointer into it can be read."""
        owner = arr
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        if not owner.flags.c_contiguous or owner.nbytes == 0:
            return
        start = owner.__array_interface__["data"][0]
        if start not in cls.memory:
            _bisect.insort(cls.starts, start)
        cls.memory[start] = np.asarray(owner)

    @classmethod
    def flat(cls, ptr: int, dtype, count: int) -> np.ndarray:
        """The ``count`` elements of ``dtype`` at device address ``ptr``, as a writable 1-D view; an address
        outside every fake allocation fails (as an illegal memory access would)."""
        dtype = np.dtype(dtype)
        assert type(ptr) is int, f"a pointer must be an int, got {type(ptr).__name__}"
        i = _bisect.bisect_right(cls.starts, ptr) - 1
        assert i >= 0, f"address {ptr:#x} is not device memory"
        start = cls.starts[i]
        owner = cls.memory[start]
        off, nbytes = ptr - start, count * dtype.itemsize
        assert off + nbytes <= owner.nbytes, f"{nbytes} bytes at {ptr:#x} run past an allocation of {owner.nbytes}"
        assert off % dtype.itemsize == 0, "misaligned pointer"
        return owner.reshape(-1).view(np.uint8)[off:off + nbytes].view(dtype)


def _malloc(nbytes: int) -> None:
    """Device memory asked for: counted when a stream captures, and taken from the allocator that
    ``using_allocator`` set (a recorded graph's memory pool), as CuPy does."""
    _Fake.captured_allocations += _Fake.capturing()
    if _Fake.allocators and _Fake.allocators[-1] is not None:
        _Fake.allocators[-1](nbytes)


def _empty(shape, dtype=np.float64):
    _Fake.allocations += 1
    dtype = np.dtype(dtype)
    _malloc(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    if dtype.kind == "f":
        return _fa(np.full(shape, np.nan, dtype=dtype))
    return _fa(np.full(shape, -7 if dtype.kind == "i" else 0xF9, dtype=dtype))  # poison for integers


def _copied(source, result: np.ndarray) -> _FakeArray:
    """``result`` of ``cupy.array``, ``asarray`` or ``ascontiguousarray`` of ``source``: device memory of its
    own (asked for) unless it is ``source``'s, a device array."""
    if not (isinstance(source, _FakeArray) and np.shares_memory(source, result)):
        _malloc(result.nbytes)
    return _fa(result)


def _tf32(a: np.ndarray) -> np.ndarray:
    """Round float32 to TF32 (10-bit mantissa), to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)
    return bits.astype(np.uint32).view(np.float32).reshape(a.shape)


def _op(a, trans):
    return a.T if trans == "T" else a


def _cupy_refuses_capture():
    """CuPy 14's cuBLAS wrappers (``_setStream``) refuse any call while the current stream captures."""
    cur = _Fake.current()
    if cur is not None and cur._ops is not None:
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")


def _gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    _cupy_refuses_capture()
    assert a.ndim == b.ndim == 2 and a.dtype == b.dtype
    m, k = (a.shape if transa == "N" else a.shape[::-1])
    n = b.shape[1] if transb == "N" else b.shape[0]
    assert (b.shape[0] if transb == "N" else b.shape[1]) == k
    assert out is not None and out.shape == (m, n) and out.dtype == a.dtype

    def fn():
        A, B = np.asarray(_op(a, transa)), np.asarray(_op(b, transb))
        if _Fake.math_mode == _CUBLAS_TF32 and a.dtype == np.float32:
            A, B = _tf32(A), _tf32(B)
        prod = (A @ B).astype(out.dtype)
        res = alpha * prod if beta == 0 else alpha * prod + beta * np.asarray(out)  # beta 0: out not read
        np.asarray(out)[...] = res
    _Fake.run(fn)
    return out


def _gemv(transa, alpha, a, x, beta, y):
    _cupy_refuses_capture()
    assert a.ndim == 2 and x.ndim == y.ndim == 1 and a.dtype == x.dtype == y.dtype
    xlen, ylen = (a.shape[1], a.shape[0]) if transa == "N" else a.shape
    assert x.shape[0] == xlen and y.shape[0] == ylen

    def fn():
        prod = (np.asarray(_op(a, transa)) @ np.asarray(x)).astype(y.dtype)
        np.asarray(y)[...] = alpha * prod if beta == 0 else alpha * prod + beta * np.asarray(y)
    _Fake.run(fn)


#: cuBLAS's own value of CUBLAS_TF32_TENSOR_OP_MATH (cublasMath_t).
_CUBLAS_TF32 = 3


def _set_math_mode(handle, mode):
    _Fake.math_mode = mode
    _Fake.modes_set.append(mode)


# As in CuPy 14: CUBLAS_TENSOR_OP_MATH is there, CUBLAS_TF32_TENSOR_OP_MATH is not (a test adds it).
_cublas_lib = _types.ModuleType("cupy_backends.cuda.libs.cublas")
_cublas_lib.CUBLAS_DEFAULT_MATH = 0
_cublas_lib.CUBLAS_TENSOR_OP_MATH = 1
_cublas_lib.getMathMode = lambda handle: _Fake.math_mode
_cublas_lib.setMathMode = _set_math_mode


class _Stream:
    _next_ptr = 0x5000

    def __init__(self, non_blocking=False, ptr=None):
        self._ops = None
        if ptr is None:
            ptr = _Stream._next_ptr
            _Stream._next_ptr += 0x10
        self.ptr = ptr
        _Fake.streams[ptr] = self

    def __enter__(self):
        _Fake.stream_stack.append(self)
        return self

    def __exit__(self, *exc):
        _Fake.stream_stack.pop()

    def begin_capture(self):
        assert self._ops is None, "already capturing"
        self._ops = []

    def end_capture(self):
        ops, self._ops = self._ops, None
        return _Graph(ops)

    def synchronize(self):
        _Fake.no_sync("Stream.synchronize")


class _Graph:
    def __init__(self, ops):
        self.ops = ops

    def launch(self, stream=None):
        for fn in self.ops:
            _Fake.run(fn, stream)


# --------------------------------------------------------------------------- fake nvmath.bindings.cublas
class _Operation(_enum.IntEnum):  # nvmath.bindings.cublas.Operation
    N = 0
    T = 1
    C = 2


class _Math(_enum.IntEnum):  # nvmath.bindings.cublas.Math
    DEFAULT_MATH = 0
    TENSOR_OP_MATH = 1
    PEDANTIC_MATH = 2
    TF32_TENSOR_OP_MATH = 3


def _nv_create():
    handle = 0x7000 + len(_Fake.handles)
    _Fake.handles[handle] = _types.SimpleNamespace(stream=None, workspace=None, mode=int(_Math.DEFAULT_MATH))
    return handle


def _nv_state(handle):
    assert type(handle) is int and handle in _Fake.handles, f"not a cuBLAS handle: {handle!r}"
    return _Fake.handles[handle]


def _nv_set_stream(handle, stream):
    h = _nv_state(handle)
    assert type(stream) is int and stream in _Fake.streams, f"not a stream: {stream!r}"
    h.stream, h.workspace = stream, None  # cublasSetStream resets the workspace to cuBLAS's own pool


def _nv_set_workspace(handle, ptr, size):
    h = _nv_state(handle)
    _Fake.flat(ptr, np.uint8, size)  # device memory of that size
    h.workspace = (ptr, size)


def _nv_set_math_mode(handle, mode):
    _nv_state(handle).mode = int(mode)
    _Fake.modes_set.append(int(mode))


def _nv_issue(name, handle, fn):
    """Enqueue ``fn`` on the handle's stream (recorded if that stream captures), as cuBLAS does."""
    h = _nv_state(handle)
    assert h.stream is not None, f"{name}: the handle was never given a stream"
    cur = _Fake.current()
    assert h.stream == cur.ptr, f"{name}: handle bound to stream {h.stream:#x}, CuPy's current is {cur.ptr:#x}"
    assert h.workspace is not None, f"{name}: no workspace (setting the stream drops it): cuBLAS would allocate"
    stream = _Fake.streams[h.stream]
    _Fake.blas_calls.append((name, h.stream, stream._ops is not None))
    _Fake.run(fn, stream)


def _host_value(ptr, dtype):
    """A host scalar read through its address, as cuBLAS reads alpha and beta in host pointer mode."""
    assert type(ptr) is int and ptr
    c = _ctypes.c_float if np.dtype(dtype) == np.float32 else _ctypes.c_double
    return c.from_address(ptr).value


def _nv_gemm(dtype):
    dtype = np.dtype(dtype)

    def gemm(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        for v in (transa, transb, m, n, k, lda, ldb, ldc):
            assert isinstance(v, int), f"gemm: {v!r} is not an int"
        if min(m, n, k) < 0 or transa not in (0, 1) or transb not in (0, 1) or ldc < max(1, m) \
                or lda < max(1, m if transa == _Operation.N else k) or ldb < max(1, k if transb == _Operation.N else n):
            raise RuntimeError("CUBLAS_STATUS_INVALID_VALUE")
        ra, ca = (m, k) if transa == _Operation.N else (k, m)
        rb, cb = (k, n) if transb == _Operation.N else (n, k)
        A = _Fake.flat(a, dtype, lda * (ca - 1) + ra)
        B = _Fake.flat(b, dtype, ldb * (cb - 1) + rb)
        C = _Fake.flat(c, dtype, ldc * (n - 1) + m)
        al, be = _host_value(alpha, dtype), _host_value(beta, dtype)  # read now, not at replay
        tf32 = _nv_state(handle).mode == _Math.TF32_TENSOR_OP_MATH and dtype == np.float32

        def fn():
            _colmajor.colmajor_gemm(int(transa), int(transb), m, n, k, al, A, lda, B, ldb, be, C, ldc,
                                    rounding=_tf32 if tf32 else None)
        _nv_issue("gemm", handle, fn)
    return gemm


def _nv_gemv(dtype):
    dtype = np.dtype(dtype)

    def gemv(handle, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):
        for v in (trans, m, n, lda, incx, incy):
            assert isinstance(v, int), f"gemv: {v!r} is not an int"
        if min(m, n) < 0 or trans not in (0, 1) or lda < max(1, m) or incx < 1 or incy < 1:
            raise RuntimeError("CUBLAS_STATUS_INVALID_VALUE")
        xlen, ylen = (n, m) if trans == _Operation.N else (m, n)
        A = _Fake.flat(a, dtype, lda * (n - 1) + m)
        X = _Fake.flat(x, dtype, (xlen - 1) * incx + 1)
        Y = _Fake.flat(y, dtype, (ylen - 1) * incy + 1)
        al, be = _host_value(alpha, dtype), _host_value(beta, dtype)

        def fn():
            _colmajor.colmajor_gemv(int(trans), m, n, al, A, lda, X, incx, be, Y, incy)
        _nv_issue("gemv", handle, fn)
    return gemv


def _make_fake_nvmath() -> dict:
    lib = _types.ModuleType("nvmath.bindings.cublas")
    lib.Operation, lib.Math = _Operation, _Math
    lib.create, lib.set_stream, lib.set_workspace = _nv_create, _nv_set_stream, _nv_set_workspace
    lib.set_math_mode, lib.get_math_mode = _nv_set_math_mode, lambda handle: _nv_state(handle).mode
    lib.sgemm, lib.dgemm = _nv_gemm(np.float32), _nv_gemm(np.float64)
    lib.sgemv, lib.dgemv = _nv_gemv(np.float32), _nv_gemv(np.float64)
    lt = _fake_cublaslt.make(_FakeDevice, _Fake.lt_refused, _Fake.lt_calls)
    bindings = _types.ModuleType("nvmath.bindings")
    bindings.cublas, bindings.cublasLt = lib, lt
    nvmath = _types.ModuleType("nvmath")
    nvmath.bindings = bindings
    return {"nvmath": nvmath, "nvmath.bindings": bindings, "nvmath.bindings.cublas": lib,
            "nvmath.bindings.cublasLt": lt}


class _FakeDevice:
    """What the fake cuBLASLt (tests/fake_cublaslt.py) reads of the fake device."""

    flat = _Fake.flat
    current = _Fake.current
    run = _Fake.run
    host_value = staticmethod(_host_value)

    @staticmethod
    def stream(ptr):
        return _Fake.streams[ptr]


class _EK:
    def __init__(self, in_params, out_params, operation, name="kernel", preamble="", no_return=False, **kw):
        from backprop.kernels import cupy_sources as S

        assert S.elementwise_kernels()[name] == (in_params, out_params, operation), name
        assert preamble == S.MATH_PREAMBLE
        self.name, self.ins, self.outs = name, _src_tests._split(in_params), _src_tests._split(out_params)

    def __call__(self, *args):
        nin = len(self.ins)
        assert len(args) == nin + len(self.outs), f"{self.name}: {len(args)} arguments"
        outs = args[nin:]
        T = outs[0].dtype
        raw = {pname for typ, pname in self.ins + self.outs if typ.startswith("raw ")}
        arrays = [a for (_t, pname), a in zip(self.ins + self.outs, args)
                  if isinstance(a, np.ndarray) and a.ndim > 0 and pname not in raw]
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        for (typ, pname), a in zip(self.ins + self.outs, args):
            if pname in raw:  # CuPy raises on a dtype mismatch of a typed parameter, raw or not
                assert isinstance(a, np.ndarray), f"{self.name}: {pname} must be an array"
                if a.dtype != (T if typ.split()[1] == "T" else np.dtype(typ.split()[1])):
                    raise TypeError(f"{self.name}: {pname} is {a.dtype}, the kernel takes {typ}")
            elif isinstance(a, np.ndarray) and a.ndim > 0:
                if typ == "T" and a.dtype != T:
                    raise TypeError(f"{self.name}: {pname} is {a.dtype}, T is {T}")
            else:
                assert np.isscalar(a), f"{self.name}: {pname} must be a scalar"
        for o in outs:
            if o.shape != shape:
                raise ValueError(f"{self.name}: out shape {o.shape} != {shape}")
        n = int(np.prod(shape))

        def fn():
            emu = _src_tests.Emu("float" if T == np.float32 else "double")
            arrs, scal = {}, {"_n": n, "_ncols": n}
            for (_typ, pname), a in zip(self.ins, args):
                if pname in raw:
                    arrs[f"_raw_{pname}"] = np.asarray(a).ravel()
                elif isinstance(a, np.ndarray) and a.ndim > 0:
                    arrs[f"_raw_{pname}"] = np.broadcast_to(np.asarray(a), shape).ravel()
                else:
                    scal[pname] = float(a)
            for (_typ, pname), o in zip(self.outs, outs):
                arrs[f"_raw_{pname}"] = np.asarray(o).ravel()
            got = emu(f"ew_{self.name}", 1, 64, arrs, scal, outputs=tuple(f"_raw_{p}" for _, p in self.outs))
            for (_typ, pname), o in zip(self.outs, outs):
                np.asarray(o)[...] = got[f"_raw_{pname}"].reshape(shape)
        _Fake.launches.append(self.name)
        _Fake.run(fn)


_C_SCALAR = {"long long": np.int64, "int": np.int32, "double": np.float64}


def _check_restrict(kernel: str, pname: str, decl: str, a: np.ndarray, pointers: dict) -> None:
    """No array given to a ``__restrict__`` pointer of a launch overlaps another of its arrays unless neither
    is written (both ``const``): the compiler may otherwise keep a stale value or reorder the accesses."""
    for other, (other_decl, b) in pointers.items():
        if np.shares_memory(a, b) and "__restrict__" in decl + other_decl:
            assert decl.startswith("const") and other_decl.startswith("const"), \
                f"{kernel}: {pname} overlaps {other}, a __restrict__ pointer of the two, and one is written"


class _RawKernel:
    def __init__(self, name, ctype, params, emulator=None):
        self.name, self.ctype, self.params = name, ctype, params
        self.emulator = emulator or (lambda: _src_tests.Emu(ctype))  # the backend module's emulator by default

    def __call__(self, grid, block, args):
        assert len(grid) == 1 and len(block) == 1 and block[0] % 32 == 0
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)}"
        T = np.float32 if self.ctype == "float" else np.float64
        arrays, scalars, aliases, outputs, targets, pointers = {}, {}, {}, [], {}, {}
        for decl, a in zip(self.params, args):
            pname = decl.replace("*", " ").split()[-1]
            if "*" in decl:
                ctype = _src_tests._pointee(decl)
                want = T if ctype == "T" else _src_tests._NP_OF[ctype]
                assert isinstance(a, np.ndarray) and a.dtype == want and a.flags.c_contiguous, (self.name, pname)
                _check_restrict(self.name, pname, decl, a, pointers)
                pointers[pname] = (decl, a)
                for other, b in targets.items():
                    if np.shares_memory(a, b):
                        aliases[pname] = other
                        break
                else:
                    arrays[pname] = a
                    targets[pname] = a
                    if not decl.startswith("const"):
                        outputs.append(pname)
            else:
                ctype = decl.rsplit(" ", 1)[0].replace("const ", "")
                want = T if ctype == "T" else _C_SCALAR[ctype]
                assert type(a) is want, f"{self.name}: {pname} passed as {type(a).__name__}, the kernel takes {ctype}"
                scalars[pname] = a

        def fn():
            emu = self.emulator()
            got = emu(self.name, grid[0], block[0], {k: np.asarray(v).ravel() for k, v in arrays.items()},
                      {k: float(v) for k, v in scalars.items()}, aliases, outputs=tuple(outputs))
            for pname in outputs:
                np.asarray(arrays[pname]).reshape(-1)[...] = got[pname]
        _Fake.launches.append(self.name)
        _Fake.run(fn)


class _RawModule:
    """The backend's raw module, or the fused narrow-network module (each run by its own emulator)."""

    def __init__(self, code=None, **kw):
        from backprop.kernels import cupy_sources as S
        from backprop.kernels import fused_mlp_sources as F

        from tests import test_fused_mlp

        modules = {(c, "raw"): S.raw_module_source(c) for c in ("float", "double")}
        modules.update({(c, "fused"): F.module_source(c) for c in ("float", "double")})
        modules[("float", "fused_tf32")] = F.module_source("float", tensor_cores=True)
        self.ctype, kind = next(key for key, source in modules.items() if code == source)
        self.sigs = {n: [" ".join(p.split()) for p in ps.split(",")] for n, ps in _src_tests._SIG.findall(code)}
        self.emulator = None
        if kind.startswith("fused"):  # one emulator for both float modules: it holds the TF32 kernels too
            ctype = self.ctype
            self.emulator = lambda: _src_tests.Emu(ctype, test_fused_mlp._exe(ctype), self.sigs)

    def get_function(self, name):
        return _RawKernel(name, self.ctype, self.sigs[name], self.emulator)


def _make_fake_cupy() -> dict:
    cp = _types.ModuleType("cupy")
    cp.ndarray = _FakeArray
    cp.float32, cp.float64 = np.float32, np.float64
    cp.empty = lambda shape, dtype=np.float64: _empty(shape, dtype)
    cp.empty_like = lambda a: _empty(a.shape, a.dtype)

    def _filled(value):
        def make(shape, dtype=np.float64):
            a = _empty(shape, dtype)
            _Fake.run(lambda: np.asarray(a).fill(value))  # a memset: recorded when capturing
            return a
        return make
    cp.zeros, cp.ones = _filled(0), _filled(1)
    cp.array = lambda a, dtype=None, order="C", copy=True: _copied(a, np.array(np.asarray(a), dtype=dtype, order=order))
    cp.ascontiguousarray = lambda a, dtype=None: _copied(a, np.ascontiguousarray(a, dtype=dtype))
    cp.arange = lambda *a, **kw: _fa(np.arange(*a, **kw))
    cp.asarray = lambda a, dtype=None: _copied(a, np.asarray(a, dtype=dtype))
    cp.int64 = np.int64
    # reductions and ufuncs, computed at once (a CPU model: nothing here may run inside a capture)
    for name in ("count_nonzero", "argmin", "floor", "abs"):
        setattr(cp, name, (lambda f: lambda *a, **kw: _fa(f(*a, **kw)))(getattr(np, name)))

    def take(a, indices, axis=None, out=None):
        assert out is not None and isinstance(indices, np.ndarray) and indices.dtype == np.int64
        _Fake.run(lambda: np.take(np.asarray(a), np.asarray(indices), axis=axis, out=np.asarray(out)))
        return out
    cp.take = take
    cp.__version__ = "fake"

    def copyto(dst, src):
        _Fake.run(lambda: np.copyto(np.asarray(dst), np.asarray(src)))
    cp.copyto = copyto

    def isfinite(a):
        _Fake.no_sync("isfinite().all()")
        return np.isfinite(np.asarray(a))
    cp.isfinite = isfinite
    cp.ElementwiseKernel = _EK
    cp.RawModule = _RawModule

    class _Device:
        id = 0
        compute_capability = "90"

        def synchronize(self):
            _Fake.no_sync("synchronize")

    class _Pool:
        released = 0

        def __init__(self):
            self.mallocs = []  # (bytes, whether a stream captured) of each allocation it served

        def malloc(self, size):
            self.mallocs.append((size, _Fake.capturing()))

        def free_bytes(self):  # CuPy's default pool: blocks held but unused
            return 2**20

        def free_all_blocks(self):
            _Pool.released += 1

    default_pool = _Pool()
    cp.get_default_memory_pool = lambda: default_pool

    @__import__("contextlib").contextmanager
    def using_allocator(alloc=None):
        _Fake.allocators.append(alloc)
        try:
            yield
        finally:
            _Fake.allocators.pop()

    import time as _time

    class _Event:
        def record(self, stream=None):  # the fake times the host
            self.t = _time.perf_counter()

        def synchronize(self):
            pass

    default_stream = _Stream(ptr=0)  # CuPy's null stream
    cuda = _types.SimpleNamespace(
        runtime=_types.SimpleNamespace(
            getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 12090, driverGetVersion=lambda: 12090,
            memGetInfo=lambda: (3 * 2**28, 2**30),
            getDeviceProperties=lambda i: {"name": b"CPU stand-in", "totalGlobalMem": 2**30}),
        Event=_Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        Device=_Device, Stream=_Stream, Graph=_Graph, MemoryPool=_Pool, using_allocator=using_allocator,
        get_current_stream=lambda: _Fake.stream_stack[-1] if _Fake.stream_stack else default_stream,
        default_stream=default_stream,
        device=_types.SimpleNamespace(get_cublas_handle=lambda: 0),
    )
    cp.cuda = cuda
    cublas_mod = _types.ModuleType("cupy.cublas")
    cublas_mod.gemm, cublas_mod.gemv = _gemm, _gemv
    cp.cublas = cublas_mod
    libs = _types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = _cublas_lib
    backends = _types.ModuleType("cupy_backends")
    backends_cuda = _types.ModuleType("cupy_backends.cuda")
    backends.cuda, backends_cuda.libs = backends_cuda, libs
    return {"cupy": cp, "cupy.cublas": cublas_mod, "cupy_backends": backends, "cupy_backends.cuda": backends_cuda,
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": _cublas_lib}


BACKEND_PACKAGE = "backprop.kernels.cupy_gpu"


def _backend_module_names() -> list[str]:
    """The backend's package and its modules, as imported now."""
    return [name for name in sys.modules if name == BACKEND_PACKAGE or name.startswith(BACKEND_PACKAGE + ".")]


def _load_fake(monkeypatch, nvmath: bool):
    """The backend module loaded against the fake CuPy (and fake nvmath-python, or none), registered as
    backend "cupy" for the test."""
    import importlib

    import backprop.kernels as pkg
    from backprop import backend as backend_mod

    if _src_tests.CXX is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    _Fake.reset()
    mods = _make_fake_cupy()
    if nvmath:
        mods.update(_make_fake_nvmath())
    else:
        mods.update({"nvmath": None, "nvmath.bindings": None, "nvmath.bindings.cublas": None,
                     "nvmath.bindings.cublasLt": None})  # ImportError
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in _backend_module_names():  # the package and every module of it, imported afresh
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(pkg, "cupy_gpu", raising=False)
    module = importlib.import_module(BACKEND_PACKAGE)
    assert module.is_available(), module.unavailable_reason()
    module.blas.CUBLAS_WORKSPACE_BYTES = 4096  # the fake reads nothing there: keep the tests light
    monkeypatch.setitem(backend_mod._loaded, "cupy", backend_mod.Backend("cupy", module))
    monkeypatch.delitem(backend_mod._reasons, "cupy", raising=False)
    return module


def _unload_fake():
    from backprop import graph

    graph.clear()
    for name in _backend_module_names():
        sys.modules.pop(name)
    _Fake.reset()


@pytest.fixture
def fake(monkeypatch):
    """The backend against the fake CuPy, its GEMMs through the fake nvmath-python (graphs work)."""
    yield _load_fake(monkeypatch, nvmath=True)
    _unload_fake()


@pytest.fixture
def fake_cupy_blas(monkeypatch):
    """The backend against the fake CuPy without nvmath-python: GEMMs through ``cupy.cublas``, no graphs."""
    yield _load_fake(monkeypatch, nvmath=False)
    _unload_fake()


@pytest.fixture(params=["nvmath", "cupy.cublas"])
def fake_any(request, monkeypatch):
    """Both GEMM paths in turn."""
    yield _load_fake(monkeypatch, nvmath=request.param == "nvmath")
    _unload_fake()


def test_fake_primitives_match_reference(fake_any, rng):
    """Every primitive through its real launch path (GEMM modelled, kernels emulated) vs the reference."""
    k, dt = fake_any, np.float32
    x, W, b = rng.normal(size=(9, 6)), rng.normal(size=(5, 6)) / 2, rng.normal(size=5)
    for act in HIDDEN + ["softmax"]:
        a = _alpha(act)
        y, u = k.layer_forward(k.to_device(x, dt), k.to_device(W, dt), k.to_device(b, dt), act, a, True)
        y_ref, u_ref = ref.layer_forward(x, W, b, act, a, True)
        np.testing.assert_allclose(host(k, u), u_ref, **tol(dt))
        np.testing.assert_allclose(host(k, y), y_ref, **tol(dt))
        y2, none = k.layer_forward(k.to_device(x, dt), k.to_device(W, dt), k.to_device(b, dt), act, a, False)
        assert none is None
        np.testing.assert_allclose(host(k, y2), y_ref, **tol(dt))
    delta = rng.normal(size=(9, 5))
    for act in HIDDEN:
        a = _alpha(act)
        u_prev = rng.normal(size=(9, 6))
        y_prev = ref.activate(u_prev, act, a)
        got = k.delta_backward(k.to_device(delta, dt), k.to_device(W, dt), k.to_device(y_prev, dt),
                               k.to_device(u_prev, dt), act, a)
        np.testing.assert_allclose(host(k, got), ref.delta_backward(delta, W, y_prev, u_prev, act, a), **tol(dt))
    dW, db = k.weight_gradients(k.to_device(delta, dt), k.to_device(x, dt))
    rW, rb = ref.weight_gradients(delta, x)
    np.testing.assert_allclose(host(k, dW), rW, **tol(dt))
    np.testing.assert_allclose(host(k, db), rb, **tol(dt))
    Wd = k.to_device(W, dt)
    k.sgd_update(Wd, k.to_device(rW, dt), 0.05, 0.1)
    W1 = W.copy()
    ref.sgd_update(W1, rW, 0.05, 0.1)
    np.testing.assert_allclose(host(k, Wd), W1, **tol(dt))
    for output, loss in PAIRS:
        a = _alpha(output)
        u = rng.normal(size=(9, 5)) * 2
        y = ref.activate(u, output, a)
        t = _targets(rng, loss, 9, 5)
        param = 0.5 if loss == "huber" else LOSSES[loss].default_param
        value, d = k.output_error(k.to_device(y, dt), k.to_device(u, dt), k.to_device(t, dt), output, loss, param, a)
        rv, rd = ref.output_error(y, u, t, output, loss, param, a)
        np.testing.assert_allclose(float(host(k, value)), float(rv), **tol(dt))
        np.testing.assert_allclose(host(k, d), rd, **tol(dt))
    p, g, v = (rng.normal(size=(4, 3)) for _ in range(3))
    pd, vd = k.to_device(p, dt), k.to_device(v, dt)
    k.momentum_update(pd, k.to_device(g, dt), vd, 0.1, 0.9, True, 0.01)
    ref.momentum_update(p, g, v, 0.1, 0.9, True, 0.01)
    np.testing.assert_allclose(host(k, pd), p, **tol(dt))
    m, s = rng.normal(size=(4, 3)), rng.uniform(size=(4, 3))
    qd, md, sd = k.to_device(p, dt), k.to_device(m, dt), k.to_device(s, dt)
    k.adam_update(qd, k.to_device(g, dt), md, sd, 1e-2, 0.9, 0.999, 1e-8, 7, 0.01)
    ref.adam_update(p, g, m, s, 1e-2, 0.9, 0.999, 1e-8, 7, 0.01)
    np.testing.assert_allclose(host(k, qd), p, **tol(dt))


def test_fake_weighted_output_error(fake, rng):
    """Row weights through the real launch path (kernels emulated): every pair's loss and delta against the
    weighted reference in float32, and in both dtypes weights of ones give the unweighted bits, in the same two
    kernels."""
    k, batch, n = fake, 9, 5
    w = rng.uniform(0.2, 3.0, batch)
    for output, loss in PAIRS:
        a = _alpha(output)
        u = rng.normal(size=(batch, n)) * 2
        y = ref.activate(u, output, a)
        t = _targets(rng, loss, batch, n)
        param = 0.5 if loss == "huber" else LOSSES[loss].default_param
        args = (k.to_device(y, np.float32), k.to_device(u, np.float32), k.to_device(t, np.float32), output, loss,
                param, a)
        value, d = k.output_error(*args, weights=k.to_device(w, np.float32))
        rv, rd = ref.output_error(y, u, t, output, loss, param, a, weights=w)
        np.testing.assert_allclose(float(host(k, value)), float(rv), **tol(np.float32))
        np.testing.assert_allclose(host(k, d), rd, **tol(np.float32))
    for dt in (np.float32, np.float64):
        for output, loss in [("softmax", "cross_entropy"), ("tanh", "huber"), ("sigmoid", "bce")]:
            u = rng.normal(size=(batch, n)) * 2
            args = (k.to_device(ref.activate(u, output), dt), k.to_device(u, dt),
                    k.to_device(_targets(rng, loss, batch, n), dt), output, loss, 0.5)
            _Fake.launches.clear()
            plain = [np.array(host(k, x)) for x in k.output_error(*args)]
            weighted = [np.array(host(k, x)) for x in k.output_error(*args, weights=k.to_device(np.ones(batch), dt))]
            assert _Fake.launches[:2] == _Fake.launches[2:] and len(_Fake.launches) == 4
            for got, want in zip(weighted, plain):
                np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))


def test_fake_output_error_refuses_wrong_weights_before_any_launch(fake, rng):
    k, dt = fake, np.float32
    d = k.to_device(rng.normal(size=(4, 3)), dt)
    _Fake.launches.clear()
    for weights in (k.to_device(np.ones(5), dt), k.to_device(np.ones(4), np.float64), k.to_device(np.ones((4, 1)), dt)):
        for output, loss in [("identity", "mse"), ("softmax", "cross_entropy")]:
            with pytest.raises(ValueError, match="weights"):
                k.output_error(d, d, d, output, loss, weights=weights)
    assert _Fake.launches == []


def test_fake_one_fused_kernel_per_step(fake, rng):
    """What each primitive launches: one elementwise kernel after each GEMM, none for identity."""
    k, dt = fake, np.float32
    x, W, b = (k.to_device(a, dt) for a in (rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=2)))
    _Fake.launches.clear()
    k.layer_forward(x, W, b, "relu", 0.0, False)
    k.layer_forward(x, W, b, "gelu", 0.0, True)
    k.layer_forward(x, W, b, "softmax", 0.0, False)
    assert _Fake.launches == ["bp_fwd_relu", "bp_fwd_keep_gelu", "bp_softmax_forward"]
    _Fake.launches.clear()
    d = k.to_device(rng.normal(size=(4, 2)), dt)
    k.delta_backward(d, W, x, None, "identity", 0.0)
    k.weight_gradients(d, x)
    assert _Fake.launches == []  # GEMM and GEMV only
    k.output_error(d, d, d, "identity", "mse")
    assert _Fake.launches == ["bp_loss_identity_mse", "bp_sum_scale"]
    _Fake.launches.clear()
    guard = k.zeros((GUARD_SIZE,), np.float64)
    k.guard_step(guard, k.zeros((), dt), k.zeros((30,), dt))
    assert _Fake.launches == ["bp_guard_scan", "bp_guard_finish"]
    _Fake.launches.clear()
    g, v, m = (k.zeros(W.shape, dt) for _ in range(3))
    k.sgd_update(W, g, 0.1)
    k.sgd_update(W, g, 0.1, guard=guard)
    k.momentum_update(W, g, v, 0.1, 0.9, guard=guard)
    k.adam_update(W, g, m, v, 0.1, 0.9, 0.99, 1e-8, 1, guard=guard)
    k.one_hot(k.to_device([1, 0], np.int64), 3, dt)
    assert _Fake.launches == ["bp_sgd", "bp_sgd_guarded", "bp_momentum_guarded", "bp_adam_guarded", "bp_one_hot"]


def _fake_nets(hidden, head, dtype="float32", sizes=(6, 7, 3), seed=5):
    from backprop import MLP

    return [MLP(list(sizes), activation=hidden, head=head, dtype=dtype, seed=seed, backend="cupy") for _ in range(2)]


def _fake_batch(rng, head, batch=10, n_in=6, n_out=3):
    X = rng.normal(size=(batch, n_in))
    if head == "multiclass":
        return X, rng.integers(0, n_out, batch)
    if head in ("binary", "multilabel"):
        return X, (rng.uniform(size=(batch, n_out)) > 0.5).astype(float)
    return X, rng.normal(size=(batch, n_out))


def _assert_same_params(a, b):
    for (Wa, ba), (Wb, bb) in zip(a.get_params(), b.get_params()):
        np.testing.assert_array_equal(Wb, Wa)
        np.testing.assert_array_equal(bb, ba)


def _count_calls(monkeypatch, k, name):
    calls = []
    real = getattr(k, name)
    monkeypatch.setattr(k, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


FAKE_GRAPH_CASES = [
    ("tanh", "multiclass", dict(lr=0.2)),
    ("relu", "regression", dict(lr=0.05, momentum=0.9)),
    ("gelu", "regression", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("silu", "multilabel", dict(lr=0.1, weight_decay=1e-2)),
    ("elu", "binary", dict(lr=0.1, momentum=0.5)),
]


@pytest.mark.parametrize("hidden,head,opt", FAKE_GRAPH_CASES)
def test_fake_graph_step_equals_plain_step_bit_for_bit(fake, rng, monkeypatch, hidden, head, opt):
    """The first call runs an ordinary step and records; the later ones replay. Losses, parameters and
    step counts equal those of plain steps bit for bit; recording allocated nothing and recorded
    every GEMM on its private stream."""
    from backprop import SGD, graph

    k = fake
    n_out = 1 if head == "binary" else 3
    plain, graphed = _fake_nets(hidden, head, sizes=(6, 7, 5, n_out))
    op, og = SGD(**opt), SGD(**opt)
    replays, captures = _count_calls(monkeypatch, k, "replay"), _count_calls(monkeypatch, k, "capture")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed recording warns: make it fail here
        for _ in range(5):
            X, T = _fake_batch(rng, head, n_out=n_out)
            lp = plain.train_step(X, T, op)
            lg = graphed.train_step(X, T, og, graph=True)
            assert lg == lp
    assert len(captures) == 1 and len(replays) == 4 and graph.recorded(graphed) == 1
    assert og.steps == op.steps == 5
    _assert_same_params(plain, graphed)
    assert _Fake.captured_allocations == 0
    recorded = [c for c in _Fake.blas_calls if c[2]]
    assert len(recorded) == 3 * 3 - 1 + 3  # forward 3, delta 2, dW 3 GEMMs; db 3 GEMVs
    assert len({c[1] for c in recorded}) == 1 and recorded[0][1] != 0  # one private stream


def test_fake_graph_guard_behaves_as_in_a_plain_step(fake, rng):
    """One guard through several graph steps, as fit uses it, with a weight: the same guard (steps, sum
    of the weighted losses, the sticky failure at the step whose input is NaN) and the same parameters
    as plain steps; the steps after the failure change nothing."""
    from backprop import SGD, graph, step
    from backprop.kernels.contract import GUARD_FAILED

    k = fake
    plain, graphed = _fake_nets("tanh", "regression")
    op, og = SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.9)
    gp, gg = step.Guard(k), step.Guard(k)
    wp, wg = step.workspace(plain, 10), step.workspace(graphed, 10)
    for i in range(6):
        X, T = _fake_batch(rng, "regression")
        if i == 3:
            X[4, 2] = np.nan
        x, t = k.to_device(X, np.float32), k.to_device(T, np.float32)
        step.train_step(plain, wp, x, t, op, gp, 10.0)
        graph.graphed_train_step(graphed, wg, x, t, og, gg, 10.0)
        np.testing.assert_array_equal(host(k, gg.array), host(k, gp.array), err_msg=f"step {i + 1}")
        if i == 2:
            before = graphed.get_params()
    assert gg.read().failed_step == 4 and host(k, gg.array)[GUARD_FAILED] == 4
    _assert_same_params(plain, graphed)
    for (W0, b0), (W1, b1) in zip(before, graphed.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)
    assert graph.recorded(graphed) == 1 and og.steps == op.steps == 6


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_fake_graph_non_finite_step_raises_and_changes_nothing(fake, rng):
    """A diverging run: net.train_step(..., graph=True) raises NonFiniteLossError at the same step as
    plain steps, with the parameters bit for bit those of the last finite step and the step uncounted;
    a NaN batch given on the device does the same."""
    from backprop import SGD, NonFiniteLossError, graph

    k = fake
    X = (rng.normal(size=(8, 3)) * 100).astype(np.float32)
    T = (rng.normal(size=(8, 1)) * 100).astype(np.float32)
    plain, graphed = _fake_nets("relu", "regression", sizes=(3, 8, 1), seed=3)
    op, og = SGD(lr=10.0), SGD(lr=10.0)
    failed = {}
    for name, net, opt, g in (("plain", plain, op, False), ("graph", graphed, og, True)):
        for i in range(40):
            before = net.get_params()
            try:
                net.train_step(X, T, opt, graph=g)
            except NonFiniteLossError:
                failed[name] = i
                for (W0, b0), (W1, b1) in zip(before, net.get_params()):
                    np.testing.assert_array_equal(W1, W0)
                    np.testing.assert_array_equal(b1, b0)
                break
    assert "plain" in failed and failed["graph"] == failed["plain"] >= 2  # replayed when it failed
    assert og.steps == op.steps == failed["plain"]
    _assert_same_params(plain, graphed)
    assert graph.recorded(graphed) == 1

    net, _ = _fake_nets("tanh", "regression")
    opt = SGD(lr=0.1)
    Xf, Tf = _fake_batch(rng, "regression")
    x, t = k.to_device(Xf, np.float32), k.to_device(Tf, np.float32)
    net.train_step_device(x, t, opt, graph=True)  # ordinary step, then recorded
    net.train_step_device(x, t, opt, graph=True)  # replayed
    before, steps = net.get_params(), opt.steps
    Xf[2, 1] = np.nan
    with pytest.raises(NonFiniteLossError, match="not applied"):
        net.train_step_device(k.to_device(Xf, np.float32), t, opt, graph=True)
    assert opt.steps == steps
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)
    net.train_step_device(x, t, opt, graph=True)  # a fresh guard per call: the next step goes through
    assert opt.steps == steps + 1


def test_fake_graph_follows_settings_and_parameters(fake, rng, monkeypatch):
    """A new rate, new parameter arrays (set_params), a smaller last batch, Nesterov switched on, an
    optimizer reset: each records a new graph (none replays stale numbers or addresses), at most
    MAX_GRAPHS_PER_NET are kept, least recently used out; every step equals the plain one."""
    from backprop import SGD, graph

    k = fake
    plain, graphed = _fake_nets("relu", "multiclass")
    op, og = SGD(lr=0.1, momentum=0.5), SGD(lr=0.1, momentum=0.5)
    captures = _count_calls(monkeypatch, k, "capture")
    expected_captures = []
    for i in range(12):
        X, T = _fake_batch(rng, "multiclass")
        if i == 2:  # a NumPy scalar rate counts too
            op.lr = og.lr = np.float32(0.03)
        if i == 4:
            params = plain.get_params()
            plain.set_params(params)
            graphed.set_params(params)
        if i == 6:
            X, T = X[:4], T[:4]
        if i == 8:
            op.nesterov = og.nesterov = True
        if i == 10:
            op.reset()
            og.reset()
        assert plain.train_step(X, T, op) == graphed.train_step(X, T, og, graph=True)
        expected_captures.append(i in (0, 2, 4, 6, 8, 10))  # 7: the full batch again, the graph of step 4
        assert len(captures) == sum(expected_captures), f"step {i}"
    _assert_same_params(plain, graphed)
    assert graph.recorded(graphed) == graph.MAX_GRAPHS_PER_NET == 4
    assert og.steps == op.steps == 2  # counted since the reset


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_fake_graph_adam_equals_plain_adam_bit_for_bit(fake, rng, monkeypatch, dtype, weight_decay):
    """Adam through a recorded graph: its bias corrections are device data (bp_adam_corrections in the
    graph), so every replay uses its own step's; losses, parameters and step counts equal plain steps
    bit for bit. A non-finite step in the middle is refused by both alike, leaving the device count
    where it was (the later steps still agree)."""
    from backprop import Adam, NonFiniteLossError, graph

    plain, graphed = _fake_nets("tanh", "regression", dtype=dtype)
    op = Adam(lr=5e-2, beta1=0.8, beta2=0.95, weight_decay=weight_decay)
    og = Adam(lr=5e-2, beta1=0.8, beta2=0.95, weight_decay=weight_decay)
    replays, captures = _count_calls(monkeypatch, fake, "replay"), _count_calls(monkeypatch, fake, "capture")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(6):
            X, T = _fake_batch(rng, "regression")
            if i == 3:
                X[1, 1] = np.nan  # given on the device (host input is checked before any step)
                x, t = fake.to_device(X, dtype), fake.to_device(T, dtype)
                for net, opt, g in ((plain, op, False), (graphed, og, True)):
                    with pytest.raises(NonFiniteLossError):
                        net.train_step_device(x, t, opt, graph=g)
                continue
            assert graphed.train_step(X, T, og, graph=True) == plain.train_step(X, T, op)
    assert len(captures) == 1 and len(replays) == 5 and graph.recorded(graphed) == 1
    assert og.steps == op.steps == 5
    _assert_same_params(plain, graphed)
    count = [a for a in og.state_arrays() if a.shape == (1,)]
    assert len(count) == 1 and host(fake, count[0]).tolist() == [5.0]
    assert "bp_adam_corrections" in _Fake.launches and "bp_adam_device_guarded" in _Fake.launches


def test_fake_adam_corrections_and_device_form(fake, rng):
    """bp_adam_corrections (one thread, for count + 1) against the host numbers, bp_count_step (guarded or
    not), and the update reading the corrections equal to the int form bit for bit."""
    k = fake
    for dt in (np.float32, np.float64):
        count, corr = k.zeros((1,), np.float64), k.zeros((2,), dt)
        p, g, m, v = (k.to_device(a, dt) for a in (rng.normal(size=(3, 4)), rng.normal(size=(3, 4)),
                                                   rng.normal(size=(3, 4)), rng.uniform(size=(3, 4))))
        q, n, w = (k.to_device(host(k, a), dt) for a in (p, m, v))
        ok, bad = (k.to_device(np.array([x, 1.0, 0.0, 0.0]), np.float64) for x in (1.0, 0.0))
        for t in (1, 2, 3):
            k.adam_corrections(count, 1e-2, 0.9, 0.99, corr)
            want = np.array([dt(1e-2 / (1 - 0.9**t)), dt(1 - 0.99**t)], dtype=dt)
            np.testing.assert_array_equal(np.asarray(corr), want)
            k.adam_update(p, g, m, v, 9.0, 0.9, 0.99, 1e-8, corr, 0.01, guard=ok)
            k.adam_update(q, g, n, w, 1e-2, 0.9, 0.99, 1e-8, t, 0.01, guard=ok)
            k.count_step(count, None if t == 1 else ok)
            for a, b in ((p, q), (m, n), (v, w)):
                np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
        k.count_step(count, bad)
        assert np.asarray(count).tolist() == [3.0]


def test_fake_probes_launch_the_raw_twins(fake, rng):
    """probe=True launches each update's raw _probe kernel, which writes nothing but the guard: a finite
    update leaves the guard as it was, one that overflows fails the step; the device-corrections form of
    Adam has its own probe."""
    k = fake
    for dt in (np.float32, np.float64):
        big = float(np.finfo(dt).max)
        p, v, m = (k.to_device(rng.uniform(size=(3, 4)), dt) for _ in range(3))
        before = [host(k, a) for a in (p, v, m)]
        corr = k.to_device(np.array([0.1, 0.5]), dt)
        for grad, ok in ((rng.normal(size=(3, 4)), True), (np.full((3, 4), big), False)):
            g = k.to_device(grad, dt)
            for probe in (lambda gd: k.sgd_update(p, g, 10.0, guard=gd, probe=True),
                          lambda gd: k.momentum_update(p, g, v, 10.0, 0.9, True, guard=gd, probe=True),
                          lambda gd: k.adam_update(p, g, m, v, 0.1, 0.9, 0.99, 1e-8, 2, guard=gd, probe=True),
                          lambda gd: k.adam_update(p, g, m, v, 0.1, 0.9, 0.99, 1e-8, corr, guard=gd, probe=True)):
                guard = k.to_device(np.array([1.0, 4.0, 0.0, 2.5]), np.float64)
                _Fake.launches.clear()
                probe(guard)
                assert len(_Fake.launches) == 1 and _Fake.launches[0].endswith("_probe")
                assert host(k, guard).tolist() == ([1.0, 4.0, 0.0, 2.5] if ok else [0.0, 4.0, 4.0, 2.5])
                for a, b in zip((p, v, m), before):
                    np.testing.assert_array_equal(host(k, a), b)


def test_fake_graph_without_nvmath_refuses_clearly(fake_cupy_blas, rng):
    """Without nvmath-python (CuPy's cuBLAS wrappers refuse to run during a capture): graph=True raises
    ValueError saying what to install, before anything runs; capture itself says the same."""
    from backprop import SGD

    k = fake_cupy_blas
    assert "nvmath-python" in k.capture_unavailable_reason()
    net, _ = _fake_nets("tanh", "regression")
    opt = SGD(lr=0.1)
    before = net.get_params()
    X, T = _fake_batch(rng, "regression")
    with pytest.raises(ValueError, match="pip install nvmath-python"):
        net.train_step(X, T, opt, graph=True)
    assert opt.steps == 0
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)
    with pytest.raises(RuntimeError, match="nvmath-python"):
        k.capture(lambda: None)
    net.train_step(X, T, opt)  # plain steps go through cupy.cublas
    assert opt.steps == 1 and not _Fake.blas_calls


def test_fake_nvmath_that_cannot_start_cublas_falls_back(fake, rng, monkeypatch):
    """nvmath-python imports but its cuBLAS cannot make a handle: GEMMs go through cupy.cublas, graphs
    are refused with the reason."""
    import nvmath.bindings.cublas as lib

    def create():
        raise OSError("libcublas.so.12: cannot open shared object file")
    monkeypatch.setattr(lib, "create", create)
    k = fake
    x, W = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    out = k.zeros((4, 2), np.float32)
    k._gemm("N", "T", k.to_device(x, np.float32), k.to_device(W, np.float32), out)
    np.testing.assert_allclose(host(k, out), x @ W.T, rtol=1e-5, atol=1e-6)
    assert not _Fake.blas_calls
    assert "libcublas.so.12" in k.capture_unavailable_reason()


def test_fake_graphs_go_with_their_network(fake, rng):
    """The graphs are kept per network in a weak mapping: nothing they hold keeps the network alive."""
    import gc
    import weakref

    from backprop import SGD, graph

    net, _ = _fake_nets("tanh", "regression")
    opt = SGD(lr=0.1, momentum=0.9)
    for _ in range(2):
        net.train_step(*_fake_batch(rng, "regression"), opt, graph=True)
    assert graph.recorded(net) == 1
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None and len(graph._graphs) == 0


def test_fake_graph_recording_failure_warns_once_and_trains(fake, rng, monkeypatch):
    from backprop import SGD, graph

    k = fake

    def broken(fn):
        raise RuntimeError("capture exploded")
    monkeypatch.setattr(k, "capture", broken)
    plain, graphed = _fake_nets("tanh", "multiclass")
    op, og = SGD(lr=0.2), SGD(lr=0.2)
    with pytest.warns(RuntimeWarning, match="capture exploded") as record:
        for _ in range(4):
            X, T = _fake_batch(rng, "multiclass")
            assert plain.train_step(X, T, op) == graphed.train_step(X, T, og, graph=True)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert graph.recorded(graphed) == 0 and og.steps == op.steps == 4
    _assert_same_params(plain, graphed)


def test_fake_graph_does_not_look_at_the_backend_name(fake, rng):
    """The same kernels under another name record and replay alike (graph.py asks the module)."""
    from backprop import SGD, graph
    from backprop.backend import Backend

    plain, graphed = _fake_nets("gelu", "regression")
    graphed.backend = Backend("some-gpu", fake)
    op, og = SGD(lr=0.05, momentum=0.9), SGD(lr=0.05, momentum=0.9)
    for _ in range(3):
        X, T = _fake_batch(rng, "regression")
        assert plain.train_step(X, T, op) == graphed.train_step(X, T, og, graph=True)
    assert graph.recorded(graphed) == 1
    _assert_same_params(plain, graphed)


def test_fake_capture_replay_copy_into(fake, rng):
    """capture records without running (GEMM, GEMV, kernels, copies), on its own stream, and the replay
    reads the buffers' current contents; after a capture (ended cleanly, also on an error) direct calls
    run on the current stream again."""
    k, dt = fake, np.float32
    x, W, b = (k.to_device(a, dt) for a in (rng.normal(size=(5, 4)), rng.normal(size=(3, 4)), rng.normal(size=3)))
    src_x = k.to_device(rng.normal(size=(5, 4)), dt)
    y = k.zeros((5, 3), dt)
    db = k.zeros((3,), dt)
    k.layer_forward(x, W, b, "tanh", y=y)  # the handle, compiled kernels, the ones vector
    k.weight_gradients(y, x, k.zeros((3, 4), dt), db)
    y[...] = 0
    db[...] = 0

    def work():
        k.copy_into(x, src_x)
        k.layer_forward(x, W, b, "tanh", y=y)
        k._bias_gemv(y, db, 1.0, 0.0)
    g = k.capture(work)
    assert not _Fake.capturing() and not host(k, y).any() and not host(k, db).any()  # nothing ran
    k.replay(g)
    want = np.tanh(host(k, src_x) @ host(k, W).T + host(k, b))
    np.testing.assert_allclose(host(k, y), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(k, db), want.sum(axis=0), rtol=1e-5, atol=1e-5)
    np.asarray(src_x)[...] = rng.normal(size=(5, 4))
    k.replay(g)
    np.testing.assert_allclose(host(k, y), np.tanh(host(k, src_x) @ host(k, W).T + host(k, b)), rtol=1e-5, atol=1e-6)
    calls = len(_Fake.blas_calls)
    out = k.zeros((5, 3), dt)
    k._gemm("N", "T", x, W, out)  # direct again: runs at once on the null stream
    assert _Fake.blas_calls[calls:] == [("gemm", 0, False)]
    np.testing.assert_allclose(host(k, out), host(k, x) @ host(k, W).T, rtol=1e-5, atol=1e-6)

    def failing():
        k._gemm("N", "T", x, W, out)
        raise KeyError("inside the capture")
    with pytest.raises(KeyError, match="inside the capture"):
        k.capture(failing)
    assert not _Fake.capturing()
    k._gemm("N", "T", x, W, out)
    assert _Fake.blas_calls[-1] == ("gemm", 0, False)
    with pytest.raises(ValueError, match="one shape and dtype"):
        k.copy_into(out, x)
    with pytest.raises(ValueError, match="one shape and dtype"):
        k.copy_into(out, k.zeros((5, 3), np.float64))


def _recording_pools(monkeypatch, k) -> list:
    """Every memory pool made from now on (``capture`` makes one per recording, failed ones included)."""
    pools = []
    cuda = k.device._cupy.cuda
    make = cuda.MemoryPool
    monkeypatch.setattr(cuda, "MemoryPool", lambda: pools.append(make()) or pools[-1])
    return pools


def _weighted_graph_steps(k, net, opt, batches, weights):
    """Steps with row ``weights`` as a recorded graph: an ordinary step on the first batch, the step recorded on
    the workspace's staging buffers (not counted, as graphed_train_step does), then a replay per later batch."""
    from backprop import step

    x0, t0 = batches[0]
    ws, guard = step.workspace(net, x0.shape[0]), step.Guard(k)
    step.train_step(net, ws, x0, t0, opt, guard, weights=weights)
    steps = opt.steps
    g = k.capture(lambda: step.train_step(net, ws, ws.x, ws.t, opt, guard, weights=weights))
    opt.steps = steps
    for x, t in batches[1:]:
        k.copy_into(ws.x, x)
        k.copy_into(ws.t, t)
        opt.begin_step()
        k.replay(g)
    return guard


@pytest.mark.parametrize("epilogues", [False, True], ids=["kernels", "epilogues"])
@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fake_recorded_step_allocates_nothing(fake, rng, monkeypatch, optimizer, dtype, fused, epilogues):
    """Between begin_capture and end_capture a recorded training step asks for no device memory (none from
    the graph's pool, none cached for the process): net.train_step(graph=True), and a step with row weights
    recorded after an ordinary one; both then replay the ordinary steps' parameters bit for bit."""
    from backprop import SGD, Adam, step

    k = fake
    make_opt = (lambda: SGD(lr=0.1, momentum=0.9)) if optimizer == "sgd" else (lambda: Adam(1e-2))
    plain, graphed = _fake_nets("relu", "multiclass", dtype=dtype, sizes=(6, 16, 8, 3))
    op, og = make_opt(), make_opt()
    pools = _recording_pools(monkeypatch, k)
    batches = [_fake_batch(rng, "multiclass") for _ in range(3)]
    k.set_fused_mlp(fused)
    k.set_epilogues(epilogues)
    try:
        assert step.fused(graphed) == fused
        for X, T in batches:
            assert graphed.train_step(X, T, og, graph=True) == plain.train_step(X, T, op)
        device = [(graphed._inputs(X), graphed._targets(T, len(X))) for X, T in batches]
        w = k.to_device(rng.uniform(0.5, 2.0, len(batches[0][0])), dtype)
        guard = _weighted_graph_steps(k, graphed, og, device, w)
        ws, guard_plain = step.workspace(plain, len(batches[0][0])), step.Guard(k)
        for x, t in device:
            step.train_step(plain, ws, x, t, op, guard_plain, weights=w)
    finally:
        k.set_fused_mlp(False)
        k.set_epilogues(False)
    assert any(capturing for _, _, capturing in _Fake.lt_calls) == (epilogues and not fused)  # recorded there
    assert len(pools) == 2 and _Fake.captured_allocations == 0
    assert [p.mallocs for p in pools] == [[], []]
    assert guard.read().loss_sum == guard_plain.read().loss_sum and og.steps == op.steps == 6
    _assert_same_params(plain, graphed)


def test_fake_capture_refuses_a_cached_buffer_first_made_while_recording(fake, rng, monkeypatch):
    """Work recorded before it ever ran would make its cached buffers while recording: from the graph's
    memory pool (freed with the graph while the cache keeps the address), a zeros or ones fill recorded
    instead of run. capture refuses each (the scratch of unweighted rows after only weighted steps, a new
    workspace's buffers, the ones vector of a new batch size, a fused layout), allocating and caching
    nothing; recorded after it ran once, the same work allocates nothing."""
    from backprop import SGD, step

    k, dt = fake, np.float32
    pools = _recording_pools(monkeypatch, k)
    net = _fake_nets("tanh", "regression")[0]
    opt = SGD(lr=0.1)
    x, t = (k.to_device(a, dt) for a in _fake_batch(rng, "regression"))
    ws, guard = step.workspace(net, 10), step.Guard(k)
    step.train_step(net, ws, x, t, opt, guard, weights=k.to_device(np.ones(10), dt))
    fresh = step.workspace(net, 7)
    d, db = k.to_device(rng.normal(size=(13, 3)), dt), k.zeros((3,), dt)
    cases = [("'no_weights'", lambda: step.train_step(net, ws, x, t, opt, guard)),
             ("zeros", lambda: step.train_step(net, fresh, x[:7], t[:7], opt, guard)),
             ("13 ones", lambda: k._bias_gemv(d, db, 1.0, 0.0)),
             ("layout of a 10-row pass", lambda: k.mlp_forward(x, net.params, net.sizes, ("tanh", "identity"),
                                                               (0.0, 0.0), ws.keep_u, ws.y_flat, ws.u_flat))]
    cached = len(k._scratch_cache), len(k.blas._ones_cache), len(k.fused_mlp._fused_plans)
    for what, work in cases:
        with pytest.raises(k.CaptureAllocationError, match=what):
            k.capture(work)
        assert not _Fake.capturing()
    assert (len(k._scratch_cache), len(k.blas._ones_cache), len(k.fused_mlp._fused_plans)) == cached
    assert _Fake.captured_allocations == 0 and all(p.mallocs == [] for p in pools)
    for _, work in cases:
        work()
        k.capture(work)
    assert _Fake.captured_allocations == 0 and all(p.mallocs == [] for p in pools) and len(pools) == 8


def test_fake_tf32_through_nvmath(fake, rng):
    """With nvmath-python the backend sets TF32 on its own handle as _tf32 says, only when it changes; a
    graph keeps the mode it was recorded with, and a graph step records anew when the mode changes."""
    from backprop import SGD, graph

    k = fake
    u_ref, (xd, Wd, bd), u32 = _tf32_layer(k, rng)
    k.set_tf32(True)
    try:
        _, utf = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
        u_graph = k.zeros(u32.shape, np.float32)
        y_graph = k.zeros(u32.shape, np.float32)
        g = k.capture(lambda: k.layer_forward(xd, Wd, bd, "identity", 0.0, True, y=y_graph, u=u_graph))
    finally:
        k.set_tf32(False)
    k.layer_forward(*(k.to_device(host(k, a), np.float64) for a in (xd, Wd, bd)), "identity")  # float64
    assert _Fake.modes_set == [0, 3, 0]  # set when it changes, on the backend's own handle
    assert _Fake.math_mode == 0  # CuPy's handle never touched
    e32, etf = _rel_fro(host(k, u32), u_ref), _rel_fro(host(k, utf), u_ref)
    assert e32 < 1e-5 and 10 * e32 < etf < k.TF32_RTOL, (e32, etf)
    k.replay(g)  # TF32 off now: the graph keeps its mode
    np.testing.assert_array_equal(host(k, u_graph), host(k, utf))

    plain, graphed = _fake_nets("relu", "regression")
    op, og = SGD(lr=0.05), SGD(lr=0.05)
    for i in range(4):
        X, T = _fake_batch(rng, "regression")
        k.set_tf32(i >= 2)
        try:
            assert plain.train_step(X, T, op) == graphed.train_step(X, T, og, graph=True)
        finally:
            k.set_tf32(False)
    assert graph.recorded(graphed) == 2
    _assert_same_params(plain, graphed)


@pytest.mark.parametrize("exported", [False, True])
def test_fake_tf32_within_documented_tolerance(fake_cupy_blas, rng, monkeypatch, exported):
    """Through cupy.cublas (no nvmath-python). ``exported=False`` is CuPy 14, whose cublas module lacks
    CUBLAS_TF32_TENSOR_OP_MATH: the backend falls back to cuBLAS's value, 3, and TF32 still takes effect."""
    k = fake_cupy_blas
    if exported:
        monkeypatch.setattr(_cublas_lib, "CUBLAS_TF32_TENSOR_OP_MATH", _CUBLAS_TF32, raising=False)
    else:
        assert not hasattr(_cublas_lib, "CUBLAS_TF32_TENSOR_OP_MATH")
    assert k.CUBLAS_TF32_TENSOR_OP_MATH == _CUBLAS_TF32
    u_ref, (xd, Wd, bd), u32 = _tf32_layer(k, rng)
    k.set_tf32(True)
    try:
        _, utf = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
        assert _Fake.math_mode == 0  # the handle's mode is put back after each GEMM
    finally:
        k.set_tf32(False)
    assert _Fake.modes_set == [_CUBLAS_TF32, 0]
    e32, etf = _rel_fro(host(k, u32), u_ref), _rel_fro(host(k, utf), u_ref)
    assert e32 < 1e-5 and 10 * e32 < etf < k.TF32_RTOL, (e32, etf)


def test_fake_buffers_are_written_and_returned(fake_any, rng):
    """The keyword buffers receive the results and are returned; a call given them allocates nothing
    (after the first call has made the output error's cached scratch and the cuBLAS handle)."""
    k, dt = fake_any, np.float32
    k.layer_forward(k.to_device(np.ones((2, 2)), dt), k.to_device(np.ones((2, 2)), dt), k.zeros((2,), dt), "relu")
    x, W, b = rng.normal(size=(9, 6)), rng.normal(size=(5, 6)) / 2, rng.normal(size=5)
    xd, Wd, bd = k.to_device(x, dt), k.to_device(W, dt), k.to_device(b, dt)
    for act in ["tanh", "gelu", "softmax"]:
        y_ref, u_ref = ref.layer_forward(x, W, b, act, 0.0, True)
        y, u = k.zeros((9, 5), dt), k.zeros((9, 5), dt)
        _Fake.allocations = 0
        y1, u1 = k.layer_forward(xd, Wd, bd, act, 0.0, True, y=y, u=u)
        assert y1 is y and u1 is u and _Fake.allocations == 0
        np.testing.assert_allclose(host(k, u), u_ref, **tol(dt))
        np.testing.assert_allclose(host(k, y), y_ref, **tol(dt))
        y2, none = k.layer_forward(xd, Wd, bd, act, 0.0, False, y=y, u=u)  # u is ignored, y in place
        assert y2 is y and none is None and _Fake.allocations == 0
        np.testing.assert_allclose(host(k, y), y_ref, **tol(dt))
        np.testing.assert_allclose(host(k, u), u_ref, **tol(dt))  # untouched
    with pytest.raises(ValueError, match="shape"):
        k.layer_forward(xd, Wd, bd, "tanh", 0.0, False, y=k.zeros((9, 4), dt))
    delta, u_prev = rng.normal(size=(9, 5)), rng.normal(size=(9, 6))
    y_prev = ref.activate(u_prev, "silu")
    out = k.zeros((9, 6), dt)
    _Fake.allocations = 0
    got = k.delta_backward(k.to_device(delta, dt), Wd, k.to_device(y_prev, dt), k.to_device(u_prev, dt), "silu",
                           out=out)
    assert got is out and _Fake.allocations == 0
    np.testing.assert_allclose(host(k, out), ref.delta_backward(delta, W, y_prev, u_prev, "silu"), **tol(dt))
    for output, loss in [("softmax", "cross_entropy"), ("identity", "huber"), ("sigmoid", "bce")]:
        u = rng.normal(size=(9, 5)) * 2
        y = ref.activate(u, output)
        t = _targets(rng, loss, 9, 5)
        yd, ud, td = k.to_device(y, dt), k.to_device(u, dt), k.to_device(t, dt)
        delta_d, value_d = k.zeros((9, 5), dt), k.zeros((), dt)
        rv, rd = ref.output_error(y, u, t, output, loss, 0.5)
        for _ in range(2):
            _Fake.allocations = 0
            v1, d1 = k.output_error(yd, ud, td, output, loss, 0.5, delta=delta_d, value=value_d)
            assert v1 is value_d and d1 is delta_d and v1.shape == () and v1.dtype == dt
            np.testing.assert_allclose(float(host(k, value_d)), float(rv), **tol(dt))
            np.testing.assert_allclose(host(k, delta_d), rd, **tol(dt))
        assert _Fake.allocations == 0  # the scratch of the second call came from the cache
    assert all(key[2] != () for key in k._scratch_cache)  # rowloss / partial sums, never a result


def _guard_reference(steps, weight=0.5):
    """The guard after each (loss, grads) of ``steps`` by the reference."""
    guard, out = np.zeros(GUARD_SIZE), []
    for loss, grads in steps:
        ref.guard_step(guard, np.asarray(loss), np.asarray(grads), weight)
        out.append(guard.copy())
    return out


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_fake_guard_step(fake, rng, dt):
    """An ok step, a step with one NaN gradient (its number is kept), then an ok step that the sticky
    failure still refuses; a non-finite loss alone; several blocks of gradients."""
    k = fake
    n = 3 * 256 + 5  # four blocks of the scan
    g = rng.normal(size=n)
    bad = g.copy()
    bad[n - 2] = np.nan
    inf = g.copy()
    inf[7] = -np.inf
    cases = {
        "nan_gradient": [(1.5, g), (2.0, bad), (0.25, g)],
        "inf_gradient": [(1.0, inf)],
        "nan_loss": [(1.0, g), (np.nan, g), (1.0, g)],
        "inf_loss": [(np.inf, g)],
        "all_ok": [(1.0, g), (3.0, g)],
    }
    made = []
    for name, steps in cases.items():
        want = _guard_reference([(dt(lv), gr.astype(dt)) for lv, gr in steps])
        guard = k.zeros((GUARD_SIZE,), np.float64)
        for i, (lv, gr) in enumerate(steps):
            loss, grads = k.to_device(lv, dt), k.to_device(gr, dt)
            _Fake.allocations = 0
            k.guard_step(guard, loss, grads, 0.5)
            made.append(_Fake.allocations)
            np.testing.assert_array_equal(host(k, guard), want[i], err_msg=f"{name}, step {i + 1}")
    assert made[0] == 1 and not any(made[1:])  # the per-block counts: made once, then reused
    with pytest.raises(TypeError):
        k.guard_step(k.zeros((GUARD_SIZE,), np.float64), k.zeros((), np.float64), k.zeros((3,), np.float32))
    with pytest.raises(ValueError, match="guard"):
        k.guard_step(k.zeros((3,), np.float64), k.zeros((), dt), k.zeros((3,), dt))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_fake_guarded_updates(fake, rng, dt):
    """Given a guard, the updates apply exactly when guard[0] == 1 (then as without a guard) and
    otherwise leave the parameters and the optimizer state bit for bit as they were."""
    k = fake
    shape = (7, 5)
    p, g, v, m = (rng.normal(size=shape).astype(dt) for _ in range(4))
    s = rng.uniform(size=shape).astype(dt)

    def run(guard):
        ps = [k.to_device(p, dt) for _ in range(3)]
        st = [k.to_device(a, dt) for a in (v, m, s)]
        gd = k.to_device(g, dt)
        k.sgd_update(ps[0], gd, 0.1, 0.01, guard=guard)
        k.momentum_update(ps[1], gd, st[0], 0.1, 0.9, True, 0.01, guard=guard)
        k.adam_update(ps[2], gd, st[1], st[2], 1e-2, 0.9, 0.999, 1e-8, 3, 0.01, guard=guard)
        return [host(k, a) for a in ps + st]

    unguarded = run(None)
    pr, vr, mr, sr = (a.astype(np.float64) for a in (p, v, m, s))
    want = [pr.copy(), pr.copy(), pr.copy()]
    ref.sgd_update(want[0], g.astype(np.float64), 0.1, 0.01)
    ref.momentum_update(want[1], g.astype(np.float64), vr, 0.1, 0.9, True, 0.01)
    ref.adam_update(want[2], g.astype(np.float64), mr, sr, 1e-2, 0.9, 0.999, 1e-8, 3, 0.01)
    for got, w in zip(unguarded, want + [vr, mr, sr]):
        np.testing.assert_allclose(got, w, **tol(dt))
    for ok in (1.0, 0.0, np.nan, 2.0, -1.0):
        guard = k.to_device([ok, 1.0, 0.0, 0.0], np.float64)
        got = run(guard)
        before = [p, p, p, v, m, s]
        for i, (a, b, u) in enumerate(zip(got, before, unguarded)):
            if ok == 1.0:
                np.testing.assert_array_equal(a, u)  # the same kernel work as without a guard
            else:
                np.testing.assert_array_equal(a.astype(dt).view(f"u{np.dtype(dt).itemsize}"),
                                              b.view(f"u{np.dtype(dt).itemsize}"), err_msg=f"ok={ok}, array {i}")
        np.testing.assert_array_equal(host(k, guard), [ok, 1.0, 0.0, 0.0])  # read, never written


def _one_launch_case(k, rng, dt, make_opt, steps, fake=True):
    """Run ``steps`` (loss, gradient scale, lr) of two like optimizers on like parameters: one through the
    multi-launch update (guard_step, prepare, probe, apply, finish), one through guarded_step; return the
    host arrays of both after every step (parameters, state, guard, and Adam's count). ``fake``: also check
    that guarded_step was one launch of the fake CuPy."""
    from backprop.kernels.contract import GUARD_SIZE as G
    from backprop.optimizers import Optimizer

    nw, nb = 37, 6
    W0, b0 = rng.normal(size=nw).astype(dt), rng.normal(size=nb).astype(dt)
    sides = []
    for _ in range(2):
        opt = make_opt()
        W, b = k.to_device(W0, dt), k.to_device(b0, dt)
        sides.append((opt, W, b, k.zeros((G,), np.float64), object()))
    out = [[], []]
    for loss, scale, lr in steps:
        gW, gb = (rng.normal(size=n) * scale for n in (nw, nb))
        if not np.isfinite(scale):
            gW[3] = scale
        for side, (opt, W, b, guard, owner) in enumerate(sides):
            opt.lr = lr
            dW, db, lv = k.to_device(gW, dt), k.to_device(gb, dt), k.to_device(np.asarray(loss), dt)
            opt.begin_step()
            if side == 0:
                k.guard_step(guard, lv, k.to_device(np.concatenate([gW, gb]), dt), 0.5)
                opt.prepare(k, guard, dt)
                opt.apply(k, owner, W, b, dW, db, guard, probe=True)
                opt.apply(k, owner, W, b, dW, db, guard)
                opt.finish(k, guard)
            else:
                _Fake.launches.clear()
                assert opt.apply_in_one_launch(k, owner, W, b, dW, db, guard, lv, 0.5, dt)
                assert not fake or _Fake.launches == [f"bp_step_{opt._one_launch(k, owner, W, b, dt)[0]}"]
            # the moments or velocities, and Adam's count (its corrections array is the multi-launch path's own)
            arrays = [W, b, guard, *Optimizer.state_arrays(opt, [owner])]
            if hasattr(opt, "_device"):
                arrays.append(opt._counter(k, dt)[0])
            out[side].append([host(k, a) for a in arrays])
    return out


def _one_launch_optimizer(name):
    from backprop import SGD, Adam

    return {"sgd": lambda: SGD(0.1, weight_decay=0.01),
            "momentum": lambda: SGD(0.1, momentum=0.9, weight_decay=0.01),
            "nesterov": lambda: SGD(0.1, momentum=0.9, nesterov=True),
            "adam": lambda: Adam(1e-2, weight_decay=0.01)}[name]


#: An ok step, one with an infinite gradient (nothing applied; its number kept), then one the sticky failure
#: refuses; a step whose update overflows (lr huge: refused by the probe); a NaN loss.
_ONE_LAUNCH_STEPS = ([(1.5, 1.0, 0.1), (0.5, 1.0, 0.1), (2.0, np.inf, 0.1), (1.0, 1.0, 0.1)],
                     [(1.0, 1.0, 0.1), (1.0, 1e30, 1e30), (1.0, 1.0, 0.1)],
                     [(1.0, 1.0, 0.1), (np.nan, 1.0, 0.1)])


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adam"])
def test_fake_guarded_step_is_the_multi_launch_update_in_one(fake, rng, dt, opt):
    """guarded_step (one launch) against the guard, probes and updates it replaces, step after step (see
    _ONE_LAUNCH_STEPS); weight decay on the weights only: the same bits in the emulator."""
    for steps in _ONE_LAUNCH_STEPS:
        multi, one = _one_launch_case(fake, rng, dt, _one_launch_optimizer(opt), steps)
        for i, (a, b) in enumerate(zip(multi, one)):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(y, x, err_msg=f"{opt}, step {i + 1} of {steps}")


def _one_launch_declines(k, rng, opt, nw, nb) -> bool:
    """``opt.apply_in_one_launch`` on ``nw`` weights and ``nb`` biases in float32 declined, and then launched
    nothing (else it launched exactly one kernel)."""
    W, b, dW, db = (k.to_device(rng.normal(size=n), np.float32) for n in (nw, nb, nw, nb))
    _Fake.launches.clear()
    done = opt.apply_in_one_launch(k, object(), W, b, dW, db, k.zeros((GUARD_SIZE,), np.float64),
                                   k.zeros((), np.float32), 1.0, np.float32)
    assert len(_Fake.launches) == (1 if done else 0)
    return not done


def test_fake_guarded_step_leaves_a_custom_apply_alone(fake, rng):
    """A subclass with an apply of its own keeps it: apply_in_one_launch declines, nothing is launched."""
    from backprop import SGD

    class Clipped(SGD):
        def apply(self, kernels, owner, W, b, dW, db, guard=None, probe=False):
            super().apply(kernels, owner, W, b, dW, db, guard, probe)

    assert _one_launch_declines(fake, rng, Clipped(0.1), 6, 2)
    assert not _one_launch_declines(fake, rng, SGD(0.1), 6, 2)
    W, b = fake.to_device(rng.normal(size=6), np.float32), fake.to_device(rng.normal(size=2), np.float32)
    with pytest.raises(TypeError, match="loss"):
        fake.guarded_step("sgd", fake.zeros((GUARD_SIZE,), np.float64), fake.zeros((), np.float64), 1.0, (W, b),
                          (W, b), (), {"lr": 0.1})


def test_fake_guarded_step_declines_large_networks(fake, rng, monkeypatch):
    from backprop import SGD
    from backprop.kernels import cupy_sources as S

    monkeypatch.setattr(S, "STEP_MAX_PARAMS", 40)
    assert _one_launch_declines(fake, rng, SGD(0.1), 37, 6)


def test_fake_guarded_step_serves_up_to_2_to_the_15_parameters(fake, rng, monkeypatch):
    """The one-launch update's one block walks every parameter three times, so it serves up to 2^15 parameters: a
    fused [127, 127, 128, 1] network (2^15 + 1) takes the grid-wide guard and updates, to the bits the one launch
    gives (taken with the limit raised by one)."""
    from backprop import MLP, SGD
    from backprop.kernels import cupy_sources as S

    assert S.STEP_MAX_PARAMS == 1 << 15
    X, y = _fake_batch(rng, "regression", batch=8, n_in=127, n_out=1)
    nets = [MLP([127, 127, 128, 1], activation="tanh", head="regression", seed=3, backend="cupy") for _ in range(2)]
    n = nets[0].params.size
    assert n == (1 << 15) + 1
    launched = []
    fake.set_fused_mlp(True)
    try:
        for net, raised in zip(nets, (False, True)):
            if raised:
                monkeypatch.setattr(S, "STEP_MAX_PARAMS", n)
            _Fake.launches.clear()
            opt = SGD(0.1, momentum=0.9, weight_decay=0.01)
            for _ in range(2):
                net.train_step(X, y, opt)
            launched.append(list(_Fake.launches))
    finally:
        fake.set_fused_mlp(False)
    assert "bp_step_momentum" not in launched[0] and "bp_guard_scan" in launched[0]
    assert launched[1].count("bp_step_momentum") == 2 and "bp_guard_scan" not in launched[1]
    np.testing.assert_array_equal(host(fake, nets[0].params), host(fake, nets[1].params))


def test_fake_guard_and_updates_record_into_a_graph(fake, rng):
    """The guard step and the guarded updates are device work only: they record into a capture (no host
    read, no synchronization) and a replay does what a direct call does."""
    import cupy

    k, dt = fake, np.float32
    guard = k.zeros((GUARD_SIZE,), np.float64)
    loss, grads = k.to_device(2.0, dt), k.to_device(rng.normal(size=40), dt)
    p = k.to_device(rng.normal(size=40), dt)
    k.guard_step(guard, loss, grads)  # warms the scratch cache
    start = host(k, p)
    stream = cupy.cuda.Stream()
    with stream:
        stream.begin_capture()
        k.guard_step(guard, loss, grads, 1.0)
        k.sgd_update(p, grads, 0.5, guard=guard)
        graph = stream.end_capture()
    np.testing.assert_array_equal(host(k, guard), [1, 1, 0, 2])  # recorded, not run
    graph.launch()
    np.testing.assert_array_equal(host(k, guard), [1, 2, 0, 4])
    np.testing.assert_allclose(host(k, p), start - 0.5 * host(k, grads), rtol=1e-6)
    np.asarray(grads)[3] = np.inf
    before = host(k, p)
    graph.launch()
    np.testing.assert_array_equal(host(k, guard), [0, 3, 3, 4])
    np.testing.assert_array_equal(host(k, p), before)


def test_fake_array_stats(fake, rng):
    k = fake
    a = rng.normal(size=(6, 7))
    a[2, 3], a[4, 0] = np.nan, np.inf
    probs = ref.activate(rng.normal(size=(5, 4)), "softmax")
    cases = [a, rng.normal(size=(6, 7)), np.round(rng.normal(size=30) * 5), probs, np.eye(4)[[1, 3, 0]],
             np.zeros((0, 3)), np.array([2.5])]
    for host_a in cases:
        for dt in (np.float32, np.float64):
            want = ref.array_stats(host_a.astype(dt))
            _Fake.launches.clear()
            got = k.array_stats(k.to_device(host_a, dt))
            assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    labels = rng.integers(0, 5, size=17)
    np.testing.assert_array_equal(k.array_stats(k.to_device(labels, np.int64)), ref.array_stats(labels))
    st = k.array_stats(k.to_device(a, np.float32))
    assert st[STAT_NONFINITE] == 2 and st[STAT_FIRST_NONFINITE] == 2 * 7 + 3


def test_fake_array_stats_reads_back_once(fake, rng, monkeypatch):
    k = fake
    reads = []
    real = _FakeArray.get
    monkeypatch.setattr(_FakeArray, "get", lambda self: reads.append(self.shape) or real(self))
    a = rng.normal(size=(5, 3))
    a[1, 1] = np.nan
    k.array_stats(k.to_device(a, np.float32))
    assert reads == [(6,)]


def test_fake_public_methods_on_device_arrays_read_back_no_array(fake, rng, monkeypatch):
    """forward, loss, loss_and_grads, train_step and fit on CuPy arrays read back only scalars and the few
    numbers of a check (the guard, array_stats): never the data (the no-copy promise)."""
    from backprop import MLP, SGD

    k = fake
    sizes = []
    real = _FakeArray.get
    monkeypatch.setattr(_FakeArray, "get", lambda self: sizes.append(int(self.size)) or real(self))
    net = MLP([6, 5, 3], activation="relu", head="multiclass", backend="cupy")
    X = k.to_device(rng.normal(size=(20, 6)), np.float32)
    labels = k.to_device(rng.integers(0, 3, 20), np.int64)
    T = k.to_device(np.eye(3)[rng.integers(0, 3, 20)], np.float32)
    y = net.forward(X)
    assert k.owns(y)
    net.loss(X, labels)
    net.loss_and_grads(X, T)
    net.train_step(X, T, SGD(0.1))
    net.train_step(X, T, SGD(0.1, momentum=0.9), graph=True)
    net.fit(X, labels, epochs=2, batch_size=8, optimizer=SGD(0.1, momentum=0.9), validation_data=(X, labels))
    assert sizes and max(sizes) <= 8, f"read back arrays of {sorted(set(sizes))} elements"


def test_fake_one_hot_and_gather_rows(fake, rng):
    k = fake
    labels = rng.integers(0, 4, size=11)
    for dt in (np.float32, np.float64):
        want = ref.one_hot(labels, 4, dt)
        got = k.one_hot(k.to_device(labels, np.int64), 4, dt)
        assert got.dtype == dt and got.shape == (11, 4)
        np.testing.assert_array_equal(host(k, got), want)
        out = k.zeros((11, 4), dt)
        assert k.one_hot(k.to_device(labels, dt), 4, dt, out=out) is out  # whole-number float labels
        np.testing.assert_array_equal(host(k, out), want)
    src = rng.normal(size=(9, 3))
    idx = rng.integers(0, 9, size=6)
    out = k.zeros((6, 3), np.float32)
    got = k.gather_rows(k.to_device(src, np.float32), k.to_device(idx, np.int64), out)
    assert got is out
    np.testing.assert_array_equal(host(k, out), src.astype(np.float32)[idx])


def test_fake_add_sum_of_squares(fake, rng):
    k = fake
    for n, dt in ((1000, np.float32), (3, np.float64), (0, np.float32)):
        a = rng.normal(size=n)
        total, want = k.to_device([0.5], np.float64), np.array([0.5])
        for _ in range(2):
            k.add_sum_of_squares(total, k.to_device(a, dt).reshape(-1, 1) if n else k.to_device(a, dt))
            ref.add_sum_of_squares(want, a.astype(dt).astype(np.float64))
        np.testing.assert_allclose(host(k, total), want, rtol=1e-6)
    with pytest.raises(ValueError, match="total"):
        k.add_sum_of_squares(k.to_device([0.0], np.float32), k.to_device(a, np.float32))


def test_fake_owns_as_array_and_memory(fake, rng):
    k = fake
    a = k.to_device(rng.normal(size=(4, 3)), np.float32)
    assert k.owns(a) and not k.owns(np.asarray(a)) and not k.owns([1.0])
    assert k.as_array(a, np.float32) is a
    b = k.as_array(a, np.float64)
    assert k.owns(b) and b.dtype == np.float64 and b is not a
    np.testing.assert_array_equal(host(k, b), host(k, a))
    c = k.as_array(a.T, np.float32)
    assert c.flags.c_contiguous and k.owns(c)
    np.testing.assert_array_equal(host(k, c), host(k, a).T)
    free = k.device_memory_free()
    assert isinstance(free, int) and free == 3 * 2**28 + 2**20  # the driver's free memory and the pool's
    import cupy

    before = cupy.get_default_memory_pool().released
    k.release_memory()
    assert cupy.get_default_memory_pool().released == before + 1
    info = k.device_info()
    assert info["name"] == "CPU stand-in" and info["memory_bytes"] == 2**30 and info["compute_capability"] == "90"


def test_fake_benchmark_script_runs(fake, tmp_path, monkeypatch):
    """benchmarks/gpu_vs_torch.py (backprop.bench.user_paths) on the CPU stand-in for CuPy, tiny nets, no
    PyTorch: every device section runs (the graph one may say why not) and writes its JSON and Markdown."""
    import json

    from backprop.bench import user_paths as up
    from tests.fake_gpu_bench import use_tiny_cases

    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    use_tiny_cases(monkeypatch.setattr)
    rc = up.main(["--quick", "--backend", "cupy", "--sections", "fit,api,step,graph,tf32,fused,epilogues", "--out",
                  str(tmp_path),
                  "--repeats", "1", "--fit-repeats", "1", "--min-sample-time", "0", "--gemm-size", "16"])
    doc = json.loads((tmp_path / "gpu_vs_torch.json").read_text())
    by_name = {s["name"]: s for s in doc["sections"]}
    assert [by_name[n]["status"] for n in ("fit", "api", "step", "tf32", "fused", "epilogues")] == ["ok"] * 6, \
        {n: s.get("error") or s.get("reason") for n, s in by_name.items()}
    assert by_name["graph"]["status"] in ("ok", "skipped"), by_name["graph"].get("error")
    assert rc == 0
    step = by_name["step"]
    assert [r[0] for r in step["tables"][0]["rows"]] == ["tiny", "gemm_bound"]
    assert set(step["cases"]["tiny"]["timings"]) == {"backprop"}  # no PyTorch columns
    assert step["cases"]["gemm_bound"]["fraction_of_gemm"] > 0
    assert {"host", "device"} == set(by_name["fit"]["timings"])
    assert len(by_name["api"]["targets"]) == 2 and by_name["tf32"]["settings"]["tf32_before"] is False
    fused_rows = ["sgd", "adam", "infer", "sgd TF32", "adam TF32", "infer TF32",  # the fake GPU is an sm_90
                  "sgd (tiled forward)", "adam (tiled forward)", "infer (tiled forward)"]  # the other forward kernel
    assert [r[0] for r in by_name["fused"]["tables"][0]["rows"]] == fused_rows
    assert {"bp_mlp_forward_w32", "bp_mlp_forward_tiled_w32"} <= set(_Fake.launches)
    achieved = by_name["fused"]["achieved"]  # TFLOP/s and GB/s against the SGEMM rate and copy bandwidth measured
    assert achieved["sgemm_tflops"] > 0 and achieved["copy_gb_per_s"] > 0 and achieved["tf32_gemm_tflops"] > 0
    assert achieved["sgd_fused"]["bytes"] == achieved["adam_fused"]["bytes"] > achieved["infer_fused"]["bytes"] > 0
    assert achieved["sgd_fused_tf32"]["bytes"] == achieved["sgd_fused"]["bytes"]
    assert [r[0] for r in by_name["fused"]["tables"][1]["rows"]] == fused_rows
    assert not fake.fused_mlp_enabled() and not fake.tf32_enabled()  # the section puts the switches back
    assert fake.fused_mlp._forward_variant == "column"
    epilogues = by_name["epilogues"]
    assert [r[0] for r in epilogues["tables"][0]["rows"]] == ["narrow", "gemm_bound"] and not fake.epilogues_enabled()
    assert "cuBLASLt RELU_AUX_BIAS" in epilogues["cases"][0]["paths"]  # the step took the epilogues
    assert [t["what"] for t in epilogues["targets"]] == ["gemm_bound: rate with epilogues / measured cuBLAS rate"]
    assert any(g["backend"] == "cupy" for g in doc["machine"]["gpus"])
    md = (tmp_path / "step_vs_torch.md").read_text()
    assert "| tiny | [6, 7, 3] | 8 |" in md and "PyTorch not measured" in md
    assert (tmp_path / "graph_step.json").exists() and (tmp_path / "tf32.md").exists()


def test_benchmark_script_help_without_a_gpu():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_vs_torch.py"
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--no-torch" in proc.stdout


def test_fake_fit_trains(fake_any, rng):
    """A few epochs of fit() on the backend (forward, loss, backward, momentum) lower the loss."""
    from backprop import MLP, SGD

    X = rng.normal(size=(24, 4))
    T = (X[:, :1] > 0).astype(int).ravel()
    net = MLP([4, 8, 2], activation="tanh", head="multiclass", seed=0, backend="cupy")
    before = net.loss(X, T)
    for _ in range(15):
        net.train_step(X, T, SGD(lr=0.5), graph=False)
    assert net.loss(X, T) < before


def test_fake_fused_narrow_networks_are_opt_in(fake, rng):
    """Off by default; switched on, a narrow network's passes are the fused launches, and a network the fused
    kernels do not serve (a layer wider than 128) keeps the layer-by-layer kernels."""
    from backprop import MLP, SGD

    assert not fake.fused_mlp_enabled()
    X, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    narrow = MLP([5, 16, 3], activation="tanh", head="multiclass", seed=1, backend="cupy")
    wide = MLP([5, 130, 3], activation="tanh", head="multiclass", seed=1, backend="cupy")
    _Fake.launches.clear()
    narrow.train_step(X, y, SGD(0.1))
    assert not any(name.startswith("bp_mlp") for name in _Fake.launches)
    fake.set_fused_mlp(True)
    try:
        _Fake.launches.clear()
        narrow.train_step(X, y, SGD(0.1))
        assert [n for n in _Fake.launches if n.startswith("bp_mlp")] == [
            "bp_mlp_forward_w32", "bp_mlp_mean", "bp_mlp_backward_w32", "bp_mlp_reduce"]
        assert _Fake.launches[-1] == "bp_step_sgd" and "bp_guard_scan" not in _Fake.launches  # the update: one launch
        assert "bp_fwd_tanh" not in _Fake.launches and "bp_softmax_xent" not in _Fake.launches  # the error fused
        _Fake.launches.clear()
        wide.train_step(X, y, SGD(0.1))
        assert not any(name.startswith("bp_mlp") for name in _Fake.launches)
    finally:
        fake.set_fused_mlp(False)


def test_fake_fused_backward_of_no_rows_zeroes_the_gradients(fake):
    """No rows: zero gradients, by one bp_mlp_reduce over no slices, given a stand-in for the slices (not the
    gradients themselves: its pointers are __restrict__, and the fake refuses overlapping ones)."""
    from backprop.kernels import fused_mlp_sources as F

    k, dt = fake, np.float32
    sizes, acts, keep_u = (4, 8, 2), ("tanh", "identity"), (False, True)
    _, _, _, ny, nu = F.plan(sizes, acts, 0, keep_u)
    grads = k.to_device(np.full(4 * 8 + 8 + 8 * 2 + 2, np.nan), dt)
    _Fake.launches.clear()
    k.mlp_backward(k.zeros((0, 4), dt), k.to_device(np.ones(grads.size), dt), sizes, acts, (0.0, 0.0), keep_u,
                   k.zeros((ny,), dt), k.zeros((max(nu, 1),), dt), k.zeros((0, 2), dt), grads)
    assert _Fake.launches == ["bp_mlp_reduce"]
    np.testing.assert_array_equal(host(k, grads), np.zeros(grads.size))


@pytest.mark.parametrize("head", ["multiclass", "regression"])
def test_fake_fused_weighted_loss_and_gradients(fake, rng, head):
    """loss_and_grads_device with row weights: the fused launches (the error at the end of the forward pass)
    give the loss and gradients of the layer-by-layer kernels."""
    from backprop import MLP

    X, y = _fake_batch(rng, head, batch=40, n_in=6, n_out=3)
    net = MLP([6, 24, 3], activation="silu", head=head, dtype="float64", seed=2, backend="cupy")
    x, t = net._inputs(X), net._targets(y, 40)
    w = fake.to_device(rng.uniform(0.1, 2.0, 40), np.float64)
    results = []
    for on in (False, True):
        fake.set_fused_mlp(on)
        try:
            value, grads = net.loss_and_grads_device(x, t, weights=w)
            results.append((float(host(fake, value)), [host(fake, g) for pair in grads for g in pair]))
        finally:
            fake.set_fused_mlp(False)
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("hidden,head,dtype", [("tanh", "multiclass", "float32"), ("gelu", "regression", "float64"),
                                               ("relu", "binary", "float32")])
def test_fake_fused_fit_equals_layer_by_layer_fit(fake, rng, hidden, head, dtype):
    """fit() through the fused launches reaches the parameters and losses of the layer-by-layer kernels to
    rounding (shuffled minibatches with a short last one, Adam), and forward/predict agree too."""
    from backprop import MLP, Adam

    X, y = _fake_batch(rng, head, batch=37, n_in=6, n_out=3 if head != "binary" else 1)
    nets = [MLP([6, 32, 32, 3 if head != "binary" else 1], activation=hidden, head=head, dtype=dtype, seed=4,
                backend="cupy") for _ in range(2)]
    histories = []
    for net, on in zip(nets, (False, True)):
        fake.set_fused_mlp(on)
        _Fake.launches.clear()
        try:
            histories.append(net.fit(X, y, epochs=2, batch_size=16, optimizer=Adam(1e-2)))
            out = net.predict(X)
        finally:
            fake.set_fused_mlp(False)
        assert ("bp_mlp_backward_w32" in _Fake.launches) is on
        net.out_ = out
    close = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(histories[1].loss, histories[0].loss, **close)
    np.testing.assert_allclose(host(fake, nets[1].params), host(fake, nets[0].params), **close)
    np.testing.assert_allclose(nets[1].out_, nets[0].out_, **close)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fake_fused_tiled_forward_is_the_column_forward(fake, rng, monkeypatch, dtype):
    """With the private switch ``fused_mlp._forward_variant = "tiled"`` the fused passes launch the tiled forward
    kernel; fit() reaches the column kernel's parameters and predictions bit for bit (each output the same sums in
    the same order), its losses to rounding (the block's loss terms added in another order)."""
    from backprop import MLP, Adam

    X, y = _fake_batch(rng, "multiclass", batch=37, n_in=6, n_out=3)
    runs = []
    fake.set_fused_mlp(True)
    try:
        for variant in ("column", "tiled"):
            monkeypatch.setattr(fake.fused_mlp, "_forward_variant", variant)
            net = MLP([6, 40, 32, 3], activation="tanh", head="multiclass", dtype=dtype, seed=4, backend="cupy")
            _Fake.launches.clear()
            history = net.fit(X, y, epochs=2, batch_size=16, optimizer=Adam(1e-2))
            assert ("bp_mlp_forward_tiled_w64" in _Fake.launches) == (variant == "tiled")
            assert ("bp_mlp_forward_w64" in _Fake.launches) == (variant == "column")
            runs.append((history.loss, host(fake, net.params), host(fake, net.forward(X))))
    finally:
        fake.set_fused_mlp(False)
    (loss0, params0, out0), (loss1, params1, out1) = runs
    assert np.array_equal(params1, params0) and np.array_equal(out1, out0)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6 if dtype == "float32" else 1e-14)


def test_fake_fused_tf32_runs_the_tensor_core_kernels(fake, rng, monkeypatch):
    """set_tf32 with set_fused_mlp: a float32 narrow network's passes are the TF32 twins (to TF32's error of the
    layer-by-layer fit), describe() says so; float64, NVIDIA_TF32_OVERRIDE=0 and a GPU before sm_80 keep the
    CUDA-core kernels, with the reason."""
    from backprop import MLP, Adam

    X, y = _fake_batch(rng, "multiclass", batch=37, n_in=6, n_out=3)
    nets = [MLP([6, 32, 32, 3], activation="tanh", head="multiclass", dtype="float32", seed=4, backend="cupy")
            for _ in range(2)]
    plain = nets[0].fit(X, y, epochs=2, batch_size=16, optimizer=Adam(1e-2))
    fake.set_fused_mlp(True)
    fake.set_tf32(True)
    try:
        _Fake.launches.clear()
        history = nets[1].fit(X, y, epochs=2, batch_size=16, optimizer=Adam(1e-2))
        assert {"bp_mlp_forward_tf32_w32", "bp_mlp_backward_tf32_w32"} <= set(_Fake.launches)
        assert "bp_mlp_forward_w32" not in _Fake.launches
        assert nets[1].describe().endswith("one launch per pass, on the TF32 tensor cores")
        np.testing.assert_allclose(history.loss, plain.loss, rtol=2e-2)
        np.testing.assert_allclose(host(fake, nets[1].params), host(fake, nets[0].params), rtol=2e-2, atol=2e-3)
        assert not np.array_equal(host(fake, nets[1].params), host(fake, nets[0].params))  # TF32 is not float

        wide = MLP([6, 32, 3], activation="tanh", head="multiclass", dtype="float64", seed=4, backend="cupy")
        cases = [(wide, {}, "CUDA cores"),
                 (nets[1], {"NVIDIA_TF32_OVERRIDE": "0"}, "CUDA cores (NVIDIA_TF32_OVERRIDE=0)"),
                 (nets[1], {"cc": "75"}, "CUDA cores (TF32 needs sm_80 or newer, this is sm_75)")]
        for net, env, where in cases:
            with monkeypatch.context() as m:
                if "cc" in env:
                    m.setattr(fake._cupy.cuda.Device, "compute_capability", env["cc"])
                else:
                    for k, v in env.items():
                        m.setenv(k, v)
                _Fake.launches.clear()
                net.train_step(X, y, Adam(1e-2))
                assert "bp_mlp_forward_w32" in _Fake.launches and "bp_mlp_forward_tf32_w32" not in _Fake.launches
                assert fake.fused_mlp_path(net.dtype) == where
                assert net.describe().endswith(f"on the {where}")
    finally:
        fake.set_tf32(False)
        fake.set_fused_mlp(False)


@pytest.mark.parametrize("momentum,shuffle", [(0.0, False), (0.9, True)],
                         ids=["plain-in_order", "momentum-shuffled"])  # each value of each option once
def test_fake_fit_with_graphs_equals_fit_without(fake, rng, shuffle, momentum):
    """fit(graph=True) replays the recorded step (its minibatch gathered outside the graph): the same
    parameters and loss history, bit for bit, as ordinary fit, the smaller last batch included."""
    from backprop import MLP, SGD
    from backprop import graph as graphs

    X = rng.normal(size=(29, 5))
    y = rng.integers(0, 3, 29)
    nets = [MLP([5, 7, 3], activation="tanh", head="multiclass", seed=2, backend="cupy") for _ in range(2)]
    histories = [net.fit(X, y, epochs=3, batch_size=8, shuffle=shuffle, optimizer=SGD(0.1, momentum=momentum),
                         graph=g) for net, g in zip(nets, (False, True))]
    assert graphs.recorded(nets[1]) == 2  # the full batches and the last one
    assert histories[0].loss == histories[1].loss
    for (W0, b0), (W1, b1) in zip(nets[0].get_params(), nets[1].get_params()):
        np.testing.assert_array_equal(W0, W1)
        np.testing.assert_array_equal(b0, b1)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_fake_fit_with_graphs_and_adam_equals_fit_without(fake, rng, weight_decay):
    """fit(graph=True) with Adam: the same parameters and loss history, bit for bit, as ordinary fit."""
    from backprop import MLP, Adam
    from backprop import graph as graphs

    X = rng.normal(size=(21, 5))
    y = rng.integers(0, 3, 21)
    nets = [MLP([5, 7, 3], activation="tanh", head="multiclass", seed=2, backend="cupy") for _ in range(2)]
    opts = [Adam(1e-2, weight_decay=weight_decay) for _ in range(2)]
    histories = [net.fit(X, y, epochs=2, batch_size=8, optimizer=opt, graph=g)
                 for net, opt, g in zip(nets, opts, (False, True))]
    assert graphs.recorded(nets[1]) == 2
    assert histories[0].loss == histories[1].loss and opts[0].steps == opts[1].steps == 6
    _assert_same_params(nets[0], nets[1])


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@pytest.fixture
def k():
    try:
        backend = resolve_backend("cupy")
    except ValueError as exc:
        pytest.skip(str(exc))
    return backend.kernels


@pytest.fixture
def rng(request) -> np.random.Generator:
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adam"])
def test_gpu_guarded_step_is_the_multi_launch_update_in_one(k, rng, dt, opt):
    """On the GPU: guarded_step against the guard, probes and updates it replaces (see _ONE_LAUNCH_STEPS). The
    guard, Adam's count and every refused step are exact; applied updates agree to the last bits (two
    compilations of the same arithmetic may contract it differently)."""
    for steps in _ONE_LAUNCH_STEPS:
        multi, one = _one_launch_case(k, rng, dt, _one_launch_optimizer(opt), steps, fake=False)
        for i, (a, b) in enumerate(zip(multi, one)):
            np.testing.assert_array_equal(b[2], a[2], err_msg=f"{opt}, guard after step {i + 1} of {steps}")
            for x, y in zip(a, b):
                eps = float(np.finfo(dt).eps)
                np.testing.assert_allclose(y, x, rtol=4 * eps, atol=4 * eps * float(np.abs(x).max(initial=1.0)),
                                           err_msg=f"{opt}, step {i + 1} of {steps}")


_POOLS: list = []  # CuPy frees a pool's memory with the pool: keep them for the session


@pytest.fixture
def poisoned_memory(k):
    """A context in which every new device buffer starts as NaN (all bytes 0xFF), so an element a
    kernel forgets to write shows up in the comparison with the reference."""
    import cupy

    pool = cupy.cuda.MemoryPool()
    _POOLS.append(pool)

    def malloc(size):
        mem = pool.malloc(size)
        mem.memset_async(0xFF, size)
        return mem

    @contextmanager
    def poisoned():
        with cupy.cuda.using_allocator(malloc):
            yield
        cupy.cuda.Device().synchronize()

    yield poisoned
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()  # the blocks no array uses any more


def tol(dtype) -> dict:
    return {"rtol": 2e-4, "atol": 2e-5} if np.dtype(dtype) == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


EPS32 = float(np.finfo(np.float32).eps)


def sum_tol(dtype, n_terms: int, scale: float) -> dict:
    """Tolerance for results that are sums of ``n_terms`` products of typical size ``scale`` (the rms of
    one term): a GEMM's reduction, a bias gradient summed over the batch.

    In float32 each term carries the rounding of its inputs and each addition a rounding of the
    running sum. These errors are unbiased and independent, so they add up like a random walk, to
    about ``eps32 * sqrt(n_terms) * scale`` whatever the size of the sum itself: a sum near zero by
    cancellation has the same absolute error as a large one, which a relative tolerance cannot
    cover. (On an H200, a float32 ``dW`` over a batch of 512 had 2 of 1,060,899 elements off by
    2.4e-5, about 9 such units, on values near 1e-3.) ``atol = 24`` units leaves room for the far
    tail of a million elements, yet stays thousands of times below what a wrong kernel does: a term
    dropped, doubled or taken from the wrong row moves an element by about ``scale`` (24 units are
    6.5e-5 of it for 512 terms), and even TF32 rounding (about 1e-3 per term) would exceed it.
    """
    if np.dtype(dtype) != np.float32:
        return tol(dtype)
    return {"rtol": 2e-4, "atol": max(2e-5, 24 * EPS32 * np.sqrt(n_terms) * scale)}


def host(k, a) -> np.ndarray:
    return np.asarray(k.to_host(a), dtype=np.float64)


def _rel_fro(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


BATCH, N_IN, N_OUT = 512, 1031, 1029  # real sizes, none a multiple of a tile or warp


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", HIDDEN + ["softmax"])
def test_poisoned_forward(k, rng, act, dtype, poisoned_memory):
    x, W, b = rng.normal(size=(BATCH, N_IN)), rng.normal(size=(N_OUT, N_IN)) / 32, rng.normal(size=N_OUT)
    a = _alpha(act)
    y_ref, u_ref = ref.layer_forward(x, W, b, act, a, True)
    with poisoned_memory():
        xd, Wd, bd = k.to_device(x, dtype), k.to_device(W, dtype), k.to_device(b, dtype)
        y, u = k.layer_forward(xd, Wd, bd, act, a, True)
        y2, u2 = k.layer_forward(xd, Wd, bd, act, a, False)
    assert u2 is None
    np.testing.assert_allclose(host(k, u), u_ref, **tol(dtype))
    np.testing.assert_allclose(host(k, y), y_ref, **tol(dtype))
    np.testing.assert_allclose(host(k, y2), y_ref, **tol(dtype))
    assert k.to_host(y).dtype == dtype


@gpu
@pytest.mark.parametrize("cols", [2, 31, 33, 3000])
def test_poisoned_softmax_widths(k, rng, cols, poisoned_memory):
    """One warp per row: rows narrower than a warp, just around it, and far wider."""
    rows = 517
    x, W, b = rng.normal(size=(rows, 40)), rng.normal(size=(cols, 40)) / 4, rng.normal(size=cols)
    with poisoned_memory():
        y, u = k.layer_forward(k.to_device(x, np.float32), k.to_device(W, np.float32), k.to_device(b, np.float32),
                               "softmax", 0.0, True)
    y_ref, u_ref = ref.layer_forward(x, W, b, "softmax", 0.0, True)
    np.testing.assert_allclose(host(k, y), y_ref, **tol(np.float32))
    np.testing.assert_allclose(host(k, y).sum(axis=1), 1.0, rtol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", HIDDEN)
def test_poisoned_delta_backward(k, rng, act, dtype, poisoned_memory):
    a = _alpha(act)
    delta, W = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(N_OUT, N_IN)) / 32
    u_prev = rng.normal(size=(BATCH, N_IN)) * 2
    y_prev = ref.activate(u_prev, act, a)
    with poisoned_memory():
        got = k.delta_backward(k.to_device(delta, dtype), k.to_device(W, dtype), k.to_device(y_prev, dtype),
                               k.to_device(u_prev, dtype), act, a)
    np.testing.assert_allclose(host(k, got), ref.delta_backward(delta, W, y_prev, u_prev, act, a), **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_poisoned_weight_gradients(k, rng, dtype, poisoned_memory):
    delta, x = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(BATCH, N_IN))
    rW, rb = ref.weight_gradients(delta, x)
    with poisoned_memory():
        dd, xd = k.to_device(delta, dtype), k.to_device(x, dtype)
        dW = k.to_device(np.full((N_OUT, N_IN), np.nan), dtype)
        db = k.to_device(np.full(N_OUT, np.nan), dtype)
        k.weight_gradients(dd, xd, dW, db)
        fW, fb = k.weight_gradients(dd, xd)
    # each element is a sum over the batch: dW of delta * x terms, db of delta terms
    scale_W = float(np.sqrt(np.mean(delta**2) * np.mean(x**2)))
    scale_b = float(np.sqrt(np.mean(delta**2)))
    for got, want, scale in ((dW, rW, scale_W), (db, rb, scale_b), (fW, rW, scale_W), (fb, rb, scale_b)):
        np.testing.assert_allclose(host(k, got), want, **sum_tol(dtype, BATCH, scale))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_poisoned_sgd_update(k, rng, dtype, weight_decay, poisoned_memory):
    W, g = rng.normal(size=(N_OUT, N_IN)), rng.normal(size=(N_OUT, N_IN))
    with poisoned_memory():
        Wd = k.to_device(W, dtype)
        k.sgd_update(Wd, k.to_device(g, dtype), 0.01, weight_decay)
    ref.sgd_update(W, g, 0.01, weight_decay)
    np.testing.assert_allclose(host(k, Wd), W, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("output,loss", PAIRS)
def test_poisoned_output_error(k, rng, output, loss, dtype, poisoned_memory):
    batch, n = BATCH, 1000
    a = _alpha(output)
    u = rng.normal(size=(batch, n)) * 2
    y = ref.activate(u, output, a)
    t = _targets(rng, loss, batch, n)
    param = 0.5 if loss == "huber" else LOSSES[loss].default_param
    with poisoned_memory():
        value, delta = k.output_error(k.to_device(y, dtype), k.to_device(u, dtype), k.to_device(t, dtype),
                                      output, loss, param, a)
    rv, rd = ref.output_error(y, u, t, output, loss, param, a)
    np.testing.assert_allclose(float(host(k, value)), float(rv), **tol(dtype))
    np.testing.assert_allclose(host(k, delta), rd, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_poisoned_optimizers_at_size(k, rng, dtype, poisoned_memory):
    shape = (N_OUT, N_IN)
    p, g, v = (rng.normal(size=shape) for _ in range(3))
    m, s = rng.normal(size=shape), rng.uniform(size=shape)
    with poisoned_memory():
        pd, gd, vd = k.to_device(p, dtype), k.to_device(g, dtype), k.to_device(v, dtype)
        k.momentum_update(pd, gd, vd, 0.1, 0.9, True, 0.01)
        qd, md, sd = k.to_device(p, dtype), k.to_device(m, dtype), k.to_device(s, dtype)
        k.adam_update(qd, gd, md, sd, 1e-3, 0.9, 0.999, 1e-8, 3, 0.01)
    p1, v1 = p.copy(), v.copy()
    ref.momentum_update(p1, g, v1, 0.1, 0.9, True, 0.01)
    p2, m2, s2 = p.copy(), m.copy(), s.copy()
    ref.adam_update(p2, g, m2, s2, 1e-3, 0.9, 0.999, 1e-8, 3, 0.01)
    for got, want in ((pd, p1), (vd, v1), (qd, p2), (md, m2), (sd, s2)):
        np.testing.assert_allclose(host(k, got), want, **tol(dtype))


# --------------------------------------------------------------------------- the new contract on a GPU
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ["relu", "gelu", "softmax"])
def test_poisoned_buffers_forward_backward(k, rng, act, dtype, poisoned_memory):
    """The keyword buffers (poisoned) receive every element and are the arrays returned."""
    import cupy

    x, W, b = rng.normal(size=(BATCH, N_IN)), rng.normal(size=(N_OUT, N_IN)) / 32, rng.normal(size=N_OUT)
    y_ref, u_ref = ref.layer_forward(x, W, b, act, 0.0, True)
    with poisoned_memory():
        xd, Wd, bd = k.to_device(x, dtype), k.to_device(W, dtype), k.to_device(b, dtype)
        y, u, y2 = (cupy.empty((BATCH, N_OUT), dtype=dtype) for _ in range(3))
        got = k.layer_forward(xd, Wd, bd, act, 0.0, True, y=y, u=u)
        got2 = k.layer_forward(xd, Wd, bd, act, 0.0, False, y=y2)
    assert got[0] is y and got[1] is u and got2[0] is y2 and got2[1] is None
    np.testing.assert_allclose(host(k, u), u_ref, **tol(dtype))
    np.testing.assert_allclose(host(k, y), y_ref, **tol(dtype))
    np.testing.assert_allclose(host(k, y2), y_ref, **tol(dtype))
    if act == "softmax":
        return
    delta, u_prev = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(BATCH, N_IN)) * 2
    y_prev = ref.activate(u_prev, act)
    with poisoned_memory():
        out = cupy.empty((BATCH, N_IN), dtype=dtype)
        got = k.delta_backward(k.to_device(delta, dtype), k.to_device(W, dtype), k.to_device(y_prev, dtype),
                               k.to_device(u_prev, dtype), act, 0.0, out=out)
    assert got is out
    np.testing.assert_allclose(host(k, out), ref.delta_backward(delta, W, y_prev, u_prev, act), **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("output,loss", [("softmax", "cross_entropy"), ("sigmoid", "bce"), ("identity", "mse")])
def test_poisoned_output_error_buffers(k, rng, output, loss, dtype, poisoned_memory):
    """delta and value given (poisoned): written, returned, and the scratch is made once and reused."""
    import cupy

    u = rng.normal(size=(BATCH, 1000)) * 2
    y = ref.activate(u, output)
    t = _targets(rng, loss, BATCH, 1000)
    rv, rd = ref.output_error(y, u, t, output, loss)
    with poisoned_memory():
        yd, ud, td = k.to_device(y, dtype), k.to_device(u, dtype), k.to_device(t, dtype)
        delta, value = cupy.empty((BATCH, 1000), dtype=dtype), cupy.empty((), dtype=dtype)
        k.output_error(yd, ud, td, output, loss, delta=delta, value=value)
        cached = len(k._scratch_cache)
        got_v, got_d = k.output_error(yd, ud, td, output, loss, delta=delta, value=value)
        assert len(k._scratch_cache) == cached
    assert got_v is value and got_d is delta and value.shape == () and value.dtype == dtype
    np.testing.assert_allclose(float(host(k, value)), float(rv), **tol(dtype))
    np.testing.assert_allclose(host(k, delta), rd, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_guard_step_against_reference(k, rng, dtype, poisoned_memory):
    """A flat gradient buffer of real size (many scan blocks): ok, a NaN gradient in the last element
    (its step number kept), then ok steps the sticky failure refuses; an infinite loss alone."""
    n = 3_000_017
    g = rng.normal(size=n)
    bad = g.copy()
    bad[-1] = np.nan
    for steps in ([(1.5, g), (2.0, bad), (0.25, g)], [(np.inf, g), (1.0, g)], [(1.0, g), (2.0, g)]):
        guard_ref = np.zeros(GUARD_SIZE)
        with poisoned_memory():
            guard = k.zeros((GUARD_SIZE,), np.float64)
            for lv, gr in steps:
                loss, grads = k.to_device(lv, dtype), k.to_device(gr, dtype)
                k.guard_step(guard, loss, grads, 0.5)
                ref.guard_step(guard_ref, np.asarray(lv, dtype=dtype), gr.astype(dtype), 0.5)
                np.testing.assert_allclose(host(k, guard), guard_ref, rtol=1e-12)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_guarded_updates_skip_bit_for_bit(k, rng, dtype, poisoned_memory):
    """A step whose gradient holds a NaN: guard_step says no, and the guarded SGD, momentum and Adam
    updates leave the parameters and the state bit for bit as they were; a finite step goes through
    exactly as an unguarded one."""
    shape = (N_OUT, N_IN)
    p, g, v, m = (rng.normal(size=shape) for _ in range(4))
    s = rng.uniform(size=shape)
    g_bad = g.copy()
    g_bad[5, 7] = np.nan

    def run(grad, guarded):
        with poisoned_memory():
            guard = k.zeros((GUARD_SIZE,), np.float64)
            gd = k.to_device(grad, dtype)
            k.guard_step(guard, k.to_device(0.5, dtype), gd)
            arrays = [k.to_device(a, dtype) for a in (p, p, p, v, m, s)]
            G = guard if guarded else None
            k.sgd_update(arrays[0], gd, 0.1, 0.01, guard=G)
            k.momentum_update(arrays[1], gd, arrays[3], 0.1, 0.9, True, 0.01, guard=G)
            k.adam_update(arrays[2], gd, arrays[4], arrays[5], 1e-3, 0.9, 0.999, 1e-8, 3, 0.01, guard=G)
        return host(k, guard), [k.to_host(a) for a in arrays]

    guard, skipped = run(g_bad, True)
    assert guard[GUARD_OK] == 0 and guard[GUARD_FAILED] == 1 and guard[GUARD_STEPS] == 1
    for got, before in zip(skipped, (p, p, p, v, m, s)):
        np.testing.assert_array_equal(got.view(np.uint8), before.astype(dtype).view(np.uint8))
    guard, applied = run(g, True)
    assert guard[GUARD_OK] == 1 and guard[GUARD_LOSS_SUM] == 0.5
    _, plain = run(g, False)
    for a, b in zip(applied, plain):
        np.testing.assert_array_equal(a, b)
    p1, v1 = p.copy(), v.copy()
    ref.momentum_update(p1, g, v1, 0.1, 0.9, True, 0.01)
    np.testing.assert_allclose(applied[1], p1, **tol(dtype))
    np.testing.assert_allclose(applied[3], v1, **tol(dtype))


@gpu
def test_guard_and_updates_never_read_the_host(k, rng):
    """guard_step and the guarded updates record into a CUDA graph (a host read or a synchronization
    would break the capture), and the replay does what direct calls do."""
    import cupy

    guard = k.zeros((GUARD_SIZE,), np.float64)
    loss = k.to_device(2.0, np.float32)
    grads = k.to_device(rng.normal(size=100_003), np.float32)
    p, v = k.to_device(rng.normal(size=100_003), np.float32), k.zeros((100_003,), np.float32)
    k.guard_step(guard, loss, grads)  # compiles, makes the scratch
    k.sgd_update(p, grads, 0.0, guard=guard)
    k.momentum_update(p, grads, v, 0.0, 0.5, guard=guard)
    k.synchronize()
    guard.fill(0)
    start = k.to_host(p)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        k.guard_step(guard, loss, grads, 1.0)
        k.sgd_update(p, grads, 0.5, guard=guard)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(k.to_host(guard), [1, 1, 0, 2])
    np.testing.assert_allclose(k.to_host(p), start - 0.5 * k.to_host(grads), rtol=1e-6, atol=1e-7)
    grads[17] = np.nan
    before = k.to_host(p)
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(k.to_host(guard), [0, 2, 2, 2])
    np.testing.assert_array_equal(k.to_host(p), before)


@gpu
def test_array_stats_against_reference(k, rng):
    a = rng.normal(size=(1031, 257))
    a[400, 3], a[999, 0] = np.inf, np.nan
    cases = [a, rng.normal(size=(517, 33)), ref.activate(rng.normal(size=(300, 10)), "softmax"),
             np.eye(10)[rng.integers(0, 10, 4000)], np.round(rng.normal(size=100_001) * 9), np.zeros((0, 4))]
    for host_a in cases:
        for dtype in (np.float32, np.float64):
            want = ref.array_stats(host_a.astype(dtype))
            got = k.array_stats(k.to_device(host_a, dtype))
            assert got.dtype == np.float64 and got.shape == want.shape
            if want[STAT_NONFINITE]:  # NaN may leak into min, max and the row sums: compare the rest
                keep = [STAT_NONFINITE, STAT_FIRST_NONFINITE, STAT_NON_INTEGER]
                np.testing.assert_allclose(got[keep], want[keep], rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    got = k.array_stats(k.to_device(a, np.float32))
    assert got[STAT_NONFINITE] == 2 and got[STAT_FIRST_NONFINITE] == 400 * 257 + 3
    labels = rng.integers(0, 7, size=5000)
    np.testing.assert_array_equal(k.array_stats(k.to_device(labels, np.int64)), ref.array_stats(labels))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_hot_gather_rows_against_reference(k, rng, dtype, poisoned_memory):
    import cupy

    labels = rng.integers(0, 10, size=BATCH * 3 + 1)
    src_h, idx = rng.normal(size=(4000, 37)), rng.integers(0, 4000, size=BATCH)
    with poisoned_memory():
        got = k.one_hot(k.to_device(labels, np.int64), 10, dtype)
        out = cupy.empty((labels.size, 10), dtype=dtype)
        got2 = k.one_hot(k.to_device(labels, np.float64), 10, dtype, out=out)
        rows = cupy.empty((BATCH, 37), dtype=dtype)
        got3 = k.gather_rows(k.to_device(src_h, dtype), k.to_device(idx, np.int64), rows)
    assert got2 is out and got3 is rows and got.dtype == dtype
    want = ref.one_hot(labels, 10, dtype)
    np.testing.assert_array_equal(k.to_host(got), want)
    np.testing.assert_array_equal(k.to_host(out), want)
    np.testing.assert_array_equal(k.to_host(rows), ref.gather_rows(src_h.astype(dtype), idx,
                                                                   np.empty((BATCH, 37), dtype=dtype)))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_sum_of_squares_against_reference(k, rng, dtype):
    W = rng.normal(size=(N_OUT, N_IN)) / 8
    total, want = k.to_device([2.0], np.float64), np.array([2.0])
    for _ in range(3):
        k.add_sum_of_squares(total, k.to_device(W, dtype))
        ref.add_sum_of_squares(want, W.astype(dtype).astype(np.float64))
    np.testing.assert_allclose(k.to_host(total), want, rtol=1e-5 if dtype == np.float32 else 1e-12)


@gpu
def test_owns_as_array_and_free_memory(k, rng):
    import cupy

    a = k.to_device(rng.normal(size=(30, 4)), np.float32)
    assert k.owns(a) and not k.owns(k.to_host(a)) and not k.owns(None)
    assert k.as_array(a, np.float32) is a
    b = k.as_array(a, np.float64)
    assert isinstance(b, cupy.ndarray) and b.dtype == np.float64 and b.flags.c_contiguous
    c = k.as_array(a[:, 1], np.float32)
    assert c.flags.c_contiguous and c is not a
    np.testing.assert_array_equal(k.to_host(c), k.to_host(a)[:, 1])
    free = k.device_memory_free()
    assert isinstance(free, int) and 0 < free <= cupy.cuda.runtime.memGetInfo()[1]


@gpu
def test_large_batch_loss_reduction(k, rng):
    """More elements than the loss kernel's threads: the grid-stride loop and the partial sums."""
    batch, n = 2**16, 64
    u = rng.normal(size=(batch, n)).astype(np.float32)
    t = rng.normal(size=(batch, n)).astype(np.float32)
    value, delta = k.output_error(k.to_device(u, np.float32), k.to_device(u, np.float32), k.to_device(t, np.float32),
                                  "identity", "mse")
    rv, rd = ref.output_error(u.astype(np.float64), u.astype(np.float64), t.astype(np.float64), "identity", "mse")
    np.testing.assert_allclose(float(host(k, value)), float(rv), rtol=1e-4)
    np.testing.assert_allclose(host(k, delta), rd, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- CUDA graphs
@pytest.fixture
def kg(k):
    """The backend, where it can record CUDA graphs (nvmath-python installed)."""
    reason = k.capture_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return k


def _nets(hidden: str, head: str, dtype: str, sizes=(37, 96, 80, 5)):
    from backprop import MLP

    return [MLP(list(sizes), activation=hidden, head=head, dtype=dtype, seed=3, backend="cupy") for _ in range(2)]


def _batches(rng, head: str, n: int, batch: int = 128, n_in: int = 37, n_out: int = 5):
    out = []
    for _ in range(n):
        X = rng.normal(size=(batch, n_in))
        if head == "multiclass":
            T = rng.integers(0, n_out, batch)
        else:
            T = rng.normal(size=(batch, n_out))
        out.append((X, T))
    return out


GRAPH_CASES = [
    ("tanh", "multiclass", dict(lr=0.1)),
    ("relu", "regression", dict(lr=0.05, momentum=0.9)),
    ("gelu", "regression", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("silu", "multiclass", dict(lr=0.1, weight_decay=1e-2)),
]


def _compare_runs(plain, graphed, opt_plain, opt_graph, batches, dtype, **tolerance):
    from backprop import graph

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed recording warns: make it fail here
        for X, T in batches:
            lp = plain.train_step(X, T, opt_plain)
            lg = graphed.train_step(X, T, opt_graph, graph=True)
            np.testing.assert_allclose(lg, lp, **(tolerance or tol(dtype)))
    assert graph.recorded(graphed) == 1
    assert opt_graph.steps == opt_plain.steps == len(batches)
    for (Wp, bp), (Wg, bg) in zip(plain.get_params(), graphed.get_params()):
        np.testing.assert_allclose(Wg, Wp, **(tolerance or tol(dtype)))
        np.testing.assert_allclose(bg, bp, **(tolerance or tol(dtype)))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden,head,opt", GRAPH_CASES)
def test_graph_step_equals_normal_step(kg, rng, hidden, head, opt, dtype):
    from backprop import SGD

    plain, graphed = _nets(hidden, head, dtype)
    _compare_runs(plain, graphed, SGD(**opt), SGD(**opt), _batches(rng, head, 5), dtype)


@gpu
@pytest.mark.parametrize("hidden,head,opt", [
    ("tanh", "multiclass", dict(lr=0.1, momentum=0.9)),
    ("gelu", "regression", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
])
def test_graph_small_net_at_batch_256(kg, rng, hidden, head, opt):
    """The case graphs are for: [64, 64, 10] at batch 256, where launches dominate a step."""
    from backprop import SGD

    plain, graphed = _nets(hidden, head, "float32", sizes=(64, 64, 10))
    batches = _batches(rng, head, 10, batch=256, n_in=64, n_out=10)
    _compare_runs(plain, graphed, SGD(**opt), SGD(**opt), batches, "float32")


@gpu
def test_graph_follows_new_settings_and_parameters(kg, rng):
    from backprop import SGD, graph

    plain, graphed = _nets("relu", "multiclass", "float32")
    opt_plain, opt_graph = SGD(lr=0.1, momentum=0.5), SGD(lr=0.1, momentum=0.5)
    batches = _batches(rng, "multiclass", 8)
    for i, (X, T) in enumerate(batches):
        if i == 3:  # a schedule changes the rate: a new recording
            opt_plain.lr = opt_graph.lr = 0.03
        if i == 5:  # new parameter arrays: a new recording
            params = plain.get_params()
            plain.set_params(params)
            graphed.set_params(params)
        if i == 6:  # a smaller last batch: its own recording
            X, T = X[:50], T[:50]
        lp = plain.train_step(X, T, opt_plain)
        lg = graphed.train_step(X, T, opt_graph, graph=True)
        np.testing.assert_allclose(lg, lp, rtol=1e-4, atol=1e-6)
    assert 1 <= graph.recorded(graphed) <= graph.MAX_GRAPHS_PER_NET
    for (Wp, bp), (Wg, bg) in zip(plain.get_params(), graphed.get_params()):
        np.testing.assert_allclose(Wg, Wp, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bg, bp, rtol=1e-4, atol=1e-6)


@gpu
def test_graph_non_finite_loss_leaves_parameters(kg, rng):
    from backprop import SGD
    from backprop.network import NonFiniteLossError

    k = kg
    (net, _) = _nets("tanh", "regression", "float32")
    opt = SGD(lr=0.1)
    (X, T), = _batches(rng, "regression", 1)
    x, t = k.to_device(X, np.float32), k.to_device(T, np.float32)
    net.train_step_device(x, t, opt, graph=True)  # ordinary step, then recorded
    net.train_step_device(x, t, opt, graph=True)  # replayed
    before = net.get_params()
    steps = opt.steps
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(NonFiniteLossError):
        net.train_step_device(k.to_device(bad, np.float32), t, opt, graph=True)
    assert opt.steps == steps
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_graph_adam_step_equals_normal_step(kg, rng, dtype):
    """Adam (with weight decay) replayed from a graph: its device bias corrections advance at each
    replay, so the run equals ordinary Adam steps (the same kernels on the same data: bit for bit)."""
    from backprop import Adam

    plain, graphed = _nets("tanh", "multiclass", dtype)
    opt = dict(lr=1e-2, beta1=0.8, beta2=0.95, weight_decay=1e-3)
    _compare_runs(plain, graphed, Adam(**opt), Adam(**opt), _batches(rng, "multiclass", 6), dtype, rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_device_corrections_on_the_gpu(kg, rng, dtype):
    """adam_corrections on the GPU against the host's float64 numbers, and adam_update reading them
    against the int form (bit for bit unless the GPU's pow differs from the host's in the last bit)."""
    k = kg
    count, corr = k.zeros((1,), np.float64), k.zeros((2,), dtype)
    p, g, m, v = (k.to_device(rng.normal(size=(33, 17)), dtype) for _ in range(4))
    v = abs(v)
    q, n, w = p.copy(), m.copy(), v.copy()
    for t in range(1, 6):
        k.adam_corrections(count, 1e-2, 0.9, 0.999, corr)
        want = np.array([dtype(1e-2 / (1 - 0.9**t)), dtype(1 - 0.999**t)])
        np.testing.assert_allclose(host(k, corr), want, rtol=4 * np.finfo(dtype).eps, atol=0)
        k.adam_update(p, g, m, v, 0.0, 0.9, 0.999, 1e-8, corr, 1e-3)
        k.adam_update(q, g, n, w, 1e-2, 0.9, 0.999, 1e-8, t, 1e-3)
        np.testing.assert_allclose(host(k, p), host(k, q), **tol(dtype))
    assert host(k, count).tolist() == [5.0]


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nvmath_cublas_inside_a_capture(kg, rng, dtype):
    """Every GEMM shape the backend issues (N,T forward; N,N backward; T,N weight gradients) and the bias
    GEMV, recorded through nvmath's cuBLAS (CuPy 14's wrappers refuse), replayed twice on new data."""
    k = kg
    a = k.to_device(rng.normal(size=(256, 64)), dtype)
    w = k.to_device(rng.normal(size=(10, 64)), dtype)
    d = k.to_device(rng.normal(size=(256, 10)), dtype)
    fwd, bwd, dW, db = (k.zeros(s, dtype) for s in ((256, 10), (256, 64), (10, 64), (10,)))

    def work():
        k._gemm("N", "T", a, w, fwd)
        k._gemm("N", "N", d, w, bwd)
        k._gemm("T", "N", d, a, dW)
        k._bias_gemv(d, db, 1.0, 0.0)
    work()  # algorithms chosen, the handle made
    g = k.capture(work)
    for _ in range(2):
        a[...] = k.to_device(rng.normal(size=(256, 64)), dtype)
        d[...] = k.to_device(rng.normal(size=(256, 10)), dtype)
        for buf in (fwd, bwd, dW, db):
            buf.fill(np.nan)
        k.replay(g)
        k.synchronize()
        A, Wh, D = host(k, a), host(k, w), host(k, d)
        for got, want in ((fwd, A @ Wh.T), (bwd, D @ Wh), (dW, D.T @ A), (db, D.sum(axis=0))):
            np.testing.assert_allclose(host(k, got), want, **sum_tol(dtype, 256, 1.0))


@gpu
def test_tf32_mode_inside_a_graph(kg, rng):
    """A graph recorded with TF32 on keeps it when replayed with TF32 off (and the other way round)."""
    import cupy

    k = kg
    x, W, b = rng.normal(size=(BATCH, 1024)), rng.normal(size=(1024, 1024)) / 32, rng.normal(size=1024)
    u_ref = x @ W.T + b
    xd, Wd, bd = (k.to_device(a, np.float32) for a in (x, W, b))
    y32, u32, ytf, utf = (k.zeros((BATCH, 1024), np.float32) for _ in range(4))
    k.layer_forward(xd, Wd, bd, "identity", 0.0, True, y=y32, u=u32)
    g32 = k.capture(lambda: k.layer_forward(xd, Wd, bd, "identity", 0.0, True, y=y32, u=u32))
    k.set_tf32(True)
    try:
        k.layer_forward(xd, Wd, bd, "identity", 0.0, True, y=ytf, u=utf)
        gtf = k.capture(lambda: k.layer_forward(xd, Wd, bd, "identity", 0.0, True, y=ytf, u=utf))
    finally:
        k.set_tf32(False)
    u32.fill(np.nan)
    utf.fill(np.nan)
    k.set_tf32(True)
    try:
        k.replay(g32)
    finally:
        k.set_tf32(False)
    k.replay(gtf)
    k.synchronize()
    err32, errtf = _rel_fro(host(k, u32), u_ref), _rel_fro(host(k, utf), u_ref)
    assert err32 < 1e-5, err32
    assert errtf < k.TF32_RTOL, errtf
    if int(cupy.cuda.Device().compute_capability) // 10 >= 8:  # TF32 tensor cores exist
        assert errtf > 10 * err32, (errtf, err32)


# --------------------------------------------------------------------------- TF32
@gpu
def test_tf32_within_documented_tolerance(k, rng):
    import cupy
    from cupy_backends.cuda.libs import cublas

    # CuPy 14 has no CUBLAS_TF32_TENSOR_OP_MATH: the backend then uses cuBLAS's value, 3
    assert getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", k.CUBLAS_TF32_TENSOR_OP_MATH) == 3

    x, W, b = rng.normal(size=(BATCH, 1024)), rng.normal(size=(1024, 1024)) / 32, rng.normal(size=1024)
    u_ref = x @ W.T + b
    xd, Wd, bd = (k.to_device(a, np.float32) for a in (x, W, b))
    _, u32 = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
    k.set_tf32(True)
    try:
        _, utf = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
        delta = k.to_device(rng.normal(size=(BATCH, 1024)), np.float32)
        dW, _ = k.weight_gradients(delta, xd)
    finally:
        k.set_tf32(False)
    err32, errtf = _rel_fro(host(k, u32), u_ref), _rel_fro(host(k, utf), u_ref)
    assert err32 < 1e-5, err32
    assert errtf < k.TF32_RTOL, errtf
    dW_ref = host(k, delta).T @ x
    assert _rel_fro(host(k, dW), dW_ref) < k.TF32_RTOL
    major = int(cupy.cuda.Device().compute_capability) // 10
    if major >= 8:  # TF32 tensor cores exist: the mode must have taken effect
        assert errtf > 10 * err32, (errtf, err32)


@gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("act", HIDDEN)
def test_gpu_fused_passes_match_reference(k, rng, poisoned_memory, dt, act):
    """The fused forward and backward launches on the GPU, in poisoned memory, against the float64 reference:
    a [64]*4 network at a batch that is no multiple of the tile, each hidden activation, softmax output."""
    from backprop.kernels import fused_mlp_sources as F
    from tests.test_fused_mlp import Net

    net = Net(rng, [64, 64, 64, 10], [act, act, "softmax"], dt)
    rows = 1000
    x = rng.normal(size=(rows, 64)).astype(dt).astype(np.float64)
    layout, y_off, u_off, ny, nu = net.plan(rows)
    with poisoned_memory():
        xd, pd = k.to_device(x, dt), k.to_device(net.params, dt)
        yd, ud = k.xp.empty(ny, dtype=dt), k.xp.empty(max(nu, 1), dtype=dt)
        k.mlp_forward(xd, pd, net.sizes, net.acts, net.alphas, net.keep_u, yd, ud)
        delta = rng.normal(size=(rows, 10)).astype(dt).astype(np.float64) / rows
        grads = k.xp.empty(net.params.size, dtype=dt)
        k.mlp_backward(xd, pd, net.sizes, net.acts, net.alphas, net.keep_u, yd, ud, k.to_device(delta, dt), grads)
        ys, us, g = k.to_host(yd), k.to_host(ud), k.to_host(grads)
    want_y, want_u = net.forward(x)
    for i, (o, n) in enumerate(zip(y_off, net.sizes[1:])):
        np.testing.assert_allclose(ys[o:o + rows * n].reshape(rows, n), want_y[i], **tol(dt))
        if u_off[i] >= 0:
            np.testing.assert_allclose(us[u_off[i]:u_off[i] + rows * n].reshape(rows, n), want_u[i], **tol(dt))
    want_g = net.backward(x, want_y, want_u, delta)
    scale = np.max(np.abs(want_g))
    np.testing.assert_allclose(g, want_g, rtol=tol(dt)["rtol"], atol=tol(dt)["rtol"] * scale)
    assert F.unserved_reason(net.sizes, net.acts, dt) == ""


@gpu
@pytest.mark.parametrize("width", [16, 32, 64, 128])
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_gpu_fused_tf32_passes_match_reference(k, rng, poisoned_memory, width, act):
    """The TF32 (tensor-core) fused launches on the GPU, in poisoned memory, against the float64 reference to TF32's
    error, and measurably apart from the float launches (the mma path ran): [w, w, w, 10] at 1000 rows."""
    from tests.test_fused_mlp import TF32_TOL, Net

    if int(k.xp.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 tensor cores need sm_80 or newer")
    dt = np.float32
    net = Net(rng, [width, width, width, 10], [act, act, "softmax"], dt)
    rows = 1000
    x = rng.normal(size=(rows, width)).astype(dt).astype(np.float64)
    delta = rng.normal(size=(rows, 10)).astype(dt).astype(np.float64) / rows
    _, y_off, _, ny, nu = net.plan(rows)
    got = {}
    for tc in (False, True):
        k.set_tf32(tc)
        try:
            assert k.fused_mlp_path(dt) == ("TF32 tensor cores" if tc else "CUDA cores")
            with poisoned_memory():
                xd, pd = k.to_device(x, dt), k.to_device(net.params, dt)
                yd, ud = k.xp.empty(ny, dtype=dt), k.xp.empty(max(nu, 1), dtype=dt)
                k.mlp_forward(xd, pd, net.sizes, net.acts, net.alphas, net.keep_u, yd, ud)
                grads = k.xp.empty(net.params.size, dtype=dt)
                k.mlp_backward(xd, pd, net.sizes, net.acts, net.alphas, net.keep_u, yd, ud, k.to_device(delta, dt),
                               grads)
                got[tc] = (k.to_host(yd)[y_off[-1]:].reshape(rows, 10), k.to_host(grads))
        finally:
            k.set_tf32(False)
    want_y, want_u = net.forward(x)
    want = (want_y[-1], net.backward(x, want_y, want_u, delta))
    for name, a, b, w in zip(("y", "grads"), got[False], got[True], want):
        scale = np.max(np.abs(w))
        err_tc, err_f = np.max(np.abs(b - w)), np.max(np.abs(a - w))
        assert err_tc < TF32_TOL["atol"] * scale, (name, err_tc, scale)
        assert err_tc > 2 * err_f, (name, err_tc, err_f)  # TF32 rounding, not float's


@gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("output,loss", [("softmax", "cross_entropy"), ("identity", "mse"), ("sigmoid", "bce")])
def test_gpu_fused_error_matches_reference(k, rng, poisoned_memory, dt, output, loss):
    """The error at the end of the fused forward pass on the GPU (row weights included), in poisoned memory,
    against the reference's output_error."""
    from tests.conftest import targets_for
    from tests.test_fused_mlp import Net

    net = Net(rng, [32, 64, 64, 8], ["relu", "tanh", output], dt)
    rows = 777
    x = rng.normal(size=(rows, 32)).astype(dt).astype(np.float64)
    t = targets_for(rng, loss, rows, 8).astype(dt).astype(np.float64)
    w = rng.uniform(0.1, 2.0, rows).astype(dt).astype(np.float64)
    _, _, _, ny, nu = net.plan(rows)
    with poisoned_memory():
        yd, ud = k.xp.empty(ny, dtype=dt), k.xp.empty(max(nu, 1), dtype=dt)
        delta, value = k.xp.empty((rows, 8), dtype=dt), k.xp.empty((), dtype=dt)
        k.mlp_forward_error(k.to_device(x, dt), k.to_device(net.params, dt), net.sizes, net.acts, net.alphas,
                            net.keep_u, yd, ud, k.to_device(t, dt), loss, 0.0, delta=delta, value=value,
                            weights=k.to_device(w, dt))
        got_delta, got_value = k.to_host(delta), float(k.to_host(value))
    ys, us = net.forward(x)
    want_value, want_delta = ref.output_error(ys[-1], us[-1], t, output, loss, 0.0, 0.0, weights=w)
    np.testing.assert_allclose(got_delta, want_delta, rtol=tol(dt)["rtol"], atol=tol(dt)["atol"] / rows)
    np.testing.assert_allclose(got_value, float(want_value), **tol(dt))
