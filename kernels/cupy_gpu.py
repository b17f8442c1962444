"""CuPy backend: cuBLAS GEMMs plus one fused kernel per step, on an NVIDIA GPU.

* Forward: ``u = x W^T`` by cuBLAS, then one kernel adds the bias and applies ``f`` in place
  (``u`` is kept only when asked: GELU, SiLU, the output layer). Softmax is one row kernel.
* Backward: ``delta W`` by cuBLAS, then one kernel multiplies by the slope, read from ``y``
  (``phi(y)``) or, for GELU and SiLU, from ``u``.
* Plain SGD: ``W <- (1 - eta lambda) W - eta delta^T x_prev`` is a single GEMM written straight
  into ``W`` (``alpha = -eta``, ``beta = 1 - eta lambda``); ``b <- b - eta delta^T 1`` a single
  GEMV. No gradient buffer, no separate update kernel.
* Momentum and Adam: one fused in-place elementwise kernel per parameter array.
* Output error: the loss value and the output delta in two kernels (the delta and per-block
  partial sums, then their sum), numerically stable: log-sum-exp with a row max for softmax +
  cross-entropy, the softplus form for sigmoid + BCE from the logits. Deterministic: no atomics.
* :func:`capture_train_step` replays a whole training step as a CUDA graph (see
  :mod:`backprop.kernels.cupy_graph`); :func:`set_tf32` lets float32 GEMMs use TF32 tensor cores.

The CUDA sources live in :mod:`backprop.kernels.cupy_sources` (importable without CuPy). Importing
this module never fails for want of CuPy or a GPU: :func:`is_available` says why it cannot run.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from . import cupy_sources as src
from .spec import ACTIVATIONS

try:  # CuPy imports fine without a GPU; only its CUDA calls fail there
    import cupy as _cupy
except Exception as _exc:  # ImportError, or a broken CUDA installation  # pragma: no cover - depends on machine
    _cupy = None
    _IMPORT_ERROR: str = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = ""

NAME = "cupy"
IS_GPU = True
Array = Any

#: The array module of this backend (``None`` when CuPy is not installed).
xp = _cupy

#: Relative error of a float32 GEMM in TF32 mode (inputs rounded to a 10-bit mantissa), in the
#: Frobenius norm, for well-scaled data: about 1e-3 (against about 1e-6 in full float32).
TF32_RTOL = 2e-3

_lock = threading.Lock()
_reason: str | None = None
_tf32 = False


# --------------------------------------------------------------------------- availability
def _probe() -> str:
    if _cupy is None:
        return (f"CuPy is not installed ({_IMPORT_ERROR}); install the CUDA extra, "
                "pip install 'backprop[cuda12]' or 'backprop[cuda13]'")
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


# --------------------------------------------------------------------------- TF32
def set_tf32(enabled: bool) -> None:
    """Let float32 GEMMs use TF32 tensor cores (Ampere and newer), or not (the default).

    TF32 rounds the GEMM inputs to a 10-bit mantissa and accumulates in float32: several times
    faster on large layers, at a relative error of about 1e-3 per GEMM (``TF32_RTOL``) instead of
    about 1e-6. Float64 is unaffected, and so are the elementwise kernels. The setting is read when
    a GEMM is issued (a captured CUDA graph keeps the mode it was captured with; the graph cache
    is keyed by it). ``NVIDIA_TF32_OVERRIDE=0`` in the environment disables TF32 whatever this says.
    """
    global _tf32
    _tf32 = bool(enabled)


def tf32_enabled() -> bool:
    return _tf32


# --------------------------------------------------------------------------- cuBLAS
def _check_pair(a: Array, b: Array) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {a.dtype} and {b.dtype}")


def _gemm(transa: str, transb: str, a: Array, b: Array, out: Array, alpha: float = 1.0, beta: float = 0.0) -> Array:
    """``out = alpha op(a) op(b) + beta out`` by cuBLAS, written into ``out`` (C-contiguous)."""
    _check_pair(a, b)
    if out.size == 0:
        return out
    k = a.shape[0] if transa == "T" else a.shape[1]
    if k == 0:  # an empty sum: cuBLAS would reject the leading dimensions
        if beta == 0.0:
            out.fill(0)
        elif beta != 1.0:
            out *= beta
        return out
    import cupy.cublas

    if _tf32 and out.dtype == np.float32:
        from cupy_backends.cuda.libs import cublas

        handle = _cupy.cuda.device.get_cublas_handle()
        mode = cublas.getMathMode(handle)
        cublas.setMathMode(handle, cublas.CUBLAS_TF32_TENSOR_OP_MATH)
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
    """``out = alpha delta^T 1 + beta out``: the sum over the batch, fused with the update."""
    if out.size == 0:
        return out
    if delta.shape[0] == 0:
        if beta == 0.0:
            out.fill(0)
        elif beta != 1.0:
            out *= beta
        return out
    import cupy.cublas

    cupy.cublas.gemv("T", alpha, _contiguous(delta), _ones(delta.shape[0], delta.dtype), beta, out)
    return out


def _contiguous(a: Array) -> Array:
    return a if a.flags.c_contiguous else _cupy.ascontiguousarray(a)


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
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False
) -> tuple[Array, Array | None]:
    """``u = x W^T + b``, ``y = f(u)``: one GEMM and one fused kernel. Returns ``(y, u if keep_u else None)``."""
    _check_act(act)
    batch, n_out = x.shape[0], W.shape[0]
    u = _cupy.empty((batch, n_out), dtype=W.dtype)
    _gemm("N", "T", x, W, u)
    if u.size == 0:  # nothing to activate
        return (u.copy() if keep_u else u), (u if keep_u else None)
    if act == "softmax":
        y = _cupy.empty_like(u) if keep_u else u
        grid = (batch + src.ROWS_PER_BLOCK - 1) // src.ROWS_PER_BLOCK
        _raw("bp_softmax_forward", u.dtype)(
            (grid,), (src.BLOCK,), (u, _contiguous(b), y, np.int64(batch), np.int64(n_out)))
        return y, (u if keep_u else None)
    a = _scalar(alpha, u.dtype)
    if keep_u:
        y = _cupy.empty_like(u)
        _ew(f"bp_fwd_keep_{act}")(b, a, u, y)
        return y, u
    _ew(f"bp_fwd_{act}")(b, a, u)
    return u, None


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0
) -> Array:
    """``delta^{l-1} = (delta W) * phi(y_prev)``: one GEMM and one fused kernel (none for identity)."""
    _check_act(act_prev)
    if act_prev not in src.ACT_SLOPE:
        raise ValueError(f"activation {act_prev!r} has no elementwise slope")
    var, _ = src.ACT_SLOPE[act_prev]
    if var == "u" and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = _cupy.empty((delta.shape[0], W.shape[1]), dtype=W.dtype)
    _gemm("N", "N", delta, W, g)
    if act_prev != "identity" and g.size:
        _ew(f"bp_slope_{act_prev}")(u_prev if var == "u" else y_prev, _scalar(alpha_prev, g.dtype), g)
    return g


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """``dE/dW = delta^T x_prev`` (GEMM) and ``dE/db = delta^T 1`` (GEMV), into ``dW``/``db`` when given."""
    if dW is None:
        dW = _cupy.empty((delta.shape[1], x_prev.shape[1]), dtype=delta.dtype)
    if db is None:
        db = _cupy.empty((delta.shape[1],), dtype=delta.dtype)
    _gemm("T", "N", delta, x_prev, dW)
    _bias_gemv(delta, db, 1.0, 0.0)
    return dW, db


def sgd_update_from_delta(
    W: Array, b: Array, delta: Array, x_prev: Array, lr: float, weight_decay: float = 0.0
) -> None:
    """``W <- (1 - eta lambda) W - eta delta^T x_prev`` as one GEMM into ``W``; ``b <- b - eta delta^T 1``
    as one GEMV into ``b``."""
    _gemm("T", "N", delta, x_prev, W, alpha=-lr, beta=1.0 - lr * weight_decay)
    _bias_gemv(delta, b, -lr, 1.0)


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0
) -> tuple[Array, Array]:
    """The mean loss (a 0-d array) and ``delta^L``, in two kernels (see the module docstring)."""
    dtype = y.dtype
    batch = y.shape[0]
    delta = _cupy.empty_like(y)
    value = _cupy.empty((), dtype=dtype)
    y, t = _contiguous(y), _contiguous(t)
    if loss == "cross_entropy":
        if u is None:
            raise ValueError("cross_entropy needs the output logits u")
        u = _contiguous(u)
        rows, cols = y.shape
        rowloss = _cupy.empty((rows,), dtype=dtype)
        grid = (rows + src.ROWS_PER_BLOCK - 1) // src.ROWS_PER_BLOCK
        if rows:
            _raw("bp_softmax_xent", dtype)(
                (grid,), (src.BLOCK,),
                (y, u, t, delta, rowloss, np.int64(rows), np.int64(cols), _scalar(batch, dtype)))
        _raw("bp_sum_scale", dtype)((1,), (src.BLOCK,), (rowloss, np.int64(rows), _scalar(batch, dtype), value))
        return value, delta
    if loss not in src.LOSS_BODY:
        raise ValueError(f"unknown loss {loss!r}")
    if (output, loss) not in _LOSS_PAIRS:
        raise ValueError(f"output {output!r} does not go with loss {loss!r}")
    needs_u = loss == "bce" or src.ACT_SLOPE[output][0] == "u"
    if needs_u and u is None:
        raise ValueError(f"{output} + {loss} needs the output pre-activation u")
    u = _contiguous(u) if u is not None else y  # not read when not needed
    n = y.size
    blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_LOSS_BLOCKS))
    partial = _cupy.empty((blocks,), dtype=dtype)
    _raw(src.loss_kernel_name(output, loss), dtype)(
        (blocks,), (src.BLOCK,),
        (y, u, t, delta, partial, np.int64(n), _scalar(batch, dtype), _scalar(param, dtype), _scalar(alpha, dtype)))
    _raw("bp_sum_scale", dtype)((1,), (src.BLOCK,), (partial, np.int64(blocks), _scalar(batch, dtype), value))
    return value, delta


# --------------------------------------------------------------------------- optimizers
def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused kernel: ``v <- mu v + g'``, ``p <- p - eta v``
    (Nesterov: ``p <- p - eta (g' + mu v)``), ``g' = g + lambda p``."""
    d = p.dtype
    _ew("bp_momentum")(g, _scalar(lr, d), _scalar(momentum, d), _scalar(weight_decay, d), np.int32(bool(nesterov)),
                       p, v)


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: int, weight_decay: float = 0.0,
) -> None:
    """Adam, in place, one fused kernel; bias corrections ``1 - beta^step`` computed on the host."""
    d = p.dtype
    c1 = 1 - beta1**step
    c2 = 1 - beta2**step
    _ew("bp_adam")(g, _scalar(lr / c1, d), _scalar(beta1, d), _scalar(beta2, d), _scalar(1 - beta1, d),
                   _scalar(1 - beta2, d), _scalar(c2, d), _scalar(eps, d), _scalar(weight_decay, d), p, m, v)


# --------------------------------------------------------------------------- CUDA graphs
def capture_train_step(net: Any, x: Array, t: Array, optimizer: Any) -> float:
    """One training step of ``net`` replayed from a CUDA graph (``net.train_step(..., graph=True)``).

    See :func:`backprop.kernels.cupy_graph.capture_train_step`.
    """
    from .cupy_graph import capture_train_step as _capture

    return _capture(net, x, t, optimizer)


def flop_count(sizes: list[int], batch: int) -> int:
    """Floating-point operations of the GEMMs of one training step (forward, backward, weight update)."""
    pairs = [n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    return 2 * batch * (3 * sum(pairs) - pairs[0])


__all__ = [
    "IS_GPU",
    "NAME",
    "TF32_RTOL",
    "adam_update",
    "all_finite",
    "capture_train_step",
    "delta_backward",
    "flop_count",
    "is_available",
    "layer_forward",
    "momentum_update",
    "output_error",
    "set_tf32",
    "sgd_update_from_delta",
    "synchronize",
    "tf32_enabled",
    "to_device",
    "to_host",
    "unavailable_reason",
    "weight_gradients",
    "xp",
    "zeros",
]
