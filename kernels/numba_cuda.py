"""numba-cuda backend: ``@cuda.jit`` kernels for the fused parts, cuBLAS (through CuPy) for GEMMs.

What runs where:

* **fused kernels** (always Numba, :mod:`backprop.kernels.numba_cuda_kernels`): bias +
  activation epilogue (softmax one thread per row), ``(delta W) * phi(y)`` epilogue, bias
  gradient column reduction, output error and loss (loss reduced on the device, one value per
  row then a one-block mean), the step guard, the float64 sum of squares, the fused
  SGD/momentum/Adam updates (which read the guard on the device: a skipped step costs no host
  round trip), the statistics of ``array_stats``, ``one_hot`` and ``gather_rows``;
* **GEMMs**: with CuPy installed and a real GPU, ``cupy.matmul`` (cuBLAS). Arrays are then CuPy
  arrays (``xp`` is ``cupy``), handed to the Numba kernels zero-copy through
  ``__cuda_array_interface__`` and launched on CuPy's current stream, so kernels and cuBLAS
  calls stay in order without synchronizing. Without CuPy, or under the CUDA simulator, the
  GEMMs are a shared-memory tiled Numba kernel -- **the slow path**, correct but far from
  cuBLAS -- and arrays are Numba device arrays (``DeviceNDArray``); ``xp`` is then ``None``,
  since no NumPy-like module works on those arrays (use ``to_host`` to look at them).

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the backend works, slowly, and says so
(:func:`is_simulated`), so that ``backend="auto"`` never picks it. Without the simulator and
without a GPU it is unavailable ("no CUDA GPU found"). Importing this module imports neither
Numba nor CuPy; that happens on the first call of :func:`is_available` (or of a primitive).

float32 arrays are computed in float32 on the device (typed constants, scalars cast to the
arrays' dtype); float64 works too. With the keyword buffers of the contract a training step
allocates no device memory: the few temporaries (the per-row losses, the guard's flag) live in
a small module cache keyed by their shape and dtype and are never returned.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from . import numba_math as nm
from .contract import Capabilities, check_weights

NAME = "numba-cuda"
CAPABILITIES = Capabilities(gpu=True, device_queries=True)
Array = Any

_state: SimpleNamespace | None = None
_reason = ""


# --------------------------------------------------------------------------- availability
def numpy_compat() -> None:
    """Give NumPy back the ``np.row_stack`` alias (of ``np.vstack``) where it lacks it.

    numba-cuda (0.30.4) registers ``overload(np.row_stack)`` when it compiles, and NumPy 2.5
    removed ``row_stack``: every kernel compile for a real GPU then fails with AttributeError.
    Called before ``numba.cuda`` is imported (here and by :mod:`backprop.kernels.numba_cuda_kernels`);
    leaves NumPy alone when it has the name. Remove this once numba-cuda no longer names
    ``np.row_stack``.
    """
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack  # type: ignore[attr-defined]


def _numba_cuda() -> ModuleType:
    numpy_compat()
    from numba import cuda

    return cuda


def is_simulated() -> bool:
    """True under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    try:
        from numba import config
    except ImportError:
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    return bool(config.ENABLE_CUDASIM)


def is_available() -> bool:
    """True with a CUDA GPU that Numba can use, or under the CUDA simulator."""
    global _reason
    try:
        cuda = _numba_cuda()
    except ImportError as exc:
        _reason = f"numba-cuda is not installed ({exc}); pip install 'backprop-kernels[cuda12]'"
        return False
    if is_simulated():
        return True
    try:
        ok = bool(cuda.is_available())
    except Exception as exc:  # pragma: no cover - driver trouble
        _reason = f"no CUDA GPU found ({exc})"
        return False
    if not ok:
        _reason = "no CUDA GPU found"
    return ok


def unavailable_reason() -> str:
    if not _reason:
        is_available()
    return _reason


