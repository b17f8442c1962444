"""numba-cuda backend: ``@cuda.jit`` kernels for the fused parts, cuBLAS (through CuPy) for GEMMs.

What runs where:

* **fused kernels** (always Numba, :mod:`backprop.kernels.numba_cuda_kernels`): bias +
  activation epilogue (softmax one thread per row), ``(delta W) * phi(y)`` epilogue, bias
  gradient column reduction, output error and loss (loss reduced on the device, one value per
  row then a one-block mean), and the fused SGD/momentum/Adam updates;
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
arrays' dtype); float64 works too.
"""

from __future__ import annotations

import os
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from . import numba_math as nm

NAME = "numba-cuda"
IS_GPU = True
Array = Any

_state: SimpleNamespace | None = None
_reason = ""


# --------------------------------------------------------------------------- availability
def _numba_cuda() -> ModuleType:
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
        _reason = f"numba-cuda is not installed ({exc}); pip install 'backprop[cuda12]'"
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
        _state = SimpleNamespace(cuda=cuda, k=kern, cupy=_cupy_if_usable(), streams={})
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
    host = np.ascontiguousarray(a, dtype=dtype)
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


def _nb(a: Array) -> Any:
    """A Numba view of ``a`` for a kernel launch: CuPy arrays are wrapped zero-copy (no stream
    sync, see the module docstring); Numba device arrays pass as they are."""
    if hasattr(a, "copy_to_host") or isinstance(a, np.ndarray):
        return a  # a host array works too: Numba copies it over and back around the launch
    return _get().cuda.as_cuda_array(a, sync=False)


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


# --------------------------------------------------------------------------- GEMMs
def _matmul(a: Array, b: Array, ta: bool, tb: bool, out: Array | None = None, alpha: float = 1.0,
            beta: float | None = None) -> Array:
    """``out = op(a) op(b)``, or ``out = alpha op(a) op(b) + beta out`` when ``beta`` is given.

    With CuPy: ``cupy.matmul`` (cuBLAS), and for the ``beta`` form the fused ``scale_add``
    kernel on its result. Otherwise the tiled shared-memory kernel does both forms in one
    launch (it reads ``out`` only for the ``beta`` form)."""
    s = _get()
    dt = np.dtype(a.dtype)
    if s.cupy is not None:
        A, B = (a.T if ta else a), (b.T if tb else b)
        if beta is None:
            return s.cupy.matmul(A, B, out=out)
        prod = s.cupy.matmul(A, B)
        _launch(s.k.scale_add, s.k.blocks(prod.size), s.k.TPB, _flat(out), _flat(prod), dt.type(beta),
                dt.type(alpha))
        return out
    M = a.shape[1] if ta else a.shape[0]
    N = b.shape[0] if tb else b.shape[1]
    if out is None:
        out = _empty((M, N), dt)
    if M and N:
        T = s.k.TILE
        grid = ((N + T - 1) // T, (M + T - 1) // T)
        _launch(s.k.kernels_for(dt.name).gemm, grid, (T, T), _nb(a), _nb(b), _nb(out), bool(ta), bool(tb),
                dt.type(alpha), dt.type(0.0 if beta is None else beta), beta is not None)
    return out


def _zero_fill(out: Array) -> Array:
    if hasattr(out, "copy_to_device"):
        out.copy_to_device(np.zeros(out.shape, dtype=out.dtype))
    else:
        out.fill(0)
    return out


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False
) -> tuple[Array, Array | None]:
    """``u = x W^T`` (GEMM), then the bias + activation epilogue; ``(y, u if keep_u)``."""
    s = _get()
    code = nm.act_code(act)
    dt = np.dtype(W.dtype)
    u = _matmul(x, W, False, True)
    y = _empty(u.shape, dt) if keep_u else u
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
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0
) -> Array:
    """``g = delta W`` (GEMM), then ``g *= phi(y_prev)`` in place (the epilogue kernel)."""
    s = _get()
    code = nm.act_code(act_prev)
    if code == nm.SOFTMAX:
        raise ValueError("activation 'softmax' has no elementwise slope")
    if code in nm.NEEDS_U and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = _matmul(delta, W, False, False)
    m, n = g.shape
    if m and n and code != nm.IDENTITY:
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


def sgd_update_from_delta(
    W: Array, b: Array, delta: Array, x_prev: Array, lr: float, weight_decay: float = 0.0
) -> None:
    """``W <- (1 - eta lambda) W - eta delta^T x_prev`` (one GEMM with beta on the Numba path;
    cuBLAS then the fused axpby kernel with CuPy), ``b <- b - eta sum delta`` (reduction kernel)."""
    decay = 1.0 - lr * weight_decay if weight_decay else 1.0
    _matmul(delta, x_prev, True, False, out=W, alpha=-lr, beta=decay)
    _bias_grad(delta, b, -lr, True)


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0
) -> tuple[Array, Array]:
    """Mean loss (a 0-d device array of ``y``'s dtype) and ``delta = dE/du``; the loss is reduced
    on the device (per-row losses, then a one-block mean)."""
    s = _get()
    lcode, acode = nm.output_loss_codes(output, loss, u is not None)
    if u is None:
        u = y
    dt = np.dtype(y.dtype)
    m, n = y.shape
    delta = _empty((m, n), dt)
    rowloss = _empty((max(m, 1),), dt)
    out = _empty((1,), dt)
    if m == 0:
        return zeros((), dt), delta
    _launch(s.k.loss_rows, s.k.blocks(m), s.k.TPB, _nb(y), _nb(u), _nb(t), _nb(delta), _nb(rowloss), lcode,
            acode, dt.type(param), dt.type(alpha))
    _launch(s.k.kernels_for(dt.name).mean, 1, s.k.RED_T, _nb(rowloss), _nb(out))
    return out.reshape(()), delta


# --------------------------------------------------------------------------- optimizers
def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused kernel."""
    s = _get()
    dt = np.dtype(p.dtype).type
    n = _size(p)
    if n:
        _launch(s.k.momentum, s.k.blocks(n), s.k.TPB, _flat(p), _flat(g), _flat(v), dt(lr), dt(momentum),
                bool(nesterov), dt(weight_decay))


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: int, weight_decay: float = 0.0,
) -> None:
    """Adam with bias corrections, in place, one fused kernel."""
    s = _get()
    dt = np.dtype(p.dtype).type
    n = _size(p)
    c1 = 1.0 - beta1**step
    c2 = 1.0 - beta2**step
    if n:
        _launch(s.k.adam, s.k.blocks(n), s.k.TPB, _flat(p), _flat(g), _flat(m), _flat(v), dt(lr / c1), dt(c2),
                dt(beta1), dt(beta2), dt(eps), dt(weight_decay))
