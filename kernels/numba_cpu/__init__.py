"""Numba CPU backend: NumPy's BLAS for the GEMMs, fused Numba kernels for everything around them.

Every GEMM stays with the BLAS that NumPy links (``np.matmul``, into ``out=`` buffers where that
saves an allocation); Numba fuses what NumPy does in several passes with temporaries:

* ``layer_forward``: ``u = x W^T`` (BLAS), then bias + activation in one pass over ``u``, in
  place when ``u`` is not kept (softmax row by row, max subtracted, in the same pass);
* ``delta_backward``: ``g = delta W`` (BLAS), then ``g *= phi(y_prev)`` in place, one pass;
* ``weight_gradients``: ``delta^T x`` (BLAS, into ``dW``) and the bias gradient as one column
  reduction;
* ``output_error``: loss value and ``delta`` in one kernel (softmax + cross-entropy through
  log-sum-exp of the logits, sigmoid + BCE from the logits);
* ``guard_step``: the finiteness scan of the gradients and the guard's bookkeeping, one kernel;
  ``add_sum_of_squares``: one float64 reduction;
* ``sgd_update`` / ``momentum_update`` / ``adam_update``: one fused pass each (skipped, without
  touching any state, when the guard says the step is not to be applied);
* ``one_hot``, ``gather_rows``: one pass each; ``array_stats`` is the reference's (NumPy reductions).

With the keyword buffers of the contract (``y=``, ``u=``, ``out=``, ``delta=``, ``value=``,
``dW=``, ``db=``) a training step allocates no array: the GEMMs write into them (``out=``) and
the kernels work in place.

Kernels are ``@njit(parallel=True, nogil=True, fastmath=False, cache=True, error_model="numpy")``; the
activation and the loss are integer codes dispatched inside each kernel
(:mod:`backprop.kernels.numba_math`), so the backend compiles one kernel per primitive and
dtype, not one per activation (under a minute for both dtypes on a cold cache, then loaded
from ``__pycache__`` in well under a second).
Within a kernel each activation and loss has a loop of its own, so that LLVM vectorizes it; the loops
and the ladder that picks one are generated from the registry's scalar forms
(:mod:`backprop.kernels.registry`, :func:`backprop.kernels.numba_math.dispatch`).

float32 stays float32: constants are made with the arrays' dtype, scalars are cast to it before
a kernel is called, and ``exp``, ``tanh``, ``expm1`` and ``log1p`` of a float32 are float32
polynomial versions (a few ulp) that vectorize, where libm's would be one call per element;
``erf`` (GELU) is libm's. float64 uses libm throughout.

Threads: a kernel runs on ``min(numba.get_num_threads(), elements // PARALLEL_GRAIN)`` threads
(see :data:`PARALLEL_GRAIN`): the passes of typical layers stay on the calling thread,
where a thread pool would only wait on NumPy's spinning BLAS threads; passes over tens of
million elements use the cores that ``numba.get_num_threads()`` allows (all by default).

Python threads: the kernels release the GIL (``nogil=True``), as NumPy's BLAS does, so threads running
passes on different networks or batches run at once. Numba's ``workqueue`` threading layer (the fallback where
neither TBB nor OpenMP is found) cannot run parallel kernels from two threads at once (it aborts the process):
under it, kernel calls take one lock and run one at a time.

The package: :mod:`~backprop.kernels.numba_cpu.float32_math` (the float32 ``exp``, ``tanh``, ``expm1`` and
``log1p``), :mod:`~backprop.kernels.numba_cpu.rows` (the compiled scalar forms, the row loops and the ladders on
the codes), :mod:`~backprop.kernels.numba_cpu.compiled` (the kernels) and :mod:`~backprop.kernels.numba_cpu.notice`
(the first-compile notice). This module holds the primitives of the contract and how they call the kernels: the
thread count (:data:`PARALLEL_GRAIN`) and the lock of the ``workqueue`` layer.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from numba import get_num_threads, set_num_threads

from .. import numba_math as nm
# arrays are NumPy arrays: these primitives are the reference's (array_stats: NumPy's min and max decide
# finiteness in two vectorised passes, faster than a Numba pass that also switches the thread count)
from ..contract import Capabilities, check_weights
from ..numpy_ref import (  # noqa: F401
    adam_corrections, array_stats, copy_into, count_correct, count_step, fail_step, probing, synchronize, to_device,
    to_host, zeros,
)
from .compiled import (  # noqa: F401 - KERNELS and FLOAT64_KERNELS: the tests and the warm-up read them here
    FLOAT64_KERNELS, KERNELS, _adam, _adam_probe, _add_sum_of_squares, _all_finite, _bias_act, _colsum, _gather_rows,
    _guard_step, _momentum, _momentum_probe, _one_hot, _output_error, _sgd, _sgd_probe, _slope_mul,
)
from .fused_mlp import (  # noqa: F401
    fused_mlp_enabled, fused_mlp_path, fused_mlp_reason, mlp_backward, mlp_forward, mlp_forward_error, set_fused_mlp,
)
from .notice import COMPILE_NOTICE  # noqa: F401

NAME = "numba"
CAPABILITIES = Capabilities(fused_mlp=True)
Array = Any

#: Array module of this backend's arrays: they are plain NumPy arrays.
xp = np

#: Elements of work per thread: a kernel over ``n`` elements runs on
#: ``min(numba.get_num_threads(), n // PARALLEL_GRAIN)`` threads, at least one. A fused pass over
#: a million float32 takes a fraction of a millisecond on one core, and waking a thread pool
#: right after a BLAS call costs more than that whenever the cores are busy: NumPy's BLAS leaves
#: its threads spinning after each GEMM, and on a loaded machine a parallel region waits for a
#: scheduler time slice (milliseconds) at its barrier. Measured on a 2-core machine with
#: OpenBLAS: the SGD update of a 1825 x 1825 layer (3.3 million elements) on two threads made the
#: training step of a net with N = 1e7 take 133 ms against 76 ms on one thread (numpy: 79 ms). So
#: only passes over tens of millions of elements go parallel. Set ``BACKPROP_NUMBA_GRAIN``
#: (elements) or this attribute to change it; ``numba.set_num_threads`` still caps the thread count.
PARALLEL_GRAIN = int(os.environ.get("BACKPROP_NUMBA_GRAIN", 1 << 24))


def _load_compiled_blas() -> None:
    """Load the BLAS that Numba's compiled linear algebra calls (SciPy's) with the backend instead of at the
    first kernel call, so that a thread limit applied when the backend loads covers it too."""
    try:
        from numba.np.linalg import ensure_blas

        ensure_blas()
    except Exception:  # noqa: BLE001 - no SciPy: the kernels never call it either
        pass


_load_compiled_blas()


# --------------------------------------------------------------------------- housekeeping
def is_available() -> bool:
    """True: importing this module already needed Numba."""
    return True


def unavailable_reason() -> str:
    return ""


def is_simulated() -> bool:
    return False


def all_finite(a: Array) -> bool:
    flat = np.ascontiguousarray(a).reshape(-1)
    return bool(_run(_all_finite, flat.size, flat)) if flat.size else True


# --------------------------------------------------------------------------- calling kernels
def _thread_count_functions() -> tuple[Any, Any]:
    """``(get, set)`` for Numba's thread count. The public functions validate and make sure the
    pool is started on every call (about 1 us each, twice per kernel call); once the pool is
    started, the unchecked functions they call are 5x faster. Falls back to the public ones.
    Also sets :data:`_one_at_a_time` for the threading layer the pool started on."""
    global _one_at_a_time
    get_num_threads()  # starts the thread pool
    _one_at_a_time = threading.Lock() if _layer_is_serial() else None
    try:
        from numba.np.ufunc.parallel import _get_num_threads, _set_num_threads

        if _get_num_threads() == get_num_threads():
            return _get_num_threads, _set_num_threads
    except ImportError:  # pragma: no cover - another Numba layout
        pass
    return get_num_threads, set_num_threads  # pragma: no cover


def _layer_is_serial() -> bool:
    """True under Numba's ``workqueue`` threading layer, which aborts when two threads run parallel kernels."""
    try:
        from numba import threading_layer

        return bool(threading_layer() == "workqueue")
    except (ImportError, ValueError):  # pragma: no cover - no layer reported: assume the unsafe one
        return True