def _cupy_if_usable() -> ModuleType | None:
    """CuPy, when it is installed and sees a GPU (never under the simulator)."""
    if is_simulated():
        return None
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def _get() -> SimpleNamespace:
    """Import the kernels and decide the array type, once."""
    global _state
    if _state is None:
        if not is_available():
            raise RuntimeError(f"the numba-cuda backend is not available: {unavailable_reason()}")
        from . import numba_cuda_kernels as kern

        cuda = _numba_cuda()
        dev = cuda.devicearray
        nb_array = getattr(dev, "DeviceNDArray", None) or dev.FakeCUDAArray  # the simulator's class
        # the simulator runs a launch by swapping the kernel's module globals: one launch at a time
        _state = SimpleNamespace(cuda=cuda, k=kern, cupy=_cupy_if_usable(), streams={}, scratch={},
                                 nb_array=nb_array, launch_lock=threading.Lock() if is_simulated() else None)
    return _state


def __getattr__(name: str) -> Any:
    if name == "xp":
        # The array module of this backend's arrays: ``cupy`` when CuPy is used, else ``None``
        # (Numba device arrays have no NumPy-like module).
        return _get().cupy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def uses_cupy() -> bool:
    """True when GEMMs go to cuBLAS through CuPy and arrays are CuPy arrays."""
    return _get().cupy is not None


# --------------------------------------------------------------------------- arrays
def _is_device(a: Any) -> bool:
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")


