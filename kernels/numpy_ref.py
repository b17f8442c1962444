"""NumPy reference backend: the specification and the test oracle of every other backend.

Shapes follow the batch-major layout: a batch ``x`` is ``(batch, n_in)``, a weight matrix
``W`` is ``(n_out, n_in)`` as in the notes (``W^l`` is ``n_l x n_{l-1}``), a bias ``b`` is
``(n_out,)``. The notes' column-vector equation ``u^l = W^l x^{l-1} + b^l`` becomes, for a
batch of row vectors, ``u = x W^T + b``.

Sign convention: ``delta`` here is the gradient ``dE/du`` of the mean loss ``E`` (the notes
define ``delta = -dE/du``), so the updates read ``W <- W - eta delta^T x`` where the notes
write ``W <- W + eta delta x^T``.

Every function is written against the array module of its inputs, so the same code runs on
CuPy arrays. Each works in place with ufunc ``out=`` arguments: given the output buffers of
the contract (:mod:`backprop.kernels.contract`), a training step allocates nothing, since
the few temporaries come from a per-thread scratch cache reused from call to call.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any

import numpy as np

from .contract import (
    GUARD_FAILED,
    GUARD_LOSS_SUM,
    GUARD_OK,
    GUARD_STEPS,
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
from .registry import ACTIVATIONS, LOSSES, loss_outputs

NAME = "numpy"
Array = Any

#: Nothing beyond the required primitives: the plain path everywhere.
CAPABILITIES = Capabilities()



# --------------------------------------------------------------------------- arrays
def array_module(a: Array) -> Any:
    """Return ``numpy`` or ``cupy``, whichever ``a`` belongs to."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


xp = np


def is_available() -> bool:
    """The reference runs everywhere NumPy does."""
    return True


def unavailable_reason() -> str:
    return ""


def is_simulated() -> bool:
    """Runs on the host itself, not on a simulator."""
    return False


def owns(a: Any) -> bool:
    """True for NumPy arrays, the arrays of this backend."""
    return isinstance(a, np.ndarray)


def as_array(a: Array, dtype: Any) -> Array:
    """``a`` as a C-contiguous array of ``dtype``: ``a`` itself when it already is one."""
    return np.asarray(a, dtype=dtype, order="C")


def to_device(a: Any, dtype: Any) -> Array:
    """Copy host data into a new C-contiguous array of this backend."""
    return np.array(a, dtype=dtype, order="C", copy=True)