_get_threads: Any = None
_set_threads: Any = None
#: A lock every kernel call takes under the ``workqueue`` threading layer; ``None`` under TBB and OpenMP.
_one_at_a_time: threading.Lock | None = None


def _thread_limit() -> int:
    """Numba's thread count in force for the calling thread."""
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    return int(_get_threads())


def _threads(work: int) -> int:
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    return min(_get_threads(), max(1, work // PARALLEL_GRAIN))


def _run(kernel: Any, work: int, *args: Any) -> Any:
    """``kernel(*args)`` on as many threads as ``work`` elements justify (see
    :data:`PARALLEL_GRAIN`), at most the caller's ``numba.get_num_threads()``; its result."""
    global _get_threads, _set_threads
    if _get_threads is None:
        _get_threads, _set_threads = _thread_count_functions()
    if _one_at_a_time is not None:
        with _one_at_a_time:
            return _sized(kernel, work, args)
    return _sized(kernel, work, args)


def _sized(kernel: Any, work: int, args: tuple[Any, ...]) -> Any:
    """``kernel(*args)`` on the threads ``work`` justifies (:func:`_run`)."""
    cur = _get_threads()
    want = min(cur, max(1, work // PARALLEL_GRAIN))
    if want == cur:
        return kernel(*args)
    _set_threads(want)
    try:
        return kernel(*args)
    finally:
        _set_threads(cur)


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array (in-place updates need a view, not a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("in-place updates need C-contiguous arrays (make them with to_device/zeros)")
    return a.reshape(-1)


def _skipped(guard: Array | None) -> bool:
    """True when a guard says this step must not be applied (the guard is a host array here)."""
    return guard is not None and guard[0] != 1.0


def _verdict(guard: Array, bad: int) -> None:
    """A probe's verdict on the (host) guard: the step fails when ``bad`` results were not finite."""
    if bad:
        fail_step(guard)


# --------------------------------------------------------------------------- arrays
def owns(a: Any) -> bool:
    """True for NumPy arrays, the arrays of this backend."""
    return isinstance(a, np.ndarray)


def as_array(a: Array, dtype: Any) -> Array:
    """``a`` as a C-contiguous array of ``dtype``: ``a`` itself when it already is one, else a copy."""
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous:
        return a
    return np.asarray(a, dtype=dtype, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d


def one_hot(labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
    """Rows ``e_{labels[i]}`` of length ``n_classes`` (labels whole numbers in ``[0, n_classes)``,
    any numeric dtype), into ``out`` when given."""
    if out is None:
        out = np.empty((labels.shape[0], n_classes), dtype=dtype)
    _run(_one_hot, out.size, labels.reshape(-1), out)
    return out


def gather_rows(src: Array, idx: Array, out: Array) -> Array:
    """``out[i] = src[idx[i]]``: the rows of a minibatch, picked by an int64 index array; one pass."""
    rows = src.shape[0]
    s2 = src.reshape(rows, -1) if src.ndim != 2 else src
    o2 = out.reshape(out.shape[0], -1) if out.ndim != 2 else out
    if _run(_gather_rows, o2.size, s2, idx, o2):
        raise IndexError(f"gather_rows: an index is out of range for {rows} rows")
    return out


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
    y: Array | None = None, u: Array | None = None,
) -> tuple[Array, Array | None]:
    """``u = x W^T`` by BLAS, then ``y = f(u + b)`` in one fused pass; ``(y, u if keep_u)``.

    Without ``keep_u`` the GEMM writes into ``y`` (when given) and the epilogue works in place;
    with it the GEMM writes into ``u`` and the activation into ``y`` (each when given)."""
    code = nm.act_code(act)
    dt = W.dtype
    shape = (x.shape[0], W.shape[0])
    if keep_u:
        if u is None:
            u = np.empty(shape, dtype=dt)
        if y is None:
            y = np.empty(shape, dtype=dt)
        np.matmul(x, W.T, out=u)
        _run(_bias_act, u.size, u, _c(b), y, code, dt.type(alpha), True)
        return y, u
    if y is None:
        y = np.empty(shape, dtype=dt)
    np.matmul(x, W.T, out=y)
    _run(_bias_act, y.size, y, _c(b), y, code, dt.type(alpha), False)
    return y, None


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0, *,
    out: Array | None = None,
) -> Array:
    """``g = delta W`` by BLAS (into ``out`` when given), then ``g *= phi(y_prev)`` in place (one pass)."""
    code = nm.act_code(act_prev)
    if code == nm.SOFTMAX:
        raise ValueError("activation 'softmax' has no elementwise slope")
    if code in nm.NEEDS_U and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = np.matmul(delta, W) if out is None else np.matmul(delta, W, out=out)
    if code not in nm.LINEAR:
        y_prev = _c(y_prev)
        u_prev = y_prev if u_prev is None else _c(u_prev)
        _run(_slope_mul, g.size, g, y_prev, u_prev, code, g.dtype.type(alpha_prev))
    return g


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """``dW = delta^T x_prev`` (BLAS, written into ``dW`` when given), ``db`` = column sums of delta."""
    delta = _c(delta)
    if dW is None:
        dW = np.matmul(delta.T, x_prev)
    else:
        np.matmul(delta.T, x_prev, out=dW)
    if db is None:
        db = np.empty(delta.shape[1], dtype=delta.dtype)
    nt = _threads(delta.size)
    _run(_colsum, delta.size, delta, db, delta.dtype.type(1), False, nt)
    return dW, db


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array | None, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0, *,
    delta: Array | None = None, value: Array | None = None, weights: Array | None = None,
) -> tuple[Array, Array]:
    """Mean loss ``E`` (a 0-d array of ``y``'s dtype) and ``delta = dE/du`` in one fused pass, into
    ``value`` and ``delta`` when given: ``delta = (y - t) / batch`` for the fused pairs,
    ``dL/dy * phi(y) / batch`` otherwise; with ``weights``, each row's loss and delta times its weight."""
    lcode, acode, fused = nm.output_loss_codes(output, loss, u is not None)
    y = _c(y)
    dt = y.dtype
    check_weights(weights, y.shape[0], dt)
    w = _no_weights(dt) if weights is None else _c(weights)
    if u is None:
        u = y
    u = np.ascontiguousarray(u, dtype=dt)
    t = np.ascontiguousarray(t, dtype=dt)
    if delta is None:
        delta = np.empty_like(y)
    if value is None:
        value = np.empty((), dtype=dt)
    _run(_output_error, y.size, y, u, t, w, weights is not None, delta, lcode, acode, fused, dt.type(param),
         dt.type(alpha), value.reshape(1))
    return value, delta


_NO_WEIGHTS: dict[np.dtype, np.ndarray] = {}


def _no_weights(dtype: np.dtype) -> np.ndarray:
    """The ``w`` argument of an unweighted ``_output_error`` (never read): one cached array per dtype, so that
    weighted and unweighted calls share the kernel's one signature per dtype. Keyed by the dtype itself: a
    lookup by ``dtype.str`` (which builds the string) took 0.3 us, a tenth of the Python side of the call."""
    w = _NO_WEIGHTS.get(dtype)
    if w is None:
        w = _NO_WEIGHTS[dtype] = np.ones(1, dtype=dtype)
    return w


# --------------------------------------------------------------------------- guarded updates
def guard_step(guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None:
    """Decide whether this step may be applied and keep the tally (``GUARD_*`` layout, float64):
    ``guard[1] += 1``; ``ok = guard[2] == 0 and isfinite(loss) and all(isfinite(grads))``;
    ``guard[0] = ok``; if ok ``guard[3] += weight * loss``, elif ``guard[2] == 0``:
    ``guard[2] = guard[1]`` (the first failing step, sticky). One kernel, no Python-side read."""
    _run(_guard_step, grads.size, guard, loss.reshape(1), _flat(grads), float(weight))


def add_sum_of_squares(total: Array, a: Array) -> None:
    """``total[0] += sum_ij a_ij^2``, summed in float64 into the float64 ``(1,)`` array ``total`` (an
    L2 penalty ``||W||^2`` kept on the backend over many steps); one pass."""
    if total.dtype != np.float64 or total.shape != (1,):
        raise ValueError(f"total must be a float64 array of shape (1,), got {total.dtype} {tuple(total.shape)}")
    flat = np.ascontiguousarray(a).reshape(-1)
    _run(_add_sum_of_squares, flat.size, total, flat, _threads(flat.size))


def sgd_update(p: Array, g: Array, lr: float, weight_decay: float = 0.0, guard: Array | None = None,
               probe: bool = False) -> None:
    """Plain SGD, in place, one fused pass: ``p <- p - eta (g + lambda p)`` (skipped when ``guard``
    is given and ``guard[0] != 1``; ``probe``: the same pass, writing only the guard's verdict)."""
    if _skipped(guard):
        return
    dt = p.dtype.type
    args = (_flat(p), _c(g).reshape(-1), dt(lr), dt(weight_decay))
    if probing(guard, probe):
        _verdict(guard, _run(_sgd_probe, p.size, *args))
    else:
        _run(_sgd, p.size, *args)


def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused pass: ``g' = g + lambda p``,
    ``v <- mu v + g'``, ``p <- p - eta v`` (Nesterov: ``p <- p - eta (g' + mu v)``); ``p`` and
    ``v`` untouched when ``guard`` is given and ``guard[0] != 1``."""
    if _skipped(guard):
        return
    dt = p.dtype.type
    args = (_flat(p), _c(g).reshape(-1), _flat(v), dt(lr), dt(momentum), bool(nesterov), dt(weight_decay))
    if probing(guard, probe):
        _verdict(guard, _run(_momentum_probe, p.size, *args))
    else:
        _run(_momentum, p.size, *args)


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: Any, weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """Adam with bias corrections, in place, one fused pass: ``m <- b1 m + (1-b1) g'``,
    ``v <- b2 v + (1-b2) g'^2``, ``p <- p - eta m_hat / (sqrt(v_hat) + eps)`` with
    ``g' = g + lambda p`` and corrections ``1 - b^step``; ``step`` an int, or the corrections array of
    :func:`adam_corrections` (``lr`` then unused); ``p``, ``m``, ``v`` untouched when ``guard`` is
    given and ``guard[0] != 1``."""
    if _skipped(guard):
        return
    dt = p.dtype.type
    if isinstance(step, (int, np.integer)):
        lr_c1, c2 = dt(lr / (1.0 - beta1**step)), dt(1.0 - beta2**step)
    else:
        lr_c1, c2 = dt(step[0]), dt(step[1])
    args = (_flat(p), _c(g).reshape(-1), _flat(m), _flat(v), lr_c1, c2, dt(beta1), dt(beta2), dt(1.0 - beta1),
            dt(1.0 - beta2), dt(eps), dt(weight_decay))
    if probing(guard, probe):
        _verdict(guard, _run(_adam_probe, p.size, *args))
    else:
        _run(_adam, p.size, *args)