def to_host(a: Array) -> np.ndarray:
    """A NumPy copy of a device array (NumPy input is returned as is)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def to_device(a: Any, dtype: Any) -> Array:
    """Copy host (or device) data into a new C-contiguous device array of ``dtype``."""
    s = _get()
    if s.cupy is not None and type(a).__module__.startswith("cupy"):
        return s.cupy.array(a, dtype=dtype, order="C", copy=True)
    if _is_device(a):
        a = to_host(a)
    host = np.asarray(a, dtype=dtype, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    if s.cupy is not None:
        return s.cupy.array(host, dtype=dtype, order="C", copy=True)
    return s.cuda.to_device(host)


def zeros(shape: tuple[int, ...], dtype: Any) -> Array:
    s = _get()
    if s.cupy is not None:
        return s.cupy.zeros(shape, dtype=dtype)
    return s.cuda.to_device(np.zeros(shape, dtype=dtype))


def _empty(shape: tuple[int, ...], dtype: Any) -> Array:
    s = _get()
    if s.cupy is not None:
        return s.cupy.empty(shape, dtype=dtype)
    return s.cuda.device_array(shape, dtype=dtype)


def synchronize() -> None:
    """Wait for the device to finish all queued work."""
    _get().cuda.synchronize()


def device_memory_free() -> int | None:
    """Bytes free on the current device; ``None`` under the simulator (or without a GPU)."""
    if is_simulated() or not is_available():
        return None
    s = _get()
    if s.cupy is not None:
        return int(s.cupy.cuda.runtime.memGetInfo()[0])
    return int(s.cuda.current_context().get_memory_info().free)


def device_info() -> dict[str, Any]:
    """Name and compute capability of the current device (for benchmark reports)."""
    if is_simulated():
        return {"name": "CUDA simulator", "simulated": True}
    dev = _get().cuda.get_current_device()
    name = dev.name
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": ".".join(map(str, dev.compute_capability))}


def owns(a: Any) -> bool:
    """True for this backend's arrays on the current device: CuPy arrays when the backend uses
    CuPy, Numba device arrays otherwise."""
    s = _get()
    if s.cupy is not None:
        return isinstance(a, s.cupy.ndarray) and a.device.id == s.cupy.cuda.runtime.getDevice()
    if not isinstance(a, s.nb_array):
        return False
    ctx = getattr(getattr(a, "gpu_data", None), "context", None)
    return ctx is None or ctx.device.id == s.cuda.get_current_device().id


def _c_contiguous(a: Array) -> bool:
    return bool(a.is_c_contiguous()) if hasattr(a, "is_c_contiguous") else bool(a.flags.c_contiguous)


def as_array(a: Array, dtype: Any) -> Array:
    """``a`` as a C-contiguous array of ``dtype``: ``a`` itself when it is an owned one, else a
    converted copy made on the device (a kernel, or CuPy); data this backend does not own is
    copied over as by :func:`to_device`."""
    dt = np.dtype(dtype)
    if not owns(a):
        return to_device(a, dt)
    if a.dtype == dt and _c_contiguous(a):
        return a
    s = _get()
    if s.cupy is not None:
        return s.cupy.array(a, dtype=dt, order="C", copy=True)
    out = _empty(a.shape, dt)
    _copy_cast(a, out)
    return out


def _copy_cast(src: Array, dst: Array) -> None:
    """``dst[...] = src`` converted to ``dst``'s dtype by a kernel (Numba device arrays; ``dst``
    C-contiguous, ``src`` any layout)."""
    s = _get()
    n = _size(dst)
    if n == 0:
        return
    ndim = len(src.shape)
    if ndim == 1 or _c_contiguous(src):
        flat = src if ndim == 1 else src.reshape(n)
        _launch(s.k.cast_flat, s.k.blocks(n), s.k.TPB, flat, dst.reshape(n))
    elif ndim == 2:
        _launch(s.k.cast_2d, s.k.blocks(n), s.k.TPB, src, dst)
    else:
        for i in range(src.shape[0]):
            _copy_cast(src[i], dst[i])


def copy_into(dst: Array, src: Array) -> None:
    """``dst[...] = src``: a device-to-device copy between arrays of one shape and dtype (C-contiguous ``dst``)."""
    if tuple(dst.shape) != tuple(src.shape) or np.dtype(dst.dtype) != np.dtype(src.dtype):
        raise ValueError(f"copy_into needs arrays of one shape and dtype, got {np.dtype(dst.dtype)} "
                         f"{tuple(dst.shape)} and {np.dtype(src.dtype)} {tuple(src.shape)}")
    _copy_cast(src, dst)


def _scratch(tag: str, shape: tuple[int, ...], dtype: Any, zero: bool = False) -> Array:
    """A device temporary reused from call to call, one per ``(tag, shape, dtype, device, stream, host thread)``
    (only for values that never leave the backend; threads enqueueing on one stream never share one).
    ``zero``: zero-filled when made (a kernel that leaves it as it found it keeps it so)."""
    s = _get()
    key = (tag, shape, np.dtype(dtype).str, _device_key(), _stream_key(), threading.get_ident())
    buf = s.scratch.get(key)
    if buf is None:
        if len(s.scratch) > 64:
            s.scratch.clear()
        buf = s.scratch[key] = zeros(shape, dtype) if zero else _empty(shape, dtype)
    return buf


def _always() -> Array:
    """A guard that lets every update through (``guard[0] == 1``), for updates called without one."""
    s = _get()
    key = ("always", _device_key())
    g = s.scratch.get(key)
    if g is None:
        g = s.scratch[key] = to_device(np.array([1.0, 0.0, 0.0, 0.0]), np.float64)
    return g


def _nb(a: Array) -> Any:
    """A Numba view of ``a`` for a kernel launch: CuPy arrays are wrapped zero-copy (no stream
    sync, see the module docstring); Numba device arrays pass as they are."""
    if hasattr(a, "copy_to_host") or isinstance(a, np.ndarray):
        return a  # a host array works too: Numba copies it over and back around the launch
    return _get().cuda.as_cuda_array(a, sync=False)


def _device_key() -> int:
    """The current device's number (0 under the simulator)."""
    s = _get()
    if s.cupy is not None:
        return int(s.cupy.cuda.runtime.getDevice())
    return int(getattr(s.cuda.get_current_device(), "id", 0) or 0)


def _stream_key() -> int:
    """The current stream's handle (0 for Numba's default stream)."""
    s = _get()
    return 0 if s.cupy is None else int(s.cupy.cuda.get_current_stream().ptr)


def _stream() -> Any:
    """The stream for a Numba launch: CuPy's current stream when CuPy is used (so that kernels
    and cuBLAS calls stay ordered inside ``with cupy.cuda.Stream():`` too), else Numba's default."""
    s = _get()
    if s.cupy is None:
        return 0
    ptr = s.cupy.cuda.get_current_stream().ptr
    if ptr == 0:
        return 0
    stream = s.streams.get(ptr)
    if stream is None:
        stream = s.streams[ptr] = s.cuda.external_stream(ptr)
    return stream