def copy_into(dst: Array, src: Array) -> None:
    """``dst[...] = src`` for arrays of one shape and dtype."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_into needs arrays of one shape and dtype, got {dst.dtype} {dst.shape} and "
                         f"{src.dtype} {src.shape}")
    np.copyto(dst, src)


def to_host(a: Array) -> np.ndarray:
    """Return ``a`` as a NumPy array (no copy when it already is one)."""
    return np.asarray(a)


def zeros(shape: tuple[int, ...], dtype: Any) -> Array:
    return np.zeros(shape, dtype=dtype)


def synchronize() -> None:
    """Wait for queued work; the CPU has none."""


def all_finite(a: Array) -> bool:
    """True when no element of ``a`` is NaN or infinite."""
    return bool(array_module(a).isfinite(a).all())


_local = threading.local()


def _scratch(like: Array, tag: str, dtype: Any = None, shape: tuple[int, ...] | None = None) -> Array:
    """A per-thread temporary of ``like``'s shape and dtype (or the given ones), reused across calls.

    ``tag`` names its use, so that temporaries alive at the same time never share memory. Only
    for values that never leave the call that asked for them.
    """
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    xm = array_module(like)
    shape = like.shape if shape is None else shape
    dt = np.dtype(like.dtype if dtype is None else dtype)
    key = (xm.__name__, tag, shape, dt.str)
    buf = cache.get(key)
    if buf is None:
        if len(cache) > 256:
            cache.clear()
        buf = cache[key] = xm.empty(shape, dtype=dt)
    return buf


def array_stats(a: Array, integers: bool = True, row_sums: bool = True) -> np.ndarray:
    """Facts about ``a`` for input checks, in the ``STAT_*`` layout of the contract: how many elements
    are not finite and where the first is, min, max, and when asked how many are not whole numbers
    (``integers``) and for a 2-D array the largest ``|row sum - 1|`` (``row_sums``)."""
    xm = array_module(a)
    out = np.zeros(STATS_SIZE, dtype=np.float64)
    out[STAT_FIRST_NONFINITE] = -1
    flat = a.reshape(-1)
    if flat.size == 0:
        out[STAT_MIN] = out[STAT_MAX] = np.nan
        return out
    out[STAT_MIN] = float(flat.min())
    out[STAT_MAX] = float(flat.max())
    # min and max are finite only when every element is (NaN and inf reach them): look closer only then
    if a.dtype.kind == "f" and not (math.isfinite(out[STAT_MIN]) and math.isfinite(out[STAT_MAX])):
        finite = xm.isfinite(flat)
        out[STAT_NONFINITE] = int(flat.size - int(xm.count_nonzero(finite)))
        out[STAT_FIRST_NONFINITE] = int(xm.argmin(finite))
    if integers and a.dtype.kind == "f":
        out[STAT_NON_INTEGER] = int(xm.count_nonzero(flat != xm.floor(flat)))
    if row_sums and a.ndim == 2 and a.shape[0]:
        out[STAT_ROW_SUM_ERROR] = float(xm.abs(a.sum(axis=1, dtype=np.float64) - 1).max())
    return out


def one_hot(labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
    """Rows ``e_{labels[i]}`` of length ``n_classes`` (labels whole numbers in ``[0, n_classes)``)."""
    xm = array_module(labels)
    batch = labels.shape[0]
    if out is None:
        out = xm.zeros((batch, n_classes), dtype=dtype)
    else:
        out.fill(0)
    out[xm.arange(batch), labels.astype(np.int64)] = 1
    return out


def gather_rows(src: Array, idx: Array, out: Array) -> Array:
    """``out[i] = src[idx[i]]``: the rows of a minibatch, picked by an index array."""
    array_module(src).take(src, idx, axis=0, out=out)
    return out


# --------------------------------------------------------------------------- erf
def _erf(u: Array, out: Array) -> Array:
    xm = array_module(u)
    if xm is not np:
        from cupyx.scipy.special import erf

        return erf(u, out=out)
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy ships with the test extras
        out[...] = np.vectorize(math.erf, otypes=[u.dtype])(u)
        return out
    return erf(u, out=out)


# --------------------------------------------------------------------------- registry forms
class _Ops:
    """What the registry's NumPy forms use besides their arrays: the array module, scratch and erf."""

    def __init__(self, xm: Any) -> None:
        self.xm = xm

    @staticmethod
    def scratch(like: Array, tag: str, dtype: Any = None, shape: tuple[int, ...] | None = None) -> Array:
        return _scratch(like, tag, dtype, shape)

    @staticmethod
    def erf(a: Array, out: Array) -> Array:
        return _erf(a, out)

    @staticmethod
    def ignore_overflow() -> Any:
        return np.errstate(over="ignore")


_OPS: dict[str, _Ops] = {}


def _ops(a: Array) -> _Ops:
    xm = array_module(a)
    ops = _OPS.get(xm.__name__)
    if ops is None:
        ops = _OPS[xm.__name__] = _Ops(xm)
    return ops


def _activation(act: str) -> Any:
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}") from None


# --------------------------------------------------------------------------- activations
def activate(u: Array, act: str, alpha: float = 0.0, out: Array | None = None) -> Array:
    """Neural output ``x = f(u)``, elementwise (row-wise for softmax), into ``out`` (which may be
    ``u`` itself) or a new array: the registry's NumPy form of ``act``."""
    rec = _activation(act)
    ops = _ops(u)
    if out is None:
        out = ops.xm.empty_like(u)
    src = u
    if out is u and not rec.in_place:
        # the form reads u after its first write into out: work from a copy
        src = _scratch(u, "activate_u")
        src[...] = u
    rec.f(src, alpha, out, ops)
    return out


