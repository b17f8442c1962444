"""NumPy reference backend: the specification and the test oracle of every other backend.

Shapes follow the batch-major layout: a batch ``x`` is ``(batch, n_in)``, a weight matrix
``W`` is ``(n_out, n_in)`` as in the notes (``W^l`` is ``n_l x n_{l-1}``), a bias ``b`` is
``(n_out,)``. The notes' column-vector equation ``u^l = W^l x^{l-1} + b^l`` becomes, for a
batch of row vectors, ``u = x W^T + b``.

Sign convention: ``delta`` here is the gradient ``dE/du`` of the mean loss ``E`` (the notes
define ``delta = -dE/du``), so the updates read ``W <- W - eta delta^T x`` where the notes
write ``W <- W + eta delta x^T``.

Every function is written against the array module of its inputs, so the same code runs on
CuPy arrays; it is what the other backends are tested against.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .spec import SELU_ALPHA, SELU_LAMBDA

NAME = "numpy"
Array = Any


# --------------------------------------------------------------------------- array module
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


def to_device(a: Any, dtype: Any) -> Array:
    """Copy host data into a C-contiguous array of this backend."""
    return np.array(a, dtype=dtype, order="C", copy=True)


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


# --------------------------------------------------------------------------- erf
def _erf(u: Array) -> Array:
    xm = array_module(u)
    if xm is not np:
        from cupyx.scipy.special import erf

        return erf(u)
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy ships with the test extras
        return np.vectorize(math.erf, otypes=[u.dtype])(u)
    return erf(u).astype(u.dtype, copy=False)


# --------------------------------------------------------------------------- activations
def activate(u: Array, act: str, alpha: float = 0.0) -> Array:
    """Neural output ``x = f(u)``, elementwise (row-wise for softmax); a new array."""
    xm = array_module(u)
    if act == "identity":
        return u.copy()
    if act == "step":
        return (u > 0).astype(u.dtype)
    if act == "sigmoid":
        # 1 / (1 + exp(-u)), written so that neither branch overflows
        e = xm.exp(-xm.abs(u))
        return xm.where(u >= 0, 1 / (1 + e), e / (1 + e)).astype(u.dtype, copy=False)
    if act == "tanh":
        return xm.tanh(u)
    if act == "relu":
        return xm.maximum(u, 0)
    if act == "leaky_relu":
        return xm.where(u > 0, u, alpha * u)
    if act == "elu":
        return xm.where(u > 0, u, alpha * xm.expm1(xm.minimum(u, 0)))
    if act == "selu":
        return SELU_LAMBDA * xm.where(u > 0, u, SELU_ALPHA * xm.expm1(xm.minimum(u, 0)))
    if act == "softplus":
        return xm.maximum(u, 0) + xm.log1p(xm.exp(-xm.abs(u)))
    if act == "gelu":
        return u * (0.5 * (1 + _erf(u * (1 / math.sqrt(2)))))
    if act == "silu":
        return u * activate(u, "sigmoid")
    if act == "softmax":
        e = xm.exp(u - u.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(f"unknown activation {act!r}")


def activation_slope(y: Array, u: Array | None, act: str, alpha: float = 0.0) -> Array:
    """Slope ``f'(u)``, from the output as ``phi(y) = f'(f^{-1}(y))`` where ``f`` is invertible.

    GELU and SiLU need the pre-activation ``u``; every other activation reads ``y`` only.
    """
    xm = array_module(y)
    if act == "identity":
        return xm.ones_like(y)
    if act == "step":
        return xm.zeros_like(y)
    if act == "sigmoid":
        return y * (1 - y)
    if act == "tanh":
        return 1 - y * y
    if act == "relu":
        return (y > 0).astype(y.dtype)
    if act == "leaky_relu":
        return xm.where(y > 0, 1, alpha).astype(y.dtype)
    if act == "elu":
        return xm.where(y > 0, 1, y + alpha).astype(y.dtype)
    if act == "selu":
        return xm.where(y > 0, SELU_LAMBDA, y + SELU_LAMBDA * SELU_ALPHA).astype(y.dtype)
    if act == "softplus":
        return -xm.expm1(-y)
    if act == "gelu":
        if u is None:
            raise ValueError("gelu's slope needs the pre-activation u")
        cdf = 0.5 * (1 + _erf(u * (1 / math.sqrt(2))))
        pdf = xm.exp(-0.5 * u * u) * (1 / math.sqrt(2 * math.pi))
        return cdf + u * pdf
    if act == "silu":
        if u is None:
            raise ValueError("silu's slope needs the pre-activation u")
        s = activate(u, "sigmoid")
        return s * (1 + u * (1 - s))
    raise ValueError(f"activation {act!r} has no elementwise slope")


# --------------------------------------------------------------------------- forward
def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False
) -> tuple[Array, Array | None]:
    """Forward pass of one layer: ``u = x W^T + b``, ``y = f(u)``.

    Returns ``(y, u)``, with ``u`` only when ``keep_u`` (else ``None``).
    """
    u = x @ W.T
    u += b
    y = activate(u, act, alpha)
    return y, (u if keep_u else None)


# --------------------------------------------------------------------------- backward
def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0
) -> Array:
    """Backward pass: ``delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l``, i.e. ``(delta W) * phi(y_prev)``."""
    g = delta @ W
    g *= activation_slope(y_prev, u_prev, act_prev, alpha_prev)
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


def sgd_update_from_delta(
    W: Array, b: Array, delta: Array, x_prev: Array, lr: float, weight_decay: float = 0.0
) -> None:
    """Plain SGD straight from the error, in place: ``W <- (1 - eta lambda) W - eta delta^T x_prev``,
    ``b <- b - eta sum delta``. No gradient buffer is kept."""
    if weight_decay:
        W *= 1 - lr * weight_decay
    W -= lr * (delta.T @ x_prev)
    b -= lr * delta.sum(axis=0)


# --------------------------------------------------------------------------- output error
def _log_sigmoid_complement(u: Array) -> Array:
    """``softplus(u) = log(1 + exp(u))`` without overflow."""
    xm = array_module(u)
    return xm.maximum(u, 0) + xm.log1p(xm.exp(-xm.abs(u)))


def output_error(
    y: Array, u: Array, t: Array, output: str, loss: str, param: float = 0.0, alpha: float = 0.0
) -> tuple[Array, Array]:
    """Error at the output: the mean loss ``E`` and ``delta^L = dE/du^L`` together.

    ``y = f(u)`` is the network output, ``u`` the output logits, ``t`` the targets (one-hot rows
    for cross-entropy). Fused pairs (sigmoid + bce, softmax + cross_entropy) read the logits and
    use ``delta = (y - t) / batch``; the others use ``delta = dL/dy * phi(y) / batch``.
    Returns ``(loss, delta)`` with ``loss`` a 0-d array of ``y``'s dtype.
    """
    xm = array_module(y)
    batch = y.shape[0]
    r = y - t
    if loss == "cross_entropy":
        m = u.max(axis=1, keepdims=True)
        lse = m + xm.log(xm.exp(u - m).sum(axis=1, keepdims=True))
        value = (t * (lse - u)).sum() / batch
        return value, r / batch
    if loss == "bce":
        value = (_log_sigmoid_complement(u) - t * u).sum() / batch
        return value, r / batch
    if loss == "mse":
        value = 0.5 * (r * r).sum() / batch
        dy = r
    elif loss == "mae":
        value = xm.abs(r).sum() / batch
        dy = xm.sign(r)
    elif loss == "huber":
        a = xm.abs(r)
        value = xm.where(a <= param, 0.5 * r * r, param * (a - 0.5 * param)).sum() / batch
        dy = xm.clip(r, -param, param)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    delta = dy * activation_slope(y, u, output, alpha) / batch
    return value, delta.astype(y.dtype, copy=False)


# --------------------------------------------------------------------------- optimizers
def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """SGD with (Nesterov) momentum, in place: ``g' = g + lambda p``, ``v <- mu v + g'``,
    ``p <- p - eta v`` (Nesterov: ``p <- p - eta (g' + mu v)``)."""
    gd = g + weight_decay * p if weight_decay else g
    v *= momentum
    v += gd
    if nesterov:
        p -= lr * (gd + momentum * v)
    else:
        p -= lr * v


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: int, weight_decay: float = 0.0,
) -> None:
    """Adam, in place: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``p <- p - eta m_hat / (sqrt(v_hat) + eps)`` with bias corrections ``1 - b^step``."""
    xm = array_module(p)
    gd = g + weight_decay * p if weight_decay else g
    m *= beta1
    m += (1 - beta1) * gd
    v *= beta2
    v += (1 - beta2) * gd * gd
    c1 = 1 - beta1**step
    c2 = 1 - beta2**step
    p -= (lr / c1) * m / (xm.sqrt(v / c2) + eps)