def _launch(kernel: Any, grid: Any, block: Any, *args: Any) -> None:
    lock = _get().launch_lock
    if lock is None:
        kernel[grid, block, _stream()](*args)
        return
    with lock:
        kernel[grid, block, _stream()](*args)


def _flat(a: Array) -> Any:
    return _nb(a).reshape(a.size if hasattr(a, "size") else int(np.prod(a.shape)))


def _size(a: Array) -> int:
    return int(np.prod(a.shape))


def all_finite(a: Array) -> bool:
    s = _get()
    n = _size(a)
    if n == 0:
        return True
    flag = s.cuda.to_device(np.zeros(1, dtype=np.int32))
    _launch(s.k.count_nonfinite, s.k.blocks(n), s.k.TPB, _flat(a), flag)
    return not bool(flag.copy_to_host()[0])


def array_stats(a: Array, integers: bool = True, row_sums: bool = True) -> np.ndarray:
    """The ``STAT_*`` facts about ``a`` (:mod:`backprop.kernels.contract`), float64: how many elements
    are not finite and the flat index of the first (-1 for none), min, max (NaN when some element
    is NaN, or for an empty array), how many are not whole numbers (NaN counts, +-inf does not;
    0 unless ``integers``), and ``max_i |sum_j a[i, j] - 1|`` for a 2-D array (0 otherwise, or
    unless ``row_sums``). Any numeric dtype.

    Reduced on the device into one small float64 buffer (atomics merge the threads' partial
    results), read back with one copy."""
    s = _get()
    n = _size(a)
    out = np.zeros(s.k.STATS_BUFFER, dtype=np.float64)
    if n == 0:
        out[1] = -1.0
        out[2] = out[3] = np.nan
        return out[:6]
    if not _c_contiguous(a):
        a = as_array(a, a.dtype)
    buf = _empty((s.k.STATS_BUFFER,), np.float64)
    _launch(s.k.stats_init, 1, 1, _nb(buf), n)
    _launch(s.k.stats_flat, s.k.blocks(n), s.k.TPB, _flat(a), _nb(buf))
    if row_sums and len(a.shape) == 2:
        _launch(s.k.stats_rows, s.k.blocks(a.shape[0]), s.k.TPB, _nb(a), _nb(buf))
    out = np.asarray(to_host(buf), dtype=np.float64)
    if not integers:
        out[4] = 0.0
    if out[1] >= n:
        out[1] = -1.0
    if out[s.k.STATS_NAN]:
        out[2] = out[3] = np.nan
    if out[s.k.STATS_ROW_NAN]:
        out[5] = np.nan
    return out[:6]