def activation_slope(y: Array, u: Array | None, act: str, alpha: float = 0.0, out: Array | None = None) -> Array:
    """Slope ``f'(u)``, from the output as ``phi(y) = f'(f^{-1}(y))`` where ``f`` is invertible, into
    ``out`` or a new array.

    The activations with ``needs_u`` (GELU, SiLU) read the pre-activation ``u``; every other one reads
    ``y`` only.
    """
    rec = _activation(act)
    if rec.phi is None:
        raise ValueError(f"activation {act!r} has no elementwise slope")
    if rec.needs_u and u is None:
        raise ValueError(f"{act}'s slope needs the pre-activation u")
    ops = _ops(y)
    if out is None:
        out = ops.xm.empty_like(y)
    rec.phi(y, u, alpha, out, ops)
    return out


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
    y: Array | None = None, u: Array | None = None,
) -> tuple[Array, Array | None]:
    """Forward pass of one layer: ``u = x W^T + b``, ``y = f(u)``.

    Returns ``(y, u)``, with ``u`` only when ``keep_u`` (else ``None``, and ``y`` is computed in
    place in the buffer that held ``u``). ``y``/``u`` are the buffers to write, when given.
    """
    xm = array_module(x)
    shape = (x.shape[0], W.shape[0])
    if keep_u:
        u = xm.empty(shape, dtype=W.dtype) if u is None else u
        xm.dot(x, W.T, out=u)
        u += b
        return activate(u, act, alpha, out=y), u
    y = xm.empty(shape, dtype=W.dtype) if y is None else y
    xm.dot(x, W.T, out=y)
    y += b
    return activate(y, act, alpha, out=y), None


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0, *,
    out: Array | None = None,
) -> Array:
    """Backward pass: ``delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l``, i.e. ``(delta W) * phi(y_prev)``."""
    xm = array_module(delta)
    rec = _activation(act_prev)
    if rec.phi is None:
        raise ValueError(f"activation {act_prev!r} has no elementwise slope")
    if rec.needs_u and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = xm.empty((delta.shape[0], W.shape[1]), dtype=W.dtype) if out is None else out
    xm.matmul(delta, W, out=g)
    if not rec.linear:
        g *= activation_slope(y_prev, u_prev, act_prev, alpha_prev, out=_scratch(g, "slope"))
    return g


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """Gradients ``dE/dW = delta^T x_prev`` and ``dE/db = sum over the batch of delta``."""
    xm = array_module(delta)
    if dW is None:
        dW = delta.T @ x_prev
    else:
        xm.matmul(delta.T, x_prev, out=dW)
    if db is None:
        db = delta.sum(axis=0)
    else:
        delta.sum(axis=0, out=db)
    return dW, db


# --------------------------------------------------------------------------- output error
def output_error(
    y: Array, u: Array | None, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0, *,
    delta: Array | None = None, value: Array | None = None, weights: Array | None = None,
) -> tuple[Array, Array]:
    """Error at the output: the mean loss ``E`` and ``delta^L = dE/du^L`` together.

    ``y = f(u)`` is the network output, ``u`` the output logits, ``t`` the targets (one-hot rows
    for cross-entropy). Fused pairs (sigmoid + bce, softmax + cross_entropy) read the logits and
    use ``delta = (y - t) / batch``; the others use ``delta = dL/dy * phi(y) / batch``.
    ``weights`` (``None``, or ``batch`` row weights ``w`` in ``y``'s dtype): ``E = sum_i w_i L_i / batch``
    and row ``i`` of ``delta`` is ``w_i`` times its unweighted value.
    Returns ``(loss, delta)`` with ``loss`` a 0-d array of ``y``'s dtype (``value`` when given).
    """
    xm = array_module(y)
    batch = y.shape[0]
    try:
        rec = LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}") from None
    if output not in loss_outputs(loss):
        raise ValueError(f"output {output!r} does not go with loss {loss!r}")
    if (rec.fused or ACTIVATIONS[output].needs_u) and u is None:
        raise ValueError(f"{output}/{loss} needs the output logits u")
    check_weights(weights, batch, y.dtype)
    ops = _ops(y)
    per_element = rec.value(y, u, t, param, ops)  # a scratch array: summed before the next form runs
    if weights is not None:
        # each element times its row's weight, then the same sum: weights of ones give the unweighted bits
        per_element *= weights.reshape(batch, 1)
    total = per_element.sum()
    delta = xm.empty_like(y) if delta is None else delta
    r = xm.subtract(y, t, out=delta)  # y - t, turned into delta below
    if rec.fused:
        xm.divide(r, batch, out=delta)
    else:
        rec.grad(r, param, delta, ops)
        delta *= activation_slope(y, u, output, alpha, out=_scratch(y, "loss"))
        delta /= batch
    if weights is not None:
        delta *= weights.reshape(batch, 1)
    mean = total / batch
    if value is None:
        return xm.asarray(mean, dtype=y.dtype), delta
    value[...] = mean
    return value, delta


