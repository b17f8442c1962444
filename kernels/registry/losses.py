"""The loss records: each loss's value and output delta in the NumPy, scalar and CUDA C forms.

``E`` is the mean over the batch of the per-sample loss ``L``; elementwise losses give
``delta = dE/du = dL/dy * phi(y) / batch``, the fused pairs ``(y - t) / batch`` from the logits. Adding a loss
is one :class:`~backprop.kernels.registry.records.Loss` entry here, listed in :data:`LOSSES` (or one call of
:func:`backprop.kernels.registry.add_loss` before a backend is first used).
"""

from __future__ import annotations

from math import log  # noqa: F401 - the name the scalar forms call

from .activations import _np_softplus, softplus_f
from .records import HALF, ONE, ZERO, Loss, scalar


def _np_mse(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    r = ops.xm.subtract(y, t, out=ops.scratch(y, "loss"))
    ops.xm.multiply(r, r, out=r)
    r *= 0.5  # a power of two: their sum is 0.5 times the sum of the squares, bit for bit (no underflow)
    return r


def _np_mse_grad(r, k, out, ops):  # type: ignore[no-untyped-def]
    if out is not r:
        out[...] = r
    return out


@scalar
def mse_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    r = y - t
    return c[HALF] * r * r


@scalar
def mse_grad(r, k, c):  # type: ignore[no-untyped-def]
    return r


MSE = Loss(
    "mse", "1/2 sum_i (d_i - y_i)^2", "(y - d) phi(y) / batch", _np_mse, _np_mse_grad, mse_value, mse_grad,
    "T r = y - t; l = (T)0.5 * r * r; d = r * SLOPE / batch;", aliases=("squared_error",),
    sklearn_name="squared_error",
)


def _np_mae(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    r = ops.xm.subtract(y, t, out=ops.scratch(y, "loss"))
    return ops.xm.abs(r, out=r)


def _np_mae_grad(r, k, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.sign(r, out=out)


@scalar
def mae_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    return abs(y - t)


@scalar
def mae_grad(r, k, c):  # type: ignore[no-untyped-def]
    # np.sign: 0 for 0, NaN for NaN
    return c[ONE] if r > c[ZERO] else (-c[ONE] if r < c[ZERO] else r * c[ZERO])


MAE = Loss(
    "mae", "sum_i |d_i - y_i|", "sign(y - d) phi(y) / batch", _np_mae, _np_mae_grad, mae_value, mae_grad,
    "T r = y - t; l = fabs(r); d = bp_sign(r) * SLOPE / batch;",
    aliases=("absolute_error",), sklearn_name="absolute_error",
)


def _np_huber(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # m (|r| - m / 2) with m = min(|r|, k)
    xm = ops.xm
    a = xm.subtract(y, t, out=ops.scratch(y, "loss"))
    xm.abs(a, out=a)
    m = xm.minimum(a, k, out=ops.scratch(y, "aux"))
    m *= 0.5
    a -= m
    m *= 2
    a *= m
    return a


def _np_huber_grad(r, k, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.clip(r, -k, k, out=out)


@scalar
def huber_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    r = y - t
    a = abs(r)
    return c[HALF] * r * r if a <= k else k * (a - c[HALF] * k)


@scalar
def huber_grad(r, k, c):  # type: ignore[no-untyped-def]
    return -k if r < -k else (k if r > k else r)  # np.clip; NaN passes through


HUBER = Loss(
    "huber", "sum_i h(y_i - d_i), h(r) = r^2/2 if |r| <= k else k (|r| - k/2)", "clip(y - d, -k, k) phi(y) / batch",
    _np_huber, _np_huber_grad, huber_value, huber_grad,
    "T r = y - t; T a = fabs(r); l = a <= k ? (T)0.5 * r * r : k * (a - (T)0.5 * k); "
    "d = bp_clip(r, k) * SLOPE / batch;",
    sklearn_name="huber", default_param=1.0, param_range=(0.0, float("inf")), param_name="threshold",
)


def _np_bce(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # softplus(u) - t u, the cross-entropy of sigmoid(u) against t
    s = _np_softplus(u, 0.0, ops.scratch(u, "loss"), ops)
    s -= ops.xm.multiply(t, u, out=ops.scratch(u, "aux"))
    return s


@scalar
def bce_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    return softplus_f(u, k, c) - t * u


BCE = Loss(
    "bce", "-sum_i [d_i log y_i + (1 - d_i) log(1 - y_i)], from logits", "(y - d) / batch", _np_bce, None,
    bce_value, None, "l = bp_softplus(u) - t * u; d = (y - t) / batch;", allowed_outputs=("sigmoid",), fused=True,
    aliases=("binary_cross_entropy",), targets="unit", correct_rule="threshold",
)


def _np_cross_entropy(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # sum_i t_i (lse(u) - u_i), lse by the row max
    xm = ops.xm
    batch = u.shape[0]
    s = ops.scratch(u, "loss")
    m = ops.scratch(u, "row", shape=(batch, 1))
    lse = ops.scratch(u, "row_lse", shape=(batch, 1))
    u.max(axis=1, keepdims=True, out=m)
    xm.subtract(u, m, out=s)
    xm.exp(s, out=s)
    s.sum(axis=1, keepdims=True, out=lse)
    xm.log(lse, out=lse)
    lse += m
    xm.subtract(lse, u, out=s)
    s *= t
    return s


CROSS_ENTROPY = Loss(
    "cross_entropy", "-sum_i d_i log y_i, from logits with log-sum-exp", "(y - d) / batch", _np_cross_entropy,
    None, None, None, None, allowed_outputs=("softmax",), fused=True, rowwise=True, aliases=("log_loss",),
    targets="distribution", correct_rule="argmax",
)

def _np_poisson(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # exp(u) - t u + t log t - t (y = exp(u)): half the Poisson deviance, 0 where y = t
    xm = ops.xm
    s = xm.multiply(t, u, out=ops.scratch(u, "loss"))
    xm.subtract(y, s, out=s)
    a = ops.scratch(u, "aux")
    a.fill(1)
    xm.copyto(a, t, where=xm.greater(t, 0, out=ops.scratch(u, "mask", bool)))
    xm.log(a, out=a)  # log t where t > 0; 0 elsewhere (t log t taken as 0 there, as scipy's xlogy)
    a *= t
    a -= t
    s += a
    return s


@scalar
def poisson_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    return y - t * u + (t * log(t) if t > c[ZERO] else c[ZERO]) - t


POISSON = Loss(
    "poisson", "sum_i exp(u_i) - d_i u_i + d_i log d_i - d_i (half the Poisson deviance), from logits",
    "(y - d) / batch", _np_poisson, None, poisson_value, None,
    "l = y - t * u + (t > (T)0 ? t * log(t) : (T)0) - t; d = (y - t) / batch;", allowed_outputs=("exp",),
    fused=True, sklearn_name="poisson", targets="nonnegative",
)

#: name -> record, in code order.
LOSSES: dict[str, Loss] = {loss.name: loss for loss in (MSE, MAE, HUBER, BCE, CROSS_ENTROPY, POISSON)}