def one_hot(labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
    """Rows ``e_{labels[i]}`` of length ``n_classes`` (labels whole numbers in ``[0, n_classes)``,
    any numeric dtype), into ``out`` when given; one kernel."""
    s = _get()
    m = labels.shape[0]
    if not _c_contiguous(labels):
        labels = as_array(labels, labels.dtype)
    if out is None:
        out = _empty((m, n_classes), np.dtype(dtype))
    if m and n_classes:
        _launch(s.k.one_hot, s.k.blocks(m * n_classes), s.k.TPB, _flat(labels), _nb(out))
    return out


def count_correct(y: Array, t: Array, rule: str, total: Array) -> None:
    """``total[0] +=`` the rows of ``y`` whose prediction matches ``t`` (see the reference); one kernel,
    one thread per row, no host read."""
    if rule not in ("argmax", "threshold"):
        raise ValueError(f"unknown rule {rule!r}; known: argmax, threshold")
    s = _get()
    m = y.shape[0]
    if m:
        dt = np.dtype(y.dtype).type
        _launch(s.k.count_correct, s.k.blocks(m), s.k.TPB, _nb(y), _nb(t), rule == "threshold", dt(0.5),
                _nb(total))


def _rows(a: Array) -> Any:
    """A 2-D Numba view ``(len(a), -1)`` of a C-contiguous array."""
    if len(a.shape) == 2:
        return _nb(a)
    rows = a.shape[0]
    return _nb(a).reshape(rows, _size(a) // rows if rows else 1)


def gather_rows(src: Array, idx: Array, out: Array) -> Array:
    """``out[i] = src[idx[i]]``: the rows of a minibatch, picked by an int64 device index array;
    one kernel (the indices are not checked on the device: the caller makes them)."""
    s = _get()
    n = _size(out)
    if n and src.shape[0]:
        _launch(s.k.gather_rows, s.k.blocks(n), s.k.TPB, _rows(src), _nb(idx), _rows(out))
    return out


# --------------------------------------------------------------------------- GEMMs
def _matmul(a: Array, b: Array, ta: bool, tb: bool, out: Array | None = None) -> Array:
    """``out = op(a) op(b)`` (``op`` transposing when ``ta``/``tb``), into ``out`` when given.

    With CuPy: ``cupy.matmul`` (cuBLAS). Otherwise the tiled shared-memory kernel."""
    s = _get()
    dt = np.dtype(a.dtype)
    if s.cupy is not None:
        return s.cupy.matmul(a.T if ta else a, b.T if tb else b, out=out)
    M = a.shape[1] if ta else a.shape[0]
    N = b.shape[0] if tb else b.shape[1]
    if out is None:
        out = _empty((M, N), dt)
    if M and N:
        T = s.k.TILE
        grid = ((N + T - 1) // T, (M + T - 1) // T)
        _launch(s.k.kernels_for(dt.name).gemm, grid, (T, T), _nb(a), _nb(b), _nb(out), bool(ta), bool(tb))
    return out


def _zero_fill(out: Array) -> Array:
    if hasattr(out, "copy_to_device"):
        out.copy_to_device(np.zeros(out.shape, dtype=out.dtype))
    else:
        out.fill(0)
    return out


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
    y: Array | None = None, u: Array | None = None,
) -> tuple[Array, Array | None]:
    """``u = x W^T`` (GEMM), then the bias + activation epilogue ``y = f(u + b)``; ``(y, u if keep_u)``.

    Without ``keep_u`` the GEMM writes into ``y`` (when given) and the epilogue works in place;
    with it the GEMM writes into ``u`` and the activation into ``y`` (each when given)."""
    s = _get()
    code = nm.act_code(act)
    dt = np.dtype(W.dtype)
    if keep_u:
        u = _matmul(x, W, False, True, out=u)
        if y is None:
            y = _empty(u.shape, dt)
    else:
        y = u = _matmul(x, W, False, True, out=y)
    m, n = u.shape
    if m and n:
        if code == nm.SOFTMAX:
            _launch(s.k.bias_softmax, s.k.blocks(m), s.k.TPB, _nb(u), _nb(b), _nb(y), bool(keep_u))
        else:
            _launch(s.k.bias_act, s.k.blocks(m * n), s.k.TPB, _nb(u), _nb(b), _nb(y), code, dt.type(alpha),
                    bool(keep_u))
    return y, (u if keep_u else None)


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0, *,
    out: Array | None = None,
) -> Array:
    """``g = delta W`` (GEMM, into ``out`` when given), then ``g *= phi(y_prev)`` in place (the
    epilogue kernel; ``f'(u_prev)`` for GELU/SiLU)."""
    s = _get()
    code = nm.act_code(act_prev)
    if code == nm.SOFTMAX:
        raise ValueError("activation 'softmax' has no elementwise slope")
    if code in nm.NEEDS_U and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = _matmul(delta, W, False, False, out=out)
    m, n = g.shape
    if m and n and code not in nm.LINEAR:
        dt = np.dtype(g.dtype)
        yp = _nb(y_prev)
        up = yp if u_prev is None else _nb(u_prev)
        _launch(s.k.slope_mul, s.k.blocks(m * n), s.k.TPB, _nb(g), yp, up, code, dt.type(alpha_prev))
    return g


def _bias_grad(delta: Array, out: Array, coef: float, accumulate: bool) -> None:
    s = _get()
    m, n = delta.shape
    if n == 0:
        return
    dt = np.dtype(delta.dtype)
    if m == 0:
        if not accumulate:
            _zero_fill(out)
        return
    grid = (n + s.k.RED_X - 1) // s.k.RED_X
    _launch(s.k.kernels_for(dt.name).colsum, grid, (s.k.RED_X, s.k.RED_Y), _nb(delta), _nb(out), dt.type(coef),
            bool(accumulate))


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """``dW = delta^T x_prev`` (GEMM, into ``dW`` when given), ``db`` = column sums (reduction kernel)."""
    dW = _matmul(delta, x_prev, True, False, out=dW)
    if db is None:
        db = _empty((delta.shape[1],), delta.dtype)
    _bias_grad(delta, db, 1.0, False)
    return dW, db


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array | None, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0, *,
    delta: Array | None = None, value: Array | None = None, weights: Array | None = None,
) -> tuple[Array, Array]:
    """Mean loss ``E`` (a 0-d device array of ``y``'s dtype) and ``delta = dE/du`` (``(y - t) / batch``
    for the fused pairs, ``dL/dy * phi(y) / batch`` otherwise), into ``value`` and ``delta`` when
    given; with ``weights``, each row's loss and delta times its weight. The loss is reduced on the
    device: per-row losses (a cached scratch vector), then a one-block mean."""
    s = _get()
    lcode, acode, fused = nm.output_loss_codes(output, loss, u is not None)
    if u is None:
        u = y
    dt = np.dtype(y.dtype)
    m, n = y.shape
    check_weights(weights, m, dt)
    if delta is None:
        delta = _empty((m, n), dt)
    if value is None:
        value = _empty((), dt)
    if m == 0:
        return _zero_fill(value), delta
    rowloss = _scratch("rowloss", (m,), dt)
    # unweighted: a cached one-element array stands in for w (never read), so that both share one signature
    w = _scratch("no_weights", (1,), dt) if weights is None else weights
    _launch(s.k.loss_rows, s.k.blocks(m), s.k.TPB, _nb(y), _nb(u), _nb(t), _nb(w), weights is not None, _nb(delta),
            _nb(rowloss), lcode, acode, bool(fused), dt.type(param), dt.type(alpha))
    _launch(s.k.kernels_for(dt.name).mean, 1, s.k.RED_T, _nb(rowloss), _flat(value))
    return value, delta