# --------------------------------------------------------------------------- guarded updates
def _skipped(guard: Array | None) -> bool:
    """True when a guard says this step must not be applied."""
    return guard is not None and float(guard[GUARD_OK]) != 1.0


def guard_step(guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None:
    """Decide whether this step may be applied and keep the tally, in the ``GUARD_*`` layout:
    count the step; it is ok when no earlier step failed and the loss and every gradient are
    finite; add ``weight * loss`` to the sum when ok, else remember the first failing step."""
    xm = array_module(grads)
    guard[GUARD_STEPS] += 1
    finite = xm.isfinite(grads.reshape(-1), out=_scratch(grads, "finite", bool, (grads.size,))).all()
    ok = float(guard[GUARD_FAILED]) == 0 and math.isfinite(float(loss)) and bool(finite)
    guard[GUARD_OK] = 1.0 if ok else 0.0
    if ok:
        guard[GUARD_LOSS_SUM] += weight * float(loss)
    elif float(guard[GUARD_FAILED]) == 0:
        guard[GUARD_FAILED] = guard[GUARD_STEPS]


#: How a prediction is scored against its target, per row: the class of the row maximum, or every
#: output against the 0.5 threshold.
CORRECT_RULES = ("argmax", "threshold")


def count_correct(y: Array, t: Array, rule: str, total: Array) -> None:
    """``total[0] +=`` the number of rows ``i`` with ``argmax_j y_ij = argmax_j t_ij`` (``rule="argmax"``),
    or with ``(y_ij > 1/2) = (t_ij > 1/2)`` for every ``j`` (``"threshold"``); ``total`` a float64
    ``(1,)`` array (accuracy summed over the batches of an evaluation)."""
    xm = array_module(y)
    if rule == "argmax":
        hits = xm.count_nonzero(y.argmax(axis=1) == t.argmax(axis=1))
    elif rule == "threshold":
        hits = xm.count_nonzero(((y > 0.5) == (t > 0.5)).all(axis=1))
    else:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(CORRECT_RULES)}")
    total += hits  # stays where the arrays live


def add_sum_of_squares(total: Array, a: Array) -> None:
    """``total[0] += sum_ij a_ij^2``, summed in float64 into a float64 ``(1,)`` array (an L2 penalty
    ``||W||^2`` kept on the backend over many steps)."""
    flat = a.reshape(-1)
    total[0] += float(array_module(a).dot(flat, flat))


def _with_decay(p: Array, g: Array, weight_decay: float) -> Array:
    """``g + lambda p`` (``g`` itself without weight decay), in a scratch buffer."""
    if not weight_decay:
        return g
    gd = array_module(p).multiply(p, weight_decay, out=_scratch(p, "decayed"))
    gd += g
    return gd


def probing(guard: Array | None, probe: bool) -> bool:
    """True for a probe (which needs a guard to report to)."""
    if probe and guard is None:
        raise ValueError("probe=True needs the step's guard")
    return probe


def fail_step(guard: Array) -> None:
    """A probe's failing verdict, as for a step whose gradient is not finite: ``guard[0] = 0`` and,
    unless an earlier step failed, ``guard[2] = guard[1]`` (the ``GUARD_*`` layout)."""
    guard[GUARD_OK] = 0.0
    if float(guard[GUARD_FAILED]) == 0:
        guard[GUARD_FAILED] = guard[GUARD_STEPS]


def _zeros(like: Array) -> Array:
    """A per-thread flat array of zeros of ``like``'s size and dtype (never written)."""
    cache = getattr(_local, "zeros", None)
    if cache is None:
        cache = _local.zeros = {}
    xm = array_module(like)
    key = (xm.__name__, like.size, like.dtype.str)
    buf = cache.get(key)
    if buf is None:
        if len(cache) > 64:
            cache.clear()
        buf = cache[key] = xm.zeros(like.size, dtype=like.dtype)
    return buf


def _fail_unless_finite(guard: Array, *arrays: Array) -> None:
    """The probe's verdict: the step fails (:func:`fail_step`) unless every element of ``arrays`` is finite,
    found in one read of each: ``sum(a * 0)``, a dot product with zeros, is NaN exactly when an element
    of ``a`` is NaN or infinite."""
    for a in arrays:
        flat = a.reshape(-1)
        if math.isnan(float(array_module(a).dot(flat, _zeros(flat)))):
            fail_step(guard)
            return