# --------------------------------------------------------------------------- guarded updates
def guard_step(guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None:
    """Decide whether this step may be applied and keep the tally (``GUARD_*`` layout, a float64
    device array): ``guard[1] += 1``; ``ok = guard[2] == 0 and isfinite(loss) and
    all(isfinite(grads))``; ``guard[0] = ok``; if ok ``guard[3] += weight * loss``, elif
    ``guard[2] == 0``: ``guard[2] = guard[1]`` (the first failing step, sticky).

    Two kernels, nothing read on the host: a scan of the gradients sets a cached device flag,
    then one thread updates the guard and clears the flag."""
    s = _get()
    n = _size(grads)
    flag = _scratch("guard_flag", (1,), np.int32, zero=True)
    if n:
        _launch(s.k.guard_scan, s.k.blocks(n), s.k.TPB, _flat(grads), _nb(guard), _nb(flag))
    _launch(s.k.guard_update, 1, 1, _nb(guard), _flat(loss), _nb(flag), float(weight))


def add_sum_of_squares(total: Array, a: Array) -> None:
    """``total[0] += sum_ij a_ij^2``, summed in float64 into the float64 ``(1,)`` device array
    ``total`` (an L2 penalty kept on the device over many steps), no host read: per-block sums
    into a cached scratch vector, then one block adds them to ``total`` (in a fixed order)."""
    if np.dtype(total.dtype) != np.float64 or tuple(total.shape) != (1,):
        raise ValueError(f"total must be a float64 array of shape (1,), got {total.dtype} {tuple(total.shape)}")
    s = _get()
    n = _size(a)
    if n == 0:
        return
    if not _c_contiguous(a):
        a = as_array(a, a.dtype)
    nblocks = s.k.blocks(n, s.k.RED_T)
    partial = _scratch("squares", (nblocks,), np.float64)
    _launch(s.k.sum_squares, nblocks, s.k.RED_T, _flat(a), _nb(partial))
    _launch(s.k.add_to_total, 1, s.k.RED_T, _nb(partial), _nb(total))


def _guard(guard: Array | None) -> Any:
    return _nb(_always() if guard is None else guard)


def _probe_or_update(kernel: str, probe: bool, guard: Array | None) -> tuple[Any, Any]:
    """The kernel to launch (the update, or its ``_probe`` twin) and the guard to give it."""
    if probe and guard is None:
        raise ValueError("probe=True needs the step's guard")
    s = _get()
    return getattr(s.k, f"{kernel}_probe" if probe else kernel), _guard(guard)


def sgd_update(p: Array, g: Array, lr: float, weight_decay: float = 0.0, guard: Array | None = None,
               probe: bool = False) -> None:
    """Plain SGD, in place, one fused kernel: ``p <- p - eta (g + lambda p)``; the kernel does
    nothing when ``guard`` is given and ``guard[0] != 1`` (read on the device); ``probe``: its twin
    computes the result and only fails the step in ``guard`` if an element would not be finite."""
    s = _get()
    dt = np.dtype(p.dtype).type
    n = _size(p)
    kernel, gd = _probe_or_update("sgd", probe, guard)
    if n:
        _launch(kernel, s.k.blocks(n), s.k.TPB, _flat(p), _flat(g), dt(lr), dt(weight_decay), gd)


def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused kernel: ``g' = g + lambda p``,
    ``v <- mu v + g'``, ``p <- p - eta v`` (Nesterov: ``p <- p - eta (g' + mu v)``); ``p`` and
    ``v`` untouched when ``guard`` is given and ``guard[0] != 1`` (read on the device); ``probe``
    as in :func:`sgd_update`."""
    s = _get()
    dt = np.dtype(p.dtype).type
    n = _size(p)
    kernel, gd = _probe_or_update("momentum", probe, guard)
    if n:
        _launch(kernel, s.k.blocks(n), s.k.TPB, _flat(p), _flat(g), _flat(v), dt(lr), dt(momentum),
                bool(nesterov), dt(weight_decay), gd)


def adam_corrections(count: Array, lr: float, beta1: float, beta2: float, out: Array) -> None:
    """Adam's bias corrections for the coming step on the device, one single-thread kernel, no host
    read: ``t = count[0] + 1`` (float64 ``(1,)``, unchanged), ``out[0] = lr / (1 - beta1^t)``,
    ``out[1] = 1 - beta2^t``, in float64 rounded to ``out``'s dtype."""
    s = _get()
    _launch(s.k.adam_corrections, 1, 1, _nb(count), _nb(out), float(lr), float(beta1), float(beta2))