def _quiet(probe: bool) -> Any:
    """No warnings where a probe computes an overflow on purpose; an update's own overflow warns."""
    return np.errstate(over="ignore", invalid="ignore") if probe else contextlib.nullcontext()


def sgd_update(p: Array, g: Array, lr: float, weight_decay: float = 0.0, guard: Array | None = None,
               probe: bool = False) -> None:
    """Plain SGD, in place: ``p <- p - eta (g + lambda p)``."""
    if _skipped(guard):
        return
    xm = array_module(p)
    dry = probing(guard, probe)
    with _quiet(dry):
        step = xm.multiply(_with_decay(p, g, weight_decay), lr, out=_scratch(p, "step"))
        if dry:
            _fail_unless_finite(guard, xm.subtract(p, step, out=step))
            return
    p -= step


def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """SGD with (Nesterov) momentum, in place: ``g' = g + lambda p``, ``v <- mu v + g'``,
    ``p <- p - eta v`` (Nesterov: ``p <- p - eta (g' + mu v)``)."""
    if _skipped(guard):
        return
    xm = array_module(p)
    dry = probing(guard, probe)
    with _quiet(dry):
        gd = _with_decay(p, g, weight_decay)
        v_new = xm.multiply(v, momentum, out=_scratch(v, "new_v") if dry else v)
        v_new += gd
        step = _scratch(p, "step")
        if nesterov:
            xm.multiply(v_new, momentum, out=step)
            step += gd
            step *= lr
        else:
            xm.multiply(v_new, lr, out=step)
        if dry:
            _fail_unless_finite(guard, v_new, xm.subtract(p, step, out=step))
            return
    p -= step


def adam_corrections(count: Array, lr: float, beta1: float, beta2: float, out: Array) -> None:
    """Adam's bias corrections for the coming step as backend data: ``t = count[0] + 1`` (``count``
    unchanged), ``out[0] = lr / (1 - beta1^t)``, ``out[1] = 1 - beta2^t`` (float64, then rounded to
    ``out``'s dtype: the numbers :func:`adam_update` computes from an int ``step``)."""
    t = float(count[0]) + 1.0
    dt = out.dtype.type
    out[0] = dt(lr / (1.0 - beta1**t))
    out[1] = dt(1.0 - beta2**t)


def count_step(count: Array, guard: Array | None = None) -> None:
    """``count[0] += 1`` unless ``guard`` says the step is not applied (the applied steps, Adam's ``t``)."""
    if not _skipped(guard):
        count[0] += 1


def _corrections(p: Array, lr: float, beta1: float, beta2: float, step: Any) -> tuple[Any, Any]:
    """``(lr / c1, c2)`` in ``p``'s dtype: from an int ``step``, or read from the ``(2,)`` array of
    :func:`adam_corrections` (as 1-element arrays, no host read)."""
    if isinstance(step, (int, np.integer)):
        dt = p.dtype.type
        return dt(lr / (1 - beta1**step)), dt(1 - beta2**step)
    return step[0:1], step[1:2]


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: Any, weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """Adam, in place: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``p <- p - eta m_hat / (sqrt(v_hat) + eps)`` with bias corrections ``1 - b^step``; ``step`` an
    int, or the corrections array of :func:`adam_corrections` (then ``lr`` is not used)."""
    if _skipped(guard):
        return
    xm = array_module(p)
    dry = probing(guard, probe)
    with _quiet(dry):
        gd = _with_decay(p, g, weight_decay)
        lr_c1, c2 = _corrections(p, lr, beta1, beta2, step)
        t = _scratch(p, "step")
        m_new = xm.multiply(m, beta1, out=_scratch(m, "new_m") if dry else m)
        m_new += xm.multiply(gd, 1 - beta1, out=t)
        v_new = xm.multiply(v, beta2, out=_scratch(v, "new_v") if dry else v)
        xm.multiply(gd, gd, out=t)
        t *= 1 - beta2
        v_new += t
        xm.divide(v_new, c2, out=t)
        xm.sqrt(t, out=t)
        t += eps
        xm.divide(m_new, t, out=t)
        t *= lr_c1
        if dry:
            _fail_unless_finite(guard, v_new, m_new, xm.subtract(p, t, out=t))
            return
    p -= t