def count_step(count: Array, guard: Array | None = None) -> None:
    """``count[0] += 1`` on the device unless ``guard[0] != 1`` (one single-thread kernel)."""
    s = _get()
    _launch(s.k.count_step, 1, 1, _nb(count), _guard(guard))


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: Any, weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """Adam with bias corrections, in place, one fused kernel: ``m <- b1 m + (1-b1) g'``,
    ``v <- b2 v + (1-b2) g'^2``, ``p <- p - eta m_hat / (sqrt(v_hat) + eps)`` with
    ``g' = g + lambda p`` and corrections ``1 - b^step``: ``step`` an int (corrections from the host)
    or the corrections array of :func:`adam_corrections` (read on the device, ``lr`` unused); ``p``,
    ``m``, ``v`` untouched when ``guard`` is given and ``guard[0] != 1`` (read on the device);
    ``probe`` as in :func:`sgd_update`."""
    s = _get()
    dt = np.dtype(p.dtype).type
    n = _size(p)
    host_step = isinstance(step, (int, np.integer))
    kernel, gd = _probe_or_update("adam" if host_step else "adam_dev", probe, guard)
    if not n:
        return
    if host_step:
        c1 = 1.0 - beta1**step
        c2 = 1.0 - beta2**step
        _launch(kernel, s.k.blocks(n), s.k.TPB, _flat(p), _flat(g), _flat(m), _flat(v), dt(lr / c1), dt(c2),
                dt(beta1), dt(beta2), dt(1.0 - beta1), dt(1.0 - beta2), dt(eps), dt(weight_decay), gd)
    else:
        _launch(kernel, s.k.blocks(n), s.k.TPB, _flat(p), _flat(g), _flat(m), _flat(v), _nb(step),
                dt(beta1), dt(beta2), dt(1.0 - beta1), dt(1.0 - beta2), dt(eps), dt(weight_decay), gd)
